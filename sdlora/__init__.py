"""sdlora: train Stable Diffusion LoRA adapters (optionally nonlinear), blend them, export."""

__version__ = "0.1.0"
