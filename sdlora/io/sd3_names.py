"""SD 3.x adapter files: the MMDiT's module names as Stability's own code, kohya and ComfyUI spell
them, and the conversions to and from the diffusers names sdlora holds in memory.

In memory an SD3 adapter is keyed by diffusers' module paths (`lora_transformer_` + the path with
dots as underscores, OneTrainer's layout: `lora_transformer_transformer_blocks_0_attn_to_q`), and
the text encoders `lora_te_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_` (T5).

Files are written as kohya's `networks/lora_sd3.py` writes them and ComfyUI reads them (its generic
rule: `lora_unet_` + a weight name of the SAI MMDiT with dots as underscores):

  diffusers `transformer_blocks.N.`             SAI `joint_blocks.N.`
    attn.to_q / to_k / to_v                       x_block.attn.qkv       (one fused Linear)
    attn.add_q_proj / add_k_proj / add_v_proj     context_block.attn.qkv (one fused Linear)
    attn2.to_q / to_k / to_v (MMDiT-X)            x_block.attn2.qkv      (one fused Linear)
    attn.to_out.0 / attn2.to_out.0                x_block.attn.proj / x_block.attn2.proj
    attn.to_add_out                               context_block.attn.proj
    ff.net.0.proj / ff.net.2                      x_block.mlp.fc1 / fc2
    ff_context.net.0.proj / ff_context.net.2      context_block.mlp.fc1 / fc2
    norm1.linear / norm1_context.linear           x_block / context_block .adaLN_modulation.1
  top: pos_embed.proj -> x_embedder.proj, context_embedder, time_text_embed.timestep_embedder.
  linear_1/2 -> t_embedder.mlp.0/2, time_text_embed.text_embedder.linear_1/2 -> y_embedder.mlp.0/2,
  proj_out -> final_layer.linear, norm_out.linear -> final_layer.adaLN_modulation.1.

Text encoders: `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_encoder_block_…` (T5, without
CLIP's `text_model_` level).

Fused q/k/v. The SAI `qkv` Linear is [W_q; W_k; W_v] (rows). LoRAs on q, k, v (B_i·A_i, any ranks
r_i) are one LoRA on qkv exactly: down = [A_q; A_k; A_v] (r_q+r_k+r_v, in), up block-diagonal
(3·h, Σr): up[slice i, cols i] = B_i. A missing projection leaves its rows zero. Reading one back,
each slice i of up (h rows) keeps only its non-zero columns: B_i = up[slice i, cols], A_i =
down[cols]. For a block-diagonal up (kohya's and ours) this gives the three LoRAs back exactly; any
other fused factors still give B_i·A_i = (up·down)[slice i] exactly (columns shared by slices
appear in each), so every file applies as written.

Modulation order. The last block's text side (`context_pre_only`) and the final layer keep two
chunks, SAI's (shift, scale) against diffusers' (scale, shift): their up rows swap halves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from sdlora.bases.families import SD3
from sdlora.errors import SdloraError
from sdlora.lora.adapter import PREFIXES, ModuleFactors, file_key

MEMORY = PREFIXES["transformer"]  # lora_transformer_
SAI = "lora_unet_"
T5_MEMORY = PREFIXES["text_encoder_3"] + "text_model_"  # how module_keys spells T5's paths

# diffusers path in a block -> (SAI path in `joint_blocks.N.`, slot in the fused qkv or None)
BLOCK_PATHS = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# diffusers path outside the blocks -> SAI path
TOP_PATHS = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# the same as flat names (dots as underscores), as adapter keys spell them
BLOCK = {k.replace(".", "_"): (v.replace(".", "_"), slot) for k, (v, slot) in BLOCK_PATHS.items()}
TOP = {k.replace(".", "_"): v.replace(".", "_") for k, v in TOP_PATHS.items()}
SAI_BLOCK = {sai: leaf for leaf, (sai, slot) in BLOCK.items() if slot is None}
SAI_QKV: dict[str, list[str]] = {}  # fused SAI leaf -> its [q, k, v] diffusers leaves
for _leaf, (_sai, _slot) in BLOCK.items():
    if _slot is not None:
        SAI_QKV.setdefault(_sai, ["", "", ""])[_slot] = _leaf
SAI_TOP = {sai: leaf for leaf, sai in TOP.items()}
_MEMORY_BLOCK = re.compile(rf"{MEMORY}transformer_blocks_(\d+)_(.+)")
_SAI_BLOCK = re.compile(rf"{SAI}joint_blocks_(\d+)_(.+)")
# roots of an SD3 transformer's module paths (unprefixed diffusers/PEFT keys)
TRANSFORMER_ROOTS = (
    "transformer_blocks.",
    "pos_embed.",
    "context_embedder.",
    "time_text_embed.",
    "norm_out.",
    "proj_out.",
)


def is_sai_key(key: str) -> bool:
    """True for a flat key of the SAI MMDiT layout (`lora_unet_joint_blocks_…`, `…_final_layer_…`)."""
    if not key.startswith(SAI):
        return False
    found = _SAI_BLOCK.fullmatch(key)
    if found:
        return found[2] in SAI_BLOCK or found[2] in SAI_QKV
    return key[len(SAI) :] in SAI_TOP


def is_sd3_keys(keys) -> bool:
    """True when an adapter's flat keys show SD 3.x: the MMDiT's names or T5's `lora_te3_`."""
    return any(k.startswith((MEMORY, PREFIXES["text_encoder_3"])) or is_sai_key(k) for k in keys)


