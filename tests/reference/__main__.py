"""Regenerate every fixture from the reference implementation, in dependency
order (the tiny models first): python -m tests.reference"""

import importlib

SCRIPTS = [
    "tiny_models",
    "tiny_autoencoder",
    "tiled_vae",
    "tokenizer_ids",
    "schedulers",
    "checkpoint_files",
    "long_prompts",
    "sampler_pipelines",
    "odd_sizes",
    "single_file",
    "inpainting",
    "lora",
    "prompt_conventions",
    "hires_fix",
]

for name in SCRIPTS:
    print(f"== tests.reference.{name}")
    importlib.import_module(f"tests.reference.{name}").main()
