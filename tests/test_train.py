"""Training: the input mask, augmentation, learning, exact resume, signals, export, torchrun.

Runs use tiny networks on small generated images, one thread each, so every number
here is deterministic on a given machine and the file stays well under two minutes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import subprocess_env
from mitdenoise.checkpoints import load_model, read_validation
from mitdenoise.errors import MitdenoiseError, TrainSetupError
from mitdenoise.masking import MASKED_VALUE, input_mask
from mitdenoise.model import ModelConfig
from mitdenoise.train import PRESETS, TrainConfig, resolve_config, train
from mitdenoise.noise import YCBCR_TO_RGB, structured_noise
from mitdenoise.train.data import PatchBatches, augment, augment_inverse, find_images, load_images
from mitdenoise.train.loop import CHECKPOINT_NAME, EXPORT_NAME
from mitdenoise.train.validation import synthetic_sets

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig(embed_dim=12, depths=(2,), num_heads=(2,))


def make_images(folder: Path, n: int, size=(96, 80), seed: int = 0) -> Path:
    """Smooth colour waves with a few flat rectangles: structure a tiny network can learn fast."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(n):
        img = np.zeros((h, w, 3))
        for c in range(3):
            fx, fy, ph = rng.uniform(1, 4, 3)
            img[..., c] = 0.5 + 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        for _ in range(3):
            t, left = rng.integers(0, h - 16), rng.integers(0, w - 16)
            img[t : t + rng.integers(8, 24), left : left + rng.integers(8, 24)] = rng.uniform(0, 1, 3)
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {"train": make_images(root / "train" / "nested", 6), "val": make_images(root / "val", 2, seed=1)}


def tiny_config(images, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(
        data=str(images["train"].parent),
        out=str(out),
        model=TINY,
        patch_size=16,
        batch_size=4,
        iterations=8,
        milestones=(5,),
        threads=1,
        checkpoint_every=4,
        log_every=2,
        val_every=1000,
        workers=0,
    )
    return base.replace(**changes)


def run_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- input mask, augmentation, data


def test_input_mask_hides_80_to_90_percent_of_pixels_all_channels_together_with_minus_0_1():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 64, 64, generator=g)
    y = input_mask(x, (80, 90), generator=g)
    masked = y == MASKED_VALUE
    assert torch.equal(masked, masked[:, :1].expand_as(masked)), "channels of a pixel are masked together"
    assert torch.all(y[masked] == torch.tensor(-0.1)), "masked pixels are exactly -0.1"
    assert torch.equal(y[~masked], x[~masked]), "kept pixels are untouched"
    per_patch = masked[:, 0].float().mean(dim=(1, 2))  # 4096 pixels each: std of the fraction is ~0.006
    assert per_patch.min() > 0.8 - 0.025 and per_patch.max() < 0.9 + 0.025
    assert 0.8 < per_patch.mean() < 0.9
    assert per_patch.std() > 0.01, "the ratio is drawn per patch, not once per batch"
    fixed = input_mask(x, (80, 80), generator=g)[:, 0] == MASKED_VALUE
    assert abs(fixed.float().mean().item() - 0.8) < 0.005
    assert input_mask(x, (0, 0)) is x
    single = input_mask(x[0], (80, 90), generator=g)
    assert single.shape == x[0].shape


def test_eight_augmentation_modes_are_distinct_and_invertible():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5)
    outs = [augment(x, mode) for mode in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8
    for mode, o in enumerate(outs):
        assert torch.equal(augment_inverse(o, mode), x)


def test_patches_are_a_function_of_seed_and_step_and_ranks_split_the_global_batch(images):
    imgs, _ = load_images(find_images(images["train"].parent), min_size=16)
    kw = dict(patch_size=16, batch_size=4, steps=10, seed=3, noise_sigma=15, mask_ratio=(80, 90))
    whole = PatchBatches(imgs, **kw)
    noisy, clean = whole[7]
    assert noisy.shape == clean.shape == (4, 3, 16, 16)
    assert torch.equal(noisy, whole[7][0]) and not torch.equal(noisy, whole[6][0])
    assert clean.min() >= 0 and clean.max() <= 1
    masked = (noisy == MASKED_VALUE)[:, 0].float().mean()
    assert 0.7 < masked < 0.95
    halves = [PatchBatches(imgs, **kw, rank=r, world_size=2)[7] for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), noisy)
    assert torch.equal(torch.cat([h[1] for h in halves]), clean)
    with pytest.raises(ValueError, match="divisible"):
        PatchBatches(imgs, **{**kw, "batch_size": 3}, world_size=2)


