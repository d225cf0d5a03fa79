"""The optical / infrared CCD simulator: photometry, PSF, noise, WCS, contaminants, scenes and the file round trip."""

import dataclasses

import astropy.units as u
import numpy as np
import pytest
from astropy.modeling import fitting, models
from astropy.table import Table
from photutils.aperture import CircularAperture, aperture_photometry

from skyfm.data import CONTAMINANT_BITS, read_patch, write_patch
from skyfm.data.simulate import simulate_patch
from skyfm.data.simulate.ccd import Scene, simulate_ccd_patch
from skyfm.data.simulate.contaminants import bleed_saturated
from skyfm.data.simulate.galaxies import GalaxyRenderer, sersic_enclosed, truncation_radius
from skyfm.data.simulate.stars import NumberCounts
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument
from skyfm.instruments.psf import PSF

# A sky with nothing in it but what a test injects.
BLANK = Scene("blank", NumberCounts(anchor_mag=20.0, anchor_density=0.0, slopes=(0.3,)), galaxy_scale=0.0)


def _grid_of_stars(n_side, size, mag):
    """Well-separated stars on a grid, at sub-pixel positions that differ from star to star."""
    step = size / n_side
    centres = (np.arange(n_side) + 0.5) * step
    x, y = np.meshgrid(centres, centres)
    frac = np.linspace(0.0, 0.9, x.size)
    return Table({"x": x.ravel() + frac, "y": y.ravel() + frac[::-1], "mag": np.full(x.size, mag)})


def test_aperture_flux_of_isolated_stars_matches_truth_within_the_noise():
    inst = load_instrument("meerlicht")
    stars = _grid_of_stars(4, 256, 16.5)
    patch = simulate_ccd_patch(inst, 11, scene=BLANK, bands=["q"], contaminants=False, inject=stars, seeing=2.5)
    truth = patch.truth
    assert len(truth) == 16 and set(truth["class"]) == {"star"}
    setup_gain = inst.noise["gain"]
    sky = patch.meta["sky_q"]  # ADU per pixel
    radius = 3.0 * 2.5 / 0.56  # three FWHM, pixels
    apertures = CircularAperture(np.c_[truth["x"], truth["y"]], r=radius)
    measured = np.asarray(aperture_photometry(patch.data[0] - sky, apertures)["aperture_sum"])
    model = np.asarray(aperture_photometry(patch.source_image[0], apertures)["aperture_sum"])
    # The expected image holds each star's whole flux; the aperture catches the Moffat's analytic share of it.
    psf = PSF.moffat(beta=3.5, fwhm_deg=2.5 / 3600)
    flux = np.asarray(truth["flux"])
    np.testing.assert_allclose(model / flux, psf.containment(radius * 0.56 / 3600), rtol=0.01)
    # Data minus sky scatter about the truth as Poisson + read noise say: pulls have mean 0 and unit width.
    area = apertures.area
    sigma = np.sqrt((model * setup_gain + area * (sky * setup_gain + inst.noise["read_noise"] ** 2))) / setup_gain
    pulls = (measured - model) / sigma
    assert abs(pulls.mean()) < 0.8 and 0.6 < pulls.std() < 1.5, pulls
    # Magnitudes and ADU agree through the zero point in the header.
    np.testing.assert_allclose(truth["mag"][:, 0], 16.5)
    np.testing.assert_allclose(-2.5 * np.log10(flux) + patch.meta["zp_q"], 16.5, atol=1e-9)


def test_source_image_conserves_flux_and_sources_outside_spill_light_in():
    inject = Table({"x": [100.2, -4.0], "y": [80.7, 50.0], "mag": [17.0, 15.0]})
    patch = simulate_ccd_patch("wise", 3, scene=BLANK, bands=["W1"], contaminants=False, inject=inject)
    assert len(patch.truth) == 1  # the star centred off the image is not in the truth ...
    assert patch.source_image[0, 45:56, 0].min() > 0  # ... but its light is
    box = patch.source_image[0, 40:122, 60:142].sum()
    np.testing.assert_allclose(box, patch.truth["flux"][0], rtol=1e-4)


