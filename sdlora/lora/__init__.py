"""The LoRA layer and everything that mixes adapters on a live model.

`layer` is the wrapped module (`y = W0·x + s·B·σ(A·x)`) and the one source of ΔW;
`activations` the σ choices; `inject` puts layers into a UNet or text encoder by module path;
`adapter` holds one adapter's weights; `fusion` writes ΔW into base weights exactly;
`blend` (the `Mixer`) mixes several adapters with per-adapter and per-block strengths
(`blocks`); `unfused` runs nonlinear adapters beside the base instead; `embeddings` carries the
new words of pivotal tuning; `prompt_tags` reads `<lora:name:strength>` tags in prompts.
"""
