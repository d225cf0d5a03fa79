"""The VQ-VAE tokenizer: shapes, padding, channel-agnostic encoding, training, codebook statistics."""

import copy
import math

import numpy as np
import pytest
import torch

from skyfm.data.simulate.render import add_point_sources
from skyfm.errors import SkyfmError
from skyfm.instruments import PSF, scale_image
from skyfm.tokenizers import (
    CodeUsageMeter,
    TokenizerConfig,
    VQVAETokenizer,
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    source_weights,
)

SMALL = dict(channels=(8, 16, 32), latent_dim=8, codebook_size=64, kmeans_iters=3)


def small_tokenizer(**kw) -> VQVAETokenizer:
    torch.manual_seed(0)
    return VQVAETokenizer(TokenizerConfig(**{**SMALL, **kw}))


def simulated_counts(n: int, size: int, seed: int, n_bands: int = 1):
    """Poisson counts images with Gaussian-PSF point sources on a flat background (raw, source-only)."""
    rng = np.random.default_rng(seed)
    psf = PSF.gaussian(fwhm_deg=0.3)
    raw = np.zeros((n, n_bands, size, size), np.float32)
    src = np.zeros_like(raw)
    for i in range(n):
        for c in range(n_bands):
            k = rng.integers(3, 8)
            add_point_sources(src[i, c], rng.uniform(2, size - 3, k), rng.uniform(2, size - 3, k),
                              rng.uniform(20, 400, k), psf, pixel_scale_deg=0.1)
            raw[i, c] = rng.poisson(src[i, c] + 0.5)
    return raw, src


def scaled_counts(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([scale_image(r, "anscombe")[0] for r in raw]))


def test_encode_decode_shapes_and_padding():
    tok = small_tokenizer().eval()
    x = torch.randn(3, 4, 32, 48)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        codes, latents = tok.encode(x, valid)
        assert codes.shape == (3, 4, 8, 12) and codes.dtype == torch.int64
        assert latents.shape == (3, 4, 8, 8, 12)
        assert (codes[~valid] == -1).all() and (codes[valid] >= 0).all() and (codes < 64).all()
        assert (latents[~valid] == 0).all()
        from_codes, from_latents = tok.decode(codes), tok.decode(latents, valid)
    assert from_codes.shape == x.shape
    assert torch.allclose(from_codes, from_latents, atol=1e-5)
    assert (from_codes[~valid] == 0).all()


def test_downsample_8_and_fsq():
    tok = small_tokenizer(downsample=8, channels=(8, 16, 16, 32)).eval()
    codes, latents = tok.encode(torch.randn(2, 1, 64, 64))
    assert codes.shape == (2, 1, 8, 8) and latents.shape == (2, 1, 8, 8, 8)
    fsq = small_tokenizer(quantizer="fsq", fsq_levels=(5, 5, 5)).eval()
    assert fsq.num_codes == 125
    with torch.no_grad():
        codes, latents = fsq.encode(torch.randn(2, 2, 32, 32))
        assert codes.min() >= 0 and codes.max() < 125
        assert torch.allclose(fsq.decode(codes), fsq.decode(latents), atol=1e-5)
    out = fsq.train()(torch.randn(2, 2, 32, 32))
    assert float(out.commit_loss) == 0.0 and torch.isfinite(out.loss)


def test_bands_are_encoded_independently_of_each_other():
    """Channel-agnostic: a band's codes do not depend on the other bands of its patch or on padding."""
    tok = small_tokenizer().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tok.encode(x)  # k-means initialisation on a first batch
        codes, latents = tok.encode(x)
        alone_codes, alone_latents = tok.encode(x[:, 1:2])
    assert torch.equal(codes[:, 1:2], alone_codes)
    assert torch.allclose(latents[:, 1:2], alone_latents, atol=1e-5)


def test_frozen_quantization_matches_the_library():
    tok = small_tokenizer().eval()
    z = torch.randn(3, 2, 8, 8, 8)
    with torch.no_grad():
        tok.quantize(z)  # k-means initialisation
        codes, quantized, _ = tok.quantize(z)  # the fast nearest-code path
        lib_q, lib_codes, _ = tok.quantizer(z.flatten(0, 1).flatten(2).transpose(1, 2))
    assert torch.equal(codes.flatten(0, 1).flatten(1), lib_codes)
    assert torch.allclose(quantized.flatten(0, 1).flatten(2).transpose(1, 2), lib_q, atol=1e-6)


