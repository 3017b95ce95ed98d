"""The mixer web UI: `build_app(...) -> gr.Blocks` with the tabs Mix, Compare, Export, Train, Inspect.

Layout and wiring only: each tab is its own module (`tab_mix`, `tab_compare`, `tab_export`,
`tab_train`, `tab_inspect`) and what each button does lives in `handlers`. Per-visitor state is
in `gr.State` (their base and mix); training runs are the server's (`jobs`), in processes of
their own. The models are shared through one `Engine` and every job that touches them runs in the
"gpu" concurrency group, one at a time.
User mistakes arrive as `SdloraError`s and are shown as messages, never as tracebacks.

API endpoints for `gradio_client` (see README): `/generate`, `/export`, `/inspect`,
`/upload_adapter`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from sdlora.ui import handlers as h
from sdlora.ui import tab_compare, tab_export, tab_inspect, tab_mix, tab_train
from sdlora.ui.api import add_api
from sdlora.ui.common import FREE, GPU, guard
from sdlora.ui.engine import Engine
from sdlora.ui.state import Session


def build_app(
    base: str = "toy",
    adapters_dir: str | Path = "adapters",
    datasets_dir: str | Path = "samples",
    outputs_dir: str | Path = "outputs",
    device: str | None = None,
    max_upload_mb: int = 2048,
) -> gr.Blocks:
    """The mixer UI over the given base and folders; nothing outside these folders is touched."""
    ctx = h.Context(
        base=base,
        adapters=Path(adapters_dir),
        datasets=Path(datasets_dir),
        outputs=Path(outputs_dir),
        engine=Engine(device),
        max_upload_bytes=max_upload_mb * 2**20,
    )
    # Results are served straight from the outputs folder (no copies into Gradio's cache).
    gr.set_static_paths([ctx.outputs])

    with gr.Blocks(title="sdlora mixer", analytics_enabled=False) as app:
        session = gr.State(Session(base=base))
        gr.Markdown(
            "## sdlora mixer\nBlend LoRA adapters with exact strengths, generate, compare, "
            "export, train. "
            f"Adapters: `{ctx.adapters}` · datasets: `{ctx.datasets}` · outputs: `{ctx.outputs}`"
        )
        with gr.Tabs():
            with gr.Tab("Mix", id="mix"):
                mix = tab_mix.layout(ctx, base)
            with gr.Tab("Compare", id="compare"):
                compare = tab_compare.layout()
            with gr.Tab("Export", id="export"):
                export = tab_export.layout()
            with gr.Tab("Train", id="train"):
                train = tab_train.layout(ctx, base)
            with gr.Tab("Inspect", id="inspect"):
                inspect = tab_inspect.layout(ctx)

        tab_mix.wire(ctx, mix, session, [compare.x_dd, compare.y_dd], inspect.adapter_dd)
        tab_compare.wire(ctx, compare, session, mix)
        tab_export.wire(ctx, export, session, mix)
        tab_train.wire(ctx, train, app, mix.base_dd, [mix.adapter_dd, inspect.adapter_dd])
        tab_inspect.wire(ctx, inspect, mix.base_dd)

        @guard
        def on_refresh() -> tuple:
            names = h.list_adapters(ctx)
            return (
                gr.Dropdown(choices=names),
                gr.Dropdown(choices=names),
                gr.Dropdown(choices=h.base_choices(ctx)),
            )

        def on_load() -> tuple:
            """Lists as the folders are now: files added since the app started show up on load."""
            return (*on_refresh(), gr.Dropdown(choices=h.list_datasets(ctx)))

        lists = [mix.adapter_dd, inspect.adapter_dd, mix.base_dd]
        app.load(on_load, None, [*lists, train.dataset_dd], **FREE)
        mix.refresh_btn.click(on_refresh, None, lists, **FREE)
        add_api(ctx, guard, GPU)

    app.queue(default_concurrency_limit=1)
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_upload_mb: int = 2048,
    block: bool = True,
) -> None:
    """Serve the app: local only unless `host` says otherwise, a share link only if asked."""
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{max_upload_mb}mb",
        show_error=True,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
