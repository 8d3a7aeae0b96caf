"""Request and response bodies with AUTOMATIC1111's field names (its modules/api/models.py).

Fields A1111 has and this server does not use (`eta`, `s_churn`, `hr_upscaler`, ...) are
ignored, as A1111 ignores unknown fields; fields that would change the result in a way
not supported here (`enable_hr`, `restore_faces`, `tiling`, `styles`, `mask`, ...) are
refused with a message rather than silently dropped. Numbers are bounded so that one
request cannot ask for hours of work or more memory than a model could use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 20_000
MAX_BATCH_SIZE = 8
MAX_N_ITER = 16
MAX_STEPS = 150  # A1111's UI maximum
MAX_SIDE = 4096
MAX_CFG = 30.0  # A1111's UI maximum
MAX_SEED = 2**32 - 1

_UNSUPPORTED = {
    "enable_hr": "hires fix (enable_hr) is not supported yet",
    "restore_faces": "restore_faces is not supported",
    "tiling": "tiling is not supported",
    "styles": "styles are not supported; put their text in the prompt",
    "subseed_strength": "variation seeds (subseed_strength > 0) are not supported",
    "script_name": "scripts (script_name) are not supported",
    "mask": "inpainting (mask) is not supported yet",
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
    denoising_strength: float | None = Field(None, ge=0, le=1, description="hires fix only")


class Img2ImgRequest(_Request):
    init_images: list[str] = Field(..., min_length=1, max_length=MAX_BATCH_SIZE)
    denoising_strength: float = Field(0.75, ge=0, le=1)
    resize_mode: int = Field(
        0, ge=0, le=1, description="0: just resize, 1: crop and resize (others unsupported)"
    )
    mask: str | None = None
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
