"""Request and response bodies with AUTOMATIC1111's field names (its modules/api/models.py).

Fields A1111 has and this server does not use (`eta`, `s_churn`, ...) are ignored, as
A1111 ignores unknown fields; fields that would change the result in a way not supported
here (`restore_faces`, `tiling`, `styles`, a hires fix's own prompt, ...) are
refused with a message rather than silently dropped. Numbers are bounded so that one
request cannot ask for hours of work or more memory than a model could use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..inpainting import MAX_PADDING
from ..settings import MAX_HIRES_SCALE, HiresFix

MAX_PROMPT_CHARS = 20_000
MAX_BATCH_SIZE = 8
MAX_N_ITER = 16
MAX_STEPS = 150  # A1111's UI maximum
MAX_SIDE = 4096
MAX_CFG = 30.0  # A1111's UI maximum
MAX_SEED = 2**32 - 1

_UNSUPPORTED = {
    "restore_faces": "restore_faces is not supported",
    "tiling": "tiling is not supported",
    "styles": "styles are not supported; put their text in the prompt",
    "subseed_strength": "variation seeds (subseed_strength > 0) are not supported",
    "script_name": "scripts (script_name) are not supported",
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] = Field(default_factory=list, max_length=100)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    subseed_strength: float = Field(0.0, ge=0, le=1)
    sampler_name: str | None = Field(None, max_length=100, description="default: the model's")
    sampler_index: str | None = Field(None, max_length=100, description="older name of it")
    scheduler: str | None = Field(None, max_length=100)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    n_iter: int = Field(1, ge=1, le=MAX_N_ITER)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="default: the model's")
    cfg_scale: float | None = Field(None, ge=0, le=MAX_CFG, description="default: the model's")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="default: the model's")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="default: the model's")
    restore_faces: bool | None = False
    tiling: bool | None = False
    script_name: str | None = Field(None, max_length=100)
    send_images: bool = True
    save_images: bool = False
    override_settings: dict[str, Any] = Field(
        default_factory=dict,
        max_length=200,
        description="A1111 options for this request (see server/options.py for the keys "
        "that take effect)",
    )
    override_settings_restore_afterwards: bool = True

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, message in _UNSUPPORTED.items():
            if getattr(self, name, False):
                raise ValueError(message)
        return self

    def sampler(self) -> str | None:
        return self.sampler_name or self.sampler_index


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    # A1111's defaults (StableDiffusionProcessingTxt2Img).
    denoising_strength: float = Field(0.75, ge=0, le=1, description="hires fix only")
    hr_scale: float = Field(2.0, ge=1, le=MAX_HIRES_SCALE)
    hr_upscaler: str | None = Field(None, max_length=100, description="default: Latent")
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS, description="0: steps")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE, description="0: from hr_scale")
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE, description="0: from hr_scale")
    hr_checkpoint_name: str | None = Field(None, max_length=1000)
    hr_sampler_name: str | None = Field(None, max_length=100)
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    firstphase_width: int = 0
    firstphase_height: int = 0

    @model_validator(mode="after")
    def _refuse_unsupported_hires(self):
        if not self.enable_hr:
            return self
        different = {
            "hr_checkpoint_name": "another model for the hires pass",
            "hr_sampler_name": "another sampler for the hires pass",
            "hr_prompt": "another prompt for the hires pass",
            "hr_negative_prompt": "another negative prompt for the hires pass",
        }
        same_as = {
            "hr_sampler_name": self.sampler(),
            "hr_prompt": self.prompt,
            "hr_negative_prompt": self.negative_prompt,
        }
        for name, what in different.items():
            value = getattr(self, name)
            if value and value != same_as.get(name):
                raise ValueError(f"{what} ({name}) is not supported")
        if self.firstphase_width or self.firstphase_height:
            raise ValueError(
                "firstphase_width/height (the old hires fix) are not supported: give width, "
                "height and hr_scale or hr_resize_x/hr_resize_y"
            )
        return self

    def hires(self) -> HiresFix | None:
        """The hires fix asked for (upscaler not yet checked), or None."""
        if not self.enable_hr:
            return None
        resize = (self.hr_resize_x, self.hr_resize_y)
        return HiresFix(
            scale=self.hr_scale,
            steps=self.hr_second_pass_steps,
            strength=self.denoising_strength,
            upscaler=self.hr_upscaler or "Latent",  # A1111's latent_upscale_default_mode
            resize=None if resize == (0, 0) else resize,
        )


class Img2ImgRequest(_Request):
    init_images: list[str] = Field(..., min_length=1, max_length=MAX_BATCH_SIZE)
    denoising_strength: float = Field(0.75, ge=0, le=1)
    resize_mode: int = Field(
        0, ge=0, le=1, description="0: just resize, 1: crop and resize (others unsupported)"
    )
    mask: str | None = Field(None, description="inpainting: white repaints, black keeps")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(
        0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing"
    )
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    # A1111's API defaults: "Only masked" with no padding (its UI: "Whole picture", 32).
    inpaint_full_res: bool = Field(
        True, description="'Only masked': inpaint a crop around the mask at width x height"
    )
    inpaint_full_res_padding: int = Field(0, ge=0, le=MAX_PADDING, description="pixels")
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queued: int = Field(0, description="jobs waiting behind the running one (ours, not A1111's)")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]
