"""Reading the files users have: FITS images, gtbin counts cubes, skyfm patch files; lazily for big ones."""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from skyfm.cli import main
from skyfm.data import Patch, open_image, read_image, write_patch
from skyfm.data.simulate import simulate_patch
from skyfm.data.fits_io import ebounds_hdu
from skyfm.data.readers import EnergyBinsWarning, ImageUnitWarning, group_energy_planes, inspect_file
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument

FERMI_EDGES_KEV = np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")]
                            for b in load_instrument("fermi-lat").bands])


def _sky_wcs(ctype=("RA---TAN", "DEC--TAN"), crval=(150.0, 2.0), crpix=(20.5, 15.5), cd=None, cdelt=1.375 / 3600):
    w = WCS(naxis=2)
    w.wcs.ctype = list(ctype)
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)
    if cd is not None:
        w.wcs.cd = cd
    else:
        w.wcs.cdelt = [-cdelt, cdelt]
    return w


def _ccube_header(wcs, telescop="GLAST"):
    header = wcs.to_header()
    header["WCSAXES"] = 3
    header.update({"CTYPE3": "Energy", "CUNIT3": "MeV", "CRPIX3": 1.0, "CRVAL3": 300.0, "CDELT3": 1.0})
    header["TELESCOP"], header["INSTRUME"] = telescop, "LAT"
    return header


def test_a_2d_image_becomes_one_band_with_its_wcs_and_mask(tmp_path, rng):
    data = rng.normal(100, 5, size=(30, 40)).astype(np.float32)
    data[3, 4], data[5, 6] = np.nan, np.inf
    # A rotated, non-square pixel grid: fine, its pixel scale is reported as the mean.
    angle = np.radians(30)
    scale = np.array([1.0, 1.2]) * 1.375 / 3600
    cd = np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale[None, :]
    header = _sky_wcs(cd=cd).to_header()
    header.update({"TELESCOP": "WISE", "BAND": 3})  # WISE Atlas images say BAND = 3 for W3
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / "w3.fits")
    patch = read_image(tmp_path / "w3.fits")
    assert patch.instrument == "wise" and patch.bands == ["W3"] and patch.shape == (1, 30, 40)
    assert patch.mask.sum() == 2 and patch.mask[3, 4] and patch.mask[5, 6]
    assert patch.data[0, 3, 4] == 0 and patch.data[0, 5, 6] == 0
    np.testing.assert_array_equal(patch.data[0][~patch.mask], data[~patch.mask])
    np.testing.assert_allclose(sorted(proj_plane_pixel_scales(patch.wcs)), sorted(scale), rtol=1e-9)
    with open_image(tmp_path / "w3.fits") as image:
        assert image.pixel_scale_deg == pytest.approx(scale.mean(), rel=1e-9)
    sky = patch.wcs.pixel_to_world(12.25, 7.5)
    x, y = WCS(header).world_to_pixel(sky)
    assert abs(x - 12.25) < 1e-6 and abs(y - 7.5) < 1e-6


def test_a_gtbin_counts_cube_keeps_its_energy_bins(tmp_path, rng):
    counts = rng.poisson(2.0, size=(6, 24, 32)).astype(np.int32)
    wcs = _sky_wcs(("GLON-CAR", "GLAT-CAR"), (10.0, 0.0), (16.5, 12.5), cdelt=0.1)
    ebounds = ebounds_hdu(FERMI_EDGES_KEV / 1e3)  # written in MeV, as some tools do: TUNIT says so
    ebounds.columns["E_MIN"].unit = ebounds.columns["E_MAX"].unit = "MeV"
    ebounds = fits.BinTableHDU.from_columns(ebounds.columns, name="EBOUNDS")
    fits.HDUList([fits.PrimaryHDU(counts, header=_ccube_header(wcs)), ebounds]).writeto(tmp_path / "ccube.fits")
    patch = read_image(tmp_path / "ccube.fits")
    assert patch.instrument == "fermi-lat" and patch.bands == ["E0", "E1", "E2", "E3", "E4", "E5"]
    np.testing.assert_allclose(patch.energy_edges_kev, FERMI_EDGES_KEV)
    np.testing.assert_array_equal(patch.data, counts)
    assert patch.data.dtype == np.float32 and patch.wcs.naxis == 2 and patch.mask is None
    with open_image(tmp_path / "ccube.fits") as image:
        assert image.format == "counts cube"
        np.testing.assert_array_equal(image.read_window(5, 9, 10, 20), counts[:, 5:9, 10:20])


