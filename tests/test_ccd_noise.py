"""What a CCD image's own noise says of it: the unit of a file whose header does not say (and a subtracted sky,
tested with L.A.Cosmic in test_cosmics.py)."""

import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits

from skyfm.data import open_image, read_image
from skyfm.data.readers import UNIT_SCALE_LIMIT, ImageUnitWarning, inspect_file
from skyfm.data.simulate import simulate_patch
from skyfm.instruments import load_instrument
from skyfm.instruments.ccd_noise import noise_unit_scale


@pytest.fixture(scope="module")
def hubble_patch():
    return simulate_patch("hubble", 950_000_003, size=128, bands=["F606W"])


def _write(patch, path, per_adu: float, bunit: str | None = None, sky_subtracted: bool = False):
    """The patch's one band as a drizzled-HST-like file, pixels x ``per_adu`` (file units per ADU)."""
    header = patch.wcs.to_header()
    header["FILTER"] = patch.bands[0]
    if bunit:
        header["BUNIT"] = bunit
    sky = float(patch.meta[f"sky_{patch.bands[0]}"]) if sky_subtracted else 0.0
    data = ((patch.data[0] - sky) * per_adu).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header, name="SCI")]).writeto(path)


def test_a_band_s_noise_gives_its_adu_per_unit(hubble_patch):
    """1 for pixels in ADU; EXPTIME / gain for the same pixels in e-/s, sky subtracted too (then the band's nominal
    sky stands in for the level; without it the read noise alone gives a lower bound)."""
    inst = load_instrument("hubble")
    gain, rn = inst.noise["gain"], inst.noise["read_noise"]
    band = inst.band("F606W")
    sky_e = float(hubble_patch.meta["sky_F606W"]) * gain
    adu = np.asarray(hubble_patch.data[0], float)
    rate = gain / float(band.exposure_time)  # e-/s per ADU
    assert noise_unit_scale(adu, gain, rn, sky_e) == pytest.approx(1.0, abs=0.15)
    assert noise_unit_scale(adu * rate, gain, rn, sky_e) * rate == pytest.approx(1.0, abs=0.15)
    subtracted = (adu - sky_e / gain) * rate
    assert noise_unit_scale(subtracted, gain, rn, sky_e) * rate == pytest.approx(1.0, abs=0.15)
    assert noise_unit_scale(subtracted, gain, rn, None) * rate < 0.8  # read noise alone: too low
    assert np.isnan(noise_unit_scale(np.zeros((64, 64)), gain, rn, sky_e))  # no data


@pytest.mark.parametrize("per_adu, bunit, sky_subtracted, unit", [
    (2.0 / 600.0, None, False, u.dimensionless_unscaled),  # e-/s with no BUNIT
    (2.0 / 600.0, None, True, u.dimensionless_unscaled),  # ... and its sky subtracted, as MAST's drizzled files
    (1e-3, "nanomaggy", False, u.nanomaggy),  # a calibrated unit skyfm does not convert to ADU (SDSS)
    (1e-3, "flux of nothing", False, u.dimensionless_unscaled),  # one astropy does not know
])
def test_a_file_that_does_not_say_its_unit_is_read_in_the_unit_its_noise_gives(tmp_path, hubble_patch, per_adu,
                                                                                 bunit, sky_subtracted, unit):
    """Read as ADU, a file in e-/s has a noise model 300x off (L.A.Cosmic finds nothing, the PSF fit weighs bright
    stars wrongly): its noise gives its ADU per unit, said in a warning; catalog fluxes stay in its unit."""
    _write(hubble_patch, tmp_path / "f.fits", per_adu, bunit, sky_subtracted)
    with pytest.warns(ImageUnitWarning, match="its sky's noise gives .* ADU per unit"):
        image = open_image(tmp_path / "f.fits", instrument="hubble")
    with image:
        assert image.adu_per_unit * per_adu == pytest.approx(1.0, abs=0.2)
        assert image.unit == unit
        assert any("catalog fluxes in the file's unit" in n for n in image.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageUnitWarning)
        patch = read_image(tmp_path / "f.fits", instrument="hubble")
    assert patch.meta["adu_per_unit"] * per_adu == pytest.approx(1.0, abs=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageUnitWarning)  # skyfm info says it as a note, not twice
        lines = inspect_file(tmp_path / "f.fits", instrument="hubble")
    assert any(line.startswith("note:") and "ADU per unit" in line for line in lines)


