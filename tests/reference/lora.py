"""Random LoRAs for the tiny models, and what diffusers computes with them fused in.

Files, in tests/fixtures/lora/:

* kohya/civitai format (`lora_unet_*`, `lora_te*_*`, `.lora_down/.lora_up/.alpha`), with
  alpha != rank, layers without alpha, conv layers (LoCon: a 3x3 down convolution and a 1x1
  up one, SD 1.x's 1x1-conv proj_in), text encoder layers; SD 1.x/2.x name the diffusers
  modules, SDXL the original SGM ones (`input_blocks_4_1_...`) and both text encoders;
* diffusers/PEFT format saved by diffusers' `save_lora_weights` from PEFT adapters, with
  lora_alpha != r in the safetensors metadata.

Reference: diffusers `load_lora_weights` + `fuse_lora(lora_scale=strength)` (two LoRAs at
once through adapters), then the UNet and text encoder outputs on the inputs of
tests/fixtures/reference/<model>.npz. Each case also checks that diffusers changed exactly
the weights the LoRA targets, so that a layer diffusers silently skipped cannot pass.

Run from the repository root (needs requirements-dev.txt):

    python -m tests.reference.lora
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from tests.reference.inputs import MODELS, REFERENCE

OUT = MODELS.parent / "lora"

# (kohya name without the lora_unet_/lora_te_ prefix, diffusers module) per model.
SD_UNET_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.1.proj_out",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.0.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "time_embedding.linear_1",
    "conv_in",
]
SD_TEXT_LAYERS = [
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.k_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "text_model.encoder.layers.2.self_attn.out_proj",
    "text_model.encoder.layers.0.mlp.fc1",
    "text_model.encoder.layers.2.mlp.fc2",
]
# SDXL LoRAs from kohya's scripts name the SGM modules: (SGM name, diffusers module).
SDXL_UNET_LAYERS = [
    (
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    (
        "input_blocks_4_1_transformer_blocks_1_attn2_to_out_0",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
    ),
    ("input_blocks_5_1_proj_in", "down_blocks.1.attentions.1.proj_in"),
    (
        "input_blocks_8_1_transformer_blocks_2_ff_net_0_proj",
        "down_blocks.2.attentions.1.transformer_blocks.2.ff.net.0.proj",
    ),
    (
        "middle_block_1_transformer_blocks_0_attn1_to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    ),
    (
        "output_blocks_0_1_transformer_blocks_2_attn2_to_k",
        "up_blocks.0.attentions.0.transformer_blocks.2.attn2.to_k",
    ),
    ("output_blocks_4_1_proj_out", "up_blocks.1.attentions.1.proj_out"),
    ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("middle_block_0_emb_layers_1", "mid_block.resnets.0.time_emb_proj"),
    ("output_blocks_7_0_out_layers_3", "up_blocks.2.resnets.1.conv2"),
    ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
    ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("time_embed_0", "time_embedding.linear_1"),
    ("label_emb_0_2", "add_embedding.linear_2"),
]
PEFT_UNET_TARGETS = {
    "tiny-sd1": ["to_q", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
    "tiny-sdxl": ["to_k", "proj_out", "time_emb_proj"],
}
PEFT_TEXT_TARGETS = ["q_proj", "k_proj", "out_proj", "fc1"]


def pipeline_class(model: str):
    return StableDiffusionXLPipeline if model == "tiny-sdxl" else StableDiffusionPipeline


def load(model: str):
    return pipeline_class(model).from_pretrained(MODELS / model, torch_dtype=torch.float32)


def modules(pipe, component: str) -> dict[str, torch.nn.Module]:
    """Linear and conv modules by path, with the `text_model.` level that transformers 5
    flattens out of CLIPTextModel put back (as LoRA files name them)."""
    model = getattr(pipe, component)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            if component.startswith("text_encoder") and not name.startswith("text_"):
                name = "text_model." + name
            found[name] = module
    return found


def low_rank_pair(module: torch.nn.Module, rank: int, generator) -> tuple[torch.Tensor, ...]:
    """down, up: a matrix pair for a linear layer; for a conv, a down conv with the layer's
    kernel and a 1x1 up conv (kohya's LoCon)."""
    weight = module.weight
    out, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn((rank, cin, *kernel), generator=generator) * 0.3
    up = torch.randn((out, rank, *((1, 1) if kernel else ())), generator=generator) * 0.3
    return down, up


def kohya_lora(pipe, layers, alpha, generator, dtype=torch.float32) -> tuple[dict, set[str]]:
    """`layers`: (component, name in the file, diffusers module). Ranks cycle through 2..4,
    all with the same `alpha`, as kohya's scripts write them. diffusers 0.42 gets other
    alphas wrong: it gives layers without one the file's first alpha instead of their rank,
    and loses per-layer alphas of attention layers (their alpha keys do not match its
    renamed attention-processor keys), so the fixtures do not use them; tests/test_lora.py
    checks those cases on their own."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    if not isinstance(pipe, StableDiffusionXLPipeline):
        prefixes["text_encoder"] = "lora_te_"
    state, targets = {}, set()
    for i, (component, name, module_path) in enumerate(layers):
        module = modules(pipe, component)[module_path]
        rank = 2 + i % 3
        down, up = low_rank_pair(module, rank, generator)
        key = prefixes[component] + name
        state[f"{key}.lora_down.weight"] = down.to(dtype)
        state[f"{key}.lora_up.weight"] = up.to(dtype)
        state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        targets.add(f"{component}.{module_path}")
    return state, targets


def sd_kohya_layers() -> list[tuple[str, str, str]]:
    flat = [("unet", p.replace(".", "_"), p) for p in SD_UNET_LAYERS]
    return flat + [("text_encoder", p.replace(".", "_"), p) for p in SD_TEXT_LAYERS]


def sdxl_kohya_layers() -> list[tuple[str, str, str]]:
    # diffusers 0.42 drops kohya SDXL text-encoder attention layers (it loads them as
    # unexpected keys), so the SDXL file has MLP layers there; SD 1.x/2.x cover attention.
    layers = [("unet", sgm, path) for sgm, path in SDXL_UNET_LAYERS]
    for component in ("text_encoder", "text_encoder_2"):
        layers += [(component, p.replace(".", "_"), p) for p in SD_TEXT_LAYERS if ".mlp." in p]
    return layers


def metadata(config: LoraConfig) -> dict:
    # Sets (target_modules) in a fixed order, and no local path.
    values = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return {**values, "base_model_name_or_path": None}


def rewrite_sorted(path: Path) -> None:
    """Write a safetensors file again with its header's keys sorted: the safetensors
    library writes metadata in hash order, which differs from run to run."""
    with safe_open(path, "np") as file:
        meta = file.metadata()
        tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
    header, offset, chunks = {"__metadata__": meta}, 0, []
    for key in sorted(tensors):
        data = np.ascontiguousarray(tensors[key]).tobytes()
        dtype = {np.float32: "F32", np.float16: "F16"}[tensors[key].dtype.type]
        entry = {"dtype": dtype, "shape": list(tensors[key].shape)}
        header[key] = {**entry, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        chunks.append(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(chunks))


def peft_lora(model: str, path: Path, generator, text_component: str) -> set[str]:
    """PEFT adapters (lora_alpha != r) on the UNet and one text encoder with random
    weights, saved by diffusers with their configs in the file's metadata."""
    pipe = load(model)
    unet_config = LoraConfig(r=3, lora_alpha=5, target_modules=PEFT_UNET_TARGETS[model])
    text_config = LoraConfig(r=2, lora_alpha=7, target_modules=PEFT_TEXT_TARGETS)
    pipe.unet.add_adapter(unet_config)
    getattr(pipe, text_component).add_adapter(text_config)
    targets = set()
    with torch.no_grad():
        for component in ("unet", text_component):
            for name, param in getattr(pipe, component).named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
                    module = name.split(".lora_")[0]
                    if component != "unet" and not module.startswith("text_"):
                        module = "text_model." + module
                    targets.add(f"{component}.{module}")
    layers = {
        "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
        "unet_lora_adapter_metadata": metadata(unet_config),
        f"{text_component}_lora_layers": get_peft_model_state_dict(getattr(pipe, text_component)),
        f"{text_component}_lora_adapter_metadata": metadata(text_config),
    }
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_class(model).save_lora_weights(tmp, **layers)
        shutil.copy(Path(tmp) / "pytorch_lora_weights.safetensors", path)
    rewrite_sorted(path)
    return targets


def outputs(pipe, model: str) -> dict[str, np.ndarray]:
    ref = np.load(REFERENCE / f"{model}.npz")
    kwargs = {}
    if model == "tiny-sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(ref["unet.text_embeds"]),
            "time_ids": torch.from_numpy(ref["unet.time_ids"]),
        }
    unet = pipe.unet(
        torch.from_numpy(ref["unet.latents"]),
        torch.from_numpy(ref["unet.timesteps"]),
        torch.from_numpy(ref["unet.context"]),
        **kwargs,
    ).sample
    out = {"unet": unet.numpy()}
    names = ["text_encoder", "text_encoder_2"] if model == "tiny-sdxl" else ["text_encoder"]
    for name in names:
        ids = torch.from_numpy(ref[f"{name}.input_ids"].astype(np.int64))
        out[name] = getattr(pipe, name)(ids).last_hidden_state.numpy()
    return out