def test_counts_cube_bins_that_are_not_the_instruments_are_summed_into_its_bands(tmp_path):
    # 0.1-1 GeV holds 74% of its (index-2) photons below fermi-lat's 0.3 GeV edge: left out, not called E0.
    edges = np.array([[1e5, 1e6], [1e6, 1e7]])
    wcs = _sky_wcs(("GLON-CAR", "GLAT-CAR"), (0.0, 0.0), (8.5, 8.5), cdelt=0.2)
    data = np.stack([np.full((16, 16), 5, np.float32), np.ones((16, 16), np.float32)])
    fits.HDUList([fits.PrimaryHDU(data, header=_ccube_header(wcs)), ebounds_hdu(edges)]).writeto(tmp_path / "c.fits")
    with pytest.warns(EnergyBinsWarning, match="E1 <- plane 2 .1-10 GeV.; plane 1 left out"):
        patch = read_image(tmp_path / "c.fits")
    assert patch.bands == ["E1"] and patch.shape == (1, 16, 16)
    np.testing.assert_array_equal(patch.data, data[1:])
    np.testing.assert_allclose(patch.energy_edges_kev, [[1e6, 1e7]])


def test_a_finely_binned_gtbin_cube_reads_as_the_instruments_bands(tmp_path, rng):
    # 30 log bins from 100 MeV to 1 TeV, as gtbin users make them: each band is the sum of the planes inside it.
    fine = np.geomspace(1e5, 1e9, 31)
    edges = np.stack([fine[:-1], fine[1:]], axis=1)
    counts = rng.poisson(1.5, size=(30, 12, 14)).astype(np.float32)
    counts[7, 3, 4] = np.nan
    wcs = _sky_wcs(("GLON-CAR", "GLAT-CAR"), (10.0, 0.0), (7.5, 6.5), cdelt=0.1)
    fits.HDUList([fits.PrimaryHDU(counts, header=_ccube_header(wcs)), ebounds_hdu(edges)]).writeto(tmp_path / "f.fits")
    grouping = group_energy_planes(edges, load_instrument("fermi-lat"))
    assert grouping.bands == ["E0", "E1", "E2", "E3", "E4", "E5"] and grouping.left_out == [0, 1, 2, 3]
    assert [p[0] for p in grouping.planes] == [4, 8, 12, 17, 21, 26] and grouping.planes[-1][-1] == 29
    # every group's own range lies within a quarter of a fine bin (0.033 dex) of its band's edges
    np.testing.assert_allclose(np.log10(grouping.edges_kev), np.log10(FERMI_EDGES_KEV), atol=0.07)
    with pytest.warns(EnergyBinsWarning, match="30 energy planes are not fermi-lat's bands"):
        patch = read_image(tmp_path / "f.fits")
    assert patch.bands == grouping.bands and patch.shape == (6, 12, 14)
    expected = np.stack([counts[p].sum(axis=0) for p in grouping.planes])
    np.testing.assert_array_equal(patch.data[:, ~patch.mask], expected[:, ~patch.mask])
    assert patch.mask.sum() == 1 and patch.mask[3, 4]  # NaN in one plane masks the pixel
    with pytest.warns(EnergyBinsWarning), open_image(tmp_path / "f.fits") as image:
        window = image.read_window(2, 6, 5, 9)
    np.testing.assert_array_equal(window[:, 2:, :], expected[:, 4:6, 5:9])


