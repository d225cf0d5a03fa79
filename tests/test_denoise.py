"""The diffusion denoiser: transforms, training, save/load, the skyfm denoise command. Tiny models, few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

from skyfm.cli import main
from skyfm.data import write_patch
from skyfm.data.simulate import simulate_patch
from skyfm.errors import SkyfmError
from skyfm.heads.denoise import Denoiser, DenoiserConfig
from skyfm.heads.denoise.apply import denoise_patch, generate
from skyfm.heads.denoise.data import HELD_OUT_SEED_BASE, draw_batch, stack, train_seed
from skyfm.heads.denoise.train import TrainConfig, train_denoiser, training_loss
from skyfm.heads.denoise.transforms import anscombe, band_transform, inverse_anscombe

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=8, norm_num_groups=4, crop=16,
            tile=32, tile_overlap=8, default_steps=2, default_samples=2, bypass=True, counts_compress=8.0)


def tiny_model(seed=0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(DenoiserConfig(**TINY))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model().save_pretrained(tmp_path_factory.mktemp("denoiser") / "model")


def test_transforms_invert_exactly():
    rng = np.random.default_rng(0)
    x = np.concatenate([[0.0, 1e-6, 0.5, 1.0], rng.gamma(0.5, 20, 1000)]).astype(np.float32)
    assert anscombe(np.zeros(3)).tolist() == [0, 0, 0]
    np.testing.assert_allclose(inverse_anscombe(anscombe(x)), x, rtol=1e-5, atol=1e-5)
    t = np.abs(rng.normal(0, 5, 100)).astype(np.float32)
    np.testing.assert_allclose(anscombe(inverse_anscombe(t)), t, rtol=1e-5, atol=1e-5)
    image = rng.normal(30, 5, (64, 64)).astype(np.float32)
    tr = band_transform(image, "ccd")
    assert abs(tr.sky - 30) < 1 and abs(tr.scale - 5) < 0.5
    s = np.concatenate([rng.normal(0, 3, 500), rng.gamma(0.3, 500, 500)]).astype(np.float32)
    np.testing.assert_allclose(tr.inverse_target(tr.target(s)), s, rtol=1e-5, atol=1e-4)
    assert abs(float(np.median(tr.observation(image)))) < 0.2  # sky at zero, noise ~1
    for c in (0.0, 8.0):
        counts = band_transform(image, "counts", compress=c)
        np.testing.assert_allclose(counts.inverse_target(counts.target(np.abs(s))), np.abs(s), rtol=1e-5, atol=1e-3)
    assert band_transform(image, "counts", compress=8.0).target(np.array([1e4]))[0] < 35


def test_seeds_are_disjoint_and_batches_reproducible():
    assert all(train_seed(0, j) < HELD_OUT_SEED_BASE for j in range(1000))
    a, b = draw_batch(5, 4, 16), draw_batch(5, 4, 16)
    assert all(np.array_equal(x.obs, y.obs) and np.array_equal(x.target, y.target) for x, y in zip(a, b))


def test_loss_decreases():
    model = tiny_model()
    batch = stack(draw_batch(1, 8, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(seed):
        with torch.no_grad():
            return float(training_loss(model, batch, torch.Generator().manual_seed(seed)))

    before = np.mean([loss_at(s) for s in range(3)])
    for i in range(25):
        loss = training_loss(model, batch, torch.Generator().manual_seed(100 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = np.mean([loss_at(s) for s in range(3)])
    assert after < 0.7 * before


def test_save_load_round_trip(tmp_path, model_dir):
    model = Denoiser.from_pretrained(model_dir)
    x = torch.randn(2, 1, 16, 16)
    f = torch.zeros(2, 3)
    ref = tiny_model()
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t, x, torch.ones_like(x), f), ref.eval()(x, t, x, torch.ones_like(x), f))
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "skyfm-denoiser" and cfg["block_out_channels"] == [8, 16]
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))


def test_corrupt_checkpoints_give_one_line(tmp_path, model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SkyfmError, match="corrupt or truncated"):
        Denoiser.from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(data)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(SkyfmError, match="not valid JSON"):
        Denoiser.from_pretrained(bad)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["block_out_channels"] = [8, 32]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SkyfmError, match="has shape"):
        Denoiser.from_pretrained(bad)
    with pytest.raises(SkyfmError, match="not found"):
        Denoiser.from_pretrained(tmp_path / "nowhere")


def test_training_resumes_exactly(tmp_path):
    tc = TrainConfig(steps=4, batch_size=4, warmup=2, checkpoint_every=2, eval_every=2, n_val=4)
    mc = DenoiserConfig(**TINY)
    quiet = lambda *a: None  # noqa: E731
    torch.manual_seed(0)
    train_denoiser(tmp_path / "a", tc, mc, log=quiet)
    train_denoiser(tmp_path / "b", tc, mc, max_steps=2, log=quiet)
    assert not (tmp_path / "b" / "model").exists()
    train_denoiser(tmp_path / "b", tc, mc, log=quiet)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["training"]["steps"] == 4 and "2**31" in cfg["training"]["validation_seeds"]


def test_denoise_patch_shapes_and_seed(model_dir):
    model = Denoiser.from_pretrained(model_dir)
    patch = simulate_patch("ctao", seed=3, size=(40, 52))
    clean, std = denoise_patch(patch, model, seed=1)
    assert clean.shape == std.shape == patch.shape and clean.dtype == np.float32
    assert np.all(clean >= 0) and np.all(std >= 0) and np.isfinite(clean).all()
    again, _ = denoise_patch(patch, model, seed=1)
    assert np.array_equal(clean, again)
    g = generate(model, "fermi-lat", "E1", n=2, size=16, seed=0)
    assert g.shape == (2, 16, 16) and np.all(g >= 0)


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_cli_counts_cube_keeps_wcs_and_ebounds(tmp_path, model_dir, capsys):
    src = write_patch(simulate_patch("fermi-lat", seed=4, size=36), tmp_path / "cube.fits")
    out = tmp_path / "clean.fits"
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(out), "--samples", "2",
                      "--steps", "2"], capsys)
    assert code == 0, cap.err
    with fits.open(src) as a, fits.open(out) as b:
        assert b[0].data.shape == a[0].data.shape == (6, 36, 36)
        assert b["UNCERT"].data.shape == a[0].data.shape
        assert np.array_equal(b["EBOUNDS"].data["E_MIN"], a["EBOUNDS"].data["E_MIN"])
        for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CDELT2", "TELESCOP"):
            assert b[0].header[key] == a[0].header[key]
            assert b["UNCERT"].header[key] == a[0].header[key]
        assert b[0].header["DENOISED"] is True and b[0].header["DNSAMPLE"] == 2


def test_cli_counts_cube_binned_otherwise_is_summed_into_the_instruments_bands(tmp_path, model_dir, capsys):
    from skyfm.data.fits_io import ebounds_hdu

    patch = simulate_patch("fermi-lat", seed=4, size=36)
    lo, hi = patch.energy_edges_kev.T
    edges = np.stack([np.stack([lo, np.sqrt(lo * hi)], 1), np.stack([np.sqrt(lo * hi), hi], 1)], 1).reshape(-1, 2)
    header = patch.wcs.to_header()
    header.update({"TELESCOP": "GLAST", "INSTRUME": "LAT"})
    cube = np.repeat(patch.data / 2, 2, axis=0)  # 12 planes, two per band
    src = tmp_path / "fine.fits"
    fits.HDUList([fits.PrimaryHDU(cube, header=header), ebounds_hdu(edges)]).writeto(src)
    out = tmp_path / "clean.fits"
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(out), "--samples", "2",
                      "--steps", "2"], capsys)
    assert code == 0, cap.err
    assert "12 energy planes are not fermi-lat's bands" in cap.err
    with fits.open(out) as b:  # the bands' shape, and an EBOUNDS that says so
        assert b[0].data.shape == b["UNCERT"].data.shape == (6, 36, 36)
        np.testing.assert_allclose(b["EBOUNDS"].data["E_MIN"], lo)


def test_cli_2d_image(tmp_path, model_dir, capsys):
    patch = simulate_patch("meerlicht", seed=5, size=30)
    hdr = patch.wcs.to_header()
    hdr["TELESCOP"] = "MeerLICHT"
    hdr["FILTER"] = patch.bands[0]
    data = patch.data[0].copy()
    data[3, 4] = np.nan
    src = tmp_path / "ml.fits"
    fits.PrimaryHDU(data, header=hdr).writeto(src)
    out = tmp_path / "ml_clean.fits"
    code, cap = _run(["denoise", str(src), "-i", "meerlicht", "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 0, cap.err
    with fits.open(out) as b:
        assert b[0].data.shape == (30, 30) and b[1].name == "UNCERT" and b["BACKGROUND"].data.shape == (30, 30)
        assert np.isnan(b[0].data[3, 4]) and np.isfinite(b[0].data[5, 5])
        assert np.isnan(b["BACKGROUND"].data[3, 4]) and np.isfinite(b["BACKGROUND"].data[5, 5])
        assert b[0].header["CRVAL1"] == hdr["CRVAL1"]
    flags = np.zeros((30, 30), np.uint8)
    flags[10, 12], flags[20, 7] = 2, 4  # --mask-bits 2: only the first is bad
    fits.PrimaryHDU(flags).writeto(tmp_path / "ml_mask.fits")
    masked = tmp_path / "ml_clean_masked.fits"
    code, cap = _run(["denoise", str(src), "-i", "meerlicht", "--model", str(model_dir), "--out", str(masked),
                      "--mask", str(tmp_path / "ml_mask.fits"), "--mask-bits", "2"], capsys)
    assert code == 0, cap.err
    with fits.open(masked) as b:
        assert np.isnan(b[0].data[10, 12]) and np.isnan(b[0].data[3, 4]) and np.isfinite(b[0].data[20, 7])


@pytest.mark.parametrize("case", ["missing", "not_fits", "bad_model", "corrupt_model", "bad_out"])
def test_cli_bad_inputs_one_line_no_output(tmp_path, model_dir, capsys, case):
    src = write_patch(simulate_patch("ctao", seed=6, size=16), tmp_path / "c.fits")
    out = tmp_path / "out.fits"
    model = str(model_dir)
    if case == "missing":
        src = tmp_path / "nope.fits"
    elif case == "not_fits":
        src = tmp_path / "x.fits"
        src.write_text("hello, not a FITS file\n" * 10)
    elif case == "bad_model":
        model = str(tmp_path / "no_model")
    elif case == "corrupt_model":
        import shutil

        shutil.copytree(model_dir, tmp_path / "cm")
        (tmp_path / "cm" / "model.safetensors").write_bytes(b"\x00" * 100)
        model = str(tmp_path / "cm")
    elif case == "bad_out":
        out = tmp_path / "out.png"
    code, cap = _run(["denoise", str(src), "--model", model, "--out", str(out)], capsys)
    assert code == 1
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skyfm: error: "), cap.err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ----------------------------------------------------------------------------------------------------------------
# Flux preservation: forced photometry of the clean image's sources, averaging the samples in data units
# ----------------------------------------------------------------------------------------------------------------
def _compact_source(shape, y, x, flux, fwhm):
    """A Gaussian of ``fwhm`` px and total ``flux`` at (y, x), exactly zero beyond 2 FWHM (a finite footprint)."""
    yy, xx = np.indices(shape)
    r2 = (yy - y) ** 2 + (xx - x) ** 2
    g = np.exp(-r2 / (2 * (fwhm / 2.3548) ** 2)) * (r2 <= (2 * fwhm) ** 2)
    return flux * g / g.sum()


def _aperture(img, y, x, r):
    yy, xx = np.indices(img.shape)
    return float(img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r].sum())


@pytest.mark.parametrize("kind,background", [("ccd", 100.0), ("counts", 2.0)])
def test_forced_flux_restores_the_aperture_flux_of_a_shrunken_source(kind, background):
    from skyfm.heads.denoise.flux import forced_flux_correction

    shape, fwhm = (64, 64), 3.0
    src = _compact_source(shape, 30, 33, 400.0, fwhm) + _compact_source(shape, 12, 10, 150.0, fwhm)
    observed = background + src  # noiseless: the background is exactly recoverable
    clean = 0.3 * src  # the denoiser's posterior-mean shrinkage
    clean[50:53, 50:53] += 1e-3  # a noise-level bump: below the footprint threshold, must stay as it is
    std = np.full(shape, 0.5) * (src > 0)
    out, out_std, info = forced_flux_correction(observed, clean, std, fwhm, kind, sigma=1.0)
    assert out.dtype == np.float32 and out.shape == shape
    for y, x in ((30, 33), (12, 10)):
        assert _aperture(out, y, x, fwhm) == pytest.approx(_aperture(src, y, x, fwhm), rel=1e-5)
    bright, faint = clean > 0.2, clean < 0.01  # well inside / outside the footprints (0.05-0.07 sigma)
    np.testing.assert_allclose(out[bright], src[bright], rtol=1e-5)  # the shape kept, x 1/0.3
    np.testing.assert_array_equal(out[faint], clean[faint].astype(np.float32))  # noise-level pixels untouched
    np.testing.assert_allclose(out_std[bright], 0.5 / 0.3, rtol=1e-5)  # the uncertainty follows the source
    np.testing.assert_allclose(info["background"], background, atol=1e-3)  # (the 1e-3 bump is in data - clean)
    again, _, _ = forced_flux_correction(observed, clean, std, fwhm, kind, sigma=1.0)
    assert np.array_equal(out, again)


def _exact_aperture(img, y, x, r):
    import sep

    flux, _, _ = sep.sum_circle(np.ascontiguousarray(img, np.float64), [x], [y], r, subpix=15)
    return float(flux[0])


@pytest.mark.parametrize("clean_fwhm", [1.5, 2.5])
def test_forced_flux_exact_aperture_at_the_sub_pixel_centre(clean_fwhm):
    """A compact source off the pixel grid whose clean image is broader than the truth: with ``exact_aperture``
    the flux forced into an exact 1.5 px circle is the true flux there; whole pixels about the peak (9 px for
    the circle's 7.1) give 0.91 for a 2.5 px clean source."""
    from skyfm.heads.denoise.flux import ForcedFluxConfig, forced_flux_correction

    shape, (y, x) = (48, 48), (24.4, 20.3)
    src = _compact_source(shape, y, x, 200.0, 1.5)
    clean = 0.3 * _compact_source(shape, y, x, 200.0, clean_fwhm)
    ratio = {}
    for exact in (True, False):
        out, _, _ = forced_flux_correction(5.0 + src, clean, None, 1.5, "counts",
                                           config=ForcedFluxConfig(exact_aperture=exact))
        ratio[exact] = _exact_aperture(out, y, x, 1.5) / _exact_aperture(src, y, x, 1.5)
    assert ratio[True] == pytest.approx(1.0, abs=0.02)
    if clean_fwhm > 2:
        assert ratio[False] < 0.95


def test_forced_flux_background_follows_a_ridge_under_the_sources():
    """Sources on a diffuse ridge (the Galactic plane): with :data:`LOCAL_BACKGROUND` the background under them
    comes from nearby pixels of the ridge (0.86-0.90 of the truth, the rest is the ridge's curvature); the shipped
    default masks every pixel the clean image touches and averages over 8 FWHM, and takes 0.70."""
    from skyfm.heads.denoise.flux import LOCAL_BACKGROUND, forced_flux_correction

    h, w = 96, 96
    ridge = 2.0 + 30.0 * np.exp(-0.5 * ((np.arange(h)[:, None] - 48) / 8.0) ** 2) * np.ones((1, w))
    peaks = [(48, 12), (50, 36), (47, 60), (49, 84)]
    src = sum(_compact_source((h, w), y, x, 300.0, 3.0) for y, x in peaks)

    def under_sources(config):
        _, _, info = forced_flux_correction(ridge + src, 0.3 * src, None, 3.0, "counts", config=config)
        return np.array([info["background"][y, x] / ridge[y, x] for y, x in peaks])

    local, default = under_sources(LOCAL_BACKGROUND), under_sources(None)
    assert np.all(local > 0.84) and np.all(local < 1.02)
    assert np.all(default < 0.75)


def test_forced_flux_does_not_bring_back_a_cosmic_ray():
    from skyfm.heads.denoise.flux import forced_flux_correction

    rng = np.random.default_rng(1)
    shape, fwhm = (48, 48), 2.0
    sky = 50.0 + rng.normal(0, 1.0, shape)
    track = np.zeros(shape)
    track[np.arange(20, 28), np.arange(20, 28)] = 300.0  # a cosmic-ray track the denoiser removed ...
    clean = _compact_source(shape, 24, 24, 40.0, 4.0)  # ... leaving a faint smooth ghost
    out, _, info = forced_flux_correction(sky + track, clean, None, fwhm, "ccd", sigma=1.0)
    assert np.abs(out - clean).max() < 1e-5 and np.all(info["scale"] == 1.0)


def test_samples_are_averaged_in_data_units(model_dir, monkeypatch):
    """The mean image is the mean of the inverted samples (not the inverse of a network-space mean, which the
    convex inverse transforms bias low), and their spread is the uncertainty."""
    from skyfm.heads.denoise.transforms import band_transform

    model = Denoiser.from_pretrained(model_dir)
    values = torch.tensor([0.0, 6.0])  # network-space value of sample 0 and sample 1, everywhere

    def fake_sample(obs, present, features, steps=None, generator=None, eta=None, callback=None, bf16=False):
        k = obs.shape[0]
        return values.repeat(k // 2)[:, None, None, None].expand(obs.shape).clone()

    monkeypatch.setattr(model, "sample", fake_sample)
    patch = simulate_patch("ctao", seed=3, size=24)
    clean, std = denoise_patch(patch, model, samples=2, flux_correction="none")
    inv = band_transform(patch.data[0], "counts", compress=model.config.counts_compress).inverse_target(
        values.numpy())
    np.testing.assert_allclose(clean, inv.mean(), rtol=1e-6)
    np.testing.assert_allclose(std, inv.std(ddof=1), rtol=1e-6)  # the unbiased variance of K samples
    assert inv.mean() > float(band_transform(patch.data[0], "counts", compress=model.config.counts_compress)
                              .inverse_target(values.numpy().mean(keepdims=True))[0])


def test_flux_correction_option(tmp_path, model_dir, capsys):
    model = Denoiser.from_pretrained(model_dir)
    patch = simulate_patch("ctao", seed=3, size=24)
    with pytest.raises(SkyfmError, match="--flux-correction must be one of none, forced"):
        denoise_patch(patch, model, flux_correction="bogus")
    plain, _ = denoise_patch(patch, model, seed=1, flux_correction="none")
    forced, _ = denoise_patch(patch, model, seed=1)
    assert forced.shape == plain.shape and np.isfinite(forced).all() and np.all(forced >= 0)
    src = write_patch(patch, tmp_path / "c.fits")
    for choice in ("none", "forced"):
        out = tmp_path / f"{choice}.fits"
        code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(out), "--samples", "2",
                          "--steps", "2", "--flux-correction", choice], capsys)
        assert code == 0, cap.err
        with fits.open(out) as b:
            assert b[0].header["DNFLUX"] == choice
            assert [h.name for h in b] == ["PRIMARY", "UNCERT", "BACKGROUND", "EBOUNDS"]
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(tmp_path / "x.fits"),
                      "--flux-correction", "bogus"], capsys)
    assert code != 0 and "flux-correction" in cap.err and not (tmp_path / "x.fits").exists()


