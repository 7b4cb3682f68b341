"""The checkpoints we ship: the networks and numbers their card, the benchmarks and the README state, the README's first command.

The undertrained masked checkpoint (once `mitdenoise`) was removed: its recipe stays in weights/, its
numbers stay in the card and the benchmarks as a "removed" column, measured then and not re-measured."""

import dataclasses
import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitdenoise import Denoiser
from mitdenoise.bench.quality import run_quality
from mitdenoise.metrics import psnr
from mitdenoise.model import ModelConfig
from mitdenoise.train.config import resolve_config
from mitdenoise.checkpoints import read_validation
from conftest import subprocess_env
from mitdenoise.registry import FALLBACK_MODEL, PIPELINES, REGISTRY, resolve_model, shipped_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "weights" / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
EXAMPLE_NOISY = ROOT / "examples" / "kodim23-noisy-poisson2.png"
EXAMPLE_CLEAN = ROOT / "examples" / "kodim23-clean.png"
REMOVED_COLUMN = "mitdenoise-masked (removed)"


def card_number(pattern: str) -> float:
    found = re.search(pattern, CARD.read_text())
    assert found, f"weights/README.md has no line matching {pattern!r}"
    return float(found.group(1))


def card_network() -> ModelConfig:
    """The network the card's **Network:** line states (with the masked-training wiring's defaults)."""
    network = r"\*\*Network:\*\* .*?embed_dim (\d+), depths \[([\d, ]+)\], heads \[([\d, ]+)\]"
    found = re.search(network, CARD.read_text(), re.DOTALL)
    assert found, "weights/README.md states no **Network:** line"
    return ModelConfig(
        embed_dim=int(found.group(1)),
        depths=tuple(int(d) for d in found.group(2).split(",")),
        num_heads=tuple(int(h) for h in found.group(3).split(",")),
    )


def test_the_removed_masked_checkpoint_is_gone_but_its_recipe_builds_the_network_the_card_states():
    assert not (ROOT / "weights" / "mitdenoise-masked.safetensors").exists()
    assert "mitdenoise" not in REGISTRY and "mitdenoise-masked" not in REGISTRY
    # The masked-training wiring (1x1 conv_first, 3conv, no global residual, window 8) and the 75 % attention mask,
    # trained for as long as the card says.
    stated = card_network()
    settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-masked.toml")
    assert settings.model == stated and stated.attn_mask_ratio == (75, 75) and not stated.global_residual
    assert settings.iterations == card_number(r"\*\*Iterations:\*\* (\d+)")


def test_the_shipped_baseline_is_the_masked_network_without_masks_trained_as_its_settings_say():
    path = resolve_model("mitdenoise-baseline")
    assert path == shipped_checkpoint("mitdenoise-baseline")
    assert path.parent == shipped_checkpoint("mitdenoise-mild").parent and path.stat().st_size < 10 * 2**20
    baseline = Denoiser("mitdenoise-baseline", device="cpu")
    assert baseline.config == dataclasses.replace(card_network(), attn_mask_ratio=(0, 0))
    # Its settings are the masked checkpoint's, budget and schedule included, with both masks off.
    settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-baseline.toml")
    masked_settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-masked.toml")
    assert settings.is_baseline and settings.model == baseline.config
    assert settings == masked_settings.baseline_variant()
    record = read_validation(path)
    stated = card_number(r"\*\*Baseline iterations:\*\* (\d+)")
    assert record is not None and record["iteration"] == settings.iterations == stated


