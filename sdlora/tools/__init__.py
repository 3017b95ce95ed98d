"""Tools that work on whole adapter files: `inspect` (what a file holds), `merge` (several
adapters into one, exactly or by SVD), `extract` (an adapter from the difference of two bases),
`distill` (a nonlinear adapter into a plain one) and `export` (a merged checkpoint or adapter
for other tools).
"""