def test_precision_option(tmp_path, model_dir, capsys):
    """bf16 autocast runs the network only: same shapes, finite, close to float32; a bad value is one clear line."""
    model = Denoiser.from_pretrained(model_dir)
    patch = simulate_patch("meerlicht", seed=4, size=32)
    with pytest.raises(SkyfmError, match="--precision must be one of auto, fp32, bf16"):
        denoise_patch(patch, model, precision="double")
    full, _ = denoise_patch(patch, model, seed=1, precision="fp32", flux_correction="none")
    half, _ = denoise_patch(patch, model, seed=1, precision="bf16", flux_correction="none")
    again, _ = denoise_patch(patch, model, seed=1, precision="bf16", flux_correction="none")
    assert half.shape == full.shape and np.isfinite(half).all() and np.array_equal(half, again)
    scale = float(np.abs(full).mean())
    assert 0 < float(np.abs(half - full).mean()) < 0.05 * scale  # bf16 differs, but little
    src = write_patch(patch, tmp_path / "m.fits")
    out = tmp_path / "bf16.fits"
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(out), "--samples", "2",
                      "--steps", "2", "--precision", "bf16"], capsys)
    assert code == 0 and out.exists(), cap.err
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(tmp_path / "x.fits"),
                      "--precision", "double"], capsys)
    assert code != 0 and "precision" in cap.err and not (tmp_path / "x.fits").exists()