def test_padding_never_touches_codebook_statistics():
    x = torch.randn(2, 2, 32, 32)
    padded = torch.cat([x, 100 * torch.randn(2, 3, 32, 32)], dim=1)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[:, :2] = True
    a = small_tokenizer().train()
    b = copy.deepcopy(a)
    torch.manual_seed(1)
    a(x)
    torch.manual_seed(1)
    b(padded, valid)
    for (name, ta), tb in zip(a.quantizer.named_buffers(), b.quantizer.buffers()):
        assert torch.allclose(ta, tb, atol=1e-5), name


def test_training_reduces_the_loss_and_reports_codebook_statistics():
    raw, src = simulated_counts(8, 32, seed=3)
    x = scaled_counts(raw)
    weights = source_weights(torch.from_numpy(raw), torch.from_numpy(src))
    tok = small_tokenizer().train()
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = tok(x, weights=weights)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else (out.recon_loss.item(), out.source_loss.item())
    assert out.recon_loss.item() < 0.6 * first[0]
    assert out.source_loss.item() < 0.8 * first[1]
    assert out.source_loss > 0 and out.commit_loss >= 0
    assert 1.0 <= float(out.perplexity) <= 64 and 0 < out.usage <= 1
    assert out.recon.shape == x.shape and out.codes.shape == (8, 1, 8, 8)


def test_codebook_statistics():
    uniform = torch.arange(64).repeat(3)
    counts = code_histogram(uniform, 64)
    assert math.isclose(float(codebook_perplexity(counts)), 64, rel_tol=1e-5)
    assert codebook_usage(counts) == 1.0
    one = code_histogram(torch.full((10,), 5), 64)
    assert math.isclose(float(codebook_perplexity(one)), 1.0, rel_tol=1e-6)
    assert codebook_usage(one) == 1 / 64
    meter = CodeUsageMeter(64)
    meter.update(torch.tensor([[0, 1, -1]]))
    meter.update(torch.tensor([2, 3]))
    assert meter.usage == 4 / 64 and math.isclose(meter.perplexity, 4.0, rel_tol=1e-5)


def test_source_weights_are_the_source_signal_to_noise():
    raw, src = simulated_counts(1, 32, seed=5)
    w = source_weights(torch.from_numpy(raw), torch.from_numpy(src))
    assert w.shape == raw.shape and float(w.min()) >= 0 and float(w.max()) <= 1
    peak = np.unravel_index(src[0, 0].argmax(), src[0, 0].shape)
    assert float(w[0, 0][peak]) == 1.0
    assert float(w[0, 0][src[0, 0] < 1e-6].max()) < 1e-3  # far from every source
    empty = source_weights(torch.from_numpy(raw), torch.zeros_like(torch.from_numpy(src)))
    assert float(empty.sum()) == 0.0
    # sparse counts: the MAD of a mostly-zero image is 0, so the Poisson sigma sqrt(mean) takes over;
    # the weight is the pixel's signal-to-noise s / sqrt(sigma^2 + s)
    sparse = torch.zeros(1, 1, 16, 16)
    sparse[0, 0, 0, :16] = 1.0  # mean 1/16 -> sigma^2 = 1/16
    source = torch.zeros_like(sparse)
    source[0, 0, 8, 8] = 0.25
    expected = 0.25 / math.sqrt(1 / 16 + 0.25)
    assert math.isclose(float(source_weights(sparse + source, source)[0, 0, 8, 8]), expected, rel_tol=1e-5)


def test_bad_configs_and_inputs_raise_one_line_errors():
    with pytest.raises(SkyfmError, match="downsample"):
        TokenizerConfig(downsample=6)
    with pytest.raises(SkyfmError, match="channels"):
        TokenizerConfig(downsample=8, channels=(8, 16, 32))
    with pytest.raises(SkyfmError, match="quantizer"):
        TokenizerConfig(quantizer="rvq")
    tok = small_tokenizer()
    with pytest.raises(SkyfmError, match="multiple"):
        tok.encode(torch.randn(1, 1, 30, 32))
    with pytest.raises(SkyfmError, match="band_valid"):
        tok.encode(torch.randn(1, 2, 32, 32), torch.ones(1, 3, dtype=torch.bool))
