"""Exposure cubes (skyfm.catalog.exposure, skyfm detect --exposure): flux_phys from the exposure the observation had."""

from __future__ import annotations

import dataclasses

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy.integrate import quad

from skyfm.catalog.exposure import read_exposure_cube
from skyfm.cli import main
from skyfm.data import write_patch
from skyfm.data.fits_io import ebounds_hdu
from skyfm.data.simulate import simulate_patch
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument

FERMI = load_instrument("fermi-lat")
EDGES_KEV = np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")] for b in FERMI.bands])


def car_wcs(frame: str, centre: tuple[float, float], shape: tuple[int, int], step_deg: float) -> WCS:
    """A plate carrée grid like gtexpcube2's, centred on ``centre`` (deg)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["GLON-CAR", "GLAT-CAR"] if frame == "galactic" else ["RA---CAR", "DEC--CAR"]
    w.wcs.crval = [centre[0], 0.0]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2 - centre[1] / step_deg]
    w.wcs.cdelt = [-step_deg, step_deg]
    return w


def write_gtexpcube2(path, planes: np.ndarray, energies_mev: np.ndarray, wcs: WCS):
    """The layout gtexpcube2 writes: the exposure as a 3-D primary image, the planes' energies in ENERGIES."""
    header = wcs.to_header()
    header.update({"WCSAXES": 3, "CTYPE3": "Energy", "CUNIT3": "MeV", "BUNIT": "cm2 s", "TELESCOP": "GLAST"})
    table = fits.BinTableHDU.from_columns([fits.Column("Energy", "D", unit="MeV", array=energies_mev)],
                                          name="ENERGIES")
    fits.HDUList([fits.PrimaryHDU(planes.astype(np.float32), header=header), table]).writeto(path)
    return path


def powerlaw_mean(exposure_of_log_e, lo_mev: float, hi_mev: float) -> float:
    """The E^-2-weighted mean of an exposure over [lo, hi], integrated by quad (the reference)."""
    num = quad(lambda e: exposure_of_log_e(np.log(e)) * e**-2, lo_mev, hi_mev, limit=200)[0]
    return num / quad(lambda e: e**-2, lo_mev, hi_mev)[0]


def test_a_gtexpcube2_cube_gives_each_band_its_power_law_mean_exposure_where_the_source_is(tmp_path):
    """Planes at the bins' edges (gtexpcube2): each band's exposure is the E^-2-weighted mean of the exposure,
    linear in log energy, at the source's position (bilinear: a gradient in longitude is followed exactly), in
    whatever frame the positions come."""
    energies = np.append(EDGES_KEV[:, 0], EDGES_KEV[-1, 1]) / 1e3  # 7 planes, MeV
    area = np.array([2.0, 3.1, 3.4, 3.5, 3.3, 3.1, 2.8]) * 1e11  # an effective area's rise and fall
    shape, step = (30, 40), 0.5
    wcs = car_wcs("galactic", (20.0, 1.0), shape, step)
    lon = wcs.pixel_to_world(np.arange(shape[1]), np.zeros(shape[1])).l.wrap_at(180 * u.deg).deg
    gradient = 1.0 + 0.02 * (lon - 20.0)  # exposure varies across the sky
    planes = area[:, None, None] * np.broadcast_to(gradient, shape)[None]
    cube = read_exposure_cube(write_gtexpcube2(tmp_path / "expcube.fits", planes, energies, wcs))
    assert cube.data.shape == (7, 30, 40) and np.allclose(cube.energies_mev, energies)
    where = SkyCoord(l=[18.3, 20.0, 23.7] * u.deg, b=[0.4, 1.0, 2.2] * u.deg, frame="galactic")
    got = cube.band_exposure(where, EDGES_KEV)
    for c, (lo, hi) in enumerate(EDGES_KEV / 1e3):
        mean = powerlaw_mean(lambda x: np.interp(x, np.log(energies), area), lo, hi)
        np.testing.assert_allclose(got[:, c], mean * (1.0 + 0.02 * (where.l.deg - 20.0)), rtol=1e-3)
    np.testing.assert_allclose(cube.band_exposure(where.icrs, EDGES_KEV), got, rtol=1e-6)  # any frame
    far = cube.band_exposure(SkyCoord(l=[90.0] * u.deg, b=[0.0] * u.deg, frame="galactic"), EDGES_KEV)
    assert np.isnan(far).all()  # outside the cube's pixels
    edge = cube.at_pixels(np.array([-1.5, 40.5, 12.0]), np.array([5.0, 29.0, 31.0]))  # just beyond: the edge's
    np.testing.assert_allclose(edge, cube.at_pixels(np.array([0.0, 39.0, 12.0]), np.array([5.0, 29.0, 29.0])))
    assert np.isnan(cube.at_pixels(np.array([-3.0, 43.0]), np.array([5.0, 5.0]))).all()


