"""Fuzz stable_diffusion.weights.files with damaged copies of the real fixture files.

Whatever the damage, loading must either succeed or raise WeightFileError: no other exception,
no crash inside MLX (results are evaluated, so lazily read data is read), no hang, and no code
run. Each test is bounded by max_examples; the whole file takes seconds.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
import zipfile
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stable_diffusion import limits
from stable_diffusion.weights.files import WeightFileError, load_weights
from tests.helpers import (
    FILES,
    FLOATS,
    Storage,
    nothing_runs,
    tensor,
    torch_pickle,
    warm_up,
    write_checkpoint,
)

pytestmark = pytest.mark.slow  # deselect with -m "not slow"; CI runs them

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,  # keep the repository free of .hypothesis/
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

SAFETENSORS = (FILES / "weights.safetensors").read_bytes()
CHECKPOINTS = [
    (FILES / name).read_bytes() for name in ("sd_like.ckpt", "views.pt", "big_endian.pt")
]

# Values that sit on the edges of the checks: sizes, offsets and counts read from the files.
EDGES = [
    struct.pack(fmt, value)
    for fmt in ("<Q", "<I", "<i", "<H")
    for value in (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF)
] + [struct.pack("<Q", v) for v in (2**31, 2**32 - 1, 2**63, 2**64 - 1)]


@pytest.fixture(scope="module", autouse=True)
def _warm_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    warm_up(tmp_path_factory.mktemp("warm_up"))


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """data with one to four byte flips, truncations, insertions, deletions or overwrites."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        if kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(EDGES)))
            data[at : at + (len(chunk) if kind == "overwrite" else 0)] = chunk
    return bytes(data)


def load_or_refuse(path: Path) -> None:
    with nothing_runs():
        try:
            weights = load_weights(path)
        except WeightFileError:
            return
        mx.eval(weights)


def safetensors_header(data: bytes) -> tuple[bytes, bytes]:
    size = int.from_bytes(data[:8], "little")
    return data[8 : 8 + size], data[8 + size :]


