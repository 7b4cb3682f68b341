"""Benchmarks: quality tables and their files, the speed table with its reference and ceiling, `noise`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from conftest import subprocess_env
from mitdenoise.bench import common, quality, speed
from mitdenoise.cli import app as mitdenoise_app
from mitdenoise.metrics import psnr

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
runner = CliRunner()


@pytest.fixture
def clean_dir(tmp_path) -> Path:
    folder = tmp_path / "clean"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(common.synthetic_image(32, 40, i)).save(folder / f"img{i}.png")
    return folder


def cli() -> typer.Typer:
    return mitdenoise_app


def test_averaged_draws_get_a_column_only_for_models_with_the_attention_mask(tmp_path, tiny_model):
    from mitdenoise.checkpoints import convert_checkpoint

    plain = tmp_path / "plain.safetensors"
    convert_checkpoint(tiny_model, plain, attn_mask_ratio=(0, 0))
    methods = quality.model_methods([tiny_model, str(plain)], passes=3, device="cpu")
    assert [(m.name, m.info["passes"]) for m in methods] == [
        ("official_tiny_random", 1), ("official_tiny_random x3", 3), ("plain", 1)
    ]


def test_columns_of_training_runs_are_named_by_their_run_folder():
    from mitdenoise.train.loop import CHECKPOINT_NAME, EXPORT_NAME

    labels = [quality.model_label(p) for p in (
        f"runs/ft-ctrl/{EXPORT_NAME}", f"runs/ft-mild/{EXPORT_NAME}", f"runs/ft-mild/{CHECKPOINT_NAME}",
        "weights/mitdenoise-baseline.safetensors", "mitdenoise-mild", EXPORT_NAME,
    )]
    assert labels == ["ft-ctrl/ema", "ft-mild/ema", "ft-mild/last", "mitdenoise-baseline", "mitdenoise-mild", "ema"]


@pytest.mark.slow
def test_quality_writes_json_markdown_and_grids_with_every_row_and_method(tmp_path, clean_dir, tiny_model):
    grids = {}
    results = quality.run_quality(
        clean_dir, noise_spec="gaussian:15,saltpepper:0.02", models=[tiny_model], passes=2,
        baselines=["noisy", "nlm"], device="cpu", seed=3, grids=grids,
    )
    assert sorted(grids) == ["gaussian:15", "saltpepper:0.02"] and all(isinstance(k, str) for k in results)
    quality.write_quality_outputs(results, tmp_path / "out", grids)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [m["name"] for m in data["methods"]]
    assert names == ["noisy", "official_tiny_random", "official_tiny_random x2", "nlm"]
    assert data["images"] == ["img0.png", "img1.png"]
    assert [r["noise"] for r in data["rows"]] == ["gaussian:15", "saltpepper:0.02"]
    for row in data["rows"]:
        assert set(row["results"]) == set(names)
        for scores in row["results"].values():
            assert {"psnr", "ssim", "psnr_y", "ssim_y", "seconds", "s_per_mp"} <= set(scores)
            assert 0 < scores["psnr"] < 100 and -1 <= scores["ssim"] <= 1
        assert [p["image"] for p in row["per_image"]["nlm"]] == data["images"]
    assert data["config"]["seed"] == 3 and "_grids" not in data

    md = (tmp_path / "out" / "results.md").read_text()
    assert "| gaussian:15 |" in md and "| saltpepper:0.02 |" in md and "**" in md
    assert sorted(data["grids"]) == ["grid_gaussian_15.png", "grid_saltpepper_0.02.png"]
    grid = Image.open(tmp_path / "out" / "grid_gaussian_15.png")
    assert grid.height > 32 and grid.width >= 5 * 40  # noisy, three methods, clean

    # the "noisy" column is the PSNR of the noisy images themselves, computed directly
    for row, (kind, level) in zip(data["rows"], [("gaussian", 15.0), ("saltpepper", 0.02)]):
        direct = []
        for i in range(2):
            clean = np.asarray(Image.open(clean_dir / f"img{i}.png"))
            direct.append(psnr(*quality.noisy_version(clean, kind, level, 3, i)))
        assert row["results"]["noisy"]["psnr"] == pytest.approx(np.mean(direct), abs=1e-9)


def test_camera_rows_are_scored_against_the_clean_twin(clean_dir):
    res = quality.run_quality(clean_dir, noise_spec="camera:3", models=[], baselines=["noisy"], limit=2, crop=64, seed=4)
    (row,) = res["rows"]
    direct = []
    for i in range(2):
        name, clean = quality.load_quality_data(clean_dir, None, None, 2, 64)[0][i]
        noisy, twin = quality.noisy_version(clean, "camera", 3.0, 4, i)
        assert not np.array_equal(twin, clean)  # developed by the camera: not the input
        direct.append(psnr(noisy, twin))
    assert row["results"]["noisy"]["psnr"] == pytest.approx(np.mean(direct), abs=1e-9)


def test_the_default_rows_are_light_gaussian_noise_then_the_papers_four(clean_dir):
    res = quality.run_quality(clean_dir, models=[], baselines=["noisy"], limit=1, crop=64)
    assert [r["noise"] for r in res["rows"]] == ["gaussian:5", "gaussian:15", "poisson:2", "speckle:0.024", "saltpepper:0.002"]
    psnrs = [r["results"]["noisy"]["psnr"] for r in res["rows"]]
    assert psnrs[0] > psnrs[1] + 8  # sigma 5 is 9.5 dB lighter than 15 before clipping


def test_synthetic_noise_does_not_depend_on_row_order(clean_dir):
    def noisy_psnrs(spec):
        res = quality.run_quality(clean_dir, noise_spec=spec, models=[], baselines=["noisy"])
        return {r["noise"]: r["results"]["noisy"]["psnr"] for r in res["rows"]}

    first, second = noisy_psnrs("gaussian:25,poisson:2"), noisy_psnrs("poisson:2,speckle:0.05,gaussian:25")
    assert first == {k: second[k] for k in first}
    # ... and a different seed gives different noise
    other = quality.run_quality(clean_dir, noise_spec="gaussian:25", models=[], baselines=["noisy"], seed=1)
    assert other["rows"][0]["results"]["noisy"]["psnr"] != noisy_psnrs("gaussian:25")["gaussian:25"]


def test_given_noisy_clean_pairs_make_a_row(tmp_path, clean_dir):
    noisy_dir = tmp_path / "noisy_set"
    noisy_dir.mkdir()
    expected = []
    for i in range(2):
        clean = np.asarray(Image.open(clean_dir / f"img{i}.png"))
        noisy = quality.noisy_version(clean, "speckle", 0.05, 9, i)[0]
        Image.fromarray(noisy).save(noisy_dir / f"img{i}.png")
        expected.append(psnr(noisy, clean))
    res = quality.run_quality(clean_dir, noisy_dir=noisy_dir, models=[], baselines=["noisy"])
    assert [r["noise"] for r in res["rows"]] == ["given:noisy_set"]
    assert res["rows"][0]["results"]["noisy"]["psnr"] == pytest.approx(np.mean(expected))


def test_published_outputs_are_a_column_scored_against_the_clean_images(tmp_path, clean_dir):
    noisy_dir, published = tmp_path / "noisy", tmp_path / "theirs"
    noisy_dir.mkdir()
    published.mkdir()
    expected = []
    for i in range(2):
        clean = np.asarray(Image.open(clean_dir / f"img{i}.png"))
        Image.fromarray(quality.noisy_version(clean, "gaussian", 10, 3, i)[0]).save(noisy_dir / f"img{i}.png")
        theirs = quality.noisy_version(clean, "gaussian", 4, 5, i)[0]
        Image.fromarray(theirs).save(published / f"img{i}.png")
        expected.append(psnr(theirs, clean))
    res = quality.run_quality(clean_dir, noisy_dir=noisy_dir, models=[], baselines=["noisy"],
                              published=[("theirs", published)])
    assert [m["name"] for m in res["methods"]] == ["noisy", "theirs"]
    assert res["rows"][0]["results"]["theirs"]["psnr"] == pytest.approx(np.mean(expected))
    assert res["rows"][0]["sigma"]["mean_255"] > 5
    with pytest.raises(ValueError, match="use them with --noisy and no --noise"):
        quality.run_quality(clean_dir, noise_spec="gaussian:5", models=[], published=[("theirs", published)])
    (published / "img1.png").unlink()
    with pytest.raises(FileNotFoundError, match="no output for img1.png"):
        quality.run_quality(clean_dir, noisy_dir=noisy_dir, models=[], published=[("theirs", published)])
    with pytest.raises(ValueError, match="NAME=FOLDER"):
        quality.parse_published(["just-a-folder"])


def test_each_strength_is_a_column_and_strength_0_scores_as_the_noisy_input(clean_dir, tiny_model):
    res = quality.run_quality(clean_dir, noise_spec="gaussian:15", models=[tiny_model], baselines=["noisy"],
                              strengths=[1, 0.5, 0])
    names = [m["name"] for m in res["methods"]]
    assert len(names) == 4 and names[2].endswith(" s0.5") and names[3].endswith(" s0")
    row = res["rows"][0]["results"]
    assert row[names[3]]["psnr"] == pytest.approx(row["noisy"]["psnr"])
    assert row[names[1]]["psnr"] != pytest.approx(row["noisy"]["psnr"])
    assert "| noise | sigma |" in quality.quality_markdown(res)


def test_oracle_sigma_only_for_gaussian_rows_and_missing_bm3d_is_a_note(clean_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d fails
    res = quality.run_quality(clean_dir, noise_spec="gaussian:20,poisson:2", models=[], baselines=["nlm", "bm3d"],
                            oracle_sigma=True)
    assert [m["name"] for m in res["methods"]] == ["nlm"]
    assert any("bm3d skipped" in n for n in res["notes"])
    gauss, pois = res["rows"]
    assert gauss["sigma"] == {"source": "oracle", "mean_255": 20.0}
    assert pois["sigma"]["source"] == "estimated" and pois["sigma"]["mean_255"] > 1


def test_macs_per_pixel_of_the_released_network():
    from mitdenoise.model import ModelConfig

    assert speed.macs_per_pixel(ModelConfig()) == 959_445


def test_the_host_numpy_drawer_draws_once_per_layer_for_the_forward_it_is_given_to(tiny_model):
    import torch

    from mitdenoise.checkpoints import load_model

    net = load_model(tiny_model)
    x = torch.rand(1, 3, 24, 32)
    draw, calls = speed.host_numpy_mask_drawer(0)
    with torch.inference_mode():
        a = net(x, draw_mask=draw)
    assert calls[0] == sum(net.config.depths)  # one host draw per attention layer
    with torch.inference_mode():
        net(x)
    assert calls[0] == sum(net.config.depths)  # only the forward it was given to draws through it
    draw, _ = speed.host_numpy_mask_drawer(0)
    with torch.inference_mode():
        b = net(x, draw_mask=draw)
    assert torch.equal(a, b)  # seeded host draws


@pytest.mark.slow
def test_speed_reports_mp_per_s_the_reference_row_and_the_sgemm_ceiling(tmp_path, tiny_model):
    res = speed.run_speed(tiny_model, sizes=[(32, 40)], tiles=[32], runs=1, warmup=0, devices=["cpu"], sgemm_n=256)
    speed.write_speed_outputs(res, tmp_path)
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["tiled", "reference"]
    tiled, ref = res["rows"]
    assert tiled["mp_per_s"] > 0 and ref["mp_per_s"] > 0 and tiled["peak_rss_mb"] > 0
    assert tiled["speedup_vs_reference"] == pytest.approx(ref["median_s"] / tiled["median_s"])
    assert res["sgemm"]["cpu"]["gflops"] > 0 and res["sgemm"]["cpu"]["n"] == 256
    assert tiled["fraction_of_sgemm"] == pytest.approx(tiled["gflops_effective"] / res["sgemm"]["cpu"]["gflops"])
    assert tiled["gflops_effective"] == pytest.approx(2 * res["config"]["macs_per_pixel"] * tiled["mp_per_s"] / 1e3)
    assert json.loads((tmp_path / "speed.json").read_text())["rows"][1]["kind"] == "reference"
    assert "whole (reference)" in (tmp_path / "speed.md").read_text()


def test_speed_puts_bf16_beside_fp32_with_its_own_gemm_ceiling(tmp_path, tiny_model, monkeypatch):
    from mitdenoise import devices

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    res = speed.run_speed(tiny_model, sizes=[(32, 40)], tiles=[32], precisions=["fp32", "bf16"], runs=1, warmup=0,
                          devices=["cpu"], sgemm_n=64, reference=False)
    fp32, bf16 = res["rows"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    ceiling = res["bf16_gemm"]["cpu"]
    assert ceiling["dtype"] == "bf16" and ceiling["n"] == 64 and ceiling["gflops"] > 0
    assert bf16["fraction_of_bf16_gemm"] == pytest.approx(bf16["gflops_effective"] / ceiling["gflops"])
    assert "fraction_of_bf16_gemm" not in fp32 and res["sgemm"]["cpu"]["dtype"] == "fp32"
    markdown = speed.speed_table(res).markdown()
    assert "| of bf16 GEMM |" in markdown and f"{100 * bf16['fraction_of_bf16_gemm']:.1f}%" in markdown
    assert "GEMM 64x64 bf16 on cpu:" in markdown and "sgemm 64x64 float32 on cpu:" in markdown
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: False)
    res = speed.run_speed(tiny_model, sizes=[(32, 40)], tiles=[32], precisions=["fp32", "bf16"], runs=1, warmup=0,
                          devices=["cpu"], sgemm_n=64, reference=False)
    assert [r["precision"] for r in res["rows"]] == ["fp32"] and res["bf16_gemm"] == {}
    assert any("cpu bf16 tile 32 batch 1 skipped: this CPU has no native bf16" in n for n in res["notes"])


def test_bench_json_names_the_model_that_ran_the_fallback_with_its_notice_offline(clean_dir, tiny_model):
    from mitdenoise.registry import FALLBACK_MODEL

    res = quality.run_quality(clean_dir, noise_spec="gaussian:15", models=[None, tiny_model], baselines=[], crop=16,
                              limit=1, tile=64)
    assert [(m["name"], m["model"]) for m in res["methods"]] == [
        (FALLBACK_MODEL, FALLBACK_MODEL), ("official_tiny_random", tiny_model)
    ]
    (notice,) = res["notes"]
    assert notice.startswith("using mitdenoise-auto (shipped), not the default masked-denoising")
    res = speed.run_speed(None, sizes=[(16, 16)], tiles=[16], runs=1, warmup=0, devices=["cpu"], sgemm_n=16,
                          reference=False)
    assert res["config"]["model"] == FALLBACK_MODEL and res["notes"] == [
        notice, "mitdenoise-auto times its network mitdenoise-camera; the noise estimate and the second stage "
        "come on top (docs/benchmarks.md)"]


def test_bench_quality_cli_prints_json_and_rejects_bad_specs(tmp_path, clean_dir):
    app = cli()
    out = tmp_path / "res"
    result = runner.invoke(app, ["bench", "quality", str(clean_dir), "--noise", "gaussian:10", "--baselines", "noisy",
                                 "--model", "none-such.pth", "--out", str(out), "--json", "-q"])
    assert result.exit_code == 1 and "none-such.pth" in result.output
    result = runner.invoke(app, ["bench", "quality", str(clean_dir), "--noise", "blur:3", "--out", str(out)])
    assert result.exit_code == 2 and "unknown noise kind 'blur'" in result.output


def test_noise_cli_reproduces_the_bundled_poisson_example(tmp_path):
    target = tmp_path / "noisy.png"
    result = runner.invoke(cli(), ["noise", str(EXAMPLES / "kodim23-clean.png"), str(target), "--kind", "poisson",
                                   "--level", "2", "--seed", "0", "-q"])
    assert result.exit_code == 0, result.output
    expected = np.asarray(Image.open(EXAMPLES / "kodim23-noisy-poisson2.png"))
    assert np.array_equal(np.asarray(Image.open(target)), expected)


def test_noise_cli_keeps_16_bit_depth_and_handles_folders(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    deep = (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)
    Image.fromarray(deep).save(src / "deep.png")
    Image.fromarray(common.synthetic_image(24, 32, 0)).save(src / "rgb.png")
    result = runner.invoke(cli(), ["noise", str(src), str(tmp_path / "out"), "--kind", "gaussian", "--level", "10", "-q"])
    assert result.exit_code == 0, result.output
    from mitdenoise.imageio import read_image

    noisy_deep = read_image(tmp_path / "out" / "deep.png").pixels
    assert noisy_deep.dtype == np.uint16 and noisy_deep.shape[:2] == (24, 32)
    assert not np.array_equal(noisy_deep.reshape(24, 32), deep)
    assert (tmp_path / "out" / "rgb.png").is_file()
    bad = runner.invoke(cli(), ["noise", str(src), str(tmp_path / "o2"), "--kind", "saltpepper", "--level", "2"])
    assert bad.exit_code == 2 and "density" in bad.output


def test_noise_cli_writes_camera_noise_and_its_clean_twin(tmp_path):
    target = tmp_path / "noisy.png"
    args = ["noise", str(EXAMPLES / "kodim23-clean.png"), str(target), "--kind", "camera", "--level", "3",
            "--seed", "2", "--twin-suffix", "_clean", "-q"]
    assert runner.invoke(cli(), args).exit_code == 0
    noisy = np.asarray(Image.open(target))
    twin = np.asarray(Image.open(tmp_path / "noisy_clean.png"))
    clean = np.asarray(Image.open(EXAMPLES / "kodim23-clean.png"))
    from mitdenoise import noise

    expected = noise.noisy_pair(clean / 255.0, "camera", 3.0, np.random.default_rng(2))
    assert np.array_equal(noisy, np.round(expected[0] * 255).astype(np.uint8))
    assert np.array_equal(twin, np.round(expected[1] * 255).astype(np.uint8))
    assert psnr(noisy, twin) < psnr(twin, clean)  # the noise, not the development, is most of the change


def test_noise_cli_runs_folders_as_denoise_does_a_bad_file_fails_alone_and_a_rerun_skips(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(common.synthetic_image(24, 32, 0)).save(src / "a.png")
    (src / "b.png").write_bytes(b"not a png")
    Image.fromarray(common.synthetic_image(24, 32, 1)).save(src / "c.png")
    args = ["noise", str(src), str(tmp_path / "out"), "--kind", "camera", "--level", "2"]
    result = runner.invoke(cli(), args)
    assert result.exit_code == 1 and "b.png" in result.output and "wrote 2 file(s); 1 failed" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    again = runner.invoke(cli(), args)
    assert "2 skipped" in again.output


def test_option_parsers_explain_bad_values():
    assert speed.parse_sizes("256, 512x384") == [(256, 256), (512, 384)]
    assert quality.parse_baselines("none") == []
    with pytest.raises(ValueError, match="HxW"):
        speed.parse_sizes("big")
    with pytest.raises(ValueError, match="unknown baseline 'dncnn'"):
        quality.parse_baselines("noisy,dncnn")


def test_the_speed_reference_runs_the_plain_attention_and_equals_the_fast_path(tiny_model, monkeypatch):
    """The reference is the authors' formulation (no masked-token shortcut); with the same
    host-drawn masks the tiled path's network gives the same numbers to 1e-5."""
    import numpy as np
    import torch

    from mitdenoise import route_cpu
    from mitdenoise.checkpoints import load_model

    net = load_model(tiny_model)
    shortcut_calls = []
    original = route_cpu.masked_attention
    monkeypatch.setattr(route_cpu, "masked_attention", lambda *a: shortcut_calls.append(1) or original(*a))
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    reference = speed.HostMaskReference(net, torch.device("cpu"))
    assert reference(pixels).shape == pixels.shape
    assert shortcut_calls == []
    x = torch.rand(1, 3, 24, 32)
    with torch.inference_mode():
        plain = net(x, shortcut=False, chunked=False, draw_mask=speed.host_numpy_mask_drawer(0)[0])
        fast = net(x, chunked=False, draw_mask=speed.host_numpy_mask_drawer(0)[0])
    assert len(shortcut_calls) == sum(net.config.depths)
    assert (plain - fast).abs().max() < 1e-5


