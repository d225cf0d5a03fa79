"""skyfm detect: catalogs with the DESIGN.md columns and units, tiles merged without duplicates, bad inputs."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.io import fits

from skyfm.cli import main
from skyfm.data import Patch, write_patch
from skyfm.data.simulate import simulate_patch
from skyfm.foundation import create_model
from skyfm.heads import SourceDetector


@pytest.fixture(scope="module")
def model_dir(untrained_detector):
    return untrained_detector(("meerlicht", "fermi-lat", "wise"))


class PeakDetector(SourceDetector):
    """A stand-in network whose heatmap is the image itself: sources where the scaled image peaks."""

    def forward(self, batch):
        out = super().forward(batch)
        img = batch["scaled"][:, :1]
        out.heat = 20.0 * (img - 4.0)
        out.offset = torch.zeros_like(out.offset)
        return out


def test_detect_cli_writes_catalog_regions_and_plot(tmp_path, model_dir, capsys):
    src = tmp_path / "ml.fits"
    write_patch(simulate_patch("meerlicht", 7, size=64, scene="crowded"), src)
    out = tmp_path / "cat.fits"
    rc = main(["detect", str(src), "--model", str(model_dir), "--out", str(out), "--plot"])
    assert rc == 0, capsys.readouterr().err
    from skyfm.catalog import read_catalog

    cat = read_catalog(out)
    for col in ("x", "y", "ra", "dec", "pos_err", "flux", "flux_err", "score", "class", "class_prob", "extension"):
        assert col in cat.colnames
    assert cat["x"].unit == u.pix and cat["ra"].unit == u.deg and cat["pos_err"].unit == u.deg
    assert cat["flux"].unit == u.adu and cat["extension"].unit == u.deg
    assert len(cat) > 0 and np.all((cat["score"] >= 0) & (cat["score"] <= 1))
    assert cat.meta["class_names"] == ["star", "galaxy"] or "class_names" in cat.meta
    assert out.with_suffix(".reg").is_file() and out.with_suffix(".png").is_file()


def test_counts_cube_gets_ts_and_physical_flux(model_dir):
    from skyfm.detect import detect_patch

    p = simulate_patch("fermi-lat", 3, size=48, population="real", center=(20.0, 0.5))
    cat = detect_patch(p, model_dir, min_score=0.0101)
    assert {"glon", "glat", "ts", "sqrt_ts", "flux_phys", "flux_band"} <= set(cat.colnames)
    assert cat["flux"].unit == u.ct and cat["flux_phys"].unit == u.ph / u.cm**2 / u.s


def test_tiles_merge_without_duplicates():
    from skyfm.detect import detect_patch

    torch.manual_seed(0)
    fm = create_model("skyfm-tiny", backbone={"depth": 1, "embed_dim": 32, "num_heads": 2})
    base = SourceDetector.from_foundation(fm, ["wise"], trunk_channels=8, trunk_depth=1)
    det = PeakDetector(base.config, base.foundation).eval()
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 1.0, (4, 96, 96)).astype(np.float32)
    # sources on and around tile boundaries (tile 32, overlap 16: cores meet at 24, 40, 56, 72)
    xs = [24.0, 40.0, 39.0, 57.0, 10.0, 72.0, 88.0]
    ys = [24.0, 40.0, 71.0, 56.0, 56.0, 10.0, 88.0]
    for x, y in zip(xs, ys):
        data[:, int(y), int(x)] += 1000.0
    patch = Patch(data=data, instrument="wise", bands=["W1", "W2", "W3", "W4"])
    one = detect_patch(patch, det, min_score=0.5, tile_size=96, overlap=0)
    tiled = detect_patch(patch, det, min_score=0.5, tile_size=32, overlap=16)
    key = lambda c: sorted(zip(np.round(c["x"].value), np.round(c["y"].value)))
    assert len(one) == len(xs)
    assert key(tiled) == key(one)  # every source once: no duplicate at a tile edge, none lost


def test_resampled_pixel_scale_maps_back(model_dir):
    """An image at twice the native pixel size is resampled per tile; positions come back in its own pixels."""
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch

    p = simulate_patch("meerlicht", 5, size=64, scene="crowded")
    p.wcs.wcs.cdelt = p.wcs.wcs.cdelt * 2
    cat = detect_patch(p, model_dir, min_score=0.0101)
    if len(cat):
        assert cat["x"].value.max() < 64 and cat["y"].value.min() > -1


@pytest.mark.parametrize("case", ["missing", "not_fits", "nan_only", "no_instrument", "bad_ext"])
def test_bad_inputs_give_one_line_and_no_output(tmp_path, model_dir, capsys, case):
    path = tmp_path / "in.fits"
    out = tmp_path / "cat.fits"
    if case == "not_fits":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    elif case == "nan_only":
        hdu = fits.PrimaryHDU(np.full((32, 32), np.nan, np.float32))
        hdu.header["TELESCOP"] = "WISE"
        hdu.header["BAND"] = 1
        hdu.writeto(path)
    elif case in ("no_instrument", "bad_ext"):
        fits.PrimaryHDU(np.ones((32, 32), np.float32)).writeto(path)
        if case == "bad_ext":
            out = tmp_path / "cat.txt"
    rc = main(["detect", str(path), "--model", str(model_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("skyfm: error:") and err.count("\n") == 1, err
    assert not out.exists() and not out.with_suffix(".reg").exists()


def test_image_without_wcs_is_detected_in_pixels(tmp_path, model_dir, capsys):
    path = tmp_path / "nowcs.fits"
    img = simulate_patch("meerlicht", 9, size=64, bands=["q"]).data[0]
    fits.PrimaryHDU(img).writeto(path)
    out = tmp_path / "cat.ecsv"
    rc = main(["detect", str(path), "--instrument", "meerlicht", "--band", "q", "--model", str(model_dir),
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    from skyfm.catalog import read_catalog

    cat = read_catalog(out)
    assert "ra" not in cat.colnames and cat["pos_err"].unit == u.pix


@pytest.mark.parametrize("length", [100, 513, 1024, 2048, 2100, 4095, 10560])
def test_even_tiles_cover_an_axis_with_no_more_tiles_and_fewer_pixels(length):
    """A CCD axis is cut into as many tiles as ``side``-long ones would need, each no longer than ``side`` and a
    multiple of the granule (full attention windows); counts cubes (granule 0) keep ``side``."""
    from skyfm.data.tiling import tile_grid
    from skyfm.detect import _even_tile

    side, overlap, stride, granule = 512, 32, 8, 64
    tile = _even_tile(length, side, overlap, stride, granule)
    if length <= side:
        assert tile == -(-length // stride) * stride
        return
    assert tile <= side and tile % granule == 0
    n_even = len(tile_grid(length, 8, (tile, 8), (overlap, 0)))
    n_side = len(tile_grid(length, 8, (side, 8), (overlap, 0)))
    assert n_even == n_side and n_even * tile <= n_side * side
    covered = np.zeros(length, int)
    for t in tile_grid(length, 8, (tile, 8), (overlap, 0)):
        covered[t.core_y0:t.core_y1] += 1
    assert (covered == 1).all()  # every row owned by exactly one tile's core
    assert _even_tile(length, side, overlap, stride, 0) == side
    assert _even_tile(2048, side, overlap, stride, granule) == 448  # five tiles of 448 px, not five of 512


def test_inference_settings_and_default_tiling(model_dir):
    from skyfm.detect import default_tiling, get_detector, inference_context, inference_settings
    from skyfm.errors import SkyfmError
    from skyfm.instruments import load_instrument

    det = get_detector(model_dir)
    assert default_tiling(det, load_instrument("fermi-lat"), 6) == (det.config.tile_size, 0)
    tile, window = default_tiling(det, load_instrument("meerlicht"), 1)
    assert tile == 4 * det.config.tile_size and window == 64 // det.token_stride
    assert default_tiling(det, load_instrument("wise"), 4) == (tile, window)  # several bands: the same tiles
    assert inference_settings(det, "fp32", 0) == (False, None)
    assert inference_settings(det, "bf16", 8) == (True, 8)
    with pytest.raises(SkyfmError, match="precision"):
        inference_settings(det, "fp8")
    with pytest.raises(SkyfmError, match="attention_window"):
        inference_settings(det, "fp32", -1)
    p = simulate_patch("meerlicht", 5, size=128, bands=["q"])
    batch = det.make_batch([p])
    heats = {}
    for bf16, window in ((False, None), (True, None), (False, 8)):
        with inference_context(det, bf16, window):
            heats[(bf16, window)] = torch.sigmoid(det(batch).heat.float())
        assert det.foundation.backbone.attention_window is None  # restored
    assert (heats[(True, None)] - heats[(False, None)]).abs().max() < 0.05
    assert not torch.equal(heats[(False, 8)], heats[(False, None)])  # the window changes what a token sees

    # a detector handed in runs channels-last as the loaded ones do (the same heatmap), and is given back as it was
    from skyfm.heads import load_detector

    handed_in = load_detector(model_dir)
    conv = handed_in.trunk[0].weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    with inference_context(handed_in, True, None):
        assert handed_in.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.sigmoid(handed_in(batch).heat.float()), heats[(True, None)])
    assert handed_in.trunk[0].weight.is_contiguous() and handed_in.trunk[0].weight is conv


def test_windowed_and_global_detection_agree_on_bright_sources(model_dir):
    """The PeakDetector's heatmap is the image, so tiling settings must not change what it finds."""
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    peak = PeakDetector(det.config, det.foundation)
    peak.load_state_dict(det.state_dict())
    p = simulate_patch("meerlicht", 11, size=192, bands=["q"], scene="field")
    a = detect_patch(p, peak, min_score=0.5, precision="fp32", attention_window=0, tile_size=128)
    b = detect_patch(p, peak, min_score=0.5, precision="bf16", attention_window=4, tile_size=256)
    assert len(a) > 3 and abs(len(a) - len(b)) <= max(1, len(a) // 20)


def test_psf_refinement_moves_bright_stars_onto_their_true_positions(model_dir):
    """The PeakDetector finds stars at whole pixels; the PSF fit must bring the bright ones to sub-pixel truth."""
    from skyfm.catalog import match_catalogs
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    peak = PeakDetector(det.config, det.foundation)
    peak.load_state_dict(det.state_dict())
    p = simulate_patch("meerlicht", 12, size=128, bands=["q"], scene="crowded")
    errors = {}
    for refine in (False, True):
        cat = detect_patch(p, peak, min_score=0.5, precision="fp32", refine=refine)
        di, ti, sep = match_catalogs((np.asarray(cat["x"].value), np.asarray(cat["y"].value)), p.truth, 2.0)
        bright = np.asarray(p.truth["snr"])[ti] >= 20
        assert bright.sum() >= 3
        errors[refine] = np.median(sep[bright])
    assert errors[True] < 0.5 * errors[False] and errors[True] < 0.15


def test_psf_flux_replaces_the_network_flux_only_where_it_is_more_precise(model_dir):
    """A band lost in the noise must not swamp a faint source's total: the fit's flux is taken only when its
    error is below the network's."""
    from skyfm.detect import refine_ccd_tile
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector(model_dir)
    inst = load_instrument("meerlicht")
    head = det.head_config("meerlicht")
    p = simulate_patch("meerlicht", 12, size=128, bands=["q"], scene="crowded")
    t = p.truth[(np.asarray(p.truth["snr"]) >= 20) & (np.asarray(p.truth["class"]) == "star")
                & ~np.asarray(p.truth["saturated"], bool)]
    assert len(t) >= 3
    n = len(t)
    flux = np.asarray(t["flux"], float)
    base = {"x": np.asarray(t["x"], float) + 0.3, "y": np.asarray(t["y"], float) - 0.2, "pos_err": np.full(n, 0.5),
            "score": np.ones(n), "class_prob": np.tile([1.0, 0.0], (n, 1)), "extension": np.zeros(n),
            "flux": 0.5 * flux, "flux_band": 0.5 * flux[:, None]}
    sure = refine_ccd_tile({**base, "flux_err": 1e-6 * flux, "flux_band_err": 1e-6 * flux[:, None]}, p, inst, head)
    unsure = refine_ccd_tile({**base, "flux_err": 10 * flux, "flux_band_err": 10 * flux[:, None]}, p, inst, head)
    fitted = sure["fit"] >= 1  # the fit converged (a few blends in this crowded field do not)
    assert fitted.mean() > 0.8 and np.all(sure["fit"][fitted] == 1)  # positions fitted ...
    assert np.allclose(sure["flux"], 0.5 * flux)  # ... fluxes kept
    assert np.all(unsure["fit"][fitted] == 2) and np.median(np.abs(unsure["flux"][fitted] / flux[fitted] - 1)) < 0.1
    assert np.allclose(sure["x"], unsure["x"])


def test_a_fit_is_accepted_by_its_significance_over_all_bands(model_dir):
    """WISE stars seen in W1 and W2 only (SNR ~35) and nothing in W3 and W4: the summed flux's SNR is below 5 (the
    noise of the empty bands swamps it), the bands' combined significance is not, so the fitted positions are taken."""
    from skyfm.detect import refine_ccd_tile
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector(model_dir)
    inst, head = load_instrument("wise"), det.head_config("wise")
    x, y = np.array([30.2, 70.7, 30.4, 70.1]), np.array([30.6, 30.3, 70.8, 70.4])
    p = simulate_patch("wise", 5, size=100, scene="empty", contaminants=False,
                       inject={"x": x, "y": y, "mag": np.tile([17.0, 17.0, 30.0, 30.0], (4, 1))})
    n, c = 4, len(p.bands)
    start = {"x": x + 0.3, "y": y - 0.2, "pos_err": np.full(n, 0.5), "score": np.ones(n),
             "class_prob": np.tile([1.0, 0.0], (n, 1)), "extension": np.zeros(n), "flux": np.ones(n),
             "flux_band": np.ones((n, c)), "flux_err": np.full(n, 1e9), "flux_band_err": np.full((n, c), 1e9)}
    out = refine_ccd_tile(start, p, inst, head)
    assert np.all(out["fit"] >= 1)
    assert np.all(np.hypot(out["x"] - x, out["y"] - y) < 0.2)  # from 0.36 px at the start


def test_saturated_stars_the_network_missed_are_added(model_dir):
    from skyfm.detect import add_saturated_stars, refine_ccd_tile
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector(model_dir)
    inst, head = load_instrument("meerlicht"), det.head_config("meerlicht")
    p = simulate_patch("meerlicht", 3, size=96, bands=["q"], scene="empty",
                       inject={"x": [48.3], "y": [47.6], "mag": [11.0]})
    assert (p.data >= 0.999 * inst.noise["saturation"]).sum() > 4  # a flat top, maybe a bleed column
    empty = {k: np.zeros((0,) + shape) for k, shape in
             (("x", ()), ("y", ()), ("pos_err", ()), ("flux", ()), ("flux_err", ()), ("score", ()), ("extension", ()),
              ("class_prob", (2,)), ("flux_band", (1,)), ("flux_band_err", (1,)))} | {"fit": np.zeros(0, np.int8)}
    found = add_saturated_stars(empty, p, inst, head)
    assert len(found["x"]) == 1 and found["score"][0] == 1.0 and found["class_prob"][0, 0] == 1.0
    assert abs(found["x"][0] - 48.3) < 1.0 and abs(found["y"][0] - 47.6) < 3.0  # a bleed column smears y
    star = p.truth[np.argmax(np.asarray(p.truth["flux"]))]
    assert abs(found["flux"][0] / float(star["flux"]) - 1) < 0.05  # the aperture keeps the charge that bled
    assert 0 < found["flux_err"][0] < 0.01 * found["flux"][0]
    refined = refine_ccd_tile(found, p, inst, head)  # the position from the wings; the flux stays the aperture's
    assert refined["fit"][0] == 1 and np.hypot(refined["x"][0] - 48.3, refined["y"][0] - 47.6) < 0.3
    assert refined["flux"][0] == found["flux"][0]
    network = {k: v.copy() for k, v in found.items()}
    network["x"] += 0.7
    network["flux"][:] = 1.0  # a network detection of it with a poor flux: nothing added, the aperture flux taken
    again = add_saturated_stars(network, p, inst, head)
    assert again["x"].shape == (1,) and again["flux"][0] == found["flux"][0] and network["flux"][0] == 1.0
    assert add_saturated_stars(None, simulate_patch("meerlicht", 3, size=64, bands=["q"], scene="empty"), inst,
                               head) is None


def test_heads_without_psf_fit_keep_the_network_values(model_dir):
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    peak = PeakDetector(det.config, det.foundation)
    peak.load_state_dict(det.state_dict())
    p = simulate_patch("meerlicht", 12, size=128, bands=["q"], scene="crowded")
    fitted = detect_patch(p, peak, min_score=0.5, precision="fp32")
    peak.config.heads["meerlicht"].psf_fit = False
    plain = detect_patch(p, peak, min_score=0.5, precision="fp32")
    assert (np.asarray(fitted["fit"]) > 0).any() and (np.asarray(plain["fit"]) == 0).all()
    raw = detect_patch(p, peak, min_score=0.5, precision="fp32", refine=False)
    assert np.allclose(np.asarray(plain["x"]), np.asarray(raw["x"]))


def test_detect_cli_inference_options(tmp_path, model_dir, capsys):
    from skyfm.catalog import read_catalog

    src = tmp_path / "q.fits"
    write_patch(simulate_patch("meerlicht", 12, size=96, bands=["q"], scene="crowded"), src)
    out = tmp_path / "cat.ecsv"
    rc = main(["detect", str(src), "--model", str(model_dir), "--out", str(out), "--no-refine", "--precision", "fp32",
               "--attention-window", "4"])
    assert rc == 0, capsys.readouterr().err
    cat = read_catalog(out)
    assert len(cat) > 0 and (np.asarray(cat["fit"]) == 0).all()
    rc = main(["detect", str(src), "--model", str(model_dir), "--out", str(out), "--precision", "fp8"])
    assert rc != 0 and "fp8" in capsys.readouterr().err


def test_background_model_drives_the_counts_refinement(tmp_path, model_dir, capsys):
    """--background: the likelihood refinement fits against the given model cube (the primary HDU of a model file,
    or the BACKGROUND HDU skyfm denoise writes), not an estimate; a model of the wrong shape, with NaN, or given
    for a CCD image is a one-line error and writes nothing."""
    from skyfm.catalog import read_catalog
    from skyfm.detect import detect_patch

    p = simulate_patch("fermi-lat", 3, size=48, population="real", center=(20.0, 0.5))
    src = write_patch(p, tmp_path / "cube.fits")  # a file without the simulator's background
    model = tmp_path / "model.fits"
    fits.PrimaryHDU(p.background_image).writeto(model)
    denoised = tmp_path / "denoised.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros_like(p.data)),
                  fits.ImageHDU(p.background_image, name="BACKGROUND")]).writeto(denoised)
    # the patch carries its true background; the network's selection, so that every run fits the same rows
    truth_bkg = detect_patch(p, model_dir, min_score=0.0101, selection="network")
    tables = {}
    for name, extra in (("model", ["--background", str(model)]), ("denoised", ["--background", str(denoised)]),
                        ("estimated", []), ("model-ts", ["--background", str(model), "--selection", "auto"])):
        out = tmp_path / f"cat-{name}.fits"  # not model.fits: that is the background model
        sel = [] if name.endswith("-ts") else ["--selection", "network"]
        rc = main(["detect", str(src), "--model", str(model_dir), "--min-score", "0.0101", "--out", str(out)]
                  + extra + sel)
        assert rc == 0, capsys.readouterr().err
        tables[name] = read_catalog(out)
    assert len(truth_bkg) > 0
    by_ts = tables["model-ts"]  # a background model: sources kept by TS (the default, auto)
    assert 0 < len(by_ts) < len(tables["model"]) and np.all(np.asarray(by_ts["ts"]) >= 25.0)
    for name in ("model", "denoised"):
        np.testing.assert_allclose(np.asarray(tables[name]["ts"]), np.asarray(truth_bkg["ts"]), rtol=1e-4)
    assert not np.allclose(np.asarray(tables["estimated"]["ts"]), np.asarray(truth_bkg["ts"]), rtol=1e-2)
    bad_shape, nan_model = tmp_path / "small.fits", tmp_path / "nan.fits"
    fits.PrimaryHDU(p.background_image[:, :10]).writeto(bad_shape)
    broken = p.background_image.copy()
    broken[0, 3, 3] = np.nan
    fits.PrimaryHDU(broken).writeto(nan_model)
    ml = write_patch(simulate_patch("meerlicht", 1, size=32), tmp_path / "ml.fits")
    for image, bg, words in ((src, bad_shape, "does not match"), (src, nan_model, "NaN"),
                             (ml, model, "for counts cubes"), (src, tmp_path / "none.fits", "not found")):
        out = tmp_path / "bad.fits"
        rc = main(["detect", str(image), "--model", str(model_dir), "--background", str(bg), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and words in err and err.count("\n") == 1, err
        assert not out.exists()


def test_a_finely_binned_counts_cube_gives_the_catalog_of_the_instruments_bins(tmp_path, model_dir, capsys):
    """A gtbin cube with two planes per fermi-lat band (and a model cube binned as it) is summed into the bands:
    the same catalog as the cube binned as the instrument, and a warning saying how the planes were summed."""
    from skyfm.catalog import read_catalog
    from skyfm.data.fits_io import ebounds_hdu

    p = simulate_patch("fermi-lat", 3, size=48, population="real", center=(20.0, 0.5))
    rng = np.random.default_rng(0)
    first = rng.binomial(p.data.astype(np.int64), 0.6).astype(np.float32)  # thinning: the halves sum back exactly
    split = lambda a, b: np.stack([a, b], axis=1).reshape(-1, *p.data.shape[1:])  # noqa: E731
    lo, hi = p.energy_edges_kev.T
    edges = np.stack([np.stack([lo, np.sqrt(lo * hi)], 1), np.stack([np.sqrt(lo * hi), hi], 1)], 1).reshape(-1, 2)
    header = p.wcs.to_header()
    header.update({"TELESCOP": "GLAST", "INSTRUME": "LAT"})
    files = {"coarse": (p.data, p.energy_edges_kev, p.background_image),
             "fine": (split(first, p.data - first), edges, split(0.5 * p.background_image, 0.5 * p.background_image))}
    tables = {}
    for name, (cube, bins, bkg) in files.items():
        fits.HDUList([fits.PrimaryHDU(cube, header=header), ebounds_hdu(bins)]).writeto(tmp_path / f"{name}.fits")
        fits.PrimaryHDU(bkg).writeto(tmp_path / f"{name}-bkg.fits")
        out = tmp_path / f"cat-{name}.fits"
        rc = main(["detect", str(tmp_path / f"{name}.fits"), "--model", str(model_dir), "--min-score", "0.0101",
                   "--background", str(tmp_path / f"{name}-bkg.fits"), "--selection", "network", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert ("12 energy planes are not fermi-lat's bands: summed as E0 <- planes 1-2" in err) == (name == "fine")
        tables[name] = read_catalog(out)
    assert len(tables["coarse"]) > 0 and len(tables["fine"]) == len(tables["coarse"])
    for column in ("ra", "dec", "ts", "flux"):
        np.testing.assert_allclose(np.asarray(tables["fine"][column]), np.asarray(tables["coarse"][column]),
                                   rtol=1e-4)


def test_an_image_in_electrons_per_second_gives_the_catalog_of_its_adu_image_in_its_unit(tmp_path, model_dir, capsys):
    """An image in e-/s (BUNIT in the image HDU, EXPTIME in the primary, as drizzled HST files have them) is detected
    as the same image in ADU (the noise model needs ADU): the same sources, fluxes in e-/s."""
    from skyfm.catalog import read_catalog

    p = simulate_patch("meerlicht", 11, size=64, scene="crowded")
    tables = {}
    for name, factor, extra in (("adu", 1.0, {}), ("eps", 1.0 / 60.0, {"BUNIT": "e-/s"})):  # gain 1, 60 s
        header = p.wcs.to_header()
        header.update({"TELESCOP": "MeerLICHT", "FILTER": p.bands[0], **extra})
        primary = fits.PrimaryHDU()
        primary.header["EXPTIME"] = 60.0
        sci = fits.ImageHDU((p.data[0] * factor).astype(np.float32), header=header, name="SCI")
        fits.HDUList([primary, sci]).writeto(tmp_path / f"{name}.fits")
        out = tmp_path / f"cat-{name}.ecsv"
        rc = main(["detect", str(tmp_path / f"{name}.fits"), "--model", str(model_dir), "--min-score", "0.0101",
                   "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        tables[name] = read_catalog(out)
    adu, eps = tables["adu"], tables["eps"]
    assert len(adu) > 0 and len(eps) == len(adu)
    assert adu["flux"].unit == u.adu and eps["flux"].unit == u.electron / u.s
    np.testing.assert_allclose(np.asarray(eps["x"]), np.asarray(adu["x"]), atol=1e-3)
    np.testing.assert_allclose(np.asarray(eps["flux"]) * 60.0, np.asarray(adu["flux"]), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(eps["flux_err"]) * 60.0, np.asarray(adu["flux_err"]), rtol=1e-3)


def test_an_image_with_some_of_a_heads_bands_takes_the_thresholds_chosen_for_them(model_dir):
    from skyfm.detect import default_min_score, detect_patch, get_detector
    from skyfm.errors import SkyfmError
    from skyfm.heads import load_detector
    from skyfm.heads.config import subset_key

    det = load_detector(model_dir)
    head = det.head_config("wise")
    head.band_subsets = {"W1": {"min_score": 0.5, "unconfirmed_min_score": 0.6}}
    one = simulate_patch("wise", 5, size=64, bands=["W1"])
    two = simulate_patch("wise", 5, size=64, bands=["W2", "W1"])
    assert head.for_bands(one.bands).min_score == 0.5 and head.for_bands(two.bands) is head
    assert subset_key(head.bands, two.bands) == "W1+W2"
    cat = detect_patch(one, det)
    assert cat.meta["min_score"] == 0.5 and np.all(np.asarray(cat["score"])[np.asarray(cat["fit"]) != 4] >= 0.5)
    assert detect_patch(two, det).meta["min_score"] == pytest.approx(default_min_score(det, head))
    head.band_subsets = {"W1": {"min_score": 1.5}}
    with pytest.raises(SkyfmError, match=r"band_subsets\['W1'\] should map"):
        detect_patch(one, det)
    ml = det.head_config("meerlicht")  # trained on images of one band: an image of all six is a key of its own
    ml.band_subsets = {"u+g+q+r+i+z": {"min_score": 0.2, "fit_flux_err_scale": 1.7, "fit_flux_err_floor": 0.0}}
    six = ml.for_bands(["z", "i", "r", "q", "g", "u"])
    assert six.min_score == 0.2 and six.error_scales(fit=True)[0] == 1.7 and six.error_floors()[0] == 0.0
    assert ml.for_bands(["q"]) is ml
    for bad in ({"fit_flux_err_scale": 0.0}, {"fit_flux_err_floor": -0.1}, {"flux_err_scale_estbg": 1.0},
                {"min_score": "high"}):
        ml.band_subsets = {"u+g+q+r+i+z": bad}
        with pytest.raises(SkyfmError, match=r"band_subsets\['u\+g\+q\+r\+i\+z'\] should map"):
            ml.for_bands(ml.bands)
    from skyfm.detect import _bands_per_training_image
    from skyfm.instruments import load_instrument

    for shipped in get_detector(None).config.heads.values():  # the shipped subsets name real bands, valid values
        for key in shipped.band_subsets or {}:
            bands = key.split("+")
            assert set(bands) <= set(shipped.bands) and subset_key(shipped.bands, bands) == key
            assert shipped.for_bands(bands) is not shipped
            if set(bands) == set(shipped.bands):  # all of them: only for a head trained on images of fewer
                assert _bands_per_training_image(load_instrument(shipped.name)) < len(bands)


def test_the_flux_of_an_image_with_some_of_a_heads_bands_sums_its_bands():
    """The total-flux head learned WISE's four-band sums: on a W1 tile it gave an eighth of the W1 flux. Rows that
    keep the network's flux take the sum of their bands' instead (errors added as correlated); MeerLICHT's head,
    trained on one band per image, keeps its own."""
    from skyfm.catalog import match_catalogs
    from skyfm.detect import _bands_per_training_image, detect_patch, get_detector
    from skyfm.instruments import load_instrument

    assert _bands_per_training_image(load_instrument("wise")) == 4
    assert _bands_per_training_image(load_instrument("meerlicht")) == 1
    p = simulate_patch("wise", 1_790_000_000, size=160, bands=["W1"], scene="crowded")
    cat = detect_patch(p, get_detector(None))
    val = lambda k: np.asarray(getattr(cat[k], "value", cat[k]), dtype=np.float64)  # noqa: E731
    net = val("fit") <= 1  # the network's flux (1: the fit's position only)
    assert net.sum() >= 5
    np.testing.assert_allclose(val("flux")[net], val("flux_band")[net, 0], rtol=1e-6)
    di, ti, _ = match_catalogs((val("x"), val("y")), p.truth, 1.5)
    bright = (np.asarray(p.truth["snr"])[ti] >= 5) & net[di]
    ratio = val("flux")[di[bright]] / np.asarray(p.truth["flux"])[ti[bright]]
    assert bright.sum() >= 5 and 0.6 < np.median(ratio) < 1.5


def test_a_drizzle_of_several_exposures_saturates_at_their_summed_full_wells(tmp_path):
    """A drizzled Hubble file (e-/s, its total EXPTIME, NDRIZIM = 4) holds a star far above one exposure's full
    well that no exposure saturated: with the header's level it is PSF-fitted (fit 2), not taken for a clipped core
    (the instrument's single-exposure level: an aperture flux, fit 1)."""
    import dataclasses

    from astropy.io import fits
    from astropy.table import Table

    from skyfm.data.simulate.ccd import NumberCounts, Scene, simulate_ccd_patch
    from skyfm.detect import detect_file, get_detector
    from skyfm.instruments import load_instrument

    inst = load_instrument("hubble")
    deep = dataclasses.replace(inst, bands=tuple(dataclasses.replace(b, exposure_time=4 * b.exposure_time)
                                                 for b in inst.bands))
    blank = Scene("blank", NumberCounts(anchor_mag=20.0, anchor_density=0.0, slopes=(0.3,)), galaxy_scale=0.0)
    star = Table({"x": [40.3], "y": [38.6], "mag": [19.2]})
    p = simulate_ccd_patch(deep, 3, scene=blank, bands=["F606W"], contaminants=False, inject=star, size=80)
    exptime = deep.band("F606W").exposure_time
    assert 42000 * 2 < p.data.max() < 42000 * 4  # above one exposure's full well (ADU), below four's
    rows = {}
    for name, keywords in (("drizzle", {"NDRIZIM": 4}), ("no-keyword", {})):
        header = p.wcs.to_header()
        header.update({"TELESCOP": "HST", "INSTRUME": "ACS", "FILTER1": "F606W", "BUNIT": "ELECTRONS/S"})
        primary = fits.PrimaryHDU()
        primary.header.update({"EXPTIME": exptime, **keywords})
        data = (p.data[0] * inst.noise["gain"] / exptime).astype(np.float32)
        fits.HDUList([primary, fits.ImageHDU(data, header=header, name="SCI")]).writeto(tmp_path / f"{name}.fits")
        cat = detect_file(tmp_path / f"{name}.fits", model_dir=get_detector(None), progress=False)
        k = int(np.argmin(np.hypot(np.asarray(cat["x"]) - 40.3, np.asarray(cat["y"]) - 38.6)))
        rows[name] = cat[k]
    true_rate = p.truth["flux"][0] * inst.noise["gain"] / exptime  # e-/s, the catalog's unit
    assert rows["drizzle"]["fit"] == 2 and rows["no-keyword"]["fit"] == 1
    assert abs(float(getattr(rows["drizzle"]["flux"], "value", rows["drizzle"]["flux"])) / true_rate - 1) < 0.03


def test_the_seeing_is_measured_and_a_night_broader_than_trained_is_said(model_dir):
    """MeerLICHT's heads learned 2-3" seeing; on a 5.5" night they split stars (Run 24). The catalog carries the
    measured FWHM per band, and a seeing beyond the trained range is a warning; a space telescope's PSF is fixed and
    not measured."""
    import warnings

    from skyfm.detect import SeeingWarning, detect_patch, measure_seeing
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector(model_dir)
    for seeing, warned in ((2.5, False), (5.5, True)):
        p = simulate_patch("meerlicht", 1_790_000_100, size=160, bands=["q"], scene="crowded", seeing=seeing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cat = detect_patch(p, det, refine=False)
        assert cat.meta["seeing_q"] == pytest.approx(seeing, rel=0.1)
        said = [str(w.message) for w in caught if issubclass(w.category, SeeingWarning)]
        assert bool(said) == warned and (not said or 'seeing q 5.' in said[0] and 'trained on 2.0-3.0"' in said[0])
    assert measure_seeing(simulate_patch("hubble", 3, size=96), load_instrument("hubble")) == {}


def test_skyfm_detect_fits_with_the_file_s_own_gain_and_saturation_level(tmp_path, monkeypatch):
    """A file's GAIN and SATURATE reach the PSF fit's noise model (the built-in instrument is left as it is)."""
    from astropy.io import fits

    import skyfm.detect as D

    p = simulate_patch("meerlicht", 1_790_000_300, size=96, bands=["q"], scene="crowded")
    header = p.wcs.to_header()
    header.update({"TELESCOP": "MeerLICHT", "FILTER": "q", "GAIN": 4.0, "SATURATE": 30000.0})
    fits.PrimaryHDU(p.data[0], header=header).writeto(tmp_path / "q.fits")
    seen = []
    refine = D.refine_ccd_tile
    monkeypatch.setattr(D, "refine_ccd_tile", lambda d, patch, inst, *a, **k: seen.append(dict(inst.noise))
                        or refine(d, patch, inst, *a, **k))
    D.detect_file(tmp_path / "q.fits", model_dir=D.get_detector(None), progress=False)
    assert seen and all(n["gain"] == 4.0 and n["saturation"] == 30000.0 for n in seen)
    assert D.get_detector(None).instrument("meerlicht").noise["gain"] == 1.0


def test_every_ccd_of_a_mosaic_file_is_detected_into_one_catalog(tmp_path):
    """``--hdu all``: each science extension (not its weight map) detected with its own WCS, into one catalog with
    a column ``hdu``; the same rows as each CCD alone; a dead CCD skipped with a warning."""
    from astropy.io import fits

    from skyfm.detect import detect_file, get_detector
    from skyfm.errors import SkyfmError

    hdus = [fits.PrimaryHDU()]
    for k, seed in enumerate((1_790_000_400, 1_790_000_401), start=1):
        p = simulate_patch("meerlicht", seed, size=96, bands=["q"], scene="crowded")
        header = p.wcs.to_header()
        header.update({"TELESCOP": "MeerLICHT", "FILTER": "q"})
        hdus += [fits.ImageHDU(p.data[0], header=header, name=f"CCD{k}"),
                 fits.ImageHDU(np.ones_like(p.data[0]), header=header, name=("WHT", "ERR")[k - 1])]
    hdus.append(fits.ImageHDU(np.full_like(p.data[0], np.nan), header=header, name="CCD3"))  # a dead CCD
    fits.HDUList(hdus).writeto(tmp_path / "mosaic.fits")
    det = get_detector(None)
    with pytest.warns(UserWarning, match="HDU CCD3 skipped: .*every pixel is NaN"):
        every = detect_file(tmp_path / "mosaic.fits", tmp_path / "all.ecsv", hdu="all", model_dir=det,
                            progress=False)
    alone = {name: detect_file(tmp_path / "mosaic.fits", hdu=name, model_dir=det, progress=False)
             for name in ("CCD1", "CCD2")}
    assert set(every["hdu"]) == {"CCD1", "CCD2"} and every.meta["hdus"] == "CCD1,CCD2"  # not the WHT / ERR maps
    for name, table in alone.items():
        mine = every[every["hdu"] == name]
        assert len(mine) == len(table) > 10
        np.testing.assert_allclose(np.asarray(mine["ra"]), np.asarray(table["ra"]))
    assert "seeing_q_CCD1" in every.meta and (tmp_path / "all.ecsv").exists()
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("FLUX", "E", array=np.ones(3))])]
                 ).writeto(tmp_path / "table.fits")
    with pytest.raises(SkyfmError, match="has no image data"):  # no CCD at all: the one-HDU path's error
        detect_file(tmp_path / "table.fits", hdu="all", instrument="meerlicht", model_dir=det, progress=False)


def test_a_mosaic_edge_written_as_zeros_is_no_data():
    """A drizzled or SWarp mosaic writes 0 where no exposure fell: those pixels are masked (a dead column, one pixel
    wide, is not), and the image's noise elsewhere is not turned into sources."""
    from skyfm.detect import detect_patch, get_detector, zero_filled_mask

    p = simulate_patch("hubble", 1_790_000_000, size=256, bands=["F606W"], scene="field")
    yy, xx = np.indices(p.data.shape[1:])
    edge = xx + 0.6 * yy > 260  # a slanted footprint edge
    zeros = p.data.copy()
    zeros[:, edge] = 0.0
    zeros[:, :, 40] = 0.0  # a dead column
    no_data = zero_filled_mask(zeros)
    assert np.array_equal(no_data, edge) and zero_filled_mask(p.data) is None
    det = get_detector(None)
    raw = detect_patch(p, det)
    inside = edge[np.rint(np.asarray(raw["y"])).astype(int), np.rint(np.asarray(raw["x"])).astype(int)]
    cat = detect_patch(Patch(data=zeros, instrument="hubble", bands=["F606W"], wcs=p.wcs), det)
    assert not edge[np.rint(np.asarray(cat["y"])).astype(int), np.rint(np.asarray(cat["x"])).astype(int)].any()
    assert len(cat) <= (~inside).sum() + 5  # without the mask: hundreds of peaks on a mis-scaled sky
    # a crowded field with the wedge invalid (NaN in a file): the rest of the tile keeps its detections (a flat fill
    # of the wedge changed the network's whole-tile statistics and cost a third of them)
    c = simulate_patch("meerlicht", 1_790_000_100, size=256, bands=["q"], scene="crowded")
    full = detect_patch(c, det)
    outside = ~edge[np.rint(np.asarray(full["y"])).astype(int), np.rint(np.asarray(full["x"])).astype(int)]
    masked = detect_patch(Patch(data=np.where(edge, 0.0, c.data).astype(np.float32), instrument="meerlicht",
                                bands=["q"], wcs=c.wcs, mask=edge), det)
    assert len(masked) >= 0.95 * outside.sum() > 100


def test_an_image_of_pixels_coarser_than_the_instruments_is_detected_on_white_noise():
    """Tiles are resampled onto the network's pixels; interpolating coarse pixels leaves smooth noise, which the
    networks (trained on white noise) took for sources: the noise of finer pixels is restored first."""
    import dataclasses

    from skyfm.detect import detect_patch, get_detector
    from skyfm.finetune.evaluate import match_radius_pix, score_patch
    from skyfm.instruments import load_instrument

    inst = load_instrument("meerlicht")
    coarse = dataclasses.replace(inst, pixel_scale=inst.pixel_scale * 2)  # 1.12" pixels: binned 2 x 2
    p = dataclasses.replace(simulate_patch(coarse, 1_797_000_000, size=192, bands=["q"], scene="crowded"),
                            instrument="meerlicht")
    s = score_patch(detect_patch(p, get_detector(None)), p, inst, radius=match_radius_pix(inst) / 2)
    precision, recall = s["tp"] / max(s["tp"] + s["fp"], 1), s["tp"] / s["n_true"]
    assert s["n_true"] > 300 and precision > 0.8 and recall > 0.5  # without: precision 0.1


def test_a_sky_gradient_is_taken_out_of_what_the_network_sees():
    """The networks were trained on flat skies: on a gradient (scattered light) they fired everywhere."""
    import dataclasses

    from skyfm.detect import detect_patch, flat_sky_view, get_detector
    from skyfm.instruments.scaling import robust_background

    p = simulate_patch("meerlicht", 1_799_100_000, size=256, bands=["q"], scene="field")
    assert flat_sky_view(p) is p  # a flat sky is left as it is
    _, sigma = robust_background(p.data[0])
    ramp = 5.0 * sigma * np.arange(256)[None, None, :] / 255.0
    tilted = dataclasses.replace(p, data=(p.data + ramp).astype(np.float32))
    flat = flat_sky_view(tilted).data[0]
    assert np.ptp(np.median(flat[:, :32], axis=0)) < np.ptp(ramp) / 5  # the ramp taken out
    det = get_detector(None)
    assert len(detect_patch(tilted, det)) <= len(detect_patch(p, det)) + 5  # without: hundreds


def test_nebulosity_is_taken_out_of_what_the_network_and_the_fit_see():
    """A 20-sigma glow 40 px wide on a field (nebulosity): the 64-px mesh missed it and the network and the PSF
    fit took it for hundreds of stars (MeerLICHT 732 rows, WISE W1 1607, against 6 and 24 on the flat sky)."""
    import dataclasses

    from skyfm.detect import detect_patch, get_detector
    from skyfm.instruments.scaling import robust_background

    det = get_detector(None)
    for name, band in (("meerlicht", "q"), ("wise", "W1")):
        p = simulate_patch(name, 1_799_200_000, size=256, bands=[band], scene="field")
        _, sigma = robust_background(p.data[0])
        yy, xx = np.indices((256, 256))
        glow = 20.0 * sigma * np.exp(-((xx - 140) ** 2 + (yy - 110) ** 2) / (2 * 40.0 ** 2))
        nebula = dataclasses.replace(p, data=(p.data + glow[None]).astype(np.float32))
        assert len(detect_patch(nebula, det)) <= len(detect_patch(p, det)) + 5


def test_a_bleed_column_is_no_nebula():
    """A crowded WISE W4 tile with a saturated star bleeding along its column: shown the bleed in the network's
    view, the finer background mesh took it for a nebula and the network fired around it (247 rows, one true
    source); the view leaves saturated pixels out of its mesh, as the PSF fit does (5 rows; 24 before the finer
    mesh, whose coarse mesh the bleed had pulled up)."""
    from skyfm.detect import detect_patch, get_detector

    p = simulate_patch("wise", 955_501_005, size=256, bands=["W4"], scene="crowded")
    assert len(detect_patch(p, get_detector(None))) <= 12


def test_extension_test_finds_ic443_extended_and_needs_a_background_model(tmp_path, capsys):
    """skyfm detect --test-extension on a Fermi-LAT cube of the real sky around IC 443 (4FGL's template, r68 0.27
    deg): the source there comes out extended with TS_ext >= 16, the point sources stay point-like; without a
    background model the option is a one-line error and writes nothing."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    from skyfm.catalog import read_catalog

    p = simulate_patch("fermi-lat", 3, size=64, population="real", center=(189.05, 3.03))
    src = write_patch(p, tmp_path / "cube.fits")
    model = tmp_path / "model.fits"
    fits.PrimaryHDU(p.background_image).writeto(model)
    out = tmp_path / "cat.ecsv"
    # the shipped detector: an untrained one's candidates move with the CPU's convolution kernels (oneDNN), and
    # on some machines it offered only pieces of IC 443's light and off-source peaks, all tested extended
    rc = main(["detect", str(src), "--background", str(model), "--test-extension", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cat = read_catalog(out)
    ic443 = SkyCoord(189.05 * u.deg, 3.03 * u.deg, frame="galactic")
    sep = SkyCoord(u.Quantity(cat["glon"], u.deg), u.Quantity(cat["glat"], u.deg), frame="galactic").separation(ic443)
    i = int(np.argmin(sep))
    assert sep[i].deg < 0.3 and 0.1 < u.Quantity(cat["extension"][i]).to_value(u.deg) < 0.6
    assert cat["ts_ext"][i] >= 16
    point = ~np.isfinite(np.asarray(cat["ts_ext"], dtype=float))
    assert point.sum() >= 1 and np.all(u.Quantity(cat["extension"][point]).to_value(u.deg) < 0.05)  # < 1/2 pixel
    from skyfm.instruments import load_instrument

    exposure = np.array([b.exposure for b in load_instrument("fermi-lat").bands])  # flux_phys from the final counts,
    band = np.clip(u.Quantity(cat["flux_band"]).to_value(u.ct), 0, None)  # the extended fit's too
    np.testing.assert_allclose(u.Quantity(cat["flux_phys"]).to_value(u.ph / u.cm**2 / u.s),
                               (band / exposure).sum(axis=1), rtol=1e-5)
    bad = tmp_path / "bad.ecsv"
    rc = main(["detect", str(src), "--test-extension", "--out", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "extension test needs likelihood selection" in err and err.count("\n") == 1, err
    assert not bad.exists()


def test_detect_warns_on_a_denoised_input(tmp_path, model_dir, capsys):
    """A skyfm denoise output (DENOISED = T) is not what the detector was trained on: one warning line, and the
    catalog is still written; an observed image gets no such line."""
    from astropy.io import fits

    src = tmp_path / "clean.fits"
    write_patch(simulate_patch("meerlicht", 7, size=64, scene="crowded"), src)
    with fits.open(src, mode="update") as hdul:
        hdul[0].header["DENOISED"] = (True, "source-only image from skyfm denoise")
    rc = main(["detect", str(src), "--model", str(model_dir), "--out", str(tmp_path / "c.ecsv")])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "c.ecsv").is_file()
    assert err.count("skyfm: warning:") == 1 and "skyfm denoise output" in err
    observed = tmp_path / "observed.fits"
    write_patch(simulate_patch("meerlicht", 7, size=64, scene="crowded"), observed)
    assert main(["detect", str(observed), "--model", str(model_dir), "--out", str(tmp_path / "o.ecsv")]) == 0
    assert "denoise output" not in capsys.readouterr().err


def test_likelihood_selection_keeps_what_the_ts_map_finds(model_dir):
    """With a background model a counts cube's sources are kept by fitted TS: an untrained network at a threshold
    it never reaches still yields the bright sources, from the TS map's peaks; score is sqrt(TS)."""
    from skyfm.baselines import tsmap_detect
    from skyfm.catalog.match import match_catalogs
    from skyfm.detect import detect_patch

    p = simulate_patch("fermi-lat", 5, size=64, population="resampled")
    cat = detect_patch(p, model_dir, min_score=0.999)  # no network peak reaches 0.999
    assert cat.meta["selection"] == "likelihood" and cat.meta["score_kind"] == "sqrt_ts"
    assert len(cat) > 0 and np.all(np.asarray(cat["ts"]) >= 25.0)
    np.testing.assert_allclose(np.asarray(cat["score"]), np.sqrt(np.asarray(cat["ts"])))
    assert np.all(np.asarray(cat["net_score"]) < 0.999)
    scales = [float(v) for v in cat.meta["background_scale"].split(",")]  # the model rescaled per bin
    assert len(scales) == 6 and all(0.95 < v < 1.3 for v in scales), scales  # true model + unresolved sources
    assert "background_scale" not in detect_patch(p, model_dir, min_score=0.999, fit_background=False).meta
    ts = tsmap_detect(p, background="true")
    ts = ts[np.asarray(ts["ts"]) >= 25.0]
    d_idx, _, _ = match_catalogs(cat, ts, 3.0)
    assert len(d_idx) >= 0.8 * len(ts) and abs(len(cat) - len(ts)) <= max(2, 0.2 * len(ts))
    bright = np.asarray(p.truth["snr"]) >= 15
    _, t_idx, _ = match_catalogs(cat, p.truth[bright], 3.0)
    assert bright.sum() > 0 and len(t_idx) >= 0.8 * bright.sum()
    twice = detect_patch(p, model_dir, min_score=0.999, passes=2)  # the second pass only adds sources
    assert len(twice) >= len(cat) and np.all(np.asarray(twice["ts"]) >= 25.0)
    net = detect_patch(p, model_dir, min_score=0.999, selection="network")
    assert net.meta["selection"] == "network" and len(net) == 0 and "net_score" not in net.colnames


def test_likelihood_selection_merges_candidates_and_refuses_what_it_cannot_do(model_dir):
    from skyfm.detect import add_ts_map_candidates, detect_patch, resolve_selection, select_by_ts
    from skyfm.errors import SkyfmError
    from skyfm.instruments import load_instrument

    fermi, ml = load_instrument("fermi-lat"), load_instrument("meerlicht")
    assert resolve_selection("auto", fermi, np.zeros(1)) == "likelihood"
    assert resolve_selection("auto", fermi, None) == "network"
    assert resolve_selection("auto", ml, None) == "network"
    for args in (("likelihood", ml, None), ("best", fermi, None)):
        with pytest.raises(SkyfmError):
            resolve_selection(*args)
    p = simulate_patch("fermi-lat", 5, size=64, population="resampled")
    assert resolve_selection("auto", fermi, np.zeros(1), refine=False) == "network"
    with pytest.raises(SkyfmError, match="refinement"):
        detect_patch(p, model_dir, refine=False, selection="likelihood")
    ml_patch = simulate_patch("meerlicht", 1, size=32)
    with pytest.raises(SkyfmError, match="counts cubes"):
        detect_patch(ml_patch, model_dir, selection="likelihood")
    # one duplicate pair within half the separation: the higher TS stays; TS < 25 goes
    arrays = {"x": np.array([10.0, 10.5, 30.0, 50.0]), "y": np.array([10.0, 10.0, 30.0, 50.0]),
              "ts": np.array([40.0, 90.0, 24.0, 30.0]), "score": np.array([0.9, 0.1, 0.8, 0.0])}
    kept = select_by_ts(arrays, 25.0, separation=2.0)
    np.testing.assert_array_equal(kept["ts"], [90.0, 30.0])
    # a TS-map peak next to a weak network peak takes its probability and class; a strong network peak stays alone
    truth = p.truth[np.argsort(-np.asarray(p.truth["snr"]))]
    x0, y0 = float(truth["x"][0]), float(truth["y"][0])
    x1, y1 = float(truth["x"][1]), float(truth["y"][1])
    net = {"x": np.array([x0, x1 + 0.5]), "y": np.array([y0, y1]), "score": np.array([0.9, 0.2]),
           "class_prob": np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]), "extension": np.array([0.0, 0.05]),
           "pos_err": np.ones(2), "flux": np.full(2, 50.0), "fit": np.zeros(2, dtype=np.int8)}
    out = add_ts_map_candidates(net, p.data, fermi, None, p.background_image, list(p.bands), min_score=0.5)
    assert out["score"][0] == 0.9 and out["x"][0] == x0  # the strong network peak, first
    assert not np.any(np.hypot(out["x"][1:] - x0, out["y"][1:] - y0) < 2.0)  # no TS-map duplicate of it
    j = np.argmin(np.hypot(out["x"] - x1, out["y"] - y1))
    assert np.hypot(out["x"][j] - x1, out["y"][j] - y1) < 2.0 and out["score"][j] == 0.2
    np.testing.assert_allclose(out["class_prob"][j], [0.6, 0.3, 0.1])
    others = np.ones(len(out["x"]), bool)
    others[[0, j]] = False
    np.testing.assert_allclose(out["class_prob"][others], 1.0 / 3)
    assert np.all(out["score"][others] == 0) and out["fit"].dtype == np.int8


def _soft_source_under_a_model_too_bright_at_low_energy(rng):
    """A plane-like 64-px Fermi-LAT cube: a soft source (counts in 1-17 GeV) where the model over-predicts the
    bright 0.3-1 GeV bin by up to 30% (a neighbour's fit that took that bin's light, say)."""
    from skyfm.instruments import load_instrument

    inst = load_instrument("fermi-lat")
    h = w = 64
    bkg = np.stack([np.full((h, w), v) for v in [100.0, 20.0, 2.0, 0.2, 0.05, 0.01]])
    src = np.zeros_like(bkg)
    for c, (band, counts) in enumerate(zip(inst.bands, [0.0, 250.0, 30.0, 3.0, 0.0, 0.0])):
        r = band.psf.stamp_radius_pix(inst.pixel_scale_deg)
        st = band.psf.stamps(np.array([0.3]), np.array([-0.2]), inst.pixel_scale_deg, radius_pix=r)[0]
        big = np.zeros((h + 2 * r, w + 2 * r))
        big[32:32 + 2 * r + 1, 32:32 + 2 * r + 1] = st / st.sum() * counts
        src[c] = big[r:r + h, r:r + w]
    yy, xx = np.mgrid[0:h, 0:w]
    model = bkg.copy()
    model[0] *= 1 + 0.3 * np.exp(-0.5 * ((xx - 32) ** 2 + (yy - 32) ** 2) / 6.0**2)
    return inst, rng.poisson(bkg + src).astype(float), model


def test_the_weighted_likelihoods_ts_map_finds_a_source_the_models_bright_bin_hides():
    """The plain TS map (one power-law amplitude) at a soft source is under 25: the over-predicted 0.3-1 GeV bin
    pulls it down. Weighted for a 3% model error that bin counts for little; its TS-map peak becomes a candidate
    (``weighted_only``), whose fit has weighted TS >= 25 and stays; one under it would go."""
    from skyfm.catalog import likelihood as lk
    from skyfm.detect import _weighted_only_at_weighted_ts, add_ts_map_candidates, refine_counts

    inst, n, model = _soft_source_under_a_model_too_bright_at_low_energy(np.random.default_rng(3))
    kernels = lk.psf_kernels(inst)
    weights = lk.likelihood_weights(model, kernels, 0.03)
    assert weights[0, 32, 32] < 0.05 and weights[2, 32, 32] > 0.95
    net = {"x": np.zeros(0), "y": np.zeros(0), "score": np.zeros(0), "class_prob": np.zeros((0, 3)),
           "extension": np.zeros(0), "pos_err": np.zeros(0), "flux": np.zeros(0), "flux_err": np.zeros(0),
           "flux_band": np.zeros((0, 6)), "flux_band_err": np.zeros((0, 6)), "fit": np.zeros(0, np.int8)}
    bands = [b.name for b in inst.bands]

    def near(out):
        return np.hypot(out["x"] - 32.3, out["y"] - 31.8) < 2.0

    plain = add_ts_map_candidates(net, n, inst, None, model, bands, min_score=0.5)
    assert not near(plain).any() and "weighted_only" not in plain
    both = add_ts_map_candidates(net, n, inst, None, model, bands, min_score=0.5, ts_weights=weights)
    assert near(both).sum() == 1 and both["weighted_only"][near(both)].all()
    fitted = refine_counts(both, n, inst, None, model, bands=bands, unresolved=False, ts_weights=weights)
    j = np.flatnonzero(near(fitted))[0]
    assert 25 <= fitted["ts_weighted"][j] <= fitted["ts"][j]
    kept = _weighted_only_at_weighted_ts(fitted, 25.0)
    assert "weighted_only" not in kept and "ts_weighted" not in kept and kept["ts"][j] == fitted["ts"][j]
    dropped = _weighted_only_at_weighted_ts(fitted, fitted["ts_weighted"][j] + 1)
    assert np.isnan(dropped["ts"][j])


def test_model_error_is_checked_and_needs_likelihood_selection(model_dir):
    from skyfm.detect import detect_patch
    from skyfm.errors import SkyfmError

    p = simulate_patch("fermi-lat", 5, size=64, population="resampled")
    with pytest.raises(SkyfmError, match="fractional error"):
        detect_patch(p, model_dir, model_error=1.5)
    with pytest.raises(SkyfmError, match="needs likelihood selection"):
        detect_patch(p, model_dir, model_error=0.03, selection="network")


def test_a_fit_that_moves_far_is_kept_where_no_other_fit_holds_its_source():
    """A candidate 4.5 px beside a source no other candidate holds (a network peak off a blend, say): its Poisson fit
    moves onto the source. Taken for a runaway (the network selection's rule) the row keeps its start with TS NaN and
    likelihood selection drops it; ``keep_far_moves`` keeps the fit, where the network has a peak beside it. A moved
    fit that ends within the separation of another fit, or of a source fitted elsewhere, is a runaway and stays
    dropped (highest TS first)."""
    from skyfm.catalog.likelihood import add_point_sources, psf_kernels
    from skyfm.detect import _moved_fits_kept, refine_counts
    from skyfm.instruments import load_instrument

    inst = load_instrument("fermi-lat")
    kernels = psf_kernels(inst)
    band_flux = np.array([[600.0, 300.0, 150.0, 60.0, 20.0, 5.0]])
    expected = add_point_sources(np.full((6, 64, 64), 1.0), kernels, [30.3], [31.6], band_flux)
    counts = np.random.default_rng(3).poisson(expected).astype(np.float64)
    start = {"x": np.array([34.8]), "y": np.array([31.6]), "flux": np.array([500.0]), "flux_err": np.array([50.0]),
             "flux_band": np.full((1, 6), 80.0), "flux_band_err": np.full((1, 6), 10.0), "pos_err": np.ones(1),
             "class_prob": np.full((1, 3), 1.0 / 3), "score": np.array([0.5]), "fit": np.zeros(1, dtype=np.int8)}
    background = np.full((6, 64, 64), 1.0)
    dropped = refine_counts({k: v.copy() for k, v in start.items()}, counts, inst, None, background, unresolved=False)
    assert np.isnan(dropped["ts"][0]) and dropped["x"][0] == 34.8
    kept = refine_counts({k: v.copy() for k, v in start.items()}, counts, inst, None, background, unresolved=False,
                         keep_far_moves=True, network_peaks=([30.8, 34.8], [31.0, 31.6], [0.25, 0.5]))
    assert kept["ts"][0] > 100 and np.hypot(kept["x"][0] - 30.3, kept["y"][0] - 31.6) < 0.5
    unseen = refine_counts({k: v.copy() for k, v in start.items()}, counts, inst, None, background,
                           unresolved=False, keep_far_moves=True, network_peaks=([34.8], [31.6], [0.5]))
    assert np.isnan(unseen["ts"][0])
    elsewhere = refine_counts({k: v.copy() for k, v in start.items()}, counts, inst, None, background,
                              unresolved=False, keep_far_moves=True, fitted_elsewhere=([30.0], [32.0]))
    assert np.isnan(elsewhere["ts"][0])
    # rows 0 and 2 stayed; 1 and 3 moved: 1 onto row 0's source (a runaway), 3 to a place of its own
    fit = {"x": np.array([10.0, 11.0, 40.0, 25.0, 25.5]), "y": np.array([10.0, 10.5, 40.0, 20.0, 20.0]),
           "ts": np.array([50.0, 30.0, 40.0, 35.0, 60.0])}
    finite, ok = np.ones(5, bool), np.array([True, False, True, False, False])
    np.testing.assert_array_equal(_moved_fits_kept(fit, finite, ok, 2.0), [False, False, False, False, True])
    np.testing.assert_array_equal(_moved_fits_kept(fit, finite, ok, 2.0, fitted_elsewhere=([25.2], [20.1])),
                                  [False] * 5)
    # with the network's peaks: kept only beside one of probability FAR_MOVE_MIN_SCORE (0.2) or more
    beside = ([26.0, 25.0], [21.0, 20.0], [0.3, 0.05])
    np.testing.assert_array_equal(_moved_fits_kept(fit, finite, ok, 2.0, network_peaks=beside), [0, 0, 0, 0, 1])
    weak = ([26.0, 25.0], [21.0, 20.0], [0.1, 0.05])
    assert not _moved_fits_kept(fit, finite, ok, 2.0, network_peaks=weak).any()


def test_psf_wing_tables_hold_what_the_fit_kernels_leave_out():
    """A fit kernel's stamp plus its wing stamp is the wide kernel's stamp at every sub-pixel phase, except in the
    core, where a shifted fit stamp holds a little more (the light its cut edge lacks; the wings give that back);
    the wings are never negative; a wide kernel no wider gives no wings."""
    from skyfm.catalog.likelihood import psf_kernels, psf_table, psf_wing_tables
    from skyfm.instruments import load_instrument

    inst = load_instrument("fermi-lat")
    narrow = psf_kernels(inst)
    wide = psf_kernels(inst, fraction=0.995, max_radius_pix=40)
    wings = psf_wing_tables(narrow, wide)
    for k, wk, wing in zip(narrow, wide, wings):
        r, big = (k.shape[0] - 1) // 2, (wk.shape[0] - 1) // 2
        assert wing.radius == big
        for dx, dy in ((0.0, 0.0), (0.3, -0.45), (-0.2, 0.1)):
            total = wing.stamp(dx, dy).copy()
            total[big - r:big + r + 1, big - r:big + r + 1] += psf_table(k).stamp(dx, dy)
            exact = psf_table(wk).stamp(dx, dy)
            assert wing.stamp(dx, dy).min() >= 0 and np.all(total >= exact - 1e-12)
            np.testing.assert_allclose(total, exact, atol=0.01 * exact.max())
            assert total.sum() - exact.sum() < 0.011  # the core's surplus, at most ~1% of the flux
            outside = np.ones_like(total, dtype=bool)
            outside[big - r:big + r + 1, big - r:big + r + 1] = False
            np.testing.assert_allclose(total[outside], exact[outside], atol=1e-12)
        assert wing.stamp(0.0, 0.0).sum() == pytest.approx(wk.sum() - k.sum(), rel=1e-6)
    assert wings[1].stamp(0.0, 0.0).sum() > 0.01  # the 1-4 GeV bin: 1.8% of its PSF beyond the fit kernel
    assert not psf_wing_tables(narrow[:1], narrow[:1])[0].stamp(0.1, 0.2).any()


def test_the_wings_of_a_very_bright_source_are_no_ring_of_faint_ones():
    """Around a source of 6e5 counts (Geminga-like) whose PSF reaches beyond the fit kernels, candidates on rings
    at the kernels' edge (E1's at 10 px) fitted against the background plus that source (likelihood selection's
    second pass) took the light beyond the kernel for theirs: TS up to ~150 with the first fit's wings left out of
    the background, under 25 with them in (``refine_counts``, ``detect.PSF_WINGS``)."""
    import skyfm.detect as D
    from skyfm.catalog.likelihood import add_point_sources, psf_kernels
    from skyfm.instruments import load_instrument

    inst = load_instrument("fermi-lat")
    size, sx, sy = 96, 48.3, 47.6
    flux = np.array([4e5, 1.8e5, 1.7e4, 60.0, 1.0, 0.0])
    background = np.ones((6, size, size)) * np.array([20.0, 8.0, 1.0, 0.1, 0.02, 0.01])[:, None, None]
    expected = background.copy()
    for c, band in enumerate(inst.bands):  # the PSF to 4.7 deg, far beyond the fits' kernels
        expected[c, 1:, 1:] += flux[c] * band.psf.stamps(np.array([sx - 48]), np.array([sy - 48]), 0.1,
                                                         radius_pix=47)[0][:95, :95]
    counts = np.random.default_rng(0).poisson(expected).astype(np.float64)

    def rows(x, y, f):
        n = len(x)
        return {"x": np.asarray(x, float), "y": np.asarray(y, float), "flux": np.full(n, f),
                "flux_err": np.ones(n), "flux_band": np.full((n, 6), f / 6), "flux_band_err": np.ones((n, 6)),
                "pos_err": np.ones(n), "class_prob": np.full((n, 3), 1 / 3), "score": np.full(n, 0.5),
                "fit": np.zeros(n, dtype=np.int8)}

    angle = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring_x = np.concatenate([sx + r * np.cos(angle) for r in (10.5, 12.0)])
    ring_y = np.concatenate([sy + r * np.sin(angle) for r in (10.5, 12.0)])
    best, bright_ts = {}, {}
    for wings in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(D, "PSF_WINGS", wings)
            one, fitted = D.refine_counts(rows([sx + 0.2], [sy - 0.1], 5e5), counts, inst, None, background,
                                          return_background=True)
        assert np.hypot(one["x"][0] - sx, one["y"][0] - sy) < 0.05
        bright_ts[wings] = float(one["ts"][0])
        model = add_point_sources(fitted, psf_kernels(inst), one["x"], one["y"], one["flux_band"])
        ring = D.refine_counts(rows(ring_x, ring_y, 200.0), counts, inst, None, model, unresolved=False)
        best[wings] = float(np.nanmax(np.nan_to_num(ring["ts"])))
    assert best[False] > 50  # the ring the fits saw before
    assert best[True] < 25
    # the wings stay positive: a background below zero in the core had made the bright source's TS 1.5e8
    assert bright_ts[True] == pytest.approx(bright_ts[False], rel=0.1)


def test_point_sources_added_to_a_background_hold_their_counts():
    from skyfm.catalog.likelihood import add_point_sources
    from skyfm.catalog.likelihood import psf_kernels
    from skyfm.instruments import load_instrument

    inst = load_instrument("fermi-lat")
    kernels = psf_kernels(inst, psfs=[b.psf for b in list(inst.bands)[:2]])
    bkg = np.full((2, 96, 96), 0.5)  # the sources' kernels (up to 24 px) inside the image
    out = add_point_sources(bkg, kernels, [47.3, 60.0, np.nan], [48.7, 40.0, 5.0], [[100.0, 50.0], [0.0, 10.0],
                                                                                     [5.0, 5.0]])
    assert np.all(bkg == 0.5)  # a copy
    held = [k.sum() for k in kernels]  # the fraction of the PSF each kernel holds
    np.testing.assert_allclose((out - bkg).sum(axis=(1, 2)), [100.0 * held[0], 50.0 * held[1] + 10.0 * held[1]],
                               rtol=1e-3)
    assert np.unravel_index(np.argmax(out[0]), (96, 96)) in ((49, 47), (48, 47))


def test_detect_cli_selection_errors_are_one_line(tmp_path, model_dir, capsys):
    ml = write_patch(simulate_patch("meerlicht", 1, size=32), tmp_path / "ml.fits")
    cube = write_patch(simulate_patch("fermi-lat", 3, size=32, population="resampled"), tmp_path / "cube.fits")
    for image, extra, words in ((ml, ["--selection", "likelihood"], "for counts cubes"),
                                (cube, ["--selection", "likelihood", "--no-refine"], "refinement"),
                                (cube, ["--selection", "best"], "best")):
        out = tmp_path / "bad.fits"
        rc = main(["detect", str(image), "--model", str(model_dir), "--out", str(out)] + extra)
        err = capsys.readouterr().err
        assert rc != 0 and words in err, err
        assert not out.exists()
    out = tmp_path / "est.fits"  # likelihood selection without a model: the background estimated from the counts
    rc = main(["detect", str(cube), "--model", str(model_dir), "--out", str(out), "--selection", "likelihood",
               "--min-score", "0.0101"])
    assert rc == 0, capsys.readouterr().err
    from skyfm.catalog import read_catalog

    assert np.all(np.asarray(read_catalog(out)["ts"]) >= 25.0)


def test_extension_test_comes_from_the_head_unless_told(model_dir, monkeypatch):
    """The shipped CTAO and Fermi-LAT heads test extension by default (Fermi-LAT's since Run 45, for the pieces of
    extended sources its weighted-likelihood candidates find: it alone weighs a 3% model error); the caller's
    True / False wins; True where likelihood selection does not run (no background model) is an error, the head's
    default there is not. ``model_error`` reaches the likelihood selection as given."""
    from dataclasses import replace

    import skyfm.detect as D
    from skyfm.errors import SkyfmError
    from skyfm.heads import load_detector

    shipped = load_detector()
    assert shipped.head_config("ctao").likelihood_extension_test is True
    assert shipped.head_config("fermi-lat").likelihood_extension_test is True
    assert shipped.head_config("fermi-lat").likelihood_model_error == 0.03
    assert shipped.head_config("ctao").likelihood_model_error is None
    det = load_detector(model_dir)
    p = simulate_patch("fermi-lat", 3, size=48, population="resampled")
    seen = []
    monkeypatch.setattr(D, "_detect_likelihood",
                        lambda *a, extension, model_error, **k: seen.append((extension, model_error)))
    D.detect_patch(p, det)
    det.head_config("fermi-lat").likelihood_extension_test = True
    D.detect_patch(p, det, model_error=0.05)
    D.detect_patch(p, det, test_extension=False, model_error=0.0)
    assert seen == [(False, None), (True, 0.05), (False, 0.0)]
    no_model = replace(p, background_image=None)
    assert D.detect_patch(no_model, det).meta["selection"] == "network"  # the head's default: skipped there
    with pytest.raises(SkyfmError, match="needs likelihood selection"):
        D.detect_patch(no_model, det, test_extension=True)


def test_split_test_comes_from_the_head_unless_told(model_dir, monkeypatch):
    """The shipped Fermi-LAT head splits blends by default, CTAO's does not; the caller's True / False wins; True
    where likelihood selection does not run is an error, the head's default there is not."""
    from dataclasses import replace

    import skyfm.detect as D
    from skyfm.errors import SkyfmError
    from skyfm.heads import load_detector

    shipped = load_detector()
    assert shipped.head_config("fermi-lat").likelihood_split_test is True
    assert shipped.head_config("ctao").likelihood_split_test is False
    det = load_detector(model_dir)
    p = simulate_patch("fermi-lat", 3, size=48, population="resampled")
    seen = []
    monkeypatch.setattr(D, "_detect_likelihood", lambda *a, split, **k: seen.append(split))
    det.head_config("fermi-lat").likelihood_split_test = False
    D.detect_patch(p, det)
    D.detect_patch(p, det, split_blends=True)
    det.head_config("fermi-lat").likelihood_split_test = True
    D.detect_patch(p, det)
    assert seen == [None, True, None]  # None: _detect_likelihood takes the head's
    no_model = replace(p, background_image=None)
    assert D.detect_patch(no_model, det).meta["selection"] == "network"
    with pytest.raises(SkyfmError, match="blend test"):
        D.detect_patch(no_model, det, split_blends=True)


def test_extended_sources_are_in_the_model_the_second_pass_searches(monkeypatch):
    """A CTAO cube with an extended source (a Gaussian of r68 6 px = 0.12 deg) and a point source 12 px beside it:
    with two passes the extension test runs before the second (its TS map is of the background plus the extended
    source as it is): one extended row and the point source. Tested only at the end, the second pass searched
    the background plus a point where the extended source is, and its rim came back as false sources; so did the
    rim light left by a size of the test's grid alone (0.086 deg; 0.111 with the sizes halfway, Run 49)."""
    from dataclasses import replace

    from scipy.signal import fftconvolve

    import skyfm.detect as D
    from skyfm.catalog import likelihood as lk
    from skyfm.heads import load_detector

    det = load_detector()
    inst = det.instrument("ctao")
    head = det.head_config("ctao")
    kernels = lk.psf_kernels(inst)
    wts = lk.powerlaw_band_weights(inst)
    size = 96
    bkg = np.stack([np.full((size, size), v) for v in (0.6, 0.3, 0.1)])
    yy, xx = np.mgrid[0:size, 0:size]
    gauss = np.exp(-0.5 * ((xx - 44.0) ** 2 + (yy - 48.0) ** 2) / (6.0 / 1.5096) ** 2)
    src = np.stack([fftconvolve(gauss / gauss.sum(), k / k.sum(), mode="same") * 3000.0 * w
                    for k, w in zip(kernels, wts)])
    src = lk.add_point_sources(src, kernels, [56.0], [48.0], np.outer([300.0], wts) / 0.97)
    counts = np.random.default_rng(0).poisson(bkg + src).astype(np.float32)
    patch = replace(simulate_patch("ctao", 5, size=size, population="plane"), data=counts, background_image=bkg,
                    mask=None)

    def rows(first: bool | None):  # None: the head's (the shipped CTAO head's: first)
        cat = D._detect_likelihood(patch, det, inst, head, None, bkg, 0.4, 25.0, passes=2, extension=True,
                                   extension_first=first)
        x, y = np.asarray(cat["x"]), np.asarray(cat["y"])
        return x, y, np.asarray(cat["extension"].to_value("deg")), np.asarray(cat["ts_ext"])

    assert head.likelihood_extension_first is True
    x, y, ext, ts_ext = rows(None)
    assert len(x) == 2
    big = int(np.argmax(ext))
    assert np.hypot(x[big] - 44, y[big] - 48) < 1.0 and 0.095 < ext[big] < 0.15 and np.isfinite(ts_ext[big])
    assert np.hypot(x[1 - big] - 56, y[1 - big] - 48) < 1.5 and ext[1 - big] < 0.02
    monkeypatch.setattr("skyfm.catalog.extended.REFINE_SIZE", False)
    x, y, ext, _ = rows(False)
    assert len(x) > 2  # the rim's false rows


def test_likelihood_selection_splits_a_blend_the_ts_map_merges(model_dir):
    """A Fermi-LAT cube with two sources 2.5 px apart (the TS map's peaks merge them) and a background model: with
    the blend test the catalog holds both, near their true positions, with ts_split; without it, one row from one
    pass, and from two (the second pass's TS map finds the fainter one beside the first's fit) a pair whose
    brighter row sits between the two."""
    from dataclasses import replace

    import skyfm.detect as D
    from skyfm.catalog import likelihood as lk
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    p = simulate_patch("fermi-lat", 5, size=64, population="resampled")
    inst = det.instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    wts = lk.powerlaw_band_weights(inst)
    bkg = np.stack([np.full((64, 64), v) for v in (2.0, 1.0, 0.3, 0.1, 0.03, 0.01)])
    src = lk.add_point_sources(np.zeros_like(bkg), kernels, [32.0, 32.0], [31.0, 33.5],
                               np.outer([6000.0, 3000.0], wts) / 0.97)
    counts = np.random.default_rng(4).poisson(bkg + src).astype(np.float32)
    patch = replace(p, data=counts, background_image=bkg, mask=None)
    head = det.head_config("fermi-lat")
    cats = {(on, passes): D._detect_likelihood(patch, det, inst, head, None, bkg, 0.5, 25.0, passes=passes, split=on)
            for on in (False, True) for passes in (1, 2)}
    near = lambda cat, x, y: np.min(np.hypot(np.asarray(cat["x"]) - x, np.asarray(cat["y"]) - y))  # noqa: E731
    assert len(cats[False, 1]) == 1
    assert len(cats[False, 2]) == 2 and near(cats[False, 2], 32.0, 31.0) > 0.6
    for passes in (1, 2):
        cat = cats[True, passes]
        assert len(cat) == 2 and near(cat, 32.0, 31.0) < 0.6 and near(cat, 32.0, 33.5) < 0.6
        assert np.all(np.isfinite(np.asarray(cat["ts_split"])))


def test_ctao_cubes_without_a_model_are_selected_by_the_likelihood_and_tested_for_extension():
    """The shipped CTAO head selects by TS also without a background model (``likelihood_without_model``), Fermi-LAT's
    by the network's probability; the CTAO head's extension test then runs against the estimated background (with
    selection="likelihood" it met no background and failed before)."""
    from dataclasses import replace

    from skyfm.detect import detect_patch, resolve_selection
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    shipped = load_detector()
    ctao, fermi = load_instrument("ctao"), load_instrument("fermi-lat")
    assert resolve_selection("auto", ctao, None, head=shipped.head_config("ctao")) == "likelihood"
    assert resolve_selection("auto", ctao, None, refine=False, head=shipped.head_config("ctao")) == "network"
    assert resolve_selection("auto", fermi, None, head=shipped.head_config("fermi-lat")) == "network"
    p = replace(simulate_patch("ctao", 2, size=64, population="plane"), background_image=None)
    cat = detect_patch(p, shipped)
    assert cat.meta["selection"] == "likelihood" and "ts_ext" in cat.colnames
    assert len(cat) > 0 and np.all(np.asarray(cat["ts"]) >= 25.0)
    assert detect_patch(p, shipped, selection="network").meta["selection"] == "network"


def test_the_trail_filter_comes_from_the_head_unless_told(model_dir, monkeypatch):
    """The shipped MeerLICHT and Hubble heads drop detections on satellite trails by default, WISE's does not;
    the caller's True / False wins."""
    import skyfm.detect as D
    from skyfm.heads import load_detector

    shipped = load_detector()
    assert shipped.head_config("meerlicht").drop_trails and shipped.head_config("hubble").drop_trails
    assert shipped.head_config("wise").drop_trails is False
    det = load_detector(model_dir)
    p = simulate_patch("meerlicht", 3, size=64)
    calls = []
    monkeypatch.setattr(D, "drop_trail_detections", lambda d, *a, **k: calls.append(len(d["x"])) or d)
    det.head_config("meerlicht").drop_trails = False
    D.detect_patch(p, det, min_score=0.0101)
    assert calls == []
    D.detect_patch(p, det, min_score=0.0101, drop_trails=True)
    assert len(calls) == 1
    D.detect_patch(p, det, min_score=0.0101, drop_trails=True, refine=False)  # without the PSF fit too
    assert len(calls) == 2
    det.head_config("meerlicht").drop_trails = True
    D.detect_patch(p, det, min_score=0.0101)
    D.detect_patch(p, det, min_score=0.0101, drop_trails=False)
    assert len(calls) == 3


def test_likelihood_passes_come_from_the_head_and_bad_values_are_one_line(model_dir, monkeypatch):
    """detect_patch's likelihood selection looks as many times as the head says (the shipped Fermi-LAT head: twice,
    chosen on validation seeds) unless told; a value that is not a whole number >= 1 is a clear error."""
    import skyfm.detect as D
    from skyfm.errors import SkyfmError
    from skyfm.heads import load_detector

    shipped = load_detector()  # the shipped detector: two passes for Fermi-LAT and (Run 48) CTAO
    assert [shipped.head_config(i).likelihood_passes for i in ("fermi-lat", "ctao")] == [2, 2]
    det = load_detector(model_dir)
    p = simulate_patch("fermi-lat", 3, size=48, population="resampled")
    seen = []
    monkeypatch.setattr(D, "_detect_likelihood", lambda *a, passes, **k: seen.append(passes))
    D.detect_patch(p, det)
    det.head_config("fermi-lat").likelihood_passes = 3
    D.detect_patch(p, det)
    D.detect_patch(p, det, passes=1)
    assert seen == [D.LIKELIHOOD_PASSES, 3, 1]
    det.head_config("fermi-lat").likelihood_passes = 0
    with pytest.raises(SkyfmError, match="whole number >= 1"):
        D.detect_patch(p, det)


def _field_rows(model_dir):
    """A MeerLICHT field image and its true sources with SNR >= 15 as detections the network called stars, with
    the shipped head's Kron settings and class calibration off: (det, inst, patch, rows, is_galaxy, true flux,
    head)."""
    import copy

    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector(model_dir)
    inst = load_instrument("meerlicht")
    p = simulate_patch("meerlicht", 36, size=384, bands=["q"], scene="field")
    t = p.truth[(np.asarray(p.truth["snr"]) >= 15) & ~np.asarray(p.truth["saturated"], bool)]
    galaxy = np.asarray(t["class"]) == "galaxy"
    assert galaxy.sum() >= 4 and (~galaxy).sum() >= 4
    n, flux = len(t), np.asarray(t["flux"], float)
    d = {"x": np.asarray(t["x"], float) + 0.2, "y": np.asarray(t["y"], float) - 0.2, "pos_err": np.full(n, 0.5),
         "score": np.ones(n), "class_prob": np.tile([1.0, 0.0], (n, 1)), "extension": np.zeros(n),
         "flux": flux, "flux_band": flux[:, None], "flux_err": flux, "flux_band_err": flux[:, None]}
    head = copy.deepcopy(det.head_config("meerlicht"))
    head.kron_excess_min, head.kron_max_crowding, head.class_calibration = None, None, None
    return det, inst, p, d, galaxy, flux, head


def test_the_class_calibration_calls_galaxies_where_an_aperture_was_measured(model_dir):
    """With a head's ``class_calibration``, the rows with a Kron measurement take its probability (here from the
    excess alone, the network having called every source a star), the others keep the network's; a malformed
    calibration is a one-line error."""
    from skyfm.detect import refine_ccd_tile
    from skyfm.errors import SkyfmError

    det, inst, p, d, galaxy, flux, head = _field_rows(model_dir)
    off = refine_ccd_tile(dict(d), p, inst, head)
    assert np.array_equal(off["class_prob"], d["class_prob"])
    head.class_calibration = {"class": "galaxy", "intercept": -2.0, "coef": {"kron_excess": 2.0}}
    on = refine_ccd_tile(dict(d), p, inst, head)
    measured = np.isfinite(on["kron_excess"])
    assert measured.mean() > 0.8 and np.array_equal(np.isfinite(on["kron_size"]), measured)
    size = on["kron_size"]
    assert abs(np.median(size[measured & ~galaxy]) - 1) < 0.15 < np.median(size[measured & galaxy]) - 1
    expect = 1 / (1 + np.exp(2.0 - 2.0 * np.arcsinh(on["kron_excess"][measured] / 2)))
    assert np.allclose(on["class_prob"][measured, 1], expect) and np.allclose(on["class_prob"].sum(axis=1), 1)
    assert np.array_equal(on["class_prob"][~measured], d["class_prob"][~measured])
    called = on["class_prob"][:, 1] >= 0.5
    assert called[galaxy & measured].mean() >= 0.5 and called[~galaxy & measured].mean() <= 0.25
    head.class_calibration = {"class": "galaxy", "intercept": 0.0, "coef": {"size": 1.0}}
    with pytest.raises(SkyfmError, match="class_calibration should be"):
        refine_ccd_tile(dict(d), p, inst, head)


def test_galaxies_take_the_kron_flux_where_the_head_says_and_only_there(model_dir):
    """A MeerLICHT field: the refined rows carry Kron fluxes and their excess (rows in places more crowded than
    ``kron_max_crowding`` are not measured); with the head's ``kron_excess_min`` unset no row takes them, set,
    exactly the rows at or above it do, with the Kron flux, its error and floor, and an extension; those are
    mostly the galaxies, whose flux comes closer to the truth."""
    from skyfm.detect import refine_ccd_tile

    det, inst, p, d, galaxy, flux, head = _field_rows(model_dir)
    off = refine_ccd_tile(dict(d), p, inst, head)
    assert not (off["fit"] == 3).any() and np.isfinite(off["flux_kron"][off["fit"] >= 1]).mean() > 0.8
    head.kron_excess_min, head.kron_flux_err_floor = 2.0, 0.3
    on = refine_ccd_tile(dict(d), p, inst, head)
    takes = np.nan_to_num(off["kron_excess"], nan=-np.inf) >= 2.0
    assert np.array_equal(on["fit"] == 3, takes) and takes.any()
    assert np.allclose(on["flux"][takes], on["flux_kron"][takes])
    assert np.allclose(on["flux_err"][takes], np.hypot(on["flux_kron_err"][takes], 0.3 * on["flux_kron"][takes]))
    assert np.all(on["extension"][takes] >= 0) and np.allclose(on["flux"][~takes], off["flux"][~takes])
    assert takes[galaxy].mean() >= 0.5 and takes[~galaxy].mean() <= 0.25
    g = takes & galaxy
    assert np.median(np.abs(np.log(on["flux"][g] / flux[g]))) < np.median(np.abs(np.log(off["flux"][g] / flux[g])))
    from skyfm.detect import detect_patch

    peak = PeakDetector(det.config, det.foundation)  # a stand-in network that finds the image's peaks
    peak.load_state_dict(det.state_dict())
    cat = detect_patch(p, peak, min_score=0.5, precision="fp32")
    for name in ("flux_kron", "flux_kron_err"):
        assert cat[name].unit == cat["flux"].unit
    assert np.isfinite(cat["flux_kron"].value).any() and "kron_excess" in cat.colnames and "kron_size" in cat.colnames
    head.kron_max_crowding = 0.0  # no source is that sparse: none is measured, none takes it
    none = refine_ccd_tile(dict(d), p, inst, head)
    assert not (none["fit"] == 3).any() and np.isnan(none["flux_kron"]).all()


def _disks_on_empty_sky(size: int, disks) -> Patch:
    """A MeerLICHT q image of ``size``^2 (an empty scene's sky and noise, seed 5) with exponential disk galaxies
    ``disks`` ((x, y, flux, half-light radius px), ...) seen through the band's PSF (Gaussian) and Poisson noise."""
    from scipy.ndimage import gaussian_filter

    from skyfm.instruments import load_instrument

    inst = load_instrument("meerlicht")
    p = simulate_patch("meerlicht", 5, size=size, bands=["q"], scene="empty")
    yy, xx = np.mgrid[:size, :size]
    sigma = inst.band("q").psf.fwhm_deg / inst.pixel_scale_deg / 2.355
    light = 0.0
    for x, y, flux, r_e in disks:
        disk = gaussian_filter(np.exp(-1.678 * np.hypot(xx - x, yy - y) / r_e), sigma)
        light = light + flux * disk / disk.sum()
    p.data = p.data + np.random.default_rng(1).poisson(light)[None].astype(p.data.dtype)
    return p


def _peaks_taking_kron(model_dir) -> PeakDetector:
    """The stand-in network on the test model, its MeerLICHT head taking Kron fluxes at an excess of 2 sigma."""
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    peak = PeakDetector(det.config, det.foundation)
    peak.load_state_dict(det.state_dict())
    peak.head_config("meerlicht").kron_excess_min = 2.0
    return peak


def test_kron_apertures_that_run_off_a_tile_are_measured_whole_across_the_tiles(model_dir):
    """Tiles of 128 px (overlap 32) over a 384-px MeerLICHT image with two disk galaxies (half-light radii 6-8 px,
    Kron apertures ~25-30 px) inside a tile's core 2 px from its boundary: one a detection, one the residual
    search's find. Their apertures run ~15 px off their tile, which keeps their PSF values (the find pending);
    measured across the tiles, they take the Kron fluxes a tile centred on each gives them."""
    import copy

    from skyfm.data.tiling import Tile, tile_grid, tile_patch
    from skyfm.detect import _measure_cut_apertures, refine_ccd_tile
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    inst = load_instrument("meerlicht")
    head = copy.deepcopy(load_detector(model_dir).head_config("meerlicht"))
    head.kron_excess_min, head.kron_centroid = 2.0, False
    head.residual_search = {"min_snr": 5.0, "intercept": 0.0, "slope": 1.0}
    galaxy, find = (109.6, 200.3), (200.4, 110.1)  # tile cores meet at 112 (x) and 112 (y)
    p = _disks_on_empty_sky(384, [(*galaxy, 2e5, 8.0), (*find, 6e4, 6.0)])
    row = {"x": np.array([galaxy[0]]), "y": np.array([galaxy[1]]), "pos_err": np.full(1, 0.5), "score": np.ones(1),
           "class_prob": np.array([[0.5, 0.5]]), "extension": np.zeros(1), "flux": np.array([1e5]),
           "flux_band": np.array([[1e5]]), "flux_err": np.array([1e5]), "flux_band_err": np.array([[1e5]]),
           "fit": np.zeros(1, np.int8)}

    def refine(tile, rows):  # image pixels in and out
        rows = {k: v.copy() for k, v in rows.items()}
        rows["x"], rows["y"] = rows["x"] - tile.x0, rows["y"] - tile.y0
        out = refine_ccd_tile(rows, tile_patch(p, tile), inst, head)
        out["x"], out["y"] = out["x"] + tile.x0, out["y"] + tile.y0
        return out

    grid = tile_grid(384, 384, 128, 32)
    parts = []
    for t in grid:
        r = refine(t, {k: v[t.owns(row["x"], row["y"])] for k, v in row.items()})
        parts.append({k: v[t.owns(r["x"], r["y"])] for k, v in r.items()})
    tiled = {k: np.concatenate([r[k] for r in parts]) for k in parts[0]}
    nearest = lambda rows, xy: int(np.argmin(np.hypot(rows["x"] - xy[0], rows["y"] - xy[1])))
    g, f = nearest(tiled, galaxy), nearest(tiled, find)
    assert tiled["kron_cut"][[g, f]].all() and np.isnan(tiled["flux_kron"][[g, f]]).all()
    assert tiled["fit"][g] == 2 and tiled["fit"][f] == 4 and np.isfinite(tiled["flux"][f])  # PSF values meanwhile
    measured = _measure_cut_apertures(copy.deepcopy(tiled), p, inst, head, grid, (128, 128), inst.pixel_scale_deg,
                                      {}, {}, [], None)
    for xy, rows, fit in ((galaxy, row, 3), (find, {k: v[:0] for k, v in row.items()}, 4)):
        centred = refine(Tile(int(xy[1]) - 64, int(xy[1]) + 64, int(xy[0]) - 64, int(xy[0]) + 64, 0, 0, 0, 0), rows)
        i, j = nearest(measured, xy), nearest(centred, xy)
        assert not centred["kron_cut"][j] and centred["fit"][j] == measured["fit"][i] == fit
        assert abs(measured["flux"][i] / centred["flux"][j] - 1) < 0.05
        assert measured["flux"][i] == measured["flux_kron"][i] and measured["extension"][i] > 0


def test_a_galaxy_across_zoomed_tiles_takes_the_kron_flux_of_one_tile(model_dir, monkeypatch):
    """An image of pixels twice the instrument's (tiles resampled for the network): a disk galaxy whose aperture
    crosses small tiles is measured in the image's own pixels after the tiles, and takes the Kron flux (in the
    image's units) that one tile over the whole image gives it."""
    import dataclasses

    import skyfm.detect as detect_module

    peak = _peaks_taking_kron(model_dir)
    p = _disks_on_empty_sky(512, [(250.3, 300.2, 2e5, 8.0)])
    coarse = dataclasses.replace(p, data=p.data.reshape(1, 256, 2, 256, 2).sum(axis=(2, 4)), truth=None,
                                 wcs=p.wcs.slice((slice(None, None, 2), slice(None, None, 2))), mask=None,
                                 source_image=None, background_image=None, contaminant_mask=None)
    measured = []
    original = detect_module._measure_cut_apertures

    def spy(arrays, *args, **kwargs):
        measured.append(np.c_[arrays["x"], arrays["y"]][arrays["kron_cut"]])
        return original(arrays, *args, **kwargs)

    monkeypatch.setattr(detect_module, "_measure_cut_apertures", spy)
    fluxes = []
    for tile_size in (128, 512):  # network pixels: tiles of 64 image pixels, and one tile
        cat = detect_module.detect_patch(coarse, peak, min_score=0.5, tile_size=tile_size, precision="fp32")
        i = int(np.argmin(np.hypot(np.asarray(cat["x"]) - 124.9, np.asarray(cat["y"]) - 149.85)))
        assert cat["fit"][i] == 3 and "kron_cut" not in cat.colnames
        fluxes.append(float(cat["flux"][i].value))
        if tile_size == 128:  # measured across the tiles
            assert np.hypot(*(measured[0] - [124.9, 149.85]).T).min() < 1.0
    assert abs(fluxes[0] / fluxes[1] - 1) < 0.05 and abs(fluxes[1] / 2e5 - 1) < 0.1
    assert len(measured) == 1  # one tile over the whole image: its apertures are measured in it, as before


def test_a_file_read_tile_by_tile_measures_apertures_across_tiles_as_in_memory(model_dir, tmp_path):
    """A plain FITS image (read lazily, a window per tile) with a disk galaxy whose aperture crosses 128-px tiles:
    the cut-out across the tiles is read from the file, and the catalog is the one of the image in memory."""
    from astropy.io import fits

    from skyfm.catalog import read_catalog
    from skyfm.detect import detect_file, detect_patch

    peak = _peaks_taking_kron(model_dir)
    p = _disks_on_empty_sky(384, [(109.6, 200.3, 2e5, 8.0)])
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU(p.data[0].astype(np.float32), header=p.wcs.to_header()).writeto(path)
    options = dict(min_score=0.5, tile_size=128, precision="fp32")
    memory = detect_patch(p, peak, **options)
    detect_file(path, tmp_path / "cat.fits", instrument="meerlicht", band="q", model_dir=peak, progress=False,
                **options)
    read = read_catalog(tmp_path / "cat.fits")
    i = int(np.argmin(np.hypot(np.asarray(memory["x"]) - 109.6, np.asarray(memory["y"]) - 200.3)))
    assert memory["fit"][i] == 3 and abs(memory["flux"][i].value / 2e5 - 1) < 0.1
    assert len(read) == len(memory)
    for name in ("x", "y", "flux", "flux_kron", "fit"):
        assert np.allclose(np.asarray(read[name], float), np.asarray(memory[name], float), rtol=1e-4, equal_nan=True)


def test_tiles_refined_in_threads_give_the_same_catalog(model_dir):
    """Threads share the CCD refinement of a batch's tiles, while the network runs on the next batch (four batches
    here); the seeing, which accumulates from tile to tile, is taken in tile order, so the catalog does not depend
    on the number of threads."""
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    peak = PeakDetector(det.config, det.foundation)
    peak.load_state_dict(det.state_dict())
    p = simulate_patch("meerlicht", 12, size=256, bands=["q"], scene="crowded")
    one, three = (detect_patch(p, peak, min_score=0.5, tile_size=64, batch_size=8, refine_workers=w) for w in (1, 3))
    assert len(one) > 20 and len(one) == len(three)
    for name in ("x", "y", "flux", "flux_err", "pos_err", "fit"):
        assert np.array_equal(np.asarray(one[name]), np.asarray(three[name]), equal_nan=True), name


def test_a_tile_whose_refinement_fails_stops_detection_with_its_error_and_no_hang(model_dir, monkeypatch):
    """The tiles' fits run in threads beside the network's next batch: an error in one of them reaches the caller
    (the later tiles, waiting for their turn, are handed on or cancelled, not left waiting)."""
    import skyfm.detect as D
    from skyfm.heads import load_detector

    det = load_detector(model_dir)
    peak = PeakDetector(det.config, det.foundation)
    peak.load_state_dict(det.state_dict())
    calls = []
    refine = D.refine_ccd_tile

    def failing(d, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a fit went wrong")
        return refine(d, *args, **kwargs)

    monkeypatch.setattr(D, "refine_ccd_tile", failing)
    p = simulate_patch("meerlicht", 12, size=256, bands=["q"], scene="crowded")
    with pytest.raises(RuntimeError, match="a fit went wrong"):
        D.detect_patch(p, peak, min_score=0.5, tile_size=64, batch_size=4, refine_workers=2)


def test_tile_turns_pass_in_ticket_order_and_skips_hand_on():
    import threading
    import time

    from skyfm.detect import _TileTurns

    turns, order = _TileTurns(), []

    def job(k):
        if k == 2:  # a job that never enters the section (a tile with nothing to fit) must not block the rest
            turns.skip(k)
            return
        time.sleep(0.01 * (5 - k))  # later tickets arrive first
        with turns.turn(k):
            order.append(k)
        turns.skip(k)

    threads = [threading.Thread(target=job, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 3, 4]


def test_unconfirmed_detections_need_the_heads_higher_threshold():
    """``unconfirmed_min_score``: the peaks the PSF fit does not confirm (``fit`` 0) are kept only above it (with
    ``unconfirmed_max_crowding``, only where the crowding is below that; with ``unconfirmed_max_chi2`` also the
    fitted rows whose fit's chi-square exceeds it); the confirmed rows are those of a run without it; without the
    refinement nothing is cut; a bad value is an error."""
    import copy

    from skyfm.detect import detect_patch, get_detector
    from skyfm.errors import SkyfmError

    det = copy.deepcopy(get_detector(None))
    head = det.head_config("wise")
    p = simulate_patch("wise", 6, size=128, scene="crowded")
    head.unconfirmed_min_score = None
    every = detect_patch(p, det)
    head.unconfirmed_min_score = 0.35
    cut = detect_patch(p, det)
    fit, score = np.asarray(every["fit"]), np.asarray(every["score"])
    dropped = (fit == 0) & (score < 0.35)
    assert dropped.sum() >= 10 and len(cut) == len(every) - dropped.sum()
    assert np.all((np.asarray(cut["fit"]) != 0) | (np.asarray(cut["score"]) >= 0.35))
    assert np.array_equal(np.asarray(cut["x"]), np.asarray(every["x"])[~dropped])
    assert len(detect_patch(p, det, refine=False)) >= len(every) - 5  # no fit, no unconfirmed rows to cut
    given = detect_patch(p, det, min_score=0.25)  # another threshold, the caller's: it holds for every row
    assert np.any((np.asarray(given["fit"]) == 0) & (np.asarray(given["score"]) < 0.35))
    assert np.all(np.asarray(given["score"]) >= 0.25)
    assert head.unconfirmed_threshold(0.5) == 0.5  # never below the detection threshold itself
    crowd = np.nan_to_num(np.asarray(every["crowding"], float), nan=0.0)
    c = np.sort(crowd[dropped])
    limit = float(0.5 * (c[len(c) // 2 - 1] + c[len(c) // 2]))  # between two rows' values: the catalog's are float32
    head.unconfirmed_max_crowding = limit  # only where the field is sparser than this
    sparse_cut = detect_patch(p, det)
    assert len(sparse_cut) == len(every) - (dropped & (crowd < limit)).sum()
    head.unconfirmed_max_crowding = 0.0  # nowhere
    assert len(detect_patch(p, det)) == len(every)
    head.unconfirmed_max_crowding = -1.0
    with pytest.raises(SkyfmError, match="unconfirmed_max_crowding"):
        detect_patch(p, det)
    # a fit far off the data confirms nothing: fitted rows (not the search's finds) above the chi-square limit
    # count as unconfirmed
    head.unconfirmed_max_crowding = None
    chi2 = np.nan_to_num(np.asarray(every["fit_chi2"], float), nan=0.0)
    fitted_low = (fit != 0) & (fit != 4) & (score < 0.35)
    limit = float(np.median(chi2[fitted_low])) * 1.0001
    misfit = fitted_low & (chi2 > limit)
    assert misfit.sum() >= 3
    head.unconfirmed_max_chi2 = limit
    assert len(detect_patch(p, det)) == len(every) - dropped.sum() - misfit.sum()
    head.unconfirmed_max_chi2 = 0.0
    with pytest.raises(SkyfmError, match="unconfirmed_max_chi2"):
        detect_patch(p, det)
    head.unconfirmed_max_crowding = None
    head.unconfirmed_min_score = 1.5
    with pytest.raises(SkyfmError, match="unconfirmed_min_score"):
        detect_patch(p, det)


def test_kron_rows_take_their_windowed_centroid_where_the_head_says(model_dir):
    """With the head's ``kron_centroid`` the rows that take the Kron flux (``fit`` 3) move to the windowed centroid
    of their light and no other row moves; the galaxies among them land no farther from their true centres."""
    from skyfm.detect import refine_ccd_tile

    det, inst, p, d, galaxy, flux, head = _field_rows(model_dir)
    n = len(d["x"])
    head.kron_excess_min, head.kron_centroid = 2.0, False
    off = refine_ccd_tile(dict(d), p, inst, head)
    head.kron_centroid = True
    on = refine_ccd_tile(dict(d), p, inst, head)
    assert np.array_equal(on["fit"][:n], off["fit"][:n])
    kron = on["fit"][:n] == 3
    moved = np.hypot(on["x"][:n] - off["x"][:n], on["y"][:n] - off["y"][:n])
    assert kron.sum() >= 3 and np.all(moved[~kron] == 0) and np.all(moved[kron] > 0)
    assert np.all(on["pos_err"][:n][kron] > 0)
    tx, ty = d["x"] - 0.2, d["y"] + 0.2  # _field_rows started the rows 0.2 px off in x and y
    g = kron & galaxy
    miss_on = np.hypot(on["x"][:n] - tx, on["y"][:n] - ty)[g]
    miss_off = np.hypot(off["x"][:n] - tx, off["y"][:n] - ty)[g]
    assert np.median(miss_on) <= np.median(miss_off)

def _two_wise_stars(star: float, flux_err: float):
    """A small clean WISE image with two bright stars and their detections (star probability ``star``, network
    flux errors ``flux_err``): (inst, patch, rows, the shipped WISE head)."""
    from skyfm.detect import get_detector
    from skyfm.instruments import load_instrument

    p = simulate_patch("wise", 12, size=96, scene="field", contaminants=False,
                       inject={"x": [30.3, 60.7], "y": [40.2, 50.5], "mag": [11.0, 11.5]})
    n = 2
    d = {"x": np.array([30.3, 60.7]), "y": np.array([40.2, 50.5]), "pos_err": np.full(n, 0.5), "score": np.ones(n),
         "class_prob": np.tile([star, 1.0 - star], (n, 1)), "extension": np.zeros(n), "flux": np.full(n, 1e4),
         "flux_band": np.full((n, 4), 2.5e3), "flux_err": np.full(n, flux_err),
         "flux_band_err": np.full((n, 4), flux_err / 4), "fit": np.zeros(n, np.int8)}
    for k in ("fit_chi2", "crowding", "flux_confusion", "flux_kron", "flux_kron_err", "kron_excess", "kron_size"):
        d[k] = np.full(n, np.nan)
    return load_instrument("wise"), p, d, get_detector(None).head_config("wise")

def test_a_psf_fit_with_a_far_negative_band_flux_keeps_the_networks_values(monkeypatch):
    """No source has negative light: a fit whose band flux lies 5 sigma below zero (peaks crowded onto one bright
    galaxy trading its light between them) is a fit gone wrong, and the row keeps the network's values (fit 0)."""
    import copy

    import skyfm.catalog.psf_fit as pf
    from skyfm.detect import refine_ccd_tile

    inst, p, d, head = _two_wise_stars(star=0.5, flux_err=1e3)
    head = copy.copy(head)
    head.companion_search = None  # a first fit gone wrong would leave a companion's light: this test is the rule's
    n = 2
    good = refine_ccd_tile(dict(d), p, inst, head)
    assert np.all(good["fit"][:n] > 0)  # both bright stars fitted
    real_fit = pf.fit_psf_sources

    def gone_wrong(*args, **kwargs):
        f = real_fit(*args, **kwargs)
        if len(f["x"]) == n:  # the detections' fit (not the residual search's finds)
            f["flux_band"] = f["flux_band"].copy()
            f["flux_band"][0, 3] = -6.0 * f["flux_band_err"][0, 3]
        return f

    monkeypatch.setattr(pf, "fit_psf_sources", gone_wrong)
    bad = refine_ccd_tile(dict(d), p, inst, head)
    assert bad["fit"][0] == 0 and bad["fit"][1] > 0
    assert bad["flux"][0] == d["flux"][0] and np.array_equal(bad["flux_band"][0], d["flux_band"][0])


def test_a_dead_pixel_in_a_bright_sky_band_is_left_out_of_the_psf_fit(monkeypatch):
    """A dead pixel reads zero: under WISE W3 / W4's bright sky it lies hundreds of sigma below it, and left in the
    fit it alone sets the chi-square (and so the errors) of the star whose box holds it; out of the fit the star's
    chi-square and flux are those of the clean image."""
    import skyfm.detect as D
    from skyfm.detect import refine_ccd_tile

    inst, p, d, head = _two_wise_stars(star=1.0, flux_err=1e5)  # errors the fit's beat: PSF fluxes (fit 2)
    n = 2
    clean = refine_ccd_tile(dict(d), p, inst, head)
    dead = p.data.copy()
    dead[3, 43, 33] = dead[2, 38, 27] = 0.0  # one dead pixel in W4 and one in W3, in the first star's box
    p_dead = type(p)(**{**p.__dict__, "data": dead})
    kept = refine_ccd_tile(dict(d), p_dead, inst, head)
    assert np.all(kept["fit"][:n] == 2) and kept["fit_chi2"][0] < 1.2 * clean["fit_chi2"][0] + 0.1
    assert np.allclose(kept["flux"][:n], clean["flux"][:n], rtol=0.01) and kept["fit_chi2"][1] == pytest.approx(
        clean["fit_chi2"][1], rel=0.01)
    monkeypatch.setattr(D, "DEAD_PIXEL_SIGMA", np.inf)  # the pixels in the fit: the chi-square is theirs
    left_in = refine_ccd_tile(dict(d), p_dead, inst, head)
    assert left_in["fit_chi2"][0] > 10 * clean["fit_chi2"][0]


def test_the_second_star_of_a_blend_is_found_as_a_companion_and_a_lone_bright_star_has_none():
    """Two stars 0.9 FWHM apart that the network took as one detection, and a lone star 3.5x brighter: with the
    head's companion search the blend's second star is a row of its own (fit 5, within a pixel of it, scored by
    the head's logistic in its fit SNR) and the first one's fit moves towards its true place; the lone star's misfit
    gives no companion. Without the search (and without the residual search, whose region holds the detection) the
    blend stays one row."""
    import copy

    from skyfm.detect import get_detector, refine_ccd_tile
    from skyfm.errors import SkyfmError
    from skyfm.instruments import load_instrument

    inst = load_instrument("meerlicht")
    head = copy.deepcopy(get_detector(None).head_config("meerlicht"))
    head.residual_search = None
    fwhm = inst.band("q").psf.fwhm_deg / inst.pixel_scale_deg
    x, y = np.array([30.3, 30.3 + 0.9 * fwhm, 75.6]), np.array([40.2, 40.9, 70.4])
    p = simulate_patch("meerlicht", 3, size=110, bands=["q"], scene="empty", contaminants=False,
                       inject={"x": x, "y": y, "mag": np.array([[16.5], [17.5], [14.0]])})
    n = 2
    d = {"x": np.array([x[0] + 0.6, x[2]]), "y": np.array([y[0] + 0.2, y[2]]), "pos_err": np.full(n, 0.5),
         "score": np.ones(n), "class_prob": np.tile([1.0, 0.0], (n, 1)), "extension": np.zeros(n),
         "flux": np.full(n, 1e4), "flux_band": np.full((n, 1), 1e4), "flux_err": np.full(n, 1e9),
         "flux_band_err": np.full((n, 1), 1e9), "fit": np.zeros(n, np.int8)}
    for k in ("fit_chi2", "crowding", "flux_confusion", "flux_kron", "flux_kron_err", "kron_excess", "kron_size"):
        d[k] = np.full(n, np.nan)
    alone = refine_ccd_tile(dict(d), p, inst, head)
    assert len(alone["x"]) == 2 and not np.any(alone["fit"] == 5)
    head.companion_search = {"min_snr": 4.0, "intercept": -1.0, "slope": 1.0}
    found = refine_ccd_tile(dict(d), p, inst, head)
    assert len(found["x"]) == 3 and found["fit"][2] == 5 and np.all(found["fit"][:2] >= 1)
    assert np.hypot(found["x"][2] - x[1], found["y"][2] - y[1]) < 1.0
    assert 5 / (5 + np.exp(1.0)) <= found["score"][2] < 1.0  # logistic(-1 + ln fit_snr), fit_snr >= 5 to be kept
    assert abs(found["x"][0] - x[0]) < abs(alone["x"][0] - x[0])
    head.companion_search = {"min_snr": 4.0, "intercept": "a", "slope": 1.0}
    with pytest.raises(SkyfmError, match="companion_search"):
        refine_ccd_tile(dict(d), p, inst, head)


def test_pixels_a_mask_file_flags_are_no_sources(tmp_path):
    """``--mask``: three stars under flagged pixels (a pipeline's trail or artefact flag, 16) are not detected;
    with ``--mask-bits 1`` the flag does not count and they are."""
    from astropy.io import fits
    from astropy.table import Table

    from skyfm.data.simulate.ccd import simulate_ccd_patch
    from skyfm.detect import detect_file, get_detector

    stars = [(30.3, 40.6), (70.2, 25.4), (60.7, 75.1)]
    inject = Table({"x": [s[0] for s in stars], "y": [s[1] for s in stars], "mag": [17.5] * 3})
    p = simulate_ccd_patch("meerlicht", 1_790_000_500, size=112, bands=["q"], scene="field", inject=inject,
                           seeing=2.5)
    header = p.wcs.to_header()
    header.update({"TELESCOP": "MeerLICHT", "FILTER": "q"})
    fits.PrimaryHDU(p.data[0], header=header).writeto(tmp_path / "q.fits")
    flags = np.zeros((112, 112), np.int16)
    for x, y in stars:
        flags[round(y) - 6:round(y) + 7, round(x) - 6:round(x) + 7] = 16
    fits.PrimaryHDU(flags).writeto(tmp_path / "q_mask.fits")
    det = get_detector(None)

    def found(**mask):
        cat = detect_file(tmp_path / "q.fits", model_dir=det, progress=False, **mask)
        x, y = np.asarray(cat["x"]), np.asarray(cat["y"])
        return sum(bool(np.any(np.hypot(x - sx, y - sy) < 3)) for sx, sy in stars)

    assert found() == 3
    assert found(mask=tmp_path / "q_mask.fits") == 0
    assert found(mask=tmp_path / "q_mask.fits", mask_bits=1) == 3


@pytest.mark.parametrize("estimated", [False, True])
def test_gamma_ray_classes_come_from_the_measured_spectrum(estimated):
    """The Fermi-LAT head's spectral_classifier (without a background model: spectral_classifier_estbg) replaces
    the network's class probabilities of the rows the likelihood fit measured (fit 2), from their band fluxes and
    statistical errors (the catalog's less the calibration): the same rows as without it, the same fluxes."""
    import copy
    import dataclasses

    from skyfm.detect import detect_patch, fit_statistical_band_errors, get_detector
    from skyfm.heads.classification import spectral_class_prob

    det = get_detector(None)
    classifier = det.config.heads["fermi-lat"].spectral_classifier_terms(estimated)
    assert classifier is not None and "shape" in classifier["features"]
    plain = copy.deepcopy(det)
    head = plain.config.heads["fermi-lat"]
    head.spectral_classifier = head.spectral_classifier_estbg = None
    p = simulate_patch("fermi-lat", 1_790_000_600, size=64, population="real", center=(330.0, 1.0))
    if estimated:
        p = dataclasses.replace(p, background_image=None)
    # the extension test's rows keep the class of their point fit's spectrum (apply_extension_test): off here
    with_it, without = detect_patch(p, det, test_extension=False), detect_patch(p, plain, test_extension=False)
    assert len(with_it) == len(without) and np.array_equal(with_it["flux_band"], without["flux_band"])
    fitted = np.asarray(with_it["fit"]) == 2
    assert fitted.sum() >= 3
    band, band_err = np.asarray(without["flux_band"])[fitted], np.asarray(without["flux_band_err"])[fitted]
    # the classifier reads the fit's statistical errors: the catalog's with the head's calibration taken out
    stat = fit_statistical_band_errors(head, estimated, band, band_err, np.asarray(without["crowding"])[fitted])
    ratio = stat / band_err
    assert np.all(ratio > 0) and np.all(ratio <= 1.0 / head.error_scales(fit=True, estimated=estimated)[0] + 1e-9)
    expected = spectral_class_prob(np.asarray(without["class_prob"])[fitted], classifier, band, stat)
    np.testing.assert_allclose(np.asarray(with_it["class_prob"])[fitted], expected, rtol=1e-5)
    assert not np.allclose(np.asarray(with_it["class_prob"])[fitted], np.asarray(without["class_prob"])[fitted])
    np.testing.assert_allclose(np.asarray(with_it["class_prob"]).sum(axis=1), 1.0, rtol=1e-5)