def test_mild_is_the_baseline_fine_tuned_with_a_mild_input_mask_as_its_settings_say():
    path = resolve_model("mitdenoise-mild")
    assert path == shipped_checkpoint("mitdenoise-mild")
    assert path.parent == shipped_checkpoint("mitdenoise-baseline").parent and path.stat().st_size < 10 * 2**20
    mild, baseline = Denoiser("mitdenoise-mild", device="cpu"), Denoiser("mitdenoise-baseline", device="cpu")
    assert mild.config == baseline.config and mild.config.attn_mask_ratio == (0, 0)
    # No attention mask, so no randomness: any seed gives the same output; and not the baseline's output.
    noisy = np.random.default_rng(0).random((48, 40, 3), dtype=np.float32)
    assert np.array_equal(Denoiser(path, seed=0)(noisy), Denoiser(path, seed=1)(noisy))
    assert np.abs(mild(noisy) - baseline(noisy)).max() > 1e-3
    # Its settings are the baseline's recipe and network started from the shipped baseline, with 0-25 % of
    # each patch hidden, at the paper's batch and lr on a GPU; nothing else differs.
    settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-mild.toml")
    baseline_settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-baseline.toml")
    assert settings.model == mild.config
    assert settings == baseline_settings.replace(
        init="mitdenoise-baseline", input_mask=(0, 25), data="runs/train348", batch_size=64, lr=1e-4,
        iterations=settings.iterations, milestones=(), precision="bf16",
        checkpoint_every=1000, log_every=500, val_every=500,
    )
    record = read_validation(path)
    stated = card_number(r"\*\*Mild iterations:\*\* (\d+)")
    assert record is not None and record["iteration"] == settings.iterations == stated


def test_the_camera_network_is_mild_fine_tuned_blind_on_white_and_camera_structured_noise():
    path = resolve_model("mitdenoise-camera")
    assert path == shipped_checkpoint("mitdenoise-camera") and path.stat().st_size < 10 * 2**20
    camera = Denoiser("mitdenoise-camera", device="cpu")
    assert camera.config == Denoiser("mitdenoise-mild", device="cpu").config
    settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-camera.toml")
    mild_settings = resolve_config("cpu", ROOT / "weights" / "mitdenoise-mild.toml")
    assert settings.model == camera.config
    assert settings == mild_settings.replace(
        init="mitdenoise-mild", batch_size=8, iterations=settings.iterations, precision=settings.precision,
        noise_sigma=(0, 30), clip_noisy=False, correlated_noise=0.5, correlated_sigma=(1, 15),
        checkpoint_every=250, log_every=100, val_every=1000,
    )
    record = read_validation(path)
    stated = card_number(r"\*\*Camera iterations:\*\* (\d+)")
    # stopped (SIGINT) after its last validation: the record is that validation's
    assert settings.iterations == stated
    assert record is not None and record["iteration"] == stated // settings.val_every * settings.val_every


def test_the_fallback_is_the_route_over_mild_and_the_camera_network():
    assert FALLBACK_MODEL == "mitdenoise-auto"
    assert PIPELINES[FALLBACK_MODEL] == {"white": "mitdenoise-mild", "camera": "mitdenoise-camera"}
    default = Denoiser(device="cpu")  # offline here: the fallback
    assert default.model_name == FALLBACK_MODEL and default.notice is not None
    assert default.config == Denoiser("mitdenoise-camera", device="cpu").config


@pytest.mark.parametrize(
    "options, stated_as",
    [
        ([], "denoised with the defaults and no network (the fallback)"),
        (["--model", "mitdenoise-baseline"], "with `--model mitdenoise-baseline`"),
    ],
    ids=["default", "baseline"],
)
@pytest.mark.slow
def test_the_readmes_first_command_denoises_the_example_to_the_psnr_the_card_states(tmp_path, options, stated_as):
    """With no network (not offline mode: the default's address refuses the connection) the first
    command runs the shipped fallback and says so in one notice line."""
    out = tmp_path / "denoised.png"
    env = subprocess_env()
    env.pop("HF_HUB_OFFLINE")
    done = subprocess.run(
        [sys.executable, "-m", "mitdenoise", "denoise", str(EXAMPLE_NOISY), str(out), *options],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if line.startswith("notice:")]
    if options:
        assert notices == [] and "with mitdenoise-baseline" in done.stderr
    else:
        (notice,) = notices
        assert notice.startswith("notice: using mitdenoise-auto (shipped), not the default masked-denoising")
        assert "cannot connect to 127.0.0.1" in notice and "`mitdenoise download masked-denoising`" in notice
        assert "with mitdenoise-auto" in done.stderr
    result = np.asarray(Image.open(out))
    clean = np.asarray(Image.open(EXAMPLE_CLEAN))
    assert result.shape == clean.shape == (256, 256, 3) and result.dtype == np.uint8
    stated = card_number(rf"(?s)`examples/kodim23-noisy-poisson2.png` [^`]*?{re.escape(stated_as)}: ([\d.]+) dB")
    assert abs(psnr(result, clean) - stated) < 0.01
    assert "warning:" not in done.stderr


