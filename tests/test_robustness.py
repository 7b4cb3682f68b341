"""`mitdenoise denoise` against signals, a second process, odd names and odd sizes: nothing lost."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_random_image
from mitdenoise.cli import app

runner = CliRunner()


def make_images(folder: Path, names, size=(96, 128)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_random_image(folder / name, size, seed=i) for i, name in enumerate(names)]


def cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mitdenoise", "denoise", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()  # a half-written file fails here
        return np.asarray(im)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_folder_keeps_finished_outputs_whole_and_a_rerun_does_only_the_rest(tmp_path, tiny_model, sig):
    names = [f"{i}.png" for i in range(5)]
    make_images(tmp_path / "in", names, size=(256, 256))  # about a second each through the tiny model here
    out = tmp_path / "out"
    proc = cli(str(tmp_path / "in"), str(out), "-m", tiny_model)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "stopping after the current image" in stderr and "Traceback" not in stderr
    finished = sorted(p.name for p in out.iterdir())
    assert all(name in names for name in finished), finished  # no temp files left behind
    assert 1 <= len(finished) < len(names)
    for name in finished:
        assert pixels(out / name).shape == (256, 256, 3)

    rerun = cli(str(tmp_path / "in"), str(out), "-m", tiny_model)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"denoised {len(names) - len(finished)} file(s)" in stderr and f"{len(finished)} skipped" in stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_aborts_the_current_image_leaving_no_partial_file(tmp_path, tiny_model, sig):
    make_images(tmp_path / "in", ["a.png"], size=(64, 64))
    make_images(tmp_path / "in", ["b.png"], size=(768, 768))  # several seconds through the tiny model
    out = tmp_path / "out"
    proc = cli(str(tmp_path / "in"), str(out), "-m", tiny_model)
    deadline = time.monotonic() + 120
    while not (out / "a.png").exists():  # a.png written: the handlers are in, b.png is under way
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    lines = []
    while not any("stopping after the current image" in line for line in lines):
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    # 128 + signal, the shell's code for it (not typer's 130 for all); -signal where b.png was just
    # done and the second signal met the exit itself, which then takes the signal's default action
    assert proc.returncode in (128 + sig, -sig), "".join(lines) + rest
    assert "Traceback" not in rest
    assert sorted(os.listdir(out)) == ["a.png"]  # b.png neither written nor left half-written as a temp file


@pytest.mark.slow
def test_two_processes_on_one_folder_both_finish_and_every_output_is_whole_and_right(tmp_path, tiny_model):
    names = [f"{i}.png" for i in range(6)]
    make_images(tmp_path / "in", names)
    first, second = (cli(str(tmp_path / "in"), str(tmp_path / "out"), "-m", tiny_model, "-q") for _ in range(2))
    for proc in (first, second):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    alone = cli(str(tmp_path / "in"), str(tmp_path / "alone"), "-m", tiny_model, "-q")
    assert alone.wait(timeout=300) == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)  # and no temp files
    for name in names:
        assert np.array_equal(pixels(tmp_path / "out" / name), pixels(tmp_path / "alone" / name))


def test_spaces_unicode_leading_dashes_and_symlinks_in_names(tmp_path, tiny_model, monkeypatch):
    names = ["with space.png", "ünïcødé 写真.png", "-starts-with-dash.png"]
    make_images(tmp_path / "in dir", names, size=(24, 40))
    (tmp_path / "in dir" / "link.png").symlink_to(tmp_path / "in dir" / "with space.png")
    result = runner.invoke(app, ["denoise", str(tmp_path / "in dir"), str(tmp_path / "out dir"), "-m", tiny_model, "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out dir"
    assert sorted(os.listdir(out)) == sorted([*names, "link.png"])
    assert not (out / "link.png").is_symlink()  # the link's target is denoised into a real file
    assert np.array_equal(pixels(out / "link.png"), pixels(out / "with space.png"))

    # a leading dash is an option to the command line unless it follows `--`
    monkeypatch.chdir(tmp_path / "in dir")
    result = runner.invoke(app, ["denoise", "-m", tiny_model, "-q", "--", "-starts-with-dash.png", "-out.png"])
    assert result.exit_code == 0, result.output
    assert pixels(tmp_path / "in dir" / "-out.png").shape == (24, 40, 3)

    # an output that is a symlink to the input is the input: refused, input untouched
    (tmp_path / "alias.png").symlink_to(tmp_path / "in dir" / "with space.png")
    before = (tmp_path / "in dir" / "with space.png").read_bytes()
    result = runner.invoke(app, ["denoise", str(tmp_path / "in dir" / "with space.png"), str(tmp_path / "alias.png"),
                                 "-m", tiny_model, "-q"])
    assert result.exit_code == 1 and "is the input file itself" in result.output
    assert (tmp_path / "in dir" / "with space.png").read_bytes() == before


@pytest.mark.slow
def test_a_3_by_100000_image_comes_back_the_same_size(tmp_path, tiny_model):
    src = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 100_000, 3), dtype=np.uint8)).save(src)
    result = runner.invoke(app, ["denoise", str(src), str(tmp_path / "out.png"), "-m", tiny_model, "-q"])
    assert result.exit_code == 0, result.output
    out = pixels(tmp_path / "out.png")
    assert out.shape == (3, 100_000, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels(src)).mean() > 1  # the network did run on it


def test_max_pixels_flag_refuses_or_lets_through(tmp_path, tiny_model):
    (src,) = make_images(tmp_path, ["a.png"], size=(100, 100))
    result = runner.invoke(app, ["denoise", str(src), str(tmp_path / "o.png"), "-m", tiny_model, "--max-pixels", "5000"])
    assert result.exit_code == 1
    assert "image has 10000 pixels, over the limit of 5000; pass --max-pixels to raise it" in result.output
    assert not (tmp_path / "o.png").exists()
    result = runner.invoke(app, ["denoise", str(src), str(tmp_path / "o.png"), "-m", tiny_model, "--max-pixels", "20000"])
    assert result.exit_code == 0 and pixels(tmp_path / "o.png").shape == (100, 100, 3)


@pytest.mark.parametrize("name", ["out.jpg", "out.bmp", "out.png", "out.tif", "out.webp"])
@pytest.mark.slow
def test_a_full_disk_is_an_error_and_leaves_no_file_in_every_format(tmp_path, tiny_model, name):
    import resource

    (src,) = make_images(tmp_path, ["in.png"], size=(256, 256))
    out = tmp_path / "out"
    out.mkdir()

    def disk_of_4_kib():  # writes past 4 KiB fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = subprocess.run(
        [sys.executable, "-m", "mitdenoise", "denoise", str(src), str(out / name), "-m", tiny_model, "--threads", "1"],
        capture_output=True, text=True, preexec_fn=disk_of_4_kib,
    )
    assert done.returncode == 1, done.stderr
    assert f"error: cannot write {out / name}: file too large" in done.stderr
    assert list(out.iterdir()) == []  # no truncated output, no temp file


def test_a_file_name_at_the_255_byte_limit_is_written(tmp_path, tiny_model):
    name = "n" * 251 + ".png"
    (src,) = make_images(tmp_path / "in", [name], size=(16, 16))
    result = runner.invoke(app, ["denoise", str(src), str(tmp_path / "out") + "/", "-m", tiny_model, "-q"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


def test_a_fifo_as_input_is_not_a_regular_file(tmp_path, tiny_model):
    os.mkfifo(tmp_path / "pipe.png")
    result = runner.invoke(app, ["denoise", str(tmp_path / "pipe.png"), str(tmp_path / "o.png"), "-m", tiny_model])
    assert result.exit_code == 1 and f"error: cannot read {tmp_path / 'pipe.png'}: not a regular file" in result.stderr
