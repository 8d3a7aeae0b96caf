"""Fuzzing: whatever a user points us at, the only error that may escape is ValueError."""

import io
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from stable_diffusion import images
from stable_diffusion.images import load_image, read_parameters
from stable_diffusion.parameters import GenerationParameters

pytestmark = pytest.mark.slow  # deselect with -m "not slow"; CI runs them

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _seed_files() -> dict[str, bytes]:
    noise = np.random.default_rng(0).integers(0, 255, (40, 24, 4), dtype=np.uint8)
    rgba = Image.fromarray(noise, "RGBA")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "cat\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 8x8")
    info.add_itxt("comment", "日本語", zip=True)
    png = io.BytesIO()
    rgba.save(png, format="PNG", pnginfo=info)

    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = io.BytesIO()
    rgba.convert("RGB").save(jpeg, format="JPEG", exif=exif.tobytes())

    palette = io.BytesIO()
    rgba.convert("P").save(palette, format="PNG", transparency=0)
    return {"png": png.getvalue(), "jpeg": jpeg.getvalue(), "palette": palette.getvalue()}


SEEDS = _seed_files()


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip":
            data[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position : position + draw(st.integers(1, 64))]
        if not data:
            break
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module", autouse=True)
def small_size_limit():
    # Mutated headers can claim huge sizes; a lower limit keeps each example fast while
    # exercising the same refusal path.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "MAX_INPUT_PIXELS", 1024 * 1024)
        yield


def _with_file(data: bytes, action) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.img"
        path.write_bytes(data)
        try:
            action(path)
        except ValueError as e:
            assert "fuzz.img" in str(e)  # errors name the file


@pytest.mark.filterwarnings("ignore:.*EXIF:UserWarning", "ignore:Tag data:UserWarning")
@FUZZ
@given(data=mutated_files(), multiple=st.sampled_from([1, 8, 64]))
def test_load_image_only_raises_value_error(data, multiple):
    def check(path: Path) -> None:
        pixels, message = load_image(path, multiple=multiple)
        assert pixels.dtype == np.float32
        assert pixels.ndim == 3 and pixels.shape[2] == 3
        assert pixels.shape[0] % multiple == 0 and pixels.shape[1] % multiple == 0
        assert pixels.min() >= 0.0 and pixels.max() <= 1.0
        assert message is None or isinstance(message, str)

    _with_file(data, check)


@pytest.mark.filterwarnings("ignore:.*EXIF:UserWarning", "ignore:Tag data:UserWarning")
@FUZZ
@given(data=mutated_files())
def test_read_parameters_only_raises_value_error(data):
    _with_file(data, lambda path: read_parameters(path))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


@st.composite
def text_chunks(draw) -> bytes:
    """A tEXt, zTXt or iTXt chunk, maybe named "parameters", whose text may be empty, long,
    not UTF-8, or a zlib stream that inflates far past the text budget."""
    kind = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt"]))
    keyword = draw(st.sampled_from([b"parameters", b"comment", b"", b"parameters\0x"]))
    text = draw(
        st.one_of(
            st.binary(max_size=32),
            st.integers(0, 2 * images._MAX_PARAMETERS_BYTES).map(lambda n: b"a" * n),
            st.sampled_from(
                [b"cat\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 8x8", b"\xff\xfe"]
            ),
        )
    )
    compressed = kind == b"zTXt" or (kind == b"iTXt" and draw(st.booleans()))
    if compressed and draw(st.booleans()):
        text = zlib.compress(text)
    if kind == b"zTXt":
        body = b"\0" + text
    elif kind == b"iTXt":
        body = (b"\1" if compressed else b"\0") + b"\0" + b"en\0\0" + text
    else:
        body = text
    return _png_chunk(kind, keyword + b"\0" + body)


@FUZZ
@given(chunks=st.lists(text_chunks(), max_size=3), before=st.booleans())
def test_read_parameters_text_chunks(chunks, before):
    png = SEEDS["png"]  # chunks go right after IHDR, or just before IEND
    at = 33 if before else len(png) - 12
    _with_file(png[:at] + b"".join(chunks) + png[at:], read_parameters)


# Pieces of real parameter text, so that the fuzzer reaches past the first checks.
_FRAGMENTS = [
    "Steps: 20",
    "Sampler: Euler a",
    "CFG scale: 7",
    "Seed: -1",
    "Size: 512x512",
    "Model: m",
    "Denoising strength: 0.5",
    'Lora: "<lora:a:0.5>"',
    "Lora: <lora:x:>",
    "Schedule type: Karras",
    'Prompt: "x\\ny"',
    'Negative prompt: "\\ud800"',
    "Negative prompt:",
    '"',
    "\\",
    ", ",
    ": ",
    "\n",
    "x",
    "1e999",
    "9" * 5000,
]


@FUZZ
@given(
    st.one_of(
        st.text(),
        st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=5)), max_size=20).map(
            "".join
        ),
    )
)
def test_from_text_only_raises_value_error(text):
    try:
        parameters = GenerationParameters.from_text(text)
    except ValueError:
        return
    assert GenerationParameters.from_text(parameters.to_text()) == parameters
