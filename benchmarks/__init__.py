"""Benchmarks of sdlora on Stable-Diffusion-1.5-shaped models (`python benchmarks/run.py`)."""