@pytest.mark.parametrize("name, band, seeing", [("meerlicht", "q", 2.2), ("hubble", "F606W", None),
                                                ("wise", "W4", None)])
def test_measured_psf_fwhm_matches_the_seeing(name, band, seeing):
    inst = load_instrument(name)
    scale = inst.pixel_scale_deg * 3600
    inject = Table({"x": [63.3], "y": [64.6], "mag": [15.0 if name != "wise" else 9.0]})
    patch = simulate_ccd_patch(inst, 5, scene=BLANK, bands=[band], size=128, contaminants=False, inject=inject,
                               seeing=seeing)
    expected_pix = patch.meta[f"seeing_{band}"] / scale
    if seeing is not None:
        assert patch.meta[f"seeing_{band}"] == pytest.approx(seeing)
    else:
        assert expected_pix == pytest.approx(inst.band(band).psf.fwhm_deg * 3600 / scale)
    half = int(np.ceil(3 * expected_pix))
    y0, x0 = 64, 63
    cut = patch.data[0, y0 - half : y0 + half + 1, x0 - half : x0 + half + 1] - patch.meta[f"sky_{band}"]
    yy, xx = np.mgrid[y0 - half : y0 + half + 1, x0 - half : x0 + half + 1]
    start = models.Moffat2D(amplitude=cut.max(), x_0=63.3, y_0=64.6, gamma=expected_pix, alpha=3.0)
    fit = fitting.TRFLSQFitter()(start, xx, yy, cut)
    assert abs(fit.x_0.value - 63.3) < 0.05 and abs(fit.y_0.value - 64.6) < 0.05
    assert fit.fwhm == pytest.approx(expected_pix, rel=0.10)


def test_psf_beta_sets_the_wings_and_keeps_the_fwhm():
    inject = Table({"x": [64.0], "y": [64.0], "mag": [14.0]})
    images = {}
    for beta in (2.0, 5.0):
        patch = simulate_ccd_patch("meerlicht", 5, scene=BLANK, bands=["q"], size=128, contaminants=False,
                                   inject=inject, seeing=2.5, psf_beta=beta)
        assert patch.meta["psf_beta"] == beta
        images[beta] = patch.source_image[0] / patch.truth["flux"][0]
    r = np.hypot(*(np.mgrid[:128, :128] - 64.0))
    fwhm_pix = 2.5 / 0.56
    for beta, img in images.items():  # half the peak at half the FWHM, whatever the wings
        assert img[r <= 0.5].mean() / 2 == pytest.approx(img[np.abs(r - fwhm_pix / 2) < 0.3].mean(), rel=0.1)
    wing = r > 3 * fwhm_pix  # beta 2 holds several times more light beyond 3 FWHM than beta 5
    assert images[2.0][wing].sum() > 5 * images[5.0][wing].sum()
    with pytest.raises(SkyfmError, match="beta > 1"):
        simulate_ccd_patch("meerlicht", 5, scene=BLANK, bands=["q"], size=32, psf_beta=1.0)


def test_a_finetune_scene_draws_seeing_and_psf_beta_from_ranges():
    from skyfm.finetune.data import _scene_options

    rng = np.random.default_rng(0)
    drawn = [_scene_options("meerlicht", {"weight": 1, "scene": "crowded", "seeing": [1.6, 6.0],
                                          "psf_beta": [2.0, 5.0]}, rng, 64) for _ in range(50)]
    seeing = np.array([d["seeing"] for d in drawn])
    beta = np.array([d["psf_beta"] for d in drawn])
    assert 1.6 <= seeing.min() and seeing.max() <= 6.0 and seeing.std() > 0.8
    assert 2.0 <= beta.min() and beta.max() <= 5.0 and beta.std() > 0.5
    assert _scene_options("meerlicht", {"scene": "field", "seeing": 2.2}, rng, 64)["seeing"] == 2.2