@pytest.mark.slow
def test_the_reference_runs_in_a_child_with_its_own_peak_memory_and_a_death_becomes_a_note(tiny_model, monkeypatch):
    import subprocess

    import torch

    row = speed.measure_reference(tiny_model, torch.device("cpu"), (24, 32), 0, 2, 0, 1)
    assert len(row["times_s"]) == 2 and row["median_s"] > 0
    assert row["peak_rss_mb"] > 50  # a process with torch loaded, measured there
    killed = "import os, sys; os.kill(os.getpid(), 9)"
    real_run = subprocess.run
    monkeypatch.setattr(speed.subprocess, "run", lambda cmd, **kw: real_run([cmd[0], "-c", killed], **kw))
    assert speed.measure_reference(tiny_model, torch.device("cpu"), (24, 32), 0, 1, 0, 1) is None
    res = speed.run_speed(tiny_model, sizes=[(24, 32)], tiles=[32], runs=1, warmup=0, devices=["cpu"], sgemm_n=64)
    assert [r["kind"] for r in res["rows"]] == ["tiled"]
    assert "reference at 24x32 on cpu did not finish (out of memory?)" in res["notes"]
    assert "speedup_vs_reference" not in res["rows"][0]


def test_speed_markdown_without_a_reference_says_so_instead_of_nan(tiny_model):
    res = speed.run_speed(tiny_model, sizes=[(24, 32)], tiles=[32], runs=1, warmup=0, devices=["cpu"], sgemm_n=64,
                          reference=False)
    table = speed.speed_table(res)
    assert table.rows[0][-1] == "-" and "nan" not in " ".join(table.rows[0])
    assert table.markdown().splitlines()[4].endswith("| - |")  # title, blank, header, rule, the row


