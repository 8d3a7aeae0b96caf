"""What several test modules share: the fixtures' paths, comparisons with the reference's
outputs, running the scripts as a user does, and building torch-like checkpoints (hostile
ones included) without PyTorch."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import requests

from stable_diffusion.cpu import onednn
from stable_diffusion.loading.folder import load_unet, load_vae
from stable_diffusion.weights.files import WeightFileError, load_weights

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"

# --- parity with the reference's outputs ----------------------------------------------------


def assert_close(ours: mx.array, reference: np.ndarray, rtol: float = 1e-4) -> None:
    ours = np.array(ours.astype(mx.float32))
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max()
    assert error <= rtol * np.abs(reference).max() + 1e-5, f"max abs error {error}"


def nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


def nchw(x: mx.array) -> np.ndarray:
    return np.array(x).transpose(0, 3, 1, 2)


def reference(model: str) -> dict[str, np.ndarray]:
    """The reference's outputs on a tiny model (tests/reference/tiny_models.py)."""
    return dict(np.load(FIXTURES / "reference" / f"{model}.npz"))


# --- the scripts, as a user runs them -------------------------------------------------------


MODELS = ["tiny-sd1", "tiny-sd2", "tiny-sdxl"]
# Whole images against the reference, max |ours - reference| in [0, 1] pixels.
PIXEL_TOLERANCE = 2e-4


def final(latents) -> mx.array:
    """The last of a generation's latents, every step computed."""
    for x in latents:
        mx.eval(x)
    return x


def assert_unet_matches(model: str, ref: dict[str, np.ndarray], unet=None) -> None:
    """The tiny model's UNet (`unet`, or loaded from its folder) against diffusers'."""
    unet = unet or load_unet(FIXTURES / "models" / model / "unet", mx.float32)
    extra = {}
    if model == "tiny-sdxl":
        extra = {
            "text_embeds": mx.array(ref["unet.text_embeds"]),
            "time_ids": mx.array(ref["unet.time_ids"]),
        }
    output = unet(
        nhwc(ref["unet.latents"]),
        mx.array(ref["unet.timesteps"]),
        mx.array(ref["unet.context"]),
        **extra,
    )
    assert_close(mx.array(nchw(output)), ref["unet.output"])


def assert_vae_matches(model: str, ref: dict[str, np.ndarray], vae=None) -> None:
    """The tiny model's VAE (`vae`, or loaded from its folder) against diffusers'."""
    vae = vae or load_vae(FIXTURES / "models" / model / "vae", mx.float32)
    mean, std = vae.encode(nhwc(ref["vae.images"]))
    assert_close(mx.array(nchw(mean)), ref["vae.encoded_mean"])
    assert_close(mx.array(nchw(std)), ref["vae.encoded_std"])
    decoded = vae.decode(nhwc(ref["unet.latents"]))
    assert_close(mx.array(nchw(decoded)), ref["vae.decoded"])


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


# --- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m stable_diffusion.server` on the tiny SD 1.x model and a free loopback
    port, its output logged in `tmp`."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}.log", "w+")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stable_diffusion.server",
                "--model",
                "tests/fixtures/models/tiny-sd1",
                "--port",
                str(self.port),
                *args,
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{self.url}/sdapi/v1/progress", timeout=2)
                return
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.output()
                    self.stop()
                    raise RuntimeError(f"the server did not start: {output}") from None
                time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def post(self, route: str, payload, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/sdapi/v1/{route}", json=payload, timeout=120, **kwargs)

    def progress(self) -> dict:
        return requests.get(f"{self.url}/sdapi/v1/progress", timeout=10).json()

    def wait_idle(self, timeout: float) -> float:
        start = time.monotonic()
        while self.progress()["state"]["job_count"]:
            assert time.monotonic() - start < timeout, "the server is still busy"
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)
        self.log.close()


FILES = FIXTURES / "checkpoint_files"
EXPECTED = json.loads((FILES / "expected.json").read_text())

# --- hostile weight files: watching for code execution ------------------------------------