def test_a_cube_of_bins_and_a_map_of_one_exposure(tmp_path):
    """A cube with an EBOUNDS table (one plane per bin, gammapy's layout) gives a band of those bins its plane,
    and a band of two bins their power-law mean; a 2-D map gives every band its value."""
    wcs = car_wcs("icrs", (150.0, 2.0), (20, 20), 0.25)
    bins_kev = np.array([[3e5, 1e6], [1e6, 4e6], [4e6, 1e7]])
    values = np.array([1.0, 2.0, 4.0]) * 1e11
    planes = values[:, None, None] * np.ones((3, 20, 20))
    path = tmp_path / "bins.fits"
    fits.HDUList([fits.PrimaryHDU(planes, header=wcs.to_header()), ebounds_hdu(bins_kev)]).writeto(path)
    cube = read_exposure_cube(path)
    at = SkyCoord(ra=[150.2] * u.deg, dec=[2.1] * u.deg)
    np.testing.assert_allclose(cube.band_exposure(at, bins_kev), values[None], rtol=1e-9)
    w = np.array([1 / 3e5 - 1 / 1e6, 1 / 1e6 - 1 / 4e6])  # the E^-2 photons in each of the two bins
    two = cube.band_exposure(at, [[3e5, 4e6]])
    np.testing.assert_allclose(two[0, 0], (w * values[:2]).sum() / w.sum(), rtol=0.02)  # 64 samples in ln E
    flat = tmp_path / "map.fits"
    fits.PrimaryHDU(np.full((20, 20), 5e11), header=wcs.to_header()).writeto(flat)
    np.testing.assert_allclose(read_exposure_cube(flat).band_exposure(at, bins_kev), 5e11, rtol=1e-9)


def test_a_gammapy_exposure_map_is_read_in_its_unit_over_its_true_energy_bins(tmp_path):
    """gammapy writes exposure in m2 s, with a BANDS table of true-energy bins (ENERGY_TRUE_MIN / _MAX, TeV) that
    its BANDSHDU keyword names: read as cm2 s (x 1e4) over those bins; a file with no BUNIT is cm2 s, one in another
    kind of unit an error."""
    wcs = car_wcs("icrs", (83.6, 22.0), (20, 20), 0.02)
    edges_tev = np.array([0.1, 1.0, 10.0, 100.0])
    values = np.array([1.0, 3.0, 2.0]) * 1e6  # m2 s
    header = wcs.to_header()
    header.update({"BUNIT": "m2 s", "BANDSHDU": "BANDS"})
    bands = fits.BinTableHDU.from_columns([
        fits.Column("CHANNEL", "J", array=np.arange(3)),
        fits.Column("ENERGY_TRUE", "D", unit="TeV", array=np.sqrt(edges_tev[1:] * edges_tev[:-1])),
        fits.Column("ENERGY_TRUE_MIN", "D", unit="TeV", array=edges_tev[:-1]),
        fits.Column("ENERGY_TRUE_MAX", "D", unit="TeV", array=edges_tev[1:])], name="BANDS")
    bands.header.update({"AXCOLS1": "ENERGY_TRUE_MIN,ENERGY_TRUE_MAX"})
    path = tmp_path / "gammapy_exposure.fits"
    fits.HDUList([fits.PrimaryHDU(values[:, None, None] * np.ones((3, 20, 20)), header=header), bands]).writeto(path)
    cube = read_exposure_cube(path)
    at = SkyCoord(ra=[83.6] * u.deg, dec=[22.0] * u.deg)
    bins_kev = np.c_[edges_tev[:-1], edges_tev[1:]] * 1e9
    np.testing.assert_allclose(cube.band_exposure(at, bins_kev), 1e4 * values[None], rtol=1e-9)
    for unit, factor in (("", 1.0), ("cm2 s", 1.0), ("ph", None)):
        with fits.open(path) as hdul:
            hdul[0].header["BUNIT"] = unit
            hdul.writeto(tmp_path / "other.fits", overwrite=True)
        if factor is None:
            with pytest.raises(SkyfmError, match="its values are in 'ph', not an exposure"):
                read_exposure_cube(tmp_path / "other.fits")
        else:
            got = read_exposure_cube(tmp_path / "other.fits").band_exposure(at, bins_kev)
            np.testing.assert_allclose(got, factor * values[None], rtol=1e-9)