def test_an_out_that_is_a_file_is_refused_before_the_benchmark_runs(tmp_path, clean_dir):
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(cli(), ["bench", "quality", str(clean_dir), "--baselines", "noisy", "-o", str(tmp_path / "afile")])
    assert result.exit_code == 1 and result.stderr == f"error: --out {tmp_path / 'afile'} is a file, not a folder\n"
    result = runner.invoke(cli(), ["bench", "speed", "--sizes", "32", "-o", str(tmp_path / "afile" / "sub")])
    assert result.exit_code == 1 and "cannot write into" in result.stderr


def test_group_options_before_a_subcommand_are_refused_not_ignored(tmp_path, clean_dir):
    result = runner.invoke(cli(), ["bench", "-o", str(tmp_path / "r"), "--json", "quality", str(clean_dir)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --out, --json before 'quality' would be ignored: put options after it")
    assert not (tmp_path / "r").exists()


def test_speed_with_every_row_skipped_is_an_error(tmp_path):
    result = runner.invoke(cli(), ["bench", "speed", "--sizes", "32", "--tiles", "16", "--precisions", "fp64",
                                   "--no-reference", "--sgemm-size", "64", "--runs", "1", "--warmup", "0",
                                   "-o", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "note: cpu fp64 tile 16 batch 1 skipped: unknown precision 'fp64'" in result.stderr
    assert result.stderr.strip().endswith("error: nothing was measured: every combination was skipped (see the notes above)")


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.slow
def test_the_reference_child_ends_when_the_bench_is_killed(tmp_path):
    """A bench killed with SIGKILL (no chance to clean up) leaves no reference process running."""
    pid_file = tmp_path / "child.pid"
    child = (
        "import os, sys, time; from mitdenoise.bench.speed import die_with_parent; "
        f"die_with_parent(int(sys.argv[1])); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent = (
        "import os, subprocess, sys; "
        f"subprocess.run([sys.executable, '-c', {child!r}, str(os.getpid())])"
    )
    env = subprocess_env()
    bench = subprocess.Popen([sys.executable, "-c", parent], env=env)
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and bench.poll() is None, "the child never started"
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    os.kill(child_pid, 0)  # alive
    bench.kill()
    bench.wait()
    deadline = time.time() + 10
    while _running(child_pid):
        assert time.time() < deadline, "the reference child outlived the killed bench"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bench_train_times_both_routes_alternating_and_writes_json_and_markdown(tmp_path, monkeypatch):
    """Tiny network from a training TOML: both routes timed the asked number of times, the route's
    row has its speed-up over the plain one, the effective rate counts 3 x the forward's work."""
    from mitdenoise.bench import train_speed

    order = []
    step = train_speed.one_forward_step
    monkeypatch.setattr(train_speed, "one_forward_step", lambda *a, **k: order.append(k["shortcut"]) or step(*a, **k))
    toml = tmp_path / "net.toml"
    toml.write_text("[model]\nembed_dim = 12\ndepths = [2]\nnum_heads = [2]\n")
    out = tmp_path / "r"
    result = runner.invoke(cli(), ["bench", "train", "--model-config", str(toml), "--batch", "2", "--patch-size", "16",
                                   "--iterations", "2", "--warmup", "1", "--attn-mask", "50,90", "--threads", "1",
                                   "--sgemm-size", "64", "--one-forward", "-o", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert results == json.loads((out / "train-speed.json").read_text())
    plain, route, whole = results["rows"]
    assert (plain["route"], route["route"], whole["route"]) == ("plain", "route", "route, one forward")
    assert order == [False, True] * 3  # alternating, after one warm-up each
    assert len(plain["times_s"]) == len(route["times_s"]) == len(whole["times_s"]) == 2
    assert route["speedup_vs_plain"] == pytest.approx(plain["median_s"] / route["median_s"])
    config = results["config"]
    assert config["model_config"]["embed_dim"] == 12 and config["attn_mask"] == [50, 90]
    assert config["gflop_per_step"] == pytest.approx(6 * speed.macs_per_pixel(train_speed.network_config(toml, (50, 90))[0]) * 16 * 16 * 2 / 1e9)
    assert plain["gflops_effective"] == pytest.approx(config["gflop_per_step"] / plain["median_s"])
    assert "| route |" in (out / "train-speed.md").read_text()


def test_bench_train_refuses_bad_mask_ratios_and_defaults_to_the_shipped_network():
    from mitdenoise.bench import train_speed
    from mitdenoise.registry import FALLBACK_MODEL

    result = runner.invoke(cli(), ["bench", "train", "--attn-mask", "75,50"])
    assert result.exit_code == 2 and "--attn-mask must be N or LOW,HIGH with 0 <= LOW <= HIGH < 100" in result.stderr
    config, source = train_speed.network_config(None, (75, 75))
    assert (config.embed_dim, config.depths, config.num_heads, config.attn_mask_ratio) == (48, (4, 4), (6, 6), (75, 75))
    assert FALLBACK_MODEL in source
