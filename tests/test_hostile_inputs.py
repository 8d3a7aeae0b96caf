"""Small files that describe huge work are refused within the budgets of stable_diffusion/limits.py.

Each file is crafted here: a few KB to a few MB on disk, but describing gigabytes or minutes of
work to a naive reader (the cases of issue 20). The heavy ones run in a fresh Python whose peak
memory (ru_maxrss, measured after the imports) and time are asserted, so that a regression shows
up as a failed bound rather than as a machine out of memory. Atomic writes are tested against a
full disk simulated with RLIMIT_FSIZE.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from stable_diffusion import limits
from stable_diffusion.config import SchedulerConfig, TextEncoderConfig, UNetConfig, read_json
from stable_diffusion.images import GenerationParameters, load_image, read_parameters, save_images
from stable_diffusion.tokenizer import Tokenizer
from stable_diffusion.weights.files import WeightFileError, load_weights
from tests.helpers import (
    FLOATS,
    Storage,
    raw_pickle,
    tensor,
    torch_pickle,
    write_checkpoint,
)

ROOT = Path(__file__).parent.parent


def run_bounded(work: str, *, megabytes: float, seconds: float, imports: str = "") -> str:
    """Run `work` in a fresh Python after `imports`; assert that it added at most `megabytes`
    to the peak memory and took at most `seconds`. Returns what it printed."""
    script = textwrap.dedent(
        """
        import resource, time
        {imports}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        {work}
        elapsed = time.perf_counter() - start
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(f"BOUNDS {{elapsed:.3f}} s {{grown:.1f}} MB")
        """
    ).format(imports=imports, work=work)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60 + seconds,
    )
    assert result.returncode == 0, result.stderr
    *output, bounds = result.stdout.strip().split("\n")
    print(bounds)  # shown with -s: the measurements the bounds below were set from
    _, elapsed, _, grown, _ = bounds.split()
    assert float(elapsed) <= seconds, bounds
    assert float(grown) <= megabytes, bounds
    return "\n".join(output)


def refusal(call: str, imports: str) -> str:
    """Code printing the message of the ValueError that `call` must raise."""
    return f"""
{imports}
try:
    {call}
except ValueError as error:
    print(error)
else:
    raise AssertionError("not refused")