def _swapped(up: torch.Tensor) -> torch.Tensor:
    """up rows (shift, scale) <-> (scale, shift): the two halves exchanged (an involution)."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first]).contiguous()


def _two_chunk(leaf: str, factors: ModuleFactors) -> bool:
    """True for the modulations kept in two chunks, whose order SAI and diffusers disagree on:
    the final layer's, and the last block's text side (out = 2·in; other blocks have 6·in)."""
    if leaf == "norm_out_linear":
        return True
    return leaf == "norm1_context_linear" and factors.up.shape[0] == 2 * factors.down.shape[1]


def _scaled(factors: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up·scale): the module's ΔW = up·down with its alpha/rank folded in, fp32."""
    return factors.down.float(), factors.up.float() * factors.scale


def fuse_qkv(parts: Mapping[int, ModuleFactors]) -> ModuleFactors:
    """LoRAs on some of q (0), k (1), v (2) -> one LoRA on the fused qkv, exactly: downs stacked,
    ups block-diagonal (scale folded in, alpha = rank)."""
    first = next(iter(parts.values()))
    width, inputs = first.up.shape[0], first.down.shape[1:]  # q, k, v are equally wide in SD3
    downs, blocks, rank = [], [], 0
    for slot in sorted(parts):
        down, up = _scaled(parts[slot])
        if up.dim() != 2 or up.shape[0] != width or down.shape[1:] != inputs:
            raise SdloraError("the q, k and v factors of one attention have different shapes")
        downs.append(down)
        blocks.append((slot, rank, up))
        rank += down.shape[0]
    up = torch.zeros(3 * width, rank)
    for slot, start, part in blocks:
        up[slot * width : (slot + 1) * width, start : start + part.shape[1]] = part
    return ModuleFactors(down=torch.cat(downs), up=up, alpha=float(rank))


def split_qkv(factors: ModuleFactors) -> dict[int, ModuleFactors]:
    """One LoRA on the fused qkv -> LoRAs on q (0), k (1), v (2) with the same ΔW slices exactly:
    each slice keeps the rank columns it uses (see the module docstring). An all-zero up (an
    untrained file) keeps kohya's equal split of the rank, or every column when it has none."""
    down, up = _scaled(factors)
    if up.shape[0] % 3:
        raise SdloraError(f"a fused qkv has {up.shape[0]} outputs, not a multiple of 3")
    slices = up.chunk(3, dim=0)
    rank = down.shape[0]
    untouched = not bool(up.any())
    out = {}
    for slot, part in enumerate(slices):
        if untouched:
            cols = torch.arange(rank).chunk(3)[slot] if rank % 3 == 0 else torch.arange(rank)
        else:
            cols = part.abs().sum(0).nonzero().flatten()
        if cols.numel():
            out[slot] = ModuleFactors(down=down[cols].contiguous(), up=part[:, cols].contiguous())
    return out


