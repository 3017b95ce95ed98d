"""The mixer web UI: `build_app(...) -> gr.Blocks` with the tabs Mix, Compare, Export, Train, Inspect.

Layout and wiring only: each tab is its own module (`tab_mix` with `mix_history`,
`tab_compare`, `tab_export`, `tab_train`, `tab_inspect`) and what each button does lives in
`handlers`. Per-visitor state is in `gr.State` (their base and mix) and, across reloads, in
browser storage; training runs are the server's (`jobs`), in processes of their own. The models
are shared through one `Engine` and every job that touches them runs in the "gpu" concurrency
group, one at a time. User mistakes arrive as
`SdloraError`s and are shown in the status line beside the button pressed (`common.on`).

API endpoints for `gradio_client` (see README): `/generate`, `/export`, `/inspect`,
`/upload_adapter`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr

from sdlora.ui import cards, mix_history, tab_compare, tab_export, tab_inspect, tab_mix, tab_train
from sdlora.ui import handlers as h
from sdlora.ui import history as history_store
from sdlora.ui.api import add_api
from sdlora.ui.common import CSS, FREE, GPU, KEYS_JS, guard, on
from sdlora.ui.engine import Engine
from sdlora.ui.state import Session

CACHE_LIMITS = (600, h.CACHE_MAX_AGE)  # delete_cache: every 10 minutes, old uploads go


def build_app(
    base: str = "toy",
    adapters_dir: str | Path = "adapters",
    datasets_dir: str | Path = "samples",
    outputs_dir: str | Path = "outputs",
    device: str | None = None,
    max_upload_mb: int = 2048,
    more_adapters: list[str | Path] = (),
    runs_dir: str | Path | None = None,
) -> gr.Blocks:
    """The mixer UI over the given base and folders; nothing outside these folders is touched.
    Adapters are also listed (read only) from `more_adapters` and the run folders of `runs_dir`."""
    ctx = h.Context(
        base=base,
        adapters=Path(adapters_dir),
        datasets=Path(datasets_dir),
        outputs=Path(outputs_dir),
        engine=Engine(device),
        max_upload_bytes=max_upload_mb * 2**20,
        more_adapters=list(more_adapters),
        runs=runs_dir,
    )
    # Gradio keeps uploads in the UI's own cache folder, emptied now and aged out while serving;
    # it reads the variable as each component and the server are made, so before any of them.
    os.environ["GRADIO_TEMP_DIR"] = str(h.clean_cache(ctx))
    # Results are served straight from the outputs folder (no copies into Gradio's cache).
    gr.set_static_paths([ctx.outputs])

    with gr.Blocks(title="sdlora mixer", analytics_enabled=False, delete_cache=CACHE_LIMITS) as app:
        session = gr.State(Session(base=base))
        stored = gr.BrowserState(
            {}, storage_key=mix_history.STORAGE_KEY, secret=mix_history.storage_secret(ctx)
        )
        listed = " ".join(f"`{p}/`" for p, _, _ in h.adapter_folders(ctx))
        gr.Markdown(
            f"**sdlora mixer** · adapters `{ctx.adapters.name}/` {listed} · datasets "
            f"`{ctx.datasets.name}/` · outputs `{ctx.outputs.name}/`",
            elem_id="header",
        )
        with gr.Tabs():
            with gr.Tab("Mix", id="mix"):
                panel = []
                mix = tab_mix.layout(ctx, base, lambda: panel.append(mix_history.layout(ctx)))
                history = panel[0]
            with gr.Tab("Compare", id="compare"):
                compare = tab_compare.layout()
            with gr.Tab("Export", id="export") as export_tab:
                export = tab_export.layout()
            with gr.Tab("Train", id="train"):
                train = tab_train.layout(ctx, base)
            with gr.Tab("Inspect", id="inspect"):
                inspect = tab_inspect.layout(ctx)

        choices = [compare.x_dd, compare.y_dd]
        persist, restore_page = mix_history.wire(ctx, mix, history, session, stored, choices)
        tab_mix.wire(ctx, mix, session, choices, inspect.adapter_dd, history.gallery, persist)
        tab_compare.wire(ctx, compare, session, mix)
        tab_export.wire(ctx, export, session, mix, export_tab)
        tab_train.wire(ctx, train, app, mix.base_dd, [mix.adapter_dd, inspect.adapter_dd])
        tab_inspect.wire(ctx, inspect, mix.base_dd)

        def lists() -> tuple:
            names = h.list_adapters(ctx)
            return (
                gr.Dropdown(choices=names, info=h.adapters_hint(ctx, names)),
                gr.Dropdown(choices=names),
                gr.Dropdown(choices=h.base_choices(ctx)),
                gr.Dropdown(choices=history_store.list_mixes(ctx.outputs)),
            )

        def on_load() -> tuple:
            """Lists as the folders are now: files added since the app started show up on load."""
            return (*lists(), gr.Dropdown(choices=h.list_datasets(ctx)))

        list_outputs = [mix.adapter_dd, inspect.adapter_dd, mix.base_dd, history.saved_dd]
        app.load(on_load, None, [*list_outputs, train.dataset_dd], **FREE).then(
            restore_page,
            [session, stored],
            [
                session,
                mix.base_dd,
                mix.extended,
                *mix.rows,
                *choices,
                *mix.settings,
                history.gallery,
            ],
            **FREE,
        ).then(
            lambda session, base: cards.cards_html(ctx, base, session.names()),
            [session, mix.base_dd],
            mix.cards,
            **FREE,
        )
        on(
            mix.refresh_btn.click,
            lambda session, base, search: (
                *lists(),
                cards.cards_html(ctx, base, session.names(), search),
                "Lists refreshed from the folders.",
            ),
            [session, mix.base_dd, mix.card_search],
            [*list_outputs, mix.cards],
            mix.add_status,
            **FREE,
        )
        add_api(ctx, guard, GPU)

    app.queue(default_concurrency_limit=1)
    return app


def keep_temporary_files_in(folder: Path) -> None:
    """Send this process's temporary files (and its children's: training runs) into `folder`,
    so the UI writes nothing outside its folders. torch's compile cache stays where it was: it
    outlives the app, and emptying it would make every training run compile again."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_upload_mb: int = 2048,
    block: bool = True,
) -> None:
    """Serve the app: local only unless `host` says otherwise, a share link only if asked."""
    os.environ["GRADIO_TEMP_DIR"] = app.GRADIO_CACHE  # this app's cache, if others were built since
    app.launch(
        css=CSS + cards.CSS,
        js=KEYS_JS,
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{max_upload_mb}mb",
        show_error=True,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
