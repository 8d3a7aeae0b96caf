"""Read weight files downloaded from the web: .safetensors and PyTorch zip checkpoints.

Both kinds are untrusted input. A .safetensors header is checked before MLX sees it, so a
damaged file is reported instead of crashing the reader. A pickled checkpoint is replayed by
an unpickler that knows only how to rebuild tensors and plain containers: any other global is
refused before it is looked up, so nothing in the file is imported or run. PyTorch is never
imported.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar, TypeGuard, cast

import mlx.core as mx
import numpy as np

from .. import limits


class WeightFileError(ValueError):
    """A weight file cannot be loaded; the message names the file and what to do about it."""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def load_weights(path: str | os.PathLike[str]) -> dict[str, mx.array]:
    """Load every tensor of a .safetensors or PyTorch checkpoint file as a flat name -> array dict.

    Raises WeightFileError for missing, unsupported, corrupt or unsafe files.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise WeightFileError(
            f"{path}: unsupported weight file type {suffix or '(no extension)'!r}; "
            f"supported types are {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.is_file():
        raise WeightFileError(f"{path} does not exist or is not a file")
    load = _load_safetensors if suffix == ".safetensors" else _load_torch_checkpoint
    weights = load(path)
    if not weights:
        raise WeightFileError(f"{path} contains no tensors; is it really a weight file?")
    return weights


def _corrupt(path: Path, detail: str) -> WeightFileError:
    return WeightFileError(f"{path} is truncated or corrupt ({detail}); re-download it")


# --- safetensors -------------------------------------------------------------------------------

# Bytes per element of the dtypes mx.load reads as real numbers. It also accepts F8_E4M3 but
# hands back its raw bytes as uint8, which would silently load as garbage, so that is left out.
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "C64": 8,
}
_MAX_DIM = 2**31 - 1  # MLX stores dimensions as int32


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    # mx.load reads tensor data lazily and trusts the header's offsets, so a damaged header
    # would only fail later, deep inside MLX. Check everything it will rely on first.
    _check_safetensors_header(path)
    try:
        # A safetensors file loads as a dict (arrays alone are .npy files).
        return cast(dict[str, mx.array], mx.load(str(path), format="safetensors"))
    except (RuntimeError, ValueError) as error:
        raise _corrupt(path, str(error)) from error


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, f"only {size} bytes, too short for a safetensors header")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise _corrupt(path, f"header size {header_size} does not fit in a {size}-byte file")
        if header_size > limits.MAX_SAFETENSORS_HEADER:
            raise _corrupt(
                path,
                f"a header of {header_size:,} bytes, over the "
                f"{limits.MAX_SAFETENSORS_HEADER:,} real files stay under",
            )
        raw_header = file.read(header_size)
    try:
        header = json.loads(
            raw_header.decode("utf-8"),
            object_pairs_hook=_json_object_without_duplicates,
            parse_constant=_reject_json_constant,
        )
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise _corrupt(path, f"unreadable header: {error}") from error
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_size = size - 8 - header_size
    regions = []
    for name, entry in header.items():
        if name == "__metadata__":
            # mx.save_safetensors writes null when there is no metadata.
            if entry is None:
                continue
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _corrupt(path, "__metadata__ is not a string-to-string map")
        else:
            _check_safetensors_entry(path, name, entry, data_size)
            regions.append((*entry["data_offsets"], name))
    _check_disjoint(path, regions)


def _check_disjoint(path: Path, regions: list[tuple[int, int, str]]) -> None:
    # Overlapping regions would let a small file describe any number of bytes; the reference
    # implementation refuses them too. Empty tensors take no bytes and may sit anywhere.
    regions = sorted(r for r in regions if r[1] > r[0])
    for (_, end, name), (begin, _, other) in pairwise(regions):
        if begin < end:
            raise _corrupt(path, f"the data of tensors {name!r} and {other!r} overlap")


