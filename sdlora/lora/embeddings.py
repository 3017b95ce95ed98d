"""New token embeddings (textual inversion) that travel with an adapter: pivotal tuning's tokens.

An adapter may carry new words, each with n vectors per text encoder:
`Adapter.embeddings = {token: {component: (n, D) tensor}}`, the component named as on the
pipeline (`text_encoder`; SDXL adds `text_encoder_2`). They live in two file forms:

  bundled in the adapter   `bundle_emb.<token>.<key>`, the form A1111's LoRA loader reads: on
                           SD 1.x/2.x (one text encoder) the key is `string_to_param.*`, on SDXL
                           `clip_l` (text_encoder) and `clip_g` (text_encoder_2).
  a separate file          one token per .safetensors: `{token: (n, D)}` on SD 1.x/2.x, which
                           diffusers' `load_textual_inversion` reads with the token as its name
                           and A1111/ComfyUI read by file name; `{clip_l, clip_g}` on SDXL.

A token with n > 1 vectors is spelled as diffusers spells it: the tokenizer gets `tok`, `tok_1`
... `tok_{n-1}` and a prompt's `tok` becomes `tok tok_1 ... tok_{n-1}` before tokenizing
(`expand_prompt`, as diffusers' `maybe_convert_prompt`).

In a pipeline the base's tokenizer and embedding are never changed: `attach` puts a copy of
the tokenizer with the new tokens in their place and wraps the embedding in `TokenEmbedding`,
whose new ids (from the base tokenizer's length on) read the new vectors and whose other ids
read the base rows untouched; `detach` puts the base's own objects back.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.io.writing import written_file

BUNDLE_PREFIX = "bundle_emb."
# component -> key after `bundle_emb.<token>.`: one table per text-encoder layout
ONE_ENCODER_KEYS = {"text_encoder": "string_to_param.*"}  # SD 1.x / 2.x
TWO_ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL (A1111 names)
# text-encoder component -> its tokenizer's attribute on the pipeline
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
MAX_VECTORS = 75  # a prompt holds 75 tokens between its start and end tokens
TOKEN_SPEC = re.compile(r"^(?P<token>[^:\s]+)(?::(?P<count>\d+))?$")

Embeddings = dict[str, dict[str, torch.Tensor]]  # token -> component -> (n, D)


def key_table(components) -> dict[str, str]:
    """The bundle-key table for embeddings over these text-encoder components."""
    return TWO_ENCODER_KEYS if "text_encoder_2" in components else ONE_ENCODER_KEYS


def bundle_tensors(embeddings: Embeddings) -> dict[str, torch.Tensor]:
    """`bundle_emb.<token>.<key>` tensors for an adapter file (see the module docstring)."""
    tensors = {}
    for token, per_component in embeddings.items():
        table = key_table(per_component)
        for component, vectors in per_component.items():
            if component not in table:
                raise SdloraError(f"embedding {token!r}: unknown text encoder {component!r}")
            tensors[f"{BUNDLE_PREFIX}{token}.{table[component]}"] = vectors.detach().contiguous()
    return tensors


def split_bundle(
    tensors: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], Embeddings]:
    """(the file's other tensors, its bundled embeddings); a bundle key of unknown form raises."""
    by_key = {v: k for table in (ONE_ENCODER_KEYS, TWO_ENCODER_KEYS) for k, v in table.items()}
    rest: dict[str, torch.Tensor] = {}
    embeddings: Embeddings = {}
    for name, value in tensors.items():
        if not name.startswith(BUNDLE_PREFIX):
            rest[name] = value
            continue
        token, _, key = name[len(BUNDLE_PREFIX) :].partition(".")
        component = "text_encoder" if key.startswith("string_to_param.") else by_key.get(key)
        if not token or component is None:
            raise SdloraError(
                f"{source}: bundled embedding key {name!r} is not in a known form "
                "(bundle_emb.TOKEN.string_to_param.*, .clip_l or .clip_g)"
            )
        if value.dim() == 1:
            value = value[None]  # one vector
        if value.dim() != 2 or not value.is_floating_point() or not torch.isfinite(value).all():
            raise SdloraError(f"{source}: bundled embedding {name} is not a finite (n, D) matrix")
        embeddings.setdefault(token, {})[component] = value.float()
    return rest, embeddings


def file_tensors(token: str, per_component: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a separate embedding file for `token` (see the module docstring)."""
    if set(per_component) == {"text_encoder"}:
        return {token: per_component["text_encoder"].detach().contiguous()}
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    return {names[c]: v.detach().contiguous() for c, v in per_component.items()}


def file_name(token: str) -> str:
    """A file name for `token`'s embedding: the token where it is a safe name, else made one."""
    return re.sub(r"[^\w\-]", "_", token).strip("_") or "token"


def embedding_file_names(tokens, what: str = "the new words") -> dict[str, str]:
    """token -> `<file_name(token)>.safetensors`, each name once.

    Two tokens that would share a file (`x/y` and `x_y`, two emoji words -> token.safetensors,
    or names that differ only in case, one file on Windows and macOS) are refused, naming both:
    A1111 and ComfyUI call an embedding by its file name, so a suffix that told them apart
    would change the word a prompt must use; the user picks words that keep apart instead.
    """
    names: dict[str, str] = {}
    taken: dict[str, str] = {}  # casefolded file name -> its token
    for token in tokens:
        name = f"{file_name(token)}.safetensors"
        other = taken.setdefault(name.casefold(), token)
        if other != token:
            raise SdloraError(
                f"{what} {other!r} and {token!r} would both be saved as {name} (file names keep "
                "letters, digits, '-' and '_', whatever their case); rename one of them"
            )
        names[token] = name
    return names


def save_embedding_files(
    embeddings: Embeddings, folder: Path, overwrite: bool = False
) -> list[Path]:
    """One `<token>.safetensors` per token in `folder` (made if missing); return the paths.

    Every name is checked before anything is written (`embedding_file_names`, and existing
    files unless `overwrite`), so a refusal leaves the folder as it was."""
    from safetensors.torch import save_file

    paths = [folder / name for name in embedding_file_names(embeddings).values()]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise SdloraError(
                    f"{path} already exists; choose another place or allow overwriting"
                )
    folder.mkdir(parents=True, exist_ok=True)
    for path, (token, per_component) in zip(paths, embeddings.items(), strict=True):
        with written_file(path) as tmp:
            save_file(file_tensors(token, per_component), tmp, metadata={"sdlora_token": token})
    return paths


# ---------------------------------------------------------------------------------------------
# tokens: parsing, checks, initial vectors


def parse_token_spec(spec: str) -> tuple[str, int]:
    """`sks` -> ('sks', 1), `sks:2` -> ('sks', 2); a one-line error for anything else."""
    match = TOKEN_SPEC.match(spec.strip())
    count = int(match["count"]) if match and match["count"] else 1
    if match is None or "." in match["token"] or not 1 <= count <= MAX_VECTORS:
        raise SdloraError(
            f"--new-token {spec!r}: give a word without spaces, dots or colons, optionally with "
            f"its number of vectors (1 to {MAX_VECTORS}), e.g. sks or sks:2"
        )
    return match["token"], count


def vector_names(token: str, count: int) -> list[str]:
    """The tokenizer entries of a token with `count` vectors: tok, tok_1, ..., tok_{n-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def check_new_token(tokenizer, token: str, count: int, what: str = "--new-token") -> None:
    """Refuse a token the base's tokenizer already has (diffusers' loader refuses it too)."""
    vocab = tokenizer.get_vocab()
    for name in vector_names(token, count):
        if name in vocab:
            raise SdloraError(
                f"{what} {token!r}: {name!r} is already in the base's vocabulary; pick a word "
                "it does not know, e.g. ohwx or <sks>"
            )


def single_token_id(tokenizer, word: str) -> int:
    """The id of `word` when it is exactly one token of the base's vocabulary; else raise."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise SdloraError(
            f"--init-token {word!r} is {len(ids)} tokens for this base ({', '.join(pieces)}); "
            "give one word that is a single token, or leave it out for random vectors"
        )
    return ids[0]


