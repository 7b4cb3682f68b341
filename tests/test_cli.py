"""`mitdenoise denoise` end to end: outputs, seeds, folders, resumption and every bad-input message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_random_image
from mitdenoise.cli import app
from mitdenoise.model import ModelConfig

runner = CliRunner()


make_image = write_random_image


def denoise(*args: str):
    result = runner.invoke(app, ["denoise", *args])
    return result


def test_denoises_a_file_to_a_same_size_image(tmp_path, tiny_model):
    src = make_image(tmp_path / "in.png", (37, 53))
    result = denoise(str(src), str(tmp_path / "out.png"), "--model", tiny_model, "--quiet")
    assert result.exit_code == 0, result.output
    out = Image.open(tmp_path / "out.png")
    assert out.size == (53, 37) and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(Image.open(src)))


def test_same_seed_same_output_other_seed_other_output(tmp_path, tiny_model):
    src = make_image(tmp_path / "in.png")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert denoise(str(src), str(tmp_path / f"{name}.png"), "-m", tiny_model, "--seed", seed, "-q").exit_code == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_passes_average_several_mask_draws(tmp_path, tiny_model):
    src = make_image(tmp_path / "in.png")
    for name, passes in (("one", "1"), ("four", "4")):
        assert denoise(str(src), str(tmp_path / f"{name}.png"), "-m", tiny_model, "--passes", passes, "-q").exit_code == 0
    one, four = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(float) for n in ("one", "four"))
    assert one.shape == four.shape and np.abs(one - four).mean() > 0.5


def test_passes_on_a_model_without_the_mask_says_one_pass_is_exact(tmp_path, tiny_model):
    src = make_image(tmp_path / "in.png")
    result = denoise(str(src), str(tmp_path / "out.png"), "-m", tiny_model, "--attn-mask-ratio", "0", "--passes", "4")
    assert result.exit_code == 0 and (tmp_path / "out.png").is_file()
    assert "note: --passes 4 runs one pass: this model has no attention mask, so every draw is the same" in result.stderr
    masked = denoise(str(src), str(tmp_path / "masked.png"), "-m", tiny_model, "--passes", "4")
    assert masked.exit_code == 0 and "note:" not in masked.stderr


def test_grayscale_stays_grayscale_and_alpha_is_kept(tmp_path, tiny_model):
    gray = make_image(tmp_path / "g.png", mode="L")
    rgba = make_image(tmp_path / "a.png", mode="RGBA")
    assert denoise(str(gray), str(rgba), str(tmp_path / "out"), "-m", tiny_model, "-q").exit_code == 0
    assert Image.open(tmp_path / "out" / "g.png").mode == "L"
    out = Image.open(tmp_path / "out" / "a.png")
    assert out.mode == "RGBA"
    assert np.array_equal(np.asarray(out)[..., 3], np.asarray(Image.open(rgba))[..., 3])


def test_folder_run_goes_on_past_a_corrupt_file_and_lists_it(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    make_image(src / "a.png")
    make_image(src / "c.png", seed=1)
    (src / "b.png").write_bytes(b"this is not a png")
    result = denoise(str(src), str(tmp_path / "out"), "-m", tiny_model, "--suffix", "_dn")
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_dn.png", "c_dn.png"]
    assert "b.png" in result.output and "denoised 2 file(s)" in result.output and "1 failed" in result.output


def test_an_unexpected_error_on_one_file_is_recorded_and_the_run_goes_on(tmp_path):
    from mitdenoise.batch import plan_jobs, run_jobs

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        make_image(src / name)

    def denoise_or_fail(job, image):
        if denoise_or_fail.calls == 1:
            denoise_or_fail.calls += 1
            raise RuntimeError("Calculated padded input size per channel: (16 x 0)\nmore")
        denoise_or_fail.calls += 1
        return image

    denoise_or_fail.calls = 0
    summary = run_jobs(plan_jobs([str(src)], str(tmp_path / "out")), denoise_or_fail)
    assert [job.source.name for job in summary.done] == ["a.png", "c.png"]
    assert [reason for _, reason in summary.failed] == [
        f"failed on {src / 'b.png'}: RuntimeError: Calculated padded input size per channel: (16 x 0)"
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]


def test_rerun_skips_existing_outputs_and_overwrite_replaces_them(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    make_image(src / "a.png")
    make_image(src / "b.png", seed=1)
    out = tmp_path / "out"
    assert denoise(str(src), str(out), "-m", tiny_model, "-q").exit_code == 0
    (out / "a.png").write_bytes(b"marker")  # a stand-in: skipped means untouched
    result = denoise(str(src), str(out), "-m", tiny_model)
    assert result.exit_code == 0 and "2 skipped" in result.output
    assert (out / "a.png").read_bytes() == b"marker"
    assert denoise(str(src), str(out), "-m", tiny_model, "--overwrite", "-q").exit_code == 0
    assert Image.open(out / "a.png").size == (56, 40)


def test_two_inputs_for_one_output_name_is_an_error_before_anything_runs(tmp_path, tiny_model):
    make_image(tmp_path / "a.png")
    Image.open(tmp_path / "a.png").save(tmp_path / "a.jpg")
    result = denoise(str(tmp_path / "a.png"), str(tmp_path / "a.jpg"), str(tmp_path / "out"), "-m", tiny_model, "--format", "png")
    assert result.exit_code == 1
    assert "would both be written to" in result.output
    assert not (tmp_path / "out").exists()


def test_output_equal_to_input_is_refused_without_overwrite(tmp_path, tiny_model):
    src = make_image(tmp_path / "a.png")
    before = src.read_bytes()
    result = denoise(str(src), str(src), "-m", tiny_model)
    assert result.exit_code == 1 and "is the input file itself" in result.output
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("missing_model", "model file not found"),
        ("not_a_state_dict", "not a state dict of tensors"),
        ("wrong_shapes", "has shape"),
        ("text_model", "not a PyTorch checkpoint"),
    ],
)
def test_bad_models_give_one_line_errors(tmp_path, tiny_model, setup, expected):
    import torch

    src = make_image(tmp_path / "in.png")
    model = tmp_path / "model.pth"
    if setup == "not_a_state_dict":
        torch.save([1, 2, 3], model)
    elif setup == "wrong_shapes":
        state = torch.load(tiny_model, weights_only=True)
        state["conv_last.bias"] = torch.zeros(5)
        torch.save(state, model)
    elif setup == "text_model":
        model.write_text("hello")
    result = denoise(str(src), str(tmp_path / "out.png"), "-m", str(model))
    assert result.exit_code == 1
    assert expected in result.output and str(model) in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path, tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    src = make_image(tmp_path / "in.png")
    result = denoise(str(src), str(tmp_path / "out.png"), "-m", tiny_model, "--device", "cuda")
    assert result.exit_code == 1
    assert "CUDA is not available" in result.output


def test_missing_input_and_unwritable_output_are_reported(tmp_path, tiny_model):
    result = denoise(str(tmp_path / "nope.png"), str(tmp_path / "out.png"), "-m", tiny_model)
    assert result.exit_code == 1 and "input not found" in result.output
    src = make_image(tmp_path / "in.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = denoise(str(src), str(blocker / "sub" / "out.png"), "-m", tiny_model)
    assert result.exit_code == 1 and "out.png" in result.output
    assert "Traceback" not in result.output


def test_help_shows_examples_and_the_default_model():
    from mitdenoise.registry import DEFAULT_MODEL

    result = runner.invoke(app, ["denoise", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "mitdenoise denoise noisy.png clean.png" in result.output
    assert f"The default model is {DEFAULT_MODEL}," in " ".join(result.output.split())
    top = runner.invoke(app, ["--help"])
    assert "mitdenoise denoise photo.png" in top.output


def test_help_does_not_wait_for_torch():
    """The CLI shows its help and defaults without importing torch (the commands import it when run)."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mitdenoise.cli import app\n"
        "for args in ([\"--help\"], [\"denoise\", \"--help\"], [\"bench\", \"quality\", \"--help\"], [\"train\", \"--help\"]):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "assert \"torch\" not in sys.modules, \"torch was imported\"\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_console_script_prints_no_traceback_on_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mitdenoise", "denoise", str(tmp_path / "missing.png"), str(tmp_path / "o.png"),
         "--model", str(tmp_path / "missing.pth")],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:")
    assert "Traceback" not in result.stderr


