"""Evaluation of a pretrained model: token labels, the linear probe, features and the tokenizer report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from skyfm.data import Patch
from skyfm.errors import SkyfmError
from skyfm.pretrain.evaluate import (
    AMBIGUOUS,
    NEGATIVE,
    POSITIVE,
    cell_source_snr,
    eval_patch_seed,
    faint_source_photometry,
    linear_probe,
    patch_fwhm_pix,
    simulate_eval_set,
    token_features,
    token_labels,
    tokenizer_report,
)

TINY = {"backbone.depth": 1, "backbone.embed_dim": 64, "tokenizer.codebook_size": 64}


def hand_made_patch(sources: list[tuple[float, float, float]], size: int = 32, seeing_arcsec: float | None = None,
                    data: np.ndarray | None = None) -> Patch:
    """A one-band MeerLICHT patch with a truth table of (x, y, snr) rows."""
    x, y, snr = (np.array(c, dtype=float) for c in zip(*sources)) if sources else (np.zeros(0),) * 3
    meta = {} if seeing_arcsec is None else {"seeing_q": seeing_arcsec}
    data = np.zeros((1, size, size), np.float32) if data is None else data
    return Patch(data, "meerlicht", ["q"], truth=Table({"x": x, "y": y, "snr": snr}), meta=meta)


# ------------------------------------------------------------------------------------------------ labels
def test_labels_mark_the_source_cell_a_ring_of_ambiguous_cells_and_clean_background():
    # 32x32 pixels, 8-pixel tokens: a 4x4 grid. A bright source at (x=14, y=6) is in cell (row 0, col 1).
    patch = hand_made_patch([(14.0, 6.0, 20.0)])
    labels = token_labels(patch, (4, 4), 8, fwhm_pix=3.0, background="distance")
    expected = np.full((4, 4), NEGATIVE)
    expected[0, 1] = POSITIVE
    # cells whose square comes within 3 px of (14, 6): (0, 2) 1.5 px right, (1, 1) 1.5 px below, (1, 2) 2.1 px
    expected[0, 2] = expected[1, 1] = expected[1, 2] = AMBIGUOUS
    np.testing.assert_array_equal(labels, expected)
    # (0, 0) is 6.5 px away: clean with a 3-px FWHM, ambiguous with a 7-px one
    assert token_labels(patch, (4, 4), 8, fwhm_pix=7.0, background="distance")[0, 0] == AMBIGUOUS


def test_labels_use_pixel_centres_faint_sources_and_the_seeing():
    # pixel centres are integers: x = 7.4 is still in column 0 of 8-px cells (which ends at 7.5), 7.6 is in column 1
    patch = hand_made_patch([(7.4, 20.0, 9.0), (7.6, 4.0, 9.0), (28.0, 28.0, 3.0), (20.0, 12.0, 0.5)])
    labels = token_labels(patch, (4, 4), 8, fwhm_pix=1.0, background="distance")
    assert labels[2, 0] == POSITIVE and labels[0, 1] == POSITIVE
    assert labels[3, 3] == AMBIGUOUS  # snr 3: neither a source (>= 5) nor clean background (none >= 1)
    assert labels[1, 2] == NEGATIVE  # snr 0.5 does not spoil a background cell
    assert (labels == POSITIVE).sum() == 2
    # the default FWHM is the patch's seeing (meta, arcsec) in pixels: 2.8" / 0.56"/px = 5 px
    seeing = hand_made_patch([(14.0, 6.0, 20.0)], seeing_arcsec=2.8)
    assert patch_fwhm_pix(seeing)[0] == pytest.approx(5.0)
    np.testing.assert_array_equal(token_labels(seeing, (4, 4), 8, background="distance"), token_labels(seeing, (4, 4), 8, fwhm_pix=5.0, background="distance"))
    with pytest.raises(SkyfmError, match="does not fit"):
        token_labels(patch, (5, 4), 8)


def test_light_labels_call_a_cell_background_only_when_the_sources_light_in_it_is_below_the_noise():
    # a bright source at (14, 6) in cell (0, 1) whose wide wing (sigma 6 px) reaches the next cells, on unit noise
    yy, xx = np.mgrid[0:32, 0:32]
    source = 20.0 * np.exp(-((xx - 14.0) ** 2 + (yy - 6.0) ** 2) / (2 * 6.0**2))[None].astype(np.float32)
    noise = np.random.default_rng(1).normal(0.0, 1.0, source.shape).astype(np.float32)
    patch = hand_made_patch([(14.0, 6.0, 50.0)], data=source + noise)
    patch.source_image = source
    light = cell_source_snr(patch, (4, 4), 8)
    # the cell's summed source light over sigma * 8 (the noise of 64 unit-sigma pixels)
    expected = source[0].reshape(4, 8, 4, 8).sum(axis=(1, 3)) / 8.0
    np.testing.assert_allclose(light, expected, rtol=0.1)  # sigma is estimated from data - source
    labels = token_labels(patch, (4, 4), 8)
    assert labels[0, 1] == POSITIVE
    np.testing.assert_array_equal(labels == NEGATIVE, (light < 1.0) & (labels != POSITIVE))
    assert (labels == NEGATIVE).sum() >= 1 and (labels == AMBIGUOUS).sum() >= 1
    # by distance with a 3-px FWHM, cells far inside the wing count as background; by light they do not
    by_distance = token_labels(patch, (4, 4), 8, fwhm_pix=3.0, background="distance")
    assert ((by_distance == NEGATIVE) & (labels == AMBIGUOUS)).any()
    with pytest.raises(SkyfmError, match="labelling"):
        token_labels(patch, (4, 4), 8, background="nearby")
    patch.source_image = None
    with pytest.raises(SkyfmError, match="source-only image"):
        token_labels(patch, (4, 4), 8)


def test_evaluation_seeds_are_not_training_seeds():
    from skyfm.data.shards import instrument_seed
    from skyfm.data.simulate import patch_seed

    for name in ("fermi-lat", "wise"):
        training = {patch_seed(instrument_seed(seed, name), i) for seed in (0, 1) for i in range(2000)}
        evaluation = {eval_patch_seed(name, i) for i in range(2000)}
        assert not training & evaluation
    assert eval_patch_seed("ctao", 3) == eval_patch_seed("ctao", 3) != eval_patch_seed("ctao", 3, seed=1)


# ------------------------------------------------------------------------------------------------- probe
def test_probe_separates_an_easy_feature_set_and_is_at_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    n_patches, per_patch = 60, 30
    groups = np.repeat(np.arange(n_patches), per_patch)
    labels = (rng.random(groups.size) < 0.2).astype(np.int8)
    labels[rng.random(groups.size) < 0.1] = AMBIGUOUS
    features = rng.normal(size=(groups.size, 16))
    features[:, 0] += 6.0 * (labels == POSITIVE)  # the source direction
    result = linear_probe(features, labels, groups, seed=1)
    assert result["balanced_accuracy"] > 0.95 and result["accuracy"] > 0.95
    assert result["n_train"] + result["n_test"] == (labels >= 0).sum()
    assert result["n_train_patches"] + result["n_test_patches"] == n_patches
    assert result["n_test_source"] + result["n_test_background"] == result["n_test"]

    shuffled = linear_probe(features, rng.permutation(labels), groups, seed=1)
    assert 0.38 < shuffled["balanced_accuracy"] < 0.62


def test_probe_splits_by_patch_so_patch_identity_cannot_leak():
    # Each patch has its own random feature vector and one label for all its tokens: memorising patches is the
    # only way to score, which works only if tokens of a test patch were seen in training.
    rng = np.random.default_rng(2)
    n_patches, per_patch, dim = 400, 3, 512
    patch_vectors = rng.normal(size=(n_patches, dim))
    patch_labels = rng.integers(0, 2, n_patches)
    groups = np.repeat(np.arange(n_patches), per_patch)
    features = patch_vectors[groups] + 0.05 * rng.normal(size=(groups.size, dim))
    labels = patch_labels[groups]
    by_patch = linear_probe(features, labels, groups, seed=0)
    by_token = linear_probe(features, labels, np.arange(groups.size), seed=0)  # what a token split would give
    assert by_token["balanced_accuracy"] > 0.9
    assert by_patch["balanced_accuracy"] < 0.7


def test_probe_refuses_what_it_cannot_split():
    features = np.zeros((10, 2))
    with pytest.raises(SkyfmError, match="two patches"):
        linear_probe(features, np.array([0, 1] * 5), np.zeros(10), seed=0)
    with pytest.raises(SkyfmError, match="one row per token"):
        linear_probe(features, np.zeros(9), np.zeros(10), seed=0)


# ------------------------------------------------------------------------------------ faint-source photometry
def gaussian_source_patch(flux: float, sigma_pix: float, sky: float, noise: float, seed: int = 0) -> Patch:
    """A 48x48 MeerLICHT-like patch: a Gaussian source of ``flux`` ADU at (24.3, 23.6) on sky + Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    x0, y0 = 24.3, 23.6
    source = flux * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma_pix**2)) / (2 * np.pi * sigma_pix**2)
    data = (sky + source + rng.normal(0, noise, source.shape))[None].astype(np.float32)
    fwhm_arcsec = 2.3548 * sigma_pix * 0.56
    return hand_made_patch([(x0, y0, 7.0)], size=48, seeing_arcsec=fwhm_arcsec, data=data)


