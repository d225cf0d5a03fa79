"""Cosmic-ray pixels found by L.A.Cosmic and left out of the CCD PSF fit (skyfm.catalog.cosmics)."""

from dataclasses import replace

import numpy as np
import pytest

from skyfm.catalog.cosmics import cosmic_ray_mask
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
