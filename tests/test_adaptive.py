"""mitdenoise-auto, the shipped fallback: the plan it makes from a noise estimate, what it does to
images (flat greys keep their mean, strength scales it), and what it scores on the sets that
judge it (CC15, McMaster at Gaussian sigma 5)."""

import numpy as np
import pytest

from mitdenoise import Denoiser, adaptive
from mitdenoise.adaptive import Plan, plan_for
from mitdenoise.bench.quality import load_quality_data, noisy_version
from mitdenoise.imageio import center_crop, read_rgb8
from mitdenoise.metrics import psnr
from mitdenoise.noise import NoiseEstimate, correlated, gaussian, gaussian_jpeg, salt_and_pepper


def _smooth_image(size=192):
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.stack([0.3 + 0.4 * xx, 0.5 + 0.2 * np.sin(3 * yy), 0.6 - 0.3 * xx * yy], axis=-1)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


# --- the plan -------------------------------------------------------------------------------------


def _estimate(sigma, white, correlation):
    return NoiseEstimate(sigma / 255, white / 255, correlation)


def test_camera_noise_goes_to_the_camera_network_and_the_guided_second_stage():
    assert plan_for(_estimate(4, 0.5, 0.65)) == Plan("camera", 1.0, "input", pytest.approx(6.4 / 255), _estimate(4, 0.5, 0.65))
    # h follows the level read, within its range
    assert plan_for(_estimate(1, 0.5, 0.65)).h == pytest.approx(3 / 255)
    assert plan_for(_estimate(20, 1, 0.9)).h == pytest.approx(8 / 255)


def test_on_camera_noise_h_is_held_to_twice_what_the_camera_network_removes_where_flat():
    """A textured photo reads a level its texture inflates; the probe reads the noise on flat blocks."""
    textured = _estimate(10, 1, 0.7)
    assert plan_for(textured).h == pytest.approx(8 / 255)
    assert plan_for(textured, adaptive.Probe(3 / 255, 0.2)) == Plan("camera", 1.0, "input", pytest.approx(6 / 255), textured, adaptive.Probe(3 / 255, 0.2))
    assert plan_for(textured, adaptive.Probe(1 / 255, 0.2)).h == pytest.approx(3 / 255)  # the range's floor holds
    # Where the probe reads as much as the level, the level decides, as without it.
    assert plan_for(_estimate(4, 0.5, 0.65), adaptive.Probe(20 / 255, 1.0))[:4] == ("camera", 1.0, "input", pytest.approx(6.4 / 255))
    assert plan_for(textured, adaptive.Probe(3 / 255, 0.2)).describe().startswith("camera noise, sigma 10.0")


def _counting(calls: list, role: str, network):
    return lambda x: calls.append(role) or network(x)


@pytest.mark.parametrize("level, probes", [(1, False), (3, True)])
def test_the_camera_path_asks_the_probe_only_where_the_hold_could_lower_h(level, probes):
    """At a level whose h is the range's floor already, the probe could change nothing: not run.
    The light path's risks are not read either."""
    noisy = (_u8(correlated(_smooth_image(128), level, 2)) / 255).astype(np.float32)
    calls = []
    plan = adaptive.plan_image(noisy, {role: _counting(calls, role, np.copy) for role in ("white", "camera")})
    assert plan.network == "camera" and plan.second_stage == "input" and adaptive.is_camera_noise(plan.estimate)
    assert (plan.probe is not None) == probes and calls == ["camera"] * int(probes) and plan.risks is None
    assert (plan.estimate.sigma * adaptive.CAMERA_H_PER_SIGMA > adaptive.CAMERA_H_RANGE[0]) == probes


def test_heavy_white_noise_goes_to_the_camera_network_and_smooths_its_output():
    assert plan_for(_estimate(25, 24, 0.0))[:4] == ("camera", 1.0, "output", pytest.approx(5 / 255))
    assert plan_for(_estimate(19, 18, 0.7))[:4] == ("camera", 1.0, "output", pytest.approx(5 / 255))


