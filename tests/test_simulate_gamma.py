"""The gamma-ray counts-cube simulator: physics (counts, PSF, spectra), geometry, populations, determinism, I/O."""

import dataclasses

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from skyfm.data import read_patch, write_patch
from skyfm.data.simulate import simulate_patch
from skyfm.data.simulate import gamma
from skyfm.data.simulate.populations import galactic_to_icrs, load_4fgl
from skyfm.data.simulate.render import add_point_sources
from skyfm.data.simulate.spectra import SpectrumSet
from skyfm.data.simulate.templates import disk_stamp, gaussian_stamp, get_template, template_stamp
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument

CRAB_ABOVE_1TEV = 2.26e-11


def one_source_instrument(name: str, crab_units: float, pixel_scale: str | None = None):
    """The instrument with a population of exactly one point source, power law of index 2, inside the patch."""
    inst = load_instrument(name)
    population = {"kind": "toy", "n_sources": [1, 1], "flux_range": [crab_units, crab_units * (1 + 1e-12)],
                  "index": [2.0, 0.0], "extended_fraction": 0.0}
    changes = {"simulation": {"default_population": "one", "populations": {"one": population}}}
    if pixel_scale is not None:
        changes["pixel_scale"] = u.Quantity(pixel_scale)
    return dataclasses.replace(inst, **changes)


def isolated_source_patch(inst, size: int, margin: int, **options):
    """The first seed whose single source lies at least ``margin`` px from every edge."""
    for seed in range(50):
        patch = simulate_patch(inst, seed, size=size, include_background=False, **options)
        x, y = float(patch.truth["x"][0]), float(patch.truth["y"][0])
        if margin <= x <= size - 1 - margin and margin <= y <= size - 1 - margin:
            return patch
    raise AssertionError("no seed put the source far enough from the edges")


def radial_containment(image: np.ndarray, x: float, y: float, fraction: float = 0.68) -> float:
    """Radius (pixels) about (x, y) that holds ``fraction`` of an image's sum, from its sorted pixels."""
    yy, xx = np.indices(image.shape)
    r = np.hypot(xx - x, yy - y).ravel()
    order = np.argsort(r)
    cum = np.cumsum(image.ravel()[order]) / image.sum()
    return float(np.interp(fraction, cum, r[order]))


# ----------------------------------------------------------------------------------------------------------------
# Counts and PSF
# ----------------------------------------------------------------------------------------------------------------
def test_counts_match_flux_times_exposure_within_poisson_error():
    inst = one_source_instrument("fermi-lat", 1.0)
    patch = isolated_source_patch(inst, size=160, margin=70)
    row = patch.truth[0]
    edges = gamma.band_edges_mev(inst)
    exposure = np.array([b.exposure for b in inst.bands])
    # Power law of index 2 normalised to F(1 TeV - 1 PeV): the integral over a bin is analytic.
    per_bin = CRAB_ABOVE_1TEV * (1 / edges[:, 0] - 1 / edges[:, 1]) / (1 / 1e6 - 1 / 1e9)
    np.testing.assert_allclose(row["flux_band"], per_bin * exposure, rtol=1e-9)
    assert row["flux"] == pytest.approx(row["flux_band"].sum())
    # The expected image holds every expected count of a source inside the patch ...
    np.testing.assert_allclose(patch.source_image.sum(axis=(1, 2)), row["flux_band"], rtol=2e-3)
    # ... and the Poisson counts in an aperture agree with it.
    yy, xx = np.indices(patch.data.shape[1:])
    for c, band in enumerate(inst.bands):
        aperture = np.hypot(xx - row["x"], yy - row["y"]) <= 3 * band.psf.containment_radius(0.68) / inst.pixel_scale_deg
        expected = patch.source_image[c][aperture].sum()
        assert expected > 0.9 * row["flux_band"][c]
        assert abs(patch.data[c][aperture].sum() - expected) < 4 * np.sqrt(expected) + 1, band.name


@pytest.mark.parametrize("name, pixel_scale", [("fermi-lat", None), ("fermi-lat", "0.025 deg"), ("ctao", None)])
def test_rendered_psf_containment_matches_the_yaml_r68(name, pixel_scale):
    inst = one_source_instrument(name, 1.0, pixel_scale)
    patch = isolated_source_patch(inst, size=200 if name == "ctao" else 160, margin=60)
    x, y = float(patch.truth["x"][0]), float(patch.truth["y"][0])
    checked = 0
    for c, band in enumerate(inst.bands):
        yaml_r68 = u.Quantity(band.psf_spec["r68"]).to_value(u.deg) / inst.pixel_scale_deg
        if not 2.5 <= yaml_r68 <= 12:  # resolved by the pixels, and the PSF's wings fit in the patch
            continue
        measured = radial_containment(patch.source_image[c], x, y)
        assert measured == pytest.approx(yaml_r68, rel=0.1), band.name
        checked += 1
    assert checked >= 2


