"""The benchmark's entry point on the tiny architectures (timings are never asserted), and
its FLOP counter against a count by hand."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import benchmarks.reference
from benchmarks import flops, measure, report, whole_image
from benchmarks import ranks as ranks_benchmark
from benchmarks import run as benchmark
from benchmarks import server as server_benchmark
from benchmarks.architectures import ARCHITECTURES
from benchmarks.random_weights import (
    weights_on_disk,
    write_random_pipeline,
    write_random_tiny_autoencoder,
)
from benchmarks.reference import reference_dtypes
from benchmarks.scripts import Run
from stable_diffusion import fast_cpu
from stable_diffusion.config import AutoencoderConfig, TextEncoderConfig, UNetConfig
from stable_diffusion.cpu import in_fast_cpu

FIXTURES = Path(__file__).parent / "fixtures" / "models"
TABLE_COLUMNS = [
    "load s",
    "text s",
    "UNet step s",
    "UNet GFLOP/s",
    "% of matmul",
    "VAE decode s",
    "image s (1 steps, load included)",
    "peak GiB",
    "weights GiB",
]
ROW_FIELDS = [
    "load_s",
    "weights_gb",
    "text_s",
    "unet_step_s",
    "unet_gflops",
    "unet_matmul_pct",
    "vae_decode_s",
    "vae_gflops",
    "image_s",
    "peak_gb",
]


def run(tmp_path, capsys, *extra: str, dtypes: str = "float32") -> tuple[dict, str]:
    output = tmp_path / "results.json"
    benchmark.main(
        [
            "--models",
            "tiny",
            "--dtypes",
            dtypes,
            "--size",
            "64",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--output",
            str(output),
            *extra,
        ]
    )
    return json.loads(output.read_text()), capsys.readouterr().out


def test_tiny_run_writes_the_results_and_prints_the_table(tmp_path, capsys):
    results, printed = run(tmp_path, capsys, "--workdir", str(tmp_path / "models"))

    # On a CPU every dtype computes in float32: one rate.
    assert list(results["matmul_gflops"]) == ["float32"]
    assert results["matmul_gflops"]["float32"] > 0
    assert {"cpu", "cores", "ram_gb", "mlx", "device"} <= results["machine"].keys()
    # tests/conftest.py keeps float32 out of oneDNN: the results say which ran.
    assert results["machine"]["float32_through_onednn"] is False
    assert "float32 through oneDNN" not in printed
    assert [(r["model"], r["dtype"], r["batch"]) for r in results["rows"]] == [
        ("tiny", "float32", 1),
        ("tiny", "float32", 2),
    ]
    for row in results["rows"]:
        assert all(row[field] > 0 for field in ROW_FIELDS), row
    header = next(line for line in printed.splitlines() if line.startswith("| model"))
    assert all(f"| {column} |" in header for column in TABLE_COLUMNS)
    assert sum(line.startswith("| tiny | float32 |") for line in printed.splitlines()) == 2
    assert "within fast_cpu()" in printed
    assert not (tmp_path / "models" / "tiny").exists()  # the random weights are cleaned up


def test_float16_and_quantized_are_measured_in_full(tmp_path, capsys):
    # On a CPU they compute in float32, their weights converted as each layer runs.
    results, _ = run(tmp_path, capsys, dtypes="float32,float16,q8")
    assert [(r["dtype"], r["batch"]) for r in results["rows"]] == [
        (dtype, batch) for dtype in ("float32", "float16", "q8") for batch in (1, 2)
    ]
    for row in results["rows"]:
        assert all(row[field] > 0 for field in ROW_FIELDS), row
    weights = {r["dtype"]: r["weights_gb"] for r in results["rows"]}
    assert weights["q8"] < weights["float16"] < weights["float32"]


def test_the_command_runs_from_the_repository_root(tmp_path):
    # As the README gives it, in a process of its own.
    output = tmp_path / "results.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--models",
        "tiny",
        "--dtypes",
        "float32",
        "--size",
        "64",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--output",
        str(output),
    ]
    ran = subprocess.run(
        command, check=True, cwd=Path(__file__).parent.parent, capture_output=True, text=True
    )
    assert "mlx.core was imported before stable_diffusion" not in ran.stderr
    assert [row["batch"] for row in json.loads(output.read_text())["rows"]] == [1, 2]


def test_too_little_disk_stops_before_measuring(tmp_path, monkeypatch):
    needed = weights_on_disk(ARCHITECTURES["tiny"], float16=True)
    assert needed == 6 * weights_on_disk(ARCHITECTURES["tiny"], False) // 4
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(benchmark.shutil, "disk_usage", lambda _: usage._replace(free=needed - 1))
    monkeypatch.setattr(benchmark, "matmul_rates", lambda *_: pytest.fail("measured"))
    with pytest.raises(SystemExit, match=r"tiny.s random weights need .* --workdir"):
        benchmark.main(
            [
                "--models",
                "tiny",
                "--dtypes",
                "float32,float16",
                "--workdir",
                str(tmp_path / "new" / "folder"),
            ]
        )
    assert not (tmp_path / "new").exists()


def test_lazy_run_measures_without_fast_cpu(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fast_cpu() entered despite --lazy")

    monkeypatch.setattr(measure, "fast_cpu", refuse)
    results, printed = run(tmp_path, capsys, "--lazy")
    assert results["settings"]["lazy"] is True
    assert len(results["rows"]) == 2 and all(row["unet_step_s"] > 0 for row in results["rows"])
    assert "lazy, without fast_cpu()" in printed


def test_each_phase_runs_in_a_fast_cpu_block_of_its_own(tmp_path, capsys, monkeypatch):
    # As the scripts run, the UNet before the decode, each phase in a block of its own:
    # leaving one empties MLX's buffer cache.
    blocks, phases = [], []

    @contextlib.contextmanager
    def counted(*models, **options):
        blocks.append(len(blocks))
        with fast_cpu(*models, **options):
            yield

    def recorded(name, function):
        def call(*args, **kwargs):
            phases.append((name, blocks[-1], in_fast_cpu()))
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(measure, "fast_cpu", counted)
    for name in ("_decode_seconds", "_measure"):
        monkeypatch.setattr(measure, name, recorded(name, getattr(measure, name)))
    run(tmp_path, capsys)
    assert [name for name, _, _ in phases] == ["_measure", "_measure", "_decode_seconds"]
    assert all(inside for _, _, inside in phases)
    assert len({block for _, block, _ in phases}) == 3


def test_reference_run_checks_the_same_weights_and_prints_the_speed_ups(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("diffusers")
    # The reference runs in the environment the benchmark was started in, not in the one
    # stable_diffusion's import adjusted for its OpenBLAS.
    launched = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    launched["OMP_MARKER"] = "launch"
    monkeypatch.setattr(benchmarks.reference, "LAUNCH_ENVIRONMENT", launched)
    results, printed = run(tmp_path, capsys, "--reference")

    (reference,) = results["reference"]
    setup = reference["setup"]
    assert setup["threads"] == setup["cores"] == len(os.sched_getaffinity(0))
    assert setup["attention_processors"] == ["AttnProcessor2_0"]  # PyTorch's fused attention
    assert setup["memory_format"] == "channels_last"
    assert setup["environment"]["OMP_MARKER"] == "launch"
    assert "OPENBLAS_THREAD_TIMEOUT" not in setup["environment"]
    assert reference["unet_max_rel_error"] < 1e-4
    assert reference["vae_max_rel_error"] < 1e-4
    # On a CPU PyTorch runs in float32 only.
    timings = {key for key in reference if key.startswith("float")}
    assert timings == {
        "float32_unet_step_s_batch1",
        "float32_unet_step_s_batch2",
        "float32_vae_decode_s",
    }
    assert all(reference[key] > 0 for key in timings)
    assert "PyTorch UNet step s" in printed
    assert (
        sum(
            line.startswith("| tiny | ") and line.endswith("|")
            for line in printed.split("PyTorch UNet step s")[1].splitlines()
        )
        == 2
    )


def test_unet_flops_match_a_count_by_hand():
    # One level of 8 channels, one resnet per block, on 2x2 latents with 3 context tokens
    # of width 4: every multiply-add below is counted by hand.
    config = UNetConfig(
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=4,
        attention_head_dim=1,
        norm_num_groups=4,
    )
    pixels, time_dims = 4, 32
    time_embedding = 8 * time_dims + time_dims * time_dims
    conv_in = pixels * 4 * 8 * 9
    resnet_8_8 = 2 * pixels * 8 * 8 * 9 + time_dims * 8
    transformer = (
        2 * pixels * 8 * 8  # proj_in, proj_out
        + 4 * pixels * 8 * 8
        + 2 * pixels * pixels * 8  # self-attention: q k v out, QK^T and PV
        + 2 * pixels * 8 * 8
        + 2 * 3 * 4 * 8
        + 2 * pixels * 3 * 8  # cross-attention
        + pixels * 8 * 64
        + pixels * 32 * 8  # GEGLU (8 -> 2 x 32) and 32 -> 8
    )
    # Up block: two resnets of 16 (8 + skip) -> 8 channels, with a 1x1 shortcut.
    resnet_16_8 = pixels * 16 * 8 * 9 + pixels * 8 * 8 * 9 + pixels * 16 * 8 + time_dims * 8
    conv_out = pixels * 8 * 4 * 9
    macs = (
        time_embedding
        + conv_in
        + resnet_8_8  # down block
        + 2 * resnet_8_8
        + transformer  # mid block
        + 2 * resnet_16_8
        + conv_out
    )
    assert flops.unet_flops(config, 1, 2, 2, context_tokens=3) == 2 * macs
    assert flops.unet_flops(config, 2, 2, 2, context_tokens=3) == 4 * macs


def test_vae_and_text_encoder_flops_match_a_count_by_hand():
    vae = AutoencoderConfig(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4
    )
    small, large = 4, 16  # pixels before and after the one upsampling
    decoder = (
        small * 4 * 4  # post_quant_conv
        + small * 4 * 16 * 9  # conv_in
        + 2 * 2 * small * 16 * 16 * 9  # mid resnets
        + 4 * small * 16 * 16
        + 2 * small * small * 16  # mid attention
        + 2 * 2 * small * 16 * 16 * 9  # up block 0: two resnets 16 -> 16
        + large * 16 * 16 * 9  # its upsampler's convolution
        + large * 9 * (16 * 8 + 8 * 8)
        + large * 16 * 8  # up block 1: resnet 16 -> 8 ...
        + large * 9 * (8 * 8 + 8 * 8)  # ... and resnet 8 -> 8
        + large * 8 * 3 * 9  # conv_out
    )
    assert flops.vae_decode_flops(vae, 1, 2, 2) == 2 * decoder

    text = TextEncoderConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        projection_dim=4,
        with_projection=True,
    )
    layer = 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8 + 2 * 5 * 8 * 16
    assert flops.text_encoder_flops(text, 3, tokens=5) == 2 * 3 * (2 * layer + 8 * 4)


def test_on_a_gpu_pytorch_also_runs_float16(monkeypatch):
    import mlx.core as mx

    assert reference_dtypes(["float32", "float16", "q8"]) == ["float32"]
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert reference_dtypes(["float32", "float16", "q8"]) == ["float32", "float16"]
    assert reference_dtypes(["q8", "float32"]) == ["float32"]


def test_the_comparison_table_has_a_row_per_dtype_pytorch_ran():
    row = {"model": "tiny", "load_s": 1.0, "weights_gb": 0.1, "vae_decode_s": 2.0}
    rows = [
        {**row, "dtype": dtype, "batch": batch, "unet_step_s": step}
        for dtype, step in (("float32", 1.0), ("float16", 0.5), ("q8", 0.6))
        for batch in (1, 2)
    ]
    reference = {"model": "tiny", "unet_max_rel_error": 1e-6, "vae_max_rel_error": 2e-6}
    for dtype, seconds in (("float32", 2.0), ("float16", 1.5)):
        reference |= {
            f"{dtype}_unet_step_s_batch1": seconds,
            f"{dtype}_unet_step_s_batch2": 2 * seconds,
            f"{dtype}_vae_decode_s": 3.0,
        }
    results = {
        "settings": {"steps": 1, "size": 512, "lazy": False},
        "machine": {
            "cpu": "x",
            "cores": 16,
            "ram_gb": 128,
            "mlx": "0",
            "device": "Device(gpu, 0)",
            "gpu": "H200",
        },
        "matmul_gflops": {"float32": 1000.0, "float16": 5000.0},
        "rows": rows,
        "reference": [reference],
    }
    table = report.markdown_tables(results)
    assert "on Device(gpu, 0) (H200)" in table and "5000 GFLOP/s in float16" in table
    assert "fast_cpu" not in table  # it changes nothing on a GPU
    comparison = table.split("PyTorch UNet step s")[1].splitlines()
    assert [line.split(" | ")[1:4] for line in comparison if line.startswith("| tiny")] == [
        ["float32", "1", "1.00"],
        ["float32", "2", "1.00"],
        ["float16", "1", "0.500"],
        ["float16", "2", "0.500"],
    ]
    assert "| 1.00 | 2.00 | 2.00x |" in table and "| 0.500 | 3.00 | 6.00x |" in table


def test_rounds_alternate_both_sides_float32_timings(tmp_path, capsys):
    pytest.importorskip("diffusers")
    # In PyTorch's default layout, as the runs before channels_last measured it.
    results, printed = run(
        tmp_path, capsys, "--reference", "--rounds", "2", "--reference-memory-format", "contiguous"
    )

    (reference,) = results["reference"]
    assert reference["setup"]["memory_format"] == "contiguous"
    assert len(reference["rounds"]) == 2
    first = reference["rounds"][0]
    # The first round is the full measurement's float32 timings, on both sides.
    assert first["mlx"]["unet_step_s_batch2"] == results["rows"][1]["unet_step_s"]
    assert first["pytorch"]["vae_decode_s"] == reference["float32_vae_decode_s"]
    for each in reference["rounds"]:
        for side in ("mlx", "pytorch"):
            assert sorted(each[side]) == [
                "unet_step_s_batch1",
                "unet_step_s_batch2",
                "vae_decode_s",
            ]
            assert all(seconds > 0 for seconds in each[side].values())
    assert "round 2 of 2" in printed and "over 2 rounds" in printed


def test_the_comparison_table_takes_medians_over_rounds():
    row = {
        "model": "tiny",
        "dtype": "float32",
        "load_s": 1.0,
        "weights_gb": 0.1,
        "vae_decode_s": 9.0,
        "unet_step_s": 9.0,
    }
    rows = [{**row, "batch": batch} for batch in (1, 2)]
    seconds = {
        "unet_step_s_batch1": [(1.0, 2.0), (2.0, 2.2), (1.5, 3.3)],  # MLX, PyTorch
        "unet_step_s_batch2": [(2.0, 3.0), (2.0, 3.0), (2.0, 3.0)],
        "vae_decode_s": [(4.0, 4.0), (4.0, 5.0), (5.0, 4.0)],
    }
    rounds = [
        {
            side: {key: pairs[i][j] for key, pairs in seconds.items()}
            for j, side in enumerate(("mlx", "pytorch"))
        }
        for i in range(3)
    ]
    reference = {
        "model": "tiny",
        "unet_max_rel_error": 1e-6,
        "vae_max_rel_error": 2e-6,
        "float32_unet_step_s_batch1": 9.0,
        "float32_unet_step_s_batch2": 9.0,
        "float32_vae_decode_s": 9.0,
        "rounds": rounds,
    }
    results = {
        "settings": {"steps": 1, "size": 512, "lazy": False},
        "machine": {"cpu": "x", "cores": 2, "ram_gb": 24, "mlx": "0", "device": "Device(cpu, 0)"},
        "matmul_gflops": {"float32": 200.0},
        "rows": rows,
        "reference": [reference],
    }
    table = report.markdown_tables(results)
    # Medians of each side (1.5 and 2.2 s), and of the rounds' ratios (2.0, 1.1, 2.2).
    assert (
        "| tiny | float32 | 1 | 1.50 | 2.20 | 2.00x (2.00 / 1.10 / 2.20) "
        "| 4.00 | 4.00 | 1.00x (1.00 / 1.25 / 0.80) |"
    ) in table
    assert "| tiny | float32 | 2 | 2.00 | 3.00 | 1.50x (1.50 / 1.50 / 1.50) |" in table
    assert "over 3 rounds" in table
    assert "float32 through oneDNN" not in table
    results["machine"]["float32_through_onednn"] = True
    assert "; within fast_cpu(), float32 through oneDNN\n" in report.markdown_tables(results)


def test_float32_matmul_rate_is_measured_as_fast_cpu_runs_it(monkeypatch):
    """On the CPU the UNet's "% of matmul" compares with the linear layers of `fast_cpu()`
    (oneDNN's float32 where it runs), not with MLX's matmul, unless the run is lazy."""
    monkeypatch.setattr(measure, "matmul_gflops", lambda dtype: 100.0)
    monkeypatch.setattr(measure, "fast_cpu_matmul_gflops", lambda bfloat16: 300.0 + bfloat16)
    assert measure.matmul_rates(["float32"]) == {"float32": 300.0}
    assert measure.matmul_rates(["float32"], lazy=True) == {"float32": 100.0}
    assert measure.matmul_rates(["float32", "bfloat16"]) == {"float32": 300.0, "bfloat16": 301.0}


@pytest.mark.parametrize("extra", [["--rounds", "2"], ["--reference", "--rounds", "0"]])
def test_rounds_need_the_reference_and_at_least_one(extra, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--models", "tiny", *extra])
    assert "--rounds" in capsys.readouterr().err


# -- whole runs: the server against the scripts, one process against ranks -------------------

TINY_RUN = ("--model", "tiny", "--size", "64", "--steps", "2", "--cfg", "7.5")


def test_server_benchmark_times_both_sides_and_finds_the_same_pixels(tmp_path, capsys):
    """Issue 21's measurement on the tiny architecture: the real server on a loopback port,
    the real script in fresh processes; the model folder is written once and reused."""
    workdir = tmp_path / "models"
    output = tmp_path / "server.json"
    results = server_benchmark.main([*TINY_RUN, "--workdir", str(workdir), "--output", str(output)])
    assert json.loads(output.read_text()) == results
    assert results["equal"] == [True, True]
    scripts, server = results["scripts"], results["server"]
    assert len(scripts) == 2 and len(server["requests_s"]) == 2
    for run_ in scripts:
        # The script's own report: a load and a generation inside the run's wall time.
        assert 0 <= run_["load_s"] + run_["generation_s"] <= run_["wall_s"] + 0.1
    assert server["startup_s"] > 0 and all(s > 0 for s in server["requests_s"])
    summary = results["summary"]
    assert summary["server, load excluded"] == [
        server["requests_s"][0],
        server["requests_s"][0] + server["requests_s"][1],
    ]
    assert summary["scripts, load included"][1] == scripts[0]["wall_s"] + scripts[1]["wall_s"]
    printed = capsys.readouterr().out
    assert "| server, load included |" in printed and "Same pixels on both sides." in printed

    written = workdir / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = written.stat().st_mtime_ns
    server_benchmark.main([*TINY_RUN, "--workdir", str(workdir), "--output", str(output)])
    assert written.stat().st_mtime_ns == stamp  # reused, not written again
    assert "Reusing the random-weight model" in capsys.readouterr().out


def test_server_benchmark_fails_when_the_pixels_differ(tmp_path, monkeypatch, capsys):
    real = server_benchmark.txt2img

    def darker(port, payload, timeout):
        seconds, image = real(port, payload, timeout)
        return seconds, image // 2

    monkeypatch.setattr(server_benchmark, "txt2img", darker)
    with pytest.raises(SystemExit, match="the server's images differ from the scripts'"):
        server_benchmark.main(
            [*TINY_RUN, "--workdir", str(tmp_path), "--output", str(tmp_path / "r.json")]
        )
    assert "THE IMAGES DIFFER" in capsys.readouterr().out


def test_ranks_benchmark_measures_both_runs_the_gather_and_the_scaling(tmp_path, capsys):
    output = tmp_path / "ranks.json"
    results = ranks_benchmark.main(
        [
            *TINY_RUN,
            "--n-images",
            "3",
            "--repeats",
            "10",
            "--workdir",
            str(tmp_path),
            "--output",
            str(output),
        ]
    )
    assert results["equal"] is True
    for row in (results["one_process"], results["ranks"]):
        assert row["images_per_s"] == pytest.approx(3 / row["wall_s"])
        # The scripts print their timings to 0.01 s: a tiny model's load may print 0.00.
        assert row["generation_s"] > 0 and row["load_s"] >= 0
    gather = results["gather"]
    assert gather["ranks"] == 2 and gather["repeats"] == 10
    assert gather["image_bytes"] == 64 * 64 * 3
    assert 0 < gather["p10_s"] <= gather["median_s"] <= gather["p90_s"]
    c, s = results["per_image_s"], results["save_s"]
    assert c == pytest.approx(results["one_process"]["generation_s"] / 3) and s > 0
    for link, rows in results["scaling"].items():
        bandwidth = ranks_benchmark.BANDWIDTHS[link]
        assert [r["machines"] for r in rows] == [1, 2, 4, 8, 16]
        assert rows[0]["images_per_s"] == pytest.approx(1 / (c + s))
        t = 64 * 64 * 3 / bandwidth
        assert rows[2]["images_per_s"] == pytest.approx(4 / (c + 4 * s + 3 * t))
    printed = capsys.readouterr().out
    assert "| mlx.launch -n 2 --backend ring |" in printed and "Same pixels" in printed


def test_expected_rate_follows_the_formula_by_hand():
    # c = 10 s per image, s = 0.5 s per save, 1 s per image over the link: N = 4 makes an
    # image every (10 + 4 * 0.5 + 3 * 1) / 4 = 3.75 s.
    assert ranks_benchmark.expected_rate(4, 10.0, 0.5, 1.0) == pytest.approx(1 / 3.75)
    assert ranks_benchmark.expected_rate(1, 10.0, 0.5, 1.0) == pytest.approx(1 / 10.5)


def test_a_failed_rank_fails_the_ranks_benchmark():
    # mlx.launch itself exits 0 when a rank fails; its warning is what the benchmark reads.
    output = "[rank 0] Denoising\n[WARN] Node with rank 1 exited with code -9\n"
    with pytest.raises(SystemExit, match=r"a rank failed:\n.*rank 1 exited with code -9"):
        ranks_benchmark.check_ranks(Run(1.0, {}, output, 0))
    ranks_benchmark.check_ranks(Run(1.0, {}, "[rank 0] Denoising\n", 0))


def test_openvino_run_checks_parity_first_and_reports_both_precisions(tmp_path, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("diffusers")
    results, printed = run(tmp_path, capsys, "--openvino", "--rounds", "2")

    assert results["reference"] == []  # no PyTorch timings unless --reference
    (openvino,) = results["openvino"]
    setup = openvino["setup"]
    assert setup["float32_precision"] == "f32"
    assert setup["default_precision"] in ("f32", "bf16", "f16")
    assert setup["threads"] >= 1 and setup["cores"] == len(os.sched_getaffinity(0))
    # float32 within the benchmark's tolerance (checked in its process before timing); the
    # default precision's difference is reported, whatever it is.
    assert openvino["unet_max_rel_error"] < 1e-4 and openvino["vae_max_rel_error"] < 1e-4
    assert openvino["default_unet_max_rel_error"] >= 0
    timings = {key for key in openvino if key.endswith(("_batch1", "_batch2", "_decode_s"))}
    assert timings == {
        f"{precision}_{key}"
        for precision in ("float32", "default")
        for key in ("unet_step_s_batch1", "unet_step_s_batch2", "vae_decode_s")
    }
    assert all(openvino[key] > 0 for key in timings)
    assert len(openvino["rounds"]) == 2
    assert all(sorted(r) == ["mlx", "openvino", "openvino_default"] for r in openvino["rounds"])
    table = printed.split("vs OpenVINO")[-1]  # the last: the table, after the progress lines
    assert sum(line.startswith("| tiny | ") for line in table.splitlines()) == 2
    assert f"OpenVINO {setup['default_precision']} s" in table


def test_openvino_stops_before_timing_when_float32_differs(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("diffusers")
    from benchmarks import openvino_process

    folder = tmp_path / "tiny"
    write_random_pipeline(ARCHITECTURES["tiny"], folder)
    inputs = measure.UNetInputs.random(ARCHITECTURES["tiny"].unet, 1, 8, 8)
    arrays = {k: v for k, v in dataclasses.asdict(inputs).items() if v is not None}
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 8, 8, 4), np.float32)
    # Outputs no model computed: the float32 UNet cannot match them.
    expected = {
        "expected_unet_output": rng.standard_normal((1, 8, 8, 4), np.float32),
        "expected_vae_decoded": rng.standard_normal((1, 64, 64, 3), np.float32),
    }
    timed = []
    monkeypatch.setattr(openvino_process, "median_time", lambda *a: timed.append(a) or 1.0)
    with pytest.raises(SystemExit, match=r"float32 UNet differs from MLX's by .* not timed"):
        openvino_process.run(folder, {**arrays, "vae_latents": latents, **expected}, 1, tmp_path)
    assert timed == []


def openvino_results(
    dtypes: tuple[str, ...], sides: tuple[str, ...], seconds: list[tuple[float, ...]]
) -> dict:
    """Results of a tiny run with --openvino over rounds: MLX's rows in `dtypes` (their own
    timings 9.0 s, unused over rounds), and per round each side's seconds (`seconds`, in
    the order of `sides`), the same for every timing."""
    keys = ("unet_step_s_batch1", "unet_step_s_batch2", "vae_decode_s")
    row = {"model": "tiny", "load_s": 1.0, "weights_gb": 0.1, "unet_step_s": 9.0}
    rows = [
        {**row, "dtype": dtype, "batch": b, "vae_decode_s": 9.0} for dtype in dtypes for b in (1, 2)
    ]
    rounds = [
        {side: dict.fromkeys(keys, s) for side, s in zip(sides, each, strict=True)}
        for each in seconds
    ]
    openvino = {
        "model": "tiny",
        "unet_max_rel_error": 1e-6,
        "vae_max_rel_error": 2e-6,
        "default_unet_max_rel_error": 3e-2,
        "default_vae_max_rel_error": 4e-2,
        **{f"{p}_{k}": 9.0 for p in ("float32", "default") for k in keys},
        "rounds": rounds,
        "setup": {"openvino": "2026.4", "default_precision": "bf16"},
    }
    return {
        "settings": {"steps": 1, "size": 512, "lazy": False},
        "machine": {"cpu": "x", "cores": 2, "ram_gb": 24, "mlx": "0", "device": "Device(cpu, 0)"},
        "matmul_gflops": {"float32": 200.0, "bfloat16": 800.0},
        "rows": rows,
        "reference": [],
        "openvino": [openvino],
    }


def test_the_openvino_table_takes_medians_over_rounds():
    # MLX, OpenVINO f32, OpenVINO default: per round, the same for every key.
    seconds = [(1.0, 2.0, 0.5), (2.0, 2.2, 1.0), (1.5, 3.3, 3.0)]
    sides = ("mlx", "openvino", "openvino_default")
    table = report.markdown_tables(openvino_results(("float32",), sides, seconds))
    assert "PyTorch UNet step s" not in table
    # Medians: MLX 1.5, f32 2.2, bf16 1.0; the rounds' speed-ups 2.0 / 1.1 / 2.2 (f32) and
    # 0.5 / 0.5 / 2.0 (bf16).
    f32, bf16 = "2.20 | 2.00x (2.00 / 1.10 / 2.20)", "1.00 | 0.50x (0.50 / 0.50 / 2.00)"
    assert f"| tiny | 1 | 1.50 | {f32} | {bf16} | 1.50 | {f32} | {bf16} " in table
    assert "| 1.0e-06 / 2.0e-06 | 3.0e-02 / 4.0e-02 |" in table
    assert "| OpenVINO bf16 s |" in table and "over 3 rounds" in table


def test_the_openvino_table_sets_mlx_bfloat16_against_openvino_default():
    """With MLX's bfloat16 measured, its medians over the rounds against OpenVINO's default
    precision, beside the float32 comparison."""
    # MLX f32, MLX bf16, OpenVINO f32, OpenVINO default, per round, for every key.
    seconds = [(4.0, 1.0, 2.0, 0.5), (4.0, 2.0, 2.0, 1.0), (4.0, 1.5, 2.0, 3.0)]
    sides = ("mlx", "mlx_bfloat16", "openvino", "openvino_default")
    results = openvino_results(("float32", "bfloat16"), sides, seconds)
    table = report.markdown_tables(results).split("vs OpenVINO 2026.4")[-1]
    # float32: MLX 4.0 against 2.0 (0.50x) and 1.0 (0.25x: 0.12 / 0.25 / 0.75). bfloat16:
    # MLX's median 1.5 against OpenVINO's 1.0, the rounds' speed-ups 0.5 / 0.5 / 2.0.
    f32 = "4.00 | 2.00 | 0.50x (0.50 / 0.50 / 0.50) | 1.00 | 0.25x (0.12 / 0.25 / 0.75)"
    bf16 = "1.50 | 0.50x (0.50 / 0.50 / 2.00)"
    assert f"| tiny | 1 | {f32} | {bf16} | {f32} | {bf16} | 1.0e-06" in table
    assert "| MLX bfloat16 s | speed-up vs OpenVINO bf16 |" in table
    header, rule = [line for line in table.splitlines() if line.startswith("|")][:2]
    assert header.count("|") == rule.count("|")


def test_the_whole_image_table_compares_every_side_over_rounds():
    rounds = [
        {"mlx": 1.0, "pytorch": 4.0, "openvino": 2.0, "openvino_default": 1.0},
        {"mlx": 2.0, "pytorch": 5.0, "openvino": 2.0, "openvino_default": 1.0},
        {"mlx": 1.5, "pytorch": 3.0, "openvino": 3.0, "openvino_default": 1.5},
    ]
    image = {"model": "sdxl-turbo", "steps": 1, "decoder": "tiny", "cfg": 0.0, "rounds": rounds}
    results = {
        "settings": {"size": 512},
        "machine": {"cpu": "x", "cores": 2, "ram_gb": 24, "mlx": "0"},
        "whole_image": [
            {**image, "setup": {"openvino_default_precision": "bf16"}},
            {**image, "model": "sd-1.5", "steps": 20, "decoder": "full", "cfg": 7.5,
             "setup": {}},
        ],
    }  # fmt: skip
    table = report.markdown_tables(results)
    assert "| MLX s | PyTorch s | speed-up | OpenVINO f32 s | speed-up | OpenVINO bf16 s |" in table
    # Medians 1.5 / 4.0 / 2.0 / 1.0; the rounds' speed-ups 4.0, 2.5, 2.0 (PyTorch), 2.0,
    # 1.0, 2.0 (f32) and 1.0, 0.5, 1.0 (bf16).
    cells = "| 1.50 | 4.00 | 2.50x (4.00 / 2.50 / 2.00) | 2.00 | 2.00x (2.00 / 1.00 / 2.00) "
    cells += "| 1.00 | 1.00x (1.00 / 0.50 / 1.00) |"
    assert f"| sdxl-turbo | 1 step, tiny decoder {cells}" in table
    assert f"| sd-1.5 | 20 steps, CFG 7.5, VAE {cells}" in table
    assert "3 rounds" in table


def test_the_whole_image_table_sets_mlx_bfloat16_against_openvino_default():
    rounds = [
        {"mlx": 4.0, "mlx_bfloat16": 1.0, "openvino": 2.0, "openvino_default": 0.5},
        {"mlx": 4.0, "mlx_bfloat16": 2.0, "openvino": 2.0, "openvino_default": 1.0},
        {"mlx": 4.0, "mlx_bfloat16": 1.5, "openvino": 2.0, "openvino_default": 3.0},
    ]
    image = {"model": "sd-turbo", "steps": 1, "decoder": "tiny", "cfg": 0.0, "rounds": rounds}
    results = {
        "settings": {"size": 512},
        "machine": {"cpu": "x", "cores": 2, "ram_gb": 24, "mlx": "0"},
        "whole_image": [{**image, "setup": {"openvino_default_precision": "bf16"}}],
    }
    table = report.markdown_tables(results)
    assert "images in float32 and bfloat16" in table
    assert "| OpenVINO bf16 s | speed-up | MLX bfloat16 s | speed-up vs OpenVINO bf16 |" in table
    # bfloat16: MLX's median 1.5 against OpenVINO's 1.0; the rounds' 0.5, 0.5, 2.0.
    assert "| 1.00 | 0.25x (0.12 / 0.25 / 0.75) | 1.50 | 0.50x (0.50 / 0.50 / 2.00) |" in table
    header, rule = [line for line in table.splitlines() if line.startswith("|")][:2]
    assert header.count("|") == rule.count("|")


def test_whole_image_run_times_every_side_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("diffusers")
    output = tmp_path / "results.json"
    benchmark.main(
        ["--models", "tiny-xl", "--dtypes", "float32", "--size", "64", "--repeats", "1",
         "--whole-image", "--reference", "--openvino", "--output", str(output)]
    )  # fmt: skip
    (image,) = json.loads(output.read_text())["whole_image"]
    assert (image["model"], image["steps"], image["decoder"]) == ("tiny-xl", 1, "tiny")
    (each,) = image["rounds"]
    assert sorted(each) == ["mlx", "openvino", "openvino_default", "pytorch"]
    assert all(seconds > 0 for seconds in each.values())
    assert image["setup"]["openvino_precision"] == "f32"
    assert "| tiny-xl | 1 step, tiny decoder |" in capsys.readouterr().out


def test_whole_image_mlx_alone_uses_the_random_tiny_decoder(tmp_path, capsys, monkeypatch):
    # No reference needed: MLX's images, with a TAESD of random weights and the hub's config.
    loaded = []
    original = whole_image.StableDiffusion

    def recording(folder, decoder):
        loaded.append(Path(decoder))
        return original(folder, decoder=decoder)

    monkeypatch.setattr(whole_image, "StableDiffusion", lambda f, decoder: recording(f, decoder))
    output = tmp_path / "results.json"
    benchmark.main(
        ["--models", "tiny-xl,tiny", "--dtypes", "float32", "--size", "64", "--repeats", "1",
         "--whole-image", "--workdir", str(tmp_path / "models"), "--output", str(output)]
    )  # fmt: skip
    images = json.loads(output.read_text())["whole_image"]
    assert [(i["model"], i["decoder"], i["steps"]) for i in images] == [
        ("tiny-xl", "tiny", 1),
        ("tiny", "full", 2),
    ]
    assert all(i["rounds"][0]["mlx"] > 0 and list(i["rounds"][0]) == ["mlx"] for i in images)
    assert loaded[0].name == "tiny-xl-taesd" and str(loaded[1]) == "full"
    assert not (tmp_path / "models" / "tiny-xl-taesd").exists()  # cleaned up


def test_random_tiny_autoencoder_loads_with_the_hub_config(tmp_path):
    from stable_diffusion.loading.folder import load_tiny_autoencoder

    folder = write_random_tiny_autoencoder(tmp_path / "taesd")
    fixture = json.loads((FIXTURES / "taesd" / "config.json").read_text())
    assert json.loads((folder / "config.json").read_text()) == fixture
    import mlx.core as mx

    model = load_tiny_autoencoder(folder, mx.float32)
    decoded = model.decode(mx.zeros((1, 8, 8, 4)))
    assert decoded.shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--whole-image", "--models", "sd-2.1-base"], "--whole-image times"),
        (["--whole-image", "--dtypes", "float16"], "--dtypes float32"),
        (["--openvino", "--dtypes", "q8"], "include float32"),
    ],
)
def test_whole_image_and_openvino_options_are_checked(extra, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(extra)
    assert message in capsys.readouterr().err


def test_a_busy_machine_is_flagged_by_the_reference(tmp_path, capsys, monkeypatch):
    # Canned outputs of the reference's process: no PyTorch needed.
    config = ARCHITECTURES["tiny"]
    unet_output = np.ones((1, 8, 8, 4), np.float32)
    decoded = np.ones((1, 64, 64, 3), np.float32)
    parity = measure.Parity(
        measure.UNetInputs.random(config.unet, 1, 8, 8), unet_output, unet_output, decoded
    )
    outputs = {"unet_output": unet_output, "vae_decoded": decoded, "float32_vae_decode_s": 2.0}
    setup = {"threads": 2, "cores": 2, "attention_processors": ["A"], "memory_format": "x"}
    args = argparse.Namespace(repeats=1, reference_memory_format="x", dtypes=["float32"])
    # 1-minute load averages with PyTorch's own 2 threads in them: quiet, then busy.
    for load, busy in ((2.5, False), (3.5, True)):
        canned = (dict(outputs), {**setup, "load_average": load})
        monkeypatch.setattr(benchmarks.reference, "_start", lambda *_, c=canned: c)
        result = benchmarks.reference.run_reference("tiny", tmp_path, args, parity, ["float32"])
        assert result["float32_vae_decode_s"] == 2.0 and result["unet_max_rel_error"] == 0.0
        assert ("the machine was busy" in capsys.readouterr().out) is busy
