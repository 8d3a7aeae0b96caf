"""The FastAPI application: A1111's `/sdapi/v1/*` routes and the page at `/`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool

from ..images import (
    MAX_INPUT_PIXELS,
    GenerationParameters,
    load_image,
    read_parameters,
    rounded_size,
    validate_size,
)
from ..inpainting import (
    MaskedArea,
    blur_mask,
    crop_masked_area,
    fit_mask,
    load_mask,
    oriented_size,
)
from . import generation, names, options
from .catalog import Catalog
from .engine import Engine, preview_png
from .jobs import Cancelled, Job, QueueFull, Worker
from .models import (
    GenerationResponse,
    Img2ImgRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    ProgressState,
    Txt2ImgRequest,
)

log = logging.getLogger("stable_diffusion.server")

# Request bodies are refused beyond this (HTTP 413): two init images of the largest size.
MAX_BODY_BYTES = 64 * 2**20
# One decoded (base64) input image; its pixel count is capped by images.MAX_INPUT_PIXELS.
MAX_IMAGE_BYTES = 32 * 2**20
# How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
STATIC = Path(__file__).parent / "static"

T = TypeVar("T")


class ClientError(Exception):
    """A request the server refuses, with the message for the client."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerConfig:
    model: str
    models_dir: Path | None = None
    lora_dir: Path | None = None
    float16: bool | None = None
    quantize: bool = False
    bfloat16: bool = False
    max_queue: int = 8
    auth: dict[str, str] | None = None  # user -> password
    output_dir: Path = Path("outputs")


def create_app(config: ServerConfig) -> FastAPI:
    """The application with its worker started and the model loaded (raises ValueError or
    FileNotFoundError, with the pipeline's message, for a model that does not load)."""
    catalog = Catalog(config.model, config.models_dir, config.lora_dir)
    engine = Engine(config.float16, config.quantize, config.bfloat16)
    worker = Worker(config.max_queue)
    startup = catalog.models()[0]
    load = worker.submit(lambda job: engine.load(startup.path, startup.title), queue_limit=False)
    load.future.result()

    # No /docs: FastAPI's docs page loads its scripts from a CDN; /openapi.json stays.
    app = FastAPI(title="mlx-stable-diffusion", docs_url=None, redoc_url=None)
    app.state.engine, app.state.worker, app.state.catalog = engine, worker, catalog
    settings = options.Options(startup)
    _install_guards(app, config)

    async def run_job(request: Request, task: Callable[[Job], T]) -> T:
        """Queue `task` and wait for it; a client that goes away cancels it."""
        try:
            job = worker.submit(task)
        except QueueFull as e:
            raise ClientError(str(e), 503) from None
        waiting = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                worker.cancel(job)
                # Nobody reads the job's outcome now; retrieve it so asyncio does not warn.
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise Cancelled
        try:
            return waiting.result()
        except ValueError as e:
            raise ClientError(str(e)) from None

    def default_sampler() -> str:
        sd = engine.sd
        return sd.defaults.sampler if sd is not None else "euler"

    def plan(body, image: np.ndarray | None = None, mask=None, area=None) -> generation.Plan:
        try:
            return generation.plan(body, catalog, default_sampler(), image, mask, area)
        except ValueError as e:
            raise ClientError(str(e)) from None

    async def generate(request: Request, body, image=None, mask=None, area=None) -> dict[str, Any]:
        p = plan(body, image, mask, area)
        images, info = await run_job(
            request, lambda job: generation.run(engine, p, job, config.output_dir, settings)
        )
        parameters = body.model_dump(exclude={"init_images"})
        return {"images": images, "parameters": parameters, "info": generation.info_json(info)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        return await generate(request, body)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
        if len(body.init_images) not in (1, body.batch_size):
            raise ClientError(
                f"give one init image or one per image of the batch ({body.batch_size}), "
                f"not {len(body.init_images)}"
            )
        image = await run_in_threadpool(_init_images, body)
        mask = await run_in_threadpool(_mask, body, image) if body.mask else None
        area = None
        if mask is not None and body.inpaint_full_res:
            area = await run_in_threadpool(_only_masked, body, image, mask)
        return await generate(request, body, image, mask, area)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False) -> ProgressResponse:
        job, waiting = worker.current, worker.waiting
        if job is None or job.started_at is None:
            state = ProgressState(job_count=waiting, queued=waiting)
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=state)
        done = job.progress
        elapsed = time.monotonic() - job.started_at
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state = ProgressState(
            skipped=job.skipped,
            interrupted=job.interrupted,
            job=f"task({id(job):x})",
            job_count=1 + waiting,
            job_no=job.batch_no,
            sampling_step=job.sampling_step,
            sampling_steps=job.sampling_steps,
            queued=waiting,
        )
        image = None
        latent = job.latent
        if not skip_current_image and latent is not None:
            png = preview_png(latent, getattr(engine.sd, "is_xl", False))
            image = None if png is None else base64.b64encode(png).decode("ascii")
        return ProgressResponse(
            progress=done, eta_relative=max(eta, 0.0), state=state, current_image=image
        )

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict:
        worker.skip()
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict]:
        return names.sampler_items()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict]:
        return names.scheduler_items()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict]:
        entries = await run_in_threadpool(catalog.models)
        return [
            {
                "title": e.title,
                "model_name": e.name,
                "hash": None,
                "sha256": None,
                "filename": e.title,
                "config": None,
            }
            for e in entries
        ]

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict]:
        entries = await run_in_threadpool(catalog.loras)
        return [{"name": e.name, "alias": e.name, "path": e.title, "metadata": {}} for e in entries]

    @app.post("/sdapi/v1/refresh-checkpoints")
    @app.post("/sdapi/v1/refresh-loras")
    async def refresh() -> dict:
        return {}  # the folders are read at every request

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict:
        return settings.as_a1111()

    @app.post("/sdapi/v1/options")
    async def set_options(values: Annotated[dict[str, Any], Body()]) -> None:
        # Unknown options are ignored, as A1111 ignores them (options.py).
        try:
            update = options.read(values, catalog)
        except ValueError as e:
            raise ClientError(str(e)) from None
        if update.clip_skip is not None:
            settings.clip_skip = update.clip_skip
        entry = update.model
        if entry is None or (entry.title == settings.model.title == engine.model_title):
            return None

        def switch(job: Job) -> None:
            previous = settings.model
            try:
                engine.use_model(entry.path, entry.title)
            except ValueError:
                # The server's model again (the next request would load it otherwise).
                engine.use_model(previous.path, previous.title)
                raise
            settings.model = entry

        # Once started, a switch completes even if its client goes away.
        try:
            job = worker.submit(switch)
        except QueueFull as e:
            raise ClientError(str(e), 503) from None
        try:
            await asyncio.wrap_future(job.future)
        except ValueError as e:
            raise ClientError(str(e)) from None
        return None

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoRequest) -> dict[str, Any]:
        data = _base64_image(body.image, "image")
        return await run_in_threadpool(_png_info, data)

    return app


