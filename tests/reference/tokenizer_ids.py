"""Reference ids for tests/test_tokenizer.py, from transformers' CLIP tokenizer.

Run from the repository root (needs transformers, not torch):

    python -m tests.reference.tokenizer_ids

It writes tests/fixtures/tokenizer/:

- `tokenizer/` and `tokenizer_2/`: a small but consistent CLIP vocabulary (byte tokens, the first
  SMALL_MERGES merges, the two special tokens) laid out like the tokenizer folders of the SD 1.5
  and SDXL hub repos, with pad tokens "<|endoftext|>" and "!".
- `ids.json`: the prompts below and, for the full and the small vocabulary with each pad token,
  transformers' ids without special tokens (`tokens`) and with padding="max_length",
  max_length=77, truncation=True (`input_ids`, cut after the last attended position; the rest
  is padding).

The vocabulary is derived here the way OpenAI's simple_tokenizer.py does it, from the copy of
bpe_simple_vocab_16e6.txt.gz in the open-clip-torch install, independently of
stable_diffusion.tokenizer; its hash lets the tests check the package's derivation.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import sys
import tempfile
from pathlib import Path

import transformers

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer"
SMALL_MERGES = 2000
MAX_LENGTH = 77
PAD_TOKENS = ("<|endoftext|>", "!")

LONG_PROMPT = (
    "a highly detailed matte painting of a sprawling futuristic city at dusk, towering glass "
    "skyscrapers, flying cars, neon signs reflected in rain puddles, crowded street markets, "
    "volumetric fog, cinematic lighting, dramatic clouds, ultra wide angle lens, intricate "
    "architecture, art by several famous concept artists, trending on artstation, octane render, "
    "unreal engine, 8k resolution, sharp focus, vivid colors, masterpiece, best quality"
)

# Upper-case spellings of the special tokens ("<|ENDOFTEXT|>") are left out on purpose: whether
# transformers maps them to the special id depends on the `normalized` flags in each repo's
# config, which stable_diffusion.tokenizer does not model.
PROMPTS = [
    "",
    " ",
    "\n\t  \r\n",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A HoRsE",
    "Hello, World!!! ... ??? !?! wow!!! really?!",
    "it's John's cat; they're here, we've seen, I'm sure you'll see, he'd say don't",
    "IT'S JOHN'S CAT, THEY'RE HERE, WE'VE, I'M, YOU'LL, HE'D, DON'T",
    "'s 't 're 've 'm 'll 'd ''s '''",
    "1234567890 3.14159 1,000,000 $99.99 50% 2nd 4k 8K 1920x1080 uhd",
    "emoji 😀🎨🖼️👍🏽 ❤️ 🇯🇵 👨‍👩‍👧",
    "東京の夜景、ネオン、雨の中の猫",
    "一只可爱的小猫坐在窗台上",
    "한국어 프롬프트 테스트",
    "Ελληνικά ΣΟΦΙΑ ΟΔΟΣ σοφία",
    "Привет, мир! Ёлка",
    "مرحبا بالعالم",
    "हिन्दी नमस्ते दुनिया",
    "café naïve résumé Ångström Zoë façade Straße İstanbul",
    "cafe\u0301 nai\u0308ve",
    "multiple   spaces\tand\t\ttabs\nnewlines\r\n\r\nend  ",
    "<b>bold</b> &amp; <i>italic</i> &lt;tag&gt; <br/> <a href='x'>link</a>",
    "(masterpiece:1.2), [best quality], {detailed}, ((ultra-detailed)), <lora:foo_v2:0.8>",
    "snake_case kebab-case CamelCase path/to/file.png https://example.com/?q=1&x=2 #tag @user",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis xqzvjjjj",
    "a <|endoftext|> b <|startoftext|>cat<|endoftext|>",
    "?<|endoftext|>> x<|startoftext|>!",
    "zero\u200bwidth soft\u00adhyphen nbsp\u00a0here ideographic\u3000space line\u2028sep",
    "null\x00byte bell\x07 escape\x1b[0m unit\x1fsep vtab\x0bff\x0c replacement\ufffd",
    "ﬁnal ligature ½ ² ⅷ ① Ⅻ ｆｕｌｌｗｉｄｔｈ",
    "math ∑∫√∞≠≤ arrows →⇒ symbols ©®™ § ¶ † ‡ • … «quotes» “smart” ‘single’",
    "cat " * 75,
    "cat " * 76,
    LONG_PROMPT,
    LONG_PROMPT + ", " + LONG_PROMPT,
]


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's simple_tokenizer.bytes_to_unicode, verbatim in behaviour."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def openai_vocabulary(max_merges: int | None) -> tuple[list[str], list[tuple[str, str]]]:
    """Token list (in id order) and merges, as OpenAI's SimpleTokenizer.__init__ builds them."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open-clip-torch is needed for its bpe_simple_vocab_16e6.txt.gz")
    bpe_path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    lines = lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines[:max_merges]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(merge) for merge in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return vocab, merges


