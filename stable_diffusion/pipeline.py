"""The `StableDiffusion` pipeline: text (and optionally an image) to latents to images.

One class serves SD 1.x, SD 2.x and SDXL; what differs is read from the model
folder (or detected in a single-file checkpoint): one or two text encoders, SDXL's
pooled text and size conditioning."""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import loading, single_file, tiling
from .config import PipelineConfig, UNetConfig, read_json
from .hub import ALIASES, TINY_AUTOENCODERS, resolve_component, resolve_model
from .images import validate_size
from .layers import compute_dtype
from .lora import AppliedLoras
from .models.tiny_autoencoder import TinyAutoencoder
from .preview import latent_rgb
from .samplers import make_sampler

# Per-model defaults for well-known repos; other models get their
# architecture's defaults. sd-turbo's model card: one step, no guidance.
KNOWN_DEFAULTS = {
    "stabilityai/sdxl-turbo": {"steps": 2, "cfg": 0.0},
    "stabilityai/sd-turbo": {"steps": 1, "cfg": 0.0},
}


@dataclass(frozen=True)
class Defaults:
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for the batch it runs (with CFG: negative
    half first)."""

    context: mx.array
    text_embeds: mx.array | None = None
    time_ids: mx.array | None = None


class Denoising:
    """The lazy latents of one generation, one per step; `len()` is the step count."""

    def __init__(self, latents: Iterator[mx.array], steps: int,
                 conditioning: Conditioning | None = None):
        self._latents = latents
        self.steps = steps
        self._conditioning = conditioning

    def compute_conditioning(self) -> None:
        """Compute the text conditioning now rather than with the first step, so that the
        text encoders can be released before the UNet's weights load."""
        if self._conditioning is not None:
            c = self._conditioning
            mx.eval([a for a in (c.context, c.text_embeds, c.time_ids) if a is not None])

    def __iter__(self) -> Iterator[mx.array]:
        return self._latents

    def __len__(self) -> int:
        return self.steps