def test_table_stamps_agree_with_exact_render_stamps():
    inst = load_instrument("fermi-lat")
    for band in inst.bands[1:]:
        optics = gamma._band_optics(band.psf, inst.pixel_scale_deg)
        x, y, flux = np.array([20.3]), np.array([21.77]), np.array([1000.0])
        ours = np.zeros((48, 48))
        gamma.add_points_from_table(ours, x, y, flux, optics)
        if optics.method == "table+halo":  # add the halo as the simulator does: cloud-in-cell and FFT
            halo = np.zeros((48 + 2 * optics.radius,) * 2)
            gamma._deposit_cloud_in_cell(halo, x + optics.radius, y + optics.radius, flux)
            k = gamma._kernel_fft(optics, halo.shape, "halo")
            ours += np.fft.irfft2(np.fft.rfft2(halo) * k, s=halo.shape)[optics.radius:-optics.radius,
                                                                         optics.radius:-optics.radius]
        exact = np.zeros((48, 48))
        add_point_sources(exact, x, y, flux, band.psf, inst.pixel_scale_deg, radius_pix=optics.radius,
                          method="stamps")
        exact *= ours.sum() / exact.sum()  # ours is renormalised to the full flux
        assert np.abs(ours - exact).max() < 0.01 * exact.max(), band.name
        yy, xx = np.indices(ours.shape)
        assert (ours * xx).sum() / ours.sum() == pytest.approx(20.3, abs=0.01)


# ----------------------------------------------------------------------------------------------------------------
# Geometry, determinism, I/O
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fermi_patch():
    return simulate_patch("fermi-lat", 11)


def test_wcs_round_trips_truth_positions(fermi_patch):
    t = fermi_patch.truth
    assert len(t) > 50
    x, y = fermi_patch.wcs.world_to_pixel(SkyCoord(t["glon"], t["glat"], frame="galactic"))
    assert np.abs(x - t["x"]).max() < 0.01 and np.abs(y - t["y"]).max() < 0.01
    h, w = fermi_patch.data.shape[1:]
    assert ((t["x"] >= -0.5) & (t["x"] < w - 0.5) & (t["y"] >= -0.5) & (t["y"] < h - 0.5)).all()
    icrs = SkyCoord(t["glon"], t["glat"], frame="galactic").icrs
    assert np.abs(icrs.ra.deg - t["ra"]).max() < 1e-7 and np.abs(icrs.dec.deg - t["dec"]).max() < 1e-7


def test_patch_fields_and_units(fermi_patch):
    p = fermi_patch
    assert p.data.shape == (6, 256, 256) and p.data.dtype == np.float32
    assert np.array_equal(p.data, np.round(p.data)) and (p.data >= 0).all()
    assert p.source_image.shape == p.data.shape and not p.contaminant_mask.any()
    assert p.energy_edges_kev.shape == (6, 2) and p.energy_edges_kev[0, 0] == pytest.approx(3e5)
    assert p.meta["population"] == "resampled" and p.meta["seed"] == 11
    t = p.truth
    assert t["flux_band"].shape == (len(t), 6) and t["flux"].unit == u.ct and t["glon"].unit == u.deg
    assert t["flux1000"].unit.is_equivalent(u.ph / u.cm**2 / u.s)
    assert set(t["class_group"]) <= {"agn", "pulsar", "other"}
    assert set(t["morphology"]) <= {"point", "disk", "gaussian", "template"}
    assert (t["snr"] >= 0).all() and t["snr"].max() > 10
    assert np.all(np.diff(t["flux"]) <= 0)  # brightest first


def test_same_seed_same_patch_and_another_seed_another():
    a = simulate_patch("ctao", 4, size=96)
    b = simulate_patch("ctao", 4, size=96)
    c = simulate_patch("ctao", 5, size=96)
    assert np.array_equal(a.data, b.data) and np.array_equal(a.source_image, b.source_image)
    for k in a.truth.colnames:
        nan_ok = a.truth[k].dtype.kind == "f"  # flux1000 is NaN for CTAO
        assert np.array_equal(np.asarray(a.truth[k]), np.asarray(b.truth[k]), equal_nan=nan_ok), k
    assert not np.array_equal(a.data, c.data)


