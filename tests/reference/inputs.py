"""Inputs shared by the reference scripts and the tests that replay them (no
PyTorch here: CI imports this module)."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODELS = FIXTURES / "models"
REFERENCE = FIXTURES / "reference"

IMAGE_SIZE = 64  # pixels; the tiny VAEs downsample by 8 like the real one

# tiny_models.py: batches of two prompts.
PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red sign saying MLX"]
NEGATIVE_PROMPTS = ["blurry, low quality", ""]

# long_prompts.py: a prompt that needs several 75-token chunks.
LONG_PROMPT = (
    "a highly detailed oil painting of an old lighthouse on a rocky coast at dusk, "
    "storm clouds gathering over a dark green sea, waves crashing against the rocks, "
    "a small fishing boat with a red sail returning to the harbour, seagulls circling "
    "above the mast, warm light in the keeper's window, wet stones reflecting the sky, "
    "in the style of the romantic landscape painters of the nineteenth century, "
    "dramatic lighting, rich textures, visible brush strokes, museum quality, framed"
)
LONG_NEGATIVE_PROMPT = "blurry, low quality"

# sampler_pipelines.py: one run per deterministic sampler.
DETERMINISTIC_SAMPLERS = ["euler", "heun", "ddim", "dpm++2m", "dpm++2m_karras"]
SAMPLER_PROMPT = "a watercolor of a fox in the snow"
SAMPLER_NEGATIVE_PROMPT = "photo"
SAMPLER_STEPS = 5
SAMPLER_IMG2IMG_STRENGTH = 0.6

# prompt_conventions.py: A1111's weighting, clip skip, textual inversion.
WEIGHTED_PROMPT = "a (red:1.5) fox in [the snow], ((sunset)) BREAK oil painting"
# What A1111's rules make of it (tests/test_prompts.py checks our parser gives exactly this):
# the reference encodes these fragments, so that it does not rely on our parser.
WEIGHTED_FRAGMENTS = [
    [("a ", 1.0), ("red", 1.5), (" fox in ", 1.0), ("the snow", 1 / 1.1), (", ", 1.0),
     ("sunset", 1.1 * 1.1)],
    [("oil painting", 1.0)],
]
WEIGHTED_NEGATIVE_PROMPT = "(blurry:1.3), low [quality]"
WEIGHTED_NEGATIVE_FRAGMENTS = [[("blurry", 1.3), (", low ", 1.0), ("quality", 1 / 1.1)]]
CONVENTION_STEPS = 3
CLIP_SKIP = 2  # A1111's numbering: diffusers' clip_skip=1
EMBEDDING_PROMPT = "a watercolor of foxstyle in the snow"
EMBEDDING_NEGATIVE_PROMPT = "blurry, snowy"
# Embedding files in tests/fixtures/embeddings/, by model, each used by its file's stem:
# A1111's .pt (two vectors) and .safetensors (three), SDXL's clip_l/clip_g (two each).
EMBEDDING_FILES = {
    "tiny-sd1": ["foxstyle.pt", "snowy.safetensors"],
    "tiny-sdxl": ["foxstyle.safetensors"],
}
# diffusers' format names its token inside the file.
DIFFUSERS_EMBEDDING = "learned_embeds.safetensors"
DIFFUSERS_EMBEDDING_TOKEN = "<paper-cut>"
DIFFUSERS_EMBEDDING_PROMPT = "a <paper-cut> fox"
