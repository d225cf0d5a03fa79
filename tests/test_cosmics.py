"""Cosmic-ray pixels found by L.A.Cosmic and left out of the CCD PSF fit (skyfm.catalog.cosmics)."""

from dataclasses import replace

import numpy as np
import pytest

from skyfm.catalog.cosmics import cosmic_ray_mask, cosmic_ray_masks
from skyfm.data.patch import CONTAMINANT_BITS
from skyfm.data.simulate import simulate_patch
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument


def test_cosmic_ray_mask_finds_the_hits_and_spares_the_stars():
    """A simulated Hubble field exposure: most of its cosmic-ray and hot pixels are flagged, almost no other pixel,
    and no bright star's peak."""
    stars = {"x": [20.2, 60.7, 100.4, 30.5, 80.9, 110.1], "y": [25.6, 30.1, 20.8, 90.3, 100.5, 70.2],
             "mag": [21.0, 21.5, 22.0, 22.5, 23.0, 23.5]}
    p = simulate_patch("hubble", 21, size=128, scene="field", inject=stars)
    inst = load_instrument("hubble")
    found = cosmic_ray_mask(p.data, inst)
    assert found.shape == p.data.shape and found.dtype == bool
    hits = (np.asarray(p.contaminant_mask) & (CONTAMINANT_BITS["cosmic_ray"] | CONTAMINANT_BITS["hot_pixel"])) > 0
    assert hits.sum() > 100
    assert (found & hits).sum() >= 0.6 * hits.sum()
    assert (found & ~hits).sum() <= 0.005 * found.size
    x, y = np.rint(stars["x"]).astype(int), np.rint(stars["y"]).astype(int)
    assert not (found[:, y, x] & ~hits[:, y, x]).any()
    # pixels it is told to ignore are never flagged; a wrong shape is one clear error
    assert not cosmic_ray_mask(p.data, inst, mask=hits.any(axis=0))[hits].any()
    with pytest.raises(SkyfmError, match="cosmic_ray_mask"):
        cosmic_ray_mask(p.data[0], inst)


def test_one_pass_at_two_limits_flags_what_astroscrappy_flags():
    """cosmic_ray_masks computes L.A.Cosmic's images once for both limits: its masks are astroscrappy's
    detect_cosmics' (one iteration) bit for bit, with a saturated star and a mask of pixels to ignore."""
    import astroscrappy

    inst = load_instrument("hubble")
    data = np.asarray(simulate_patch("hubble", 5, size=96, scene="field").data, float)
    data[:, 40:47, 50:57] = 1.2 * inst.noise["saturation"]  # a saturated core: astroscrappy masks it, grown
    ignore = np.zeros(data.shape[1:], bool)
    ignore[10:14, 70:90] = True
    masks = cosmic_ray_masks(data, inst, ignore, (4.5, 3.0))
    for clip, found in zip((4.5, 3.0), masks):
        for c in range(data.shape[0]):
            expected, _ = astroscrappy.detect_cosmics(
                np.where(ignore, 0.0, data[c]).astype(np.float32), inmask=ignore, sigclip=clip, objlim=5.0,
                gain=inst.noise["gain"], readnoise=inst.noise["read_noise"], satlevel=inst.noise["saturation"],
                fsmode="median", niter=1)
            assert np.array_equal(found[c], expected & ~ignore)
    assert masks[0].sum() > 50 and masks[1].sum() > masks[0].sum()
    assert not masks[1][:, 38:49, 48:59].any()  # the saturated core and its rim
    assert np.array_equal(cosmic_ray_mask(data, inst, ignore), masks[0])