def _check_safetensors_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ITEMSIZE:
        raise WeightFileError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which cannot be loaded (supported: "
            f"{', '.join(_SAFETENSORS_ITEMSIZE)}); convert the file to float16/float32, or "
            "re-download it if it is corrupt"
        )
    if not (isinstance(shape, list) and all(_is_int(d, 0, _MAX_DIM) for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets")
    begin, end = offsets
    if not (_is_int(begin, 0, data_size) and _is_int(end, begin, data_size)):
        raise _corrupt(path, f"tensor {name!r} lies outside the file's {data_size} data bytes")
    if end - begin != math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]:
        raise _corrupt(
            path,
            f"tensor {name!r} has {end - begin} bytes, which does not match "
            f"shape {shape} of {dtype}",
        )


def _json_object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Python keeps the last duplicate and MLX's parser might not: make them agree by refusing.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return result


def _reject_json_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON")


def _is_int(value: object, low: int, high: int) -> TypeGuard[int]:
    return type(value) is int and low <= value <= high  # bool is an int subclass: excluded


# --- PyTorch zip checkpoints -------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """What a torch.*Storage global stands for: how the storage's bytes are laid out."""

    dtype: np.dtype  # little-endian numpy dtype of the stored elements
    bfloat16: bool = False  # numpy has no bfloat16: read the raw uint16 bits, view in MLX


_STORAGE_TYPES = {
    "DoubleStorage": _StorageType(np.dtype("<f8")),
    "FloatStorage": _StorageType(np.dtype("<f4")),
    "HalfStorage": _StorageType(np.dtype("<f2")),
    "BFloat16Storage": _StorageType(np.dtype("<u2"), bfloat16=True),
    "LongStorage": _StorageType(np.dtype("<i8")),
    "IntStorage": _StorageType(np.dtype("<i4")),
    "ShortStorage": _StorageType(np.dtype("<i2")),
    "CharStorage": _StorageType(np.dtype("i1")),
    "ByteStorage": _StorageType(np.dtype("u1")),
    "BoolStorage": _StorageType(np.dtype("?")),
}


@dataclass(frozen=True)
class _Storage:
    """A storage record of the archive (`<archive>/data/<key>`), read only when needed."""

    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True, eq=False)  # eq=False: tensors are told apart by identity, like torch's
class _TensorRef:
    """A tensor as the pickle describes it: a strided view into a storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.storage.type.dtype.itemsize


class _Inert:
    """Stands in for bookkeeping objects that training checkpoints keep next to the weights
    (numpy scalars, Lightning callbacks). It takes any arguments and keeps none: only tensors
    are returned, so their values are never needed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


def _indices(values: object) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(_is_int(v, 0, _MAX_DIM) for v in values):
        raise pickle.UnpicklingError("tensor sizes and strides must be non-negative integers")
    return tuple(values)


def _rebuild_tensor(
    storage: object, offset: object, size: object, stride: object, *_unused: object
) -> _TensorRef:
    # _rebuild_tensor_v2 also passes requires_grad, backward hooks and metadata: not needed for
    # inference, and never called or kept.
    shape, strides = _indices(size), _indices(stride)
    if not isinstance(storage, _Storage) or len(shape) != len(strides):
        raise pickle.UnpicklingError("malformed tensor record")
    if not _is_int(offset, 0, storage.numel):
        raise pickle.UnpicklingError(f"tensor offset outside storage {storage.key}")
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if 0 not in shape and last >= storage.numel:
        raise pickle.UnpicklingError(f"tensor runs past the end of storage {storage.key}")
    return _TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data: object, *_unused: object) -> _TensorRef:
    # An nn.Parameter is a tensor plus requires_grad, hooks and maybe state: keep the tensor.
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


def _torch_size(dims: object) -> tuple[int, ...]:
    return _indices(dims)


# Everything a checkpoint pickle may name. Lookup is by exact (module, name), so dotted-name
# tricks like ("torch._utils", "_rebuild_tensor_v2.__globals__") find nothing.
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
    # SD 1.x training checkpoints: numpy scalars (protocol 2 spells their bytes as
    # _codecs.encode(text, "latin1")) and the Lightning checkpoint callback.
    ("numpy", "dtype"): _Inert,
    ("numpy.core.multiarray", "scalar"): _Inert,
    ("numpy._core.multiarray", "scalar"): _Inert,
    ("_codecs", "encode"): _Inert,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
}

# An opcode's handler, as pickle's dispatch tables hold them. typeshed types the table with
# the C Unpickler, which lacks the pure-Python one's stack and memo: Any lets the handlers
# below reach those through the attributes _RestrictedUnpickler declares.
_Opcode = Callable[[Any], None]


