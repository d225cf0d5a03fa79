"""Instruments as data: the shipped YAMLs, PSF physics, validation errors and scaling."""

import numpy as np
import pytest
import yaml
from scipy import integrate

from skyfm.errors import SkyfmError
from skyfm.instruments import PSF, list_instruments, load_instrument, scale_image, unscale_image


def test_the_five_mission_instruments_ship():
    assert set(list_instruments()) >= {"fermi-lat", "ctao", "meerlicht", "hubble", "wise"}


def test_fermi_bins_are_six_log_bins_from_0p3_gev_to_1_tev():
    inst = load_instrument("fermi-lat")
    edges = [b.energy[0].to_value("GeV") for b in inst.bands] + [inst.bands[-1].energy[1].to_value("GeV")]
    assert len(inst.bands) == 6
    np.testing.assert_allclose(edges, np.geomspace(0.3, 1000, 7), rtol=1e-4)
    assert inst.pixel_scale_deg <= 0.1
    r68 = [b.psf.containment_radius(0.68) for b in inst.bands]
    assert r68[0] == pytest.approx(0.8, rel=0.01)
    assert all(a >= b for a, b in zip(r68, r68[1:]))  # the PSF narrows with energy
    assert all(r == pytest.approx(0.1, rel=0.05) for r, b in zip(r68, inst.bands) if b.energy[0].to_value("GeV") > 7)


def test_ctao_wise_hubble_meerlicht_numbers():
    ctao = load_instrument("ctao")
    edges = [b.energy[0].to_value("TeV") for b in ctao.bands] + [ctao.bands[-1].energy[1].to_value("TeV")]
    np.testing.assert_allclose(edges, [0.07, 0.788, 8.88, 100])
    assert ctao.pixel_scale_deg == pytest.approx(0.02)
    wise = load_instrument("wise")
    fwhm = [b.psf.fwhm_deg * 3600 for b in wise.bands]
    np.testing.assert_allclose(fwhm, [6.1, 6.4, 6.5, 12.0], rtol=1e-6)
    assert wise.pixel_scale.to_value("arcsec") == pytest.approx(1.375)
    assert load_instrument("hubble").band("F606W").psf.fwhm_deg * 3600 == pytest.approx(0.11)
    ml = load_instrument("meerlicht")
    assert ml.pixel_scale.to_value("arcsec") == pytest.approx(0.56)
    lo, hi = ml.band("q").fwhm_range_deg()
    assert (lo * 3600, hi * 3600) == pytest.approx((2.0, 3.0))


def test_aliases_and_case():
    assert load_instrument("FERMI").name == "fermi-lat"
    assert load_instrument("hst").name == "hubble"
    assert load_instrument("wise").band("w1").name == "W1"


@pytest.mark.parametrize("psf", [PSF.gaussian(fwhm_deg=0.01), PSF.moffat(beta=2.5, fwhm_deg=0.01), PSF.king(gamma=2.2, r68_deg=0.8)])
def test_psf_profile_is_normalised_and_containment_is_its_integral(psf):
    r68 = psf.containment_radius(0.68)
    inside, _ = integrate.quad(lambda r: 2 * np.pi * r * psf.profile(r), 0, r68)
    assert inside == pytest.approx(0.68, abs=1e-6)
    total, _ = integrate.quad(lambda r: 2 * np.pi * r * psf.profile(r), 0, np.inf)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_king_from_irf_sigma_matches_the_lat_formula():
    sigma, gamma = 0.1, 2.5
    psf = PSF.king(gamma=gamma, sigma_deg=sigma)
    r = np.linspace(0, 1, 50)
    u = r**2 / (2 * sigma**2)
    king = (1 - 1 / gamma) / (2 * np.pi * sigma**2) * (1 + u / gamma) ** -gamma
    np.testing.assert_allclose(psf.profile(r), king, rtol=1e-10)


