"""LoRA: low-rank weight updates, merged into the model weights.

Merging (W += strength * alpha / rank * up @ down, in float32, then cast back) costs nothing
at inference, unlike layers that add the low-rank product at every step. The weights a LoRA
replaces are kept, so that `unload` restores them exactly.

Two file formats are read, both only through `load_weights` (no code in a file ever runs):

* kohya / civitai: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha`,
  with the module path's dots written as underscores (`lora_te_` / `lora_te1_` / `lora_te2_`
  for the text encoders). SD 1.x/2.x LoRAs name the diffusers modules; SDXL LoRAs name the
  original SGM ones (`input_blocks_4_1_...`). Conv layers (LoCon): the down weight is a
  convolution of the layer's kernel size, the up weight a 1x1 convolution.
* diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`,
  `text_encoder_2.`), the older `.lora.down.weight` / `.lora.up.weight` and attention
  processor (`.processor.to_q_lora.down.weight`) spellings, with alphas in `<module>.alpha`
  keys or in the `lora_adapter_metadata` that diffusers writes into the safetensors header.

Without an alpha, alpha = rank (scale 1), as in kohya and diffusers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import limits
from .config import UNetConfig
from .weights import original
from .weights.files import load_weights

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# Old diffusers attention-processor LoRAs name the projection they wrap.
_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_PROCESSOR_KEY = re.compile(
    r"(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"
)
# LyCORIS and DoRA variants: a different update formula, not merged here.
_UNSUPPORTED_PARTS = ("hada_", "lokr_", "dora_scale", "lora_mid", "lora_magnitude_vector", ".diff")
_SGM_FLAT = re.compile(
    r"(input_blocks_\d+_\d+|output_blocks_\d+_\d+|middle_block_\d+|time_embed_\d+|"
    r"label_emb_0_\d+|out_\d+)(?:_(.+))?"
)
_SGM_RESNET_PART = re.compile(r"(in_layers|out_layers|emb_layers)_(\d+)")
_METADATA_KEY = "lora_adapter_metadata"
_MAX_ALPHA = 1e6


@dataclass
class LoraLayer:
    """One layer's low-rank update as stored in the file, not yet matched to the model.
    `name` is a module path with dots, or with underscores (kohya: `flat`)."""

    component: str
    name: str
    flat: bool
    down: mx.array | None = None
    up: mx.array | None = None
    alpha: float | None = None

    def pair(self) -> tuple[mx.array, mx.array]:
        """(down, up): both present in every layer `read_lora` returns."""
        if self.down is None or self.up is None:
            raise ValueError(f"LoRA layer {self.name} lacks its down or up weight")
        return self.down, self.up


def _examples(names: list[str], n: int = 3) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(sorted(names)[:n]) + more


def _scalar(path: Path, name: str, value: mx.array) -> float:
    if value.size != 1:
        raise ValueError(f"{path}: alpha {name} has shape {value.shape}, expected one number")
    return _checked_alpha(value.astype(mx.float32).item(), f"{path}: alpha {name}")


def _checked_alpha(alpha: object, what: str) -> float:
    # alpha / rank scales the update; real alphas are at most a few thousand, and anything
    # near float32's range would only overflow the merged weights.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{what} is {alpha!r}, not a number")
    if not (math.isfinite(alpha) and abs(alpha) <= _MAX_ALPHA):
        raise ValueError(f"{what} is {alpha}, outside [-{_MAX_ALPHA:g}, {_MAX_ALPHA:g}]")
    return float(alpha)


def _peft_metadata(path: Path) -> dict:
    """The PEFT configs diffusers writes into a safetensors header (the header was already
    checked by `load_weights`)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    with path.open("rb") as file:
        header = limits.parse_json(file.read(int.from_bytes(file.read(8), "little")), str(path))
    raw = (header.get("__metadata__") or {}).get(_METADATA_KEY)
    if raw is None:
        return {}
    metadata = limits.parse_json(raw, f"{path}: {_METADATA_KEY}")
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: {_METADATA_KEY} is not a JSON object")
    return metadata