def test_faint_source_photometry_measures_flux_and_the_ratio_through_a_reconstruction():
    sky, noise, sigma = 100.0, 2.0, 1.5
    patch = gaussian_source_patch(flux=400.0, sigma_pix=sigma, sky=sky, noise=noise)
    same = faint_source_photometry(patch, patch.data, patch.data)
    # an aperture of radius FWHM holds 1 - exp(-FWHM^2 / 2 sigma^2) = 93.75% of a Gaussian
    area = math.pi * (2.3548 * sigma) ** 2
    assert same["flux_original"][0] == pytest.approx(0.9375 * 400.0, abs=4 * noise * math.sqrt(area))
    assert same["flux_recon"][0] == same["flux_original"][0]
    assert same["snr_original"][0] == pytest.approx(same["flux_original"][0] / (noise * math.sqrt(area)), rel=0.2)

    halved = sky + 0.5 * (patch.data - sky)  # half the source, the same sky level
    half = faint_source_photometry(patch, patch.data, halved)
    assert half["flux_recon"][0] / half["flux_original"][0] == pytest.approx(0.5, rel=1e-3)
    # the noise is the original's for both: halving the flux halves the S/N
    assert half["snr_recon"][0] == pytest.approx(0.5 * half["snr_original"][0], rel=1e-3)
    # sources outside the faint range are not measured
    assert faint_source_photometry(patch, patch.data, patch.data, snr_range=(10, 20))["flux_original"].size == 0