"""


def load_refused(path: Path, *, megabytes: float, seconds: float) -> str:
    imports = "from stable_diffusion.weights.files import load_weights"
    return run_bounded(
        refusal(f"load_weights({str(path)!r})", ""),
        imports=imports,
        megabytes=megabytes,
        seconds=seconds,
    )


# --- pickled checkpoints ------------------------------------------------------------------------


def test_pickle_of_empty_sets(tmp_path: Path) -> None:
    # 1.1 MB of EMPTY_SET opcodes: each builds a 216-byte set (a 20 MB file took 4.9 GB).
    path = write_checkpoint(
        tmp_path / "sets.ckpt", b"\x80\x04" + pickle.EMPTY_SET * 1_100_000 + pickle.STOP
    )
    message = load_refused(path, megabytes=300, seconds=10)
    assert "more than 1,000,000 objects" in message and "re-download" in message


def test_memo_heavy_pickle(tmp_path: Path) -> None:
    # MEMOIZE is one byte per memo entry.
    data = b"\x80\x04" + pickle.NONE + pickle.MEMOIZE * 1_100_000 + pickle.STOP
    path = write_checkpoint(tmp_path / "memo.ckpt", data)
    assert "more than 1,000,000 memo entries" in load_refused(path, megabytes=150, seconds=10)


def nested_dicts(key: str, depth: int) -> bytes:
    """{"state_dict": {"w": tensor, key: {key: {... depth levels}}}}, the key memoized once,
    built with SETITEM (no MARK) so that only the dicts nest: 4 bytes a level."""
    storage = Storage("0", "FloatStorage", 2)
    top = torch_pickle({"state_dict": {"w": tensor(storage, (2,), (1,))}})
    # Both dicts are closed by a SETITEM each: set "w", push the chain into the inner dict,
    # then close the outer one.
    assert top.endswith(pickle.SETITEM * 2 + pickle.STOP)
    head = top[:-3] + pickle.SETITEM
    chain = (
        pickle.BINUNICODE
        + struct.pack("<I", len(key))
        + key.encode()
        + pickle.BINPUT
        + b"\xff"
        + pickle.EMPTY_DICT
        + (pickle.BINGET + b"\xff" + pickle.EMPTY_DICT) * depth
        + pickle.SETITEM * depth
    )
    return head + chain + pickle.SETITEM * 2 + pickle.STOP


@pytest.mark.parametrize(("key", "depth"), [("k" * 5000, 15_000), ("k", 15_000)])
def test_nested_dicts_with_long_keys(tmp_path: Path, key: str, depth: int) -> None:
    # Flattening built every prefix at every level: an 80 KB file took 82 s, a 65 KB one 5.8 GB.
    path = write_checkpoint(tmp_path / "nested.ckpt", nested_dicts(key, depth), {"0": FLOATS})
    assert path.stat().st_size < 100_000
    output = run_bounded(
        f"print(sorted(load_weights({str(path)!r})))",
        imports="from stable_diffusion.weights.files import load_weights",
        megabytes=150,
        seconds=10,
    )
    assert output == "['w']"  # the chain is skipped, the real tensor kept


def test_nesting_budgets(tmp_path: Path) -> None:
    too_deep = limits.MAX_PICKLE_NESTING + 1
    cases = {
        "marks": raw_pickle(pickle.MARK * too_deep),
        "tuples": raw_pickle(pickle.EMPTY_TUPLE + pickle.TUPLE1 * too_deep),
    }
    for name, data in cases.items():
        path = write_checkpoint(tmp_path / f"{name}.ckpt", data)
        with pytest.raises(WeightFileError, match="nested") as refused:
            load_weights(path)
        assert "far beyond any real checkpoint" in str(refused.value)


def test_container_and_size_budgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_checkpoint(
        tmp_path / "list.ckpt",
        raw_pickle(pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * 20 + pickle.APPENDS),
    )
    monkeypatch.setattr(limits, "MAX_PICKLE_CONTAINER_ITEMS", 10)
    with pytest.raises(WeightFileError, match="more than 10 container items"):
        load_weights(path)
    monkeypatch.setattr(limits, "MAX_PICKLE_BYTES", 10)
    with pytest.raises(WeightFileError, match=r"its data\.pkl has 26 bytes"):
        load_weights(path)


# --- safetensors --------------------------------------------------------------------------------


def safetensors_file(path: Path, entries: dict[str, dict], data_size: int) -> Path:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_size))
    return path


def test_overlapping_safetensors_regions(tmp_path: Path) -> None:
    # 300 layers of 1 MB sharing one region (a 16 MB LoRA like this took 5 GB).
    entries = {
        f"lora_unet_l{i}.lora_down.weight": {
            "dtype": "F32",
            "shape": [512, 512],
            "data_offsets": [0, 2**20],
        }
        for i in range(300)
    }
    path = safetensors_file(tmp_path / "overlap.safetensors", entries, 2**20)
    message = load_refused(path, megabytes=50, seconds=5)
    assert "overlap" in message and "re-download" in message


def test_disjoint_regions_with_gaps_and_empty_tensors_load(tmp_path: Path) -> None:
    entries = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
    }
    weights = load_weights(safetensors_file(tmp_path / "ok.safetensors", entries, 24))
    assert sorted(weights) == ["a", "b", "empty"]


def test_safetensors_header_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = safetensors_file(tmp_path / "big.safetensors", {"a" * 100: {}}, 0)
    monkeypatch.setattr(limits, "MAX_SAFETENSORS_HEADER", 50)
    with pytest.raises(WeightFileError, match=r"a header of 1\d\d bytes, over the 50"):
        load_weights(path)


# --- JSON configs, LoRA metadata, tokenizer files ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"beta_end": 1e400}', "1e400 does not fit a float"),
        ('{"steps_offset": 1' + "0" * 5000 + "}", "an integer of 5001 digits"),
        ('{"beta_end": NaN}', "NaN is not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_config_json_is_refused_clearly(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        read_json(path)
    assert time.perf_counter() - start < 1


def test_oversize_json_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"a": "' + "x" * 100 + '"}')
    monkeypatch.setattr(limits, "MAX_JSON_BYTES", 50)
    with pytest.raises(ValueError, match="109 bytes, more than the 50"):
        read_json(path)


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (SchedulerConfig, {"num_train_timesteps": 10**13}, "num_train_timesteps is 10000000000000"),
        (SchedulerConfig, {"num_train_timesteps": 1e13}, "expected an integer in"),
        (SchedulerConfig, {"beta_end": float("nan")}, "beta_end is nan"),
        (SchedulerConfig, {"steps_offset": 5000}, r"steps_offset is 5000, .* \[0, 1000\]"),
        (UNetConfig, {"block_out_channels": [320, 10**9]}, "block_out_channels"),
        (UNetConfig, {"layers_per_block": True}, "layers_per_block is True"),
        (TextEncoderConfig, {"max_position_embeddings": 10**9}, "max_position_embeddings"),
        (TextEncoderConfig, {"hidden_size": "768"}, "hidden_size is '768'"),
    ],
)
def test_config_values_are_range_checked(cls: type, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls.from_dict(values)


def tokenizer_folder(folder: Path, **settings: object) -> Path:
    folder.mkdir()
    vocab = {"a": 0, "a</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model_max_length": 1e9}, "model_max_length is 1000000000.0, expected an integer"),
        ({"model_max_length": "77"}, "model_max_length is '77'"),
        ({"pad_token": {"no content": 1}}, "the pad token is None"),
    ],
)
def test_tokenizer_settings_are_checked(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_folder(tokenizer_folder(tmp_path / "tokenizer", **settings))


def test_tokenizer_unset_length_still_means_the_default(tmp_path: Path) -> None:
    # transformers writes int(1e30) for "no limit".
    folder = tokenizer_folder(tmp_path / "tokenizer", model_max_length=int(1e30))
    assert Tokenizer.from_folder(folder).max_length == 77


# --- prompts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip() -> Tokenizer:
    return Tokenizer.clip_default()


def test_one_very_long_word_is_fast(clip: Tokenizer) -> None:
    # The BPE rescanned the word per merge: 16,000 characters took 4 s.
    word = "".join(np.random.default_rng(0).choice(list("abcdefghij"), 10_000))
    start = time.perf_counter()
    ids = clip.tokenize(word)
    assert time.perf_counter() - start < 1
    assert 1_000 < len(ids) < 10_000


def test_prompt_caps(clip: Tokenizer) -> None:
    with pytest.raises(ValueError, match="10,001 characters, more than the 10,000"):
        clip.tokenize("a" * 10_001)
    with pytest.raises(ValueError, match="more than 32 chunks"):
        clip.encode_chunks("a, " * 2000)  # 4,000 tokens
    assert len(clip.encode_chunks("a " * 2400)) == 32


# --- PNG metadata and img2img inputs ------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_file(
    path: Path, width: int, height: int, *, channels: int = 1, idat: bytes = b"", after: bytes = b""
) -> Path:
    """A PNG with this header, these IDAT bytes and `after` (chunks) after the image data."""
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + after
        + png_chunk(b"IEND", b"")
    )
    return path


PARAMETERS = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 64x64"


def test_parameters_are_read_without_decoding_the_image(tmp_path: Path) -> None:
    # 13000x13000 gray: 169 MB of pixels in a 170 KB file, text after the image data.
    side = 13_000
    deflate = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte and pixels
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    text = png_chunk(b"tEXt", b"parameters\0" + PARAMETERS.encode())
    path = png_file(tmp_path / "huge.png", side, side, idat=idat, after=text)
    output = run_bounded(
        f"print(read_parameters({str(path)!r}).prompt)",
        imports="from stable_diffusion.images import read_parameters",
        megabytes=30,
        seconds=2,
    )
    assert output == "a cat"


def test_huge_parameters_text_is_refused_before_reading(tmp_path: Path) -> None:
    # 10 MB of prompt, compressed to 10 KB (a 10 MB prompt used over 6 GB).
    prompt = b"a, " * 3_500_000 + b"\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    ztxt = png_chunk(b"zTXt", b"parameters\0\0" + zlib.compress(prompt, 9))
    itxt = png_chunk(b"iTXt", b"parameters\0\0\0\0\0" + prompt[:700_000])
    for name, chunk in (("ztxt", ztxt), ("itxt", itxt)):
        path = png_file(tmp_path / f"{name}.png", 1, 1, after=chunk)
        message = run_bounded(
            refusal(f"read_parameters({str(path)!r})", ""),
            imports="from stable_diffusion.images import read_parameters",
            megabytes=30,
            seconds=2,
        )
        assert "more than generation parameters need" in message


def test_long_parameters_text_is_refused_and_linear() -> None:
    # A1111's field pattern was quadratic: a 20,000-character line took 5 s.
    line = "a" * limits.MAX_PARAMETERS_TEXT
    start = time.perf_counter()
    with pytest.raises(ValueError, match="no generation parameters found"):
        GenerationParameters.from_text(line)
    assert time.perf_counter() - start < 1
    with pytest.raises(ValueError, match="more than the 150,000"):
        GenerationParameters.from_text(line + "a")
    with pytest.raises(ValueError, match="prompt has 10,001 characters"):
        GenerationParameters.from_text("a" * 10_001 + "\n" + PARAMETERS.split("\n")[1])


def test_oversize_img2img_input_is_refused_from_its_header(tmp_path: Path) -> None:
    # 8192x8192 RGBA cost 2 GB before the refusal; the pixel data here is never read.
    path = png_file(tmp_path / "big.png", 8192, 8192, channels=4, idat=zlib.compress(b"\0"))
    message = run_bounded(
        refusal(f"load_image({str(path)!r})", ""),
        imports="from stable_diffusion.images import load_image",
        megabytes=30,
        seconds=2,
    )
    assert "8192x8192, too large" in message and "resize it first" in message
    with pytest.raises(ValueError, match="too large"):
        load_image(png_file(tmp_path / "edge.png", 4096, 4097, idat=zlib.compress(b"\0")))


# --- atomic writes ------------------------------------------------------------------------------


def save_with_full_disk(path: Path, overwrite: bool) -> str:
    """Save a 64x64 noise PNG (12 KB, incompressible) with files limited to 4 KB."""
    return run_bounded(
        refusal(
            f"save_images(np.random.default_rng(0).random((64, 64, 3)), {str(path)!r}, "
            f"PARAMETERS, overwrite={overwrite})",
            f"""