def test_a_file_in_adu_is_read_as_it_is(tmp_path, hubble_patch):
    """No BUNIT, pixels in ADU (as the simulators write): nothing changes, nothing is said. A BUNIT skyfm does not
    convert whose noise agrees with the ADU's is read as ADU, with a warning; one the header says (DN) is believed."""
    _write(hubble_patch, tmp_path / "adu.fits", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageUnitWarning)
        with open_image(tmp_path / "adu.fits", instrument="hubble") as image:
            assert image.adu_per_unit == 1.0 and image.unit is None and not image.notes
    _write(hubble_patch, tmp_path / "mjy.fits", 1.0, "MJy/sr")
    with pytest.warns(ImageUnitWarning, match=f"read as hubble's ADU \\(its noise agrees within "
                                              f"{UNIT_SCALE_LIMIT:g}x\\)"):
        open_image(tmp_path / "mjy.fits", instrument="hubble").close()
    _write(hubble_patch, tmp_path / "dn.fits", 1e-3, "DN")  # the header's word stands, whatever the noise
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageUnitWarning)
        with open_image(tmp_path / "dn.fits", instrument="hubble") as image:
            assert image.adu_per_unit == 1.0


def test_a_file_s_saturation_level_is_read_in_the_unit_its_noise_gives(tmp_path, hubble_patch):
    """SATURATE is in the file's unit: a file read at c ADU per unit saturates at c x SATURATE ADU, said once."""
    per_adu = 2.0 / 600.0
    _write(hubble_patch, tmp_path / "f.fits", per_adu)
    with fits.open(tmp_path / "f.fits", mode="update") as hdul:
        hdul[1].header["SATURATE"] = 42000.0 * per_adu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageUnitWarning)
        with open_image(tmp_path / "f.fits", instrument="hubble") as image:
            assert image.saturation_adu == pytest.approx(42000.0, rel=0.2)
            assert sum("saturation level" in n for n in image.notes) == 1


def test_skyfm_detect_finds_in_a_file_with_no_bunit_what_it_finds_in_adu(tmp_path):
    """End to end: the same image in ADU and in e-/s with no BUNIT gives the same catalog, its fluxes in the file's
    unit (the catalog says which and how many ADU per unit), and the catalog file writes."""
    from astropy.table import Table

    from skyfm.detect import detect_file

    per_adu = 2.0 / 600.0
    crowded = simulate_patch("hubble", 950_000_002, size=128, scene="crowded", bands=["F606W"])
    _write(crowded, tmp_path / "adu.fits", 1.0)
    _write(crowded, tmp_path / "rate.fits", per_adu)
    adu = detect_file(tmp_path / "adu.fits", instrument="hubble", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageUnitWarning)
        rate = detect_file(tmp_path / "rate.fits", tmp_path / "rate.ecsv", instrument="hubble", progress=False)
    assert len(rate) == pytest.approx(len(adu), rel=0.05) and len(adu) > 10
    assert rate.meta["adu_per_unit"] * per_adu == pytest.approx(1.0, abs=0.2)
    assert rate.meta["flux_unit"] == "the image's pixel unit"
    x, y = (np.asarray(adu[c], float) for c in ("x", "y"))
    xr, yr, flux = (np.asarray(rate[c], float) for c in ("x", "y", "flux"))
    ratios = [f / float(adu["flux"][np.argmin(np.hypot(x - a, y - b))].value) for a, b, f in zip(xr, yr, flux)]
    assert np.median(ratios) == pytest.approx(per_adu, rel=0.02)  # back in the file's unit
    assert len(Table.read(tmp_path / "rate.ecsv")) == len(rate)


def test_a_mosaic_whose_ccds_are_read_in_different_units_gives_one_catalog_in_adu(tmp_path):
    """--hdu all: a CCD in ADU beside one in e-/s with no BUNIT (read in the unit its noise gives) made a catalog
    whose flux columns could not be stacked (a traceback); now it is one catalog in the instrument's ADU, said."""
    from skyfm.detect import detect_file

    crowded = simulate_patch("hubble", 950_000_002, size=128, scene="crowded", bands=["F606W"])
    header = crowded.wcs.to_header()
    header["FILTER"] = "F606W"
    data = crowded.data[0].astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=header, name="CCD1"),
                  fits.ImageHDU(data * 2.0 / 600.0, header=header, name="CCD2")]).writeto(tmp_path / "mosaic.fits")
    with pytest.warns(UserWarning, match="read in different units .* all in the instrument's ADU"):
        cat = detect_file(tmp_path / "mosaic.fits", tmp_path / "mosaic.ecsv", instrument="hubble", hdu="all",
                          progress=False)
    assert cat["flux"].unit == u.adu and cat.meta["flux_unit"] == "adu" and "adu_per_unit" not in cat.meta
    one, two = (np.median(np.asarray(cat["flux"], float)[np.asarray(cat["hdu"]) == h]) for h in ("CCD1", "CCD2"))
    assert two == pytest.approx(one, rel=0.25)  # the same stars, in ADU (CCD2's as far as its noise tells them)