@pytest.mark.parametrize("instrument", ["meerlicht", "hubble"])
def test_a_sky_subtracted_image_has_the_hits_and_saturated_cores_of_the_image_as_exposed(instrument):
    """Sky-subtracted images (MAST's drizzled Hubble ones, survey coadds) hold less than their noise implies: the
    noise model takes the missing sky back, so L.A.Cosmic flags what it flags on the image as exposed (without,
    a crowded MeerLICHT field had 20x as many pixels flagged), and a clipped core, now that far below the
    saturation level, is still masked. Images as exposed, a cluster's core included, take nothing."""
    from skyfm.catalog.cosmics import missing_sky
    from skyfm.detect import saturation_mask

    inst = load_instrument(instrument)
    gain, rn = inst.noise["gain"], inst.noise["read_noise"]
    p = simulate_patch(instrument, 950_000_002, size=128, scene="crowded")
    data = np.asarray(p.data, float)
    sky = np.array([p.meta[f"sky_{b}"] for b in p.bands])[:, None, None]
    data[0, 60:65, 60:65] = inst.noise["saturation"]  # a clipped core
    subtracted = data - sky
    none = np.zeros(data.shape[1:], bool)
    for c in range(data.shape[0]):
        assert missing_sky(data[c], none, gain, rn) == 0.0
        assert 0.5 < missing_sky(subtracted[c], none, gain, rn) / sky[c, 0, 0] < 1.5
    exposed, found = cosmic_ray_mask(data, inst), cosmic_ray_mask(subtracted, inst)
    assert abs(int(found.sum()) - int(exposed.sum())) <= 0.2 * exposed.sum() + 5
    assert (found & exposed).sum() >= 0.8 * exposed.sum()
    assert saturation_mask(subtracted, inst)[0, 60:65, 60:65].all()
    assert np.array_equal(saturation_mask(subtracted, inst), saturation_mask(data, inst))
    subtracted[:, :, :40] = 0.0  # a drizzled file's edge holds zeros, not sky
    assert saturation_mask(subtracted, inst)[0, 60:65, 60:65].all()
    cluster = np.asarray(simulate_patch(instrument, 950_000_001, size=128, scene="cluster").data, float)
    assert all(missing_sky(band, none, gain, rn) == 0.0 for band in cluster)


def test_a_hit_beside_a_star_no_longer_pulls_its_fitted_position():
    """A bright Hubble star with a cosmic-ray hit 1.5 px from its centre in one band: fitted with the hit's pixels
    left out (mask_cosmic_rays) it lands where it does without the hit; fitted through the hit it is pulled."""
    from skyfm.detect import detect_patch

    star = {"x": [31.3], "y": [32.6], "mag": [23.5]}  # snr 90
    clean = simulate_patch("hubble", 5, size=64, scene="empty", contaminants=False, inject=star)
    hit = clean.data.copy()
    hit[1, 34, 32:34] += 1000.0  # ADU: a 2000 e- track of two pixels, 1.5 px from the star, as the simulator's
    struck = replace(clean, data=hit)

    def star_error(patch, mask):
        cat = detect_patch(patch, mask_cosmic_rays=mask)
        x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
        d = np.hypot(x - 31.3, y - 32.6)
        assert d.min() < 1.0
        return float(d.min())

    ref = star_error(clean, False)
    pulled = star_error(struck, False)
    masked = star_error(struck, True)
    assert pulled > 0.3 and ref < 0.05
    assert abs(masked - ref) < 0.01
    assert star_error(struck, None) == masked  # the shipped Hubble head masks them by default


def test_detect_cli_masks_cosmic_rays_on_request(tmp_path, capsys):
    """``skyfm detect --mask-cosmic-rays`` / ``--keep-cosmic-rays`` reach the PSF fit (the shipped detector)."""
    from skyfm.catalog import read_catalog
    from skyfm.cli import main
    from skyfm.data.fits_io import write_patch

    clean = simulate_patch("hubble", 5, size=64, scene="empty", contaminants=False,
                           inject={"x": [31.3], "y": [32.6], "mag": [23.5]})
    data = clean.data.copy()
    data[1, 34, 32:34] += 1000.0
    src = tmp_path / "hst.fits"
    write_patch(replace(clean, data=data), src)
    error = {}
    for flag in ("--mask-cosmic-rays", "--keep-cosmic-rays"):
        out = tmp_path / f"cat{flag}.ecsv"
        assert main(["detect", str(src), "--out", str(out), flag]) == 0, capsys.readouterr().err
        cat = read_catalog(out)
        error[flag] = float(np.min(np.hypot(np.asarray(cat["x"], float) - 31.3, np.asarray(cat["y"], float) - 32.6)))
    assert error["--mask-cosmic-rays"] < 0.05
    assert error["--keep-cosmic-rays"] > 0.3


