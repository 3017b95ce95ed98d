"""Base models: built in (`toy`, `tiny`, `tiny-v2`, `tiny-xl`, `tiny-sd3`), a local diffusers
folder, a single-file SD checkpoint, or a Hugging Face Hub id.

Each family runs in its diffusers pipeline class (`Family.pipeline`: StableDiffusionPipeline for
SD 1.x/2.x, StableDiffusionXLPipeline for SDXL, StableDiffusion3Pipeline for SD 3.x); a folder or
Hub model says which in its model_index.json, a single file in its keys (`sdlora.io.single_file`).

SD 3.x runs with or without its third text encoder, T5-XXL (`t5=False`, `--no-t5`): the pipeline
then gives zeros in place of T5's tokens, as diffusers and ComfyUI do, and 9.5 GB (bf16) of
weights are never read.

A Hub id is anything shaped `owner/name` that is not an existing local path; it goes through
diffusers' own `from_pretrained`, which downloads into the Hugging Face cache when online and,
with HF_HUB_OFFLINE=1, reads that cache only. Nothing else here downloads.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from sdlora.bases.families import SD3, SDXL, family_of_pipeline
from sdlora.bases.pipelines import load_options, pipeline_class
from sdlora.bases.recommend import ATTRIBUTE, recommend_builtin
from sdlora.errors import SdloraError
from sdlora.io.files import PICKLE_SUFFIXES, load_failure, special_file

BUILTIN = ("toy", "tiny", "tiny-v2", "tiny-xl", "tiny-sd3")
# the random-weight bases and their families
TINY_FAMILIES = {"tiny": "sd1", "tiny-v2": "sd2", "tiny-xl": "sdxl", "tiny-sd3": "sd3"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the Hub spells them
TOY_FOLDER = Path(__file__).parents[1] / "assets" / "toy"  # pretrained by pretrain/toy_base.py
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _class_of_index(index: dict, where: str) -> type[DiffusionPipeline]:
    """The pipeline class to load a model_index.json with: SD 3.x when it has an SD3 transformer
    (or a third text encoder), SDXL when it has two text encoders."""
    transformer = index.get("transformer")
    sd3 = isinstance(transformer, list) and transformer[-1] == "SD3Transformer2DModel"
    if sd3 or "text_encoder_3" in index:
        return pipeline_class(SD3)
    if "text_encoder_2" in index and "text_encoder" in index:
        return pipeline_class(SDXL)
    if "text_encoder_2" in index:
        raise SdloraError(
            f"{where}: a model with only a second text encoder (an SDXL refiner?) is not a base "
            "sdlora can use; give an SD 1.x, SD 2.x, SDXL or SD 3.x base"
        )
    return StableDiffusionPipeline


def _quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.eval().requires_grad_(False)
    return pipe


def _load_toy() -> StableDiffusionPipeline:
    """The built-in `toy` base from its packaged fp16 folder, built from configs, upcast to fp32."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = TOY_FOLDER
    if not (folder / "model_index.json").exists():
        raise SdloraError(f"base 'toy': its weights are missing from {folder}; reinstall sdlora")

    def weights(model: torch.nn.Module, file: Path) -> torch.nn.Module:
        model.load_state_dict(load_file(file))  # copies fp16 into the fp32 parameters
        return model.eval()

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_config = CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")
    text_encoder = CLIPTextModel(text_config)
    weights(unet, folder / "unet" / "diffusion_pytorch_model.safetensors")
    weights(vae, folder / "vae" / "diffusion_pytorch_model.safetensors")
    weights(text_encoder, folder / "text_encoder" / "model.safetensors")
    tokenizer = CLIPTokenizer(
        str(folder / "tokenizer" / "vocab.json"),
        str(folder / "tokenizer" / "merges.txt"),
        model_max_length=77,
    )
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _why(folder: Path, err: BaseException) -> str:
    """Why a model folder did not load, in one line; a refused pickle is named by its file."""
    chain = [err]  # diffusers retells a refused pickle as an OSError: look behind it
    while (cause := chain[-1].__cause__ or chain[-1].__context__) and cause not in chain:
        chain.append(cause)
    err = next((e for e in chain if isinstance(e, pickle.UnpicklingError)), err)
    reason = load_failure(err)
    if isinstance(err, pickle.UnpicklingError):
        pickles = sorted(
            p for p in folder.glob("*/*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file()
        )
        if pickles:
            names = ", ".join(str(p.relative_to(folder)) for p in pickles)
            return f"{names}: {reason}"
    return reason


def is_hub_id(spec: str) -> bool:
    """True for `owner/name` specs that are not a local path (those are read from the Hub)."""
    return bool(HUB_ID.fullmatch(spec)) and not Path(spec).exists() and ".." not in spec


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str | None:
    """The Hugging Face cache folder the environment names now (None: the library default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def without_t5(cls: type[DiffusionPipeline], t5: bool) -> dict:
    """from_pretrained keywords that leave T5 out (`t5=False`) of a pipeline class taking it."""
    expected, _ = cls._get_signature_keys(cls)
    if t5 or "text_encoder_3" not in expected:
        return {}
    return {"text_encoder_3": None, "tokenizer_3": None}


def _load_hub(repo_id: str, t5: bool = True) -> DiffusionPipeline:
    """A Hub model through diffusers: from the cache when offline, downloading otherwise."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = _hub_offline()
    try:
        from huggingface_hub import hf_hub_download

        index_file = hf_hub_download(
            repo_id, "model_index.json", cache_dir=_hub_cache(), local_files_only=offline
        )
        index = json.loads(Path(index_file).read_text(encoding="utf-8"))
        cls = _class_of_index(index, f"base {repo_id!r}")
        return cls.from_pretrained(
            repo_id,
            cache_dir=_hub_cache(),
            local_files_only=offline,
            **load_options(cls),
            **without_t5(cls, t5),
        )
    except (GatedRepoError, RepositoryNotFoundError):
        raise SdloraError(
            f"base {repo_id!r}: no such model on the Hugging Face Hub, or it needs a login "
            "(`huggingface-cli login`)"
        ) from None
    except (
        LocalEntryNotFoundError,
        OSError,
        ValueError,
        KeyError,
        EOFError,
        pickle.UnpicklingError,
    ) as err:
        if offline and not _in_cache(repo_id):
            raise SdloraError(
                f"base {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1; run "
                f"once online or `huggingface-cli download {repo_id}`"
            ) from None
        raise SdloraError(
            f"base {repo_id!r}: cannot load this Hub model ({load_failure(err)})"
        ) from None


# what a single file needs from a Hub model: its configs, tokenizer and scheduler, not weights
CONFIG_FILES = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"]


def _hub_config_folder(repo_id: str) -> Path:
    """The cached snapshot of a Hub model's configs (fetched first when online)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _hub_offline()
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=CONFIG_FILES,
                cache_dir=_hub_cache(),
                local_files_only=offline,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        if offline and not _in_cache(repo_id):
            raise SdloraError(
                f"--config {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1; "
                f"run once online or `huggingface-cli download {repo_id}`"
            ) from None
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SdloraError(f"--config {repo_id!r}: cannot fetch its configs ({first})") from None


def _in_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    folder = Path(_hub_cache() or constants.HF_HUB_CACHE)
    return (folder / ("models--" + repo_id.replace("/", "--")) / "snapshots").is_dir()


def _one_dtype(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Every model of `pipe` in the UNet's dtype. diffusers loads a folder's UNet and VAE in
    float32 whatever they were saved in, while transformers keeps a text encoder's saved dtype,
    so an fp16 export would load with fp16 prompt embeddings beside a float32 UNet."""
    denoiser = getattr(pipe, "unet", None)
    dtype = (denoiser if denoiser is not None else pipe.transformer).dtype
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module) and model.dtype != dtype:
            model.to(dtype=dtype)
    return pipe