def test_a_sigma_range_draws_each_patchs_noise_level_within_it_and_a_single_sigma_keeps_its_stream(images):
    imgs, _ = load_images(find_images(images["train"].parent), min_size=16)
    kw = dict(patch_size=16, batch_size=8, steps=10, seed=3, mask_ratio=(0, 0))
    fixed = PatchBatches(imgs, **kw, noise_sigma=15)
    assert torch.equal(fixed[4][0], PatchBatches(imgs, **kw, noise_sigma=(15, 15))[4][0])
    stds = []
    for step in range(10):
        noisy, clean = PatchBatches(imgs, **kw, noise_sigma=(0, 50))[step]
        stds += ((noisy - clean) * 255).flatten(1).std(dim=1).tolist()  # clipping only lowers it
    assert max(stds) < 50 * 1.15 and min(stds) < 10 and max(stds) > 30
    assert float(np.std(stds)) > 8, "sigma is drawn per patch, not once"
    assert TrainConfig(noise_sigma=[0, 50]).noise_sigma == (0.0, 50.0)
    with pytest.raises(ValueError, match="0 <= low <= high"):
        TrainConfig(noise_sigma=[30, 10])
    with pytest.raises(ValueError, match=r"noise_sigma must be a number or \[low, high\]"):
        TrainConfig(noise_sigma=[1, 2, 3])


def test_clip_noisy_off_leaves_noise_past_black_and_white_and_on_keeps_the_stream(images):
    imgs, _ = load_images(find_images(images["train"].parent), min_size=16)
    kw = dict(patch_size=16, batch_size=8, steps=4, seed=3, noise_sigma=40, mask_ratio=(0, 0))
    clipped, _ = PatchBatches(imgs, **kw)[2]
    raw, clean = PatchBatches(imgs, **kw, clip_noisy=False)[2]
    assert clipped.min() >= 0 and clipped.max() <= 1
    assert raw.min() < 0 or raw.max() > 1
    assert torch.equal(raw.clamp(0, 1), clipped)
    assert TrainConfig(clip_noisy=False).clip_noisy is False
    with pytest.raises(ValueError, match="clip_noisy must be true or false"):
        TrainConfig(clip_noisy="no")


def test_correlated_noise_has_the_asked_level_and_is_coarser_in_colour_than_in_brightness():
    g = torch.Generator().manual_seed(0)
    fields = torch.stack([structured_noise(64, 10.0, g) for _ in range(300)])
    assert fields.shape == (300, 3, 64, 64)
    assert abs(float(fields.pow(2).mean().sqrt()) - 10.0) < 0.3  # per-channel RMS std is sigma
    ycc = torch.einsum("ij,njhw->nihw", torch.linalg.inv(torch.tensor(YCBCR_TO_RGB)), fields)

    def neighbour_correlation(x):  # over patches and pixels, per component
        return ((x[..., 1:] * x[..., :-1]).mean(dim=(0, 2, 3)) / x.pow(2).mean(dim=(0, 2, 3))).tolist()

    luma, cb, cr = neighbour_correlation(ycc)
    assert 0.2 < luma < 0.7 and 0.5 < cb < 0.9 and 0.5 < cr < 0.9 and min(cb, cr) > luma + 0.1
    per_patch = [neighbour_correlation(f[None])[0] for f in ycc[:, :1]]
    assert min(per_patch) < 0.1 and max(per_patch) > 0.6, "the blur is drawn per patch, from none to about 1 px"
    assert torch.equal(structured_noise(16, 5.0, torch.Generator().manual_seed(3)),
                       structured_noise(16, 5.0, torch.Generator().manual_seed(3)))


