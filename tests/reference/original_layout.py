"""Write a diffusers-format pipeline folder in the original single-file layout (CompVis/LDM
for SD 1.x/2.x, SGM for SDXL), as A1111/ComfyUI/civitai checkpoints are.

This is the inverse of `stable_diffusion/weights/original.py`, written separately from it
and proven by `tests/reference/single_file.py`, which loads its output with diffusers' own
single-file loader and checks every parameter. It needs only NumPy and MLX (no PyTorch), so
the tests can write the same files on the fly instead of storing megabytes of fixtures;
`digest` lets them check that they wrote exactly the weights diffusers loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Keys of the original checkpoints that are not model weights; real files carry them.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod")


def read_folder(folder: Path, component: str) -> dict[str, np.ndarray]:
    (path,) = sorted((folder / component).glob("*.safetensors"))
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def _rename(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


_DOWN_BLOCK = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)")
_UP_BLOCK = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)")
_VAE_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)")


def unet_to_original(weights: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    layers = config["layers_per_block"]
    has_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in weights.items():
        parts = key.split(".")
        if match := _DOWN_BLOCK.fullmatch(key):
            block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            first = 1 + block * (layers + 1)
            if kind == "resnets":
                new = f"input_blocks.{first + index}.0.{_rename(rest, _RESNET_PARTS)}"
            elif kind == "attentions":
                new = f"input_blocks.{first + index}.1.{rest}"
            else:
                new = f"input_blocks.{first + layers}.0.op.{rest.removeprefix('conv.')}"
        elif match := _UP_BLOCK.fullmatch(key):
            block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            first = block * (layers + 1)
            if kind == "resnets":
                new = f"output_blocks.{first + index}.0.{_rename(rest, _RESNET_PARTS)}"
            elif kind == "attentions":
                new = f"output_blocks.{first + index}.1.{rest}"
            else:
                slot = 2 if has_attention[block] else 1
                new = f"output_blocks.{first + layers}.{slot}.{rest}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename(rest, _RESNET_PARTS)}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            new = _rename(key, _UNET_TOP_LEVEL)
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def vae_to_original(weights: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    n_blocks = len(config["block_out_channels"])
    out = {}
    for key, value in weights.items():
        coder, _, rest = key.partition(".")
        if match := _VAE_BLOCK.fullmatch(rest):
            direction, block, kind, index, tail = match.groups()
            level = int(block) if direction == "down" else n_blocks - 1 - int(block)
            if kind == "resnets":
                tail = tail.replace("conv_shortcut", "nin_shortcut")
                new = f"{direction}.{level}.block.{index}.{tail}"
            else:
                new = f"{direction}.{level}.{direction}sample.{tail}"
        elif rest.startswith("mid_block.resnets."):
            index, tail = rest.split(".", 3)[2:]
            new = f"mid.block_{int(index) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        elif rest.startswith("mid_block.attentions.0."):
            tail = rest.removeprefix("mid_block.attentions.0.")
            name, _, param = tail.rpartition(".")
            new = f"mid.attn_1.{_VAE_ATTENTION[name]}.{param}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest.removeprefix("conv_norm_out.")
        else:
            new = rest
        new = f"{coder}.{new}" if coder in ("encoder", "decoder") else key
        out["first_stage_model." + new] = value
    return out


def clip_to_original(weights: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """transformers' CLIPTextModel (saved without `text_model.` by transformers 5) under the
    prefix of SD 1.x / SDXL's first text encoder."""
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in weights.items()
    }


_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_original(
    weights: dict[str, np.ndarray], prefix: str, hidden_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """transformers' CLIPTextModel(WithProjection) as OpenCLIP's text tower: fused q/k/v
    input projection, `text_projection` as an `x @ P` matrix. Models without a projection
    (SD 2.x) get a random one, as real SD 2.x files have (unused there); `logit_scale` too."""
    weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    out = {}
    for key, value in weights.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[_OPEN_CLIP_TOP_LEVEL[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.copy()
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)", key):
            layer, rest = match[1], match[2]
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                continue  # fused below
            out[f"transformer.resblocks.{layer}.{_rename(rest, _OPEN_CLIP_LAYER)}"] = value
        else:
            raise KeyError(key)
    layers = {int(m[1]) for k in weights if (m := re.fullmatch(r"encoder\.layers\.(\d+)\..*", k))}
    for layer in sorted(layers):
        for kind in ("weight", "bias"):
            fused = [weights[f"encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = np.concatenate(fused)
    if "text_projection" not in out:
        out["text_projection"] = rng.standard_normal((hidden_size, hidden_size)).astype(np.float32)
    out["logit_scale"] = np.array(4.6052, dtype=np.float32)
    return {prefix + k: v for k, v in out.items()}


def folder_to_original(folder: Path, architecture: str) -> dict[str, np.ndarray]:
    """All weights of a diffusers folder of `architecture` ("sd1", "sd2" or "sdxl"),
    keyed as in a single file."""
    rng = np.random.default_rng(0)
    out = unet_to_original(read_folder(folder, "unet"), _config(folder, "unet"))
    out.update(vae_to_original(read_folder(folder, "vae"), _config(folder, "vae")))
    text_config = _config(folder, "text_encoder")
    text = read_folder(folder, "text_encoder")
    if architecture == "sdxl":
        out.update(clip_to_original(text, "conditioner.embedders.0.transformer."))
        hidden = _config(folder, "text_encoder_2")["hidden_size"]
        text_2 = read_folder(folder, "text_encoder_2")
        out.update(open_clip_to_original(text_2, "conditioner.embedders.1.model.", hidden, rng))
    elif architecture == "sd2":
        out.update(
            open_clip_to_original(text, "cond_stage_model.model.", text_config["hidden_size"], rng)
        )
    else:
        out.update(clip_to_original(text, "cond_stage_model.transformer."))
    for name in SCHEDULE_BUFFERS:
        out[name] = rng.uniform(0, 1, 1000).astype(np.float32)
    return out


def digest(weights: dict[str, np.ndarray]) -> str:
    """A hash of names, dtypes, shapes and values, independent of the file format."""
    h = hashlib.sha256()
    for key in sorted(weights):
        value = np.ascontiguousarray(weights[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def write_safetensors(weights: dict[str, np.ndarray], path: Path) -> None:
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in weights.items()})