def _counting_tuples(load_tuple: _Opcode) -> _Opcode:
    def load(unpickler: _RestrictedUnpickler) -> None:
        load_tuple(unpickler)
        unpickler.count_tuple(unpickler.stack[-1])

    return load


def _counting_objects(load: _Opcode) -> _Opcode:
    # Each such opcode pushes at most one new object (or reference) onto the stack.
    def counted(unpickler: _RestrictedUnpickler) -> None:
        unpickler.spend("objects", 1, limits.MAX_PICKLE_OBJECTS)
        load(unpickler)

    return counted


def _counting_items(load: _Opcode, items: Callable[[list], int]) -> _Opcode:
    def counted(unpickler: _RestrictedUnpickler) -> None:
        budget = limits.MAX_PICKLE_CONTAINER_ITEMS
        unpickler.spend("container items", items(unpickler.stack), budget)
        load(unpickler)

    return counted


def _counting_memo(load: _Opcode) -> _Opcode:
    def counted(unpickler: _RestrictedUnpickler) -> None:
        load(unpickler)
        if len(unpickler.memo) > limits.MAX_PICKLE_MEMO:
            raise _BudgetError(f"more than {limits.MAX_PICKLE_MEMO:,} memo entries")

    return counted


_PLAIN_MARK: _Opcode = pickle._Unpickler.dispatch[pickle.MARK[0]]


def _load_mark(unpickler: _RestrictedUnpickler) -> None:
    if len(unpickler.metastack) >= limits.MAX_PICKLE_NESTING:
        raise _BudgetError(f"containers nested more than {limits.MAX_PICKLE_NESTING} deep")
    _PLAIN_MARK(unpickler)


def _load_build(unpickler: _RestrictedUnpickler) -> None:
    # BUILD sets attributes on the object below it. Only placeholders may take it, so a pickle
    # cannot reconfigure the functions handed out above (their __defaults__, say).
    unpickler.stack.pop()
    if not isinstance(unpickler.stack[-1], _Inert):
        raise pickle.UnpicklingError("BUILD of an object that is not a placeholder")


def _refuse_opcode(unpickler: _RestrictedUnpickler) -> None:
    # Protocol 5 buffers and the copyreg extension registry: never written by torch.save, and
    # BYTEARRAY8 would allocate whatever size the file asks for.
    raise pickle.UnpicklingError("opcode not used by torch.save")


# Opcodes that build nothing: the budgets of their own below, or none needed.
_BOOKKEEPING_OPCODES = (
    pickle.PROTO,
    pickle.FRAME,
    pickle.STOP,
    pickle.MARK,
    pickle.POP,
    pickle.POP_MARK,
    pickle.PUT,
    pickle.BINPUT,
    pickle.LONG_BINPUT,
    pickle.MEMOIZE,
    pickle.APPEND,
    pickle.APPENDS,
    pickle.SETITEM,
    pickle.SETITEMS,
    pickle.ADDITEMS,
    pickle.BUILD,
)


def _restricted_dispatch() -> dict[int, _Opcode]:
    table: dict[int, _Opcode] = dict(pickle._Unpickler.dispatch)
    for opcode in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
        table[opcode[0]] = _counting_tuples(table[opcode[0]])
    bookkeeping = {opcode[0] for opcode in _BOOKKEEPING_OPCODES}
    for code in table:
        if code not in bookkeeping:
            table[code] = _counting_objects(table[code])
    # The mark-based opcodes take everything pushed since the MARK (pairs for SETITEMS).
    table[pickle.APPEND[0]] = _counting_items(table[pickle.APPEND[0]], lambda _: 1)
    table[pickle.SETITEM[0]] = _counting_items(table[pickle.SETITEM[0]], lambda _: 1)
    table[pickle.APPENDS[0]] = _counting_items(table[pickle.APPENDS[0]], len)
    table[pickle.ADDITEMS[0]] = _counting_items(table[pickle.ADDITEMS[0]], len)
    table[pickle.SETITEMS[0]] = _counting_items(
        table[pickle.SETITEMS[0]], lambda stack: len(stack) // 2
    )
    for opcode in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
        table[opcode[0]] = _counting_memo(table[opcode[0]])
    table[pickle.MARK[0]] = _load_mark
    table[pickle.BUILD[0]] = _load_build
    for opcode in (
        pickle.BYTEARRAY8,
        pickle.NEXT_BUFFER,
        pickle.READONLY_BUFFER,
        pickle.EXT1,
        pickle.EXT2,
        pickle.EXT4,
    ):
        table[opcode[0]] = _refuse_opcode
    return table