def test_a_share_of_patches_gets_correlated_noise_in_its_own_sigma_range(images):
    imgs, _ = load_images(find_images(images["train"].parent), min_size=16)
    kw = dict(patch_size=16, batch_size=8, steps=40, seed=3, noise_sigma=30, mask_ratio=(0, 0), clip_noisy=False)
    assert torch.equal(PatchBatches(imgs, **kw)[5][0], PatchBatches(imgs, **kw, correlated_share=0.0)[5][0])
    mixed = PatchBatches(imgs, **kw, correlated_share=0.5, correlated_sigma=(2, 6))
    stds = [float(s) for step in range(40) for s in ((mixed[step][0] - mixed[step][1]) * 255).flatten(1).std(dim=1)]
    light = [s for s in stds if s < 12]  # white sigma-30 patches read about 30
    assert 0.35 < len(light) / len(stds) < 0.65
    assert min(light) > 1 and max(light) < 8
    assert TrainConfig(correlated_noise=0.5, correlated_sigma=[2, 6]).correlated_sigma == (2.0, 6.0)
    with pytest.raises(ValueError, match=r"correlated_noise must be a share in \[0, 1\]"):
        TrainConfig(correlated_noise=1.5)
    with pytest.raises(ValueError, match="correlated_sigma must be"):
        TrainConfig(correlated_sigma=[1, 2, 3])
    with pytest.raises(ValueError, match="0 < low <= high"):
        TrainConfig(correlated_sigma=[0, 5])


def test_the_broad_recipe_spans_light_to_heavy_noise_and_ends_in_8_bits_where_a_camera_or_jpeg_made_it():
    from mitdenoise.train.data import BROAD_JPEG_SHARE, BROAD_KINDS, broad_noise

    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    x = np.clip(0.5 + 0.1 * np.sin(np.mgrid[:48, :48][1] / 3.0)[..., None] * np.ones(3), 0, 1)
    stds, quantised = [], 0
    for _ in range(300):
        noisy, target = broad_noise(x, rng, g, clip=False)
        assert noisy.shape == target.shape == x.shape
        stds.append(float((noisy - target).std() * 255))
        quantised += bool(np.array_equal(np.round(noisy * 255), noisy * 255))
    camera_share = dict(BROAD_KINDS)["camera"] / sum(dict(BROAD_KINDS).values())
    expected = camera_share + (1 - camera_share) * BROAD_JPEG_SHARE
    assert abs(quantised / 300 - expected) < 0.1
    assert min(stds) < 1.5 and max(stds) > 35 and 3 < np.median(stds) < 25


def test_broad_patches_are_seeded_full_size_and_need_a_margin_around_them(images):
    from mitdenoise.train.data import BROAD_MARGIN, min_image_size

    imgs, _ = load_images(find_images(images["train"].parent), min_size=32 + 2 * BROAD_MARGIN)
    kw = dict(patch_size=32, batch_size=4, steps=10, seed=3, noise_sigma=15, mask_ratio=(0, 0), broad=True)
    noisy, clean = PatchBatches(imgs, **kw)[7]
    again = PatchBatches(imgs, **kw)[7]
    assert noisy.shape == clean.shape == (4, 3, 32, 32)
    assert torch.equal(noisy, again[0]) and torch.equal(clean, again[1])
    assert not torch.equal(noisy, PatchBatches(imgs, **kw)[8][0])
    assert not torch.equal(noisy, clean)
    assert min_image_size(TrainConfig(patch_size=64, broad_noise=True)) == 64 + 2 * BROAD_MARGIN
    assert min_image_size(TrainConfig(patch_size=64)) == 64
    with pytest.raises(ValueError, match="broad_noise must be true or false"):
        TrainConfig(broad_noise="yes")


def test_a_mask_ramp_rises_linearly_from_no_mask_to_the_setting():
    from mitdenoise.masking import ramped

    assert [ramped((80, 90), step, 100) for step in (0, 50, 99, 100, 5000)] == [(0, 0), (40, 45), (79, 89), (80, 90), (80, 90)]
    assert ramped((75, 75), 0, 0) == (75, 75)


def test_the_input_mask_follows_the_ramp_by_step(images):
    imgs, _ = load_images(find_images(images["train"].parent), min_size=16)
    kw = dict(patch_size=16, batch_size=8, steps=200, seed=3, noise_sigma=15, mask_ratio=(80, 90), mask_ramp=100)
    share = [float((PatchBatches(imgs, **kw)[step][0] == MASKED_VALUE)[:, 0].float().mean()) for step in (0, 50, 150)]
    assert share[0] == 0 and 0.3 < share[1] < 0.55 and 0.75 < share[2] < 0.95
    assert torch.equal(PatchBatches(imgs, **kw)[150][0], PatchBatches(imgs, **{**kw, "mask_ramp": 0})[150][0])


