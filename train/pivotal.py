"""Pivotal tuning: new words (textual-inversion embeddings) trained together with the LoRA.

Each `--new-token TOKEN[:N]` adds a word of N vectors to the text encoder's vocabulary, started
from `--init-token`'s embedding or, without one, from random normal vectors at the base rows'
per-dimension mean and spread. Only those vectors train: they are a Parameter of their own inside
`sdlora.lora.embeddings.TokenEmbedding`, and the base's embedding matrix is not in the optimizer, so
every other row stays bit-identical. They learn at `--embedding-lr`, without weight decay (decay
would pull them towards zero, off the scale of the words around them), and alone for the first
`--embedding-only-steps` optimizer steps (the LoRA's gradients are dropped there).

The words are saved inside the adapter (`bundle_emb.*`, the form A1111 reads) and as one
embedding file per word in OUTPUT/embeddings/ (diffusers' `load_textual_inversion`, A1111,
ComfyUI); checkpoints hold them for an exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.errors import SdloraError
from sdlora.lora.embeddings import (
    TokenEmbedding,
    attach,
    check_new_token,
    initial_vectors,
    parse_token_spec,
    single_token_id,
)
from sdlora.train.config import TrainConfig
from sdlora.train.data import derived_seed

COMPONENT = "text_encoder"  # SD 1.x / 2.x: one text encoder


@dataclass
class NewWords:
    """The run's new words: their vector counts and the trainable embedding that holds them."""

    counts: dict[str, int]  # token -> number of vectors, in the order of --new-token
    module: TokenEmbedding  # its `vectors` (sum of counts, D) fp32 Parameter trains

    @property
    def parameter(self) -> torch.nn.Parameter:
        return self.module.vectors

    def embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """token -> {component: (n, D) fp32 copy on the CPU}, as an Adapter keeps them."""
        vectors = self.parameter.detach().float().cpu()
        found, first = {}, 0
        for token, count in self.counts.items():
            found[token] = {COMPONENT: vectors[first : first + count].clone()}
            first += count
        return found

    def state(self) -> dict[str, torch.Tensor]:
        """For a checkpoint: token -> (n, D) vectors."""
        return {t: per[COMPONENT] for t, per in self.embeddings().items()}

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Put a checkpoint's vectors back (exact resume)."""
        if list(state) != list(self.counts):
            raise SdloraError(f"{source}: its new words {list(state)} are not this run's")
        with torch.no_grad():
            self.parameter.copy_(torch.cat([state[t] for t in self.counts]))


def parse_new_tokens(specs: list[str]) -> dict[str, int]:
    """--new-token values -> {token: vector count}; duplicates refused."""
    counts: dict[str, int] = {}
    for spec in specs:
        token, count = parse_token_spec(spec)
        if token in counts:
            raise SdloraError(f"--new-token {token!r} is given twice")
        counts[token] = count
    return counts


def add_new_words(pipe, config: TrainConfig) -> NewWords | None:
    """Give `pipe` the run's new words, trainable; None when the run has none.

    Call before the optimizer is built (it needs the Parameter). The pipe's tokenizer is
    replaced by a copy that knows the words, so training, samples and validation see them.
    """
    if not config.new_tokens:
        return None
    counts = parse_new_tokens(config.new_tokens)
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: a word needs both encoders
        raise SdloraError(
            "--new-token: pivotal tuning trains the one text encoder of SD 1.x / 2.x bases; "
            "on SDXL (two text encoders) it is not supported yet, so leave --new-token out"
        )
    tokenizer = pipe.tokenizer
    if config.init_token is not None:
        single_token_id(tokenizer, config.init_token)  # one-line error before any work
    weight = pipe.text_encoder.get_input_embeddings().weight
    embeddings = {}
    for token, count in counts.items():
        check_new_token(tokenizer, token, count)
        generator = torch.Generator().manual_seed(derived_seed(config.seed, "new token", token))
        vectors = initial_vectors(tokenizer, weight, count, config.init_token, generator)
        embeddings[token] = {COMPONENT: vectors.to(weight.device)}
    module = attach(pipe, embeddings, trainable=True)[COMPONENT]
    return NewWords(counts, module)