def test_a_gammapy_map_takes_its_energy_bins_from_the_table_bandshdu_names(tmp_path, rng):
    # gammapy (gamma-astro-data-formats) writes COUNTS with BANDSHDU = 'COUNTS_BANDS', edges in TeV
    fine = np.geomspace(0.1, 100.0, 16)
    counts = rng.poisson(2.0, size=(15, 10, 10)).astype(np.float32)
    header = _sky_wcs(("RA---CAR", "DEC--CAR"), (83.6, 22.0), (5.5, 5.5), cdelt=0.02).to_header()
    header.update({"BANDSHDU": "COUNTS_BANDS", "TELESCOP": "CTA"})
    bands = fits.BinTableHDU.from_columns([
        fits.Column("CHANNEL", "I", array=np.arange(15)),
        fits.Column("E_MIN", "E", unit="TeV", array=fine[:-1]),
        fits.Column("E_MAX", "E", unit="TeV", array=fine[1:])], name="COUNTS_BANDS")
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(counts, header=header, name="COUNTS"), bands])
    hdus.writeto(tmp_path / "gp.fits")
    with pytest.warns(EnergyBinsWarning):
        patch = read_image(tmp_path / "gp.fits", instrument="ctao")
    assert patch.bands == ["T0", "T1", "T2"] and patch.shape == (3, 10, 10)
    assert patch.data.sum() == pytest.approx(counts.sum())  # 0.1-100 TeV: every plane in a band
    hdus["COUNTS"].header["BANDSHDU"] = "ENERGIES"
    hdus.writeto(tmp_path / "bad.fits")
    with pytest.raises(SkyfmError, match="BANDSHDU keyword names a table 'ENERGIES' that the file does not have"):
        read_image(tmp_path / "bad.fits", instrument="ctao")


def test_counts_bins_outside_every_band_are_a_clear_error(tmp_path):
    edges = np.array([[3e4, 1e5], [1e5, 2.5e5]])  # 30-250 MeV: below fermi-lat's bands
    wcs = _sky_wcs(("GLON-CAR", "GLAT-CAR"), (0.0, 0.0), (8.5, 8.5), cdelt=0.2)
    fits.HDUList([fits.PrimaryHDU(np.ones((2, 16, 16), np.float32), header=_ccube_header(wcs)),
                  ebounds_hdu(edges)]).writeto(tmp_path / "low.fits")
    with pytest.raises(SkyfmError, match=r"2 energy bin\(s\) \(30-250 MeV\) cannot be summed into any of fermi-lat"):
        read_image(tmp_path / "low.fits")
    with pytest.raises(SkyfmError, match="0 < E_MIN < E_MAX"):
        group_energy_planes(np.array([[1e6, 1e6]]), load_instrument("fermi-lat"))


@pytest.mark.parametrize("bunit, exptime, factor, unit", [
    ("ELECTRONS/S", 600.0, 600.0 / 2.0, "electron / s"),  # a Hubble _drc / _drz image (hubble's gain: 2)
    ("ELECTRONS", None, 0.5, "electron"),  # an ACS _flt image
    ("e-/s", 100.0, 50.0, "electron / s"),
    ("DN/s", 300.0, 300.0, "adu / s"),
    ("COUNTS", None, 1.0, "ct"),
    ("ADU", None, 1.0, None),
    ("", None, 1.0, None),
])
def test_ccd_pixel_units_are_read_as_the_instruments_adu(tmp_path, rng, bunit, exptime, factor, unit):
    data = rng.normal(10.0, 1.0, size=(20, 24)).astype(np.float32)
    header = _sky_wcs().to_header()
    header.update({"TELESCOP": "HST", "INSTRUME": "ACS", "FILTER1": "F606W", "FILTER2": "CLEAR2L"})
    if bunit:
        header["BUNIT"] = bunit
    primary = fits.PrimaryHDU()
    if exptime:
        primary.header["EXPTIME"] = exptime  # drizzled HST files keep EXPTIME in the primary header
    fits.HDUList([primary, fits.ImageHDU(data, header=header, name="SCI")]).writeto(tmp_path / "sci.fits")
    patch = read_image(tmp_path / "sci.fits")
    np.testing.assert_allclose(patch.data[0], data * factor, rtol=1e-6)
    with open_image(tmp_path / "sci.fits") as image:
        assert image.adu_per_unit == pytest.approx(factor)
        assert (image.unit.to_string() if image.unit is not None else None) == unit
    assert patch.meta.get("adu_per_unit", 1.0) == pytest.approx(factor)