@pytest.mark.parametrize("case, words", [
    ("no-wcs", "no celestial WCS"), ("no-energies", "no ENERGIES, EBOUNDS or BANDS"),
    ("wrong-length", "3 planes but its ENERGIES table gives 2"), ("nan", "NaN"), ("zero", "zero everywhere"),
    ("table-only", "no 2-D or 3-D image"), ("not-fits", "not a FITS file"), ("missing", "not found"),
    ("unordered", "positive and increasing")])
def test_bad_exposure_cubes_are_one_clear_error(tmp_path, case, words):
    wcs = car_wcs("galactic", (0.0, 0.0), (8, 8), 1.0)
    planes = np.full((3, 8, 8), 1e11)
    energies = fits.BinTableHDU.from_columns([fits.Column("Energy", "D", array=[100.0, 1e3, 1e4])], name="ENERGIES")
    path = tmp_path / f"{case}.fits"
    if case == "no-wcs":
        fits.HDUList([fits.PrimaryHDU(planes), energies]).writeto(path)
    elif case == "no-energies":
        fits.PrimaryHDU(planes, header=wcs.to_header()).writeto(path)
    elif case in ("wrong-length", "unordered"):
        values = [100.0, 1e3] if case == "wrong-length" else [1e3, 100.0, 1e4]
        table = fits.BinTableHDU.from_columns([fits.Column("Energy", "D", array=values)], name="ENERGIES")
        fits.HDUList([fits.PrimaryHDU(planes, header=wcs.to_header()), table]).writeto(path)
    elif case in ("nan", "zero"):
        bad = planes.copy()
        if case == "nan":
            bad[1, 2, 2] = np.nan
        else:
            bad[:] = 0.0
        fits.HDUList([fits.PrimaryHDU(bad, header=wcs.to_header()), energies]).writeto(path)
    elif case == "table-only":
        fits.HDUList([fits.PrimaryHDU(), energies]).writeto(path)
    elif case == "not-fits":
        path.write_text("exposure, please\n")
    with pytest.raises(SkyfmError, match=words):
        read_exposure_cube(path)


def _meta(table, key: str):
    """A catalog's meta value, whatever case the file format gave its key (FITS: upper)."""
    return table.meta.get(key, table.meta.get(key.upper()))


@pytest.fixture(scope="module")
def model_dir(untrained_detector):
    return untrained_detector(("meerlicht", "fermi-lat"))


