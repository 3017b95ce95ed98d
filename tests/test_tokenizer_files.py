"""The project's BPE tokenizer files: every word of WORDS is one token (tiny base's tokenizer)."""

from __future__ import annotations

import pytest

from sdlora.bases.tiny import make_tokenizer
from sdlora.bases.tokenizer_files import WORDS, vocab_and_merges, write_tokenizer_files


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_every_word_is_one_token(tokenizer) -> None:
    split = {w: tokenizer.tokenize(w) for w in dict.fromkeys(WORDS)}
    assert {w: t for w, t in split.items() if len(t) != 1} == {}
    assert {t[0] for t in split.values()} == {w + "</w>" for w in split}


def test_prompt_ids_are_one_per_word(tokenizer) -> None:
    prompt = "a big orange triangle on a black background in sks style"
    ids = tokenizer(prompt).input_ids
    vocab = tokenizer.get_vocab()
    assert ids == [tokenizer.bos_token_id, *(vocab[w + "</w>"] for w in prompt.split())] + [
        tokenizer.eos_token_id
    ]


def test_unknown_words_still_tokenize(tokenizer) -> None:
    pieces = tokenizer.tokenize("zebra")
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>"


def test_vocab_is_consistent() -> None:
    vocab, merges = vocab_and_merges()
    assert sorted(vocab.values()) == list(range(len(vocab)))  # dense ids, no duplicate tokens
    assert len(set(merges)) == len(merges)
    for merge in merges:  # every merge makes a token that is in the vocabulary
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right in vocab
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]


def test_custom_words_are_one_token_each(tmp_path) -> None:
    from transformers import CLIPTokenizer

    words = ["an", "banana", "nab", "ananas", "bandana", "b", "nana"]
    vocab_path, merges_path = write_tokenizer_files(tmp_path, words)
    tok = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=77)
    assert all(tok.tokenize(w) == [w + "</w>"] for w in words)