def _hits_on(patch) -> np.ndarray:
    """(H, W) bool: the simulated image's cosmic-ray pixels (any band)."""
    return ((np.asarray(patch.contaminant_mask) & CONTAMINANT_BITS["cosmic_ray"]) > 0).any(axis=0)


def test_light_share_tells_a_hit_from_a_star():
    """The share of the light within a FWHM that lies on cosmic-ray pixels (the deeper test pass) and the
    signal-to-noise ratio of the rest: at bright and faint stars little of it (0.4 where a hit lands beside one) and
    a high ratio, at the image's bright hits most of it and a low one; NaN where there is no light."""
    from scipy import ndimage

    from skyfm.catalog.cosmics import light_on_cosmic_rays
    from skyfm.detect import _cosmic_rays

    stars = {"x": [20.2, 60.7, 100.4, 30.5, 80.9], "y": [25.6, 30.1, 20.8, 90.3, 100.5],
             "mag": [21.0, 22.0, 23.0, 24.5, 25.5]}
    p = simulate_patch("hubble", 21, size=128, scene="empty", bands=["F606W"], inject=stars)
    inst = load_instrument("hubble")
    test = _cosmic_rays(p.data, inst, None)[1]
    image = p.data - np.median(p.data, axis=(1, 2), keepdims=True)
    rms = np.full_like(image, 1.4826 * np.median(np.abs(image[0] - np.median(image[0]))))
    at_stars, snr = light_on_cosmic_rays(image, rms, test, stars["x"], stars["y"], 2.0)
    assert np.all(at_stars < 0.5) and np.sum(at_stars < 0.05) >= 4, at_stars
    assert np.all(snr > 10), snr
    labels, n = ndimage.label(_hits_on(p), np.ones((3, 3)))
    peaks = np.array(ndimage.maximum(image[0], labels, np.arange(1, n + 1)))
    bright = np.nonzero(peaks > 20 * rms[0, 0, 0])[0] + 1
    assert len(bright) >= 10
    yx = np.array(ndimage.maximum_position(image[0], labels, bright))
    at_hits, snr = light_on_cosmic_rays(image, rms, test, yx[:, 1], yx[:, 0], 2.0)
    assert np.mean((at_hits > 0.5) & (snr < 5)) >= 0.9, (at_hits, snr)
    assert np.isnan(light_on_cosmic_rays(np.zeros_like(image), rms, test, [64.0], [64.0], 2.0)[0][0])


def _rows_on_hits(cat, patch, scale: int = 1) -> tuple[int, int]:
    """(rows within 3 native px of a true source, rows on a cosmic ray (grown by 2 px) that match none)."""
    from scipy import ndimage

    hits = ndimage.binary_dilation(_hits_on(patch), iterations=2)
    x = (np.asarray(cat["x"], float) + 0.5) * scale - 0.5
    y = (np.asarray(cat["y"], float) + 0.5) * scale - 0.5
    tx, ty = np.asarray(patch.truth["x"], float), np.asarray(patch.truth["y"], float)
    matched = np.hypot(x[:, None] - tx[None], y[:, None] - ty[None]).min(axis=1) < 3.0
    on = hits[np.clip(np.rint(y).astype(int), 0, hits.shape[0] - 1), np.clip(np.rint(x).astype(int), 0,
                                                                            hits.shape[1] - 1)]
    return int(matched.sum()), int((on & ~matched).sum())