def test_a_drizzled_hst_file_takes_its_filter_from_the_primary_header(tmp_path, rng):
    """A ``_drc`` file: TELESCOP, INSTRUME, FILTER1 / FILTER2 and EXPTIME in the primary header, the SCI extension
    holding the WCS and BUNIT only, WHT and CTX beside it."""
    primary = fits.PrimaryHDU()
    primary.header.update({"TELESCOP": "HST", "INSTRUME": "ACS", "FILTER1": "CLEAR1L", "FILTER2": "F814W",
                           "EXPTIME": 2000.0})
    sci = _sky_wcs().to_header()
    sci["BUNIT"] = "ELECTRONS/S"
    data = rng.normal(0.5, 0.01, size=(20, 24)).astype(np.float32)
    fits.HDUList([primary, fits.ImageHDU(data, header=sci, name="SCI"),
                  fits.ImageHDU(np.ones_like(data), header=sci, name="WHT"),
                  fits.ImageHDU(np.ones(data.shape, np.int32), header=sci, name="CTX")]
                 ).writeto(tmp_path / "j_drc.fits")
    patch = read_image(tmp_path / "j_drc.fits")
    assert patch.instrument == "hubble" and patch.bands == ["F814W"]
    np.testing.assert_allclose(patch.data[0], data * 2000.0 / 2.0, rtol=1e-6)  # e-/s x EXPTIME / gain


def test_a_file_of_several_ccds_says_that_one_is_read(tmp_path, rng):
    """A mosaic camera writes one CCD per extension: the first is read, and a warning names the others and --hdu;
    weight, context and error maps beside a science image are not taken for more CCDs."""
    from skyfm.data.readers import MoreImagesWarning

    header = _sky_wcs().to_header()
    header.update({"TELESCOP": "WISE", "BAND": 1})
    data = rng.normal(10.0, 1.0, size=(20, 24)).astype(np.float32)
    ccds = [fits.ImageHDU(data + k, header=header, name=f"CCD{k}") for k in range(1, 7)]
    fits.HDUList([fits.PrimaryHDU(), *ccds, fits.ImageHDU(np.ones((8, 8), np.float32), name="SMALL")]).writeto(
        tmp_path / "mef.fits")
    with pytest.warns(MoreImagesWarning, match=r"read HDU 1 \(CCD1\); 5 other image HDU\(s\) of the same size "
                                               r"\(HDU 2 \(CCD2\), .* and 1 more\) are not read: choose one"):
        patch = read_image(tmp_path / "mef.fits")
    np.testing.assert_allclose(patch.data[0], data + 1)
    assert read_image(tmp_path / "mef.fits", hdu="CCD3").data[0][0, 0] == pytest.approx(data[0, 0] + 3)
    aux = [fits.ImageHDU(np.ones_like(data), header=header, name=n) for n in ("WHT", "CTX", "ERR")]
    fits.HDUList([fits.PrimaryHDU(), ccds[0], *aux]).writeto(tmp_path / "drz.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoreImagesWarning)
        read_image(tmp_path / "drz.fits")


def test_ccd_pixel_units_skyfm_cannot_convert_are_read_as_they_are_with_a_warning(tmp_path, rng):
    data = rng.normal(10.0, 1.0, size=(20, 24)).astype(np.float32)
    header = _sky_wcs().to_header()
    header.update({"TELESCOP": "WISE", "BAND": 1, "BUNIT": "MJy/sr"})
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / "w1.fits")
    with pytest.warns(ImageUnitWarning, match="BUNIT 'MJy/sr' is not a unit skyfm converts"):
        patch = read_image(tmp_path / "w1.fits")
    np.testing.assert_array_equal(patch.data[0], data)
    header["BUNIT"] = "ELECTRONS/S"  # a rate without an exposure time: the band's nominal one, said
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / "rate.fits")
    with pytest.warns(ImageUnitWarning, match="no EXPTIME: 200 s assumed"):
        patch = read_image(tmp_path / "rate.fits")
    np.testing.assert_allclose(patch.data[0], data * 200.0 / load_instrument("wise").noise["gain"], rtol=1e-6)


