"""Foreign adapter files read into our `Adapter`, with the same strength meaning (1.0 = as trained).

Families, told apart by their key names:
  kohya / A1111 / LyCORIS  `lora_unet_<flat>.<part>`, `lora_te_[text_model_]<flat>.<part>`; a module's
                           parts say its type: LoRA/LoCon (`lora_down`, `lora_up`, `alpha`,
                           optional Tucker `lora_mid`), LoHa (`hada_w1_a` ...), LoKr (`lokr_w1` ...),
                           full difference (`diff`).
  diffusers / PEFT         `unet.<path>.lora_A.weight` / `lora_B.weight`, `text_encoder.<path>...`,
                           alpha from the `lora_adapter_metadata` header; the older `lora.down` /
                           `lora.up`, `lora_linear_layer` and `processor.to_q_lora` names too.

LoRA and LoCon modules keep their factors (scale = alpha / rank). LoHa, LoKr and `diff` modules
have no low-rank factors, so their ΔW is computed exactly in fp32 and stored as an exact
factorisation with an identity on the smaller side (rank = min(out, in·kh·kw)): every part of
sdlora (blend, merge, export, convert) then treats them as plain linear adapters, at the cost of
holding ΔW in memory. DoRA modules (kohya/LyCORIS `dora_scale`; PEFT `lora_magnitude_vector`,
also as diffusers' conversion names it, `.lora_magnitude_vector.weight`) keep their factors and
carry the magnitude (`ModuleFactors.magnitude`, sdlora/lora/dora.py), its axis told by its shape.
Norm/OFT/GLoRA modules are not weight deltas at all: such files are refused, never half-loaded.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import torch

from sdlora.bases.families import BY_NAME, family_of_width
from sdlora.errors import SdloraError
from sdlora.io.files import NONLINEAR_PREFIX, check_rank, parse_flat_lora, read_safetensors
from sdlora.io.metadata import parse_json
from sdlora.io.sd3_names import TRANSFORMER_ROOTS, from_file_modules, is_sd3_keys
from sdlora.lora.adapter import PREFIXES, Adapter, ModuleFactors, flat_name, memory_key, widths
from sdlora.lora.dora import dora_axis, magnitude_2d
from sdlora.lora.embeddings import split_bundle

FORMAT_KEY = "sdlora_detected_format"
# lora_te3_ (SD 3.x's T5) and lora_transformer_ (OneTrainer's SD 3.x MMDiT: diffusers' paths)
KOHYA_PREFIXES = (
    "lora_unet_",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_transformer_",
)
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")  # ComfyUI's own layout

# Module parts of the kohya/LyCORIS flat layout -> module type.
PART_TYPES = {
    "lora_down.weight": "lora",
    "lora_up.weight": "lora",
    "lora_mid.weight": "lora",
    "alpha": "lora",
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "diff": "full",
    "diff_b": "full",  # a bias difference (Adapter.diffs)
}
# Parts of module types we refuse, with the reason shown to the user.
REFUSED_PARTS = {
    "bias": "bias differences",
    "w_norm": "norm-layer weights (w_norm)",
    "b_norm": "norm-layer weights (b_norm)",
    "oft_blocks": "OFT (oft_blocks)",
    "oft_diag": "OFT (oft_diag)",
    "a1.weight": "GLoRA (a1/a2/b1/b2)",
}
# SD 3x3 convolutions by name: LoHa/LoKr store their factors flattened (r, in·3·3).
CONV3_LEAVES = ("conv1", "conv2", "conv", "conv_in", "conv_out")

# Old diffusers attention-processor names -> module names.
LEGACY_PROCESSOR = {
    "unet": {
        "to_q_lora": "to_q",
        "to_k_lora": "to_k",
        "to_v_lora": "to_v",
        "to_out_lora": "to_out.0",
    },
    "text_encoder": {
        "to_q_lora": "q_proj",
        "to_k_lora": "k_proj",
        "to_v_lora": "v_proj",
        "to_out_lora": "out_proj",
    },
}
DIFFUSERS_COMPONENTS = {
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "transformer": "transformer",  # SD 3.x
    "text_encoder_3": "text_encoder_3",  # SD 3.x's T5 (diffusers itself does not load it)
}
UNET_ROOTS = (
    "down_blocks.",
    "up_blocks.",
    "mid_block.",
    "conv_in.",
    "conv_out.",
    "time_embedding.",
)


def detect_format(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The file's family: sdlora, kohya, diffusers; raise for full checkpoints and unknown files."""
    keys = list(tensors)
    kohya = any(k.startswith(KOHYA_PREFIXES) for k in keys)
    if any(k.startswith(NONLINEAR_PREFIX) for k in keys) or (
        kohya and "sdlora_format_version" in metadata
    ):
        return "sdlora"
    if kohya:
        return "kohya"
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfyui"
    if any(
        k.startswith(
            ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "base_model.model.")
        )
        or ".lora_A." in k
        or ".lora.down." in k
        or ".lora_linear_layer." in k
        or "_lora.down." in k
        for k in keys
    ):
        return "diffusers"
    if any(
        k.startswith(
            ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
        )
        for k in keys
    ):
        raise SdloraError("this is a full model checkpoint, not an adapter; use it as --base")
    raise SdloraError(
        f"no LoRA weights found: unknown adapter format (keys like {', '.join(keys[:3]) or 'none'}); "
        "sdlora reads kohya/A1111/LyCORIS and diffusers/PEFT LoRA files"
    )


