"""stable_diffusion.weights.files: loading weight files exactly, and refusing unsafe or broken ones.

The fixtures are real files written by PyTorch (tests/reference/checkpoint_files.py); the
hostile and damaged files are built here, without PyTorch.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from stable_diffusion.weights.files import WeightFileError, load_weights
from tests.helpers import (
    EXPECTED,
    FILES,
    FLOATS,
    Call,
    Global,
    Storage,
    nothing_runs,
    raw_pickle,
    tensor,
    torch_pickle,
    warm_up,
    write_checkpoint,
)


def fragment(obj: object) -> bytes:
    """The opcodes that push obj, to splice into a raw pickle."""
    return pickle.dumps(obj, protocol=2)[2:-1]


@pytest.fixture(scope="module", autouse=True)
def _warm_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    warm_up(tmp_path_factory.mktemp("warm_up"))


# --- real files load exactly -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_exactly_what_was_saved(name: str) -> None:
    weights = load_weights(FILES / name)
    expected = np.load(FILES / f"{name}.npz")
    assert sorted(weights) == sorted(EXPECTED[name])
    for key, dtype in EXPECTED[name].items():
        assert str(weights[key].dtype) == f"mlx.core.{dtype}", key
        # numpy has no bfloat16: compare its float32 values, which it converts to exactly
        array = weights[key].astype(mx.float32) if dtype == "bfloat16" else weights[key]
        np.testing.assert_array_equal(np.array(array), expected[key], strict=True, err_msg=key)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loading_runs_nothing(name: str) -> None:
    with nothing_runs():
        mx.eval(load_weights(FILES / name))


def test_bfloat16_keeps_its_bits() -> None:
    weights = load_weights(FILES / "sd_like.ckpt")
    values = weights["bf16_specials"]
    assert values.dtype == mx.bfloat16
    # inf, -0.0, a subnormal and a large finite value, as bit patterns
    assert np.array(values.view(mx.uint16)).tolist() == [0x7F80, 0x8000, 0x0001, 0x7F62]


def test_unwraps_state_dict_and_skips_bookkeeping() -> None:
    weights = load_weights(FILES / "sd_like.ckpt")
    assert "model.diffusion_model.out.weight" in weights
    assert not any(k.startswith(("state_dict", "callbacks", "optimizer")) for k in weights)


def test_accepts_str_paths() -> None:
    assert "tied" in load_weights(str(FILES / "views.pt"))


def test_handcrafted_checkpoint_loads(tmp_path: Path) -> None:
    # The baseline for the hostile files below: the same builder makes a loadable file.
    storage = Storage("0", "FloatStorage", 2)
    path = write_checkpoint(
        tmp_path / "ok.ckpt",
        torch_pickle({"state_dict": {"w": tensor(storage, (2,), (1,))}}),
        {"0": FLOATS},
    )
    assert np.array(load_weights(path)["w"]).tolist() == [1.0, -2.0]


# --- files that are not loadable weight files ---------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightFileError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").mkdir()
    with pytest.raises(WeightFileError, match="not a file"):
        load_weights(tmp_path / "model.ckpt")


@pytest.mark.parametrize("name", ["model.gguf", "model.onnx", "model", "model.npz"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(WeightFileError, match=r"supported types are \.safetensors, \.ckpt"):
        load_weights(tmp_path / name)


def test_legacy_checkpoint_is_refused() -> None:
    with pytest.raises(WeightFileError, match=r"legacy .*re-save it .*safetensors"):
        load_weights(FILES / "legacy.pt")


@pytest.mark.parametrize("content", [b"", b"hello world", b"GGUF" + bytes(100)])
def test_not_a_zip(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model.bin").write_bytes(content)
    with pytest.raises(WeightFileError, match="not a PyTorch checkpoint"):
        load_weights(tmp_path / "model.bin")


def test_zip_without_checkpoint(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(WeightFileError, match="not a PyTorch checkpoint"):
        load_weights(tmp_path / "model.pt")


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "model.pt", torch_pickle({"epoch": 3}))
    with pytest.raises(WeightFileError, match="contains no tensors"):
        load_weights(path)


# --- hostile pickles are refused and never run ---------------------------------------------------


def marker_command(marker: Path) -> str:
    return f"touch '{marker}'"


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def hostile_payloads(marker: Path) -> dict[str, object]:
    """Pickle stand-ins that would create `marker` if any of them were run."""
    storage = Storage("0", "FloatStorage", 2)
    system = Call(Global("os", "system"), marker_command(marker))
    return {
        "os.system": system,
        "builtins.eval": Call(Global("builtins", "eval"), marker_code(marker)),
        "builtins.exec": Call(Global("builtins", "exec"), marker_code(marker)),
        "__builtin__.eval": Call(Global("__builtin__", "eval"), marker_code(marker)),
        "subprocess.Popen": Call(Global("subprocess", "Popen"), ["touch", str(marker)]),
        "builtins.getattr": Call(
            Call(
                Global("builtins", "getattr"),
                Call(Global("builtins", "__import__"), "os"),
                "system",
            ),
            marker_command(marker),
        ),
        "numpy.core.multiarray._reconstruct": Call(
            Global("numpy.core.multiarray", "_reconstruct"), Global("numpy", "ndarray"), (0,), b"b"
        ),
        "numpy.testing._private.utils.runstring": Call(
            Global("numpy.testing._private.utils", "runstring"), marker_code(marker), {}
        ),
        # inside tensor records: as the backward hooks, a size, and an OrderedDict's items
        "os.system as hooks": {
            "w": Call(
                Global("torch._utils", "_rebuild_tensor_v2"), storage, 0, (2,), (1,), False, system
            )
        },
        "os.system as a size": {"w": tensor(storage, (system,), (1,))},
        "os.system in an OrderedDict": {
            "state_dict": Call(Global("collections", "OrderedDict"), [("w", system)])
        },
        # allowed names reached through other modules, or dotted paths out of allowed ones
        "fake torch module": Call(
            Global("evil.torch._utils", "_rebuild_tensor_v2"), storage, 0, (2,), (1,), False, None
        ),
        "torch._utils with a space": Call(
            Global("torch._utils ", "_rebuild_tensor_v2"), storage, 0, (2,), (1,), False, None
        ),
        "dotted name": Call(
            Global("torch", "_utils._rebuild_tensor_v2"), storage, 0, (2,), (1,), False, None
        ),
        "function globals": Call(Global("torch._utils", "_rebuild_tensor_v2.__globals__"), "os"),
        "torch._utils.os": Call(Global("torch._utils.os", "system"), marker_command(marker)),
        "collections.os": Call(Global("collections", "os.system"), marker_command(marker)),
        "torch.load": Call(Global("torch", "load"), str(marker)),
    }


class Evil:
    """A classic hostile object: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_payloads_really_would_run(tmp_path: Path) -> None:
    # Guards the test below: with the ordinary unpickler, the payload creates the marker.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Evil(marker_command(marker)), protocol=2))
    assert marker.exists()