@pytest.mark.parametrize("keywords, unit, level", [
    ({"SATURATE": 30000.0}, "", 30000.0),  # SExtractor's SATUR_KEY, in the image's unit
    ({"SATURATE": 15000.0}, "ELECTRONS", 7500.0),  # electrons / hubble's gain 2
    ({"NDRIZIM": 4}, "ELECTRONS/S", 4 * 42000.0),  # a drizzle of 4 exposures: 4 x one exposure's full well
    ({"NCOMBINE": 1}, "ELECTRONS/S", None),  # one exposure: the instrument's level stands
    ({}, "", None),
])
def test_a_ccd_image_s_saturation_level_comes_from_its_header(tmp_path, rng, keywords, unit, level):
    """The PSF fit leaves out pixels above the saturation level; a file that says where it saturates is believed
    (the instrument's level is one exposure's, of one camera)."""
    from skyfm.detect import saturation_mask

    header = _sky_wcs().to_header()
    header.update({"TELESCOP": "HST", "INSTRUME": "ACS", "FILTER1": "F606W", "FILTER2": "CLEAR2L"})
    if unit:
        header["BUNIT"] = unit
    primary = fits.PrimaryHDU()
    primary.header.update({"EXPTIME": 1000.0, **keywords})
    data = rng.normal(10.0, 1.0, size=(20, 24)).astype(np.float32)
    fits.HDUList([primary, fits.ImageHDU(data, header=header, name="SCI")]).writeto(tmp_path / "sci.fits")
    with open_image(tmp_path / "sci.fits") as image:
        assert image.saturation_adu == (None if level is None else pytest.approx(level))
        assert any("saturation level" in n for n in image.notes) == (level is not None)
        inst = image.instrument
    assert inst.noise["saturation"] == 42000  # the built-in instrument is not changed
    assert not saturation_mask(np.full((1, 4, 4), 35000.0), inst).any()


@pytest.mark.parametrize("keywords, unit, gain", [
    ({"GAIN": 4.0}, "", 4.0),  # an image in ADU read out at another gain than hubble's 2
    ({"EGAIN": 1.5}, "ADU", 1.5),
    ({"GAIN": 2.0}, "", None),  # the instrument's own
    ({"GAIN": 4.0}, "ELECTRONS", None),  # in electrons any gain fits: converted and weighted alike
    ({}, "", None),
])
def test_a_ccd_image_s_gain_comes_from_its_header(tmp_path, rng, keywords, unit, gain):
    header = _sky_wcs().to_header()
    header.update({"TELESCOP": "HST", "INSTRUME": "ACS", "FILTER1": "F606W", **keywords})
    if unit:
        header["BUNIT"] = unit
    fits.PrimaryHDU(rng.normal(10.0, 1.0, size=(20, 24)).astype(np.float32), header=header).writeto(tmp_path / "g.fits")
    with open_image(tmp_path / "g.fits") as image:
        assert image.gain == (None if gain is None else pytest.approx(gain))
        assert any("e-/ADU from" in n for n in image.notes) == (gain is not None)


def test_a_gtbin_counts_map_takes_its_band_from_the_energy_keywords(tmp_path):
    header = _sky_wcs(("RA---CAR", "DEC--CAR"), (83.6, 22.0), (8.5, 8.5), cdelt=0.1).to_header()
    header.update({"TELESCOP": "GLAST", "INSTRUME": "LAT", "DSTYP1": "POS(RA,DEC)", "DSVAL1": "CIRCLE(83.6,22,15)",
                   "DSTYP2": "ENERGY", "DSUNI2": "MeV", "DSVAL2": "1159.5:4481.4"})
    fits.PrimaryHDU(np.ones((16, 16), np.float32), header=header).writeto(tmp_path / "cmap.fits")
    patch = read_image(tmp_path / "cmap.fits")
    assert patch.bands == ["E1"]
    np.testing.assert_allclose(patch.energy_edges_kev, [[1.1595e6, 4.4814e6]])