def _install_guards(app: FastAPI, config: ServerConfig) -> None:
    """Auth and the body cap (an ASGI middleware), and errors as JSON messages (never
    tracebacks)."""
    app.add_middleware(_Guard, users=config.auth)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = [_describe(error) for error in e.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(ClientError)
    async def refused(request: Request, e: ClientError) -> JSONResponse:
        headers = {"Retry-After": "5"} if e.status == 503 else None
        return JSONResponse({"detail": str(e)}, status_code=e.status, headers=headers)

    @app.exception_handler(Cancelled)
    async def gone(request: Request, e: Cancelled) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    @app.exception_handler(RuntimeError)
    async def unavailable(request: Request, e: RuntimeError) -> JSONResponse:
        log.error("request failed: %s", e)
        return JSONResponse({"detail": f"the server cannot do this now: {e}"}, status_code=503)


def _message(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class _Guard:
    """HTTP basic auth (A1111's --api-auth) on every route, and the body cap: a declared
    Content-Length over it is refused at once, a chunked body once it passes it."""

    def __init__(self, app, users: dict[str, str] | None):
        self.app = app
        self.users = users

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.users and not _authorized(headers.get("authorization", ""), self.users):
            response = _message(
                401,
                "Incorrect username or password (HTTP basic auth, --api-auth)",
                {"WWW-Authenticate": "Basic"},
            )
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await _too_large()(scope, receive, send)
        # Read the body here, so that one sent in chunks is refused as soon as it passes the
        # cap (the app would read it whole anyway).
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return await _too_large()(scope, receive, send)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: disconnect notices
            delivered = True
            return body

        await self.app(scope, replay, send)


def _too_large() -> JSONResponse:
    return _message(413, f"request body over {MAX_BODY_BYTES // 2**20} MiB")


def _authorized(header: str, users: dict[str, str]) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = users.get(user)
    # Compared in constant time, and a password is compared even for an unknown user.
    ok = secrets.compare_digest(password.encode(), (expected or "\0").encode())
    return expected is not None and ok


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = error.get("msg", "invalid")
    return f"{where}: {message}" if where else message


def _base64_image(value: str, field: str) -> bytes:
    """The bytes of a base64 image, with or without a ``data:image/...;base64,`` prefix."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ClientError(f"{field}: the image is over {MAX_IMAGE_BYTES // 2**20} MiB", 413)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{field}: not valid base64 image data") from None


def _read_image(data: bytes, field: str, multiple: int) -> np.ndarray:
    """Decode with the scripts' loader (EXIF, transparency, MAX_INPUT_PIXELS, corrupt
    files), naming the field instead of the temporary file in its messages."""
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        try:
            pixels, _ = load_image(f.name, multiple=multiple)
        except ValueError as e:
            raise ClientError(str(e).replace(f.name, field)) from None
    return pixels


def _init_images(body: Img2ImgRequest) -> np.ndarray:
    """The init images as (N, H, W, 3) in [0, 1]: at width x height when asked (A1111's
    resize_mode 0 stretches, 1 crops to the aspect ratio first), else as image2image.py
    reads them (sides rounded to multiples of 64)."""
    # "Only masked" keeps the images at their size: only the crop is resized (`_only_masked`).
    keep = bool(body.mask) and body.inpaint_full_res
    no_size = keep or (body.width is None and body.height is None)
    size = None if no_size else (body.width, body.height)
    if size is not None:
        try:
            validate_size(*(8 if side is None else side for side in size))
        except ValueError as e:
            raise ClientError(str(e)) from None
    images = []
    for i, value in enumerate(body.init_images):
        field = f"init_images[{i}]"
        multiple = 1 if keep else 64 if size is None else 8
        pixels = _read_image(_base64_image(value, field), field, multiple)
        height, width = pixels.shape[:2]
        target = (size[0] or width, size[1] or height) if size else (width, height)
        if target != (width, height):
            image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
            if body.resize_mode == 1:
                image = ImageOps.fit(image, target, Image.Resampling.LANCZOS)
            else:
                image = image.resize(target, Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        images.append(pixels)
    if len({image.shape for image in images}) > 1:
        fix = "give them one size" if keep else "give width and height"
        raise ClientError(f"the init images have different sizes; {fix}")
    return images[0] if len(images) == 1 else np.stack(images)


def _mask(body: Img2ImgRequest, image: np.ndarray) -> np.ndarray:
    """The request's mask, blurred, at the init image's size: checked against the first
    init image as sent, then resized as it was (`_init_images`), inverted and blurred as
    image2image.py does."""
    assert body.mask is not None
    with (
        tempfile.NamedTemporaryFile(suffix=".img") as init,
        tempfile.NamedTemporaryFile(suffix=".img") as mask_file,
    ):
        init.write(_base64_image(body.init_images[0], "init_images[0]"))
        mask_file.write(_base64_image(body.mask, "mask"))
        init.flush()
        mask_file.flush()
        try:
            size = oriented_size(init.name)
            mask = load_mask(mask_file.name, size, size)
        except ValueError as e:
            message = str(e).replace(mask_file.name, "mask").replace(init.name, "init_images[0]")
            raise ClientError(message) from None
    crop = body.resize_mode == 1 or (body.width is None and body.height is None)
    mask = fit_mask(mask, (image.shape[-2], image.shape[-3]), crop)
    if body.inpainting_mask_invert:
        mask = 1 - mask
    return blur_mask(mask, body.mask_blur)


def _only_masked(body: Img2ImgRequest, image: np.ndarray, mask: np.ndarray) -> MaskedArea:
    """A1111's "Only masked" (inpaint_full_res): the crop around the mask, denoised at
    width x height, or where the request leaves them out at the image's size rounded as
    image2image.py rounds it (as `image2image.py --only-masked`)."""
    rounded = rounded_size((image.shape[-2], image.shape[-3]))
    size = (body.width or rounded[0], body.height or rounded[1])
    try:
        validate_size(*size)
    except ValueError as e:
        raise ClientError(str(e)) from None
    try:
        return crop_masked_area(image, mask, size, body.inpaint_full_res_padding)
    except ValueError as e:
        raise ClientError(f"mask: {e}") from None


def _png_info(data: bytes) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(data)
        f.flush()
        try:
            with Image.open(f.name) as image:
                if image.width * image.height > MAX_INPUT_PIXELS:
                    raise ClientError(f"image: over {MAX_INPUT_PIXELS:,} pixels")
                items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        except ClientError:
            raise
        except Exception as e:  # PIL reports unreadable images with many exception types
            raise ClientError(f"image: cannot read it ({type(e).__name__})") from None
        text = items.get("parameters", "")
        parameters: dict[str, Any] = {}
        if text:
            try:
                parsed: GenerationParameters = read_parameters(f.name)
                parameters = _parameters_dict(parsed)
            except ValueError:
                parameters = {}
    return {"info": text, "items": items, "parameters": parameters}


def _parameters_dict(p: GenerationParameters) -> dict[str, Any]:
    """A1111's parsed form (modules/infotext_utils.parse_generation_parameters)."""
    fields: dict[str, Any] = {
        "Prompt": p.prompt,
        "Negative prompt": p.negative_prompt,
        "Steps": str(p.steps),
        "Sampler": names.display_name(p.sampler),
        "CFG scale": str(p.cfg_scale),
        "Seed": str(p.seed),
        "Size-1": str(p.width),
        "Size-2": str(p.height),
    }
    if p.model is not None:
        fields["Model"] = p.model
    if p.strength is not None:
        fields["Denoising strength"] = str(p.strength)
    if p.hires_resize is not None:
        fields["Hires resize-1"], fields["Hires resize-2"] = map(str, p.hires_resize)
    elif p.hires_scale is not None:
        scale = p.hires_scale  # as the text writes it
        fields["Hires upscale"] = str(int(scale)) if scale.is_integer() else repr(scale)
    if p.hires_steps:
        fields["Hires steps"] = str(p.hires_steps)
    if p.hires_upscaler is not None:
        fields["Hires upscaler"] = p.hires_upscaler
    fields.update(dict(p.extras))
    return fields