# Audit events that loading a weight file must never raise: running commands or code, or
# importing anything (which would execute the imported module).
_FORBIDDEN_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "subprocess.Popen",
    "exec",
    "compile",
    "import",
    "ctypes",
)
_audit_log: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _audit_log is not None and event.startswith(_FORBIDDEN_EVENTS):
        _audit_log.append(event)


sys.addaudithook(_audit)  # hooks cannot be removed; this one is idle outside nothing_runs()


@contextmanager
def nothing_runs() -> Iterator[None]:
    """Fail if the block runs a command, evaluates code or imports a module."""
    global _audit_log
    _audit_log = log = []
    try:
        yield
    finally:
        _audit_log = None
    assert not log, f"loading ran code: {log}"


# --- building torch-like checkpoints without torch -------------------------------------------


class Callable:
    def __call__(self) -> None:  # pickle only writes REDUCE for callables; never called
        raise AssertionError


class Global(Callable):
    """A global name, written into the pickle as is: it need not exist or be importable."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call(Callable):
    """func(*args), evaluated at load time through a REDUCE opcode."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args


class Storage:
    """A storage record: the pickle names it; its bytes live in the archive."""

    def __init__(self, key: str, storage_type: str, numel: int) -> None:
        self.key, self.type, self.numel = key, storage_type, numel


class TorchLikePickler(pickle._Pickler):
    """Writes pickles the way torch.save does, from Global/Call/Storage stand-ins."""

    dispatch = dict(pickle._Pickler.dispatch)  # noqa: RUF012 (pickle's own convention)

    def save_global_name(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = save_global_name

    def reducer_override(self, obj: object) -> object:
        return (obj.func, obj.args) if isinstance(obj, Call) else NotImplemented

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, Storage):
            return ("storage", Global("torch", obj.type), obj.key, "cpu", obj.numel)
        return None