def test_a_simulated_patch_file_is_read_whole_with_its_truth(tmp_path, rng):
    data = rng.normal(100, 5, size=(3, 20, 24)).astype(np.float32)
    data[1, 2, 3] = np.nan
    truth = Table({"x": [1.5, 10.0], "y": [2.0, 7.25], "flux": [10.0, 20.0]})
    patch = Patch(data, "hubble", ["F435W", "F606W", "F814W"], _sky_wcs(cdelt=0.05 / 3600), truth=truth,
                  source_image=data * 0.1, contaminant_mask=np.zeros(data.shape, np.uint8))
    write_patch(patch, tmp_path / "sim.fits")
    back = read_image(tmp_path / "sim.fits")
    assert back.bands == ["F435W", "F606W", "F814W"] and back.instrument == "hubble"
    assert len(back.truth) == 2 and back.source_image.shape == (3, 20, 24)
    assert back.mask[2, 3] and back.mask.sum() == 1 and back.data[1, 2, 3] == 0
    with open_image(tmp_path / "sim.fits") as image:  # the lazy view stacks the band HDUs too
        assert image.format == "simulated patch" and image.shape == (3, 20, 24)
        np.testing.assert_array_equal(image.read_window(0, 20, 0, 24)[0], data[0])
    with pytest.raises(SkyfmError, match="simulated for hubble, not wise"):
        read_image(tmp_path / "sim.fits", instrument="wise")


def test_the_band_comes_from_filter_keywords_or_the_option(tmp_path, rng):
    header = _sky_wcs(cdelt=0.05 / 3600).to_header()
    header.update({"TELESCOP": "HST", "INSTRUME": "ACS", "FILTER1": "CLEAR1L", "FILTER2": "F814W"})
    primary = fits.PrimaryHDU(header=fits.Header({"TELESCOP": "HST", "INSTRUME": "ACS"}))
    sci = fits.ImageHDU(rng.normal(size=(16, 16)).astype(np.float32), header=header, name="SCI")
    fits.HDUList([primary, sci]).writeto(tmp_path / "acs.fits")
    patch = read_image(tmp_path / "acs.fits")  # the first HDU with data, here the SCI extension
    assert patch.instrument == "hubble" and patch.bands == ["F814W"]
    assert read_image(tmp_path / "acs.fits", hdu="sci").bands == ["F814W"]
    assert read_image(tmp_path / "acs.fits", hdu=1, band="F606W").bands == ["F606W"]
    assert read_image(tmp_path / "acs.fits", instrument="meerlicht", band="q").instrument == "meerlicht"
    with pytest.raises(SkyfmError, match="FILTER2='F814W' is not a band of meerlicht"):
        read_image(tmp_path / "acs.fits", instrument="meerlicht")
    with pytest.raises(SkyfmError, match="no HDU named 'DQ'"):
        read_image(tmp_path / "acs.fits", hdu="DQ")


def test_masked_pixels_from_a_mask_hdu_and_blank_integers(tmp_path):
    raw = np.arange(64, dtype=np.int16).reshape(8, 8)
    raw[0, 0] = -32768
    header = _sky_wcs(cdelt=0.56 / 3600).to_header()
    header.update({"TELESCOP": "MeerLICHT", "FILTER": "r", "BLANK": -32768})
    mask = np.zeros((8, 8), np.uint8)
    mask[4, :] = 1  # a bad row
    fits.HDUList([fits.PrimaryHDU(raw, header=header), fits.ImageHDU(mask, name="MASK")]).writeto(tmp_path / "m.fits")
    patch = read_image(tmp_path / "m.fits")
    assert patch.bands == ["r"]
    expected = mask.astype(bool)
    expected[0, 0] = True
    np.testing.assert_array_equal(patch.mask, expected)
    assert patch.data[0, 0, 0] == 0 and patch.data[0, 1, 1] == 9