def test_nothing_runs_notices_code() -> None:
    with pytest.raises(AssertionError, match="loading ran code"), nothing_runs():
        eval("1")


@pytest.mark.parametrize("payload", sorted(hostile_payloads(Path("m"))))
def test_hostile_pickle_is_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    obj = hostile_payloads(marker)[payload]
    path = write_checkpoint(tmp_path / "model.ckpt", torch_pickle(obj), {"0": FLOATS})
    with nothing_runs(), pytest.raises(WeightFileError, match=r"refusing to load .* model\.ckpt"):
        load_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_hostile_pickle_is_refused_in_every_protocol(tmp_path: Path, protocol: int) -> None:
    # Pickled with the real pickler: os.system is recorded as posix.system (nt.system on
    # Windows), through GLOBAL or, from protocol 4, STACK_GLOBAL.
    marker = tmp_path / "pwned"
    data = pickle.dumps({"state_dict": Evil(marker_command(marker))}, protocol=protocol)
    path = write_checkpoint(tmp_path / "model.pt", data)
    with nothing_runs(), pytest.raises(WeightFileError, match=r"refusing to load \w+\.system"):
        load_weights(path)
    assert not marker.exists()


def test_inst_opcode_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = b"(S'" + marker_command(marker).encode() + b"'\nios\nsystem\n."
    path = write_checkpoint(tmp_path / "model.pt", data)
    with nothing_runs(), pytest.raises(WeightFileError, match=r"refusing to load os\.system"):
        load_weights(path)
    assert not marker.exists()