def test_the_attention_mask_ratio_given_to_forward_replaces_the_configs():
    from mitdenoise.model import SwinIR

    torch.manual_seed(0)
    masked = SwinIR(TINY)
    plain = SwinIR(ModelConfig(**{**TINY.__dict__, "attn_mask_ratio": (0, 0)}))
    plain.load_state_dict(masked.state_dict())
    x = torch.rand(1, 3, 16, 16)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(masked(x, g(), mask_ratio=(0, 0)), plain(x, g()))
        assert not torch.equal(masked(x, g()), plain(x, g()))
        assert torch.equal(plain(x, g(), mask_ratio=(75, 75)), masked(x, g()))


def test_training_steps_pass_the_ramped_attention_mask_ratio(images, tmp_path, monkeypatch):
    from mitdenoise.model import SwinIR

    seen = []
    forward = SwinIR.forward

    def spy(self, x, generator=None, **kw):
        if torch.is_grad_enabled():
            seen.append(kw.get("mask_ratio"))
        return forward(self, x, generator, **kw)

    monkeypatch.setattr(SwinIR, "forward", spy)
    config = tiny_config(images, tmp_path / "run", iterations=4, mask_ramp=2, milestones=())
    assert train(config).exit_code == 0
    assert seen == [(0, 0), (38, 38), (75, 75), (75, 75)]
    assert load_model(tmp_path / "run" / EXPORT_NAME).config.attn_mask_ratio == (75, 75)


def test_cpu_fp32_training_takes_the_training_route_with_the_batch_in_parts_and_bf16_the_plain_route(
    images, tmp_path, monkeypatch
):
    from mitdenoise import route_train
    from mitdenoise.train import loop

    parts, groups = [], []
    in_parts, group_forward = loop.backward_in_parts, route_train.residual_group_forward
    monkeypatch.setattr(loop, "backward_in_parts", lambda *a: parts.append(r := in_parts(*a)) or r)
    monkeypatch.setattr(route_train, "residual_group_forward", lambda *a: groups.append(1) or group_forward(*a))
    assert train(tiny_config(images, tmp_path / "fp32", iterations=2, threads=2)).exit_code == 0
    assert len(parts) == 2 and all(loss is not None for loss in parts)
    assert len(groups) == 2 * 2  # each step: one residual group in each of two parts
    parts.clear(), groups.clear()
    assert train(tiny_config(images, tmp_path / "one", iterations=2)).exit_code == 0
    assert parts == [None, None] and len(groups) == 2  # one thread: one forward, through the route
    parts.clear(), groups.clear()
    config = tiny_config(images, tmp_path / "bf16", iterations=2, threads=2, precision="bf16")
    assert train(config).exit_code == 0
    assert parts == [] and groups == []  # bf16 autocast: the model's modules


def test_validation_noise_is_seeded_gaussian_15_the_authors_poisson_2_and_camera_4(images):
    from mitdenoise import noise

    sets = synthetic_sets(images["val"], limit=1, crop=40, seed=5)
    assert [s.name for s in sets] == ["gaussian15", "poisson2", "camera4"]
    clean = np.array(Image.open(images["val"] / "img0.png"))[28:68, 20:60]  # centre of 96 x 80
    assert np.array_equal(sets[0].clean[0], clean) and np.array_equal(sets[1].clean[0], clean)
    x = clean / 255.0
    for val, make in zip(sets, (lambda: noise.gaussian(x, 15, np.random.default_rng(5)),
                                lambda: noise.poisson(x, 2, np.random.default_rng(5)))):
        assert np.array_equal(val.noisy[0], np.clip(np.round(make() * 255), 0, 255).astype(np.uint8))
    noisy, twin = noise.camera_pair(x, 4.0, np.random.default_rng(5))  # scored against its clean twin
    assert np.array_equal(sets[2].noisy[0], np.round(noisy * 255).astype(np.uint8))
    assert np.array_equal(sets[2].clean[0], np.round(twin * 255).astype(np.uint8))
    assert [s.noisy[0].tolist() for s in synthetic_sets(images["val"], 1, 40, 5)] == [s.noisy[0].tolist() for s in sets]


# ----------------------------------------------------------------------------- configuration


