"""The default model: the authors' masked checkpoint, downloaded on first use and cached, or the
shipped fallback with a one-line notice where it can't be had; never the internet in a test.

A local server on 127.0.0.1 (test_weights.py's ``origin``) plays GitHub and serves a stand-in for
the authors' file, registered under the default's name with its own git blob id, so the download
takes the same path as the real one.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import closed_port, subprocess_env, write_random_image
from mitdenoise import Denoiser, registry
from mitdenoise.cli import app
from mitdenoise.errors import ModelUnavailableError
from mitdenoise.registry import DEFAULT_MODEL, FALLBACK_MODEL, REGISTRY, model_names
from test_weights import cache_files, hf_home, origin, register_fixture  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("two_threads")

runner = CliRunner()
NOTICE = (
    "notice: using mitdenoise-auto (shipped), not the default masked-denoising (the authors' masked checkpoint): "
)
GET_IT = "; get it with `mitdenoise download masked-denoising`"


@pytest.fixture
def stand_in(origin, fixtures_dir, monkeypatch):
    """The tiny authors'-format checkpoint served and registered as the default model."""
    return register_fixture(monkeypatch, fixtures_dir, origin, DEFAULT_MODEL, "official_tiny_random.pth",
                            path="model_zoo/input_mask_80_90.pth")


def denoise(tmp_path: Path, *options: str, name: str = "out.png"):
    src = tmp_path / "in.png"
    if not src.exists():
        write_random_image(src, (24, 32))
    result = runner.invoke(app, ["denoise", str(src), str(tmp_path / name), *options])
    return result


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("notice:")]


def summary(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("denoised ")]
    return line


def test_the_first_run_downloads_the_default_and_the_second_runs_offline_from_the_cache(
    stand_in, origin, hf_home, tmp_path, monkeypatch
):
    first = denoise(tmp_path, name="first.png")
    assert first.exit_code == 0, first.output
    assert origin.requests == [f"GET /haoyuc/MaskedDenoising/raw/{registry.AUTHORS_COMMIT}/{stand_in.path}"]
    assert notices(first.stderr) == []
    assert summary(first.stderr).startswith("denoised 1 file(s) with masked-denoising, ")
    (cached,) = cache_files(hf_home)
    assert cached == registry.cached_path(stand_in)

    origin.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    connections = origin.connections
    second = denoise(tmp_path, name="second.png")
    assert second.exit_code == 0, second.output
    assert notices(second.stderr) == [] and "with masked-denoising" in summary(second.stderr)
    assert origin.requests == [] and origin.connections == connections
    # the same model with the same seed: the same image, attention mask and all
    assert np.array_equal(np.asarray(Image.open(tmp_path / "first.png")), np.asarray(Image.open(tmp_path / "second.png")))


def test_the_python_api_runs_the_default_with_its_attention_mask_and_says_which_model_ran(
    stand_in, origin, hf_home, monkeypatch
):
    offline = Denoiser(offline=True, device="cpu")
    assert (offline.model_name, origin.connections) == (FALLBACK_MODEL, 0)
    assert offline.notice == NOTICE[len("notice: "):] + "it is not in the cache and offline use was asked for" + GET_IT
    with pytest.raises(ModelUnavailableError, match="offline use was asked for"):
        Denoiser(DEFAULT_MODEL, offline=True)
    assert origin.connections == 0

    online = Denoiser(device="cpu", seed=3)
    assert (online.model_name, online.notice) == (DEFAULT_MODEL, None)
    assert online.config.attn_mask_ratio == (75, 75) and online.config.mask_enabled
    noisy = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert np.array_equal(online(noisy), Denoiser(offline=True, device="cpu", seed=3)(noisy))  # from the cache now
    assert not np.array_equal(online(noisy), Denoiser(offline=True, device="cpu", seed=4)(noisy))  # the mask is drawn
    assert Denoiser(offline=True).model_name == DEFAULT_MODEL and len(origin.requests) == 1
    assert Denoiser(FALLBACK_MODEL).model_name == FALLBACK_MODEL