def _hst_flc(tmp_path, telescop="HST"):
    """An HST-like file of two CCDs: SCI, ERR, DQ per EXTVER; DQ flags a hot pixel (16), a cosmic ray (4096), a warm
    pixel (64) and a saturated one (256) on chip 1, a bad column (128) on chip 2."""
    header = _sky_wcs(cdelt=0.05 / 3600).to_header()
    header.update({"FILTER1": "F606W", "FILTER2": "CLEAR2L"})
    hdus = [fits.PrimaryHDU(header=fits.Header({"TELESCOP": telescop, "INSTRUME": "ACS"}))]
    for ver in (1, 2):
        dq = np.zeros((12, 10), np.int16)
        if ver == 1:
            dq[2, 3], dq[5, 5], dq[7, 1], dq[9, 8] = 16, 4096, 64, 256
        else:
            dq[:, 4] = 128
        hdus += [fits.ImageHDU(np.full((12, 10), 100.0 * ver, np.float32), header=header, name="SCI", ver=ver),
                 fits.ImageHDU(np.ones((12, 10), np.float32), name="ERR", ver=ver),
                 fits.ImageHDU(dq, name="DQ", ver=ver)]
    fits.HDUList(hdus).writeto(tmp_path / "flc.fits")
    return tmp_path / "flc.fits"


def test_an_hst_data_quality_extension_masks_its_chips_bad_pixels(tmp_path):
    path = _hst_flc(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the second chip is not read: said by MoreImagesWarning
        chip1 = read_image(path)
        chip2 = read_image(path, hdu=4)
        info = inspect_file(path)
    expected = np.zeros((12, 10), bool)
    expected[2, 3] = expected[5, 5] = True  # hot pixel and cosmic ray; warm and saturated pixels stay
    np.testing.assert_array_equal(chip1.mask, expected)
    assert chip1.data[0, 2, 3] == 0 and chip1.data[0, 9, 8] == 100.0
    assert chip2.mask[:, 4].all() and chip2.mask.sum() == 12 and chip2.data[0, 0, 0] == 200.0  # its own DQ
    assert any("pixels flagged in HDU 3 (DQ) masked" in line and "all but 32, 64, 256, 2048" in line for line in info)


def test_a_data_quality_extension_of_another_telescope_is_said_and_not_used(tmp_path):
    from skyfm.data.readers import DataQualityWarning

    path = _hst_flc(tmp_path, telescop="SOAR")
    with pytest.warns(DataQualityWarning, match=r"\(DQ\) holds data-quality flags.*SOAR.*not used"):
        patch = read_image(path, hdu=1, instrument="hubble")
    assert patch.mask is None


def test_a_mask_file_beside_the_image_masks_its_flagged_pixels(tmp_path):
    from skyfm.data.readers import parse_mask_bits

    header = _sky_wcs(cdelt=0.56 / 3600).to_header()
    header.update({"TELESCOP": "MeerLICHT", "FILTER": "r"})
    fits.PrimaryHDU(np.full((8, 8), 50.0, np.float32), header=header).writeto(tmp_path / "red.fits")
    flags = np.zeros((8, 8), np.int16)
    flags[1, 1], flags[2, 2], flags[3, 3] = 1, 4, 16 | 4  # a bad pixel, a saturated one, a trail on a saturated one
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(flags)]).writeto(tmp_path / "mask.fits.fz")
    every = read_image(tmp_path / "red.fits", mask=tmp_path / "mask.fits.fz")
    np.testing.assert_array_equal(every.mask, flags != 0)
    some = read_image(tmp_path / "red.fits", mask=tmp_path / "mask.fits.fz", mask_bits=parse_mask_bits("1,16"))
    np.testing.assert_array_equal(some.mask, (flags & 17) != 0)  # the saturated-only pixel stays
    assert some.data[0, 2, 2] == 50.0 and some.data[0, 3, 3] == 0.0
    info = inspect_file(tmp_path / "red.fits", mask=tmp_path / "mask.fits.fz", mask_bits=17)
    assert any(line.startswith("masked:      3.12% of pixels (counting") and "its pixels with bits 1, 16" in line
               for line in info), info
    assert parse_mask_bits("0x11") == parse_mask_bits("17") == 17
    sim = write_patch(simulate_patch("meerlicht", 3, size=16, bands=["r"]), tmp_path / "sim.fits")  # a skyfm file
    flags16 = np.zeros((16, 16), np.uint8)
    flags16[5, 6] = 1
    fits.PrimaryHDU(flags16).writeto(tmp_path / "mask16.fits")
    assert read_image(sim).mask is None
    np.testing.assert_array_equal(read_image(sim, mask=tmp_path / "mask16.fits").mask, flags16 != 0)