def _parse_kohya(path: Path, weights: dict[str, mx.array]) -> list[LoraLayer]:
    layers: dict[str, LoraLayer] = {}
    for key, value in weights.items():
        name, _, suffix = key.partition(".")
        prefix = next((p for p in _KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None or suffix not in _KOHYA_SUFFIXES:
            raise ValueError(f"{path}: unexpected key {key!r} in a kohya-format LoRA")
        layer = layers.setdefault(
            name, LoraLayer(_KOHYA_PREFIXES[prefix], name[len(prefix) :], flat=True)
        )
        part = _KOHYA_SUFFIXES[suffix]
        if part == "alpha":
            layer.alpha = _scalar(path, name, value)
        else:
            setattr(layer, part, value)
    return list(layers.values())


def _split_component(key: str) -> tuple[str, str]:
    for component in COMPONENTS[::-1]:  # text_encoder_2 before text_encoder
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :]
    # PEFT's own save_pretrained prefix, and old UNet-only diffusers files without one.
    return "unet", key.removeprefix("base_model.model.")


def _alpha_from_metadata(metadata: dict, component: str, name: str) -> float | None:
    """PEFT's lora_alpha for one module: an `alpha_pattern` entry naming the module (or a
    suffix of its path), else the component's `lora_alpha`. PEFT reads the entries as
    regular expressions; here they are plain names, so a file cannot make matching hang."""
    if metadata.get(f"{component}.use_dora") or metadata.get(f"{component}.use_rslora"):
        raise ValueError("DoRA and rank-stabilized LoRAs (use_dora, use_rslora) are not supported")
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise ValueError("alpha_pattern is not an object")
    for pattern, alpha in patterns.items():
        if name == pattern or name.endswith("." + pattern):
            return _checked_alpha(alpha, f"alpha_pattern {pattern!r}")
    alpha = metadata.get(f"{component}.lora_alpha")
    return None if alpha is None else _checked_alpha(alpha, f"{component}.lora_alpha")


def _parse_peft(path: Path, weights: dict[str, mx.array], metadata: dict) -> list[LoraLayer]:
    layers: dict[tuple[str, str], LoraLayer] = {}
    for key, value in weights.items():
        component, rest = _split_component(key)
        if match := _PROCESSOR_KEY.fullmatch(rest):
            names = _PROCESSOR_NAMES["unet" if component == "unet" else "text_encoder"]
            name, part = f"{match[1]}.{names[match[2]]}", match[3]
        else:
            suffix = next((s for s in _PEFT_SUFFIXES if rest.endswith(s)), None)
            if suffix is None:
                raise ValueError(
                    f"{path}: unexpected key {key!r}; not a LoRA in the kohya or "
                    "diffusers/PEFT format"
                )
            name, part = rest[: -len(suffix)], _PEFT_SUFFIXES[suffix]
        layer = layers.setdefault((component, name), LoraLayer(component, name, flat=False))
        if part == "alpha":
            layer.alpha = _scalar(path, key, value)
        else:
            setattr(layer, part, value)
    for layer in layers.values():
        if layer.alpha is None and metadata:
            try:
                layer.alpha = _alpha_from_metadata(metadata, layer.component, layer.name)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: {_METADATA_KEY}: {e}") from None
    return list(layers.values())


def read_lora(path: str | os.PathLike[str]) -> list[LoraLayer]:
    """The layers of a LoRA file, checked for completeness. Their weights are not read yet
    (MLX loads them lazily): `AppliedLoras.merge` reads only those that match the model."""
    path = Path(path)
    weights = load_weights(path)
    unsupported = [k for k in weights if any(p in k for p in _UNSUPPORTED_PARTS)]
    if unsupported:
        raise ValueError(
            f"{path} uses LoRA variants that are not supported (LoHa/LoKr/DoRA/Tucker or full "
            f"weight diffs: {_examples(unsupported)}); only plain LoRA/LoCon can be merged"
        )
    if any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in weights):
        layers = _parse_kohya(path, weights)
    else:
        layers = _parse_peft(path, weights, _peft_metadata(path))
    for layer in layers:
        if layer.down is None or layer.up is None:
            missing = "down (lora_A)" if layer.down is None else "up (lora_B)"
            raise ValueError(f"{path}: LoRA layer {layer.name} has no {missing} weight")
    if not layers:
        raise ValueError(f"{path} contains no LoRA layers")
    return layers