def test_write_read_round_trip_keeps_truth(tmp_path, fermi_patch):
    path = write_patch(fermi_patch, tmp_path / "cube.fits")
    back = read_patch(path)
    assert np.array_equal(back.data, fermi_patch.data) and np.array_equal(back.source_image, fermi_patch.source_image)
    np.testing.assert_allclose(back.energy_edges_kev, fermi_patch.energy_edges_kev)
    t, r = fermi_patch.truth, back.truth
    assert r.colnames == t.colnames and len(r) == len(t)
    for name in t.colnames:
        assert r[name].unit == t[name].unit, name
        if t[name].dtype.kind in "fc":
            np.testing.assert_allclose(np.asarray(r[name]), np.asarray(t[name]), rtol=1e-12, err_msg=name)
        else:
            assert np.array_equal(np.asarray(r[name]), np.asarray(t[name])), name
    assert back.meta["seed"] == 11 and back.meta["population"] == "resampled"


# ----------------------------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------------------------
def test_the_two_galactic_models_differ_in_shape_and_spectrum():
    profiles, spectra = {}, {}
    for model in ("gas-disk", "ic-halo"):
        p = simulate_patch("fermi-lat", 3, center=(30.0, 0.0), size=128, population="real", galactic_model=model)
        background = (p.data - p.source_image).astype(np.float64)  # noisy, but averaged over many pixels
        profiles[model] = background[:3].sum(axis=(0, 2))  # latitude profile, 0.3-17 GeV
        spectra[model] = background.sum(axis=(1, 2))
    # Fraction of the emission within 1 deg of the plane, and hardness (above 4.5 GeV / below 1.2 GeV).
    ridge = {m: prof[54:74].sum() / prof.sum() for m, prof in profiles.items()}
    hardness = {m: s[2:].sum() / s[0] for m, s in spectra.items()}
    assert ridge["gas-disk"] > 1.2 * ridge["ic-halo"]
    assert hardness["ic-halo"] > 1.2 * hardness["gas-disk"]


def test_backgrounds_can_be_left_out_and_the_diffuse_model_is_checked():
    p = simulate_patch("fermi-lat", 2, size=64, center=(0.0, 40.0), include_background=False)
    assert p.meta["galactic_model"] == "none"
    with pytest.raises(SkyfmError, match="unknown galactic model 'gas'"):
        simulate_patch("fermi-lat", 2, size=64, galactic_model="gas")
    with pytest.raises(SkyfmError, match="no population 'plane'"):
        simulate_patch("fermi-lat", 2, size=64, population="plane")


# ----------------------------------------------------------------------------------------------------------------
# Populations
# ----------------------------------------------------------------------------------------------------------------
def test_real_population_puts_vela_in_its_pixel():
    p = simulate_patch("fermi-lat", 1, center=(263.55, -2.79), size=64, population="real")
    t = p.truth
    vela = t[t["name"] == "4FGL J0835.3-4510"]
    assert len(vela) == 1 and vela["is_real_4fgl"][0] and vela["class"][0] == "psr"
    x, y = p.wcs.world_to_pixel(SkyCoord(263.5537, -2.7877, unit="deg", frame="galactic"))
    assert abs(vela["x"][0] - x) < 0.01 and abs(vela["y"][0] - y) < 0.01
    assert vela["flux1000"][0] == pytest.approx(1.3517e-6, rel=0.01)
    peak_y, peak_x = np.unravel_index(np.argmax(p.data[2]), p.data.shape[1:])
    assert abs(peak_x - x) <= 1 and abs(peak_y - y) <= 1  # the brightest pixel of 4.5-17 GeV is Vela's
    assert "4FGL J0833.1-4511e" in set(t["name"])  # Vela X, extended


def test_shipped_catalog_spectra_reproduce_its_flux1000():
    cat = load_4fgl()
    ratio = cat.spectra.photon_flux(1e3, 1e5) / cat.flux1000
    assert np.percentile(np.abs(ratio - 1), 99) < 0.005
    assert len(cat.name) == 5788 and (cat.morphology != "point").sum() == 75


def test_spectral_integrals_are_exact():
    from scipy.integrate import quad

    cat = load_4fgl()
    for kind in range(3):
        i = int(np.nonzero(cat.spectra.kind == kind)[0][0])
        one = cat.spectra.subset([i])
        reference = quad(lambda e: one.dnde(np.array([e]))[0, 0], 1159.5, 4481.4, epsrel=1e-10)[0]
        assert one.band_fluxes(np.array([[1159.5, 4481.4]]))[0, 0] == pytest.approx(reference, rel=1e-7)