def memory_size() -> int:
    """Bytes of memory the computation can use: the GPU's, else the machine's RAM."""
    info = mx.device_info() if mx.default_device() == mx.gpu else {}
    if "memory_size" in info:
        return info["memory_size"]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def vae_attention_bytes(downscale: int, width: int, height: int) -> int:
    """The VAE's attention score matrix (float32) for one untiled image."""
    return ((width // downscale) * (height // downscale)) ** 2 * 4


def attention_bytes(
    config: UNetConfig, downscale: int, width: int, height: int, batch: int, vae: bool = True
) -> int:
    """The largest attention score matrix (float32) of the UNet's denoising and (unless
    `vae` is False) of one image's untiled VAE decoding: what limits the image size (it
    grows with pixels²)."""
    tokens = (width // downscale) * (height // downscale)
    unet = max(
        (
            batch * heads * (tokens // 4**level) ** 2 * 4
            for level, (block, heads) in enumerate(
                zip(config.down_block_types, config.heads_per_block, strict=True)
            )
            if block.startswith("CrossAttn")
        ),
        default=0,
    )
    return max(unet, vae_attention_bytes(downscale, width, height) if vae else 0)


def default_dtype(quantize: bool = False) -> mx.Dtype:
    """float16 on a GPU. On the CPU float16 weights only save memory (float16 matmuls miss
    the optimized BLAS there, so every layer computes in float32, converting its weights as
    it runs, which costs time): float32 there, unless quantizing, which asks for the memory."""
    return mx.float16 if mx.default_device() == mx.gpu or quantize else mx.float32


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x / SDXL from a diffusers-format model or a single file.

    `model` is an alias ("sdxl", "sd", "sd-1.5", ...), a Hugging Face repo id, a local
    folder, or a single-file checkpoint (.safetensors/.ckpt in the original layout).
    `float16=None` picks float16 on a GPU and float32 on the CPU (float16 there too with
    `quantize`; on the CPU everything computes in float32 whatever the weights). `loras`
    are (path, strength) pairs merged into the weights (before quantizing). `prediction_type`
    ("epsilon"/"v_prediction") and `image_size` (native size in pixels) override what the
    model says, or, for single files, what the keys cannot tell. `config` replaces the
    preset a single file's architecture picks (for models of non-standard sizes).
    `tiled_vae` decodes and encodes in tiles as diffusers' `enable_tiling()` does (bounded
    memory; also chosen, per image, where the untiled VAE's attention would not fit).
    `decoder="tiny"` decodes with the tiny autoencoder (madebyollin/taesd, or taesdxl for
    SDXL: far faster, a little less detail; images are still encoded by the full VAE);
    a folder or repo id of another diffusers AutoencoderTiny works too.
    """

    def __init__(
        self,
        model: str = "sdxl",
        float16: bool | None = None,
        quantize: bool = False,
        loras: Sequence[tuple[str | os.PathLike[str], float]] = (),
        prediction_type: str | None = None,
        image_size: int | None = None,
        config: PipelineConfig | None = None,
        decoder: str = "full",
        tiled_vae: bool = False,
    ):
        if float16 is None:
            self.dtype = default_dtype(quantize)
        else:
            self.dtype = mx.float16 if float16 else mx.float32
        self.model_name = model
        self.repo_id = ALIASES.get(model, model)
        # What a single file was detected to be ("sd1", "sd2", "sdxl"); None for folders.
        self.architecture: str | None = None
        if single_file.is_single_file(model):
            self._load_single_file(model, config, prediction_type, image_size)
        else:
            if config is not None:
                raise ValueError("config is only for single-file checkpoints")
            self._load_folder(model, prediction_type)
        self.vae_dtype = self.vae.decoder.conv_in.weight.dtype
        self.tiled_vae = tiled_vae
        # The decoder other than the model's own VAE, as the PNG parameters name it.
        self.vae_name: str | None = None
        self.tiny_autoencoder = None if decoder == "full" else self._load_tiny(decoder)
        self.defaults = self._model_defaults(image_size)
        self._loras = AppliedLoras()
        for path, strength in loras:
            self.load_lora(path, strength)
        if quantize:
            for encoder in self.text_encoders:
                loading.quantize(encoder, bits=4)
            loading.quantize(self.unet, bits=8)
            self._loras.quantized(self._lora_models())

    def _load_single_file(
        self,
        path: str,
        config: PipelineConfig | None,
        prediction_type: str | None,
        image_size: int | None,
    ) -> None:
        loaded = single_file.load_single_file(
            path, self.dtype, config, prediction_type=prediction_type, image_size=image_size
        )
        self.folder = loaded.path
        self.architecture = loaded.architecture
        self.is_xl = loaded.config.is_xl
        self.force_zeros_for_empty_prompt = self.is_xl
        self.scheduler_config = loaded.config.scheduler
        # A1111's default; single files name no scheduler.
        self.default_sampler = "dpm++2m_karras"
        self.tokenizers = loaded.tokenizers
        self.text_encoders = loaded.text_encoders
        self.unet = loaded.unet
        self.vae = loaded.vae

    def _load_folder(self, model: str, prediction_type: str | None) -> None:
        folder = resolve_model(model, prefer_float16=self.dtype == mx.float16)
        self.folder = folder
        model_index = read_json(folder / "model_index.json")
        self.is_xl = (
            "text_encoder_2" in model_index and model_index["text_encoder_2"][0] is not None
        )
        self.force_zeros_for_empty_prompt = self.is_xl and model_index.get(
            "force_zeros_for_empty_prompt", True
        )

        self.scheduler_config, self.default_sampler = loading.load_scheduler_config(
            folder / "scheduler"
        )
        if prediction_type is not None:
            self.scheduler_config = dataclasses.replace(
                self.scheduler_config, prediction_type=prediction_type
            )
        encoder_names = ["text_encoder", "text_encoder_2"] if self.is_xl else ["text_encoder"]
        tokenizer_names = ["tokenizer", "tokenizer_2"] if self.is_xl else ["tokenizer"]
        self.tokenizers = [loading.load_tokenizer(folder / name) for name in tokenizer_names]
        self.text_encoders = [
            loading.load_text_encoder(folder / name, self.dtype) for name in encoder_names
        ]
        self.unet = loading.load_unet(folder / "unet", self.dtype)
        self.vae = loading.load_vae(folder / "vae", self.dtype)

    def _load_tiny(self, decoder: str) -> TinyAutoencoder:
        source = TINY_AUTOENCODERS[self.is_xl] if decoder == "tiny" else decoder
        self.vae_name = os.path.basename(os.path.normpath(source))
        tiny = loading.load_tiny_autoencoder(resolve_component(source), self.dtype)
        if tiny.config.latent_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"the tiny autoencoder {source} takes {tiny.config.latent_channels}-channel "
                f"latents, this model makes {self.vae.config.latent_channels}: use one made "
                f"for it (madebyollin/{'taesdxl' if self.is_xl else 'taesd'})"
            )
        return tiny

    def preload(self) -> None:
        """Read all weights now instead of at first use (they load lazily)."""
        mx.eval([m.parameters() for m in (*self.text_encoders, self.unet, self.vae)])

    def release_text_encoders(self) -> None:
        """Free the text encoders once the conditioning is computed (lower peak
        memory); generating again needs a new pipeline."""
        self.text_encoders = []

    def release_unet(self) -> None:
        """Free the UNet before decoding; generating again needs a new pipeline."""
        self.unet = None

    # -- LoRA -------------------------------------------------------------------------

    @property
    def loras(self) -> list[tuple[str, float]]:
        """(path, strength) of the LoRAs merged into the weights, in load order."""
        return list(self._loras.loaded)

    def _lora_models(self) -> dict:
        encoders = dict(zip(("text_encoder", "text_encoder_2"), self.text_encoders, strict=False))
        return {"unet": self.unet, **encoders}

    def load_lora(self, path: str | os.PathLike[str], strength: float = 1.0) -> None:
        """Merge a LoRA (kohya/civitai or diffusers/PEFT .safetensors, or a pickled file
        read without running code) into the weights with `strength`; several can be
        loaded. Quantized layers are dequantized, merged and quantized again. Raises
        ValueError, changing nothing, for a file that does not fit this model."""
        if self.unet is None or not self.text_encoders:
            raise RuntimeError("the UNet or text encoders were released; create a new pipeline")
        self._loras.merge(path, strength, self._lora_models(), self.unet.config)

    def unload_loras(self) -> None:
        """Restore the weights from before the first LoRA, exactly."""
        self._loras.restore(self._lora_models())

    # -- defaults ---------------------------------------------------------------------

    def _model_defaults(self, image_size: int | None = None) -> Defaults:
        size = self.unet.config.sample_size * self.vae.downscale
        if image_size is not None:
            validate_size(image_size, image_size, self.vae.downscale)
            size = image_size
        known = KNOWN_DEFAULTS.get(self.repo_id, {})
        return Defaults(
            width=size,
            height=size,
            steps=known.get("steps", 30),
            cfg=known.get("cfg", 5.0 if self.is_xl else 7.5),
            sampler=self.default_sampler,
        )

    # -- text -------------------------------------------------------------------------

    def _chunk_count(self, texts: list[str]) -> int:
        return max(len(t.encode_chunks(text)) for t in self.tokenizers for text in texts)

    def _encode_texts(self, texts: list[str], n_chunks: int) -> tuple[mx.array, mx.array | None]:
        """Hidden states of `texts`, each split into `n_chunks` chunks of 75 tokens
        (the shorter padded with empty chunks) encoded separately and concatenated,
        as other tools do for prompts longer than CLIP's 77 tokens. SDXL's pooled
        embedding is the first chunk's."""
        if not self.text_encoders:
            raise RuntimeError("the text encoders were released; create a new StableDiffusion")
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            empty = tokenizer.encode_chunks("")
            rows = []
            for text in texts:
                chunks = tokenizer.encode_chunks(text)
                rows += chunks + empty * (n_chunks - len(chunks))
            output = encoder(mx.array(rows))
            states = output.penultimate_hidden_state if self.is_xl else output.last_hidden_state
            hidden.append(states.reshape(len(texts), -1, states.shape[-1]))
            pooled = output.pooled.reshape(len(texts), n_chunks, -1)[:, 0]
        return mx.concatenate(hidden, axis=-1), pooled if self.is_xl else None

    def _conditioning(
        self,
        texts: list[str],
        negative_texts: list[str] | None,
        use_cfg: bool,
        image_size: tuple[int, int],
        original_size: tuple[int, int] | None,
        crop: tuple[int, int],
    ) -> Conditioning:
        zero_negative = negative_texts is None and self.force_zeros_for_empty_prompt
        negative_texts = negative_texts or [""] * len(texts)
        n_chunks = self._chunk_count(texts + (negative_texts if use_cfg else []))
        context, pooled = self._encode_texts(texts, n_chunks)
        if use_cfg:
            if zero_negative:
                negative, negative_pooled = mx.zeros_like(context), mx.zeros_like(pooled)
            else:
                negative, negative_pooled = self._encode_texts(negative_texts, n_chunks)
            context = mx.concatenate([negative, context])
            if self.is_xl:
                pooled = mx.concatenate([negative_pooled, pooled])
        dtype = compute_dtype(self.dtype)
        if not self.is_xl:
            return Conditioning(context.astype(dtype))
        # SDXL is conditioned on the training image's original size, crop and target size.
        time_ids = [*(original_size or image_size), *crop, *image_size]
        time_ids = mx.broadcast_to(mx.array(time_ids, dtype=mx.float32), (context.shape[0], 6))
        return Conditioning(context.astype(dtype), pooled.astype(dtype), time_ids)

    # -- sampling ---------------------------------------------------------------------

    def _denoise(
        self,
        x: mx.array,
        run,
        conditioning: Conditioning,
        cfg_weight: float,
        use_cfg: bool,
        key: mx.array,
    ) -> Iterator[mx.array]:
        for i, t in enumerate(run.timesteps):
            x_in = run.scale_model_input(x, i).astype(compute_dtype(self.dtype))
            if use_cfg:
                x_in = mx.concatenate([x_in, x_in])
            prediction = self.unet(
                x_in,
                mx.array([t], dtype=mx.float32),
                conditioning.context,
                conditioning.text_embeds,
                conditioning.time_ids,
            ).astype(mx.float32)
            if use_cfg:
                unconditional, text = mx.split(prediction, 2)
                prediction = unconditional + cfg_weight * (text - unconditional)
            noise = None
            if run.stochastic:
                key, step_key = mx.random.split(key)
                noise = mx.random.normal(x.shape, key=step_key)
            x = run.step(prediction, x, i, noise=noise)
            yield x

    def _prepare(self, text, n_images, negative_text, num_steps, cfg_weight, sampler, seed):
        texts = [text] if isinstance(text, str) else list(text)
        texts = [t for t in texts for _ in range(n_images)]
        if negative_text is not None:
            negatives = [negative_text] if isinstance(negative_text, str) else list(negative_text)
            negatives = [t for t in negatives for _ in range(n_images)]
            if len(negatives) != len(texts):
                raise ValueError("give one negative prompt, or one per prompt")
        else:
            negatives = None
        defaults = self.defaults
        num_steps = defaults.steps if num_steps is None else num_steps
        cfg_weight = defaults.cfg if cfg_weight is None else cfg_weight
        if num_steps < 1:
            raise ValueError(f"steps must be at least 1 (got {num_steps})")
        if cfg_weight < 0:
            raise ValueError(f"cfg weight must be >= 0 (got {cfg_weight})")
        sampler = make_sampler(sampler or defaults.sampler, self.scheduler_config)
        seed = secrets.randbits(31) if seed is None else seed
        self.last_seed = seed
        return texts, negatives, num_steps, cfg_weight, sampler, mx.random.key(seed)

    def generate_latents(
        self,
        text: str | list[str],
        n_images: int = 1,
        num_steps: int | None = None,
        cfg_weight: float | None = None,
        negative_text: str | list[str] | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        sampler: str | None = None,
        latents: mx.array | None = None,
        original_size: tuple[int, int] | None = None,
        crop: tuple[int, int] = (0, 0),
    ) -> Denoising:
        """Lazily yield the latent after each denoising step (nothing is computed
        until `mx.eval`). `latents` gives the initial noise (NHWC, standard normal)
        to reproduce a run exactly; otherwise it is drawn from `seed`. Arguments are
        checked at the call, before anything is computed."""
        texts, negatives, num_steps, cfg_weight, sampler, key = self._prepare(
            text, n_images, negative_text, num_steps, cfg_weight, sampler, seed
        )
        defaults = self.defaults
        width = defaults.width if width is None else width
        height = defaults.height if height is None else height
        self._check_size(width, height, len(texts) * (2 if cfg_weight > 1 else 1))
        shape = (
            len(texts),
            height // self.vae.downscale,
            width // self.vae.downscale,
            self.unet.config.in_channels,
        )
        key, noise_key = mx.random.split(key)
        noise = mx.random.normal(shape, key=noise_key) if latents is None else latents
        if noise.shape != shape:
            raise ValueError(f"initial latents have shape {noise.shape}, expected {shape}")
        use_cfg = cfg_weight > 1
        conditioning = self._conditioning(
            texts, negatives, use_cfg, (height, width), original_size, crop
        )
        run = sampler.start(num_steps)
        x = run.initial_latents(noise.astype(mx.float32))
        steps = self._denoise(x, run, conditioning, cfg_weight, use_cfg, key)
        return Denoising(steps, len(run.timesteps), conditioning)

    def generate_latents_from_image(
        self,
        image: mx.array | np.ndarray,
        text: str | list[str],
        strength: float = 0.8,
        n_images: int = 1,
        num_steps: int | None = None,
        cfg_weight: float | None = None,
        negative_text: str | list[str] | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        noise: mx.array | None = None,
        original_size: tuple[int, int] | None = None,
        crop: tuple[int, int] = (0, 0),
    ) -> Denoising:
        """img2img: noise the image's latents to `strength` (0 keeps the image, 1
        replaces it) and denoise them. `image` is (H, W, 3) or (N, H, W, 3) in [0, 1].
        At least one denoising step always runs."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be between 0 and 1 (got {strength})")
        image = mx.array(image, dtype=mx.float32)
        if image.ndim == 3:
            image = image[None]
        height, width = image.shape[1:3]
        texts, negatives, num_steps, cfg_weight, sampler, key = self._prepare(
            text, n_images, negative_text, num_steps, cfg_weight, sampler, seed
        )
        self._check_size(width, height, len(texts) * (2 if cfg_weight > 1 else 1))
        if image.shape[0] not in (1, len(texts)):
            raise ValueError(f"give one image or one per generated image ({len(texts)})")
        x0 = self.encode_image(image)
        x0 = mx.broadcast_to(x0, (len(texts), *x0.shape[1:]))
        if strength == 0:
            return Denoising(iter([x0]), 1)
        key, noise_key = mx.random.split(key)
        noise = mx.random.normal(x0.shape, key=noise_key) if noise is None else noise
        use_cfg = cfg_weight > 1
        conditioning = self._conditioning(
            texts, negatives, use_cfg, (height, width), original_size, crop
        )
        run = sampler.start(num_steps, strength=strength)
        x = run.noised_latents(x0, noise.astype(mx.float32))
        steps = self._denoise(x, run, conditioning, cfg_weight, use_cfg, key)
        return Denoising(steps, len(run.timesteps), conditioning)

    # -- VAE --------------------------------------------------------------------------

    def _check_size(self, width: int, height: int, batch: int) -> None:
        """Refuse sizes the VAE cannot take, and sizes whose UNet attention alone would
        not fit in this machine's memory, before anything is computed (the VAE's is
        tiled where it would not fit)."""
        validate_size(width, height, self.vae.downscale)
        needed = attention_bytes(
            self.unet.config, self.vae.downscale, width, height, batch, vae=False
        )
        available = memory_size()
        if needed > available:
            raise ValueError(
                f"{width}x{height} with {batch} image(s) needs about {needed / 2**30:.0f} GiB "
                f"for attention alone; this machine has {available / 2**30:.0f} GiB. "
                f"Use a smaller size (the model's native size is "
                f"{self.defaults.width}x{self.defaults.height}) or fewer images."
            )

    def _vae_tiles(self, images_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (pixels, latents) sides of the VAE's tiles for images of this (NHWC) shape,
        or None for no tiling: tiled when asked for, or when the untiled attention of the
        batch would not fit."""
        batch, height, width = images_shape[:3]
        downscale = self.vae.downscale
        needed = batch * vae_attention_bytes(downscale, width, height)
        if self.tiled_vae or needed > memory_size():
            # diffusers: tile_sample_min_size, tile_latent_min_size.
            size = self.vae.config.sample_size
            return size, int(size / downscale)
        return None

    def encode_image(self, image: mx.array) -> mx.array:
        """(N, H, W, 3) images in [0, 1] -> scaled latents (posterior mean)."""
        vae_config = self.vae.config

        def posterior_mean(images: mx.array) -> mx.array:
            return self.vae.encode(images)[0]

        images = (2 * image - 1).astype(compute_dtype(self.vae_dtype))
        tiles = self._vae_tiles(images.shape)
        # The posterior mean is a slice of the moments diffusers blends: blending it alone
        # is the same.
        mean = tiling.tiled(posterior_mean, images, *tiles) if tiles else posterior_mean(images)
        shift = vae_config.shift_factor or 0.0
        return (mean.astype(mx.float32) - shift) * vae_config.scaling_factor

    def decode(self, latents: mx.array) -> mx.array:
        """Latents -> (N, H, W, 3) images in [0, 1], by the tiny autoencoder if chosen."""
        if self.tiny_autoencoder is not None:
            tiny = self.tiny_autoencoder
            latents = latents / tiny.config.scaling_factor
            images = tiny.decode(latents.astype(compute_dtype(self.dtype)))
            return mx.clip(images.astype(mx.float32) / 2 + 0.5, 0, 1)
        vae_config = self.vae.config
        latents = latents / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)
        latents = latents.astype(compute_dtype(self.vae_dtype))
        batch, height, width = latents.shape[:3]
        downscale = self.vae.downscale
        tiles = self._vae_tiles((batch, height * downscale, width * downscale))
        if tiles:
            images = tiling.tiled(self.vae.decode, latents, tiles[1], tiles[0])
        else:
            images = self.vae.decode(latents)
        return mx.clip(images.astype(mx.float32) / 2 + 0.5, 0, 1)

    def preview(self, latents: mx.array) -> np.ndarray:
        """A quick look at latents, e.g. each step's from `generate_latents`: (N, H, W, 3)
        uint8 at the image's size. The tiny autoencoder's decoding when it is loaded
        (`decoder="tiny"`), else a fixed linear map of the latent channels to RGB (see
        `preview.py`: one pixel per latent, shown 8x8). Either costs little next to a step.
        The latents of a step are still noisy: early previews show mostly noise."""
        if self.tiny_autoencoder is not None:
            images = self.decode(latents)
        else:
            images = latent_rgb(latents, self.is_xl)
            scale = self.vae.downscale
            images = mx.repeat(mx.repeat(images, scale, axis=1), scale, axis=2)
        return np.array((images * 255).round().astype(mx.uint8))