def _check_finite(path: str | os.PathLike[str], layers: list[LoraLayer]) -> None:
    arrays = [a for layer in layers for a in layer.pair()]
    finite = mx.stack([mx.all(mx.isfinite(a.astype(mx.float32))) for a in arrays])
    if not mx.all(finite).item():
        raise ValueError(f"{path}: the LoRA weights contain NaN or infinite values")


# -- matching layers to the model ----------------------------------------------------------

_TARGETS = (nn.Linear, nn.QuantizedLinear, nn.Conv2d)


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, _TARGETS)}


def _sgm_to_dotted(flat: str) -> str | None:
    """A kohya SDXL name (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) with the SGM
    block part dotted, so that `original.unet_key` can map it; None if it is not one."""
    match = _SGM_FLAT.fullmatch(flat)
    if match is None:
        return None
    head = re.sub(r"_(\d+)", r".\1", match[1])
    rest = _SGM_RESNET_PART.sub(r"\1.\2", match[2]) if match[2] else None
    return f"{head}.{rest}" if rest else head


def _resolve(
    layer: LoraLayer, targets: dict[str, nn.Module], flat: dict[str, str], unet_config: UNetConfig
) -> str | None:
    """The model's module path that `layer` updates, or None."""
    if not layer.flat:
        for candidate in (layer.name, "text_model." + layer.name):
            if candidate in targets:
                return candidate
        return None
    if layer.name in flat:
        return flat[layer.name]
    if layer.component == "unet" and (dotted := _sgm_to_dotted(layer.name)):
        try:
            return flat.get(original.unet_key(dotted, unet_config).replace(".", "_"))
        except KeyError:
            return None
    return None


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The layer's weight shape in PyTorch's layout (out, in) / (out, in, kh, kw)."""
    if isinstance(module, nn.Conv2d):
        out, kh, kw, cin = module.weight.shape
        return (out, cin, kh, kw)
    if isinstance(module, nn.QuantizedLinear):
        return (module.weight.shape[0], module.weight.shape[1] * 32 // module.bits)
    return tuple(module.weight.shape)


def _delta(layer: LoraLayer, module: nn.Module, path: str) -> mx.array:
    """up @ down in float32, in the module's own weight layout; the scale is applied later."""
    down, up = (a.astype(mx.float32) for a in layer.pair())
    expected = _weight_shape(module)
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[2:] not in ((), (1, 1)):
        raise ValueError(
            f"LoRA layer {layer.name}: down {down.shape} and up {up.shape} are not a "
            "low-rank pair (2-D matrices, or a convolution and a 1x1 convolution)"
        )
    rank = down.shape[0]
    if rank == 0 or up.shape[1] != rank:
        raise ValueError(
            f"LoRA layer {layer.name}: down {down.shape} and up {up.shape} disagree on the rank"
        )
    # Checked before multiplying: a damaged file's shapes could ask for a huge product.
    shape = (up.shape[0], *down.shape[1:])
    # A 1x1 convolution is the same update as a matrix (SD 1.x's proj_in/proj_out).
    if len(shape) == 4 and len(expected) == 2 and shape[2:] == (1, 1):
        shape = shape[:2]
    elif len(shape) == 2 and len(expected) == 4 and expected[2:] == (1, 1):
        shape = (*shape, 1, 1)
    if shape != expected:
        raise ValueError(
            f"LoRA layer {layer.name} makes an update of shape {shape} for {path}, whose "
            f"weight is {expected}: the LoRA was made for another model (SD 1.x, SD 2.x and "
            "SDXL LoRAs do not mix)"
        )
    delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)
    return delta.transpose(0, 2, 3, 1) if delta.ndim == 4 else delta


def _weights_of(module: nn.Module) -> dict[str, mx.array]:
    return {k: module[k] for k in ("weight", "scales", "biases") if k in module}


def _merged(module: nn.Module, delta: mx.array) -> dict[str, mx.array]:
    if isinstance(module, nn.QuantizedLinear):
        # Dequantize, merge, and quantize again the same way nn.quantize does.
        weight = mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            module.group_size,
            module.bits,
            mode=module.mode,
        )
        merged = (weight.astype(mx.float32) + delta).astype(module.scales.dtype)
        return _quantized(module, merged)
    weight = module.weight
    return {"weight": (weight.astype(mx.float32) + delta).astype(weight.dtype)}