def test_config_layers_preset_toml_and_flags_and_baseline_turns_both_masks_off(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 5e-4\nmilestones = [10, 20]\n[model]\nembed_dim = 24\n')
    config = resolve_config("quick", toml, {"lr": 1e-3, "batch_size": 4})
    assert (config.lr, config.milestones, config.batch_size) == (1e-3, (10, 20), 4)
    assert config.model.embed_dim == 24 and config.model.depths == PRESETS["quick"].model.depths
    assert config.model.attn_mask_ratio == (75, 75) and config.input_mask == (80, 90)
    base = resolve_config("quick", baseline=True)
    assert base.model.attn_mask_ratio == (0, 0) and base.input_mask == (0, 0) and base.is_baseline
    assert TrainConfig.from_dict(json.loads(config.to_json())) == config
    paper = PRESETS["paper"]
    assert (paper.model, paper.batch_size, paper.iterations, paper.lr, paper.ema_decay, paper.seed) == (
        ModelConfig(), 64, 400_000, 1e-4, 0.999, 1)
    assert paper.milestones == (150_000, 200_000, 300_000, 350_000, 400_000)
    toml.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        resolve_config("quick", toml)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("fast")


@pytest.mark.parametrize(
    "text, message",
    [
        ('batch_size = "eight"', "batch_size must be an integer, not 'eight'"),
        ("batch_size = true", "batch_size must be an integer, not True"),
        ('lr = "fast"', "lr must be a finite number, not 'fast'"),
        ("lr = nan", "lr must be a finite number, not nan"),
        ("input_mask = 5", "input_mask must be [low, high] in percent, not 5"),
        ("milestones = [1.5]", "milestones must be a list of integers, not [1.5]"),
        ("val_pairs = 5", "val_pairs must be a path (a string), not 5"),
        ("[model]\ndepths = 3", "depths must be a list of integers, not 3"),
        ('[model]\nembed_dim = "x"', "embed_dim must be a positive integer, not 'x'"),
        ("[model]\nwindow_size = 0", "window_size must be a positive integer, not 0"),
        ("[model]\nattn_mask_ratio = [75]", "attn_mask_ratio must be [low, high], not [75]"),
    ],
)
def test_a_setting_of_the_wrong_type_is_one_message_naming_it(tmp_path, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text + "\n")
    with pytest.raises(ValueError) as info:
        resolve_config("quick", toml)
    assert str(info.value) == message


def test_a_config_that_is_a_folder_or_not_utf8_is_one_message(tmp_path):
    with pytest.raises(ValueError, match=rf"^cannot read config file {tmp_path}: is a directory$"):
        resolve_config("quick", tmp_path)
    (tmp_path / "latin1.toml").write_bytes("preset = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.toml: not valid TOML"):
        resolve_config("quick", tmp_path / "latin1.toml")


def test_outputs_that_cannot_be_written_are_refused_before_training_and_leave_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "data").mkdir()

    def setup_error(**changes):
        config = PRESETS["quick"].replace(**{"data": str(tmp_path / "data"), "out": str(tmp_path / "run"), **changes})
        with pytest.raises(MitdenoiseError) as info:
            train(config)
        return str(info.value)

    assert setup_error(out=str(tmp_path / "afile")) == f"--out {tmp_path / 'afile'} is a file, not a folder"
    assert setup_error(export=str(tmp_path / "e.pth")) == f"--export {tmp_path / 'e.pth'} must end in .safetensors"
    (tmp_path / "d.safetensors").mkdir()
    assert setup_error(export=str(tmp_path / "d.safetensors")) == (
        f"--export {tmp_path / 'd.safetensors'} is a folder, not a file name"
    )
    assert setup_error(export=str(tmp_path / "afile" / "e.safetensors")) == (
        f"cannot write into {tmp_path / 'afile'}: {tmp_path / 'afile'} is not a folder we may write to"
    )
    assert setup_error(out=str(tmp_path / "afile" / "run")) == (
        f"cannot write into {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is not a folder we may write to"
    )
    assert setup_error().startswith("no images (")  # the empty data folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.safetensors", "data"]  # no run folder left