def repacked(checkpoint: bytes, record: str, change: bytes | None) -> bytes:
    """The checkpoint with one zip record replaced (None: dropped), checksums kept valid."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for name, data in records(checkpoint).items():
            data = data if name != record else change
            if data is not None:
                target.writestr(name, data)
    return buffer.getvalue()


def records(checkpoint: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(checkpoint)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def data_pkl(checkpoint: bytes) -> str:
    return next(name for name in records(checkpoint) if name.endswith("/data.pkl"))


ALL_RECORDS = [data for checkpoint in CHECKPOINTS for data in records(checkpoint).values()]


def each_checkpoint(then: Callable[[bytes], st.SearchStrategy]) -> st.SearchStrategy:
    """(checkpoint, what `then` draws for it), for each of the checkpoint fixtures."""
    return st.sampled_from(CHECKPOINTS).flatmap(lambda c: st.tuples(st.just(c), then(c)))


@FUZZ
@given(data=mutated(SAFETENSORS))
def test_damaged_safetensors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    load_or_refuse(path)


@FUZZ
@given(header=mutated(safetensors_header(SAFETENSORS)[0]))
def test_damaged_safetensors_header(tmp_path: Path, header: bytes) -> None:
    # The length prefix is kept right, so every damaged header reaches the JSON checks.
    path = tmp_path / "model.safetensors"
    data = safetensors_header(SAFETENSORS)[1]
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    load_or_refuse(path)


HEADER_VALUES = st.one_of(
    st.integers(-(2**65), 2**65),
    st.integers(-2, 64),
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(0, 8), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@FUZZ
@given(
    dtype=st.one_of(
        st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F64", "F8_E4M3"]), HEADER_VALUES
    ),
    shape=st.one_of(st.lists(st.integers(-1, 9), max_size=4), HEADER_VALUES),
    offsets=st.one_of(st.lists(st.integers(-1, 80), max_size=3), HEADER_VALUES),
    data_size=st.integers(0, 80),
)
def test_generated_safetensors_headers(
    tmp_path: Path, dtype: object, shape: object, offsets: object, data_size: int
) -> None:
    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(data_size)))
    load_or_refuse(path)


@FUZZ
@given(data=st.sampled_from(CHECKPOINTS).flatmap(mutated))
def test_damaged_checkpoint(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    load_or_refuse(path)


@FUZZ
@given(case=each_checkpoint(lambda checkpoint: mutated(records(checkpoint)[data_pkl(checkpoint)])))
def test_damaged_pickle(tmp_path: Path, case: tuple[bytes, bytes]) -> None:
    # Repacked with valid checksums, so every damaged pickle reaches the unpickler.
    checkpoint, pickled = case
    path = tmp_path / "model.ckpt"
    path.write_bytes(repacked(checkpoint, data_pkl(checkpoint), pickled))
    load_or_refuse(path)


@FUZZ
@given(
    case=each_checkpoint(lambda checkpoint: st.sampled_from(sorted(records(checkpoint)))),
    change=st.one_of(st.none(), st.binary(max_size=64), st.sampled_from(ALL_RECORDS)),
)
def test_damaged_record(tmp_path: Path, case: tuple[bytes, str], change: bytes | None) -> None:
    # One record dropped, or replaced by other bytes of another size (another record's, say).
    checkpoint, record = case
    path = tmp_path / "model.ckpt"
    path.write_bytes(repacked(checkpoint, record, change))
    load_or_refuse(path)


STORAGE_TYPES = {
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@st.composite
def tensor_records(draw: st.DrawFn) -> tuple[str, int, int, tuple, tuple, int]:
    ndim = draw(st.integers(0, 3))
    dims = st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim).map(tuple)
    strides = st.lists(st.integers(0, 8), min_size=ndim, max_size=ndim).map(tuple)
    storage_type = draw(st.sampled_from(sorted(STORAGE_TYPES)))
    numel, offset = draw(st.integers(0, 30)), draw(st.integers(0, 32))
    size_error = draw(st.sampled_from([0, 0, 0, -1, 1]))  # bytes missing from or added to data
    return storage_type, numel, size_error, draw(dims), draw(strides), offset


@FUZZ
@given(record=tensor_records())
def test_generated_tensor_records(tmp_path: Path, record: tuple) -> None:
    # Any size, stride and offset, within the storage or not: a view inside it loads exactly
    # what numpy's as_strided sees, anything else is refused.
    storage_type, numel, size_error, shape, stride, offset = record
    dtype = np.dtype(STORAGE_TYPES[storage_type])
    data = bytes(i * 37 % 256 for i in range(max(0, numel * dtype.itemsize + size_error)))
    if dtype == np.bool_:
        data = bytes(b & 1 for b in data)
    w = tensor(Storage("0", storage_type, numel), shape, stride, offset)
    path = write_checkpoint(tmp_path / "model.pt", torch_pickle({"w": w}), {"0": data})
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    inside = offset <= numel and (0 in shape or last < numel)
    right_size = len(data) == numel * dtype.itemsize
    try:
        with nothing_runs():
            loaded = load_weights(path)["w"]
    except WeightFileError:
        assert not (right_size and inside), "a valid tensor record was refused"
        return
    assert right_size and inside
    if storage_type == "BFloat16Storage":
        assert loaded.dtype == mx.bfloat16
        loaded = loaded.view(mx.uint16)
    expected = np.lib.stride_tricks.as_strided(
        np.frombuffer(data, dtype)[offset:], shape, [s * dtype.itemsize for s in stride]
    )
    np.testing.assert_array_equal(np.array(loaded), expected)


# --- shapes that describe huge work (issue 20), against budgets shrunk to fuzzing size --------

SMALL_BUDGETS = {
    "MAX_PICKLE_OBJECTS": 3_000,
    "MAX_PICKLE_CONTAINER_ITEMS": 2_000,
    "MAX_PICKLE_MEMO": 500,
    "MAX_PICKLE_NESTING": 20,
    "MAX_TUPLE_NODES": 1_000,
    "MAX_TENSOR_NESTING": 6,
    "MAX_TENSOR_NAME": 64,
}


@pytest.fixture
def small_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SMALL_BUDGETS.items():
        monkeypatch.setattr(limits, name, value)


# Opcode runs around each budget: below, at and above it.
HOSTILE_RUNS = st.one_of(
    st.integers(0, 3_100).map(lambda n: pickle.EMPTY_SET * n),
    st.integers(0, 600).map(lambda n: pickle.NONE + pickle.MEMOIZE * n),
    st.integers(0, 25).map(lambda n: pickle.MARK * n),
    st.integers(0, 25).map(lambda n: pickle.EMPTY_TUPLE + pickle.TUPLE1 * n),
    # t[i+1] = (t[i], t[i]): tuples whose size doubles with each level.
    st.integers(0, 14).map(
        lambda n: pickle.EMPTY_TUPLE + (pickle.MEMOIZE + pickle.DUP + pickle.TUPLE2) * n
    ),
    st.integers(0, 2_100).map(
        lambda n: pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * n + pickle.APPENDS
    ),
)


@FUZZ
@given(runs=st.lists(HOSTILE_RUNS, min_size=1, max_size=3))
def test_hostile_pickle_shapes(tmp_path: Path, small_budgets: None, runs: list[bytes]) -> None:
    # Everything after the first run's result is left on the stack: only STOP's object counts.
    path = write_checkpoint(tmp_path / "hostile.ckpt", b"\x80\x04" + b"".join(runs) + pickle.STOP)
    start = time.perf_counter()
    with pytest.raises(WeightFileError):  # no tensors in any of them
        load_weights(path)
    assert time.perf_counter() - start < 2


@FUZZ
@given(key_length=st.integers(1, 80), depth=st.integers(0, 12), fanout=st.integers(1, 3))
def test_nested_tensor_dicts(
    tmp_path: Path, small_budgets: None, key_length: int, depth: int, fanout: int
) -> None:
    # A tensor at the bottom of `depth` dicts whose keys share one memoized string.
    storage = Storage("0", "FloatStorage", 2)
    leaf = {"w": tensor(storage, (2,), (1,))}
    key = "k" * key_length
    for level in range(depth):
        leaf = {f"{key}{i}" if i else key: leaf for i in range(fanout)} | {"level": level}
    path = write_checkpoint(tmp_path / "nested.ckpt", torch_pickle({"top": leaf}), {"0": FLOATS})
    name = "top." + (key + ".") * depth + "w"  # the first, shortest path to the tensor
    # The root dict is level 1 and the tensor sits in level depth + 2.
    if len(name) <= limits.MAX_TENSOR_NAME and depth + 2 <= limits.MAX_TENSOR_NESTING:
        assert name in load_weights(path)
    else:
        with pytest.raises(WeightFileError, match="no tensors"):
            load_weights(path)


@FUZZ
@given(regions=st.lists(st.tuples(st.integers(0, 64), st.integers(0, 16)), min_size=1, max_size=6))
def test_overlapping_safetensors_regions(tmp_path: Path, regions: list[tuple[int, int]]) -> None:
    header = {
        f"t{i}": {"dtype": "U8", "shape": [size], "data_offsets": [begin, begin + size]}
        for i, (begin, size) in enumerate(regions)
    }
    data = json.dumps(header).encode()
    path = tmp_path / "regions.safetensors"
    path.write_bytes(struct.pack("<Q", len(data)) + data + bytes(80))
    spans = sorted((b, b + s) for b, s in regions if s)
    disjoint = all(end <= begin for (_, end), (begin, _) in pairwise(spans))
    if disjoint:
        assert len(load_weights(path)) == len(regions)
    else:
        with pytest.raises(WeightFileError, match="overlap"):
            load_weights(path)
