"""Writes the vocab.json / merges.txt of the project's own CLIP tokenizer (no download).

The vocabulary follows CLIP's byte-level BPE layout: the 256 byte symbols, the same with the
end-of-word marker `</w>`, then one token per merge, then the two special tokens. Merges are made
for a fixed list of words, so those words become single tokens; anything else still tokenizes,
byte by byte.
"""

from __future__ import annotations

import json
from pathlib import Path

# Words a toy prompt is made of. Order matters: it fixes the token ids.
WORDS = """
a an the of and with in on at to by for from under over above below near left right top bottom
center middle big small large tiny huge one two three many red orange yellow green blue purple
pink brown black white gray grey gold silver cyan magenta dark light bright pale
circle square triangle star heart ring cross line dot dots stripe stripes shape shapes box ball
sky sea grass tree house cat dog bird fish flower sun moon cloud mountain road water fire
photo painting drawing sketch picture image style art watercolor oil pencil ink pixel cartoon
outline outlined flat texture pattern noise smooth rough checker checkered plaid wavy background
portrait landscape of a an person face man woman
sks
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merges) for a byte-level BPE that spells each word as one token."""
    words = WORDS if words is None else words
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen_tokens = set(tokens)
    seen_merges: set[str] = set()
    for word in dict.fromkeys(words):  # unique, order kept
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            merged = left + right
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if merged not in seen_tokens:
                seen_tokens.add(merged)
                tokens.append(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path
