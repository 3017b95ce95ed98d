"""Named API endpoints for `gradio_client`: the same handlers as the buttons, without page state.

from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
images = client.predict("a red circle", {"style": 0.8, "detail": 0.35}, api_name="/generate")
path = client.predict({"style": 0.8}, "single-file", api_name="/export")
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from sdlora.ui import exporting as ex
from sdlora.ui import handlers as h
from sdlora.ui.paths import relative


def add_api(ctx: h.Context, guard: Callable[[Callable], Callable], gpu: str) -> None:
    """Register `/generate`, `/export`, `/inspect` and `/upload_adapter` on the Blocks being
    built. Unlike the page's buttons, these raise errors, so `gradio_client` receives them."""

    def generate(
        prompt: str,
        adapters: dict[str, float] | None = None,
        negative_prompt: str = "",
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        width: int = 0,
        height: int = 0,
        scheduler: str = "pndm",
        num_images: int = 1,
        base: str = "",
    ) -> list[gr.FileData]:
        """Draw images with adapters {name: strength} from the adapters folder; returns PNGs
        that carry prompt, seed, adapters and strengths in their metadata. Steps and guidance
        default to the base's recommended values (toy: 20 and 2; SD: 25 and 7.5)."""
        settings = h.make_settings(
            prompt, negative_prompt, steps, guidance, seed, width, height, scheduler, num_images
        )
        files = h.run_generate(ctx, base, adapters, settings)
        return [gr.FileData(path=str(f), orig_name=f.name) for f in files]

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
    upload_in = gr.File(visible=False, file_types=[".safetensors"], type="filepath")
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
