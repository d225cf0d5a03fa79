"""The patch file layout: CCUBE + EBOUNDS for counts, image HDUs per band for CCDs, truth HDUs, atomic writes."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from skyfm.data import Patch, read_patch, write_patch
from skyfm.errors import SkyfmError


def _wcs(ctype=("GLON-CAR", "GLAT-CAR"), crval=(10.0, 1.0), cdelt=0.1):
    w = WCS(naxis=2)
    w.wcs.ctype = list(ctype)
    w.wcs.crval = list(crval)
    w.wcs.crpix = [16.5, 16.5]
    w.wcs.cdelt = [-cdelt, cdelt]
    return w


def test_counts_patch_is_a_gtbin_style_ccube(tmp_path, rng):
    counts = rng.poisson(2.0, size=(6, 32, 32)).astype(np.float32)
    truth = Table({"x": [3.25], "y": [7.5], "flux_band": np.arange(6.0)[None, :]})
    patch = Patch(counts, "fermi-lat", [f"E{i}" for i in range(6)], _wcs(), truth=truth,
                  source_image=counts * 0.5, meta={"seed": 7, "galmodel": "gas-disk"})
    path = write_patch(patch, tmp_path / "cube.fits")
    with fits.open(path) as hdul:
        assert hdul[0].data.shape == (6, 32, 32)
        assert hdul[0].header["CTYPE1"].startswith("GLON") and hdul[0].header["CTYPE3"] == "Energy"
        eb = hdul["EBOUNDS"]
        assert eb.columns["E_MIN"].unit == "keV"
        np.testing.assert_allclose(eb.data["E_MIN"][0], 3.0e5)
        np.testing.assert_allclose(eb.data["E_MAX"][-1], 1.0e9)
    back = read_patch(path)
    np.testing.assert_array_equal(back.data, counts)
    np.testing.assert_array_equal(back.source_image, counts * 0.5)
    assert back.meta["seed"] == 7 and back.meta["galmodel"] == "gas-disk"
    assert back.truth["x"][0] == 3.25 and back.truth["flux_band"].shape == (1, 6)
    # The WCS survives to far better than a hundredth of a pixel.
    sky = patch.wcs.pixel_to_world(np.array([0.0, 31.0]), np.array([0.0, 31.0]))
    x, y = back.wcs.world_to_pixel(sky)
    np.testing.assert_allclose(x, [0.0, 31.0], atol=1e-6)
    np.testing.assert_allclose(y, [0.0, 31.0], atol=1e-6)


def test_ccd_patch_has_one_image_hdu_per_band(tmp_path, rng):
    data = rng.normal(100, 5, size=(4, 32, 32)).astype(np.float32)
    cmask = np.zeros((4, 32, 32), np.uint8)
    cmask[2, 5, 5] = 1
    patch = Patch(data, "wise", ["W1", "W2", "W3", "W4"], _wcs(("RA---TAN", "DEC--TAN"), (150.0, 2.0), 1e-3),
                  contaminant_mask=cmask)
    path = write_patch(patch, tmp_path / "wise.fits")
    with fits.open(path) as hdul:
        assert [h.header.get("FILTER") for h in hdul[:4]] == ["W1", "W2", "W3", "W4"]
        assert all(h.data.ndim == 2 for h in hdul[:4])
        assert hdul[0].header["TELESCOP"] == "WISE"
    back = read_patch(path)
    np.testing.assert_array_equal(back.data, data)
    assert back.bands == ["W1", "W2", "W3", "W4"] and back.contaminant_mask[2, 5, 5] == 1


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    patch = Patch(np.zeros((1, 8, 8)), "hubble", ["F606W"], None)
    target = tmp_path / "out.fits"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(RuntimeError):
        write_patch(patch, target)
    assert list(tmp_path.iterdir()) == []


def test_read_patch_errors(tmp_path):
    with pytest.raises(SkyfmError, match="file not found"):
        read_patch(tmp_path / "nope.fits")
    bad = tmp_path / "notfits.fits"
    bad.write_text("hello")
    with pytest.raises(SkyfmError, match="not a readable FITS file"):
        read_patch(bad)
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(plain)
    with pytest.raises(SkyfmError, match="not written by skyfm"):
        read_patch(plain)