@pytest.mark.parametrize("name, band", [("meerlicht", "u"), ("meerlicht", "z"), ("hubble", "F814W"), ("wise", "W3")])
def test_noise_in_an_empty_region_is_poisson_sky_plus_read_noise(name, band):
    inst = load_instrument(name)
    b = inst.band(band)
    patch = simulate_ccd_patch(inst, 21, scene=BLANK, bands=[band], contaminants=False)
    gain, read_noise = inst.noise["gain"], inst.noise["read_noise"]
    # The sky from the YAML: AB mag per arcsec^2 through the zero point (1 e-/s), exposure and pixel area.
    sky_e = 10 ** (-0.4 * (b.sky - b.zeropoint)) * b.exposure_time * (inst.pixel_scale_deg * 3600) ** 2
    assert patch.meta[f"sky_{band}"] == pytest.approx(sky_e / gain, rel=1e-9)
    data = patch.data[0].astype(np.float64)
    n = data.size
    expected_sigma = np.sqrt(sky_e + read_noise**2) / gain
    assert abs(data.mean() - sky_e / gain) < 5 * expected_sigma / np.sqrt(n)
    assert data.std() == pytest.approx(expected_sigma, rel=0.02)
    assert patch.source_image.max() == 0 and not patch.contaminant_mask.any()


def test_wcs_round_trips_truth_positions_and_is_centred_on_the_requested_sky():
    patch = simulate_patch("hubble", 4, scene="field", center=(150.1, 2.2))
    truth = patch.truth
    assert len(truth) > 5
    x, y = patch.wcs.world_to_pixel_values(truth["ra"], truth["dec"])
    assert np.max(np.abs(x - truth["x"])) < 0.01 and np.max(np.abs(y - truth["y"])) < 0.01
    ra, dec = patch.wcs.pixel_to_world_values((patch.width - 1) / 2, (patch.height - 1) / 2)
    assert ra == pytest.approx(150.1, abs=1e-9) and dec == pytest.approx(2.2, abs=1e-9)
    assert truth["ra"].unit == u.deg and truth["x"].unit == u.pix
    # North up, east left, at the YAML's pixel scale.
    ra1, dec1 = patch.wcs.pixel_to_world_values((patch.width - 1) / 2, (patch.height - 1) / 2 + 1)
    assert (dec1 - dec) * 3600 == pytest.approx(0.05, rel=1e-4)
    ra2, _ = patch.wcs.pixel_to_world_values((patch.width - 1) / 2 + 1, (patch.height - 1) / 2)
    assert ra2 < ra


def test_a_fixed_seed_gives_identical_patches():
    a = simulate_patch("meerlicht", 7, scene="crowded", size=96)
    b = simulate_patch("meerlicht", 7, scene="crowded", size=96)
    c = simulate_patch("meerlicht", 8, scene="crowded", size=96)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.source_image, b.source_image)
    np.testing.assert_array_equal(a.contaminant_mask, b.contaminant_mask)
    for col in a.truth.colnames:
        np.testing.assert_array_equal(a.truth[col], b.truth[col])
    assert a.meta == b.meta and a.bands == b.bands
    assert not np.array_equal(a.data, c.data)


def test_cosmic_rays_are_masked_sharp_and_absent_from_the_source_image():
    clean = simulate_patch("hubble", 9, scene="field", contaminants=False)
    dirty = simulate_patch("hubble", 9, scene="field")
    np.testing.assert_array_equal(clean.source_image, dirty.source_image)  # contaminants never reach it
    assert clean.truth["flux"].tolist() == dirty.truth["flux"].tolist()
    cr = (dirty.contaminant_mask & CONTAMINANT_BITS["cosmic_ray"]) > 0
    # 2500 events per megapixel: about 160 per 256 x 256 band, each a few pixels.
    assert 400 < cr.sum() < 10000
    for c in range(dirty.n_bands):
        assert 90 < dirty.meta[f"ncr_{dirty.bands[c]}"] < 250
    setup_sigma = np.sqrt(dirty.meta["sky_F606W"] * 2.0 + 4.0**2) / 2.0
    excess = dirty.data[1] - dirty.source_image[1] - dirty.meta["sky_F606W"]
    assert np.median(excess[cr[1]]) > 3 * setup_sigma
    # Sharp, not PSF-smoothed: a cosmic ray's brightest pixel stands far above its neighbours.
    peak = np.unravel_index(np.argmax(np.where(cr[1], excess, -np.inf)), excess.shape)
    ring = excess[peak[0] - 2 : peak[0] + 3, peak[1] - 2 : peak[1] + 3]
    assert excess[peak] > 4 * np.median(ring)