def test_light_white_noise_takes_the_light_path_and_without_risks_to_read_mild_whole():
    for estimate in (_estimate(7, 5, 0.1), _estimate(0, 0, 0.0), _estimate(17.9, 17.9, 0.0)):
        assert plan_for(estimate)[:4] == ("white", 1.0, "none", 0.0)
    # Correlated but with a white part (textured images under white noise read so): still white.
    assert plan_for(_estimate(12, 5, 0.6))[:3] == ("white", 1.0, "none")
    assert plan_for(_estimate(18, 18, 0.0)).second_stage == "output"  # from 18 levels: heavy


def test_light_path_noise_the_camera_network_removes_far_more_of_is_heavy_and_not_white():
    light = _estimate(12, 2, 0.3)
    uneven, even = adaptive.Probe(8 / 255, 0.0), adaptive.Probe(6 / 255, 0.8)
    assert plan_for(light)[:3] == ("white", 1.0, "none")  # the white part alone: light
    # Four times the white part is enough however unevenly the change spreads; h is the level read.
    assert plan_for(light, uneven) == Plan("camera", 1.0, "input", pytest.approx(8 / 255), light, uneven)
    assert "not white" in plan_for(light, uneven).describe()
    # Three times is enough where the change spreads evenly (noise), not where it sits on texture.
    assert plan_for(light, even)[:4] == ("camera", 1.0, "input", pytest.approx(6 / 255))
    assert plan_for(light, adaptive.Probe(6 / 255, 0.1)).network == "white"
    # In between the bar slides: at evenness 0.4 it is 3.25 times the white part.
    assert plan_for(light, adaptive.Probe(6.4 / 255, 0.4)).network == "white"
    assert plan_for(light, adaptive.Probe(6.6 / 255, 0.4)).network == "camera"
    # From a level of 10 the bar comes down to 2 at 20, however unevenly the change spreads.
    heavy = _estimate(40, 8, 0.6)
    assert plan_for(heavy, adaptive.Probe(17 / 255, 0.0)).network == "white"  # bar 2.6: needs 20.8
    assert plan_for(heavy, adaptive.Probe(19 / 255, 0.0))[:4] == ("camera", 1.0, "input", pytest.approx(19 / 255))
    assert plan_for(_estimate(15, 14, 0.1), adaptive.Probe(27 / 255, 1.0)).network == "white"  # just under 2x
    # Little in all, however evenly spread or far above the white part: the light path stays.
    assert plan_for(_estimate(3, 0.5, 0.3), adaptive.Probe(3.9 / 255, 1.0)).network == "white"
    assert plan_for(light, adaptive.Probe(7.9 / 255, 0.0)).probe == adaptive.Probe(7.9 / 255, 0.0)
    # The heavy-white path never asks.
    assert plan_for(_estimate(25, 24, 0.0), adaptive.Probe(20 / 255, 1.0)).probe is None


def test_on_the_light_path_the_network_and_strength_whose_risk_is_least_run():
    light = _estimate(8, 8, 0.0)
    risks = {"white": adaptive.Risk(0.7, 4e-4), "camera": adaptive.Risk(0.87, 3e-4)}
    plan = plan_for(light, adaptive.Probe(2 / 255, 0.5), risks)
    assert plan == Plan("camera", 0.87, "none", 0.0, light, adaptive.Probe(2 / 255, 0.5), risks)
    assert plan.describe() == "white noise, sigma 8.0: mitdenoise-camera at strength 0.87"
    assert plan_for(light, None, {**risks, "white": adaptive.Risk(1.0, 2e-4)})[:3] == ("white", 1.0, "none")
    # The other paths do not ask: a camera's noise, heavy white noise, heavy noise that is not white.
    assert plan_for(_estimate(4, 0.5, 0.65), None, risks).second_stage == "input"
    assert plan_for(_estimate(25, 24, 0.0), None, risks)[:3] == ("camera", 1.0, "output")
    assert plan_for(_estimate(12, 2, 0.3), adaptive.Probe(8 / 255, 0.0), risks)[:3] == ("camera", 1.0, "input")