@pytest.mark.parametrize("endpoint", ["refused", "silent", "http-404"])
def test_an_endpoint_that_cannot_serve_the_default_gives_the_fallback_with_one_notice_in_bounded_time(
    stand_in, origin, hf_home, tmp_path, monkeypatch, endpoint
):
    if endpoint == "refused":
        monkeypatch.setenv("MITDENOISE_GITHUB_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
        reason = "cannot connect to 127.0.0.1"
    elif endpoint == "silent":
        origin.stall = "silent"
        reason = "no answer from 127.0.0.1 within 5 s"
    else:
        origin.github.clear()
        reason = "127.0.0.1 answered HTTP 404 Not Found"
    start = time.monotonic()
    result = denoise(tmp_path)
    took = time.monotonic() - start
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.png").is_file()
    (line,) = notices(result.stderr)
    assert line.startswith(NOTICE + reason) and line.endswith(GET_IT)
    assert "with mitdenoise-auto" in summary(result.stderr)
    assert cache_files(hf_home) == []
    assert took < 20, took  # a short timeout and no retries when nobody asked for the default by name


def test_a_download_that_fails_its_checksum_gives_the_fallback_and_caches_nothing(stand_in, origin, hf_home, tmp_path):
    origin.tamper = "flip"
    result = denoise(tmp_path)
    assert result.exit_code == 0, result.output
    (line,) = notices(result.stderr)
    assert line == NOTICE + "the download failed its checksum and was deleted" + GET_IT
    assert "with mitdenoise-auto" in summary(result.stderr)
    assert cache_files(hf_home) == [] and not registry.is_cached(REGISTRY[DEFAULT_MODEL])
    assert list((hf_home / "hub" / "mitdenoise").rglob("*.incomplete")) == []


@pytest.mark.parametrize("cause", ["offline", "refused", "checksum"])
def test_the_default_asked_for_by_name_that_cannot_be_had_is_a_one_line_error(
    stand_in, origin, hf_home, tmp_path, monkeypatch, cause
):
    if cause == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif cause == "refused":
        monkeypatch.setenv("MITDENOISE_GITHUB_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    else:
        origin.tamper = "flip"
    result = denoise(tmp_path, "--model", DEFAULT_MODEL)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
    assert "masked-denoising" in result.output and "notice" not in result.output
    assert not (tmp_path / "out.png").exists() and cache_files(hf_home) == []


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE=1", "--offline"])
def test_offline_makes_no_connection_at_all(stand_in, origin, hf_home, tmp_path, monkeypatch, how):
    options = []
    if how == "--offline":
        options = ["--offline"]
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = denoise(tmp_path, *options)
    assert result.exit_code == 0, result.output
    why = "offline use was asked for" if options else "offline mode is on (HF_HUB_OFFLINE)"
    assert notices(result.stderr) == [NOTICE + f"it is not in the cache and {why}" + GET_IT]
    assert origin.connections == 0 and origin.requests == []


def test_quiet_keeps_the_notice_off_the_terminal(tmp_path):
    result = denoise(tmp_path, "-q")
    assert result.exit_code == 0 and result.output == ""


def test_ctrl_c_during_the_download_leaves_no_partial_file_in_the_cache(origin, hf_home, fixtures_dir, tmp_path):
    # A child process sees the real registry entry: the server holds back half of a file under its path.
    entry = REGISTRY[DEFAULT_MODEL]
    origin.serve_github(entry.github_repo, entry.path, (fixtures_dir / "official_tiny_random.pth").read_bytes())
    origin.stall = "partial-then-hang"
    src = write_random_image(tmp_path / "in.png", (24, 32))
    child = subprocess.Popen(
        [sys.executable, "-m", "mitdenoise", "denoise", str(src), str(tmp_path / "out.png")],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    cache = hf_home / "hub" / "mitdenoise"
    deadline = time.monotonic() + 60
    while not (origin.stalled.is_set() and list(cache.rglob("*.incomplete"))):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts] == []
    assert not (tmp_path / "out.png").exists()


def test_models_fits_each_row_in_two_lines_of_an_80_column_terminal():
    done = subprocess.run([sys.executable, "-m", "mitdenoise", "models"], capture_output=True, text=True,
                          env=subprocess_env(COLUMNS="80"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows: list[list[str]] = []
    body = lines[2:lines.index(next(line for line in lines if line.startswith("Also:")))]
    for line in body:
        if line.startswith(" ") and not line.startswith("  "):
            rows.append([line])  # a row starts with its name
        else:
            rows[-1].append(line)
    assert [row[0].split()[0] for row in rows] == model_names()
    assert all(len(row) <= 2 for row in rows), rows
    assert "(default)" in rows[0][0] and "(fallback)" in rows[1][0]
