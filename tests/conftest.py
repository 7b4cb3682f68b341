"""Shared test helpers: where ../shared is (and a skip that CI turns into a failure), the tiny
checkpoint, random test images, and the environment for tests that run the tool in a child."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"


def need_shared(path: Path = SHARED) -> Path:
    """Skip (in a user's clone) or fail (in CI, MITDENOISE_REQUIRE_SHARED=1) when ../shared is absent."""
    if not path.exists():
        reason = f"needs {path} (the project's shared fixtures and data, present in CI)"
        if os.environ.get("MITDENOISE_REQUIRE_SHARED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return need_shared(FIXTURES)


@pytest.fixture
def data_dir() -> Path:
    return need_shared(DATA)


@pytest.fixture
def tiny_model(fixtures_dir) -> str:
    """The tiny authors'-format checkpoint (random weights, attention mask 75 %), as a --model value."""
    return str(fixtures_dir / "official_tiny_random.pth")


def write_random_image(path: Path, size=(40, 56), mode: str = "RGB", seed: int = 0) -> Path:
    """A uniform-noise 8-bit image (RGB, L or RGBA) of ``size`` (height, width) at ``path``."""
    import numpy as np
    from PIL import Image

    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    data = np.random.default_rng(seed).integers(0, 256, (*size, channels), dtype=np.uint8)
    Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode).save(path)
    return path


def subprocess_env(**extra: str) -> dict:
    """The environment for a child process that imports this checkout's mitdenoise (outside torchrun)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Torch on 2 threads (this project's CPU) for the test, restored after."""
    yield from _torch_threads(2)


@pytest.fixture
def one_thread():
    """Torch on 1 thread for the test (timings and sums that must not depend on threads), restored after."""
    yield from _torch_threads(1)


@pytest.fixture(autouse=True)
def pillows_pixel_limit_restored():
    """`denoise --max-pixels` run in-process sets Pillow's global limit: put it back after every test."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


@pytest.fixture(autouse=True)
def library_logger_restored():
    """A command run in-process (CliRunner) shows the library's log on stderr (``show_library_log``):
    take its handler off again after every test, as a new process would start without it."""
    import logging

    logger = logging.getLogger("mitdenoise")
    before = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = before[0]
    logger.setLevel(before[1])
    logger.propagate = before[2]


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_internet_and_an_empty_cache(tmp_path_factory, monkeypatch):
    """Every test runs offline (HF_HUB_OFFLINE=1, and both endpoints at a closed local port in case a
    test turns offline mode off) with an empty Hugging Face cache of its own: no test reaches the
    internet or the user's cache. The download tests opt in through test_weights.py's server."""
    home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nowhere = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MITDENOISE_GITHUB_ENDPOINT", nowhere)
    monkeypatch.setenv("HF_ENDPOINT", nowhere)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield home