def test_degenerate_leading_axes_are_dropped(tmp_path):
    header = _sky_wcs(cdelt=1e-3).to_header()
    header.update({"WCSAXES": 4, "CTYPE3": "FREQ", "CRVAL3": 1.4e9, "CDELT3": 1e6, "CRPIX3": 1.0,
                   "CTYPE4": "STOKES", "CRVAL4": 1.0, "CDELT4": 1.0, "CRPIX4": 1.0})
    fits.PrimaryHDU(np.ones((1, 1, 12, 10), np.float32), header=header).writeto(tmp_path / "radio.fits")
    patch = read_image(tmp_path / "radio.fits", instrument="wise", band="W1")
    assert patch.shape == (1, 12, 10) and patch.wcs.naxis == 2


def test_open_image_reads_windows_without_loading_the_image(tmp_path, rng):
    data = rng.normal(size=(3, 200, 300)).astype(np.float32)
    header = _sky_wcs(cdelt=1.375 / 3600).to_header()
    header["TELESCOP"] = "WISE"
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / "cube.fits")
    with open_image(tmp_path / "cube.fits") as image:
        assert image.shape == (3, 200, 300)
        window = image.read_window(50, 60, 100, 130)
        np.testing.assert_array_equal(window, data[:, 50:60, 100:130])
        outside = image.read_window(195, 205, -3, 2)  # runs off two edges: NaN there
        assert np.isnan(outside[:, 5:, :]).all() and np.isnan(outside[:, :, :3]).all()
        np.testing.assert_array_equal(outside[:, :5, 3:], data[:, 195:, :2])
        assert not image._hdul[0]._data_loaded  # no full copy: astropy sections read only those rows


def test_info_describes_a_counts_cube(tmp_path, capsys, rng):
    counts = rng.poisson(1.0, size=(6, 20, 30)).astype(np.float32)
    counts[:, 0, :] = np.nan
    wcs = _sky_wcs(("GLON-CAR", "GLAT-CAR"), (0.0, 0.0), (15.5, 10.5), cdelt=0.1)
    fits.HDUList([fits.PrimaryHDU(counts, header=_ccube_header(wcs)), ebounds_hdu(FERMI_EDGES_KEV)]).writeto(
        tmp_path / "ccube.fits")
    assert main(["info", str(tmp_path / "ccube.fits")]) == 0
    out = capsys.readouterr().out
    for words in ("counts cube", "fermi-lat (from header (TELESCOP='GLAST', INSTRUME='LAT'))", "6 band(s) x 20 x 30",
                  "E0 (0.3-1.159 GeV)", "E5 (0.2587-1 TeV)", "pixel scale: 0.1 deg", "CAR projection, galactic frame",
                  "glon 0.00000, glat +0.00000", "3 deg x 2 deg", "masked:      5% of pixels"):
        assert words in out, (words, out)


def test_info_of_a_simulated_patch_counts_its_true_sources(tmp_path, capsys, rng):
    truth = Table({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0]})
    patch = Patch(rng.normal(size=(1, 16, 16)), "meerlicht", ["q"], _sky_wcs(cdelt=0.56 / 3600), truth=truth)
    write_patch(patch, tmp_path / "sim.fits")
    assert main(["info", str(tmp_path / "sim.fits"), "--instrument", "meerlicht"]) == 0
    out = capsys.readouterr().out
    assert "simulated patch" in out and "3 true sources" in out and "q (440-720 nm)" in out and "(from option)" in out