# ----------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_masked_training_lowers_the_loss(images, tmp_path):
    config = tiny_config(images, tmp_path / "run", model=ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 2)),
                         patch_size=32, batch_size=8, iterations=80, lr=3e-3, milestones=(), log_every=20)
    result = train(config)
    assert result.iteration == 80 and result.exit_code == 0
    losses = [r["loss"] for r in run_log(tmp_path / "run") if "loss" in r]
    # Measured: 0.195 -> 0.165. 85 % of the input is hidden, so it starts slowly.
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow
def test_training_raises_validation_psnr(images, tmp_path):
    # Without the masks training and validation see the same kind of input, so 80 steps of a tiny
    # network already show; a masked network needs longer before its PSNR on unmasked images rises
    # (the quick preset: 13.7 -> 15.7 dB in 300 steps on BSD images).
    config = tiny_config(images, tmp_path / "run", model=ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 2)),
                         patch_size=32, batch_size=8, iterations=80, lr=3e-3, milestones=(), ema_decay=0.9,
                         log_every=20, val_every=40, val_clean=str(images["val"]), val_crop=64).baseline_variant()
    result = train(config)
    log = run_log(tmp_path / "run")
    start = next(r for r in log if r["event"] == "start")
    vals = [r for r in log if "psnr_gaussian15" in r]
    assert [r["iteration"] for r in vals] == [0, 40, 80]
    assert start["noisy_psnr_gaussian15"] > 20 and start["noisy_psnr_poisson2"] > 15
    # Measured: 11.7 -> 16.0 dB on both noises.
    assert vals[-1]["psnr_gaussian15"] > vals[0]["psnr_gaussian15"] + 2.0, vals
    assert vals[-1]["psnr_poisson2"] > vals[0]["psnr_poisson2"] + 2.0, vals
    assert result.validation == {k: v for k, v in vals[-1].items() if k.startswith("psnr_")}
    # the exported weights carry the last validation, for `denoise` to warn with
    assert read_validation(tmp_path / "run" / EXPORT_NAME) == {"iteration": 80, "sets": {
        name: {"psnr": vals[-1][f"psnr_{name}"], "noisy_psnr": start[f"noisy_psnr_{name}"]}
        for name in ("gaussian15", "poisson2", "camera4")
    }}
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses


def _states(run: Path) -> dict:
    return torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_gives_bitwise_the_weights_of_an_uninterrupted_run(images, tmp_path, workers):
    whole = tiny_config(images, tmp_path / "whole", iterations=8, workers=0)
    train(whole)
    part = tiny_config(images, tmp_path / "part", iterations=3, workers=workers)
    train(part)
    assert _states(tmp_path / "part")["iteration"] == 3
    train(part.replace(iterations=8), resume=True)
    a, b = _states(tmp_path / "whole"), _states(tmp_path / "part")
    assert b["iteration"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] == 5e-5
    assert (tmp_path / "part" / "config.json").is_file()
    events = [r["event"] for r in run_log(tmp_path / "part")]
    assert events[0] == "start" and "resume" in events and events[-1] == "end"