def test_detect_with_an_exposure_cube_divides_each_source_by_its_own_exposure(tmp_path, model_dir, capsys):
    """A cube observed three times as long as the YAML says: --exposure with a cube of three times the YAML's
    exposure in every bin gives a third of the YAML's flux_phys for every source (and so the true one); sources off
    the exposure cube get NaN and a warning; the file is named in the catalog's meta. Bad input: a CCD image,
    --no-refine, a cube whose energies miss the bins: one line each, nothing written."""
    from skyfm.catalog import read_catalog

    longer = dataclasses.replace(FERMI, bands=tuple(dataclasses.replace(b, exposure=3 * b.exposure)
                                                    for b in FERMI.bands))
    p = simulate_patch(longer, 3, size=48, population="real", center=(20.0, 0.5))
    src = write_patch(p, tmp_path / "cube.fits")
    exposure = np.array([b.exposure for b in FERMI.bands])
    bins = tmp_path / "expcube.fits"  # on a coarser ICRS grid of its own that covers the image
    centre = SkyCoord(l=20.0 * u.deg, b=0.5 * u.deg, frame="galactic").icrs
    wcs = car_wcs("icrs", (centre.ra.deg, centre.dec.deg), (40, 40), 0.25)
    fits.HDUList([fits.PrimaryHDU(3 * exposure[:, None, None] * np.ones((6, 40, 40)), header=wcs.to_header()),
                  ebounds_hdu(EDGES_KEV)]).writeto(bins)
    half = tmp_path / "half.fits"  # covers only the image's eastern half (RA increases to the east)
    half_wcs = car_wcs("icrs", (centre.ra.deg + 2.5, centre.dec.deg), (40, 20), 0.25)
    fits.HDUList([fits.PrimaryHDU(3 * exposure[:, None, None] * np.ones((6, 40, 20)), header=half_wcs.to_header()),
                  ebounds_hdu(EDGES_KEV)]).writeto(half)
    tables = {}
    for name, extra in (("yaml", []), ("cube", ["--exposure", str(bins)]), ("half", ["--exposure", str(half)])):
        out = tmp_path / f"cat-{name}.fits"
        rc = main(["detect", str(src), "--model", str(model_dir), "--min-score", "0.0101", "--out", str(out)] + extra)
        err = capsys.readouterr().err
        assert rc == 0, err
        assert ("lie outside the exposure cube half.fits" in err) == (name == "half"), err
        tables[name] = read_catalog(out)
    yaml_flux, cube_flux = (np.asarray(tables[k]["flux_phys"]) for k in ("yaml", "cube"))
    assert len(yaml_flux) > 3 and _meta(tables["cube"], "exposure_cube") == "expcube.fits"
    assert "expcube.fits" in tables["cube"]["flux_phys"].info.description
    np.testing.assert_allclose(cube_flux, yaml_flux / 3, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tables["cube"]["flux"]), np.asarray(tables["yaml"]["flux"]))
    off = np.isnan(np.asarray(tables["half"]["flux_phys"]))
    assert 0 < off.sum() < len(off)
    np.testing.assert_allclose(np.asarray(tables["half"]["flux_phys"])[~off], cube_flux[~off], rtol=1e-5)
    ml = write_patch(simulate_patch("meerlicht", 1, size=32), tmp_path / "ml.fits")
    high = tmp_path / "high.fits"
    write_gtexpcube2(high, np.ones((2, 40, 40)) * 3e11, np.array([1e3, 1e6]), wcs)
    for image, extra, words in ((ml, ["--exposure", str(bins)], "for counts cubes"),
                                (src, ["--exposure", str(bins), "--no-refine"], "--no-refine"),
                                (src, ["--exposure", str(high)],
                                 "it covers 1-1000 GeV, but the image's band 0 is 0.3-1.159 GeV"),
                                (src, ["--exposure", str(tmp_path / "none.fits")], "not found")):
        out = tmp_path / "bad.fits"
        rc = main(["detect", str(image), "--model", str(model_dir), "--out", str(out)] + extra)
        err = capsys.readouterr().err
        assert rc == 1 and words in err and err.count("\n") == 1, err
        assert not out.exists()


