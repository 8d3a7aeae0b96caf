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

# odd_sizes.py: a non-square size whose latent sides (9 x 11) neither tiny UNet's total
# downsampling (2 for SD 1.x/2.x, 4 for SDXL) divides.
ODD_WIDTH, ODD_HEIGHT = 72, 88
ODD_PROMPT = "a lighthouse at dusk"
ODD_NEGATIVE_PROMPT = "blurry"
ODD_STEPS = 4
ODD_IMG2IMG_STRENGTH = 0.75