def test_build_cannot_reconfigure_allowed_functions(tmp_path: Path) -> None:
    # BUILD with slot state would setattr(_rebuild_tensor_v2, "__defaults__", ...)
    state = fragment((None, {"__defaults__": ("x",)}))
    data = raw_pickle(b"ctorch._utils\n_rebuild_tensor_v2\n", state, pickle.BUILD)
    path = write_checkpoint(tmp_path / "model.pt", data)
    with pytest.raises(WeightFileError, match="BUILD"):
        load_weights(path)
    assert "tied" in load_weights(FILES / "views.pt")


@pytest.mark.parametrize(
    "opcode",
    [pickle.EXT1 + b"\x01", pickle.BYTEARRAY8 + struct.pack("<Q", 2**40), pickle.NEXT_BUFFER],
)
def test_opcodes_torch_never_writes_are_refused(tmp_path: Path, opcode: bytes) -> None:
    path = write_checkpoint(tmp_path / "model.pt", raw_pickle(opcode))
    with pytest.raises(WeightFileError, match="truncated or corrupt"):
        load_weights(path)


# --- pickles built to exhaust memory or time fail fast --------------------------------------------


def test_huge_memo_index_allocates_nothing(tmp_path: Path) -> None:
    # Ten bytes that make the C unpickler allocate and clear 32 GiB for its memo table.
    data = raw_pickle(pickle.EMPTY_DICT, pickle.LONG_BINPUT + struct.pack("<I", 2**31))
    path = write_checkpoint(tmp_path / "model.pt", data)
    start = time.monotonic()
    with pytest.raises(WeightFileError, match="contains no tensors"):
        load_weights(path)
    assert time.monotonic() - start < 1


def test_shared_tuples_cannot_make_hashing_explode(tmp_path: Path) -> None:
    # t0 = (); t[i+1] = (t[i], t[i]): 200 levels of tuples whose hash visits 2**200 nodes.
    levels = [pickle.EMPTY_TUPLE + pickle.BINPUT + b"\x00"]
    for i in range(200):
        get = pickle.LONG_BINGET + struct.pack("<I", i)
        levels.append(get + get + pickle.TUPLE2 + pickle.LONG_BINPUT + struct.pack("<I", i + 1))
    key = pickle.LONG_BINGET + struct.pack("<I", 200)
    data = raw_pickle(*levels, pickle.POP, pickle.EMPTY_DICT, key, pickle.NONE, pickle.SETITEM)
    path = write_checkpoint(tmp_path / "model.pt", data)
    with pytest.raises(WeightFileError, match="nested too deeply"):
        load_weights(path)


def test_broadcast_views_cannot_blow_up_memory(tmp_path: Path) -> None:
    storage = Storage("0", "FloatStorage", 2)
    huge = {"w": tensor(storage, (2**31 - 1, 2**31 - 1), (0, 0))}
    many = {f"w{i}": tensor(storage, (1000,), (0,)) for i in range(10)}
    for name, obj in {"huge": huge, "many": many}.items():
        path = write_checkpoint(tmp_path / f"{name}.pt", torch_pickle(obj), {"0": FLOATS})
        with pytest.raises(WeightFileError, match="overlap"):
            load_weights(path)