def test_stein_risk_finds_the_strength_that_errs_least_without_the_clean_image():
    """A 5x5 box blur stands in for a network on white noise of sigma 10: Stein's estimate, read from
    the noisy image and one nudged run, names the strength whose true error (against the clean
    image it never saw) is least, and that error, within a few percent. With nothing to remove
    (no noise), or no change made, the strength is 0."""
    clean = _smooth_image(256).astype(np.float32)
    clean[:, 128:] += (0.1 * np.sin(np.arange(128) * 0.7)).astype(np.float32)[None, :, None]  # texture a blur harms
    rng = np.random.default_rng(1)
    noisy = (clean + rng.normal(0, 10 / 255, clean.shape)).astype(np.float32)
    nudge = (adaptive.RISK_STEP * rng.standard_normal(clean.shape)).astype(np.float32)
    blur = lambda x: _box_blur(x, 5)
    terms = adaptive.stein_terms(noisy, blur(noisy), blur(noisy + nudge), nudge, np.full(3, (10 / 255) ** 2))
    assert terms[1] == pytest.approx((10 / 255) ** 2)
    assert terms[2] / terms[1] == pytest.approx(1 / 25, abs=0.01)  # a 5x5 mean passes on a 25th of the noise
    risk = adaptive.least_risk(terms)
    strengths = np.linspace(0, 1, 101)
    errors = [np.mean((noisy + s * (blur(noisy) - noisy) - clean) ** 2) for s in strengths]
    assert 0.2 < risk.strength < 0.95
    assert risk.strength == pytest.approx(strengths[int(np.argmin(errors))], abs=0.05)
    assert risk.error == pytest.approx(min(errors), rel=0.05)
    assert adaptive.least_risk(adaptive.stein_terms(clean, blur(clean), blur(clean + nudge), nudge, np.zeros(3))).strength == 0
    assert adaptive.least_risk(adaptive.stein_terms(noisy, noisy, noisy + nudge, nudge, np.full(3, 1e-3))) == (0.0, pytest.approx(1e-3))


def test_the_light_path_asks_both_networks_on_tiles_spread_over_the_image():
    tiles = adaptive.risk_tiles(np.zeros((600, 900, 3), np.float32))  # a grid of 2 x 3 tiles of 256
    assert [(r.start, c.start) for r, c in tiles] == [(0, 0), (0, 512), (256, 0), (256, 512)]
    assert all(r.stop - r.start == 256 and c.stop - c.start == 256 for r, c in tiles)
    assert adaptive.risk_tiles(np.zeros((100, 300, 3), np.float32)) == [(slice(0, 100), slice(0, 256))]
    noisy = (_u8(gaussian(_smooth_image(128), 5, 7)) / 255).astype(np.float32)
    calls = []
    networks = {"white": _counting(calls, "white", lambda x: _box_blur(x, 3)), "camera": _counting(calls, "camera", _box_blur)}
    plan = adaptive.plan_image(noisy, networks)
    # The probe asks the camera network once; each network then runs on the tile and on it nudged.
    assert sorted(calls) == ["camera"] * 3 + ["white"] * 2
    assert plan.second_stage == "none" and set(plan.risks) == {"white", "camera"}
    chosen = min(plan.risks, key=lambda r: plan.risks[r].error)
    assert plan.network == chosen and plan.strength == plan.risks[chosen].strength
    # The one chosen is the one whose best share truly errs least against the clean image.
    clean = _smooth_image(128)
    strengths = np.linspace(0, 1, 51)
    truly = {role: min(np.mean((noisy + s * (f(noisy) - noisy) - clean) ** 2) for s in strengths)
             for role, f in (("white", lambda x: _box_blur(x, 3)), ("camera", _box_blur))}
    assert plan.network == min(truly, key=truly.get)
    assert plan.risks == adaptive.light_risks(noisy, networks)  # the same nudge each time: the same choice


def _box_blur(x: np.ndarray, k: int = 9) -> np.ndarray:
    pad = np.pad(x, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="reflect")
    rows = sum(pad[i : i + x.shape[0]] for i in range(k)) / k
    return (sum(rows[:, i : i + x.shape[1]] for i in range(k)) / k).astype(np.float32)