def checkpoint_with_validation(path: Path, sets: dict) -> str:
    from mitdenoise.model import SwinIR
    from mitdenoise.checkpoints import VALIDATION_KEY, save_safetensors

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = SwinIR(ModelConfig(embed_dim=12, depths=(2,), num_heads=(2,)))
    save_safetensors(net, path, extra_metadata={VALIDATION_KEY: json.dumps({"iteration": 240, "sets": sets})})
    return str(path)


@pytest.mark.slow
def test_warns_when_the_checkpoints_own_validation_shows_it_makes_images_worse(tmp_path):
    src = make_image(tmp_path / "in.png")
    harmful = checkpoint_with_validation(
        tmp_path / "early.safetensors",
        {"gaussian15": {"psnr": 10.3, "noisy_psnr": 25.15}, "poisson2": {"psnr": 24.0, "noisy_psnr": 23.3}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "mitdenoise", "denoise", str(src), str(tmp_path / "a.png"), "-m", harmful],
        capture_output=True, text=True,
    )
    assert result.returncode == 0 and (tmp_path / "a.png").is_file()
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [
        "warning: this model made its validation images worse (gaussian15 10.30 dB out vs 25.15 dB in; "
        "iteration 240): it is undertrained. Better: the default, masked-denoising (the authors' released checkpoint), "
        "or mitdenoise-auto (shipped, works offline)"
    ]

    helpful = checkpoint_with_validation(tmp_path / "good.safetensors", {"gaussian15": {"psnr": 30.0, "noisy_psnr": 25.15}})
    result = subprocess.run(
        [sys.executable, "-m", "mitdenoise", "denoise", str(src), str(tmp_path / "b.png"), "-m", helpful],
        capture_output=True, text=True,
    )
    assert result.returncode == 0 and "warning" not in result.stderr