# ----------------------------------------------------------------------------------------------------------------
# Uncertainty: ddof=1 spread, one sample has none, calibration chosen on validation pixels and applied
# ----------------------------------------------------------------------------------------------------------------
def _calibrated_model(model_dir, calibration):
    model = Denoiser.from_pretrained(model_dir)
    cfg = DenoiserConfig.from_dict({**model.config.to_dict(), "uncertainty_calibration": calibration})
    model.config = cfg
    return model


def test_one_sample_has_no_spread(tmp_path, model_dir, capsys):
    model = Denoiser.from_pretrained(model_dir)
    patch = simulate_patch("ctao", seed=3, size=24)
    clean, std = denoise_patch(patch, model, samples=1, flux_correction="none")
    assert np.isfinite(clean).all() and np.isnan(std).all()  # unknown, not a pretended 0
    src = write_patch(patch, tmp_path / "c.fits")
    out = tmp_path / "one.fits"
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(out), "--samples", "1",
                      "--steps", "2"], capsys)
    assert code == 0 and "no spread" in cap.err
    with fits.open(out) as b:
        assert np.isnan(b["UNCERT"].data).all() and b[0].header["DNUNCERT"] == "none"
        assert "NaN" in str(b["UNCERT"].header["COMMENT"])


def test_old_config_loads_unchanged(tmp_path, model_dir):
    """A config.json written before the calibration existed has no uncertainty_calibration: it loads, and the
    uncertainty is the raw spread of the samples."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("uncertainty_calibration", None)
    (old / "config.json").write_text(json.dumps(cfg))
    model = Denoiser.from_pretrained(old)
    assert model.config.uncertainty_calibration == {}
    patch = simulate_patch("ctao", seed=3, size=24)
    for mode in ("none", "forced"):
        a = denoise_patch(patch, model, seed=2, flux_correction=mode)
        b = denoise_patch(patch, model, seed=2, flux_correction=mode, calibrated=False)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    from skyfm.heads.denoise.calibrate import uncertainty_kind

    assert uncertainty_kind(model.config, "ctao", patch.bands, "forced", 4) == "spread"


def test_calibration_is_applied(tmp_path, model_dir, capsys):
    from skyfm.heads.denoise.apply import band_fwhm_pix
    from skyfm.heads.denoise.calibrate import calibrated_sigma, noise_sigma, write_calibration

    patch = simulate_patch("ctao", seed=3, size=24)  # bands T0, T1, T2
    base = Denoiser.from_pretrained(model_dir)
    clean, raw = denoise_patch(patch, base, seed=2, flux_correction="none", calibrated=False)
    cal = {"none": {"ctao": {"scale": 3.0, "clean_floor": 0.5, "bands": {"T1": {"scale": 2.0}}}},
           "forced": {"ctao": {"scale": 7.0}}}
    model = _calibrated_model(model_dir, cal)
    c2, std = denoise_patch(patch, model, seed=2, flux_correction="none")
    assert np.array_equal(c2, clean)  # the clean image is untouched
    np.testing.assert_allclose(std[0], np.hypot(3.0 * raw[0], 0.5 * clean[0]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(std[1], 2.0 * raw[1], rtol=1e-6)  # the band's own numbers
    np.testing.assert_allclose(std[2], np.hypot(3.0 * raw[2], 0.5 * clean[2]), rtol=1e-5, atol=1e-7)
    # the forced flux correction has its own calibration
    _, raw_f = denoise_patch(patch, base, seed=2, calibrated=False)
    _, std_f = denoise_patch(patch, model, seed=2)
    np.testing.assert_allclose(std_f, 7.0 * raw_f, rtol=1e-6)
    # a noise floor: the estimated noise sigma, here sqrt(background + clean) counts
    model = _calibrated_model(model_dir, {"none": {"ctao": {"scale": 1.0, "noise_floor": 0.4}}})
    _, std_n = denoise_patch(patch, model, seed=2, flux_correction="none")
    noise = noise_sigma(patch.data[0], clean[0], "counts", band_fwhm_pix(patch, 0))
    assert np.all(noise > 0) and np.all(std_n >= raw - 1e-7)
    np.testing.assert_allclose(std_n[0], calibrated_sigma(raw[0], clean[0], noise, 1.0, 0.0, 0.4), rtol=1e-5)
    # skyfm denoise writes it, and says so
    target = tmp_path / "cal"
    target.mkdir()
    for f in ("config.json", "model.safetensors"):
        (target / f).write_bytes((model_dir / f).read_bytes())
    write_calibration(target, cal)
    assert Denoiser.from_pretrained(target).config.uncertainty_calibration == cal
    src = write_patch(patch, tmp_path / "c.fits")
    out = tmp_path / "cal.fits"
    code, cap = _run(["denoise", str(src), "--model", str(target), "--out", str(out), "--seed", "2",
                      "--flux-correction", "none"], capsys)
    assert code == 0, cap.err
    with fits.open(out) as b:
        assert b[0].header["DNUNCERT"] == "calibrated" and "calibrated 1-sigma" in str(b["UNCERT"].header["COMMENT"])
        np.testing.assert_allclose(b["UNCERT"].data, std, rtol=1e-5)


def test_bad_calibration_gives_one_line(tmp_path, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    for cal, msg in [({"forced": {"ctao": {"scale": -1}}}, "scale should be a positive number"),
                     ({"forced": {"ctao": {"scale": 1, "noise_floor": "x"}}}, "noise_floor should be a number >= 0"),
                     ({"forced": {"ctao": {"sclae": 1}}}, "unknown keys sclae"),
                     ({"forcd": {}}, "unknown keys forcd")]:
        (bad / "config.json").write_text(json.dumps({**cfg, "uncertainty_calibration": cal}))
        with pytest.raises(SkyfmError, match=msg):
            Denoiser.from_pretrained(bad)


def _synthetic_pixels(rng, n, scale, clean_floor, noise_floor):
    """Pixels whose errors are Gaussian with the model's sigma for the given parameters: a known miscalibration
    of the spread. Sources from 0 to ~300 sigma (snr = clean / noise), a third of them background."""
    noise = rng.uniform(0.5, 2.0, n)
    snr = np.where(rng.random(n) < 0.33, rng.uniform(0, 1, n), np.exp(rng.uniform(0, np.log(300), n)))
    clean = snr * noise
    spread = rng.lognormal(-1.0, 0.7, n)  # (independent of the noise: else a noise floor ~ a larger scale)
    sigma = np.sqrt((scale * spread) ** 2 + (clean_floor * clean) ** 2 + (noise_floor * noise) ** 2)
    return sigma * rng.normal(size=n), spread, clean, noise, snr


def test_chooser_recovers_a_known_miscalibration():
    from skyfm.heads.denoise.calibrate import COVERAGE_68, choose, scale_only

    rng = np.random.default_rng(0)
    err, spread, clean, noise, snr = _synthetic_pixels(rng, 60_000, 2.5, 0.0, 0.0)
    assert scale_only(err, spread) == pytest.approx(2.5, rel=0.03)
    r = choose(err, spread, clean, noise, snr, floors=False)
    assert r["scale"] == pytest.approx(2.5, rel=0.03) and r["coverage_source_before"] < 0.35
    assert r["coverage_source_after"] == pytest.approx(COVERAGE_68, abs=0.002)
    r = choose(err, spread, clean, noise, snr)  # floors allowed, none needed
    assert r["scale"] == pytest.approx(2.5, rel=0.05) and r["clean_floor"] <= 0.02 and r["noise_floor"] <= 0.1
    # a spread 1.5x too small plus errors that do not shrink with it: 20% of the clean value, 0.3 noise sigma
    err, spread, clean, noise, snr = _synthetic_pixels(rng, 120_000, 1.5, 0.2, 0.3)
    grid_a, grid_b = [0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.15, 0.3, 0.45]
    r = choose(err, spread, clean, noise, snr, clean_grid=grid_a, noise_grid=grid_b)
    assert (r["clean_floor"], r["noise_floor"]) == (0.2, 0.3)
    assert r["scale"] == pytest.approx(1.5, rel=0.05)
    assert r["coverage_source_after"] == pytest.approx(COVERAGE_68, abs=0.002)
    for n_pix, cov in r["coverage_by_snr_after"].values():
        assert n_pix > 1000 and abs(cov - COVERAGE_68) < 0.02
    # one factor cannot fit faint and bright pixels at once here
    k_only = choose(err, spread, clean, noise, snr, floors=False)
    assert k_only["bin_rms_after"] > 3 * r["bin_rms_after"]
    assert choose(err, spread, clean, noise, snr, clean_grid=grid_a, noise_grid=grid_b) == r  # deterministic


def test_choose_calibration_per_band_and_instrument():
    """choose_calibration: per instrument; a band of its own only with enough pixels from enough patches."""
    from skyfm.heads.denoise.calibrate import check_calibration, choose_calibration, evaluate_calibration

    rng = np.random.default_rng(1)

    def case(inst, bands_scales, n_patches, n):
        cols = {k: [] for k in ("band", "patch", "true", "snr")}
        for mode in ("forced", "none"):
            for k in ("clean", "std", "noise"):
                cols[f"{k}_{mode}"] = []
        for band, scale in bands_scales.items():
            err, spread, clean, noise, snr = _synthetic_pixels(rng, n, scale, 0.0, 0.0)
            for mode in ("forced", "none"):
                cols[f"clean_{mode}"].append(clean)
                cols[f"std_{mode}"].append(spread)
                cols[f"noise_{mode}"].append(noise)
            cols["true"].append(clean - err)
            cols["snr"].append(snr)
            cols["band"].append(np.full(n, band, dtype=object))
            cols["patch"].append(rng.integers(0, n_patches, n))
        return {"instrument": inst, "seeds": "test", **{k: np.concatenate(v) for k, v in cols.items()}}

    pixels = {"a": case("ctao", {"T0": 2.0, "T1": 4.0}, 16, 6000), "b": case("wise", {"W1": 3.0}, 3, 6000)}
    cal, report = choose_calibration(pixels, floors=False)
    check_calibration(cal)
    assert set(cal) == {"forced", "none"} and set(cal["forced"]) == {"ctao", "wise"}
    bands = cal["forced"]["ctao"]["bands"]
    assert bands["T0"]["scale"] == pytest.approx(2.0, rel=0.05) and bands["T1"]["scale"] == pytest.approx(4.0, rel=0.05)
    assert "bands" not in cal["forced"]["wise"]  # 3 patches: the instrument's numbers
    assert cal["forced"]["wise"]["scale"] == pytest.approx(3.0, rel=0.05)
    assert report["forced"]["wise"]["bands_using_instrument"]["W1"]["patches"] == 3
    ev = evaluate_calibration(pixels, cal)
    assert all(abs(v["within_1std_src_calibrated"] - 0.6827) < 0.02 and v["within_1std_src_raw"] < 0.4
               for v in ev.values())


def test_validation_pixels_seeds_and_round_trip(tmp_path, model_dir):
    from skyfm.heads.denoise.calibrate import (CALIBRATION_SEED_BASE, load_pixels, save_pixels, validation_pixels)

    model = Denoiser.from_pretrained(model_dir)
    px = validation_pixels(model, n=1, size=32, cases={"ctao-plane", "meerlicht-field"})
    assert set(px) == {"ctao-plane", "meerlicht-field"}
    d = px["meerlicht-field"]
    assert sorted(set(d["band"].tolist())) == sorted(["u", "g", "q", "r", "i", "z"])  # all bands here
    assert d["patch"][0] == CALIBRATION_SEED_BASE + 1000 * 3 and CALIBRATION_SEED_BASE > 2**31 + 900_000
    for k in ("true", "snr", "clean_forced", "std_forced", "noise_forced", "clean_none", "std_none", "noise_none"):
        assert d[k].shape == d["band"].shape and np.isfinite(d[k]).all()
    assert np.all(d["std_none"] >= 0) and np.all(d["noise_forced"] > 0)
    save_pixels(tmp_path / "p.npz", px, {"n": 1})
    back, settings = load_pixels(tmp_path / "p.npz")
    assert settings == {"n": 1} and back["ctao-plane"]["instrument"] == "ctao"
    assert all(np.array_equal(back[c][k], px[c][k]) for c in px for k in px[c] if k not in ("instrument", "seeds"))


def test_removed_background_is_the_smoothed_rest():
    from skyfm.heads.denoise.apply import BACKGROUND_FLOOR_COUNTS, removed_background

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:64, :64]
    true_bkg = np.stack([2.0 + 0.05 * xx, np.full((64, 64), 0.02)])  # a gradient; a nearly empty band
    src = np.zeros_like(true_bkg)
    src[:, 30:34, 20:24] = 40.0
    data = rng.poisson(true_bkg + src).astype(np.float32)
    valid = np.ones((64, 64), bool)
    valid[10, :] = False
    bkg = removed_background(data, src.astype(np.float32), "counts", valid)
    assert bkg.shape == data.shape and bkg.dtype == np.float32
    inner = valid & (xx > 8) & (xx < 56) & (yy > 8) & (yy < 56)
    assert np.median(np.abs(bkg[0] - true_bkg[0])[inner] / true_bkg[0][inner]) < 0.15  # the gradient, not the noise
    assert np.all(bkg[:, ~valid] == 0) and np.all(bkg[:, valid] >= BACKGROUND_FLOOR_COUNTS)
    # a source the clean image missed stays in the background; on CCD images negative values are allowed
    assert abs(bkg[0, 32, 22] - true_bkg[0, 32, 22]) < 3
    missed = removed_background(data, np.zeros_like(src, dtype=np.float32), "counts", valid)
    assert missed[0, 32, 22] > bkg[0, 32, 22] + 5
    ccd = removed_background(np.full((1, 16, 16), -5.0, np.float32), np.zeros((1, 16, 16), np.float32), "ccd")
    np.testing.assert_allclose(ccd, -5.0, rtol=1e-6)


def test_background_comes_from_the_plain_mean(tmp_path, model_dir, capsys):
    from skyfm.heads.denoise.apply import removed_background

    model = Denoiser.from_pretrained(model_dir)
    patch = simulate_patch("fermi-lat", seed=8, size=32)
    plain, _ = denoise_patch(patch, model, seed=2, flux_correction="none")
    forced, _, bkg = denoise_patch(patch, model, seed=2, return_background=True)
    np.testing.assert_allclose(bkg, removed_background(patch.data, plain, "counts"), rtol=1e-6)
    _, _, bkg_none = denoise_patch(patch, model, seed=2, flux_correction="none", return_background=True)
    np.testing.assert_array_equal(bkg, bkg_none)
    src = write_patch(patch, tmp_path / "cube.fits")
    out = tmp_path / "clean.fits"
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(out), "--seed", "2"], capsys)
    assert code == 0, cap.err
    with fits.open(out) as b:
        np.testing.assert_allclose(b["BACKGROUND"].data, bkg, rtol=1e-6)
        assert b["BACKGROUND"].header["CRVAL1"] == b[0].header["CRVAL1"] and "Counts per pixel" in str(
            b["BACKGROUND"].header["COMMENT"])