def test_satellite_trails_are_long_lines_in_the_mask_only():
    base = load_instrument("meerlicht")
    inst = dataclasses.replace(base, contaminants={**base.contaminants, "satellite_trail_probability": 1.0,
                                                   "cosmic_rays_per_mpix": 0})
    patch = simulate_ccd_patch(inst, 2, scene="empty", bands=["r"])
    trail = (patch.contaminant_mask[0] & CONTAMINANT_BITS["satellite_trail"]) > 0
    assert patch.meta["trail_r"] is True
    rows, cols = np.nonzero(trail)
    # It runs from one edge of the image to another (through the image, not ending in it).
    edges = {"bottom": rows.min() == 0, "top": rows.max() == 255, "left": cols.min() == 0, "right": cols.max() == 255}
    assert sum(edges.values()) >= 2, edges
    # The marked pixels lie along one straight line (small scatter about a fitted line).
    if np.ptp(cols) >= np.ptp(rows):
        resid = rows - np.polyval(np.polyfit(cols, rows, 1), cols)
    else:
        resid = cols - np.polyval(np.polyfit(rows, cols, 1), rows)
    assert np.std(resid) < 3 * patch.meta["seeing_r"] / 0.56
    clean = simulate_ccd_patch(inst, 2, scene="empty", bands=["r"], contaminants=False)
    np.testing.assert_array_equal(clean.source_image, patch.source_image)


def test_saturated_stars_bleed_along_columns_and_are_flagged():
    base = load_instrument("meerlicht")
    inst = dataclasses.replace(base, contaminants={**base.contaminants, "bright_star_probability": 1.0})
    patch = simulate_ccd_patch(inst, 3, scene="field", bands=["q"])
    mask = patch.contaminant_mask[0]
    saturated = (mask & CONTAMINANT_BITS["saturated"]) > 0
    bleed = (mask & CONTAMINANT_BITS["bleed_trail"]) > 0
    assert saturated.any() and bleed.any()
    assert set(np.nonzero(bleed)[1]) <= set(np.nonzero(saturated)[1])  # bleeding stays in its columns
    assert np.all(patch.data[0][saturated] == inst.noise["saturation"])
    assert patch.truth["saturated"].sum() >= 1
    assert patch.truth["saturated"].dtype == bool


def test_bleeding_conserves_charge():
    column = np.full((50, 3), 100.0)
    column[20:23, 1] = [3000.0, 9000.0, 2500.0]
    total = column.sum()
    mask = np.zeros(column.shape, np.uint8)
    full = bleed_saturated(column, 1000.0, mask)
    assert column.sum() == pytest.approx(total)
    assert column.max() <= 1000.0 and full[:, 1].sum() >= 14
    assert not mask[:, [0, 2]].any()


def test_hot_and_dead_pixels_are_flagged():
    base = load_instrument("hubble")
    inst = dataclasses.replace(base, contaminants={**base.contaminants, "hot_pixel_fraction": 0.01,
                                                   "bad_pixel_fraction": 0.01, "bad_columns_per_mpix": 50})
    patch = simulate_ccd_patch(inst, 6, scene="empty", bands=["F814W"], size=128)
    mask = patch.contaminant_mask[0]
    hot = (mask & CONTAMINANT_BITS["hot_pixel"]) > 0
    dead = (mask & CONTAMINANT_BITS["bad_pixel"]) > 0
    assert 80 < hot.sum() < 250 and dead.sum() > 100
    assert np.all(patch.data[0][dead] == 0)
    sky = patch.meta["sky_F814W"]
    assert np.median(patch.data[0][hot & ~dead]) > sky + 3 * np.sqrt(sky * 2 + 16) / 2