def test_self_referencing_state_dict(tmp_path: Path) -> None:
    # {"state_dict": <itself>, "w": tensor}: unwrapping and flattening must stop.
    memo = struct.pack("<I", 10**6)  # clear of the indices the spliced fragments use
    w = tensor(Storage("0", "FloatStorage", 2), (2,), (1,))
    data = raw_pickle(
        pickle.EMPTY_DICT,
        pickle.LONG_BINPUT + memo,
        fragment("state_dict"),
        pickle.LONG_BINGET + memo,
        pickle.SETITEM,
        fragment("w"),
        torch_pickle(w)[2:-1],
        pickle.SETITEM,
    )
    path = write_checkpoint(tmp_path / "model.pt", data, {"0": FLOATS})
    assert list(load_weights(path)) == ["w"]


# --- damaged checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999])
def test_truncated_checkpoint(tmp_path: Path, fraction: float) -> None:
    data = (FILES / "sd_like.ckpt").read_bytes()
    path = tmp_path / "sd_like.ckpt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(WeightFileError, match=r"sd_like\.ckpt .*(corrupt|not a PyTorch)"):
        load_weights(path)


def test_flipped_storage_byte_fails_the_checksum(tmp_path: Path) -> None:
    data = bytearray((FILES / "views.pt").read_bytes())
    with zipfile.ZipFile(FILES / "views.pt") as archive:
        local_header = archive.getinfo("views/data/0").header_offset
    name_size, extra_size = struct.unpack("<HH", data[local_header + 26 : local_header + 30])
    data[local_header + 30 + name_size + extra_size + 5] ^= 0xFF
    path = tmp_path / "views.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=r"truncated or corrupt .*CRC"):
        load_weights(path)


def damaged(
    obj: object, storages: dict[str, bytes] | None = None, **options: object
) -> tuple[bytes, dict[str, bytes], dict[str, object]]:
    """write_checkpoint's arguments for a checkpoint holding obj (pickled unless bytes)."""
    data_pkl = obj if isinstance(obj, bytes) else torch_pickle(obj)
    return data_pkl, {"0": FLOATS} if storages is None else storages, options


STORAGE = Storage("0", "FloatStorage", 2)
GOOD = {"w": tensor(STORAGE, (2,), (1,))}
DAMAGED_CHECKPOINTS = {
    "missing storage": (damaged(GOOD, {}), "record archive/data/0 is missing"),
    "short storage": (damaged(GOOD, {"0": FLOATS[:4]}), "wrong size"),
    "view past the end": (damaged({"w": tensor(STORAGE, (3,), (1,))}), "past the end"),
    "offset past the end": (damaged({"w": tensor(STORAGE, (1,), (1,), 5)}), "offset outside"),
    "negative size": (damaged({"w": tensor(STORAGE, (-1,), (1,))}), "non-negative"),
    "size and stride differ": (damaged({"w": tensor(STORAGE, (2,), ())}), "malformed tensor"),
    "unknown storage type": (
        damaged({"w": tensor(Storage("0", "QInt8Storage", 2), (2,), (1,))}),
        r"refusing to load torch\.QInt8Storage",
    ),
    "bad persistent id": (
        damaged(raw_pickle(fragment(("file", 1)), pickle.BINPERSID)),
        "unknown persistent id",
    ),
    "compressed": (damaged(GOOD, compression=zipfile.ZIP_DEFLATED), "compressed"),
    "byte order": (damaged(GOOD, byteorder=b"middle"), "unknown byte order"),
    "garbage pickle": (damaged(b"\x80\x02garbage"), "truncated or corrupt"),
    "empty pickle": (damaged(b""), "truncated or corrupt"),
}