def load_base(
    spec: str = "tiny",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
    t5: bool = True,
) -> DiffusionPipeline:
    """Load a base model: "toy", "tiny", "tiny-v2", "tiny-xl", "tiny-sd3", a diffusers model
    folder, a single .safetensors/.ckpt file, or a Hub id such as
    "stabilityai/stable-diffusion-3.5-medium"; a StableDiffusionPipeline, or the
    StableDiffusionXLPipeline / StableDiffusion3Pipeline of SDXL / SD 3.x.

    `t5=False` loads an SD 3.x base without its T5 text encoder (`text_encoder_3=None`); any
    other family refuses it.

    `config` is a diffusers model folder (or Hub id) whose configs, tokenizer and scheduler
    describe a single file; its scheduler config gives the prediction type (`sdlora.bases.families`).
    A built-in base carries its recommended generation settings (see `sdlora.bases.recommend`).
    """
    if not str(spec).strip():
        raise SdloraError(
            f"is empty; give one of {', '.join(BUILTIN)}, a diffusers model folder, a single "
            ".safetensors checkpoint, or a Hub id (owner/name)",
            setting="base",
        )
    if spec == "toy":
        pipe = _load_toy()
    elif spec in TINY_FAMILIES:
        from sdlora.bases.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(family=TINY_FAMILIES[spec])
        if not t5 and spec == SD3.builtin:
            pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    elif is_hub_id(spec):
        pipe = _load_hub(spec, t5)
    else:
        path = Path(spec)
        special = special_file(path)
        if special:
            raise SdloraError(f"base {spec!r} is {special}; give a model folder or file")
        if not path.exists():
            raise SdloraError(
                f"base {spec!r}: no such file or folder; use one of {', '.join(BUILTIN)}, "
                "a diffusers model folder, a single .safetensors checkpoint, or a Hub id "
                "(owner/name)"
            )
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise SdloraError(f"{path}: not a diffusers model folder (no model_index.json)")
            try:
                index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
                cls = _class_of_index(index, str(path))
                pipe = cls.from_pretrained(
                    path, local_files_only=True, **load_options(cls), **without_t5(cls, t5)
                )
            except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
                raise SdloraError(
                    f"{path}: cannot load this model folder ({_why(path, err)})"
                ) from None
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            from sdlora.io.single_file import load_single_file

            if config is not None and is_hub_id(str(config)):
                config = _hub_config_folder(str(config))
            pipe = load_single_file(path, config=config)
        else:
            raise SdloraError(
                f"{path}: unknown base file type; give a .safetensors checkpoint or a model folder"
            )
    if not t5:
        check_t5_optional(pipe)
    pipe = _one_dtype(_quiet(pipe))
    if spec in BUILTIN:
        setattr(pipe, ATTRIBUTE, recommend_builtin(spec, pipe))
    if dtype is not None or device is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def check_t5_optional(pipe: DiffusionPipeline) -> None:
    """Refuse `t5=False` (--no-t5) on a base without a T5 encoder to leave out."""
    family = family_of_pipeline(pipe)
    if not any(enc.layout == "t5" for enc in family.text_encoders):
        raise SdloraError(
            f"leaves out an SD 3.x base's T5 text encoder; this {family.label} base has none",
            setting="no_t5",
        )
    if getattr(pipe, "text_encoder_3", None) is not None:  # a single file: not left out there
        pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
