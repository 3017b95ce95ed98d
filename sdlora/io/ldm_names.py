"""diffusers UNet and VAE names <-> the original (LDM / SGM) layout's, derived from the configs.

Stability's original code (CompVis LDM for SD 1.x/2.x, SGM for SDXL) names the UNet's parts by
position: `input_blocks.N` (conv_in, then each down block's layers, each followed by its
downsampler), `middle_block.0-2` and `output_blocks.N`, with ResBlock children `in_layers.2`,
`emb_layers.1`, ... where diffusers has `down_blocks.b.resnets.j.conv1`, `time_emb_proj`, ...
Single files use these names for weights, and kohya-layout SDXL adapters for modules
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`). The rules are built from the
config (blocks, layers per block, which blocks have attention), so the built-in tiny bases and
full-size models both work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdlora.errors import SdloraError

# diffusers ResnetBlock2D child -> LDM ResBlock child (Sequentials: in_layers = norm, SiLU, conv).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}

# A rule maps a diffusers module prefix to an LDM prefix; `None` keeps the rest of the key,
# a dict renames the first child of the prefix (e.g. norm1 -> in_layers.0).
Rules = dict[str, tuple[str, dict[str, str] | None]]


def _per_block(value: int | list[int] | tuple[int, ...], n: int) -> list[int]:
    return [value] * n if isinstance(value, int) else list(value)


def unet_rules(config: Mapping[str, Any]) -> Rules:
    """Prefix rules for UNet2DConditionModel -> `model.diffusion_model.`."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down_types)
    layers = _per_block(config["layers_per_block"], n)
    rules: Rules = {
        "time_embedding.linear_1.": ("time_embed.0.", None),
        "time_embedding.linear_2.": ("time_embed.2.", None),
        "conv_in.": ("input_blocks.0.0.", None),
        "conv_norm_out.": ("out.0.", None),
        "conv_out.": ("out.2.", None),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop ids
        rules["add_embedding.linear_1."] = ("label_emb.0.0.", None)
        rules["add_embedding.linear_2."] = ("label_emb.0.2.", None)
    # input_blocks: 0 is conv_in; then each layer is (resnet, attention), each downsampler its own.
    index = 0
    for b in range(n):
        for j in range(layers[b]):
            index += 1
            rules[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{index}.0.", UNET_RESNET)
            rules[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{index}.1.", None)
        if b < n - 1:  # diffusers adds no downsampler to the last block
            index += 1
            rules[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", None)
    # middle_block: resnet, attention, resnet.
    for i in range(2):
        rules[f"mid_block.resnets.{i}."] = (f"middle_block.{2 * i}.", UNET_RESNET)
    rules["mid_block.attentions.0."] = ("middle_block.1.", None)
    # output_blocks: up block b has layers[n-1-b] + 1 layers; the upsampler follows the last
    # layer's attention (slot 2) or, in blocks without attention, its resnet (slot 1).
    index = 0
    for b in range(n):
        count = layers[n - 1 - b] + 1
        for j in range(count):
            rules[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{index}.0.", UNET_RESNET)
            rules[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{index}.1.", None)
            if j == count - 1 and b < n - 1:
                slot = 2 if "Attn" in up_types[b] else 1
                rules[f"up_blocks.{b}.upsamplers.0.conv."] = (
                    f"output_blocks.{index}.{slot}.conv.",
                    None,
                )
            index += 1
    return rules


def vae_rules(config: Mapping[str, Any]) -> Rules:
    """Prefix rules for AutoencoderKL -> `first_stage_model.`."""
    n = len(config["down_block_types"])
    rules: Rules = {
        "quant_conv.": ("quant_conv.", None),
        "post_quant_conv.": ("post_quant_conv.", None),
    }
    for part in ("encoder", "decoder"):
        rules[f"{part}.conv_in."] = (f"{part}.conv_in.", None)
        rules[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", None)
        rules[f"{part}.conv_out."] = (f"{part}.conv_out.", None)
        for i in range(2):
            rules[f"{part}.mid_block.resnets.{i}."] = (f"{part}.mid.block_{i + 1}.", VAE_RESNET)
        attention = f"{part}.mid_block.attentions.0."
        rules[attention] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
        rules[attention + "to_out.0."] = (f"{part}.mid.attn_1.proj_out.", None)
    layers = config["layers_per_block"]
    for i in range(n):
        # LDM numbers decoder levels from the lowest resolution up, diffusers the other way.
        up = n - 1 - i
        for j in range(layers + 1):  # the decoder has one resnet more per level
            if j < layers:
                rules[f"encoder.down_blocks.{i}.resnets.{j}."] = (
                    f"encoder.down.{i}.block.{j}.",
                    VAE_RESNET,
                )
            rules[f"decoder.up_blocks.{i}.resnets.{j}."] = (
                f"decoder.up.{up}.block.{j}.",
                VAE_RESNET,
            )
        rules[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", None)
        rules[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{up}.upsample.", None)
    return rules


def rename(key: str, rules: Rules, ordered: list[str], what: str) -> str:
    for prefix in ordered:
        if key.startswith(prefix):
            ldm, children = rules[prefix]
            rest = key[len(prefix) :]
            if children is not None:
                head, dot, tail = rest.partition(".")
                if head not in children:
                    break
                rest = children[head] + dot + tail
            return ldm + rest
    raise SdloraError(
        f"{what} weight {key!r} has no place in the original SD layout; "
        "fuse or remove adapters before exporting"
    )


def convert(sd: Mapping[str, torch.Tensor], rules: Rules, prefix: str, what: str) -> dict:
    ordered = sorted(rules, key=len, reverse=True)  # longest prefix wins (to_out.0 vs attention)
    out = {prefix + rename(k, rules, ordered, what): v for k, v in sd.items()}
    if len(out) != len(sd):
        raise SdloraError(f"{what}: two weights mapped to the same name; the config does not fit")
    return out


def original_module_paths(config: Mapping[str, Any], paths) -> dict[str, str]:
    """diffusers UNet module path -> original-layout module path, for the `paths` that have one
    (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` with 2 layers a block)."""
    rules = unet_rules(config)
    ordered = sorted(rules, key=len, reverse=True)
    found = {}
    for path in paths:
        try:  # a rule maps key prefixes: give the module path a leaf to rename it as a key
            found[path] = rename(path + ".weight", rules, ordered, "unet").removesuffix(".weight")
        except SdloraError:
            continue
    return found
