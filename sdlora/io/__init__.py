"""Adapter files and checkpoints on disk.

Reading any LoRA a user brings (`formats`: our layout, kohya/A1111/ComfyUI, diffusers, PEFT;
`lora_spec`: the `path:strength` specs), writing files safely (`writing`: temp file then rename;
`files`: checks on the paths a command is given), the original (LDM) single-file checkpoint
layout and its key names (`single_file`, `ldm_names`), and conversion between key layouts
(`convert`).
"""
