"""Named API endpoints for `gradio_client`: the same handlers as the buttons, without page state.

from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
images = client.predict("a red circle", {"style": 0.8, "detail": 0.35}, api_name="/generate")
path = client.predict({"style": 0.8}, "single-file", api_name="/export")
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

import gradio as gr

from sdlora.bases.generate import SETTINGS, GenerateSettings
from sdlora.ui import exporting as ex
from sdlora.ui import handlers as h
from sdlora.ui.paths import relative


def _generate_signature() -> inspect.Signature:
    """`/generate`'s parameters: the prompt, the adapters {name: strength}, then every other
    generation setting of the library's list (`SETTINGS`) with its default, then the base."""
    types = typing.get_type_hints(GenerateSettings)
    fields = GenerateSettings.__dataclass_fields__

    def parameter(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
        return inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
        )

    first, *rest = SETTINGS
    return inspect.Signature(
        [
            parameter(first, types[first]),
            parameter("adapters", dict[str, float] | None, None),
            *[parameter(name, types[name], fields[name].default) for name in rest],
            parameter("base", str, ""),
        ]
    )


GENERATE = _generate_signature()
GENERATE_DOC = (
    "Draw images with adapters {name: strength} from the adapters folder; returns PNGs that carry "
    "prompt, seed, adapters and strengths in their metadata. Steps and guidance default to the "
    "base's recommended values (toy: 20 and 2; SD: 25 and 7.5); width and height to its native "
    "size. Settings: " + "; ".join(f"{s.name}: {s.help}" for s in SETTINGS.values())
)


def add_api(ctx: h.Context, guard: Callable[[Callable], Callable], gpu: str) -> None:
    """Register `/generate`, `/export`, `/inspect` and `/upload_adapter` on the Blocks being
    built. Unlike the page's buttons, these raise errors, so `gradio_client` receives them."""

    def generate(*args, **kwargs) -> list[gr.FileData]:
        form = GENERATE.bind(*args, **kwargs)
        form.apply_defaults()
        values = dict(form.arguments)
        adapters, base = values.pop("adapters"), values.pop("base")
        files = h.run_generate(ctx, base, adapters, h.make_settings(**values))
        return [gr.FileData(path=str(f), orig_name=f.name) for f in files]

    generate.__signature__ = GENERATE.replace(return_annotation=list[gr.FileData])
    generate.__annotations__ = {p.name: p.annotation for p in GENERATE.parameters.values()}
    generate.__annotations__["return"] = list[gr.FileData]
    generate.__doc__ = GENERATE_DOC

    def export(
        adapters: dict[str, float] | None = None,
        format: str = "diffusers",
        dtype: str = "fp16",
        name: str = "",
        overwrite: bool = False,
        base: str = "",
    ) -> str:
        """Write base + adapters {name: strength} into exports/ of the outputs folder as a
        diffusers folder, a single-file checkpoint or one merged LoRA (format "diffusers",
        "single-file" or "lora"); returns the written path relative to the outputs folder."""
        out = ex.run_export(ctx, base, adapters, format, dtype, name, overwrite)
        return relative(ctx.outputs, out)

    def inspect(adapter: str, base: str = "") -> str:
        """What `sdlora inspect` tells about an adapter of the adapters folder."""
        return h.inspect_adapter(ctx, adapter, base)

    def upload_adapter(upload: str) -> str:
        """Copy an uploaded .safetensors adapter into the adapters folder; returns its name."""
        return h.upload_adapter(ctx, upload)

    # a file input needs a component: hidden ones carry the upload and the name returned
    # no file_types: Gradio would refuse other files before the handler, which deletes them
    upload_in = gr.File(visible=False, type="filepath")
    name_out = gr.Textbox(visible=False)
    upload_in.upload(
        guard(upload_adapter),
        upload_in,
        name_out,
        api_name="upload_adapter",
        concurrency_limit=None,
    )
    gr.api(guard(generate), api_name="generate", concurrency_id=gpu)
    gr.api(guard(export), api_name="export", concurrency_id=gpu)
    gr.api(guard(inspect), api_name="inspect", concurrency_id=gpu)
