"""Write small real weight files with PyTorch, for tests/test_weight_files.py.

    python -m tests.reference.checkpoint_files

Writes to tests/fixtures/checkpoint_files/:

- sd_like.ckpt: shaped like an SD 1.x training checkpoint: weights of every storage dtype in an
  OrderedDict under "state_dict", next to Lightning bookkeeping (the ModelCheckpoint class as a
  dict key and an instance of it, numpy scalars, optimizer state) that must be skipped;
- views.pt: a flat state dict of views sharing one storage (transposed, sliced, offset, tied,
  broadcast), an nn.Parameter and a half-precision slice;
- nested.pt: weights under "model" in nested dicts, flattened to dotted names;
- big_endian.pt: a checkpoint as a big-endian machine writes it (byteorder "big");
- weights.safetensors: written by the safetensors package;
- legacy.pt: the pre-1.6 non-zip format, which is refused;
- <file>.npz: the expected arrays of each loadable file (bfloat16 as its float32 values);
- expected.json: per loadable file, the expected name -> MLX dtype.

Lightning is not needed: a stand-in class is registered under Lightning's module name, which is
all the pickle records.
"""

from __future__ import annotations

import json
import pickle
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_files"

# torch dtype -> (MLX dtype name the loader returns, numpy dtype of the expected values)
DTYPES = {
    torch.float32: ("float32", np.float32),
    torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.float32),
    torch.float64: ("float32", np.float32),  # the loader narrows float64: MLX's GPU lacks it
    torch.int64: ("int64", np.int64),
    torch.int32: ("int32", np.int32),
    torch.int16: ("int16", np.int16),
    torch.int8: ("int8", np.int8),
    torch.uint8: ("uint8", np.uint8),
    torch.bool: ("bool", np.bool_),
}


def every_dtype(generator: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return OrderedDict(
        [
            ("model.diffusion_model.out.weight", randn(4, 3)),
            ("model.diffusion_model.out.bias", randn(4).half()),
            ("first_stage_model.decoder.conv.weight", randn(2, 3, 2, 2).bfloat16()),
            ("cond_stage_model.transformer.position_ids", torch.arange(7).unsqueeze(0)),
            ("betas", randn(5).double()),
            ("int32", torch.tensor([-(2**31), 2**31 - 1, 7], dtype=torch.int32)),
            ("int16", torch.tensor([-3, 300], dtype=torch.int16)),
            ("int8", torch.tensor([[-128], [127]], dtype=torch.int8)),
            ("uint8", torch.tensor([0, 255], dtype=torch.uint8)),
            ("mask", torch.tensor([True, False, True])),
            ("scalar", torch.tensor(0.5)),
            ("empty", torch.zeros(0, 3)),
            ("bf16_specials", torch.tensor([float("inf"), -0.0, 1e-40, 3e38]).bfloat16()),
        ]
    )


def fake_lightning_model_checkpoint() -> type:
    """A class that pickles exactly as pytorch_lightning's ModelCheckpoint does."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    names.append("pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    module = sys.modules[names[-1]]
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = model_checkpoint
    return model_checkpoint


def sd_like(generator: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    weights = every_dtype(generator)
    model_checkpoint = fake_lightning_model_checkpoint()
    callback = model_checkpoint()
    callback.best_model_score = torch.tensor(0.25)
    callback.monitor = None
    checkpoint = {
        "epoch": 6,
        "global_step": 1000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": weights,
        "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.5), "kth": np.int64(3)}},
        "callback_instance": callback,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}],
        "lr_schedulers": [],
    }
    return checkpoint, dict(weights)


def views() -> tuple[dict, dict[str, torch.Tensor]]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    half = torch.linspace(-2, 2, 10).half()
    checkpoint = {
        "base": base,
        "transposed": base.t(),
        "block": base[1:3, ::2],
        "row": base[2],
        "tied": base,
        "broadcast": base[0, :3].expand(2, 3),
        "half_tail": half[4:],
        "param": torch.nn.Parameter(torch.tensor([1.5, -2.5])),
    }
    return checkpoint, checkpoint


def nested(generator: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    token, layer = torch.randn(1, 8, generator=generator), torch.randn(2, 2, generator=generator)
    checkpoint = {
        "model": {"string_to_param": {"*": token}, "name": "cat-toy", "layer": {"weight": layer}},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}},
    }
    return checkpoint, {"string_to_param.*": token, "layer.weight": layer}


def to_big_endian(source: Path, target: Path) -> None:
    """Rewrite a torch.save archive the way a big-endian machine writes it."""
    with zipfile.ZipFile(source) as archive:
        prefix = next(n for n in archive.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        itemsizes: dict[str, int] = {}

        class StorageSizes(pickle.Unpickler):  # our own trusted file: plain unpickling is fine
            def persistent_load(self, pid: tuple) -> torch.TypedStorage:
                _, storage_type, key, _location, numel = pid
                itemsizes[key] = storage_type.dtype.itemsize
                return storage_type(numel)

        with warnings.catch_warnings(action="ignore", category=UserWarning):  # TypedStorage
            StorageSizes(archive.open(prefix + "data.pkl")).load()
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
            for info in archive.infolist():
                data = archive.read(info)
                key = info.filename.removeprefix(prefix + "data/")
                if info.filename == prefix + "byteorder":
                    data = b"big"
                elif key in itemsizes and itemsizes[key] > 1:
                    data = np.frombuffer(data, f"<u{itemsizes[key]}").byteswap().tobytes()
                out.writestr(info.filename, data)


def expected(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, dtypes = {}, {}
    for name, tensor in tensors.items():
        mlx_dtype, numpy_dtype = DTYPES[tensor.dtype]
        values = tensor.detach()
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16
            values = values.float()
        arrays[name] = values.numpy().astype(numpy_dtype)
        dtypes[name] = mlx_dtype
    return arrays, dtypes


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    files: dict[str, dict[str, torch.Tensor]] = {}

    for name, (checkpoint, tensors) in {
        "sd_like.ckpt": sd_like(generator),
        "views.pt": views(),
        "nested.pt": nested(generator),
    }.items():
        torch.save(checkpoint, OUT / name)
        files[name] = tensors

    small = {k: v for k, v in every_dtype(generator).items() if k in ("betas", "int32", "mask")}
    small["bf16"] = torch.tensor([1.5, -3.0, 1e30]).bfloat16()
    torch.save(small, OUT / "little_endian.tmp")
    to_big_endian(OUT / "little_endian.tmp", OUT / "big_endian.pt")
    (OUT / "little_endian.tmp").unlink()
    assert all(torch.equal(torch.load(OUT / "big_endian.pt")[k], v) for k, v in small.items())
    files["big_endian.pt"] = small

    safetensors = dict(every_dtype(generator))
    del safetensors["betas"]  # mx.load cannot read F64
    save_file(safetensors, OUT / "weights.safetensors", metadata={"format": "pt"})
    files["weights.safetensors"] = safetensors

    torch.save({"w": torch.ones(2)}, OUT / "legacy.pt", _use_new_zipfile_serialization=False)

    all_dtypes = {}
    for name, tensors in files.items():
        arrays, all_dtypes[name] = expected(tensors)
        np.savez(OUT / f"{name}.npz", **arrays)
    (OUT / "expected.json").write_text(json.dumps(all_dtypes, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