class _RestrictedUnpickler(pickle._Unpickler):
    """Rebuilds a checkpoint's data.pkl from the allowed globals only.

    It extends the pure-Python unpickler on purpose: the C one sizes its memo table from
    indices in the file, so a ten-byte pickle can make it allocate and clear gigabytes.
    """

    dispatch: ClassVar[dict[int, _Opcode]] = _restricted_dispatch()
    # The pure-Python unpickler's state, which typeshed does not declare.
    stack: list[Any]
    metastack: list[list[Any]]
    memo: dict[int, Any]

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._path = path
        # id -> (the tuple, kept alive so that its id stays unique; its size; its depth)
        self._tuples: dict[int, tuple[tuple, int, int]] = {}
        self._spent: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise WeightFileError(
                f"refusing to load {module}.{name} from {self._path.name}: pickled checkpoints "
                "may only contain tensors and plain containers; if you trust its source, "
                "convert it to .safetensors"
            ) from None

    def persistent_load(self, pid: object) -> _Storage:
        # torch.save refers to each storage as ("storage", storage type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unknown persistent id")
        _, storage_type, key, _location, numel = pid
        if not (
            isinstance(storage_type, _StorageType) and type(key) is str and _is_int(numel, 0, 2**62)
        ):
            raise pickle.UnpicklingError("malformed storage record")
        record = _stored_record(self._archive, f"{self._prefix}data/{key}")
        if record.file_size != numel * storage_type.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} has the wrong size")
        return _Storage(key, storage_type, numel)

    def count_tuple(self, new: tuple) -> None:
        known = [self._tuples.get(id(item), (None, 1, 0)) for item in new]
        nodes = 1 + sum(size for _, size, _ in known)
        depth = 1 + max((depth for _, _, depth in known), default=0)
        if nodes > limits.MAX_TUPLE_NODES or depth > limits.MAX_PICKLE_NESTING:
            raise _BudgetError("tuples nested too deeply")
        self._tuples[id(new)] = (new, nodes, depth)

    def spend(self, what: str, amount: int, budget: int) -> None:
        spent = self._spent.get(what, 0) + amount
        if spent > budget:
            raise _BudgetError(f"more than {budget:,} {what}")
        self._spent[what] = spent


class _BudgetError(pickle.UnpicklingError):
    """The pickle asks for more work than any checkpoint needs (limits.py)."""