def to_file_modules(modules: Mapping[str, ModuleFactors]) -> dict[str, ModuleFactors]:
    """In-memory SD3 keys -> the kohya/ComfyUI file layout (SAI names, fused qkv, lora_te1_/2_/3_).
    Linear adapters only: the fused module's ΔW is the sum of its parts'."""
    out: dict[str, ModuleFactors] = {}
    fused: dict[str, dict[int, ModuleFactors]] = {}
    for key, factors in modules.items():
        if key.startswith(T5_MEMORY):
            out[PREFIXES["text_encoder_3"] + key[len(T5_MEMORY) :]] = factors
            continue
        if not key.startswith(MEMORY):
            out[file_key(key, SD3)] = factors
            continue
        found = _MEMORY_BLOCK.fullmatch(key)
        leaf = found[2] if found else key[len(MEMORY) :]
        if found and leaf in BLOCK:
            sai, slot = BLOCK[leaf]
            name = f"{SAI}joint_blocks_{found[1]}_{sai}"
        elif not found and leaf in TOP:
            sai, slot, name = TOP[leaf], None, SAI + TOP[leaf]
        else:
            raise SdloraError(
                f"module {key} has no name in the SD3 (SAI) layout; write the diffusers layout "
                "(sdlora convert --to diffusers)"
            )
        if slot is not None:
            fused.setdefault(name, {})[slot] = factors
        elif _two_chunk(leaf, factors):
            down, up = _scaled(factors)
            out[name] = ModuleFactors(down=down, up=_swapped(up), alpha=float(down.shape[0]))
        else:
            out[name] = factors
    for name, parts in fused.items():
        try:
            out[name] = fuse_qkv(parts)
        except SdloraError as err:
            raise SdloraError(f"module {name}: {err}") from None
    return out


def from_file_modules(modules: Mapping[str, ModuleFactors]) -> dict[str, ModuleFactors]:
    """The reverse: SAI-named transformer modules (kohya, ComfyUI, sdlora files) -> diffusers keys,
    fused qkv split exactly, T5's keys with the `text_model_` level sdlora's keys give every text
    encoder; other keys (CLIP's, OneTrainer's transformer keys) stay as they are."""
    out: dict[str, ModuleFactors] = {}
    t5 = PREFIXES["text_encoder_3"]
    for key, factors in modules.items():
        if key.startswith(t5) and not key.startswith(T5_MEMORY):
            out[T5_MEMORY + key[len(t5) :]] = factors  # as `module_keys` spells T5's modules
            continue
        if not is_sai_key(key):
            out[key] = factors
            continue
        found = _SAI_BLOCK.fullmatch(key)
        if found is None:
            leaf = SAI_TOP[key[len(SAI) :]]
            name = MEMORY + leaf
        else:
            block = f"{MEMORY}transformer_blocks_{found[1]}_"
            if found[2] in SAI_QKV:
                leaves = SAI_QKV[found[2]]
                try:
                    for slot, part in split_qkv(factors).items():
                        out[block + leaves[slot]] = part
                except SdloraError as err:
                    raise SdloraError(f"module {key}: {err}") from None
                continue
            leaf = SAI_BLOCK[found[2]]
            name = block + leaf
        if _two_chunk(leaf, factors):
            down, up = _scaled(factors)
            factors = ModuleFactors(down=down, up=_swapped(up))
        out[name] = factors
    return out


def variant(config: Mapping) -> str:
    """Which SD 3.x an MMDiT config is, as the SAI model spec's architecture ids name them:
    MMDiT-X blocks (dual attention) make 3.5 Medium, qk-norm alone 3.5 Large, neither SD3 Medium."""
    if config.get("dual_attention_layers"):
        return "stable-diffusion-v3.5-medium"
    if config.get("qk_norm"):
        return "stable-diffusion-v3.5-large"
    return "stable-diffusion-v3-medium"


def adapter_variant(modules) -> str | None:
    """The variant an adapter's own names show, where they do: a second attention (attn2) only
    exists in 3.5 Medium's MMDiT-X blocks; otherwise None (Large and 3 Medium share names)."""
    attn2 = re.compile(
        rf"({MEMORY}transformer_blocks_\d+_attn2_|{SAI}joint_blocks_\d+_x_block_attn2_)"
    )
    return "stable-diffusion-v3.5-medium" if any(attn2.match(k) for k in modules) else None


def metadata(modules, title: str, base_config: Mapping | None = None) -> dict[str, str]:
    """Header keys that tell other tools an SD3 adapter: kohya's `ss_base_model_version` (sdlora
    writes the family, "sd3") and the SAI model spec's architecture (`<model>/lora`), with the
    variant from the base's config when known, else from the names, else 3.5 Medium's family id
    `stable-diffusion-v3`."""
    arch = variant(base_config) if base_config is not None else adapter_variant(modules)
    return {
        "ss_base_model_version": SD3.base_model_version,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch or 'stable-diffusion-v3'}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/sd3.5",
        "modelspec.title": title,
    }