@pytest.mark.parametrize(
    ("arguments", "message"), DAMAGED_CHECKPOINTS.values(), ids=DAMAGED_CHECKPOINTS.keys()
)
def test_damaged_checkpoint(tmp_path: Path, arguments: tuple, message: str) -> None:
    data_pkl, storages, options = arguments
    path = write_checkpoint(tmp_path / "model.pt", data_pkl, storages, **options)
    with pytest.raises(WeightFileError, match=message) as error:
        load_weights(path)
    assert "model.pt" in str(error.value)


def test_two_pickles(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:
        archive.writestr("a/data.pkl", torch_pickle(GOOD))
        archive.writestr("b/data.pkl", torch_pickle(GOOD))
    with pytest.raises(WeightFileError, match=r"has 2 <archive>/data\.pkl records"):
        load_weights(tmp_path / "model.pt")


# --- damaged safetensors -----------------------------------------------------------------------


def write_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_handcrafted_safetensors_loads(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {}}
    weights = load_weights(write_safetensors(tmp_path / "ok.safetensors", header, FLOATS))
    assert np.array(weights["w"]).tolist() == [1.0, -2.0]


def safetensors_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("cut", [0, 4, 7, 8, 9, 100, "header - 1", "header", "end - 1"])
def test_truncated_safetensors(tmp_path: Path, cut: int | str) -> None:
    data = (FILES / "weights.safetensors").read_bytes()
    header_end = safetensors_size(FILES / "weights.safetensors")
    at = {"header - 1": header_end - 1, "header": header_end, "end - 1": len(data) - 1}.get(
        cut, cut
    )
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data[:at])
    with pytest.raises(
        WeightFileError,
        match=r"weights\.safetensors is truncated or corrupt .*"
        r"re-download it",
    ):
        load_weights(path)


def entry(**fields: object) -> dict:
    return {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **fields}}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"", "unreadable header"),
        (b"{not json", "unreadable header"),
        (b"\xff\xfe{}", "unreadable header"),
        (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN"),
        (b'{"a": {}, "a": {}}', "duplicate key"),
        (b"[" * 100_000, "unreadable header"),
        ([], "not a JSON object"),
        ({"w": 3}, "not an object"),
        (entry(dtype="F7"), "dtype 'F7', which cannot be loaded"),
        (entry(dtype="F64"), "dtype 'F64', which cannot be loaded .*convert"),
        (entry(dtype=None), "dtype None"),
        (entry(dtype=["F32"]), r"dtype \['F32'\]"),
        (entry(shape=[2.0]), "invalid shape"),
        (entry(shape=[-2]), "invalid shape"),
        (entry(shape=[True, 2]), "invalid shape"),
        (entry(shape=[0, 2**40]), "invalid shape"),
        (entry(shape="2"), "invalid shape"),
        (entry(data_offsets=[0]), "invalid data_offsets"),
        (entry(data_offsets=[0, 10**9]), "outside the file"),
        (entry(data_offsets=[8, 0]), "outside the file"),
        (entry(data_offsets=[-8, 0]), "outside the file"),
        (entry(data_offsets=[0, 4]), "does not match shape"),
        (entry(shape=[3]), "does not match shape"),
        ({"__metadata__": {"format": 1}}, "__metadata__"),
        ({"__metadata__": {"format": "pt"}}, "contains no tensors"),
    ],
)
def test_bad_safetensors_header(tmp_path: Path, header: object, message: str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", header, FLOATS)
    with pytest.raises(WeightFileError, match=message) as error:
        load_weights(path)
    assert "bad.safetensors" in str(error.value)


@pytest.mark.parametrize("size", [2**64 - 1, 2**63, 10**9, "file"])
def test_bad_safetensors_header_size(tmp_path: Path, size: int | str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", entry(), FLOATS)
    data = path.read_bytes()
    size = len(data) - 7 if size == "file" else size
    path.write_bytes(struct.pack("<Q", size) + data[8:])
    with pytest.raises(WeightFileError, match=r"header size .* does not fit"):
        load_weights(path)
