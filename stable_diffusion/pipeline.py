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

from . import cpu, loading, prompts, tiling, upscale
from .config import AutoencoderConfig, PipelineConfig, UNetConfig
from .embeddings import read_embedding
from .inpainting import check_masked_content, fill
from .loading.folder import load_tiny_autoencoder
from .loading.hub import ALIASES, TINY_AUTOENCODERS, resolve_component
from .lora import AppliedLoras
from .models.clip import CLIPTextModel
from .models.tiny_autoencoder import TinyAutoencoder
from .models.unet import UNetModel
from .models.vae import Autoencoder
from .noise import ImageNoise, image_seeds
from .preview import latent_rgb
from .samplers import Run, Sampler, make_sampler
from .settings import MAX_SIDE, GenerationSettings, HiresFix, check_arguments
from .tokenizer import Tokenizer

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
class Inpainting:
    """What inpainting adds to the denoising (latent-sized, NHWC): the mask (1 = repaint)
    and, for an inpainting UNet, the masked image's latents it takes with the latents;
    for other UNets, the image's latents and the noise that bring the unmasked region back
    after every step."""

    mask: mx.array
    masked_latents: mx.array | None = None
    x0: mx.array | None = None
    noise: mx.array | None = None


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for the batch it runs (with CFG: negative
    half first)."""

    context: mx.array
    text_embeds: mx.array | None = None
    time_ids: mx.array | None = None


class NonFiniteError(ValueError):
    """The latents or the decoded images hold NaN or infinite values: the image would be
    black or noise."""


class Denoising:
    """The lazy latents of one generation, one per step; `len()` is the step count.
    `settings` is what it runs with (defaults filled in, seed drawn)."""

    def __init__(
        self,
        latents: Iterator[mx.array],
        steps: int,
        settings: GenerationSettings,
        conditioning: Conditioning | None = None,
    ):
        self._latents = latents
        self.steps = steps
        self.settings = settings
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


def unet_activation_bytes(
    config: UNetConfig, downscale: int, width: int, height: int, batch: int, itemsize: int = 4
) -> int:
    """What the UNet's activations take at least, at once, at this size (weights aside):
    the skip connections it keeps for its up blocks, and the widest convolution's input,
    its transform (a Winograd tile transform is 2.25x its input; MLX's own im2col 9x) and
    output, at the first resnet of an up block (its input is the block below's channels
    and a skip's). Attention is computed in blocks, so it adds no square of the pixels.
    Below MLX's measured peak on the tiny models (tests/test_pipeline_memory.py), so that a
    refusal is sure."""
    tokens = (width // downscale) * (height // downscale)
    channels, resnets = config.block_out_channels, config.resnets_per_block
    last = len(channels) - 1
    skips, working = channels[0] * tokens, 0
    for level in range(len(channels)):
        level_tokens = tokens // 4**level
        skips += resnets[level] * channels[level] * level_tokens
        if level < last:
            skips += channels[level] * (level_tokens // 4)
        inputs = channels[min(level + 1, last)] + channels[level]
        working = max(working, int((1 + 2.25) * inputs + channels[level]) * level_tokens)
    return batch * (skips + working) * itemsize


def vae_decode_bytes(config: AutoencoderConfig, width: int, height: int, itemsize: int = 4) -> int:
    """An estimate of the VAE decoder's peak activations for one untiled image (weights
    aside): 28 values of its first block's channels per pixel, measured on SDXL's VAE at
    512px (27: the upsampled input, group norms, residuals and MLX's im2col of its full-size
    3x3 convolutions; docs/performance.md). Its attention is blocked."""
    return 28 * config.block_out_channels[0] * width * height * itemsize


# diffusers' tiles overlap by a quarter of their latents (`tiling.OVERLAP`): a multiple of 4
# latents (32 pixels) keeps its stride and crop in step, as ours are.
TILE_MULTIPLE = 32
MIN_TILE_SIZE = 64


def check_tile_size(size: object) -> None:
    """Raise ValueError unless `size` is a VAE tile side in pixels that diffusers' tiling
    computes the same way: a multiple of 32, at least 64, at most the largest side."""
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or not MIN_TILE_SIZE <= size <= MAX_SIDE
        or size % TILE_MULTIPLE
    ):
        raise ValueError(
            f"the VAE tile size must be a multiple of {TILE_MULTIPLE} pixels between "
            f"{MIN_TILE_SIZE} and {MAX_SIDE} (got {size!r:.40}), e.g. 256"
        )


def default_batch_size(n_images: int) -> int:
    """Images per UNet call when making `n_images` images: one on the CPU, all on a GPU.
    On the CPU a batch costs as much as its images one by one (docs/performance.md), and
    only images made one by one are bit-identical whatever the batch or the split over
    machines: OpenBLAS rounds some products differently at other batch sizes (~1e-5)."""
    return n_images if mx.default_device() == mx.gpu else 1


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
    memory; also chosen, per image, where the untiled VAE would not fit); `vae_tile_size`
    is the tiles' side in pixels (default: the VAE's `sample_size`, as diffusers; smaller
    tiles, less memory, as diffusers with its `tile_sample_min_size` set to it).
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
        vae_tile_size: int | None = None,
    ):
        if vae_tile_size is not None:
            check_tile_size(vae_tile_size)
        if float16 is None:
            self.dtype = default_dtype(quantize)
        else:
            self.dtype = mx.float16 if float16 else mx.float32
        self.model_name = model
        self.repo_id = ALIASES.get(model, model)
        self.components = loading.load_components(
            model, self.dtype, prediction_type=prediction_type, image_size=image_size, config=config
        )
        self.vae_dtype = self.vae.decoder.conv_in.weight.dtype
        self.tiled_vae = tiled_vae
        self.vae_tile_size = vae_tile_size
        # The decoder other than the model's own VAE, as the PNG parameters name it.
        self.vae_name: str | None = None
        self.tiny_autoencoder = None if decoder == "full" else self._load_tiny(decoder)
        self.defaults = self._model_defaults()
        self._loras = AppliedLoras()
        for path, strength in loras:
            self.load_lora(path, strength)
        if quantize:
            for encoder in self.text_encoders:
                loading.quantize(encoder, bits=4)
            loading.quantize(self.unet, bits=8)
            self._loras.quantized(self._lora_models())

    # The models, held by `components` only, so that releasing them frees their memory.

    @property
    def tokenizers(self) -> list[Tokenizer]:
        return self.components.tokenizers

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return self.components.text_encoders

    @property
    def unet(self) -> UNetModel | None:
        return self.components.unet

    @property
    def vae(self) -> Autoencoder:
        return self.components.vae

    @property
    def is_xl(self) -> bool:
        return self.components.is_xl

    def _load_tiny(self, decoder: str) -> TinyAutoencoder:
        source = TINY_AUTOENCODERS[self.is_xl] if decoder == "tiny" else decoder
        self.vae_name = os.path.basename(os.path.normpath(source))
        tiny = load_tiny_autoencoder(resolve_component(source), self.dtype)
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
        self.components.text_encoders = []

    def release_unet(self) -> None:
        """Free the UNet before decoding; generating again needs a new pipeline."""
        self.components.unet = None

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

    def _model_defaults(self) -> Defaults:
        size = self.components.native_size
        known = KNOWN_DEFAULTS.get(self.repo_id, {})
        return Defaults(
            width=size,
            height=size,
            steps=known.get("steps", 30),
            cfg=known.get("cfg", 5.0 if self.is_xl else 7.5),
            sampler=self.components.default_sampler,
        )

    # -- text -------------------------------------------------------------------------

    def _chunks(self, tokenizer: Tokenizer, text: str) -> tuple[list[list[int]], list[list[float]]]:
        """Token rows and weights of a prompt in A1111's syntax (prompts.py), without its
        <lora:...> tags, which name LoRAs loaded before (see `check_prompt_loras`)."""
        return tokenizer.encode_weighted_chunks(
            prompts.parse_prompt(prompts.extract_loras(text)[0])
        )

    def _chunk_count(self, texts: list[str]) -> int:
        return max(len(self._chunks(t, text)[0]) for t in self.tokenizers for text in texts)

    def _encode_texts(
        self, texts: list[str], n_chunks: int, clip_skip: int = 1
    ) -> tuple[mx.array, mx.array | None]:
        """Hidden states of `texts`, each split into `n_chunks` chunks of 75 tokens
        (the shorter padded with empty chunks) encoded separately and concatenated,
        as other tools do for prompts longer than CLIP's 77 tokens; weighted tokens
        scaled as A1111 does (`prompts.apply_emphasis`). `clip_skip` counts as A1111 does
        (1: the last layer). SDXL's pooled embedding is the first chunk's."""
        if not self.text_encoders:
            raise RuntimeError("the text encoders were released; create a new StableDiffusion")
        self.check_clip_skip(clip_skip)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            empty_rows, empty_weights = self._chunks(tokenizer, "")
            rows, weights = [], []
            for text in texts:
                text_rows, text_weights = self._chunks(tokenizer, text)
                rows += text_rows + empty_rows * (n_chunks - len(text_rows))
                weights += text_weights + empty_weights * (n_chunks - len(text_rows))
            output = encoder(mx.array(rows), cpu.compute_dtype(self.dtype))
            # As diffusers' clip_skip (A1111's minus one): SDXL counts from the penultimate
            # layer and skips the final layer norm.
            if self.is_xl:
                states = output.hidden_states[-(clip_skip + 1)]
            elif clip_skip == 1:
                states = output.last_hidden_state
            else:
                states = encoder.text_model.final_layer_norm(output.hidden_states[-clip_skip])
            if any(w != 1.0 for row in weights for w in row):
                states = prompts.apply_emphasis(states, mx.array(weights))
            hidden.append(states.reshape(len(texts), -1, states.shape[-1]))
            pooled = output.pooled.reshape(len(texts), n_chunks, -1)[:, 0]
        return mx.concatenate(hidden, axis=-1), pooled if self.is_xl else None

    def check_clip_skip(self, clip_skip: int) -> None:
        """Raise ValueError unless `clip_skip` (A1111's numbering) fits the text encoders."""
        layers = min(e.config.num_hidden_layers for e in self.text_encoders)
        if not 1 <= clip_skip <= layers:
            raise ValueError(
                f"clip skip must be between 1 (the last layer) and {layers} (this model's "
                f"text encoder layers), got {clip_skip}"
            )

    def check_prompt_loras(self, texts: list[str]) -> None:
        """Raise ValueError when a prompt's <lora:name:weight> names no LoRA loaded (by
        file stem, as A1111 names them): the tags only mark what the caller merged."""
        loaded = {os.path.splitext(os.path.basename(path))[0] for path, _ in self.loras}
        for text in texts:
            for name, _ in prompts.extract_loras(text)[1]:
                if name not in loaded:
                    raise ValueError(
                        f"the prompt names <lora:{name}:...> but no LoRA {name!r} is loaded; "
                        "load it first (load_lora, or --lora-dir on the command line)"
                    )

    # -- textual inversion ------------------------------------------------------------

    def load_embedding(self, path: str | os.PathLike[str], token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt/.safetensors, SDXL's clip_l/clip_g,
        diffusers' learned_embeds); the prompt uses it by writing `token` (default: the
        file's stem). Returns the token. Raises ValueError, changing nothing, for a file that
        does not fit this model's text encoders."""
        if not self.text_encoders:
            raise RuntimeError("the text encoders were released; create a new StableDiffusion")
        embedding = read_embedding(path, token)
        if len(embedding.vectors) != len(self.text_encoders):
            kind = "SDXL" if len(embedding.vectors) == 2 else "SD 1.x/2.x"
            raise ValueError(f"{path}: an {kind} embedding does not fit this model")
        for vectors, tokenizer, encoder in zip(
            embedding.vectors, self.tokenizers, self.text_encoders, strict=True
        ):
            tokenizer.check_embedding(embedding.token, len(vectors))
            if vectors.shape[1] != encoder.config.hidden_size:
                raise ValueError(
                    f"{path}: its vectors have {vectors.shape[1]} dims but this model's text "
                    f"encoder takes {encoder.config.hidden_size}: it was made for another model"
                )
        for tokenizer, encoder, vectors in zip(
            self.tokenizers, self.text_encoders, embedding.vectors, strict=True
        ):
            ids = encoder.text_model.embeddings.add_tokens(vectors)
            tokenizer.add_embedding(embedding.token, ids)
        return embedding.token

    def _conditioning(
        self,
        settings: GenerationSettings,
        original_size: tuple[int, int] | None,
        crop: tuple[int, int],
    ) -> Conditioning:
        texts, use_cfg = list(settings.prompts), settings.uses_cfg
        negative_texts = list(settings.negative_prompts or [""] * len(texts))
        self.check_prompt_loras(texts + negative_texts)
        zero_negative = (
            settings.negative_prompts is None and self.components.force_zeros_for_empty_prompt
        )
        n_chunks = self._chunk_count(texts + (negative_texts if use_cfg else []))
        context, pooled = self._encode_texts(texts, n_chunks, settings.clip_skip)
        if use_cfg:
            if zero_negative:
                negative, negative_pooled = mx.zeros_like(context), mx.zeros_like(pooled)
            else:
                negative, negative_pooled = self._encode_texts(
                    negative_texts, n_chunks, settings.clip_skip
                )
            context = mx.concatenate([negative, context])
            if self.is_xl:
                pooled = mx.concatenate([negative_pooled, pooled])
        dtype = cpu.compute_dtype(self.dtype)
        if not self.is_xl:
            return Conditioning(context.astype(dtype))
        # SDXL is conditioned on the training image's original size, crop and target size.
        image_size = (settings.height, settings.width)
        time_ids = [*(original_size or image_size), *crop, *image_size]
        time_ids = mx.broadcast_to(mx.array(time_ids, dtype=mx.float32), (context.shape[0], 6))
        return Conditioning(context.astype(dtype), pooled.astype(dtype), time_ids)

    # -- sampling ---------------------------------------------------------------------

    def _denoise(
        self,
        x: mx.array,
        run,
        conditioning: Conditioning,
        settings: GenerationSettings,
        noise_source: ImageNoise,
        inpainting: Inpainting | None = None,
    ) -> Iterator[mx.array]:
        use_cfg, cfg_weight = settings.uses_cfg, settings.cfg
        dtype = cpu.compute_dtype(self.dtype)
        for i, t in enumerate(run.timesteps):
            x_in = run.scale_model_input(x, i).astype(dtype)
            if inpainting is not None and inpainting.masked_latents is not None:
                extra = [inpainting.mask, inpainting.masked_latents]
                x_in = mx.concatenate([x_in, *(e.astype(dtype) for e in extra)], axis=-1)
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
                noise = noise_source.draw(x.shape[1:])
            x = run.step(prediction, x, i, noise=noise)
            if inpainting is not None and inpainting.x0 is not None:
                x = self._keep_unmasked(x, run, i, inpainting)
            yield x

    @staticmethod
    def _keep_unmasked(x: mx.array, run: Run, i: int, inpainting: Inpainting) -> mx.array:
        """As diffusers' inpainting pipelines with a 4-channel UNet: after step i, the
        unmasked region is the image's latents noised to the next step's level (clean
        after the last step)."""
        x0, mask = inpainting.x0, inpainting.mask
        if i + 1 < len(run.timesteps):
            x0 = run.noised_latents(x0, inpainting.noise, i + 1)
        return ((1 - mask) * x0 + mask * x.astype(mx.float32)).astype(x.dtype)

    def _prepare(
        self,
        text: str | list[str],
        n_images: int,
        negative_text: str | list[str] | None,
        num_steps: int | None,
        cfg_weight: float | None,
        sampler: str | None,
        seed: int | None,
        width: int | None,
        height: int | None,
        strength: float | None = None,
        clip_skip: int = 1,
    ) -> GenerationSettings:
        """The settings of a generation, checked (before anything is computed) and with
        the model's defaults filled in; a random seed when none is given."""
        texts = [text] if isinstance(text, str) else list(text)
        check_arguments(
            n_images=n_images,
            n_prompts=len(texts),
            steps=num_steps,
            cfg=cfg_weight,
            seed=seed,
            width=width,
            height=height,
            strength=strength,
            multiple=self.vae.downscale,
        )
        self.check_clip_skip(clip_skip)
        texts = [t for t in texts for _ in range(n_images)]
        if negative_text is not None:
            negatives = [negative_text] if isinstance(negative_text, str) else list(negative_text)
            negatives = tuple(t for t in negatives for _ in range(n_images))
            if len(negatives) != len(texts):
                raise ValueError("give one negative prompt, or one per prompt")
        else:
            negatives = None
        defaults = self.defaults
        settings = GenerationSettings(
            prompts=tuple(texts),
            negative_prompts=negatives,
            steps=defaults.steps if num_steps is None else num_steps,
            cfg=float(defaults.cfg if cfg_weight is None else cfg_weight),
            sampler=sampler or defaults.sampler,
            seed=secrets.randbits(31) if seed is None else seed,
            width=defaults.width if width is None else width,
            height=defaults.height if height is None else height,
            strength=strength,
            clip_skip=clip_skip,
        )
        self._check_size(settings)
        return settings

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
        clip_skip: int = 1,
    ) -> Denoising:
        """Lazily yield the latent after each denoising step (nothing is computed
        until `mx.eval`). Not for inpainting models (`is_inpainting`), which need an image
        and a mask (`generate_latents_from_image`). `latents` gives the initial noise (NHWC,
        standard normal) to reproduce a run exactly; otherwise image i's is drawn from seed
        `seed + i` (as are its stochastic samplers' step noises), whatever the batch. Arguments are
        checked at the call, before anything is computed. Prompts are in A1111's syntax
        (prompts.py); `clip_skip` is A1111's (1: the last layer, 2: the penultimate)."""
        settings = self._prepare(
            text,
            n_images,
            negative_text,
            num_steps,
            cfg_weight,
            sampler,
            seed,
            width,
            height,
            clip_skip=clip_skip,
        )
        if self.is_inpainting:
            raise ValueError(
                "this is an inpainting model (its UNet takes 9 input channels): it repaints "
                "the masked part of an image; give it an image and a mask (image2image.py "
                "--mask, or generate_latents_from_image(..., mask=...))"
            )
        run = make_sampler(settings.sampler, self.components.scheduler_config).start(settings.steps)
        shape = (
            len(settings.prompts),
            settings.height // self.vae.downscale,
            settings.width // self.vae.downscale,
            self.vae.config.latent_channels,
        )
        noise_source = ImageNoise(image_seeds(settings.seed, len(settings.prompts)))
        initial = noise_source.draw(shape[1:])
        noise = initial if latents is None else latents
        if noise.shape != shape:
            raise ValueError(f"initial latents have shape {noise.shape}, expected {shape}")
        conditioning = self._conditioning(settings, original_size, crop)
        x = run.initial_latents(noise.astype(mx.float32))
        steps = self._denoise(x, run, conditioning, settings, noise_source)
        return Denoising(steps, len(run.timesteps), settings, conditioning)

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
        clip_skip: int = 1,
        mask: mx.array | np.ndarray | None = None,
        masked_content: str = "original",
    ) -> Denoising:
        """img2img: noise the image's latents to `strength` (0 keeps the image, 1
        replaces it) and denoise them. `image` is (H, W, 3) or (N, H, W, 3) in [0, 1].
        At least one denoising step always runs. Prompts and `clip_skip` as in
        `generate_latents`.

        Inpainting: `mask` (H, W) or (N, H, W) in [0, 1], 1 (white) = repaint, is
        binarized at 0.5 and brought to the latent size as diffusers'
        StableDiffusion(XL)InpaintPipeline does (nearest: each 8x8 block's top-left
        pixel). An inpainting UNet (9 channels) sees it with the latents of the image
        with the masked part gray; with another UNet, the unmasked region is put back after
        every step. At strength 1 the latents start from pure noise. `masked_content`
        is what the masked area starts from, as A1111's "inpainting fill": "original",
        "fill" (the colors around it, blurred), "latent noise" or "latent nothing". The
        decoded images are not the input outside the mask (the VAE's round trip);
        `inpainting.apply_overlay` pastes the input's pixels back."""
        image = mx.array(image, dtype=mx.float32)
        if image.ndim == 3:
            image = image[None]
        height, width = image.shape[1:3]
        if mask is None and self.is_inpainting:
            raise ValueError(
                "this is an inpainting model (its UNet takes 9 input channels): give a mask "
                "of what to repaint (image2image.py --mask, or mask=...)"
            )
        if mask is not None:
            check_masked_content(masked_content)
            mask = mx.array(mask, dtype=mx.float32)
            if mask.ndim == 2:
                mask = mask[None]
            if mask.ndim != 3:
                raise ValueError(f"the mask must be (H, W) or (N, H, W), got shape {mask.shape}")
            if mask.shape[1:] != image.shape[1:3]:
                raise ValueError(
                    f"the mask is {'x'.join(map(str, mask.shape[::-1][:2]))} but the image is "
                    f"{width}x{height}: give a mask of the image's size"
                )
        settings = self._prepare(
            text,
            n_images,
            negative_text,
            num_steps,
            cfg_weight,
            sampler,
            seed,
            width,
            height,
            strength,
            clip_skip,
        )
        chosen_sampler = make_sampler(settings.sampler, self.components.scheduler_config)
        batch = len(settings.prompts)
        if image.shape[0] not in (1, batch):
            raise ValueError(f"give one image or one per generated image ({batch})")
        if mask is not None and mask.shape[0] not in (1, batch):
            raise ValueError(f"give one mask or one per generated image ({batch})")
        if mask is not None and masked_content == "fill":
            n = max(image.shape[0], mask.shape[0])
            images, masks = np.array(image), np.array(mask)
            filled = [fill(images[i % len(images)], masks[i % len(masks)]) for i in range(n)]
            image = mx.array(np.stack(filled))
        x0 = self.encode_image(image)
        inpainting_input = None if mask is None else (image, mask, masked_content)
        return self._img2img(
            x0, settings, noise, original_size, crop, chosen_sampler, None, inpainting_input
        )

    def generate_latents_from_latents(
        self,
        latents: mx.array,
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
        clip_skip: int = 1,
    ) -> Denoising:
        """img2img from latents (NHWC, as `generate_latents` yields them, e.g. upscaled by
        `upscale_latents`): the image is (h * 8) x (w * 8). Arguments as in
        `generate_latents_from_image`."""
        downscale = self.vae.downscale
        settings = self._prepare(
            text,
            n_images,
            negative_text,
            num_steps,
            cfg_weight,
            sampler,
            seed,
            latents.shape[2] * downscale,
            latents.shape[1] * downscale,
            strength,
            clip_skip,
        )
        chosen_sampler = make_sampler(settings.sampler, self.components.scheduler_config)
        if latents.shape[0] not in (1, len(settings.prompts)):
            raise ValueError(
                f"give one latent or one per generated image ({len(settings.prompts)})"
            )
        return self._img2img(latents, settings, noise, original_size, crop, chosen_sampler)

    def _img2img(
        self,
        x0: mx.array,
        settings: GenerationSettings,
        noise: mx.array | None,
        original_size: tuple[int, int] | None,
        crop: tuple[int, int],
        chosen_sampler: Sampler,
        conditioning: Conditioning | None = None,
        inpainting_input: tuple[mx.array, mx.array, str] | None = None,
    ) -> Denoising:
        """Noise the latents `x0` to the settings' strength and denoise them (`conditioning`:
        already computed, for the hires fix's second pass; `inpainting_input`: the image,
        mask and masked content that `x0` was encoded from, when inpainting)."""
        batch = len(settings.prompts)
        x0 = mx.broadcast_to(x0, (batch, *x0.shape[1:]))
        if settings.strength == 0:
            return Denoising(iter([x0]), 1, settings)
        noise_source = ImageNoise(image_seeds(settings.seed, batch))
        initial = noise_source.draw(x0.shape[1:])
        noise = (initial if noise is None else noise).astype(mx.float32)
        if noise.shape != x0.shape:
            raise ValueError(f"the noise has shape {noise.shape}, expected {x0.shape}")
        if conditioning is None:
            conditioning = self._conditioning(settings, original_size, crop)
        run = chosen_sampler.start(settings.steps, strength=settings.strength)
        inpainting = None
        if inpainting_input is None:
            x = run.noised_latents(x0, noise)
        else:
            image, mask, masked_content = inpainting_input
            inpainting, x0 = self._inpainting(image, mask, x0, noise, masked_content, batch)
            # diffusers' inpainting pipelines start from pure noise at strength 1.
            if settings.strength == 1:
                x = run.initial_latents(noise)
            else:
                x = run.noised_latents(x0, noise)
        steps = self._denoise(x, run, conditioning, settings, noise_source, inpainting)
        return Denoising(steps, len(run.timesteps), settings, conditioning)

    @property
    def is_inpainting(self) -> bool:
        """Whether the UNet is an inpainting one: it takes the mask and the masked image's
        latents with the latents (9 input channels)."""
        return self.unet is not None and self.unet.config.in_channels != (
            self.vae.config.latent_channels
        )

    def _inpainting(
        self,
        image: mx.array,
        mask: mx.array,
        x0: mx.array,
        noise: mx.array,
        masked_content: str,
        batch: int,
    ) -> tuple[Inpainting, mx.array]:
        """The mask's latent-sized form and what the UNet or the steps need of the image,
        as diffusers prepares them; and the image's latents with the masked content."""
        binary = (mask >= 0.5).astype(mx.float32)
        scale = self.vae.downscale
        latent_mask = mx.broadcast_to(binary[:, ::scale, ::scale, None], (batch, *x0.shape[1:3], 1))
        if masked_content == "latent noise":  # A1111 fills with the seeds' own noise
            x0 = x0 * (1 - latent_mask) + noise * latent_mask
        elif masked_content == "latent nothing":
            x0 = x0 * (1 - latent_mask)
        if not self.is_inpainting:
            return Inpainting(latent_mask, x0=x0, noise=noise), x0
        # diffusers: the image in [-1, 1] times (mask < 0.5), so 0 (gray) where masked.
        masked = self._encode((2 * image - 1) * (1 - binary[..., None]))
        masked = mx.broadcast_to(masked, (batch, *masked.shape[1:]))
        return Inpainting(latent_mask, masked_latents=masked), x0

    # -- hires fix --------------------------------------------------------------------

    def generate_latents_hires(
        self,
        text: str | list[str],
        hires: HiresFix,
        n_images: int = 1,
        num_steps: int | None = None,
        cfg_weight: float | None = None,
        negative_text: str | list[str] | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        sampler: str | None = None,
        latents: mx.array | None = None,
        noise: mx.array | None = None,
        clip_skip: int = 1,
    ) -> Denoising:
        """txt2img with A1111's hires fix: `generate_latents` at width x height, the latents
        upscaled by `upscale_latents`, then img2img at `hires.strength` over `hires.steps`
        steps (0: `num_steps`) with the same prompts, and image i's noise drawn again from
        seed + i at the new size (`noise` gives it, as `latents` gives the first pass's).
        Yields every step of both passes; the settings record `hires`."""
        first = self.generate_latents(
            text,
            n_images,
            num_steps,
            cfg_weight,
            negative_text,
            seed,
            width,
            height,
            sampler,
            latents,
            clip_skip=clip_skip,
        )
        settings = first.settings
        check_arguments(
            n_images=n_images,
            hires_scale=hires.scale,
            hires_resize=hires.resize,
            hires_steps=hires.steps,
            hires_strength=hires.strength,
            width=settings.width,
            height=settings.height,
            multiple=self.vae.downscale,
        )
        upscaler = upscale.upscaler_name(hires.upscaler)
        upscaled, (final_width, final_height) = hires.sizes(settings.width, settings.height)
        second = dataclasses.replace(
            settings,
            steps=hires.steps or settings.steps,
            width=final_width,
            height=final_height,
            strength=hires.strength,
        )
        self._check_size(second)
        conditioning = first._conditioning
        if conditioning is not None and conditioning.time_ids is not None:
            # SDXL's size conditioning is the second pass's size, as in A1111.
            size = [second.height, second.width]
            time_ids = mx.array([*size, 0, 0, *size], dtype=mx.float32)
            time_ids = mx.broadcast_to(time_ids, conditioning.time_ids.shape)
            conditioning = dataclasses.replace(conditioning, time_ids=time_ids)
        chosen_sampler = make_sampler(second.sampler, self.components.scheduler_config)
        second_steps = 1
        if second.strength:
            second_steps = len(
                chosen_sampler.start(second.steps, strength=second.strength).timesteps
            )

        def both_passes() -> Iterator[mx.array]:
            for x in first:
                yield x
            x = self.upscale_latents(x, *upscaled, upscaler, crop_to=(final_width, final_height))
            yield from self._img2img(x, second, noise, None, (0, 0), chosen_sampler, conditioning)

        hires = dataclasses.replace(hires, upscaler=upscaler)
        settings = dataclasses.replace(settings, hires=hires, strength=None)
        return Denoising(both_passes(), len(first) + second_steps, settings, first._conditioning)

    def upscale_latents(
        self,
        latents: mx.array,
        width: int,
        height: int,
        upscaler: str = "Latent",
        crop_to: tuple[int, int] | None = None,
    ) -> mx.array:
        """Latents (NHWC) upscaled to those of a width x height image, then center-cropped to
        those of `crop_to` (width, height) as A1111 crops for `Hires resize`. `upscaler` is
        an A1111 name (upscale.UPSCALERS) or its simple spelling: a "Latent" mode resizes
        the latents; "Lanczos" decodes them (tiled where the VAE would not fit), resizes
        the image and encodes it again."""
        upscaler = upscale.upscaler_name(upscaler)
        downscale = self.vae.downscale
        if upscale.is_latent(upscaler):
            x = upscale.resize_latents(latents, height // downscale, width // downscale, upscaler)
        else:
            images = np.array(self.decode(latents))
            x = self.encode_image(mx.array(upscale.lanczos(images, height, width)))
        if crop_to is None:
            return x
        # A1111's truncate_x/y, in latents.
        cut_x = (width - crop_to[0]) // downscale
        cut_y = (height - crop_to[1]) // downscale
        return x[
            :,
            cut_y // 2 : x.shape[1] - (cut_y + 1) // 2,
            cut_x // 2 : x.shape[2] - (cut_x + 1) // 2,
        ]

    # -- VAE --------------------------------------------------------------------------

    def _check_size(self, settings: GenerationSettings) -> None:
        """Refuse sizes whose UNet activations alone would not fit in this machine's
        memory, before anything is computed (the VAE is tiled where it would not fit)."""
        width, height = settings.width, settings.height
        batch = len(settings.prompts) * (2 if settings.uses_cfg else 1)
        itemsize = cpu.compute_dtype(self.dtype).size
        needed = unet_activation_bytes(
            self.unet.config, self.vae.downscale, width, height, batch, itemsize
        )
        available = memory_size()
        if needed > available:
            raise ValueError(
                f"{width}x{height} with {batch} image(s) per UNet call needs about "
                f"{needed / 2**30:.1f} GiB for the UNet's activations alone; this machine has "
                f"{available / 2**30:.0f} GiB. Use a smaller size (the model's native size is "
                f"{self.defaults.width}x{self.defaults.height}) or fewer images."
            )

    def _vae_tiles(self, images_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (pixels, latents) sides of the VAE's tiles for images of this (NHWC) shape,
        or None for no tiling: tiled when asked for, or when the untiled decoder's
        activations for the batch would take over half the memory (the rest holds the
        weights and the system)."""
        batch, height, width = images_shape[:3]
        itemsize = cpu.compute_dtype(self.vae_dtype).size
        needed = batch * vae_decode_bytes(self.vae.config, width, height, itemsize)
        if self.tiled_vae or needed > memory_size() // 2:
            # diffusers: tile_sample_min_size, tile_latent_min_size.
            size = self.vae_tile_size or self.vae.config.sample_size
            return size, size // self.vae.downscale
        return None

    def encode_image(self, image: mx.array) -> mx.array:
        """(N, H, W, 3) images in [0, 1] -> scaled latents (posterior mean)."""
        return self._encode(2 * image - 1)

    def _encode(self, images: mx.array) -> mx.array:
        """(N, H, W, 3) images in [-1, 1] -> scaled latents (posterior mean)."""
        vae_config = self.vae.config

        def posterior_mean(images: mx.array) -> mx.array:
            return self.vae.encode(images)[0]

        images = images.astype(cpu.compute_dtype(self.vae_dtype))
        tiles = self._vae_tiles(images.shape)
        # The posterior mean is a slice of the moments diffusers blends: blending it alone
        # is the same.
        mean = tiling.tiled(posterior_mean, images, *tiles) if tiles else posterior_mean(images)
        shift = vae_config.shift_factor or 0.0
        return (mean.astype(mx.float32) - shift) * vae_config.scaling_factor

    def decode(self, latents: mx.array) -> mx.array:
        """Latents -> (N, H, W, 3) images in [0, 1], computed, by the tiny autoencoder if
        chosen. Raises NonFiniteError, naming the likely cause, for latents or images with
        NaN or infinite values."""
        self._check_finite(latents, "the denoised latents")
        if self.tiny_autoencoder is not None:
            tiny = self.tiny_autoencoder
            latents = latents / tiny.config.scaling_factor
            images = tiny.decode(latents.astype(cpu.compute_dtype(self.dtype)))
        else:
            images = self._decode_by_vae(latents)
        self._check_finite(images, "the decoded images")
        return mx.clip(images.astype(mx.float32) / 2 + 0.5, 0, 1)

    def _decode_by_vae(self, latents: mx.array) -> mx.array:
        vae_config = self.vae.config
        latents = latents / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)
        latents = latents.astype(cpu.compute_dtype(self.vae_dtype))
        batch, height, width = latents.shape[:3]
        downscale = self.vae.downscale
        tiles = self._vae_tiles((batch, height * downscale, width * downscale))
        if tiles:
            return tiling.tiled(self.vae.decode, latents, tiles[1], tiles[0])
        return self.vae.decode(latents)

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

    def _check_finite(self, x: mx.array, what: str) -> None:
        # One reduction over an array that is computed anyway (measured against a UNet
        # step in tests/test_errors.py: negligible).
        if mx.isfinite(x).all().item():
            return
        causes = []
        if self.dtype == mx.float16 or self.vae_dtype == mx.float16:
            causes.append(
                "float16 overflowing (load the model in float32: float16=False, "
                "--no-float16 in the scripts)"
            )
        causes += [
            "a CFG weight far too large (try 1 to 15)",
            "weights with NaN or infinite values (a damaged or badly converted model file)",
        ]
        raise NonFiniteError(
            f"{what} hold NaN or infinite values, which would make a black or noise image. "
            f"Likely causes: {'; '.join(causes)}."
        )
