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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split `word` the way CLIP's BPE does: merge the lowest-ranked adjacent pair until none."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = zip(pieces[:-1], pieces[1:], strict=True)
        pair = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):  # every occurrence of the pair, left to right
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merges) for a byte-level BPE that spells each word as one token.

    Each word gets merges until BPE (lowest-ranked pair first, as CLIP applies them) joins it into
    one token: an earlier word's merge can split it otherwise (e.g. "a n" from "an" inside
    "orange"). Merges are only appended, and a new merge ranks after all older ones, so it never
    changes how an earlier word splits: every word stays one token.
    """
    words = WORDS if words is None else words
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):  # unique, order kept
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:  # join the leftmost pair BPE leaves, then split again
            ranks[pieces[0], pieces[1]] = len(ranks)
            if pieces[0] + pieces[1] not in seen:  # "ab c" and "a bc" make the same token
                seen.add(pieces[0] + pieces[1])
                tokens.append(pieces[0] + pieces[1])
            pieces = _bpe(word, ranks)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def t5_vocab(words: list[str] | None = None) -> list[tuple[str, float]]:
    """(piece, log-probability) of the project's T5 (SentencePiece unigram) tokenizer: T5's
    special tokens first (<pad> 0, </s> 1, <unk> 2), each word as one "▁word" piece, then the
    single characters, so anything else still tokenizes, letter by letter."""
    words = list(dict.fromkeys(WORDS if words is None else words))
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    return [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -2.0),
        *(("▁" + w, -1.0) for w in words),
        *((c, -5.0) for c in chars),
    ]