def test_a_cluster_is_denser_than_a_field_and_concentrated():
    counts = {}
    for scene in ("field", "cluster"):
        counts[scene] = [len(simulate_patch("meerlicht", s, scene=scene, bands=["q"], size=128).truth)
                         for s in (1, 2, 3)]
    assert min(counts["cluster"]) > 3 * max(counts["field"])
    patch = simulate_patch("meerlicht", 1, scene="cluster", bands=["q"], size=128)
    r = np.hypot(patch.truth["x"] - patch.meta["cl_x"], patch.truth["y"] - patch.meta["cl_y"])
    rc = patch.meta["cl_rc"] / 0.56
    inner = np.sum(r < rc) / (np.pi * rc**2)
    outer = np.sum(r > 2 * rc) / (128**2 - np.pi * 4 * rc**2)
    assert inner > 2 * outer


@pytest.mark.parametrize("name, n_bands", [("meerlicht", 1), ("hubble", 3), ("wise", 4)])
def test_every_ccd_instrument_simulates(name, n_bands):
    patch = simulate_patch(name, 12, size=128)
    assert patch.shape == (n_bands, 128, 128) and patch.data.dtype == np.float32
    assert patch.source_image.shape == patch.shape and patch.contaminant_mask.dtype == np.uint8
    assert np.isfinite(patch.data).all() and patch.source_image.min() >= 0
    t = patch.truth
    for col in ("x", "y", "ra", "dec", "flux", "flux_band", "mag", "class", "extension", "sersic_n", "axis_ratio",
                "position_angle", "snr", "saturated"):
        assert col in t.colnames, col
    assert t["flux_band"].shape == (len(t), n_bands) and t["mag"].shape == (len(t), n_bands)
    np.testing.assert_allclose(t["flux"], np.sum(t["flux_band"], axis=1), rtol=1e-12)
    assert set(t["class"]) <= {"star", "galaxy"} and t["extension"].unit == u.deg
    assert np.all(t["extension"][t["class"] == "star"] == 0)
    galaxies = t["class"] == "galaxy"
    assert np.all((t["sersic_n"][galaxies] >= 0.5) & (t["sersic_n"][galaxies] <= 4))
    assert np.all((t["x"] >= -0.5) & (t["x"] < 127.5) & (t["y"] >= -0.5) & (t["y"] < 127.5))
    assert patch.meta["scene"] in ("empty", "field", "crowded", "cluster")


def test_meerlicht_draws_one_band_per_image_from_the_yaml():
    bands = {simulate_patch("meerlicht", s, size=32, scene="empty").bands[0] for s in range(40)}
    assert len(bands) >= 4 and bands <= {"u", "g", "q", "r", "i", "z"}
    assert simulate_patch("meerlicht", 1, size=32, bands=["g", "r"]).bands == ["g", "r"]


def test_snr_follows_the_noise_equivalent_area():
    inst = load_instrument("meerlicht")
    inject = Table({"x": [40.0], "y": [40.0], "mag": [20.0]})
    patch = simulate_ccd_patch(inst, 2, scene=BLANK, bands=["q"], size=80, contaminants=False, inject=inject,
                               seeing=2.5)
    stamp = patch.source_image[0] / patch.source_image[0].sum()
    n_eff = 1.0 / np.sum(stamp**2)
    flux_e = patch.truth["flux"][0] * inst.noise["gain"]
    background = patch.meta["sky_q"] * inst.noise["gain"] + inst.noise["read_noise"] ** 2
    assert patch.truth["snr"][0] == pytest.approx(flux_e / np.sqrt(flux_e + n_eff * background), rel=0.01)