def read_adapter(path: str | Path) -> Adapter:
    """Read any supported adapter file; record the detected format in its metadata."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    source = path.name
    try:
        tensors, embeddings = split_bundle(tensors, source)  # bundled words: not LoRA weights
        family = detect_format(tensors, metadata)
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise SdloraError(f"{key} has NaN/Inf weights; the file is damaged")
    except SdloraError as err:
        raise SdloraError(f"{source}: {err}") from None
    if family == "sdlora":
        adapter = parse_flat_lora(tensors, metadata, source)
        if adapter.is_linear and any(k.endswith((".diff", ".diff_b")) for k in tensors):
            adapter.diffs = parse_kohya(tensors, metadata, source)[0].diffs  # bias / norm
        detected = "sdlora" + ("" if adapter.is_linear else " (nonlinear)")
        detected += " (DoRA)" if adapter.is_dora else ""
    elif family == "kohya":
        adapter, detected = parse_kohya(tensors, metadata, source)
    elif family == "comfyui":
        adapter, detected = parse_comfy(tensors, metadata, source)
    else:
        adapter, detected = parse_diffusers(tensors, metadata, source)
    if is_sd3_keys(adapter.modules):  # SD 3.x's SAI names -> diffusers' (sdlora/io/sd3_names.py)
        try:
            adapter.modules = from_file_modules(adapter.modules)
        except SdloraError as err:
            raise SdloraError(f"{source}: {err}") from None
    adapter.metadata[FORMAT_KEY] = detected
    adapter.embeddings = embeddings
    return adapter


# ---------------------------------------------------------------------------------------------
# kohya / A1111 / LyCORIS


def parse_kohya(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[Adapter, str]:
    """kohya LoRA/LoCon and LyCORIS LoHa/LoKr/full flat layout -> (Adapter, detected format)."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, value in tensors.items():
        module, dot, part = name.partition(".")
        if not dot or not module.startswith(KOHYA_PREFIXES):
            raise SdloraError(
                f"{source}: key {name!r} is not in the kohya layout; the file mixes formats"
            )
        groups[module][part] = value
    adapter, types = build_adapter(groups, metadata, source)
    if types <= {"lora", "locon"}:
        locon = "locon" in types or trained_as_locon(metadata)
        detected = "kohya-locon" if locon else "kohya-lora"
    else:
        detected = "lycoris-" + "+".join(sorted(types))
    if any(m.magnitude is not None for m in adapter.modules.values()):
        detected += " (DoRA)"
    return adapter, detected