def test_detections_on_cosmic_rays_are_dropped(monkeypatch):
    """A single-band Hubble field exposure: without the light-share test the network's peaks and the residual
    search's finds on hits are a fifth of the catalog; with it (the default) a third of them go, and the true
    sources stay."""
    import skyfm.detect as detect

    counts = np.zeros(4, int)  # matched, on hits; the same without the test
    for seed in (1_234_567, 1_234_569):
        p = simulate_patch("hubble", seed, size=512, scene="field", bands=["F606W"])
        with monkeypatch.context() as m:
            counts[:2] += _rows_on_hits(detect.detect_patch(p), p)
            m.setattr(detect, "COSMIC_RAY_LIGHT_MAX", np.inf)
            counts[2:] += _rows_on_hits(detect.detect_patch(p), p)
    matched, on_hits, matched_off, on_hits_off = counts
    assert on_hits_off >= 8 and on_hits <= 0.75 * on_hits_off, counts
    assert matched >= matched_off - 2, counts


def test_an_image_of_finer_pixels_has_its_hits_cleaned_before_its_tiles_are_resampled():
    """A single Hubble exposure at 0.6x the head's pixels (a camera of finer pixels; tiles are resampled onto the
    network's): averaged onto coarser pixels a hit looks like a star, so the hits are found and cleaned on the
    image's own pixels first (before this, 26 of these images' 45 rows stood on hits)."""
    from skyfm.detect import detect_patch

    inst = load_instrument("hubble")
    fine = replace(inst, pixel_scale=inst.pixel_scale * 0.6)
    rows = matched = on_hits = 0
    for seed in (1_234_568, 1_234_570):
        p = replace(simulate_patch(fine, seed, size=800, scene="field", bands=["F606W"]), instrument="hubble")
        cat = detect_patch(p)
        m, h = _rows_on_hits(cat, p)
        rows, matched, on_hits = rows + len(cat), matched + m, on_hits + h
    assert matched >= 14 and on_hits <= 0.3 * rows, (rows, matched, on_hits)


def test_clean_cosmic_rays_fills_the_hits_from_their_surroundings():
    from skyfm.catalog.cosmics import clean_cosmic_rays

    p = simulate_patch("hubble", 21, size=96, scene="empty", bands=["F606W"])
    hits = cosmic_ray_mask(p.data, load_instrument("hubble"))
    cleaned = clean_cosmic_rays(p.data, hits)
    assert hits.sum() > 20 and cleaned.dtype == np.float32
    assert np.array_equal(cleaned[~hits], p.data[~hits].astype(np.float32))  # the other pixels untouched
    sky, noise = np.median(p.data), 1.4826 * np.median(np.abs(p.data - np.median(p.data)))
    assert np.median(np.abs(cleaned[hits] - sky)) < 2 * noise < np.median(np.abs(p.data[hits] - sky))


@pytest.mark.parametrize("factors", [{"gain": 0.5}, {"gain": 2.0}])
def test_a_camera_of_another_gain_has_the_hits_of_the_yaml_s(factors):
    """A camera read out at another gain than the YAML's (an independent simulator's): the same electrons in other
    ADU. L.A.Cosmic's noise model follows the sky's measured noise, so the hits flagged are those of the camera the
    YAML describes (without: 366 pixels against 263 at half the gain, most of the extra ones noise and stars)."""
    inst = load_instrument("hubble")
    noise = {k: float(v) * factors.get(k, 1.0) if k in factors else v for k, v in inst.noise.items()}
    data = {}
    for name, camera in (("yaml", inst), ("other", replace(inst, noise=noise))):
        p = simulate_patch(camera, 950_000_002, size=128, scene="crowded", bands=["F606W"])
        data[name] = np.asarray(p.data, float)
    yaml, other = cosmic_ray_mask(data["yaml"], inst), cosmic_ray_mask(data["other"], inst)
    assert abs(int(other.sum()) - int(yaml.sum())) <= 0.1 * yaml.sum()
    assert (other & yaml).sum() >= 0.85 * yaml.sum()