def test_write_read_round_trip_keeps_truth_and_mask(tmp_path):
    patch = simulate_patch("wise", 5, scene="field", size=64)
    back = read_patch(write_patch(patch, tmp_path / "wise.fits"))
    np.testing.assert_array_equal(back.data, patch.data)
    np.testing.assert_array_equal(back.contaminant_mask, patch.contaminant_mask)
    np.testing.assert_array_equal(back.source_image, patch.source_image)
    assert back.bands == patch.bands and len(back.truth) == len(patch.truth)
    for col in patch.truth.colnames:
        np.testing.assert_array_equal(back.truth[col], patch.truth[col])
        assert back.truth[col].unit == patch.truth[col].unit, col
    assert back.meta["seeing_w1"] == pytest.approx(patch.meta["seeing_W1"])


def test_sersic_galaxies_keep_flux_centroid_and_half_light_radius():
    scale = 0.05 / 3600
    psf = PSF.gaussian(fwhm_deg=0.3 * scale)  # nearly no blur
    for n in (1.0, 4.0):
        g = GalaxyRenderer([60.3], [58.7], [6.0], [n], [1.0], [0.0], (120, 120), pad=8, fine=2)
        img = g.image(np.array([1000.0]), psf, scale)
        yy, xx = np.mgrid[:120, :120]
        assert img.sum() == pytest.approx(1000.0, rel=1e-9)
        assert (img * xx).sum() / 1000 == pytest.approx(60.3, abs=0.01)
        assert (img * yy).sum() / 1000 == pytest.approx(58.7, abs=0.01)
        inner = CircularAperture([(60.3, 58.7)], r=6.0)
        half = aperture_photometry(img, inner)["aperture_sum"][0] / 1000
        expected = sersic_enclosed(n, 1.0) / sersic_enclosed(n, truncation_radius(n))
        assert half == pytest.approx(expected, rel=0.02)
    # Position angle east of north: PA = 0 puts the major axis along +y (north).
    g = GalaxyRenderer([60.0], [60.0], [6.0], [1.0], [0.3], [0.0], (120, 120), pad=8, fine=1)
    img = g.image(np.array([1.0]), psf, scale)
    assert img[60, 50:71].sum() < img[50:71, 60].sum()


def test_number_counts_follow_their_slopes():
    counts = NumberCounts(anchor_mag=20.0, anchor_density=1.0, slopes=(0.4, 0.2), breaks=(22.0,))
    assert counts.density(counts.bright_mag, 20.0) == pytest.approx(1.0)
    edges = np.arange(16.0, 26.01, 1.0)
    per_bin = np.array([counts.density(lo, lo + 1.0) for lo in edges[:-1]])
    slopes = np.diff(np.log10(per_bin))
    np.testing.assert_allclose(slopes[:5], 0.4, atol=1e-9)  # whole bins on either side of the break
    np.testing.assert_allclose(slopes[-3:], 0.2, atol=1e-9)
    n = 500_000
    hist, _ = np.histogram(counts.sample(np.random.default_rng(0), n, 16.0, 26.0), bins=edges)
    expected = n * per_bin / per_bin.sum()
    assert np.all(np.abs(hist - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize("options, words", [
    ({"scene": "nebula"}, "unknown scene 'nebula'"),
    ({"bands": ["Ks"]}, "has no band 'Ks'"),
    ({"seeing": -1.0}, "positive FWHM"),
    ({"size": 4}, "patch size"),
    ({"center": (10.0, 95.0)}, "-90 <= dec <= 90"),
])
def test_bad_options_are_one_line_errors(options, words):
    with pytest.raises(SkyfmError, match=words):
        simulate_patch("meerlicht", 1, **options)


def test_bad_yaml_rates_name_the_key():
    base = load_instrument("wise")
    inst = dataclasses.replace(base, contaminants={"cosmic_rays_per_hour": 3})
    with pytest.raises(SkyfmError, match="contaminants.cosmic_rays_per_hour"):
        simulate_ccd_patch(inst, 1)
    inst = dataclasses.replace(base, simulation={"bands_per_image": 7})
    with pytest.raises(SkyfmError, match="simulation.bands_per_image"):
        simulate_ccd_patch(inst, 1)
    with pytest.raises(SkyfmError, match="ccd instrument"):
        simulate_ccd_patch("fermi-lat", 1)