@pytest.mark.parametrize("name", ["fermi-lat", "ctao", "meerlicht", "hubble", "wise"])
def test_rendered_stamp_containment_matches_yaml(name):
    """A pixel-integrated stamp, measured like a person would, has the YAML's 68% radius (within a pixel's blur)."""
    inst = load_instrument(name)
    for band in inst.bands:
        psf = band.psf
        # Render at a fine pixel scale so that the measurement resolves the profile.
        pix = psf.fwhm_deg / 8
        stamp = psf.stamps(np.array([0.0]), np.array([0.0]), pix, radius_pix=int(psf.containment_radius(0.99) / pix) + 2)[0]
        r = int(stamp.shape[0] // 2)
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        rad = np.hypot(xx, yy).ravel() * pix
        order = np.argsort(rad)
        enclosed = np.cumsum(stamp.ravel()[order])
        measured = rad[order][np.searchsorted(enclosed, 0.68)]
        spec = band.psf_spec
        if "r68" in spec:
            expected = float(__import__("astropy.units", fromlist=["Quantity"]).Quantity(spec["r68"]).to_value("deg"))
            assert measured == pytest.approx(expected, rel=0.03), band.name
        else:
            assert measured == pytest.approx(psf.containment_radius(0.68), rel=0.03), band.name
            assert psf.fwhm_deg == pytest.approx(np.mean(band.fwhm_range_deg()), rel=1e-6)


def test_stamps_keep_flux_and_centroid():
    psf = PSF.moffat(beta=3.0, fwhm_deg=3.0)
    stamps = psf.stamps(np.array([0.3, -0.2]), np.array([-0.4, 0.1]), 1.0, radius_pix=30)
    r = 30
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    for s, (dx, dy) in zip(stamps, [(0.3, -0.4), (-0.2, 0.1)]):
        assert s.sum() == pytest.approx(psf.containment(30.0), abs=0.01)
        assert (s * xx).sum() / s.sum() == pytest.approx(dx, abs=0.01)
        assert (s * yy).sum() / s.sum() == pytest.approx(dy, abs=0.01)


def _write_yaml(tmp_path, raw, name="scope.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


NEW_TELESCOPE = {
    "name": "my-scope",
    "kind": "ccd",
    "pixel_scale": "0.3 arcsec",
    "patch_size": 128,
    "bands": [{"name": "V", "wavelength": ["500 nm", "600 nm"], "psf": {"model": "gaussian", "fwhm": "1.2 arcsec"},
               "zeropoint": 25.0, "sky": 21.0, "exposure_time": "120 s"}],
    "noise": {"model": "ccd", "gain": 1.5, "read_noise": 4, "saturation": 50000},
}


def test_a_new_telescope_is_a_yaml_file(tmp_path):
    inst = load_instrument(_write_yaml(tmp_path, NEW_TELESCOPE))
    assert inst.name == "my-scope" and inst.patch_size == (128, 128)
    assert inst.psf_fwhm_pix(0) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r.pop("kind"), "'kind' is missing"),
        (lambda r: r.update(kind="radio"), "'kind' should be one of"),
        (lambda r: r.update(pixel_scale="0.3"), "'pixel_scale' should be a angle"),
        (lambda r: r.update(pixel_scale="0.3 kg"), "'pixel_scale' should be a angle"),
        (lambda r: r.update(bands=[]), "'bands' should be a non-empty list"),
        (lambda r: r["bands"][0]["psf"].update(model="airy"), "'bands[0].psf.model' should be one of"),
        (lambda r: r["bands"][0]["psf"].pop("fwhm"), "needs exactly one of 'fwhm' or 'r68'"),
        (lambda r: r["bands"][0].update(wavelength=["600 nm", "500 nm"]), "low < high"),
        (lambda r: r["bands"].append(dict(r["bands"][0])), "two bands with the same name"),
        (lambda r: r["noise"].pop("gain"), "'noise.gain' is missing"),
        (lambda r: r.update(patch_size=3), "'patch_size' should be an integer >= 8"),
    ],
)
def test_bad_yaml_names_the_file_and_key(tmp_path, change, words):
    import copy

    raw = copy.deepcopy(NEW_TELESCOPE)
    change(raw)
    path = _write_yaml(tmp_path, raw)
    with pytest.raises(SkyfmError) as err:
        load_instrument(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_unparsable_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbands: [\n")
    with pytest.raises(SkyfmError, match="not valid YAML"):
        load_instrument(path)
    with pytest.raises(SkyfmError, match="not found"):
        load_instrument(tmp_path / "absent.yaml")
    with pytest.raises(SkyfmError, match="unknown instrument 'jwst'"):
        load_instrument("jwst")


def test_scaling_round_trips_and_normalises_noise(rng):
    counts = rng.poisson(3.0, size=(2, 64, 64)).astype(np.float32)
    for method in ("log1p", "anscombe"):
        scaled, params = scale_image(counts, method)
        np.testing.assert_allclose(unscale_image(scaled, params), counts, atol=1e-4)
    sky = 1000 + rng.normal(0, 20, size=(1, 128, 128)).astype(np.float32)
    scaled, params = scale_image(sky, "asinh")
    assert params["sky"][0] == pytest.approx(1000, abs=1.5)
    assert params["sigma"][0] == pytest.approx(20, rel=0.05)
    assert np.std(scaled) == pytest.approx(0.80, abs=0.03)  # asinh(N(0, 1)) has std 0.80
    np.testing.assert_allclose(unscale_image(scaled, params), sky, rtol=1e-5)
    anscombe, _ = scale_image(rng.poisson(20.0, size=(1, 128, 128)), "anscombe")
    assert np.std(anscombe) == pytest.approx(1.0, abs=0.05)


def test_counts_asinh_scaling_is_background_normalised_and_inverts():
    """counts-asinh: each bin's background (a clipped mean, not the median of sparse counts) maps to 0 and its
    Poisson sigma to about one unit, whatever the background level; stored as asinh parameters, so that
    unscale_image and the shards' torch scaling are the same functions."""
    import numpy as np

    from skyfm.data.shards import apply_scaling
    from skyfm.instruments.scaling import poisson_background, scale_image, unscale_image

    rng = np.random.default_rng(0)
    for level in (0.05, 3.0, 80.0):
        image = rng.poisson(level, (2, 64, 64)).astype(np.float32)
        image[:, 30:33, 30:33] += 500.0  # a bright source must not raise the background
        scaled, params = scale_image(image, "counts-asinh")
        assert params["method"] == "asinh" and params["estimator"] == "poisson"
        assert abs(poisson_background(image[0]) - level) < 0.1 * level + 0.02
        assert abs(float(np.median(scaled[0][image[0] < 400]))) < 0.5
        np.testing.assert_allclose(unscale_image(scaled, params), image, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(apply_scaling(image, params).numpy(), scaled, rtol=1e-5, atol=1e-5)


def test_counts_asinh_mesh_follows_a_background_gradient_and_inverts():
    """counts-asinh-mesh: the background follows a ridge across the image (a per-bin number cannot), so the
    scaled background sits near 0 on and off the ridge; the same function in numpy and torch; exact inverse."""
    import numpy as np

    from skyfm.data.shards import apply_scaling
    from skyfm.instruments.scaling import scale_image, sky_sigma_maps, unscale_image

    rng = np.random.default_rng(1)
    yy = np.arange(64)[:, None] * np.ones((1, 64))
    level = 2.0 + 40.0 * np.exp(-0.5 * ((yy - 32) / 8.0) ** 2)
    image = rng.poisson(level, (1, 64, 64)).astype(np.float32)
    scaled, params = scale_image(image, "counts-asinh-mesh")
    assert params["method"] == "asinh" and params["estimator"] == "poisson-mesh"
    sky, sigma = sky_sigma_maps(params, image.shape)
    assert sky.shape == (1, 64, 64) and abs(float(sky[0, 32, 32]) - 42.0) < 8 and abs(float(sky[0, 2, 2]) - 2.0) < 1
    for rows in (slice(28, 36), slice(0, 8)):  # on the ridge and off it: the scaled background is near 0
        assert abs(float(np.median(scaled[0, rows]))) < 1.0  # (an 8-px mesh cuts a sigma = 8 px ridge ~10% low)
    flat, _ = scale_image(image, "counts-asinh")  # one number per bin: the ridge stands out by many sigma
    assert float(np.median(flat[0, 28:36])) > 2.0
    np.testing.assert_allclose(unscale_image(scaled, params), image, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(apply_scaling(image, params).numpy(), scaled, rtol=1e-5, atol=1e-5)


def test_counts_asinh_model_takes_the_background_from_its_model():
    """counts-asinh-model: the given background model (its 4-px box means) is the sky, whatever the counts say: a
    source on a ridge keeps its excess; no model, or one of another shape, is a clear error; shards carry a
    simulated patch's background_image into the parameters; exact inverse, numpy and torch alike."""
    import numpy as np
    import pytest

    from skyfm.data.shards import apply_scaling, encode_patch
    from skyfm.data.simulate import simulate_patch
    from skyfm.errors import SkyfmError
    from skyfm.instruments import load_instrument
    from skyfm.instruments.scaling import box_means, scale_image, sky_sigma_maps, unscale_image

    rng = np.random.default_rng(2)
    yy = np.arange(62)[:, None] * np.ones((1, 62))  # 62 px: the last boxes are partial
    model = np.stack([2.0 + 40.0 * np.exp(-0.5 * ((yy - 31) / 8.0) ** 2)])
    image = rng.poisson(model).astype(np.float32)
    image[0, 30:33, 40:43] += 300.0  # a source on the ridge
    scaled, params = scale_image(image, "counts-asinh-model", background=model)
    mesh = box_means(model[0])
    assert mesh.shape == (16, 16) and mesh[0, 0] == pytest.approx(model[0, :4, :4].mean())
    assert mesh[-1, -1] == pytest.approx(model[0, 60:, 60:].mean())
    sky, _ = sky_sigma_maps(params, image.shape)
    assert abs(float(sky[0, 31, 10]) - 42.0) < 2 and abs(float(sky[0, 1, 10]) - 2.0) < 1
    assert abs(float(np.median(scaled[0, 26:36, :30]))) < 0.3 and float(scaled[0, 31, 41]) > 3.0
    np.testing.assert_allclose(unscale_image(scaled, params), image, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(apply_scaling(image, params).numpy(), scaled, rtol=1e-5, atol=1e-5)
    with pytest.raises(SkyfmError, match="needs the image's background model"):
        scale_image(image, "counts-asinh-model")
    with pytest.raises(SkyfmError, match="background model has shape"):
        scale_image(image, "counts-asinh-model", background=model[:, :10])
    patch = simulate_patch("fermi-lat", 3, size=32)
    from dataclasses import replace

    inst = replace(load_instrument("fermi-lat"), scaling={"method": "counts-asinh-model"})
    header, _ = encode_patch(patch, "k", instrument=inst)
    got = np.asarray(header["scaling"]["sky_mesh"])
    np.testing.assert_allclose(got, np.stack([box_means(b) for b in patch.background_image]), rtol=1e-6)