# --------------------------------------------------------------------------- features and tokenizer, tiny model
@pytest.fixture(scope="module")
def tiny_setup():
    import torch

    from skyfm.foundation import create_model

    torch.manual_seed(0)
    model = create_model("skyfm-tiny", **TINY)
    patches = simulate_eval_set("fermi-lat", 2, size=32) + simulate_eval_set("meerlicht", 3, size=32)
    return model, patches


def test_token_features_give_one_row_per_token_with_its_label(tiny_setup):
    model, patches = tiny_setup
    tokens = token_features(model, patches, batch_size=2)
    grid = 32 // model.token_stride
    n = len(patches) * grid * grid
    assert tokens.features.shape == (n, model.embed_dim) and tokens.features.dtype == np.float32
    assert np.isfinite(tokens.features).all()
    np.testing.assert_array_equal(tokens.patch_index, np.repeat(np.arange(len(patches)), grid * grid))
    assert list(tokens.instrument[:: grid * grid]) == [p.instrument for p in patches]
    for i in (0, 4):
        for labelling in ("light", "distance"):
            np.testing.assert_array_equal(tokens.labels[labelling][tokens.patch_index == i],
                                          token_labels(patches[i], (grid, grid), model.token_stride,
                                                       background=labelling).reshape(-1))
    assert not model.training
    # a block's output as the features: same rows and labels, other values; the hook is removed afterwards
    block = token_features(model, patches, batch_size=2, layer=0)
    assert block.features.shape == tokens.features.shape and not np.allclose(block.features, tokens.features)
    np.testing.assert_array_equal(block.labels["light"], tokens.labels["light"])
    assert not model.backbone.blocks[0]._forward_hooks
    with pytest.raises(SkyfmError, match="not a block"):
        token_features(model, patches, layer=5)
    # every band's token side by side: Fermi-LAT's 6 bins fill the row, MeerLICHT's one band leaves zeros after it;
    # the valid bands' mean is the band-averaged map (batches of 2 mix the two instruments here)
    per_band = token_features(model, patches, batch_size=2, bands="concat")
    D, n_bands = model.embed_dim, max(p.n_bands for p in patches)
    assert per_band.features.shape == (n, n_bands * D)
    rows = per_band.features.reshape(n, n_bands, D)
    counts = np.array([patches[i].n_bands for i in per_band.patch_index])
    assert np.all(rows[counts == 1, 1:] == 0) and np.all(np.abs(rows[counts == n_bands]).sum(axis=2) > 0)
    mean = rows.sum(axis=1) / counts[:, None]
    np.testing.assert_allclose(mean, tokens.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(per_band.labels["light"], tokens.labels["light"])
    with pytest.raises(SkyfmError, match="'mean' or 'concat'"):
        token_features(model, patches, bands="max")


def test_tokenizer_report_runs_on_an_untrained_model_and_returns_the_documented_keys(tiny_setup):
    model, patches = tiny_setup
    report = tokenizer_report(model, patches, batch_size=4)
    assert set(report) == {"fermi-lat", "meerlicht", "all"}
    keys = {"n_patches", "mae", "mae_over_noise", "codebook_usage", "perplexity", "n_faint", "n_faint_visible",
            "flux_ratio_median", "flux_ratio_p16", "flux_ratio_p84", "detectable_share"}
    for name, entry in report.items():
        assert set(entry) == keys, name
        assert entry["mae"] > 0 and entry["mae_over_noise"] > 0
        assert 0 < entry["codebook_usage"] <= 1 and 1 <= entry["perplexity"] <= model.tokenizer.num_codes
        assert entry["n_faint_visible"] <= entry["n_faint"]
    assert report["fermi-lat"]["n_patches"] == 2 and report["meerlicht"]["n_patches"] == 3
    assert report["all"]["n_patches"] == 5
    assert report["all"]["n_faint"] == report["fermi-lat"]["n_faint"] + report["meerlicht"]["n_faint"]
    assert report["all"]["codebook_usage"] >= max(report[n]["codebook_usage"] for n in ("fermi-lat", "meerlicht"))


def test_probe_errors_show_a_probe_that_reads_intensity_not_excess():
    """A feature that grows with the patch's background level fires on bright backgrounds: probe_errors says so
    (false positives by background quartile rise), and counts recall by the centred source's snr."""
    from skyfm.pretrain.evaluate import TokenFeatures, centred_source_snr, probe_errors

    rng = np.random.default_rng(3)
    stride, size = 8, 32
    patches, feats, labels = [], [], []
    for i in range(60):
        level = float(rng.uniform(1.0, 10.0))
        snr = float(rng.choice([6.0, 30.0]))
        patch = hand_made_patch([(12.0, 12.0, snr)], size=size)
        patch.background_image = np.full((1, size, size), level, np.float32)
        patches.append(patch)
        grid = (size // stride, size // stride)
        lab = np.full(grid, NEGATIVE, np.int8)
        lab[1, 1] = POSITIVE
        assert centred_source_snr(patch, grid, stride)[1, 1] == snr
        intensity = 0.3 * level + 2.0 * (lab == POSITIVE) + rng.normal(0, 0.3, grid)
        feats.append(np.stack([intensity.ravel(), rng.normal(size=lab.size)], axis=1))
        labels.append(lab.ravel())
    n = len(patches) * (size // stride) ** 2
    tokens = TokenFeatures(np.concatenate(feats).astype(np.float32), {"light": np.concatenate(labels)},
                           np.repeat(np.arange(len(patches)), n // len(patches)), np.full(n, "meerlicht"))
    errors = probe_errors(tokens, patches, stride, seed=0)["meerlicht"]
    fpr = [r for _, _, _, r in errors["fpr_by_background"]]
    assert len(fpr) == 4 and fpr[3] > fpr[0] + 0.1
    bins = errors["recall_by_snr"]
    assert [n for _, _, n, _ in bins][1:3] == [0, 0] and bins[0][2] + bins[3][2] > 0
    with pytest.raises(SkyfmError, match="token cells"):
        probe_errors(tokens, patches[:-1], stride)