def initial_vectors(
    tokenizer,
    weight: torch.Tensor,
    count: int,
    init_token: str | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """(count, D) fp32 start vectors: the init word's row repeated, else random normal with the
    base rows' per-dimension mean and standard deviation (the embeddings' own scale)."""
    base = weight.detach().float().cpu()
    if init_token is not None:
        return base[single_token_id(tokenizer, init_token)].repeat(count, 1)
    rows = base[: len(tokenizer)]
    noise = torch.randn((count, base.shape[1]), generator=generator)
    return rows.mean(0) + rows.std(0) * noise


def expand_prompt(tokenizer, text: str) -> str:
    """`tok` -> `tok tok_1 ... tok_{n-1}` for each multi-vector token the tokenizer was given."""
    added = tokenizer.get_added_vocab()
    for token in added:
        if f"{token}_1" in added and token in text:
            names = [token]
            while f"{token}_{len(names)}" in added:
                names.append(f"{token}_{len(names)}")
            text = text.replace(token, " ".join(names))
    return text


# ---------------------------------------------------------------------------------------------
# the pipeline side


class TokenEmbedding(nn.Module):
    """The base's token embedding plus new rows: ids < `start` read the base, the rest `vectors`.

    `vectors` (N, D) is a Parameter when it trains (pivotal tuning), else a buffer; it stays in
    its own dtype and is cast to the base weight's dtype on the way out.
    """

    def __init__(self, base: nn.Embedding, start: int, vectors: torch.Tensor, trainable: bool):
        super().__init__()
        self.base, self.start = base, start
        if trainable:
            self.vectors = nn.Parameter(vectors)
        else:
            self.register_buffer("vectors", vectors)

    @property
    def weight(self) -> torch.Tensor:  # what `get_input_embeddings().weight` readers expect
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # no `if new.any()` shortcut: it would wait for the GPU, and under DDP a step without
        # the words would leave `vectors` out of the graph
        out = self.base(ids.clamp(max=self.start - 1))  # (B, T, D)
        new = ids >= self.start
        extra = self.vectors.to(out.dtype)[(ids - self.start).clamp(0, len(self.vectors) - 1)]
        return torch.where(new[..., None], extra, out)


def check_words(pipe, embeddings: Embeddings, source: str) -> None:
    """Refuse, naming `source`, words this base cannot take: a text encoder it lacks, vectors of
    another width (another model family), a word its tokenizer knows already."""
    for token, per_component in embeddings.items():
        for component, vectors in per_component.items():
            encoder = getattr(pipe, component, None)
            if encoder is None:
                raise SdloraError(f"{source}: word {token!r} is for a {component} this base lacks")
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors.shape[1] != width:
                raise SdloraError(
                    f"{source}: word {token!r} is {vectors.shape[1]} wide but this base's "
                    f"{component} takes {width}; it was made for another model family"
                )
            tokenizer = base_tokenizer(pipe, TOKENIZERS[component])
            check_new_token(tokenizer, token, len(vectors), what=f"{source}: word")


def attach(pipe, embeddings: Embeddings, trainable: bool = False) -> dict[str, TokenEmbedding]:
    """Give `pipe` these tokens: a tokenizer copy with them and a `TokenEmbedding` per text
    encoder (replacing any earlier attach). Return the new embedding module per component."""
    check_words(pipe, embeddings, "new words")
    detach(pipe)
    modules: dict[str, TokenEmbedding] = {}
    components = sorted({c for per in embeddings.values() for c in per})
    for component in components:
        encoder = getattr(pipe, component, None)
        tokenizer_name = TOKENIZERS[component]
        if encoder is None:
            raise SdloraError(f"the base has no {component} for the adapter's embeddings")
        tokenizer = copy.deepcopy(getattr(pipe, tokenizer_name))
        base = encoder.get_input_embeddings()
        start = len(tokenizer)
        rows, layout, offset = [], {}, 0
        for token, per_component in embeddings.items():
            vectors = per_component.get(component)
            if vectors is None:
                raise SdloraError(f"word {token!r} has no vectors for {component}")
            names = vector_names(token, vectors.shape[0])
            tokenizer.add_tokens(names)
            rows.append(vectors)
            layout[token] = (offset, len(names))
            offset += len(names)
        new_ids = tokenizer.convert_tokens_to_ids(
            [n for t, per in embeddings.items() for n in vector_names(t, per[component].shape[0])]
        )
        if new_ids != list(range(start, start + len(new_ids))):
            raise SdloraError("the tokenizer did not number the new tokens in order")  # a bug
        vectors = torch.cat(rows).to(base.weight.device)
        module = TokenEmbedding(base, start, vectors if trainable else vectors.detach(), trainable)
        module.base_tokenizer = getattr(pipe, tokenizer_name)  # plain attributes, not modules
        module.layout = layout  # token -> (first row in `vectors`, number of vectors)
        encoder.set_input_embeddings(module)
        setattr(pipe, tokenizer_name, tokenizer)
        modules[component] = module
    return modules


def detach(pipe) -> None:
    """Put the base's own tokenizer and embedding back wherever `attach` replaced them."""
    for component, tokenizer_name in TOKENIZERS.items():
        encoder = getattr(pipe, component, None)
        module = encoder.get_input_embeddings() if encoder is not None else None
        if isinstance(module, TokenEmbedding):
            encoder.set_input_embeddings(module.base)
            setattr(pipe, tokenizer_name, module.base_tokenizer)


def attached(pipe) -> Embeddings:
    """The tokens a pipeline holds now (through `attach`), with their vectors."""
    found: Embeddings = {}
    for component in TOKENIZERS:
        encoder = getattr(pipe, component, None)
        module = encoder.get_input_embeddings() if encoder is not None else None
        if isinstance(module, TokenEmbedding):
            for token, (first, count) in module.layout.items():
                vectors = module.vectors.detach()[first : first + count].float().cpu()
                found.setdefault(token, {})[component] = vectors
    return found


def base_tokenizer(pipe, name: str = "tokenizer"):
    """The base's own tokenizer, also while `attach` has put a copy with new tokens in its place."""
    component = next(c for c, t in TOKENIZERS.items() if t == name)
    encoder = getattr(pipe, component, None)
    module = encoder.get_input_embeddings() if encoder is not None else None
    return module.base_tokenizer if isinstance(module, TokenEmbedding) else getattr(pipe, name)
