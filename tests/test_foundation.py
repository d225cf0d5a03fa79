"""Foundation models: every registered model's shapes, padding invariance, embeddings, the masked-token
objective, the registry and save / load with its errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import skyfm
from skyfm.errors import SkyfmError
from skyfm.foundation import (
    FoundationConfig,
    FoundationModel,
    create_model,
    list_models,
    model_config,
    sample_token_mask,
)
from skyfm.foundation.embeddings import BandEmbedding, SkyPositionEmbedding, cell_offsets_deg
from skyfm.instruments import list_instruments, load_instrument

TINY = [name for name in list_models() if "tiny" in name]
BASE = [name for name in list_models() if "base" in name]


def make_batch(n_bands, size=64, seed=0, instrument="meerlicht", pixel_scale_deg=1.5e-4) -> dict:
    """A batch in the collate layout: ``n_bands`` is one band count per patch, padded to the largest."""
    g = torch.Generator().manual_seed(seed)
    B, C = len(n_bands), max(n_bands)
    valid = torch.zeros(B, C, dtype=torch.bool)
    for i, n in enumerate(n_bands):
        valid[i, :n] = True
    coords = torch.tensor([b.log10_wavelength_m for b in load_instrument("fermi-lat").bands][:C]
                          + [-6.5] * max(C - 6, 0))
    return {
        "scaled": torch.randn(B, C, size, size, generator=g) * valid[:, :, None, None],
        "band_valid": valid,
        "band_coord": coords.expand(B, C) * valid,
        "instrument_id": torch.full((B,), list_instruments().index(instrument), dtype=torch.long),
        "pixel_scale_deg": torch.full((B,), pixel_scale_deg),
    }


def run(model, batch, **kw):
    keys = ("scaled", "band_valid", "band_coord", "instrument_id", "pixel_scale_deg")
    return model(*(batch[k] for k in keys), **kw)


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    models = {name: create_model(name).eval() for name in TINY}
    with torch.no_grad():
        for model in models.values():  # the first batch k-means-initialises each codebook
            run(model, make_batch([3, 3], seed=99), codes=True)
    return models


# --------------------------------------------------------------------------------------- registry sweep
def test_registry_lists_the_four_models():
    assert {"skyfm-tiny", "skyfm-unet-tiny", "skyfm-base", "skyfm-unet-base"} <= set(list_models())
    assert list_models("*unet*") == ["skyfm-unet-base", "skyfm-unet-tiny"]
    with pytest.raises(SkyfmError, match="unknown model 'skyfm-huge'.*skyfm-tiny"):
        create_model("skyfm-huge")


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_fit_the_cpu_budget(name, tiny_models):
    assert tiny_models[name].num_parameters() <= 5_000_000


@pytest.mark.parametrize("name", BASE)
def test_base_models_have_about_100M_parameters(name):
    with torch.device("meta"):  # counts parameters without allocating them
        model = create_model(name)
    assert 80e6 <= model.num_parameters() <= 130e6


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("n_bands", [[1, 1], [6, 6], [1, 6]], ids=["1band", "6band", "mixed"])
def test_forward_shapes(name, size, n_bands, tiny_models):
    model = tiny_models[name]
    batch = make_batch(n_bands, size=size)
    with torch.no_grad():
        out = run(model, batch, codes=True)
    B, C = len(n_bands), max(n_bands)
    s, D = model.token_stride, model.embed_dim
    grid = (size // s, size // s)
    assert out.grid == grid
    assert out.token_features.shape == (B, C, grid[0] * grid[1], D)
    assert out.feature_map.shape == (B, D, *grid)
    assert out.pooled.shape == (B, D)
    assert out.dense_features.shape == (B, model.dense_dim, size, size)
    assert out.codes.shape == (B, C, size // 4, size // 4)
    pad = ~batch["band_valid"]
    assert (out.token_features[pad] == 0).all() and (out.codes[pad] == -1).all()
    for t in (out.token_features, out.dense_features, out.pooled):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", TINY)
def test_padding_bands_do_not_change_the_valid_ones(name, tiny_models):
    model = tiny_models[name]
    alone = make_batch([2], seed=1)
    padded = make_batch([2, 5], seed=2)  # patch 0: the same two bands plus three padding bands of garbage
    padded["scaled"][0, :2] = alone["scaled"][0]
    padded["scaled"][0, 2:] = 50 * torch.randn(3, 64, 64)
    padded["band_coord"][0, 2:] = torch.tensor([-3.0, -9.0, -16.0])
    padded["instrument_id"][1] = 0
    with torch.no_grad():
        a, b = run(model, alone, codes=True), run(model, padded, codes=True)
    assert torch.allclose(a.token_features[0], b.token_features[0, :2], atol=1e-4)
    assert torch.allclose(a.dense_features[0], b.dense_features[0], atol=1e-4)
    assert torch.allclose(a.pooled[0], b.pooled[0], atol=1e-4)
    assert torch.equal(a.codes[0], b.codes[0, :2])
    # ...while the content of a valid band does matter
    changed = {k: v.clone() for k, v in alone.items()}
    changed["scaled"][0, 1] += 3.0
    with torch.no_grad():
        c = run(model, changed)
    assert not torch.allclose(a.pooled, c.pooled, atol=1e-3)


def test_token_inputs_and_pixel_loss_variants():
    batch = make_batch([2, 1], size=32)
    for token_input in ("quantized", "code"):
        torch.manual_seed(0)
        model = create_model("skyfm-tiny", backbone={"token_input": token_input, "depth": 1})
        out = run(model, batch)
        assert out.token_features.shape == (2, 2, 16, 128)
    model = create_model("skyfm-tiny", pixel_loss_weight=1.0, backbone={"depth": 1})
    losses = model.pretraining_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["pixel_loss"]) and losses["loss"] > losses["mtm_loss"]
    # pixel tokens: each token also embeds its cell's pixels, so a pixel the tokenizer ignores changes the tokens
    torch.manual_seed(0)
    model = create_model("skyfm-tiny", backbone={"depth": 1, "pixel_tokens": True}).eval()
    assert model.backbone.pixel_embed.in_features == model.token_stride**2
    out = run(model, batch)
    assert out.token_features.shape == (2, 2, 16, 128)
    poked = {**batch, "scaled": batch["scaled"].clone()}
    poked["scaled"][0, 0, 3, 3] += 1.0
    plain = create_model("skyfm-tiny", backbone={"depth": 1}).eval()
    assert plain.backbone.pixel_embed is None
    with torch.no_grad():
        inputs = [model.prepare_inputs(*(b[k] for k in ("scaled", "band_valid", "band_coord", "instrument_id",
                                                           "pixel_scale_deg"))) for b in (batch, poked)]
        for i in inputs:
            model.tokenize(i, need_codes=False)
        inputs[1].latents = inputs[0].latents  # the same tokenizer output: only the pixel embedding sees the poke
        a, b = (model.backbone.embed_tokens(i, None)[0] for i in inputs)
    changed = (a - b).abs().sum(-1)[0, 0]  # (L,) over band 0's tokens
    assert changed[0] > 0 and (changed[1:] == 0).all()  # only the token whose cell holds pixel (3, 3)


# ------------------------------------------------------------------------------------------- embeddings
def test_position_embedding_is_in_sky_degrees():
    # cell centres: 0-based pixel centres, offsets from the patch centre
    off = cell_offsets_deg((2, 2), 4, (8, 8), torch.tensor([0.5]))
    assert torch.allclose(off[0], torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]))
    emb = SkyPositionEmbedding(32, num_frequencies=16)
    # the same 1-arcmin token at the same sky offset, seen with 2 different pixel scales: identical features
    a = emb.features(torch.tensor([[[0.05, -0.02]]]), torch.tensor([1 / 60]))
    b = emb.features(torch.tensor([[[0.05, -0.02]]]), torch.tensor([1 / 60]))
    assert torch.equal(a, b)
    fine = emb((4, 4), 8, (32, 32), torch.tensor([1e-4 / 8]))  # 0.36" tokens
    coarse = emb((4, 4), 8, (32, 32), torch.tensor([0.1]))  # 0.8 deg tokens
    assert fine.shape == coarse.shape == (1, 16, 32)
    # frequencies finer than the token footprint fade instead of aliasing
    feats = emb.features(torch.tensor([[[0.3, 0.1]]]), torch.tensor([0.8]))
    K = 16
    finest_sin = feats[0, 0, :K]
    assert finest_sin[:5].abs().max() < 1e-6 and finest_sin[-1].abs() > 1e-3


def test_band_embedding_is_smooth_in_wavelength():
    torch.manual_seed(0)
    emb = BandEmbedding(64)
    x = torch.tensor([[-6.30, -6.29, -14.0]])
    e = emb(x)[0]
    assert (e[0] - e[1]).norm() < 0.2 * (e[0] - e[2]).norm()


# ----------------------------------------------------------------------------------------- pretraining
def test_token_mask_sampling():
    valid = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)
    rng = np.random.default_rng(0)
    mask = sample_token_mask(valid, (8, 8), 0.5, 0.5, rng)
    assert mask.shape == (2, 4, 8, 8)
    assert mask[0].sum() == 96 and mask[1].sum() == 32  # exactly half of each patch's valid tokens
    assert not mask[~valid].any()
    again = sample_token_mask(valid, (8, 8), 0.5, 0.5, np.random.default_rng(0))
    assert np.array_equal(mask, again)
    # one band, one cell: still one masked token; tiny ratios still mask one and keep one visible
    assert sample_token_mask(np.ones((1, 1), bool), (2, 2), 0.01, 0.5, rng).sum() == 1
    assert sample_token_mask(np.ones((1, 1), bool), (2, 2), 0.99, 0.5, rng).sum() == 3
    # block masking hides whole cells on every band far more often than uniform masking does
    all_bands = np.ones((64, 3), bool)
    blocks = sample_token_mask(all_bands, (8, 8), 0.5, 1.0, np.random.default_rng(1)).all(axis=1).mean()
    uniform = sample_token_mask(all_bands, (8, 8), 0.5, 0.0, np.random.default_rng(1)).all(axis=1).mean()
    assert blocks > 2 * uniform


@pytest.mark.parametrize("name", TINY)
def test_pretraining_loss_backward(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    batch = make_batch([1, 3, 6], size=32, seed=3)
    codebook = model.tokenizer.quantizer.codebook.clone()
    losses = model.pretraining_loss(batch, mask_ratio=0.5, generator=torch.Generator().manual_seed(7))
    assert {"loss", "mtm_loss", "accuracy", "mask_fraction", "code_perplexity"} <= set(losses)
    assert all(v.ndim == 0 for v in losses.values())
    assert abs(float(losses["mask_fraction"]) - 0.5) < 0.02
    # an untrained model predicts ~uniformly over the codes
    assert abs(float(losses["mtm_loss"]) - math.log(model.tokenizer.num_codes)) < 0.5
    losses["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.mtm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.tokenizer.parameters())  # frozen: no gradients...
    assert not model.tokenizer.training  # ...and eval mode, so the codebook does not move
    # k-means ran on the first batch, but nothing after: a second step leaves the codebook alone
    codebook = model.tokenizer.quantizer.codebook.clone()
    model.pretraining_loss(batch, generator=torch.Generator().manual_seed(8))
    assert torch.equal(codebook, model.tokenizer.quantizer.codebook)
    # the same generator state gives the same loss (same mask, same instrument dropout)
    model.eval()
    l1 = model.pretraining_loss(batch, generator=torch.Generator().manual_seed(3))["loss"]
    l2 = model.pretraining_loss(batch, generator=torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(l1, l2)


def test_tokenizer_freezing_follows_requires_grad():
    model = create_model("skyfm-tiny", backbone={"depth": 1})
    assert model.tokenizer_frozen and not model.train().tokenizer.training
    model.set_tokenizer_trainable(True)
    assert not model.tokenizer_frozen and model.train().tokenizer.training
    out = model.tokenizer(make_batch([1, 2], size=32)["scaled"], make_batch([1, 2], size=32)["band_valid"])
    out.loss.backward()
    assert model.tokenizer.encoder.conv_in.weight.grad is not None
    model.set_tokenizer_trainable(False)
    assert not model.tokenizer.training


def test_embed_returns_one_vector_per_patch(tiny_models):
    model = tiny_models["skyfm-tiny"]
    batch = make_batch([1, 2, 6], size=32)
    batch["instrument"] = ["a", "b", "c"]  # python lists in the batch are ignored
    vectors = model.embed(batch)
    assert vectors.shape == (3, model.embed_dim) and not vectors.requires_grad


def test_bad_inputs_raise_one_line_errors(tiny_models):
    model = tiny_models["skyfm-tiny"]
    batch = make_batch([1, 2], size=36)
    with pytest.raises(SkyfmError, match="not a multiple of 8 pixels"):
        run(model, batch)
    batch = make_batch([1, 2], size=32)
    batch["band_valid"][0] = False
    with pytest.raises(SkyfmError, match="patch 0 .* no valid band"):
        run(model, batch)
    with pytest.raises(SkyfmError, match="band_coord has shape"):
        model(batch["scaled"], batch["band_valid"], batch["band_coord"][:, :1], batch["instrument_id"],
              batch["pixel_scale_deg"])
    with pytest.raises(SkyfmError, match="no 'pixel_scale_deg'"):
        model.embed({k: v for k, v in batch.items() if k != "pixel_scale_deg"})


def test_unknown_instrument_ids_use_the_unknown_row(tiny_models):
    model = tiny_models["skyfm-tiny"]
    batch = make_batch([2, 2], size=32)
    batch["scaled"][1] = batch["scaled"][0]
    batch["instrument_id"] = torch.tensor([model.unknown_instrument_id, 1000])
    with torch.no_grad():
        out = run(model, batch)
        batch["instrument_id"][1] = 0
        known = run(model, batch)
    assert torch.allclose(out.pooled[0], out.pooled[1], atol=1e-5)
    assert not torch.allclose(known.pooled[0], known.pooled[1], atol=1e-5)


# ------------------------------------------------------------------------------------------- config
def test_config_round_trip_and_overrides(tmp_path):
    config = model_config("skyfm-unet-tiny")
    again = FoundationConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    assert create_model("skyfm-tiny", backbone={"depth": 2}).config.backbone.depth == 2
    assert model_config("skyfm-tiny", **{"tokenizer.codebook_size": 256}).tokenizer.codebook_size == 256
    with pytest.raises(SkyfmError, match="unknown key 'backbone.depht'"):
        model_config("skyfm-tiny", backbone={"depht": 2})
    with pytest.raises(SkyfmError, match="'tokenizer.latent_dim' should be an integer"):
        model_config("skyfm-tiny", tokenizer={"latent_dim": "big"})
    with pytest.raises(SkyfmError, match="divisible by num_heads"):
        model_config("skyfm-tiny", backbone={"num_heads": 5})
    with pytest.raises(SkyfmError, match="decoder_channels"):
        model_config("skyfm-tiny", backbone={"token_patch": 4})


def test_import_skyfm_does_not_import_torch():
    code = "import sys, skyfm; assert 'torch' not in sys.modules; assert 'create_model' in dir(skyfm)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert skyfm.FoundationModel is FoundationModel and skyfm.create_model is create_model
    assert skyfm.list_models() == list_models()


# ------------------------------------------------------------------------------------------ save / load
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_models):
    directory = tmp_path_factory.mktemp("model") / "tiny"
    tiny_models["skyfm-tiny"].save_pretrained(directory)
    return directory


def test_save_load_round_trip_is_bit_identical(saved, tiny_models):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    loaded = FoundationModel.from_pretrained(saved)
    assert not loaded.training and loaded.config == tiny_models["skyfm-tiny"].config
    batch = make_batch([1, 4], seed=5)
    with torch.no_grad():
        a, b = run(tiny_models["skyfm-tiny"], batch), run(loaded, batch)
    for x, y in ((a.token_features, b.token_features), (a.dense_features, b.dense_features),
                 (a.pooled, b.pooled), (a.codes, b.codes)):
        assert torch.equal(x, y)
    assert create_model("skyfm-tiny", pretrained_dir=saved).config.name == "skyfm-tiny"
    with pytest.raises(SkyfmError, match="holds a 'skyfm-tiny' model, not 'skyfm-unet-tiny'"):
        create_model("skyfm-unet-tiny", pretrained_dir=saved)


def copy_of(saved, tmp_path):
    target = tmp_path / "copy"
    target.mkdir(parents=True)
    for p in saved.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target


def test_missing_and_corrupt_checkpoints(saved, tmp_path):
    with pytest.raises(SkyfmError, match="does not exist"):
        FoundationModel.from_pretrained(tmp_path / "nowhere")
    d = copy_of(saved, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(SkyfmError, match="model.safetensors is missing"):
        FoundationModel.from_pretrained(d)

    d = copy_of(saved, tmp_path / "a")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SkyfmError, match="corrupt or truncated"):
        FoundationModel.from_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SkyfmError, match="corrupt or truncated"):
        FoundationModel.from_pretrained(d)

    d = copy_of(saved, tmp_path / "b")
    (d / "config.json").write_text("{not json")
    with pytest.raises(SkyfmError, match="not valid JSON"):
        FoundationModel.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SkyfmError, match="not a skyfm foundation model config"):
        FoundationModel.from_pretrained(d)


def test_config_and_weights_mismatch_names_the_keys(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["backbone"]["depth"] = 4
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(SkyfmError, match=r"does not match .*unexpected tensors \(backbone\.blocks\.4\."):
        FoundationModel.from_pretrained(d)
    config["backbone"]["depth"] = 6
    config["tokenizer"]["codebook_size"] = 256
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(SkyfmError, match=r"shape mismatch.*tokenizer\.quantizer"):
        FoundationModel.from_pretrained(d)


def test_windowed_attention_equals_attention_inside_each_window():
    """Windows of a grid that is not a multiple of the window: each window's tokens see exactly their window
    (all bands of it) and no padding token; a window as large as the grid is global attention."""
    model = create_model("skyfm-tiny", backbone={"depth": 2, "embed_dim": 32, "num_heads": 2}).eval()
    bb = model.backbone
    torch.manual_seed(3)
    B, C, (h, w), D, win = 2, 3, (5, 6), 32, 4
    x = torch.randn(B, C, h * w, D)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        got = bb._windowed_blocks(x, (h, w), valid, win).reshape(B, C, h, w, D)
        for y0 in range(0, h, win):
            for x0 in range(0, w, win):
                cell = x.reshape(B, C, h, w, D)[:, :, y0:y0 + win, x0:x0 + win]  # (B, C, wh, ww, D)
                wh, ww = cell.shape[2:4]
                t = cell.reshape(B, C * wh * ww, D)
                keys = valid[:, :, None].expand(B, C, wh * ww).reshape(B, 1, 1, -1)
                for block in bb.blocks:
                    t = block(t, attn_mask=keys)
                want = t.reshape(B, C, wh, ww, D)
                assert torch.allclose(got[:, :, y0:y0 + wh, x0:x0 + ww][valid], want[valid], atol=1e-5)
        bb.attention_window = 16  # >= the grid: the ordinary global path
        batch = make_batch([2], size=64)
        global_out = run(model, batch)
        bb.attention_window = None
        assert torch.equal(global_out.token_features, run(model, batch).token_features)


def test_windowed_positions_repeat_the_window_patch():
    bb = create_model("skyfm-tiny", backbone={"depth": 1, "embed_dim": 32, "num_heads": 2}).backbone
    from skyfm.foundation.embeddings import BackboneInputs

    scale = torch.tensor([1e-3])
    inputs = BackboneInputs(torch.zeros(1, 1, 128, 128), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1),
                            torch.zeros(1, dtype=torch.long), scale)
    with torch.no_grad():
        bb.attention_window = 8
        tiled = bb._position_embedding((16, 16), inputs).reshape(16, 16, -1)
        one = bb.pos_embed((8, 8), bb.token_stride, (64, 64), scale).reshape(8, 8, -1)
    assert torch.allclose(tiled[8:, 8:], one) and torch.allclose(tiled[:8, 8:], one)