def raw_pickle(*opcodes: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + b"".join(opcodes) + pickle.STOP


def torch_pickle(obj: object, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def tensor(storage: Storage, shape: tuple, stride: tuple, offset: int = 0) -> Call:
    hooks = Call(Global("collections", "OrderedDict"))
    return Call(
        Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, shape, stride, False, hooks
    )


def write_checkpoint(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    byteorder: bytes = b"little",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


FLOATS = np.array([1.0, -2.0], dtype="<f4").tobytes()


def warm_up(tmp_dir: Path) -> None:
    """Load every fixture and every pickle protocol once: the first loads import what they need
    (text codecs, for one), which nothing_runs() would otherwise report."""
    for name in EXPECTED:
        mx.eval(load_weights(FILES / name))
    w = tensor(Storage("0", "FloatStorage", 2), (2,), (1,))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        # protocol 0 writes persistent ids as text, so no tensor: the load fails, after decoding
        data = torch_pickle({"text": "é", **({"w": w} if protocol else {})}, protocol)
        with suppress(WeightFileError):
            load_weights(write_checkpoint(tmp_dir / f"{protocol}.pt", data, {"0": FLOATS}))


def group_norm_float64(x, groups, weight, bias, eps, silu):
    x64 = np.asarray(x, np.float64)
    grouped = x64.reshape(x64.shape[0], -1, groups, x64.shape[-1] // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    variance = np.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
    y = ((grouped - mean) / np.sqrt(variance + eps)).reshape(x64.shape)
    y = y * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    return y / (1 + np.exp(-y)) if silu else y


def extreme_scores(length: int, dim: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1, length, dim) queries, keys and values with extreme scores. Keys alternate between a
    long one along axis 0 and short random ones. Queries along axis 0 score 900 / sqrt(dim)
    on the long keys (exp overflows without a shift); queries along axis 1 have the same
    bound but score near 0, which the bound's shift underflows: recomputed exactly."""
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, length, dim)).astype(np.float32)
    k[0, ::2] = 0
    k[0, ::2, 0] = 30
    q = np.zeros((1, length, dim), np.float32)
    q[0, ::2, 0] = 30
    q[0, 1::2, 1] = 30
    v = rng.standard_normal((1, length, dim)).astype(np.float32)
    return q, k, v


def recorded_recomputations(monkeypatch) -> list[int]:
    """A list that records how many rows each exact recomputation of the CPU attention
    (`kernels._exponentiate_exactly`) takes, from now until the test ends."""
    from stable_diffusion.cpu import kernels

    recomputed: list[int] = []
    exactly = kernels._exponentiate_exactly
    monkeypatch.setattr(
        kernels,
        "_exponentiate_exactly",
        lambda s, base: recomputed.append(s.size // s.shape[-1]) or exactly(s, base),
    )
    return recomputed


# CI installs requirements-bfloat16.txt: on its machines whose CPU has AVX512_BF16 or AMX
# these tests fail rather than skip when bfloat16 compute is unavailable; on others they
# cannot run (the refusal is tested everywhere).
needs_bfloat16 = pytest.mark.skipif(
    onednn.unavailable_reason() is not None
    and not (os.environ.get("CI") and onednn.cpu_has_bfloat16()),
    reason=str(onednn.unavailable_reason()),
)

# (kernel, stride, padding, dilation, image size) of the models' convolutions and others.
CONVOLUTIONS = [
    (1, 1, 0, 1, 8),  # the resnets' shortcuts
    (3, 1, 1, 1, 9),  # the resnets' convolutions
    (3, 2, 1, 1, 8),  # the UNets' downsamplers
    (3, 2, 1, 1, 9),
    (3, 2, 0, 1, 9),  # the VAE encoder's, after its own right/bottom padding
    (3, 2, 0, 1, 8),  # a stride that leaves a pixel over (negative right padding)
    (3, 1, 2, 2, 7),  # dilated
]


def convolve_float64(x: np.ndarray, weight: np.ndarray, stride: int, padding: int, dilation: int):
    """MLX's conv2d of NHWC `x` by an (out, kh, kw, in) weight in float64, tap by tap: the
    convolution as one matmul of the taps' pixels (batch * pixels, kh * kw * in) by the
    flattened weight, for the bounds of tests/cpu/test_bfloat16.py and test_onednn.py."""
    _, kernel_height, kernel_width, _ = weight.shape
    padded = np.pad(x.astype(np.float64), [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    height, width = (
        (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        for n, k in zip(x.shape[1:3], (kernel_height, kernel_width), strict=True)
    )
    taps = [
        padded[
            :,
            ky * dilation : ky * dilation + stride * (height - 1) + 1 : stride,
            kx * dilation : kx * dilation + stride * (width - 1) + 1 : stride,
        ]
        for ky in range(kernel_height)
        for kx in range(kernel_width)
    ]
    pixels = np.concatenate(taps, axis=-1).reshape(-1, kernel_height * kernel_width * x.shape[-1])
    return pixels, weight.reshape(weight.shape[0], -1), (x.shape[0], height, width, weight.shape[0])


def attention_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int):
    """Float64 attention of (B, L, heads * D) inputs and, per element, how far bfloat16's may
    lie from it. Each score of bfloat16-rounded queries and keys is off by at most
    d = 2.01u |q| |k| / sqrt(D) (Cauchy-Schwarz on test_bfloat16.py's bound); each
    power is rounded once more (u); so each softmax weight moves by a factor within
    (e^d (1 + u))^(+-2), and the output, a weighted mean of rounded values (u), by at most
    ((e^d (1 + u))^2 - 1 + u) max |v| of its column."""
    u = 2.0**-8
    batch, length, width = q.shape
    dim = width // heads

    def split(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64).reshape(batch, -1, heads, dim).transpose(0, 2, 1, 3)

    q64, k64, v64 = split(q), split(k), split(v)
    scores = q64 @ k64.transpose(0, 1, 3, 2) / np.sqrt(dim)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    exact = (weights / weights.sum(axis=-1, keepdims=True)) @ v64
    key_norm = np.linalg.norm(k64, axis=-1).max(axis=-1)[..., None, None]  # (B, H, 1, 1)
    drift = 2.01 * u * np.linalg.norm(q64, axis=-1, keepdims=True) * key_norm / np.sqrt(dim)
    bound = (np.exp(drift) * (1 + u)) ** 2 - 1 + u
    bound = bound * np.abs(v64).max(axis=2, keepdims=True) + 1e-6
    merge = lambda x: x.transpose(0, 2, 1, 3).reshape(batch, length, width)  # noqa: E731
    return merge(exact), merge(np.broadcast_to(bound, exact.shape))