def test_resampled_population_reaches_below_the_catalog_threshold(fermi_patch):
    t = fermi_patch.truth
    high_latitude_catalog = load_4fgl().flux1000[np.abs(load_4fgl().glat) > 10]
    assert t["flux1000"].min() < np.percentile(high_latitude_catalog, 1)  # fainter than almost all of 4FGL
    assert 20 < (t["snr"] > 5).sum() < 0.5 * len(t)  # a 4FGL-like detectable set, and many more below it
    assert not t["is_real_4fgl"].any()


def test_ctao_plane_population_follows_the_survey_model():
    patches = [simulate_patch("ctao", seed) for seed in range(6)]
    t = [p.truth for p in patches]
    n = np.array([len(x) for x in t])
    # 4 sources per deg2 above 0.5 mCrab (0.2 above 10 mCrab, dN/dS ~ S^-2) over the 5.12 x 5 deg of survey.
    assert abs(n.mean() - 102.4) < 4 * np.sqrt(102.4 / len(n))
    glat = np.concatenate([np.asarray(x["glat"]) for x in t])
    glon = (np.concatenate([np.asarray(x["glon"]) for x in t]) + 180) % 360 - 180
    assert np.abs(glat).max() <= 2.5 and np.abs(glon).max() <= 30
    index = np.concatenate([np.asarray(x["index"]) for x in t])
    assert index.mean() == pytest.approx(2.2, abs=0.015) and index.std() == pytest.approx(0.05, rel=0.2)
    ext = np.concatenate([np.asarray(x["extension"]) for x in t])
    assert 0.4 < (ext > 0).mean() < 0.6 and ext.max() <= 1.0
    # Sources overlap: some pairs lie closer than the sum of their sizes.
    first = t[0]
    sep = SkyCoord(first["glon"], first["glat"], frame="galactic")
    i, j, d, _ = sep.search_around_sky(sep, 1.0 * u.deg)
    pairs = i < j
    size = np.asarray(first["extension"])
    assert (d.deg[pairs] < size[i[pairs]] + size[j[pairs]]).any()
    assert all(p.data.shape == (3, 256, 256) for p in patches)


def test_ctao_toy_patch_has_20_to_40_sources():
    for seed in range(3):
        p = simulate_patch("ctao", seed, population="toy")
        assert p.data.shape == (3, 512, 512)
        assert 20 <= len(p.truth) <= 40 and p.meta["n_rendered"] == len(p.truth)


# ----------------------------------------------------------------------------------------------------------------
# Shapes of extended sources
# ----------------------------------------------------------------------------------------------------------------
def test_extended_shapes_hold_their_flux_and_size():
    disk = disk_stamp(40.3, 40.6, 12.0)
    assert disk.image.sum() == pytest.approx(1.0)
    r68 = radial_containment(disk.image, 40.3 - disk.col0, 40.6 - disk.row0)
    assert r68 == pytest.approx(np.sqrt(0.68) * 12.0, rel=0.02)
    gauss = gaussian_stamp(10.2, 11.9, 3.0)
    r68 = radial_containment(gauss.image, 10.2 - gauss.col0, 11.9 - gauss.row0)
    assert r68 == pytest.approx(1.5096 * 3.0, rel=0.02)
    tpl = get_template("W44")
    stamp = template_stamp("W44", 50.0, 60.0, 0.02, scale=2.0, rotation_rad=0.7, anchor="centroid")
    yy, xx = np.indices(stamp.image.shape)
    assert stamp.image.sum() == pytest.approx(1.0)
    assert (stamp.image * (xx + stamp.col0)).sum() == pytest.approx(50.0, abs=0.01)
    assert (stamp.image * (yy + stamp.row0)).sum() == pytest.approx(60.0, abs=0.01)
    r68 = radial_containment(stamp.image, 50.0 - stamp.col0, 60.0 - stamp.row0)
    assert r68 * 0.02 == pytest.approx(2.0 * tpl.r68_centroid_deg, rel=0.1)


def test_galactic_to_icrs_matches_astropy():
    glon, glat = np.array([0.0, 263.55, 123.4, 359.9]), np.array([0.0, -2.79, 60.0, -89.0])
    ra, dec = galactic_to_icrs(glon, glat)
    ref = SkyCoord(glon, glat, unit="deg", frame="galactic").icrs
    assert np.abs(ra - ref.ra.deg).max() < 1e-9 and np.abs(dec - ref.dec.deg).max() < 1e-9


def test_spectrum_set_scaling():
    s = SpectrumSet.power_law(np.ones(2), np.array([2.0, 2.5]), 1e3).scaled_to_photon_flux(np.array([1e-8, 2e-8]), 1e3, 1e5)
    np.testing.assert_allclose(s.photon_flux(1e3, 1e5), [1e-8, 2e-8])