def _quantized(module: nn.QuantizedLinear, weight: mx.array) -> dict[str, mx.array]:
    w, scales, *biases = mx.quantize(weight, module.group_size, module.bits, mode=module.mode)
    return {"weight": w, "scales": scales, **({"biases": biases[0]} if biases else {})}


@dataclass
class AppliedLoras:
    """The LoRAs merged into a pipeline's models and the weights they replaced, by
    (component, module path)."""

    loaded: list[tuple[str, float]] = field(default_factory=list)
    originals: dict[tuple[str, str], dict[str, mx.array]] = field(default_factory=dict)

    def merge(
        self,
        path: str | os.PathLike[str],
        strength: float,
        models: dict[str, nn.Module | None],
        unet_config: UNetConfig,
    ) -> None:
        """Merge the LoRA at `path` with `strength` into `models` (keyed by COMPONENTS).
        Every layer is matched and checked before any weight changes."""
        if not math.isfinite(strength):
            raise ValueError(f"LoRA strength must be a finite number, got {strength}")
        layers = read_lora(path)
        targets = {name: _targets(m) for name, m in models.items() if m is not None}
        flat = {name: {p.replace(".", "_"): p for p in t} for name, t in targets.items()}
        unmatched, misfits, updates, matched = [], [], [], []
        for layer in layers:
            if layer.component not in targets:
                unmatched.append(f"{layer.name} ({layer.component}: not in this model)")
                continue
            module_path = _resolve(
                layer, targets[layer.component], flat[layer.component], unet_config
            )
            if module_path is None:
                unmatched.append(layer.name)
                continue
            module = targets[layer.component][module_path]
            try:
                delta = _delta(layer, module, module_path)
            except ValueError as e:
                misfits.append(str(e))
                continue
            rank = layer.pair()[0].shape[0]
            scale = strength * (rank if layer.alpha is None else layer.alpha) / rank
            updates.append((layer.component, module_path, module, delta * scale))
            matched.append(layer)
        problems = []
        if unmatched:
            problems.append(
                f"{len(unmatched)} of its {len(layers)} LoRA layers match no layer of this "
                f"model: {_examples(unmatched)}; is it a LoRA for another architecture "
                "(SD 1.x, SD 2.x or SDXL)?"
            )
        if misfits:
            more = f" (and {len(misfits) - 1} more layers)" if len(misfits) > 1 else ""
            problems.append(misfits[0] + more)
        if problems:
            raise ValueError(f"{path} cannot be merged into this model: {' '.join(problems)}")
        _check_finite(path, matched)
        merged = [_merged(module, delta) for _, _, module, delta in updates]
        finite = mx.stack([mx.all(mx.isfinite(a)) for w in merged for a in w.values()])
        if not mx.all(finite).item():
            raise ValueError(f"{path}: merging overflows the weights (values too large)")
        for (component, module_path, module, _), weights in zip(updates, merged, strict=True):
            self.originals.setdefault((component, module_path), _weights_of(module))
            module.update(weights)
        mx.eval(merged)
        self.loaded.append((str(path), float(strength)))

    def restore(self, models: dict[str, nn.Module | None]) -> None:
        """Put back the weights from before the first merge."""
        targets = {name: _targets(m) for name, m in models.items() if m is not None}
        for (component, module_path), weights in self.originals.items():
            if component in targets:
                targets[component][module_path].update(weights)
        self.originals.clear()
        self.loaded.clear()

    def quantized(self, models: dict[str, nn.Module | None]) -> None:
        """After the models were quantized: quantize the kept weights of layers that are
        now quantized too, so that `restore` gives exactly the model quantized without
        LoRAs."""
        targets = {name: _targets(m) for name, m in models.items() if m is not None}
        for (component, module_path), weights in self.originals.items():
            module = targets.get(component, {}).get(module_path)
            if isinstance(module, nn.QuantizedLinear) and "scales" not in weights:
                weights.update(_quantized(module, weights["weight"]))