def build_adapter(
    groups: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], source: str
) -> tuple[Adapter, set[str]]:
    """{flat module name: {part: tensor}} -> (Adapter, module types found). Bias differences
    (`diff_b`) and 1-D weight differences (norm layers' `diff`) go to `Adapter.diffs`."""
    modules: dict[str, ModuleFactors] = {}
    diffs: dict[str, torch.Tensor] = {}
    types: set[str] = set()
    for module, parts in groups.items():
        for part in parts:
            if part in REFUSED_PARTS or part.split(".")[0] in REFUSED_PARTS:
                reason = REFUSED_PARTS.get(part) or REFUSED_PARTS[part.split(".")[0]]
                raise SdloraError(
                    f"{source}: {reason} is not supported (module {module}); "
                    "nothing was loaded; use a LoRA, LoCon, LoHa or LoKr file"
                )
            if part not in PART_TYPES and part != DORA_PART:
                raise SdloraError(
                    f"{source}: unknown module part {part!r} (module {module}); nothing was loaded"
                )
        parts = dict(parts)
        key = memory_key(module)
        if "diff_b" in parts:
            diffs[f"{key}.bias"] = _finite_diff(parts.pop("diff_b"), source, module)
        if "diff" in parts and parts["diff"].dim() == 1:  # a norm layer's weight
            diffs[f"{key}.weight"] = _finite_diff(parts.pop("diff"), source, module)
        magnitude = parts.pop(DORA_PART, None)
        if not set(parts) - {"alpha"}:
            if magnitude is not None:
                raise SdloraError(f"{source}: module {module} has a dora_scale but no LoRA parts")
            types.add("full")
            continue
        kinds = {PART_TYPES[p] for p in parts if p != "alpha"}
        if len(kinds) != 1:
            raise SdloraError(f"{source}: module {module} mixes {', '.join(sorted(kinds))} parts")
        kind = kinds.pop()
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
        try:
            if kind == "lora":
                factors = _lora_module(parts, alpha)
                # LoCon = a k×k (k > 1) conv; kohya's plain LoRA wraps 1×1 proj_in/proj_out too
                kind = "locon" if factors.down.shape[2:].numel() > 1 else "lora"
            elif kind == "loha":
                factors = exact_factors(_conv3(module, loha_delta(parts, alpha)))
            elif kind == "lokr":
                factors = exact_factors(_conv3(module, lokr_delta(parts, alpha)))
            else:
                factors = exact_factors(parts["diff"].float())
        except KeyError as err:
            raise SdloraError(f"{source}: module {module} lacks its part {err}") from None
        except (SdloraError, RuntimeError) as err:
            raise SdloraError(f"{source}: module {module}: {err}") from None
        if magnitude is not None:
            try:
                factors.magnitude = kohya_magnitude(magnitude, factors)
            except SdloraError as err:
                raise SdloraError(
                    f"{source}: {err} (module {module}); nothing was loaded"
                ) from None
        modules[key] = factors
        types.add(kind)
    if not modules:
        raise SdloraError(f"{source}: no LoRA weights found (not a LoRA adapter file?)")
    adapter = Adapter(modules=modules, metadata=dict(metadata), source=source, diffs=diffs)
    return adapter, types


def _finite_diff(value: torch.Tensor, source: str, module: str) -> torch.Tensor:
    if not torch.isfinite(value).all():
        raise SdloraError(f"{source}: module {module} has a NaN/Inf difference")
    return value.float()


# ---------------------------------------------------------------------------------------------
# ComfyUI's own layout

# ComfyUI's text encoders (its `clip_l`, SD 2.x's `clip_h`, SDXL/SD3's `clip_g`, SD3's `t5xxl`)
# -> pipeline components
COMFY_ENCODERS = {
    "clip_l": "text_encoder",
    "clip_h": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5xxl": "text_encoder_3",
}
# every part name, longest first: `lora_up.weight` before `weight`-less ones
_COMFY_PARTS = sorted({*PART_TYPES, *REFUSED_PARTS}, key=len, reverse=True)