@pytest.mark.parametrize("name", ["out.gif", "out.jpg2"])
def test_one_file_to_an_unknown_extension_is_an_error_not_a_new_folder(tmp_path, tiny_model, name):
    src = make_image(tmp_path / "in.png")
    result = denoise(str(src), str(tmp_path / name), "-m", tiny_model)
    assert result.exit_code == 1
    assert f"unknown image format {Path(name).suffix}" in result.output and "end it with /" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    result = denoise(str(src), str(tmp_path / name) + "/", "-m", tiny_model)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name / "in.png").is_file()


def test_threads_sets_torchs_thread_count_and_refuses_zero(tmp_path, tiny_model):
    import torch

    src = make_image(tmp_path / "in.png")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = denoise(str(src), str(tmp_path / "one.png"), "-m", tiny_model, "--threads", "1")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1 and (tmp_path / "one.png").is_file()
        result = denoise(str(src), str(tmp_path / "zero.png"), "-m", tiny_model, "--threads", "0")
        assert result.exit_code == 2 and "--threads must be >= 1" in result.output
        assert not (tmp_path / "zero.png").exists()
    finally:
        torch.set_num_threads(before)


def test_names_that_look_like_rich_markup_are_printed_as_they_are(tmp_path, tiny_model):
    missing = tmp_path / "missing[/b].png"
    result = denoise(str(missing), str(tmp_path / "out.png"), "-m", tiny_model)
    assert result.exit_code == 1 and result.stderr == f"error: no files match {missing}\n"
    bad = tmp_path / "[bold]bad.png"
    bad.write_bytes(b"junk")
    result = denoise(str(bad), str(tmp_path / "out.png"), "-m", tiny_model)
    assert result.exit_code == 1 and f"error: cannot read {bad}: " in result.stderr
    result = denoise(str(bad), str(tmp_path / "out.png"), "-m", str(tmp_path / "x[/red]"))
    assert result.exit_code == 1 and "x[/red]" in result.stderr


