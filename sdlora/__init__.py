"""sdlora: train Stable Diffusion LoRA adapters (optionally nonlinear), blend them, export.

The library is grouped by concept:

- `sdlora.lora`: the LoRA layer, injection, exact fusion and the `Mixer` that blends adapters;
- `sdlora.io`: adapter files and checkpoints (reading every common layout, writing safely);
- `sdlora.bases`: base models, the model-family table, generation;
- `sdlora.tools`: inspect, merge, extract, distill, export;
- `sdlora.cli`: the `sdlora` command (argparse stops there); `sdlora.train` is the trainer and
  `sdlora.ui` the web UI.

The names most programs need are importable from here (`from sdlora import Mixer, load_base`);
they load on first use, so `import sdlora` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "SdloraError": "sdlora.errors",
    "load_base": "sdlora.bases.base",
    "GenerateSettings": "sdlora.bases.generate",
    "generate": "sdlora.bases.generate",
    "save_png": "sdlora.bases.generate",
    "Mixer": "sdlora.lora.blend",
    "LoRALayer": "sdlora.lora.layer",
    "Adapter": "sdlora.lora.adapter",
    "load_adapter": "sdlora.io.formats",
    "read_adapter": "sdlora.io.formats",
    "inspect_file": "sdlora.tools.inspect",
    "merge_adapters": "sdlora.tools.merge",
    "merge_exact": "sdlora.tools.merge",
    "extract_adapter": "sdlora.tools.extract",
    "export_single_file": "sdlora.tools.export",
    "export_diffusers": "sdlora.tools.export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
