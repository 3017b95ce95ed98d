"""What the UNet is conditioned on, per model family: text embeddings, and SDXL's added inputs.

SD 1.x and 2.x: the text encoder's last hidden state after its final layer norm, (B, 77, D).
(SD 2.x's diffusers text encoder already stops one layer early: 23 of OpenCLIP-H's 24 layers.)

SDXL (Podell et al. 2023, §2.1-2.2), as diffusers' StableDiffusionXLPipeline encodes prompts:
- `encoder_hidden_states`: the penultimate hidden states of CLIP ViT-L (768) and OpenCLIP
  ViT-bigG (1280), concatenated: (B, 77, 2048);
- `text_embeds`: bigG's pooled, projected output (B, 1280);
- `time_ids`: six numbers per image, (original height, original width, crop top, crop left,
  target height, target width) in pixels. "Original" is the image's size before it was scaled
  into its bucket, the crop is the offset of the bucket's window in the scaled image (mirrored
  when the image was flipped), "target" is the bucket. At generation time diffusers passes
  (H, W, 0, 0, H, W): an uncropped picture of the size asked for.

SD 3.x (Esser et al. 2024, §5.1), as diffusers' StableDiffusion3Pipeline encodes prompts:
- `encoder_hidden_states`: CLIP-L's (768) and CLIP-G's (1280) penultimate hidden states
  concatenated (B, 77, 2048), zero-padded to T5-XXL's width (4096), then T5's last hidden state
  (B, L, 4096) after them along the tokens: (B, 77 + L, 4096). L is `t5_max_length`; without T5
  (`--no-t5`) its L tokens are zeros, as the pipeline gives without `text_encoder_3`;
- `pooled_projections`: both CLIP encoders' pooled, projected outputs concatenated (B, 2048).

`Conditioning.of(pipe)` picks the family's recipe from `RECIPES`; the training step, the caches
and the validation loss all ask it, so none of them branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.bases.families import family_of_pipeline
from sdlora.lora.embeddings import expand_prompt


@dataclass(frozen=True)
class Recipe:
    """How one family turns captions and image sizes into UNet inputs."""

    penultimate: bool  # hidden states of the layer before the last (no final norm) vs last + norm
    pooled: bool  # the last encoder's pooled projection goes to the UNet as `text_embeds`
    size_ids: bool  # six size/crop numbers per image go to the UNet as `time_ids`
    # SD 3.x's joint context: CLIP states padded to T5's width, T5's tokens after them, every
    # CLIP encoder's pooled output concatenated, given as `pooled_projections`
    joint: bool = False


RECIPES = {
    "sd1": Recipe(penultimate=False, pooled=False, size_ids=False),
    "sd2": Recipe(penultimate=False, pooled=False, size_ids=False),
    "sdxl": Recipe(penultimate=True, pooled=True, size_ids=True),
    "sd3": Recipe(penultimate=True, pooled=True, size_ids=False, joint=True),
}
# T5 tokens of SD 3.x's context while training (--t5-max-length): 77, the length SD 3 was trained
# with (the paper's T5 context, kohya's and the diffusers example's default); the pipeline samples
# with 256, whose extra tokens are mostly padding and cost attention on every step.
T5_MAX_LENGTH = 77


@dataclass
class Text:
    """Encoded captions: hidden states (B, 77, D) and, for SDXL, pooled embeddings (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device) -> Text:
        pooled = None if self.pooled is None else self.pooled.to(device, non_blocking=True)
        return Text(self.hidden.to(device, non_blocking=True), pooled)

    def expand(self, count: int) -> Text:
        """One caption's embedding repeated `count` times along the batch."""
        pooled = None if self.pooled is None else self.pooled.expand(count, -1)
        return Text(self.hidden.expand(count, -1, -1), pooled)

    @staticmethod
    def stack(parts: list[Text]) -> Text:
        """One batch from per-caption embeddings (each without a batch dimension)."""
        pooled = None if parts[0].pooled is None else torch.stack([p.pooled for p in parts])
        return Text(torch.stack([p.hidden for p in parts]), pooled)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 77) token ids, padded and truncated to the tokenizer's length, as SD trains;
    multi-vector new words spelled out as the pipeline spells them (`expand_prompt`)."""
    return tokenizer(
        [expand_prompt(tokenizer, caption) for caption in captions],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def tokenizer_of(component: str) -> str:
    """The pipeline attribute of an encoder's tokenizer: text_encoder_2 -> tokenizer_2."""
    return component.replace("text_encoder", "tokenizer")