def tables(document: Path) -> list[list[list[str]]]:
    """Every Markdown table in ``document``: a list of rows (the header first, no separator), each a list of cells."""
    found, current = [], []
    for line in document.read_text().splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def psnr_ssim(cell: str) -> tuple[float, float]:
    psnr_text, ssim_text = (part.strip().strip("*") for part in cell.split("/"))
    return float(psnr_text), float(ssim_text)


def table_cell(document: Path, noise: str, column: str) -> tuple[float, float]:
    """(PSNR, SSIM) that the quality table in ``document`` (the first whose header is ``noise``) gives ``column``
    in the row ``noise``."""
    table = next((table for table in tables(document) if table[0][0] == "noise"), None)
    assert table is not None, f"{document.name} has no quality table (a header starting with '| noise |')"
    row = next((row for row in table[1:] if row[0] == noise), None)
    assert row is not None, f"the quality table in {document.name} has no row {noise!r}"
    return psnr_ssim(row[table[0].index(column)])


# The README's models table: one row a model (and the noisy input), one column a McMaster noise.
README_COLUMNS = {
    "gaussian:15": "McMaster, Gaussian 15 (seen)",
    "given:mcmaster_poisson_alpha2": "McMaster, authors' Poisson pairs (unseen)",
}
README_ROWS = {
    "noisy": "noisy input",
    "mitdenoise-baseline": "`mitdenoise-baseline`",
    "mitdenoise-mild": "`mitdenoise-mild`",
    "mitdenoise-auto": "`mitdenoise-auto` (fallback)",
}


def readme_models_cell(noise: str, column: str) -> tuple[float, float]:
    """(PSNR, SSIM) that the README's models table gives the model (or noisy input) ``column`` on ``noise``."""
    table = next((table for table in tables(README) if table[0][0] == "model"), None)
    assert table is not None, "README.md has no models table (a header starting with '| model |')"
    row = next((row for row in table[1:] if row[0] == README_ROWS[column]), None)
    assert row is not None, f"the README's models table has no row {README_ROWS[column]!r}"
    return psnr_ssim(row[table[0].index(README_COLUMNS[noise])])


@pytest.mark.slow
def test_the_mcmaster_numbers_in_the_card_benchmarks_and_readme_are_what_the_shipped_models_measure(data_dir, two_threads):
    results = run_quality(
        data_dir / "test" / "mcmaster",
        noisy_dir=data_dir / "test" / "mcmaster_poisson_alpha2",
        noise_spec="gaussian:15",
        models=("mitdenoise-baseline", "mitdenoise-mild", "mitdenoise-auto"),
        baselines=("noisy",),
        crop=256,
        seed=0,
        device="cpu",
    )
    assert [row["noise"] for row in results["rows"]] == ["gaussian:15", "given:mcmaster_poisson_alpha2"]
    for row in results["rows"]:
        for column in ("noisy", "mitdenoise-baseline", "mitdenoise-mild", "mitdenoise-auto"):
            measured = row["results"][column]
            stated = {
                CARD.name: table_cell(CARD, row["noise"], column),
                "docs/" + BENCHMARKS.name: table_cell(BENCHMARKS, row["noise"], column),
                README.name: readme_models_cell(row["noise"], column),
            }
            for document, (stated_psnr, stated_ssim) in stated.items():
                where = (document, row["noise"], column, measured, (stated_psnr, stated_ssim))
                # The tables round to 0.01 dB and 0.0001.
                assert abs(measured["psnr"] - stated_psnr) <= 0.0051, where
                assert abs(measured["ssim"] - stated_ssim) <= 0.000051, where


def test_the_readme_card_and_benchmarks_state_the_same_mcmaster_numbers():
    """The cheap half of the slow test above: the three documents agree with each other, cell for cell.
    The removed masked checkpoint's column (not re-measured: the file is gone) agrees between the two
    documents that keep it."""
    for noise, column in itertools.product(README_COLUMNS, README_ROWS):
        card = table_cell(CARD, noise, column)
        assert table_cell(BENCHMARKS, noise, column) == card, (noise, column)
        assert readme_models_cell(noise, column) == card, (noise, column)
    for noise in README_COLUMNS:
        assert table_cell(BENCHMARKS, noise, REMOVED_COLUMN) == table_cell(CARD, noise, REMOVED_COLUMN), noise
