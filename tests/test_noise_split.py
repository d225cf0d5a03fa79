"""Two independent noisy copies of one image (skyfm.pretrain.noise_split) and the denoising pretraining term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyfm.errors import SkyfmError
from skyfm.pretrain.noise_split import noise_split, split_counts, split_gaussian


def test_thinning_splits_poisson_counts_into_independent_unbiased_halves():
    g = torch.Generator().manual_seed(0)
    rate = torch.full((200_000,), 3.0)
    counts = torch.poisson(rate, generator=g)
    noisy, target = split_counts(counts, 0.7, g)
    # both copies are unbiased estimates of the rate, with Poisson variances rate / p and rate / (1 - p)
    assert float(noisy.mean()) == pytest.approx(3.0, rel=0.01) and float(target.mean()) == pytest.approx(3.0, rel=0.01)
    assert float(noisy.var()) == pytest.approx(3.0 / 0.7, rel=0.03)
    assert float(target.var()) == pytest.approx(3.0 / 0.3, rel=0.03)
    # independent: no correlation between the copies' noises (the observation's own noise is split, not shared)
    assert abs(float(torch.corrcoef(torch.stack([noisy, target]))[0, 1])) < 0.01
    # together they are the observation again
    torch.testing.assert_close(0.7 * noisy + 0.3 * target, counts)
    with pytest.raises(SkyfmError, match="fraction"):
        split_counts(counts, 1.0, g)


def test_recorruption_gives_gaussian_copies_with_uncorrelated_noise():
    g = torch.Generator().manual_seed(1)
    clean = torch.linspace(-2, 5, 100_000).reshape(1, 1, -1)
    sigma = torch.tensor([[2.0]])
    observed = clean + 2.0 * torch.randn(clean.shape, generator=g)
    noisy, target = split_gaussian(observed, sigma, 0.5, g)
    n1, n2 = (noisy - clean).flatten(), (target - clean).flatten()
    assert float(n1.std()) == pytest.approx(2.0 * np.sqrt(1 + 0.25), rel=0.02)
    assert float(n2.std()) == pytest.approx(2.0 * np.sqrt(1 + 4.0), rel=0.02)
    assert abs(float(torch.corrcoef(torch.stack([n1, n2]))[0, 1])) < 0.01
    assert abs(float(n2.mean())) < 0.05  # unbiased target


def test_noise_split_scales_each_sample_its_own_way_and_is_reproducible():
    from skyfm.data import collate_patches
    from skyfm.data.simulate import simulate_patch

    batch = collate_patches([simulate_patch("meerlicht", seed=2, size=32), simulate_patch("fermi-lat", seed=3, size=32)])
    a = noise_split(batch, torch.Generator().manual_seed(4))
    b = noise_split(batch, torch.Generator().manual_seed(4))
    c = noise_split(batch, torch.Generator().manual_seed(5))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert not torch.equal(a[0], c[0])
    noisy, target = a
    assert noisy.shape == target.shape == batch["scaled"].shape
    valid = batch["band_valid"]
    assert (noisy[~valid] == 0).all() and (target[~valid] == 0).all()  # padding bands stay empty
    # MeerLICHT (asinh): the input copy differs from the data by 0.5 sigma of noise, the target by 2 sigma (less
    # in asinh units, which compress large deviations)
    d_in = (noisy[0, 0] - batch["scaled"][0, 0]).std()
    d_target = (target[0, 0] - batch["scaled"][0, 0]).std()
    assert float(d_target) > 2 * float(d_in) > 0.2
    # Fermi-LAT (counts): whole counts thinned, so both copies are made of multiples of 1 / p and 1 / (1 - p)
    from skyfm.data.shards import apply_scaling

    raw = torch.expm1(noisy[1, : int(valid[1].sum())]) * 0.7
    torch.testing.assert_close(raw, raw.round(), atol=2e-3, rtol=0)
    assert torch.equal(apply_scaling(batch["image"][1, :6], batch["scaling"][1]), batch["scaled"][1, :6])
    with pytest.raises(SkyfmError, match="scaling"):
        noise_split({k: v for k, v in batch.items() if k != "scaling"})


def test_the_denoising_term_trains_every_token_on_the_other_copy():
    from skyfm import create_model
    from skyfm.data import collate_patches
    from skyfm.data.simulate import simulate_patch
    from skyfm.pretrain.train import PretrainObjective

    torch.manual_seed(0)
    model = create_model("skyfm-tiny", denoise_loss_weight=1.0, backbone={"depth": 1, "embed_dim": 64},
                         tokenizer={"codebook_size": 64})
    batch = collate_patches([simulate_patch("wise", seed=5, size=32), simulate_patch("ctao", seed=6, size=32)])
    objective = PretrainObjective(model, 0.5).train()
    model.set_tokenizer_trainable(False)
    losses = objective(batch, 2, torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["denoise_loss"]) and float(losses["loss"].detach()) > float(losses["mtm_loss"])
    losses["loss"].backward()
    assert model.pixel_head.weight.grad.abs().sum() > 0
    # the same generator state gives the same copies, masks and loss
    model.eval()
    l1 = objective(batch, 2, torch.Generator().manual_seed(3))["loss"]
    l2 = objective(batch, 2, torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(l1, l2)
    # without the term, no pixel head and no denoising loss
    plain = create_model("skyfm-tiny", backbone={"depth": 1, "embed_dim": 64}, tokenizer={"codebook_size": 64})
    assert plain.pixel_head is None and "denoise_loss" not in PretrainObjective(plain, 0.5)(batch, 2)