def _stored_record(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        record = archive.getinfo(name)
    except KeyError:
        raise pickle.UnpicklingError(f"record {name} is missing") from None
    # torch.save never compresses; refusing compression means no record can decompress to more
    # bytes than the file holds.
    if record.compress_type != zipfile.ZIP_STORED:
        raise pickle.UnpicklingError(f"record {name} is compressed")
    return record


def _load_torch_checkpoint(path: Path) -> dict[str, mx.array]:
    with path.open("rb") as file:
        magic = file.read(4)
    if magic.startswith(b"\x80"):  # a pickle's PROTO opcode: torch.save before PyTorch 1.6
        raise WeightFileError(
            f"{path} is a legacy (non-zip) PyTorch checkpoint, which is not supported; re-save "
            "it with torch.save from PyTorch >= 1.6, or convert it to .safetensors"
        )
    if magic != b"PK\x03\x04":
        raise WeightFileError(
            f"{path} is not a PyTorch checkpoint (expected the zip archive torch.save writes); "
            "re-download it, or check that it is really a .ckpt/.pt/.pth/.bin weight file"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(path, archive)
    except (WeightFileError, MemoryError):
        raise
    except _BudgetError as error:
        raise WeightFileError(
            f"{path}: its data.pkl builds {error}, far beyond any real checkpoint; it is "
            "damaged or made to exhaust memory, re-download it from a source you trust"
        ) from None
    except Exception as error:  # a damaged zip or pickle can fail in many ways
        raise _corrupt(path, f"{type(error).__name__}: {error}"[:200]) from error


def _read_archive(path: Path, archive: zipfile.ZipFile) -> dict[str, mx.array]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightFileError(
            f"{path} is a zip file but not a PyTorch checkpoint (it has {len(pickles)} "
            "<archive>/data.pkl records instead of one)"
        )
    prefix = pickles[0].removesuffix("data.pkl")
    big_endian = False
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(_stored_record(archive, f"{prefix}byteorder"))
        if byteorder not in (b"little", b"big"):
            raise _corrupt(path, "unknown byte order")
        big_endian = byteorder == b"big"

    record = _stored_record(archive, pickles[0])
    if record.file_size > limits.MAX_PICKLE_BYTES:
        raise _corrupt(
            path,
            f"its data.pkl has {record.file_size:,} bytes; real checkpoints need far fewer "
            f"than {limits.MAX_PICKLE_BYTES:,}",
        )
    data = archive.read(record)
    tensors = _tensors_by_name(_RestrictedUnpickler(data, archive, prefix, path).load())
    distinct = {id(ref): ref for ref in tensors.values()}.values()
    # Views may share a storage, so the output could be far larger than the file: bound it.
    total = sum(ref.nbytes for ref in distinct)
    factor = limits.MAX_DESCRIBED_BYTES_FACTOR
    if total > factor * path.stat().st_size:
        raise _corrupt(
            path, f"its tensors overlap into {total} bytes, {factor}x more than the file"
        )

    # Read one storage at a time and build all tensors viewing it before moving on.
    by_storage: dict[str, list[_TensorRef]] = {}
    for ref in distinct:
        by_storage.setdefault(ref.storage.key, []).append(ref)
    arrays: dict[int, mx.array] = {}
    for key, refs in by_storage.items():
        storage_bytes = archive.read(_stored_record(archive, f"{prefix}data/{key}"))
        for ref in refs:
            arrays[id(ref)] = _to_mlx(ref, storage_bytes, big_endian)
    return {name: arrays[id(ref)] for name, ref in tensors.items()}


# Containers that checkpoints wrap their weights in, looked for in this order.
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _tensors_by_name(root: object) -> dict[str, _TensorRef]:
    """Unwrap {"state_dict": {...}}-style containers, then flatten nested dicts to dotted names,
    skipping everything that is not a tensor.

    Dicts deeper than MAX_TENSOR_NESTING and names longer than MAX_TENSOR_NAME are skipped
    (no weight is named so), so that building the names costs at most MAX_TENSOR_NAME
    characters per dict entry: nested dicts with long keys would otherwise make it quadratic."""
    seen = set()  # ids of dicts already visited: pickles can contain cycles and shared dicts
    while isinstance(root, dict) and id(root) not in seen:
        seen.add(id(root))
        inner = next((root[k] for k in _WRAPPER_KEYS if isinstance(root.get(k), dict)), None)
        if inner is None:
            break
        root = inner
    tensors: dict[str, _TensorRef] = {}
    pending = deque([("", root, 1)] if isinstance(root, dict) else [])
    while pending:
        prefix, mapping, depth = pending.popleft()
        for key, value in mapping.items():
            if not isinstance(key, str) or len(prefix) + len(key) > limits.MAX_TENSOR_NAME:
                continue
            if isinstance(value, _TensorRef):
                tensors[prefix + key] = value
            elif (
                isinstance(value, dict)
                and id(value) not in seen
                and depth < limits.MAX_TENSOR_NESTING
            ):
                seen.add(id(value))
                pending.append((f"{prefix}{key}.", value, depth + 1))
    return tensors


def _to_mlx(ref: _TensorRef, storage_bytes: bytes, big_endian: bool) -> mx.array:
    storage_type = ref.storage.type
    dtype = storage_type.dtype.newbyteorder(">" if big_endian else "<")
    elements = np.frombuffer(storage_bytes, dtype=dtype, count=ref.storage.numel)
    view = np.lib.stride_tricks.as_strided(
        elements[ref.offset :],
        shape=ref.shape,
        strides=[s * dtype.itemsize for s in ref.stride],
        writeable=False,
    )
    array = view if view.flags.c_contiguous else view.copy()  # MLX wants C order
    array = array.astype(dtype.newbyteorder("="), copy=False)
    if storage_type.bfloat16:
        return mx.array(array).view(mx.bfloat16)
    if array.dtype == np.float64:  # MLX's GPU has no float64, and no weight needs it
        array = array.astype(np.float32)
    return mx.array(array)
