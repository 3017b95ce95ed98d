"""Base models: what they are and how to load and run them.

`families` is the one table of model families (SD 1.x, SD 2.x, SDXL: module names, key
prefixes, native size, VAE factor); `base` loads a base from a built-in name, a folder, a single
file or a Hub id (`pipelines` picks the diffusers class); `tiny` and `toyworld` build the small
bases used by tests and the examples (`tokenizer_files` writes their CLIP tokenizer);
`recommend` gives each base's sampling settings; `generate` draws images and `grid` lays them out.
"""