class Conditioning:
    """A family's text encoders and recipe: captions -> `Text`, (`Text`, sizes) -> UNet kwargs.

    `encoders` maps each pipeline text-encoder attribute ("text_encoder", "text_encoder_2") to
    the module to run (accelerate's prepared one while it trains); `tokenizers` likewise.
    """

    def __init__(
        self,
        recipe: Recipe,
        encoders: dict,
        tokenizers: dict,
        *,
        t5: str | None = None,
        t5_max_length: int = T5_MAX_LENGTH,
        joint_width: int | None = None,
    ):
        self.recipe, self.encoders, self.tokenizers = recipe, encoders, tokenizers
        # SD 3.x: T5's pipeline attribute (None: no T5), its token count, the context width
        self.t5, self.t5_max_length, self.joint_width = t5, t5_max_length, joint_width

    @classmethod
    def of(
        cls, pipe, encoders: dict | None = None, t5_max_length: int = T5_MAX_LENGTH
    ) -> Conditioning:
        """The conditioning of `pipe`'s family; `encoders` replaces some of its text encoders.
        Encoders the pipeline was loaded without (SD 3.x's T5 with --no-t5) are left out."""
        family = family_of_pipeline(pipe)
        names = [
            te.component
            for te in family.text_encoders
            if getattr(pipe, te.component, None) is not None
        ]
        modules = {name: getattr(pipe, name) for name in names} | (encoders or {})
        tokenizers = {name: getattr(pipe, tokenizer_of(name)) for name in names}
        t5 = next((te.component for te in family.text_encoders if te.layout == "t5"), None)
        width = getattr(pipe, family.denoiser).config.get("joint_attention_dim")
        return cls(
            RECIPES[family.name],
            modules,
            tokenizers,
            t5=t5 if t5 in modules else None,
            t5_max_length=t5_max_length,
            joint_width=width,
        )

    @property
    def tokenizer(self):
        """The first encoder's tokenizer (caption-length warnings)."""
        return next(iter(self.tokenizers.values()))

    def encode(self, captions: list[str], device: torch.device) -> Text:
        """Run every text encoder on the captions."""
        if self.recipe.joint:
            return self.encode_joint(captions, device)
        hidden, pooled = [], None
        for name, encoder in self.encoders.items():
            ids = tokenize(self.tokenizers[name], captions).to(device)
            if self.recipe.penultimate:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P)
            else:
                hidden.append(encoder(ids)[0])
        return Text(torch.cat(hidden, dim=-1), pooled if self.recipe.pooled else None)

    def encode_joint(self, captions: list[str], device: torch.device) -> Text:
        """SD 3.x: (B, 77 + L, W) context and (B, P) pooled text, as the pipeline encodes them."""
        clip, pooled = [], []
        for name, encoder in self.encoders.items():
            if name == self.t5:
                continue
            out = encoder(
                tokenize(self.tokenizers[name], captions).to(device), output_hidden_states=True
            )
            clip.append(out.hidden_states[-2])  # penultimate: (B, 77, D_i)
            pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds (B, P_i)
        states = torch.cat(clip, dim=-1)  # (B, 77, ΣD)
        states = F.pad(states, (0, self.joint_width - states.shape[-1]))  # (B, 77, W)
        if self.t5 is None:  # the pipeline without text_encoder_3: zeros in T5's place
            t5 = states.new_zeros(len(captions), self.t5_max_length, self.joint_width)
        else:
            ids = self.tokenizers[self.t5](
                captions,
                padding="max_length",
                max_length=self.t5_max_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            t5 = self.encoders[self.t5](ids.to(device))[0].to(states.dtype)  # (B, L, W)
        return Text(torch.cat([states, t5], dim=-2), torch.cat(pooled, dim=-1))

    def unet_kwargs(
        self,
        text: Text,
        dtype: torch.dtype,
        *,
        sizes: torch.Tensor | None = None,
        crops: torch.Tensor | None = None,
        target: tuple[int, int] | None = None,
    ) -> dict:
        """Keyword arguments of the UNet's forward besides the noisy latents and timesteps.

        sizes: (B, 2) original (height, width); crops: (B, 2) (top, left); target: (height,
        width) of the batch's bucket, all in pixels; only families with size ids use them.
        """
        kwargs = {"encoder_hidden_states": text.hidden.to(dtype)}
        if self.recipe.joint:  # SD 3.x's transformer takes the pooled text as it is
            return kwargs | {"pooled_projections": text.pooled.to(dtype)}
        added = {}
        if self.recipe.pooled:
            added["text_embeds"] = text.pooled.to(dtype)
        if self.recipe.size_ids:
            added["time_ids"] = time_ids(sizes, crops, target, text.hidden.device)
        if added:
            kwargs["added_cond_kwargs"] = added
        return kwargs


def time_ids(
    sizes: torch.Tensor, crops: torch.Tensor, target: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(B, 6) fp32 SDXL size ids: original (h, w), crop (top, left), target (h, w).

    Kept in fp32: the UNet embeds them with sinusoids computed in fp32, and bf16 would round
    sides above 256 that are not multiples of a power of two (3000 -> 3008).
    """
    count = sizes.shape[0]
    goal = torch.tensor(target, dtype=torch.float32).expand(count, 2)
    return torch.cat([sizes.float(), crops.float(), goal], dim=1).to(device)
