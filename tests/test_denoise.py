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
        assert b[0].data.shape == (30, 30) and b[1].name == "UNCERT"
        assert np.isnan(b[0].data[3, 4]) and np.isfinite(b[0].data[5, 5])
        assert b[0].header["CRVAL1"] == hdr["CRVAL1"]


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

    def fake_sample(obs, present, features, steps=None, generator=None, eta=None, callback=None):
        k = obs.shape[0]
        return values.repeat(k // 2)[:, None, None, None].expand(obs.shape).clone()

    monkeypatch.setattr(model, "sample", fake_sample)
    patch = simulate_patch("ctao", seed=3, size=24)
    clean, std = denoise_patch(patch, model, samples=2, flux_correction="none")
    inv = band_transform(patch.data[0], "counts", compress=model.config.counts_compress).inverse_target(
        values.numpy())
    np.testing.assert_allclose(clean, inv.mean(), rtol=1e-6)
    np.testing.assert_allclose(std, inv.std(), rtol=1e-6)
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
            assert b[0].header["DNFLUX"] == choice and [h.name for h in b] == ["PRIMARY", "UNCERT", "EBOUNDS"]
    code, cap = _run(["denoise", str(src), "--model", str(model_dir), "--out", str(tmp_path / "x.fits"),
                      "--flux-correction", "bogus"], capsys)
    assert code != 0 and "flux-correction" in cap.err and not (tmp_path / "x.fits").exists()
