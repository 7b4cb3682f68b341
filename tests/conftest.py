"""Shared test helpers: where ../shared is, and a skip that CI turns into a failure."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
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
def two_threads():
    """Torch on 2 threads (this project's CPU) for the test, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def pillows_pixel_limit_restored():
    """`denoise --max-pixels` run in-process sets Pillow's global limit: put it back after every test."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before