@pytest.mark.parametrize("suffix", ["/../../escaped", "/sub", "a/b"])
def test_a_suffix_with_a_path_separator_is_refused_before_anything_is_written(tmp_path, tiny_model, suffix):
    src = make_image(tmp_path / "a.png")
    result = denoise(str(src), str(tmp_path / "outs") + "/", "-m", tiny_model, "--suffix", suffix)
    assert result.exit_code == 1
    assert result.stderr == f"error: --suffix {suffix!r} must be part of a file name: no path separators\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_a_folder_denoised_into_itself_with_a_suffix_twice_does_not_denoise_its_outputs(tmp_path, tiny_model):
    folder = tmp_path / "same"
    folder.mkdir()
    make_image(folder / "a.png")
    assert denoise(str(folder), str(folder), "-m", tiny_model, "--suffix", "_dn", "-q").exit_code == 0
    first = (folder / "a_dn.png").read_bytes()
    result = denoise(str(folder), str(folder), "-m", tiny_model, "--suffix", "_dn")
    assert result.exit_code == 0 and "1 skipped" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_dn.png"]
    assert (folder / "a_dn.png").read_bytes() == first


@pytest.mark.parametrize(
    "args, option",
    [
        (["denoise", "a.png", "b.png", "--max-pixels", "0"], "--max-pixels"),
        (["denoise", "a.png", "b.png", "--seed", "99999999999999999999"], "--seed"),
        (["denoise", "a.png", "b.png", "--strength", "1.5"], "--strength"),
        (["denoise", "a.png", "b.png", "--strength", "-0.5"], "--strength"),
        (["noise", "a.png", "b.png", "--seed", "-1"], "--seed"),
        (["bench", "speed", "--sgemm-size", "0"], "--sgemm-size"),
        (["bench", "quality", "x/", "--seed", "-1"], "--seed"),
        (["train", "--seed", "-1"], "--seed"),
    ],
)
def test_out_of_range_numbers_are_usage_errors_naming_the_option(args, option):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_what_would_fail_at_writing_fails_before_the_image_is_denoised(tmp_path):
    from mitdenoise.batch import plan_jobs, run_jobs

    src = tmp_path / "in"
    src.mkdir()
    make_image(src / "rgba.png", mode="RGBA")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "anim.gif")
    calls = []

    def denoise_image(job, image):
        calls.append(image)
        return image

    jpg = run_jobs(plan_jobs([str(src / "rgba.png")], str(tmp_path / "out-jpg"), fmt="jpg"), denoise_image)
    gif = run_jobs(plan_jobs([str(src / "anim.gif")], str(tmp_path / "out-gif") + "/"), denoise_image)
    assert calls == []
    assert [reason for _, reason in jpg.failed] == [
        f"cannot write {tmp_path / 'out-jpg' / 'rgba.jpg'}: JPEG cannot store the alpha channel; write .png or .tif"
    ]
    assert [reason.split(";")[0] for _, reason in gif.failed] == [
        f"cannot write {tmp_path / 'out-gif' / 'anim.gif'}: unknown image format .gif"
    ]


def test_a_warning_is_one_line_on_stderr(capsys, monkeypatch):
    """Python's warning format (file:line, then the source line) becomes 'warning: ...'."""
    import signal
    import warnings

    import typer

    from mitdenoise.cli import run

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # run() replaces it: put it back after
    program = typer.Typer()

    @program.command()
    def main() -> None:
        warnings.warn("the kernel cannot run here; using the slower route", RuntimeWarning)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with pytest.raises(SystemExit) as done:
                run(program, args=[])
    finally:  # run() leaves the default signal actions, as a program's last act
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert done.value.code == 0
    assert capsys.readouterr().err.strip().splitlines() == ["warning: the kernel cannot run here; using the slower route"]


def test_n_or_low_high_options_share_one_parser_and_one_message():
    from mitdenoise.cli.console import parse_range

    assert parse_range("15", "--x") == (15, 15)
    assert parse_range(" 0, 50 ", "--x", float) == (0.0, 50.0)
    assert parse_range("80,90", "--x", percent=True) == (80, 90)
    for text, kwargs in (("30,10", {}), ("a", {}), ("1,2,3", {}), ("50,100", {"percent": True}), ("-1", {"percent": True})):
        with pytest.raises(ValueError, match=r"^--x must be N or LOW,HIGH with .*, not '"):
            parse_range(text, "--x", **kwargs)
    result = runner.invoke(app, ["train", "--noise-sigma", "30,10", "--data", "nowhere"])
    assert result.exit_code == 2 and "--noise-sigma must be N or LOW,HIGH with LOW <= HIGH" in result.output