def vocabulary_hash(tokens: list[str], merges: list[tuple[str, str]]) -> str:
    payload = json.dumps([tokens, [list(m) for m in merges]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def added_token(content: str) -> dict:
    # How the SD hub repos spell their special tokens in the tokenizer configs.
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer_folder(
    folder: Path, tokens: list[str], merges: list[tuple[str, str]], pad_token: str
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    specials = {
        "bos_token": added_token("<|startoftext|>"),
        "eos_token": added_token("<|endoftext|>"),
        "pad_token": pad_token,
        "unk_token": added_token("<|endoftext|>"),
    }
    config = {
        **specials,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def reference_ids(folder: Path) -> dict:
    # The `tokenizers`-backed class: what transformers 5 calls CLIPTokenizer and what diffusers
    # runs with it. transformers 4's CLIPTokenizer is a legacy pure-Python one; where it exists,
    # its disagreements are printed for information.
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(folder)
    legacy = None
    if transformers.CLIPTokenizer is not transformers.CLIPTokenizerFast:
        legacy = transformers.CLIPTokenizer.from_pretrained(folder)
    tokens, input_ids = [], []
    for prompt in PROMPTS:
        tokens.append(tokenizer(prompt, add_special_tokens=False).input_ids)
        out = tokenizer(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True)
        assert len(out.input_ids) == MAX_LENGTH
        input_ids.append(out.input_ids[: sum(out.attention_mask)])
        if legacy is not None and legacy(prompt).input_ids != tokenizer(prompt).input_ids:
            print(f"legacy CLIPTokenizer differs on {prompt!r}", file=sys.stderr)
    return {"pad_id": tokenizer.pad_token_id, "tokens": tokens, "input_ids": input_ids}


def dump(data: dict) -> str:
    text = json.dumps(data, indent=1, ensure_ascii=True)
    # One line per id list keeps the file short and its diffs readable.
    return re.sub(r"\[\s+([\d,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s", "", m[1]) + "]", text)


def main() -> None:
    vocabularies = {"full": openai_vocabulary(None), "small": openai_vocabulary(SMALL_MERGES)}
    small_tokens, small_merges = vocabularies["small"]
    for name, pad_token in zip(("tokenizer", "tokenizer_2"), PAD_TOKENS, strict=True):
        write_tokenizer_folder(FIXTURE_DIR / name, small_tokens, small_merges, pad_token)

    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab_name, (tokens, merges) in vocabularies.items():
            for pad_token in PAD_TOKENS:
                folder = Path(tmp) / f"{vocab_name}-{len(pad_token)}"
                write_tokenizer_folder(folder, tokens, merges, pad_token)
                cases[f"{vocab_name}/{pad_token}"] = reference_ids(folder)

    data = {
        "generator": f"transformers {transformers.__version__} CLIPTokenizerFast",
        "max_length": MAX_LENGTH,
        "small_merges": SMALL_MERGES,
        "vocabulary_sha256": {
            name: vocabulary_hash(tokens, merges) for name, (tokens, merges) in vocabularies.items()
        },
        "prompts": PROMPTS,
        "cases": cases,
    }
    (FIXTURE_DIR / "ids.json").write_text(dump(data) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE_DIR}")


if __name__ == "__main__":
    main()