def changed_weights(model: str, pipe) -> set[str]:
    base = load(model)
    changed = set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(base, component, None) is None:
            continue
        ours, theirs = modules(pipe, component), modules(base, component)
        changed |= {
            f"{component}.{name}"
            for name, module in theirs.items()
            if not torch.equal(ours[name].weight, module.weight)
        }
    return changed


def fused(model: str, loras: list[tuple[Path, float]]):
    """diffusers' pipeline with `loras` (path, strength) fused into its weights."""
    pipe = load(model)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[strength for _, strength in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return pipe


CASES = {
    # case: (model, [(lora file, strength)])
    "sd1_kohya_1.0": ("tiny-sd1", [("sd1_kohya", 1.0)]),
    "sd1_kohya_0.6": ("tiny-sd1", [("sd1_kohya", 0.6)]),
    "sd1_peft_0.8": ("tiny-sd1", [("sd1_peft", 0.8)]),
    "sd1_kohya_peft": ("tiny-sd1", [("sd1_kohya", 0.7), ("sd1_peft", -0.5)]),
    "sd2_kohya_1.0": ("tiny-sd2", [("sd2_kohya", 1.0)]),
    "sdxl_kohya_0.75": ("tiny-sdxl", [("sdxl_kohya", 0.75)]),
    "sdxl_peft_1.0": ("tiny-sdxl", [("sdxl_peft", 1.0)]),
}


def main() -> None:
    generator = torch.Generator().manual_seed(3)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    targets: dict[str, set[str]] = {}
    for name, model, layers, alpha, dtype in (
        ("sd1_kohya", "tiny-sd1", sd_kohya_layers(), 3, torch.float16),
        ("sd2_kohya", "tiny-sd2", sd_kohya_layers(), 1, torch.float32),
        ("sdxl_kohya", "tiny-sdxl", sdxl_kohya_layers(), 8, torch.float32),
    ):
        state, targets[name] = kohya_lora(load(model), layers, alpha, generator, dtype)
        save_file(state, OUT / f"{name}.safetensors")
    for name, model, text_component in (
        ("sd1_peft", "tiny-sd1", "text_encoder"),
        ("sdxl_peft", "tiny-sdxl", "text_encoder_2"),
    ):
        path = OUT / f"{name}.safetensors"
        targets[name] = peft_lora(model, path, generator, text_component)

    refs = {}
    with torch.no_grad():
        for case, (model, loras) in CASES.items():
            pipe = fused(model, [(OUT / f"{f}.safetensors", s) for f, s in loras])
            expected = set().union(*(targets[f] for f, _ in loras))
            changed = changed_weights(model, pipe)
            assert changed == expected, (case, changed ^ expected)
            for key, value in outputs(pipe, model).items():
                refs[f"{case}.{key}"] = value
            print(f"{case}: {len(changed)} layers fused")
    np.savez_compressed(OUT / "reference.npz", **refs)
    cases = {case: {"model": m, "loras": loras} for case, (m, loras) in CASES.items()}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