def test_an_exposure_or_model_cube_given_as_the_counts_is_one_clear_error(tmp_path, capsys):
    """gtexpcube2's cube (BUNIT cm2 s; or no BUNIT, but planes at ENERGIES) or an intensity model cube given to
    skyfm detect as the counts: one line that says what it is (and where an exposure cube goes), nothing written."""
    wcs = car_wcs("galactic", (20.0, 0.0), (30, 40), 0.5)
    energies = np.append(EDGES_KEV[:, 0], EDGES_KEV[-1, 1]) / 1e3
    files = {"exposure": "its pixels are an exposure (BUNIT 'cm2 s')", "no-bunit": "its planes are at energies",
             "intensity": "its pixels are in 'ph / (cm2 s MeV sr)', not counts"}
    for name, words in files.items():
        path = write_gtexpcube2(tmp_path / f"{name}.fits", np.full((7, 30, 40), 3e11), energies, wcs)
        with fits.open(path, mode="update") as hdul:
            if name == "no-bunit":
                del hdul[0].header["BUNIT"]
            elif name == "intensity":
                hdul[0].header["BUNIT"] = "ph / (cm2 s MeV sr)"
        out = tmp_path / f"cat-{name}.fits"
        rc = main(["detect", str(path), "--instrument", "fermi-lat", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and words in err and err.count("\n") == 1, err
        assert not out.exists()


def test_counts_in_any_counting_unit_are_counts():
    """BUNIT ph, photon, counts, ct, ADU or none: counts; an exposure, an intensity or a flux density: not."""
    from skyfm.data.readers import _not_counts

    hdul = fits.HDUList([fits.PrimaryHDU()])
    for bunit in ("ph", "photon", "counts", "ct", "adu", ""):
        assert _not_counts(hdul, [fits.Header({"BUNIT": bunit})]) is None, bunit
    for bunit in ("cm2 s", "ph / (cm2 s MeV sr)", "Jy"):
        assert _not_counts(hdul, [fits.Header({"BUNIT": bunit})]) is not None, bunit


def write_healpix_cube(path, planes, energies_mev, nside, nested=False, coordsys="G", pixels=None, edges_kev=None):
    """A HEALPix exposure (or intensity) map: one column per plane, the planes' energies in ENERGIES (or, with
    ``edges_kev``, a plane per bin in EBOUNDS)."""
    cols = [] if pixels is None else [fits.Column("PIXEL", "J", array=pixels)]
    cols += [fits.Column(f"CHANNEL{k + 1}", "E", array=np.asarray(p, np.float32)) for k, p in enumerate(planes)]
    table = fits.BinTableHDU.from_columns(cols, name="SKYMAP")
    table.header.update({"PIXTYPE": "HEALPIX", "ORDERING": "NESTED" if nested else "RING", "NSIDE": nside,
                         "COORDSYS": coordsys, "INDXSCHM": "EXPLICIT" if pixels is not None else "IMPLICIT"})
    energies = (ebounds_hdu(edges_kev) if edges_kev is not None else fits.BinTableHDU.from_columns(
        [fits.Column("Energy", "D", unit="MeV", array=energies_mev)], name="ENERGIES"))
    fits.HDUList([fits.PrimaryHDU(), table, energies]).writeto(path)
    return path


@pytest.mark.parametrize("nested", [False, True])
def test_a_healpix_exposure_map_gives_what_the_same_sky_on_a_car_grid_gives(tmp_path, nested):
    """An all-sky HEALPix exposure map (fermipy's layout; RING or NESTED, Galactic) of a smooth sky: each band's
    exposure at a source within 0.5% of the same sky's CAR cube, in any frame; a partial map reads NaN where it has
    no pixel and its coverage says so; a map of negative values is an error."""
    from astropy_healpix import HEALPix

    from skyfm.catalog.exposure import HealpixSkyCube

    energies = np.append(EDGES_KEV[:, 0], EDGES_KEV[-1, 1]) / 1e3
    area = np.array([2.0, 3.1, 3.4, 3.5, 3.3, 3.1, 2.8]) * 1e11

    def sky(l_deg, b_deg):  # smooth over a HEALPix pixel (nside 64: 0.9 deg)
        return 1.0 + 0.3 * np.cos(np.radians(b_deg)) * np.sin(np.radians(l_deg))

    grid = HEALPix(nside=64, order="nested" if nested else "ring")
    lon, lat = grid.healpix_to_lonlat(np.arange(grid.npix))
    planes = area[:, None] * sky(lon.deg, lat.deg)[None]
    cube = read_exposure_cube(write_healpix_cube(tmp_path / "hpx.fits", planes, energies, 64, nested))
    assert isinstance(cube, HealpixSkyCube) and cube.data.shape == (7, grid.npix) and cube.frame == "galactic"
    shape, step = (40, 60), 0.25
    wcs = car_wcs("galactic", (30.0, 5.0), shape, step)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    at = wcs.pixel_to_world(xx, yy)
    car = read_exposure_cube(write_gtexpcube2(tmp_path / "car.fits", area[:, None, None] *
                                              sky(at.l.deg, at.b.deg)[None], energies, wcs))
    where = SkyCoord(l=[26.0, 30.0, 35.5] * u.deg, b=[1.0, 5.0, 8.0] * u.deg, frame="galactic")
    np.testing.assert_allclose(cube.band_exposure(where, EDGES_KEV), car.band_exposure(where, EDGES_KEV), rtol=5e-3)
    np.testing.assert_allclose(cube.band_exposure(where.icrs, EDGES_KEV), cube.band_exposure(where, EDGES_KEV))

    north = np.flatnonzero(lat.deg > 0)  # a partial map: the northern Galactic hemisphere
    part = read_exposure_cube(write_healpix_cube(tmp_path / "part.fits", planes[:, north], energies, 64, nested,
                                                 pixels=north))
    px, py = part.sky_to_pixels(SkyCoord(l=[30.0, 30.0] * u.deg, b=[20.0, -20.0] * u.deg, frame="galactic"))
    assert part.covers(px, py).tolist() == [True, False]
    values = part.at_pixels(px, py)
    assert np.isfinite(values[0]).all() and np.isnan(values[1]).all()
    assert np.isfinite(part.at_pixels(px, py, clamp=True)).all()  # beyond its edge, a stand-in
    with pytest.raises(SkyfmError, match="negative"):
        read_exposure_cube(write_healpix_cube(tmp_path / "neg.fits", -planes, energies, 64, nested))


def test_healpix_exposure_and_intensity_maps_make_the_background_model_of_a_car_cube(tmp_path):
    """background_counts with the exposure and the interstellar-emission model as HEALPix maps gives the counts that
    the same maps on CAR grids give, to 1%."""
    from astropy_healpix import HEALPix

    from skyfm.catalog import background_model as bm
    from skyfm.catalog.likelihood import psf_kernels

    energies = np.append(EDGES_KEV[:, 0], EDGES_KEV[-1, 1]) / 1e3
    grid = HEALPix(nside=128, order="ring")
    lon, lat = grid.healpix_to_lonlat(np.arange(grid.npix))
    planes = 3e11 * np.ones((7, 1)) * (1.0 + 0.2 * np.sin(np.radians(lon.deg)))[None]
    hpx = read_exposure_cube(write_healpix_cube(tmp_path / "hpx.fits", planes, energies, 128))
    wide = car_wcs("galactic", (20.0, 0.0), (80, 120), 0.25)
    yy, xx = np.mgrid[0:80, 0:120]
    at = wide.pixel_to_world(xx, yy)
    car = read_exposure_cube(write_gtexpcube2(tmp_path / "car.fits", 3e11 * np.ones((7, 1, 1)) *
                                              (1.0 + 0.2 * np.sin(np.radians(at.l.deg)))[None], energies, wide))
    wcs = car_wcs("galactic", (20.0, 0.0), (24, 24), 0.25)
    kernels = [k / k.sum() for k in psf_kernels(FERMI, 0.25)]
    iso = (np.geomspace(30.0, 3e6, 20), 1e-7 * (np.geomspace(30.0, 3e6, 20) / 100.0) ** -2.2)
    nodes = np.geomspace(50.0, 2e6, 30)  # gll_iem_v07's energies
    gal_hpx = 2e-9 * (nodes[:, None] / 1e3) ** -2.6 * (1.0 + 0.5 * np.cos(np.radians(lat.deg)) ** 8)[None]
    gal_car = 2e-9 * (nodes[:, None, None] / 1e3) ** -2.6 * (1.0 + 0.5 * np.cos(np.radians(at.b.deg)) ** 8)[None]
    gal = [bm.read_intensity_cube(write_healpix_cube(tmp_path / "gal-hpx.fits", gal_hpx, nodes, 128)),
           bm.read_intensity_cube(write_gtexpcube2(tmp_path / "gal-car.fits", gal_car, nodes, wide))]
    assert bm.is_intensity_cube(tmp_path / "gal-hpx.fits")
    made = [bm.background_counts(wcs, (24, 24), EDGES_KEV, cube, g, iso, kernels) for cube, g in zip((hpx, car), gal)]
    np.testing.assert_allclose(made[0], made[1], rtol=1e-2)


def test_skyfm_detect_takes_a_healpix_exposure_map(tmp_path, model_dir, capsys):
    """--exposure with an all-sky HEALPix map (a plane per bin, EBOUNDS) of three times the YAML's exposure: a third of
    the YAML's flux_phys for every source."""
    from skyfm.catalog import read_catalog

    p = simulate_patch("fermi-lat", 3, size=48, population="real", center=(20.0, 0.5))
    src = write_patch(p, tmp_path / "cube.fits")
    exposure = np.array([b.exposure for b in FERMI.bands])
    hpx = write_healpix_cube(tmp_path / "hpx.fits", 3 * exposure[:, None] * np.ones((6, 12 * 32**2)), None, 32,
                             edges_kev=EDGES_KEV)
    tables = []
    for extra in ([], ["--exposure", str(hpx)]):
        out = tmp_path / f"cat{len(extra)}.fits"
        rc = main(["detect", str(src), "--model", str(model_dir), "--min-score", "0.0101", "--out", str(out)] + extra)
        assert rc == 0, capsys.readouterr().err
        tables.append(read_catalog(out))
    assert len(tables[0]) > 3
    np.testing.assert_allclose(np.asarray(tables[1]["flux_phys"]), np.asarray(tables[0]["flux_phys"]) / 3, rtol=1e-4)


def test_a_healpix_exposure_map_given_as_the_counts_is_one_clear_error(tmp_path, capsys):
    """A HEALPix exposure map handed to skyfm detect as the counts map (planes at energies, or columns in cm2 s) is
    one line that says where it goes, not an all-sky search of exposures read as counts."""
    energies = np.append(EDGES_KEV[:, 0], EDGES_KEV[-1, 1]) / 1e3
    at_energies = write_healpix_cube(tmp_path / "energies.fits", 3e11 * np.ones((7, 12 * 8**2)), energies, 8)
    in_cm2s = tmp_path / "cm2s.fits"
    cols = [fits.Column(f"CHANNEL{k + 1}", "E", unit="cm2 s", array=np.full(12 * 8**2, 3e11, np.float32))
            for k in range(6)]
    table = fits.BinTableHDU.from_columns(cols, name="SKYMAP")
    table.header.update({"PIXTYPE": "HEALPIX", "ORDERING": "RING", "NSIDE": 8, "COORDSYS": "G"})
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(in_cm2s)
    for path, words in ((at_energies, "planes are at energies"), (in_cm2s, "an exposure")):
        out = tmp_path / "cat.fits"
        rc = main(["detect", str(path), "--instrument", "fermi-lat", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and words in err and "--exposure" in err and err.count("\n") == 1, err
        assert not out.exists()