def parse_comfy(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[Adapter, str]:
    """ComfyUI's trainer and extract-node layout -> (Adapter, detected format).

    Keys name modules by the model's own paths, as ComfyUI's generic LoRA keys (comfy/lora.py)
    read them: `diffusion_model.<original (LDM/SGM) UNet path>.<part>` and
    `text_encoders.<clip_l|clip_h|clip_g>.transformer.<Hugging Face CLIP path>.<part>`; parts
    are kohya's (`lora_up.weight`, `lora_down.weight`, `alpha`, LoHa/LoKr), full differences
    `diff` and bias differences `diff_b`. A missing alpha means scale 1, as ComfyUI reads it.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    encoders: set[str] = set()
    for name, value in tensors.items():
        part = next((p for p in _COMFY_PARTS if name.endswith("." + p)), None)
        path = name[: -len(part) - 1] if part else ""
        if path.startswith("diffusion_model."):
            module = "lora_unet_" + path.removeprefix("diffusion_model.").replace(".", "_")
        elif path.startswith("text_encoders."):
            encoder, _, rest = path.removeprefix("text_encoders.").partition(".")
            if encoder not in COMFY_ENCODERS or not rest.startswith("transformer."):
                raise SdloraError(f"{source}: key {name!r} names no text encoder sdlora knows")
            encoders.add(encoder)
            rest = rest.removeprefix("transformer.").replace(".", "_")
            module = PREFIXES[COMFY_ENCODERS[encoder]] + rest
        else:
            raise SdloraError(
                f"{source}: key {name!r} is not in ComfyUI's layout; the file mixes formats"
            )
        groups[module][part] = value
    adapter, types = build_adapter(groups, metadata, source)
    if "ss_base_model_version" not in adapter.metadata:
        # UNet names are the original ones for every family: say which it is, so they are not
        # taken for SDXL's (families.family_of_adapter_keys)
        family = _comfy_family(adapter, encoders)
        if family is not None:
            adapter.metadata["ss_base_model_version"] = family.base_model_version
    return adapter, "comfyui-" + "+".join(sorted(types))


def _comfy_family(adapter: Adapter, encoders: set[str]):
    """The family of a ComfyUI-layout adapter: by its text encoders' names, else its width."""
    if "t5xxl" in encoders:
        return BY_NAME["sd3"]
    if "clip_g" in encoders:
        return BY_NAME["sdxl"]
    if "clip_h" in encoders:
        return BY_NAME["sd2"]
    width = widths(adapter).get("unet")
    found = family_of_width(width) if width is not None else None
    if found is None and encoders:
        return BY_NAME["sd1"]  # clip_l alone
    return found


def trained_as_locon(metadata: dict[str, str]) -> bool:
    """True when the training metadata says LoCon: kohya's networks.lora or LyCORIS
    (`lycoris.kohya`) with a `conv_dim` in `ss_network_args`, or LyCORIS with algo locon."""
    raw = metadata.get("ss_network_args") or "{}"
    try:
        args = parse_json(raw, "ss_network_args")
    except SdloraError:
        return False
    if not isinstance(args, dict):
        return False
    module = metadata.get("ss_network_module", "")
    if module == "lycoris.kohya" and str(args.get("algo", "")).lower() == "locon":
        return True
    try:
        return module in ("networks.lora", "lycoris.kohya") and float(args.get("conv_dim") or 0) > 0
    except (TypeError, ValueError):
        return False


DORA_PART = "dora_scale"


def kohya_magnitude(magnitude: torch.Tensor, factors: ModuleFactors) -> torch.Tensor:
    """A `dora_scale` as (out, 1) or (1, in): its axis by its shape, as ComfyUI tells it."""
    down = factors.down
    return magnitude_2d(magnitude, dora_axis(magnitude, factors.up.shape[0], down.shape[1]))


def _lora_module(parts: dict[str, torch.Tensor], alpha: float | None) -> ModuleFactors:
    """LoRA / LoCon factors, Tucker mid folded into down exactly; rank checked against dims."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if "lora_mid.weight" in parts:
        # LoCon Tucker: 1x1 down (r, in, 1, 1), kxk mid (r, r, kh, kw), 1x1 up (out, r, 1, 1).
        # mid∘down is one kxk conv with kernel Σ_b mid[a, b] · down[b, i]; zero padding commutes.
        mid = parts["lora_mid.weight"].float()
        down = torch.einsum("abhw,bi->aihw", mid, down.float().flatten(1))
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        raise SdloraError(f"unexpected factor shapes down {list(down.shape)}, up {list(up.shape)}")
    if up.dim() == 2 and down.dim() == 4:
        up = up[:, :, None, None]
    rank = down.shape[0]
    if up.shape[1] != rank or up[0, 0].numel() != 1:
        raise SdloraError(f"down rank {rank} does not match up {list(up.shape)}")
    check_rank(rank, up.shape[0], down[0].numel())
    return ModuleFactors(down=down, up=up, alpha=alpha)


def loha_delta(parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LoHa ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/rank (Hadamard product; LyCORIS, FedPara)."""
    w1a, w1b = parts["hada_w1_a"].float(), parts["hada_w1_b"].float()
    w2a, w2b = parts["hada_w2_a"].float(), parts["hada_w2_b"].float()
    rank = w1b.shape[0]
    if "hada_t1" in parts:
        # Tucker: t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)
        m1 = torch.einsum("ijkl,jr,ip->prkl", parts["hada_t1"].float(), w1b, w1a)
        m2 = torch.einsum("ijkl,jr,ip->prkl", parts["hada_t2"].float(), w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b  # (out, in·kh·kw)
    check_rank(rank, m1.shape[0], m1[0].numel())
    return m1 * m2 * ((alpha if alpha is not None else rank) / rank)


def lokr_delta(parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LoKr ΔW = W1 ⊗ W2 · alpha/rank (Kronecker product; the scale is 1 when both are full)."""
    rank = None
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"].float()
    else:
        w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
        rank = parts["lokr_w1_b"].shape[0]
        check_rank(rank, w1.shape[0], w1.shape[1])
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    else:
        a, b = parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float()
        rank = b.shape[0]
        check_rank(rank, a.shape[0] if "lokr_t2" not in parts else a.shape[1], b.shape[1])
        if "lokr_t2" in parts:
            w2 = torch.einsum("ijkl,jr,ip->prkl", parts["lokr_t2"].float(), b, a)
        else:
            w2 = a @ b
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


def _conv3(module: str, delta: torch.Tensor) -> torch.Tensor:
    """Give a flattened (out, in·9) delta of an SD 3x3 conv (known by its name) its kernel shape."""
    named_conv = module.endswith(tuple("_" + leaf for leaf in CONV3_LEAVES))
    if delta.dim() == 2 and named_conv and delta.shape[1] % 9 == 0:
        return delta.reshape(delta.shape[0], delta.shape[1] // 9, 3, 3)
    return delta


def exact_factors(delta: torch.Tensor) -> ModuleFactors:
    """ΔW (out, in[, kh, kw]) as factors with an identity on the smaller side: B·A = ΔW exactly.

    Linear: out <= in: up = I (out, out), down = ΔW; else down = I (in, in), up = ΔW.
    Conv: the identity down kernel (k, in, kh, kw) with k = in·kh·kw copies each input patch to a
    channel, so up (out, k, 1, 1) = ΔW flattened applies ΔW exactly.
    """
    delta = delta.float()
    if not torch.isfinite(delta).all():
        raise SdloraError("the computed weight change is not finite")
    out_features, k = delta.shape[0], delta[0].numel()
    if out_features <= k:
        eye = torch.eye(out_features)
        up = eye if delta.dim() == 2 else eye[:, :, None, None]
        return ModuleFactors(down=delta.contiguous(), up=up)
    down = torch.eye(k).reshape(k, *delta.shape[1:])
    up = delta.reshape(out_features, k, *([1, 1] if delta.dim() == 4 else []))
    return ModuleFactors(down=down, up=up.contiguous())


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT

_DIFFUSERS_PARTS = (
    (".lora_magnitude_vector", "magnitude"),  # PEFT's saved name
    (".lora_magnitude_vector.weight", "magnitude"),  # diffusers' conversion of dora_scale
    (".lora_magnitude_vector.default.weight", "magnitude"),  # a PEFT model's state_dict
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),  # processor.to_q_lora.down.weight
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
_DIFFUSERS_REFUSED = {
    "lora_embedding_A": "LoRA on embeddings",
    ".lora_B.bias": "LoRA with bias (lora_bias)",
}


def parse_diffusers(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[Adapter, str]:
    """diffusers/PEFT keys (`unet.<path>.lora_A.weight` ...) -> (Adapter with kohya flat keys, format)."""
    configs = _peft_configs(metadata, source)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    legacy = False
    for name, value in tensors.items():
        for marker, reason in _DIFFUSERS_REFUSED.items():
            if marker in name:
                raise SdloraError(
                    f"{source}: {reason} is not supported ({name}); nothing was loaded"
                )
        part = next(((s, role) for s, role in _DIFFUSERS_PARTS if name.endswith(s)), None)
        if part is None:
            raise SdloraError(f"{source}: key {name!r} is not a LoRA weight; nothing was loaded")
        suffix, role = part
        legacy = legacy or "lora_A" not in suffix and "lora_B" not in suffix and role == "down"
        component, path = _split_component(name[: -len(suffix)], source)
        groups[(component, path)][role] = value
    modules: dict[str, ModuleFactors] = {}
    for (component, path), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise SdloraError(f"{source}: {component}.{path} lacks its lora_A/lora_B pair")
        down, up = parts["down"], parts["up"]
        try:
            factors = _lora_module({"lora_down.weight": down, "lora_up.weight": up}, None)
        except SdloraError as err:
            raise SdloraError(f"{source}: {component}.{path}: {err}") from None
        if "magnitude" in parts:
            magnitude = parts["magnitude"]
            try:  # PEFT's (out,) and (1, out, 1, 1); a converted dora_scale keeps its shape
                peft = magnitude.dim() == 1 or magnitude.shape[:1] == (1,) and magnitude.dim() == 4
                out, inputs = factors.up.shape[0], factors.down.shape[1]
                axis = dora_axis(magnitude, out, inputs, peft=peft)
            except SdloraError as err:
                raise SdloraError(f"{source}: {component}.{path}: {err}") from None
            factors.magnitude = magnitude_2d(magnitude, axis)
        if "alpha" in parts:
            factors.alpha = float(parts["alpha"].float().item())
        elif component in configs:
            factors.alpha = _peft_alpha(configs[component], path, factors.rank)
        modules[_flat(component, path)] = factors
    if not modules:
        raise SdloraError(f"{source}: no LoRA weights found (not a LoRA adapter file?)")
    detected = "diffusers-legacy" if legacy else "diffusers-peft"
    if any(m.magnitude is not None for m in modules.values()):
        detected += " (DoRA)"
    return Adapter(modules=modules, metadata=dict(metadata), source=source), detected


def _split_component(prefix: str, source: str) -> tuple[str, str]:
    """`unet.down_blocks.0...to_q` -> ('unet', 'down_blocks.0...to_q'), legacy names mapped."""
    prefix = prefix.removeprefix("base_model.model.")
    head, _, rest = prefix.partition(".")
    if head in DIFFUSERS_COMPONENTS:
        component, path = DIFFUSERS_COMPONENTS[head], rest
    elif prefix.startswith(TRANSFORMER_ROOTS):
        component, path = "transformer", prefix  # SD 3.x's MMDiT, unprefixed
    elif prefix.startswith(UNET_ROOTS):
        component, path = "unet", prefix  # unprefixed keys are UNet keys, as diffusers reads them
    elif prefix.startswith(("text_model.", "encoder.layers.")):
        component, path = "text_encoder", prefix
    else:
        raise SdloraError(f"{source}: cannot tell which model {prefix!r} belongs to")
    path = path.replace(".processor.", ".")
    leaf = path.rsplit(".", 1)[-1]
    legacy = LEGACY_PROCESSOR.get(component, {})
    if leaf in legacy:
        path = path[: -len(leaf)] + legacy[leaf]
    return component, path


def _flat(component: str, path: str) -> str:
    """Flat key for a module path (diffusers names; an SDXL UNet answers to them too)."""
    return flat_name(component, path)


def _peft_configs(metadata: dict[str, str], source: str) -> dict[str, dict]:
    """{'unet': {...}, 'text_encoder': {...}} from the `lora_adapter_metadata` header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    flat = parse_json(raw, f"{source}: its lora_adapter_metadata header")
    if not isinstance(flat, dict):
        raise SdloraError(f"{source}: its lora_adapter_metadata header is not a JSON object")
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        component, dot, field_name = key.partition(".")
        if dot:
            configs[component][field_name] = value
    return dict(configs)


def _peft_alpha(config: dict, path: str, rank: int) -> float:
    """alpha such that alpha / rank is PEFT's scale for this module (alpha_pattern, rsLoRA)."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        return alpha * rank / math.sqrt(rank)  # PEFT scale alpha / sqrt(r)
    return alpha


def load_adapter(path: str | Path) -> Adapter:
    """Load an adapter file of any supported format (sdlora, kohya/LyCORIS, diffusers/PEFT).

    The detected format is recorded in `metadata["sdlora_detected_format"]`.
    """
    return read_adapter(path)