import resource, signal
import numpy as np
from stable_diffusion.images import GenerationParameters, save_images
PARAMETERS = GenerationParameters.from_text({PARAMETERS!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG, as a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
""",
        ),
        megabytes=100,
        seconds=10,
    )


@pytest.mark.parametrize("overwrite", [True, False])
def test_full_disk_leaves_the_old_file_and_nothing_partial(tmp_path: Path, overwrite: bool) -> None:
    target = tmp_path / "out.png"
    save_images(np.zeros((1, 8, 8, 3)), target, GenerationParameters.from_text(PARAMETERS))
    good = target.read_bytes()
    message = save_with_full_disk(target, overwrite)
    assert f"cannot save {target if overwrite else tmp_path / 'out_1.png'}" in message
    assert "Nothing was written, and any existing file is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert target.read_bytes() == good


def test_saved_files_are_complete_and_readable(tmp_path: Path) -> None:
    parameters = GenerationParameters.from_text(PARAMETERS)
    first = save_images(np.zeros((1, 8, 8, 3)), tmp_path / "out.png", parameters)
    second = save_images(np.ones((1, 8, 8, 3)), tmp_path / "out.png", parameters)
    replaced = save_images(np.ones((1, 8, 8, 3)), tmp_path / "out.png", parameters, overwrite=True)
    assert [p.name for p in first + second + replaced] == ["out.png", "out_1.png", "out.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "out_1.png"]
    assert read_parameters(tmp_path / "out.png") == parameters
    assert np.asarray(load_image(tmp_path / "out.png", multiple=8)[0]).min() == 1.0
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