def test_the_probe_reads_the_noise_on_flat_regions_and_a_clean_picture_as_almost_nothing():
    """A 9x9 box blur stands in for the camera network: on flat grey under white noise of sigma 8 it
    removes about the noise itself, on a clean picture almost nothing; the tiles it reads are the
    flattest of the grid (a 600 x 900 picture: left half flat, right half fine stripes)."""
    rng = np.random.default_rng(0)
    flat = np.full((200, 200, 3), 0.5, np.float32)
    noisy = np.clip(flat + rng.normal(0, 8 / 255, flat.shape), 0, 1).astype(np.float32)
    on_noise = adaptive.probe(noisy, _box_blur)
    assert on_noise.level * 255 == pytest.approx(8 * np.sqrt(1 - 1 / 81), rel=0.1)
    assert on_noise.evenness == pytest.approx(1, abs=0.2)  # noise is changed alike everywhere
    assert adaptive.probe(_smooth_image(200).astype(np.float32), _box_blur).level * 255 < 0.5
    picture = np.full((600, 900, 3), 0.5, np.float32)
    picture[:, 450:] += (0.2 * np.sin(np.arange(450) * 2.5)).astype(np.float32)[None, :, None]
    # Stripes the blur takes for noise: the change sits on them, none on the flat half.
    assert adaptive.probe(picture[:256, 322:578], _box_blur).evenness < 0.01
    assert adaptive.probe(picture[:256, 322:578], lambda x: x.copy()) == (0.0, 0.0)
    # Too few blocks to tell flat from textured (one 16x16 block): no evidence of evenness.
    assert adaptive.probe(noisy[:24, :24], _box_blur).evenness == 0.0
    assert adaptive.probe(noisy[:48, :48], _box_blur).evenness == 0.0  # 9 blocks
    assert adaptive.probe(noisy[:64, :80], _box_blur).evenness > 0.5  # 20 blocks
    tiles = adaptive.probe_tiles(picture)
    assert len(tiles) == 4 and all(cols.start < 450 for _, cols in tiles)  # none wholly in the stripes
    assert all(r.stop - r.start == 256 and c.stop - c.start == 256 for r, c in tiles)
    assert adaptive.probe_tiles(flat) == [(slice(0, 200), slice(0, 200))]