def test_a_region_filled_with_one_value_is_not_taken_for_the_sky(hubble_patch):
    """A corner padded with one value below the sky (as some pipelines fill their edges) is the emptiest box but
    holds no noise: taken for the sky's, it had L.A.Cosmic's noise model lose the sky (an offset of minus the level)
    and the unit estimate fail; now the sky noise is not measured there and nothing is changed."""
    from skyfm.instruments.ccd_noise import emptiest_sky, sky_noise_offset

    inst = load_instrument("hubble")
    gain, rn = inst.noise["gain"], inst.noise["read_noise"]
    plane = np.asarray(hubble_patch.data[0], float)
    sky = float(hubble_patch.meta["sky_F606W"])
    assert sky_noise_offset(plane, None, gain, rn) == 0.0
    padded = plane.copy()
    padded[:96, :96] = 0.5 * sky  # nine 32-px boxes, the emptiest of the band
    assert np.isnan(emptiest_sky(padded)[1])
    assert sky_noise_offset(padded, None, gain, rn) == 0.0


def test_a_sky_subtracted_file_s_unit_takes_the_exposure_its_header_gives(tmp_path):
    """With the sky subtracted the unit comes from the nominal sky, which grows with the exposure: a drizzle of four
    nominal exposures in e-/s with no BUNIT (EXPTIME 2400 s) is read at 2400 / gain ADU per e-/s, not half of it."""
    import dataclasses

    inst = load_instrument("hubble")
    deep = dataclasses.replace(inst, bands=tuple(dataclasses.replace(b, exposure_time=4 * b.exposure_time)
                                                 for b in inst.bands))
    patch = simulate_patch(deep, 950_000_004, size=128, bands=["F606W"], scene="field")
    per_adu = inst.noise["gain"] / 2400.0  # e-/s per ADU of the whole exposure
    _write(patch, tmp_path / "drz.fits", per_adu, sky_subtracted=True)
    with fits.open(tmp_path / "drz.fits", mode="update") as hdul:
        hdul[0].header["EXPTIME"] = 2400.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageUnitWarning)
        with open_image(tmp_path / "drz.fits", instrument="hubble") as image:
            assert image.adu_per_unit * per_adu == pytest.approx(1.0, abs=0.2)


def test_bunit_gives_the_unit_a_header_gets_wrong(tmp_path, hubble_patch, capsys):
    """--bunit: a file in e-/s whose header says ADU is read in e-/s (EXPTIME from the header): the pixels come back
    as the ADU image's, and a note says the header's BUNIT was set aside (skyfm info shows it). A unit skyfm does not
    convert, and --bunit on a counts cube, are one-line errors that write nothing."""
    from skyfm.cli import main
    from skyfm.data import write_patch

    per_adu = 2.0 / 600.0  # Hubble's gain 2, 600 s
    path = tmp_path / "rate.fits"
    _write(hubble_patch, path, per_adu, "ADU")
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["EXPTIME"] = 600.0
    with open_image(path, instrument="hubble") as image:  # the header is believed
        assert image.adu_per_unit == 1.0 and image.unit is None
    with open_image(path, instrument="hubble", bunit="electron/s") as image:
        assert image.adu_per_unit == pytest.approx(1.0 / per_adu) and image.unit == u.electron / u.s
        assert any("pixels in electron/s, as --bunit says, not the header's BUNIT 'ADU'" in n for n in image.notes)
    patch = read_image(path, instrument="hubble", bunit="e-/s")
    np.testing.assert_allclose(patch.data, hubble_patch.data, rtol=1e-5, atol=1e-3)
    assert main(["info", str(path), "--instrument", "hubble", "--bunit", "e-/s"]) == 0
    assert "as --bunit says" in capsys.readouterr().out
    cube = write_patch(simulate_patch("fermi-lat", 3, size=32, population="resampled"), tmp_path / "cube.fits")
    for image, bunit, words in ((path, "MJy/sr", "--bunit 'MJy/sr' is not a unit skyfm converts"),
                                (cube, "ct", "--bunit is for CCD images")):
        out = tmp_path / "bad.ecsv"
        rc = main(["detect", str(image), "--instrument", "hubble" if image == path else "fermi-lat",
                   "--bunit", bunit, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and words in err and err.count("\n") == 1, err
        assert not out.exists()