def test_a_run_moved_to_another_machine_resumes_there_with_its_data_at_a_new_path(images, tmp_path):
    """The documented move: copy the run folder, point --data at the images' new place, --resume.

    The checkpoint carries a CUDA RNG state, as one written on a GPU machine does; the CPU ignores it.
    """
    whole = tiny_config(images, tmp_path / "whole", iterations=8)
    train(whole)
    first_machine = tmp_path / "first"
    data = first_machine / "data"
    shutil.copytree(images["train"].parent, data)
    train(tiny_config(images, first_machine / "run", iterations=3, data=str(data)))
    state = _states(first_machine / "run")
    state["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, first_machine / "run" / CHECKPOINT_NAME)

    second_machine = tmp_path / "second"
    second_machine.mkdir()
    shutil.move(first_machine / "run", second_machine / "run")
    shutil.move(data, second_machine / "images")
    shutil.rmtree(first_machine)
    args = [sys.executable, "-m", "mitdenoise.train", "--out", str(second_machine / "run"), "--resume",
            "--data", str(second_machine / "images"), "--iterations", "8", "--device", "cpu", "--quiet"]
    moved = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr[-2000:]
    a, b = _states(tmp_path / "whole"), _states(second_machine / "run")
    assert b["iteration"] == 8
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    saved = json.loads((second_machine / "run" / "config.json").read_text())
    assert saved["data"] == str(second_machine / "images") and saved["out"] == str(second_machine / "run")


def test_refuses_to_overwrite_a_run_or_resume_a_missing_one_or_a_different_network(images, tmp_path):
    config = tiny_config(images, tmp_path / "run", iterations=1)
    with pytest.raises(TrainSetupError, match="nothing to resume"):
        train(config, resume=True)
    train(config)
    with pytest.raises(TrainSetupError, match="already holds a run"):
        train(config)
    with pytest.raises(TrainSetupError, match="different network"):
        train(config.replace(iterations=2, model={"embed_dim": 24}), resume=True)


def test_init_starts_from_given_weights_with_its_own_attention_mask(images, tmp_path):
    source = tiny_config(images, tmp_path / "baseline", iterations=3).baseline_variant()
    train(source)
    weights = tmp_path / "baseline" / EXPORT_NAME
    start = load_model(weights).state_dict()
    # lr so small that one step moves no weight: the exported EMA is the initial state up to float rounding
    tuned = tiny_config(images, tmp_path / "tuned", iterations=1, lr=1e-12, init=str(weights))
    train(tuned)
    model = load_model(tmp_path / "tuned" / EXPORT_NAME)
    assert model.config.attn_mask_ratio == (75, 75)  # the run's mask, not the source's (0, 0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=1e-6, msg=name)
    fresh = tiny_config(images, tmp_path / "fresh", iterations=1, lr=1e-12)
    train(fresh)
    assert not torch.allclose(load_model(tmp_path / "fresh" / EXPORT_NAME).state_dict()["conv_last.weight"],
                              start["conv_last.weight"])
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["init"] == str(weights)


def test_init_with_another_network_or_a_missing_file_is_refused_before_the_run_folder(images, tmp_path):
    source = tiny_config(images, tmp_path / "source", iterations=1)
    train(source)
    wider = tiny_config(images, tmp_path / "wider", init=str(tmp_path / "source" / EXPORT_NAME), model={"embed_dim": 24})
    with pytest.raises(TrainSetupError, match=r"is a different network: embed_dim 12 there, 24 here$"):
        train(wider)
    with pytest.raises(TrainSetupError, match=r"^--init: model file not found: .*nope.safetensors"):
        train(tiny_config(images, tmp_path / "missing", init=str(tmp_path / "nope.safetensors")))
    assert not (tmp_path / "wider").exists() and not (tmp_path / "missing").exists()


def test_exported_ema_weights_load_and_denoise_with_the_right_attention_mask(images, tmp_path):
    masked = tiny_config(images, tmp_path / "masked", iterations=2, export=str(tmp_path / "out" / "m.safetensors"))
    train(masked)
    baseline = tiny_config(images, tmp_path / "baseline", iterations=2).baseline_variant()
    train(baseline)
    model = load_model(tmp_path / "masked" / EXPORT_NAME)
    assert model.config == TINY and model.config.attn_mask_ratio == (75, 75)
    assert load_model(tmp_path / "out" / "m.safetensors").config == TINY
    ema = _states(tmp_path / "masked")["ema"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, ema[name]), name
    assert load_model(tmp_path / "baseline" / EXPORT_NAME).config.attn_mask_ratio == (0, 0)
    noisy = np.array(Image.open(images["val"] / "img0.png"))
    x = torch.from_numpy(noisy).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        y = model(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    from mitdenoise.denoiser import Denoiser

    out = Denoiser(model, device="cpu", tile=64, seed=0).denoise_array(noisy)
    assert out.shape == noisy.shape and out.dtype == np.uint8


@pytest.mark.parametrize(
    "sig,group",
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-to-group", "SIGINT-to-group"],
)
@pytest.mark.slow
def test_a_signal_mid_run_writes_a_checkpoint_that_resumes(images, tmp_path, sig, group):
    """To the main process, or (as `timeout`, a job scheduler or Ctrl-C send it) to the whole
    process group, DataLoader workers included."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "mitdenoise.train", "--data", str(images["train"].parent), "--preset", "quick",
            "--out", str(run), "--patch-size", "16", "--batch-size", "4", "--iterations", "100000",
            "--checkpoint-every", "100000", "--log-every", "1", "--quiet", "--workers", "2" if group else "0"]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            log = run / "log.jsonl"
            if log.exists() and any(r.get("iteration", 0) >= 3 for r in run_log(run) if r["event"] == "train"):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert f"stopped by {sig.name}" in stderr and "--resume" in stderr
    stopped_at = _states(run)["iteration"]
    assert stopped_at >= 3
    assert run_log(run)[-1] == {"event": "stop", "iteration": stopped_at, "signal": sig.name}
    assert load_model(run / EXPORT_NAME).config == PRESETS["quick"].model
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    resumed = subprocess.run([sys.executable, "-m", "mitdenoise.train", "--out", str(run), "--resume",
                              "--iterations", str(stopped_at + 2), "--quiet"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _states(run)["iteration"] == stopped_at + 2
    assert f"{stopped_at + 2} iterations" in resumed.stdout


def test_a_run_tells_its_observer_and_without_one_logs_the_same_lines_without_printing(images, tmp_path, caplog, capfd):
    import logging

    from mitdenoise.train.report import metrics_line

    class Recorder:
        def __init__(self):
            self.events = []

        def start(self, iteration, total):
            self.events.append(("start", iteration, total))

        def message(self, text):
            self.events.append(("message", text))

        def step(self, iteration):
            self.events.append(("step", iteration))

        def metrics(self, record):
            self.events.append(("metrics", record["iteration"]))

        def close(self):
            self.events.append(("close",))

    recorder = Recorder()
    assert train(tiny_config(images, tmp_path / "a", iterations=4), observer=recorder).exit_code == 0
    assert recorder.events[0] == ("start", 0, 4) and recorder.events[-1] == ("close",)
    assert [e[1] for e in recorder.events if e[0] == "step"] == [1, 2, 3, 4]
    assert [e[1] for e in recorder.events if e[0] == "metrics"] == [2, 4]
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="mitdenoise"):
        train(tiny_config(images, tmp_path / "b", iterations=4))
    lines = [r.getMessage() for r in caplog.records if r.name == "mitdenoise.train"]
    assert [line.split("  ")[0] for line in lines] == ["it 2/4", "it 4/4"]
    assert lines[0].startswith(metrics_line({"iteration": 2}, 4)[:6]) and "loss " in lines[0]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_cli_reports_bad_settings_in_one_line_with_exit_code_2(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "mitdenoise.train", "--data", str(tmp_path), "--preset", "fast"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown preset 'fast'" in bad.stderr and "Traceback" not in bad.stderr
    empty = subprocess.run([sys.executable, "-m", "mitdenoise.train", "--data", str(tmp_path), "--preset", "quick",
                            "--out", str(tmp_path / "run")], env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and "no images" in empty.stderr and "Traceback" not in empty.stderr


# ----------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(images, run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "mitdenoise.train", "--data", str(images["train"].parent),
            "--preset", "quick", "--out", str(run), "--patch-size", "16", "--batch-size", "4", "--iterations", "4",
            "--device", "cpu", "--quiet", *extra]
    env = subprocess_env(MITDENOISE_TEST_RANK_HASH="1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_split_the_batch_and_keep_identical_weights(images, tmp_path):
    result = _torchrun(images, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    start = run_log(tmp_path / "ddp")[0]
    assert (start["world_size"], start["global_batch"], start["per_rank_batch"]) == (2, 4, 2)
    hashes = [(tmp_path / "ddp" / f"rank{r}_params.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    assert _states(tmp_path / "ddp")["iteration"] == 4

    # Without the attention mask (whose draws are per rank) two processes with half batches train
    # the same network as one process with the whole batch: the batch is split, not duplicated.
    assert _torchrun(images, tmp_path / "ddp_base", "--baseline").returncode == 0
    single = resolve_config("quick", overrides=dict(data=str(images["train"].parent), out=str(tmp_path / "one"),
                                                   patch_size=16, batch_size=4, iterations=4, device="cpu"),
                            baseline=True)
    train(single)
    a = load_model(tmp_path / "ddp_base" / EXPORT_NAME).state_dict()
    b = load_model(tmp_path / "one" / EXPORT_NAME).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


def test_cuda_without_an_index_trains_on_the_current_gpu(monkeypatch):
    """``--device cuda`` (no index) must become cuda:N before ``torch.cuda.set_device``,
    which refuses an index-less device (seen on the first GPU run)."""
    from mitdenoise.train import loop

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(device))
    assert loop.resolve_device("cuda", loop.Dist()) == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 0)]
    with pytest.raises(loop.DeviceError, match="only 1 CUDA device"):
        loop.resolve_device("cuda:3", loop.Dist())


def test_a_resumed_run_s_settings_come_from_its_folder_then_the_toml_and_flags(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(out=str(run), batch_size=6, lr=2e-4, iterations=50)
    (run / "config.json").write_text(saved.to_json())
    toml = tmp_path / "more.toml"
    toml.write_text("iterations = 80\n")
    resolved = resolve_config("quick", toml, {"out": str(run), "lr": 5e-4}, resume=True)
    assert (resolved.batch_size, resolved.iterations, resolved.lr) == (6, 80, 5e-4)  # the preset is not used
    assert resolve_config("quick", None, {"out": str(run)}).batch_size == 8  # not resuming: the preset
    fresh = tmp_path / "fresh"
    assert resolve_config("quick", None, {"out": str(fresh)}, resume=True).batch_size == 8  # nothing saved yet
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        resolve_config("quick", None, {"out": str(run)}, resume=True)