def _ramp_and_stripes(size=256):
    """A horizontal ramp from dark to bright, fine vertical stripes on its lower half."""
    picture = np.repeat(np.linspace(0.1, 0.9, size, dtype=np.float32)[None, :, None], size, 0).repeat(3, 2)
    picture[size // 2 :] += (0.08 * np.sin(np.arange(size) * 2.2)).astype(np.float32)[None, :, None]
    return picture


def test_the_noise_line_is_read_from_flat_blocks_at_every_brightness():
    """Noise of variance (2/255)^2 + (6/255)^2 x on a ramp, removed exactly: the line fitted is the
    noise's own, texture (stripes the output kept) does not inflate it, and no change reads zero."""
    clean = _ramp_and_stripes()
    a, b = (2 / 255) ** 2, (6 / 255) ** 2
    rng = np.random.default_rng(3)
    noisy = (clean + rng.normal(size=clean.shape) * np.sqrt(a + b * clean.mean(2, keepdims=True))).astype(np.float32)
    intercept, slope, kurtosis = adaptive.noise_line(noisy, clean)
    assert intercept == pytest.approx(a, rel=0.3) and slope == pytest.approx(b, rel=0.2)
    assert kurtosis == pytest.approx(3, rel=0.1)  # Gaussian
    assert adaptive.noise_line(clean, clean.copy())[:2] == (0.0, 0.0)


def test_the_change_is_kept_where_it_is_noise_and_given_back_where_it_is_detail():
    """A stand-in network removes white noise of sigma 5 and the stripes with it (a 9x9 box blur):
    on the flat upper half the change stays, on the stripes most of it is given back (the result
    beats the input there and the blur by far), and the whole beats both. On a clean picture it comes back close to itself."""
    clean = _ramp_and_stripes()
    noisy = (clean + np.random.default_rng(4).normal(0, 5 / 255, clean.shape)).astype(np.float32)
    blurred = _box_blur(noisy)
    out = adaptive.limit_change_to_noise(noisy, blurred.copy())
    flat, stripes = slice(16, 112), slice(144, 240)
    assert np.abs(out[flat, 16:-16] - blurred[flat, 16:-16]).max() < 1e-6
    on_stripes = [psnr(_u8(x[stripes]), _u8(clean[stripes])) for x in (out, noisy, blurred)]
    assert on_stripes[0] > on_stripes[1] + 0.2 and on_stripes[0] > on_stripes[2] + 8
    assert psnr(_u8(out), _u8(clean)) > max(psnr(_u8(noisy), _u8(clean)), psnr(_u8(blurred), _u8(clean))) + 2
    untouched = adaptive.limit_change_to_noise(clean, _box_blur(clean))
    assert psnr(_u8(untouched), _u8(clean)) > 45 > psnr(_u8(_box_blur(clean)), _u8(clean)) + 15


def test_sparse_impulses_removed_are_kept_removed():
    """Salt and pepper on 0.2 % of values, 70 % of each impulse removed (as a network at part
    strength does): the spikes must not hide the flat blocks, nor the impulses' uneven spread
    read as detail; the result stays within 1 dB of the output (the noisy input is 10 dB under)."""
    clean = _ramp_and_stripes()
    noisy = salt_and_pepper(clean, 0.002, 5).astype(np.float32)
    output = (clean + 0.3 * (noisy - clean)).astype(np.float32)
    line = adaptive.noise_line(noisy, output)
    assert line.kurtosis > 50 and line.intercept + line.slope > 0
    out = adaptive.limit_change_to_noise(noisy, output.copy())
    assert psnr(_u8(out), _u8(clean)) > psnr(_u8(output), _u8(clean)) - 1 > psnr(_u8(noisy), _u8(clean)) + 9


def test_an_image_too_small_to_read_gets_mild_at_full_strength():
    assert adaptive.plan_image(np.zeros((12, 40, 3), np.float32)) == Plan("white", 1.0, "none", 0.0, None)
    noisy = np.random.default_rng(6).random((6, 40, 3), dtype=np.float32)
    smoothed = np.full_like(noisy, 0.5)
    assert adaptive.noise_line(noisy, smoothed) is None
    assert np.array_equal(adaptive.limit_change_to_noise(noisy, smoothed.copy()), smoothed)  # no block to read: kept whole


# --- the shipped default --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto():
    return Denoiser("mitdenoise-auto", device="cpu")


def test_the_default_offline_is_mitdenoise_auto_and_says_what_it_read(auto):
    default = Denoiser(offline=True, device="cpu")
    assert default.model_name == "mitdenoise-auto" and "mitdenoise-auto (shipped)" in default.notice
    noisy = _u8(correlated(_smooth_image(128), 5, 0))
    assert np.array_equal(default(noisy), auto(noisy))
    assert auto.last_plan.network == "camera" and auto.last_plan.second_stage == "input"


@pytest.mark.parametrize("grey", [20, 64, 128, 200, 240])
def test_a_flat_grey_image_keeps_its_mean_through_the_default(auto, grey):
    flat = np.full((256, 256, 3), grey / 255)
    assert np.array_equal(auto(_u8(flat)), _u8(flat))  # clean: nothing to do
    camera = _u8(correlated(flat, 5, grey))
    out = auto(camera)
    assert auto.last_plan.network == "camera" and auto.last_plan.second_stage == "input"
    assert np.abs(out.reshape(-1, 3).mean(0) - grey).max() < 0.25
    assert out.std() < 0.5 * camera.std()
    white = _u8(gaussian(flat, 5, grey))
    out = auto(white)
    assert auto.last_plan.second_stage == "none"  # the light path
    # mitdenoise-mild's own shift near white (+4 to +5 levels at 240 at full strength), at the strength chosen
    assert np.abs(out.reshape(-1, 3).mean(0) - grey).max() < (2.5 if grey == 240 else 1.2)


def test_strength_scales_the_routes_change_from_the_identity_up(auto):
    noisy = _u8(correlated(_smooth_image(128), 6, 1))
    full = auto(noisy).astype(np.float64)
    assert np.array_equal(Denoiser("mitdenoise-auto", strength=0)(noisy), noisy)
    changes = [np.abs(Denoiser("mitdenoise-auto", strength=s)(noisy) - noisy.astype(np.float64)).mean() for s in (0.25, 0.5, 0.75)]
    assert changes == sorted(changes) and changes[-1] < np.abs(full - noisy).mean()


def test_heavy_noise_that_jpeg_smoothed_is_found_by_the_probe_and_a_clean_picture_is_not(auto):
    """Gaussian noise of sigma 25 then JPEG reads a white part of about 1 and little correlation:
    the estimate alone sends it down the light path; the probe does not."""
    clean = _smooth_image(256)
    noisy = _u8(gaussian_jpeg(clean, 25, 5))
    out = auto(noisy)
    plan = auto.last_plan
    assert plan_for(plan.estimate).network == "white"
    assert plan[:3] == ("camera", 1.0, "input") and plan.probe.level > 2 * adaptive.NON_WHITE_LEVEL
    assert "not white" in plan.describe()
    assert psnr(out, _u8(clean)) > psnr(noisy, _u8(clean)) + 6
    assert np.array_equal(auto(_u8(clean)), _u8(clean))
    assert auto.last_plan.second_stage == "none" and auto.last_plan.probe.level < adaptive.NON_WHITE_LEVEL


@pytest.mark.parametrize("level, white", [(15, 3), (25, 5)])
def test_heavy_correlated_noise_over_light_white_noise_takes_the_probe_path(auto, level, white):
    """Correlated noise over a little white noise reads a white part over a fourth of what the
    camera network removes: under the bar of 4, so it is the evenness of that change (noise is
    everywhere) that sends it to the camera network, and the result is no worse than the better
    network alone."""
    clean = _u8(_smooth_image(256))
    noisy = _u8(gaussian(correlated(_smooth_image(256), level, 3), white, 4))
    out = auto(noisy)
    plan = auto.last_plan
    assert plan[:3] == ("camera", 1.0, "input") and not adaptive.is_camera_noise(plan.estimate)  # the probe path
    assert plan.probe.evenness > adaptive.NON_WHITE_EVENNESS[1]
    assert plan.probe.level < adaptive.NON_WHITE_BAR_BY_EVENNESS[0] * plan.estimate.white_sigma
    networks = [Denoiser(name, device="cpu")(noisy) for name in ("mitdenoise-camera", "mitdenoise-mild")]
    assert psnr(out, clean) > max(psnr(x, clean) for x in networks) - 0.3


def test_very_heavy_correlated_noise_takes_the_probe_path_under_the_evenness_bar(data_dir, auto):
    """Correlated noise of 50 swells the white part too: the probe level reads under 2.5 times it,
    below any bar the evenness sets, so it is the bar's slide with the level that takes it to the
    camera network, which the route then beats by more than 1 dB."""
    photo = center_crop(read_rgb8(data_dir / "test" / "kodak24" / "kodim11.png"), 256)
    noisy, clean = noisy_version(photo, "correlated", 50, 0, 10)
    out = auto(noisy)
    plan = auto.last_plan
    assert plan[:3] == ("camera", 1.0, "input") and not adaptive.is_camera_noise(plan.estimate)  # the probe path
    assert plan.probe.level < adaptive.NON_WHITE_BAR_BY_EVENNESS[1] * plan.estimate.white_sigma
    assert psnr(out, clean) > psnr(Denoiser("mitdenoise-camera", device="cpu")(noisy), clean) + 1


@pytest.mark.parametrize("name", ["2.png", "17.png"])
def test_a_clean_photos_fine_texture_is_not_taken_for_noise(data_dir, auto, name):
    """McMaster's fine, demosaicked texture reads 2.5 to 4 times its white part to the probe, as
    heavy correlated noise does, but the camera network's change sits on the texture (evenness
    under 0.3): the light path, and the photo comes back at 40 dB or more against itself."""
    clean = center_crop(read_rgb8(data_dir / "test" / "mcmaster" / name), 256)
    out = auto(clean)
    plan = auto.last_plan
    assert plan.second_stage == "none" and plan.probe.level > adaptive.NON_WHITE_BAR_BY_EVENNESS[1] * plan.estimate.white_sigma
    assert plan.probe.evenness < adaptive.NON_WHITE_EVENNESS[0]
    assert psnr(out, clean) >= 40


def test_a_clean_photos_texture_read_as_camera_noise_keeps_its_detail(data_dir, auto):
    """CBSD68 105025.png's foliage reads as camera noise at a level its texture inflates, far
    above what the camera network removes on its flat blocks: h follows the probe, not the level,
    and the photo comes back at 40 dB or more against itself."""
    clean = center_crop(read_rgb8(data_dir / "test" / "cbsd68" / "105025.png"), 256)
    out = auto(clean)
    plan = auto.last_plan
    assert plan.network == "camera" and plan.second_stage == "input" and plan.estimate.sigma * 255 > 5
    assert plan.h == pytest.approx(max(adaptive.CAMERA_H_RANGE[0], adaptive.CAMERA_H_PER_PROBE * plan.probe.level))
    assert psnr(out, clean) >= 40


@pytest.mark.parametrize("shape", [(5, 30, 3), (17, 7, 3), (1, 1, 3)])
def test_images_smaller_than_a_block_go_through_the_route(auto, shape):
    """Under 8 pixels on a side there is no block to read the noise on: mild, whole, no error."""
    noisy = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    out = auto(noisy)
    assert out.shape == shape and out.dtype == np.uint8 and auto.last_plan.estimate is None
    assert np.array_equal(out, Denoiser("mitdenoise-mild", device="cpu")(noisy))


def test_grayscale_and_16_bit_images_go_through_the_route(auto):
    clean = _smooth_image(96)[..., :1]
    grey16 = (correlated(clean, 5, 2) * 65535).round().astype(np.uint16)
    out = auto(grey16[..., 0])
    assert out.shape == grey16.shape[:2] and out.dtype == np.uint16
    assert auto.last_plan.network == "camera" and auto.last_plan.second_stage == "input"
    clean16 = clean[..., 0] * 65535
    assert np.abs(out - clean16).mean() < 0.6 * np.abs(grey16[..., 0] - clean16).mean()
    grey8 = _u8(gaussian(clean, 8, 3))[..., 0]  # white noise: the light path, risks read on one channel
    out = auto(grey8)
    assert auto.last_plan.second_stage == "none" and set(auto.last_plan.risks) == {"white", "camera"}
    assert np.abs(out - _u8(clean)[..., 0].astype(float)).mean() < 0.7 * np.abs(grey8 - _u8(clean)[..., 0].astype(float)).mean()


@pytest.mark.slow
def test_the_default_beats_mcwnnm_on_cc15_and_improves_every_image(data_dir, auto):
    """CC15 is our development set for real noise: the second stage's h was chosen on it."""
    cc15 = data_dir / "test" / "cc15"
    cleans, noisies = load_quality_data(cc15 / "clean", cc15 / "noisy", None, None, None)
    gains, scores = [], []
    for (_, clean), noisy in zip(cleans, noisies):
        out = auto(noisy)
        scores.append(psnr(out, clean))
        gains.append(scores[-1] - psnr(noisy, clean))
    assert len(scores) == 15 and np.mean(scores) >= 36.9 and min(gains) > 1.0


@pytest.mark.slow
def test_the_default_keeps_light_white_noise_images_better_than_their_input(data_dir, auto):
    cleans, _ = load_quality_data(data_dir / "test" / "mcmaster", None, None, None, 256)
    noisy = [noisy_version(c, "gaussian", 5, 0, i)[0] for i, (_, c) in enumerate(cleans)]
    ours = np.mean([psnr(auto(n), c) for n, (_, c) in zip(noisy, cleans)])
    assert len(cleans) == 18 and ours >= np.mean([psnr(n, c) for n, (_, c) in zip(noisy, cleans)]) + 1.0


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_route_leaves_the_callers_float_image_untouched(strength):
    """The route blends and clips in place to save whole-image copies: never in the caller's array."""
    light = gaussian(_smooth_image(96), 5, 3).astype(np.float32)
    camera = correlated(_smooth_image(96), 5, 4).astype(np.float32)
    for noisy in (light, camera):
        kept = noisy.copy()
        out = Denoiser("mitdenoise-auto", strength=strength)(noisy)
        assert np.array_equal(noisy, kept) and out.dtype == np.float32 and not np.shares_memory(out, noisy)
        assert 0 <= out.min() and out.max() <= 1
