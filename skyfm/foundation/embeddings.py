"""Embeddings that tell the backbone where a token is: which band, which instrument, where on the sky.

* :class:`BandEmbedding`: from the band's ``log10`` central wavelength in metres (``Band.log10_wavelength_m``;
  gamma-ray energies are converted with lambda = h c / E), so one axis runs from TeV photons (-18) to the far
  infrared (-4). Fourier features of that number go through an MLP: nearby wavelengths get nearby embeddings,
  and a band never seen in training (a new filter in a user's YAML) lands between the ones it sits between.
* :class:`InstrumentEmbedding`: a table over the built-in instruments plus one "unknown" row for any other.
* :class:`SkyPositionEmbedding`: sin-cos features of each token's offset from the patch centre in **degrees on the
  sky** (not pixels), at wavelengths from 0.036 arcsec to 200 deg. A 1-arcsec structure gets the same code on
  Hubble (0.04"/px) as on MeerLICHT (0.56"/px), and any patch size or pixel scale is handled without
  interpolating a learned table. Each feature is averaged over the token's footprint (the "integrated positional
  encoding" of mip-NeRF): for a box of side ``s`` degrees, approximated by a Gaussian of sigma ``s / sqrt(12)``,
  ``E[sin(k x)] = sin(k x0) exp(-k^2 sigma^2 / 2)``, so frequencies finer than the token fade to zero instead of
  aliasing into noise. The footprint size itself (log10 degrees) is appended, so the model knows the resolution.
* :class:`PixelStem`: a small per-band convolution of the scaled image on 2x2-pixel cells (every pixel kept, as
  channels), conditioned on the band embedding and averaged over the valid bands, giving the band-agnostic pixel
  features that the dense path (ViT) or the whole network (U-Net) starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from skyfm.tokenizers.vqvae import group_norm

# log10(wavelength / m) is mapped to t = (value - centre) / half_range, about [-1, 1] from 1 TeV to 30 micron.
LOG10_WAVELENGTH_CENTRE = -11.0
LOG10_WAVELENGTH_HALF_RANGE = 7.0
# Angular wavelengths of the position features, degrees: from 1e-5 deg (0.036") to 200 deg.
MIN_ANGULAR_WAVELENGTH_DEG = 1e-5
MAX_ANGULAR_WAVELENGTH_DEG = 200.0


def masked_band_mean(x: torch.Tensor, band_valid: torch.Tensor) -> torch.Tensor:
    """Mean over the band axis (dim 1) of ``x`` (B, C, ...) counting only valid bands: (B, ...)."""
    w = band_valid.to(x.dtype).reshape(*band_valid.shape, *([1] * (x.ndim - 2)))  # (B, C, 1, ...)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class BandEmbedding(nn.Module):
    """(B, C) log10 wavelength [m] -> (B, C, D): Fourier features then a two-layer MLP."""

    def __init__(self, dim: int, num_frequencies: int = 8):
        super().__init__()
        # frequencies 0.5 pi ... 0.5 pi 2^(K-1): the finest separates bands 0.1 dex apart (WISE W1/W2 are 0.13)
        freqs = 0.5 * math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies + 1, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, band_coord: torch.Tensor) -> torch.Tensor:
        t = (band_coord.float() - LOG10_WAVELENGTH_CENTRE) / LOG10_WAVELENGTH_HALF_RANGE  # (B, C)
        angles = t[..., None] * self.freqs  # (B, C, K)
        feats = torch.cat([t[..., None], angles.sin(), angles.cos()], dim=-1)  # (B, C, 2K + 1)
        return self.mlp(feats)


class InstrumentEmbedding(nn.Module):
    """(B,) instrument index -> (B, D). Index ``num_instruments`` (or any out-of-range index) is "unknown"."""

    def __init__(self, num_instruments: int, dim: int):
        super().__init__()
        self.num_instruments = num_instruments
        self.table = nn.Embedding(num_instruments + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def unknown_index(self) -> int:
        return self.num_instruments

    def forward(self, instrument_id: torch.Tensor) -> torch.Tensor:
        ids = instrument_id.long()
        ids = torch.where((ids < 0) | (ids > self.num_instruments), torch.full_like(ids, self.num_instruments), ids)
        return self.table(ids)


def cell_offsets_deg(grid: tuple[int, int], stride: int, image_size: tuple[int, int],
                     pixel_scale_deg: torch.Tensor) -> torch.Tensor:
    """Offsets (dx, dy) in degrees of each cell centre from the patch centre: (B, h * w, 2), row-major cells.

    Pixel centres are 0-based, so cell ``j`` of ``stride`` pixels is centred on pixel ``j * stride + (stride - 1) / 2``
    and the patch on ``(W - 1) / 2``: the offset is ``(j + 0.5) * stride - W / 2`` pixels. x is the column.
    """
    (h, w), (H, W) = grid, image_size
    device = pixel_scale_deg.device
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride - H / 2.0
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride - W / 2.0
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pix = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)  # (h*w, 2)
    return pix[None] * pixel_scale_deg.float().reshape(-1, 1, 1)  # (B, h*w, 2)


class SkyPositionEmbedding(nn.Module):
    """Token positions as footprint-averaged sin-cos features of sky offsets (deg), projected to D.

    ``forward(grid, stride, image_size, pixel_scale_deg) -> (B, h * w, D)``.
    """

    def __init__(self, dim: int, num_frequencies: int = 24):
        super().__init__()
        wavelengths = torch.logspace(math.log10(MIN_ANGULAR_WAVELENGTH_DEG), math.log10(MAX_ANGULAR_WAVELENGTH_DEG),
                                     num_frequencies)
        self.register_buffer("omega", 2 * math.pi / wavelengths, persistent=False)  # rad per degree
        self.proj = nn.Sequential(nn.Linear(4 * num_frequencies + 1, dim), nn.GELU(), nn.Linear(dim, dim))

    def features(self, offsets_deg: torch.Tensor, footprint_deg: torch.Tensor) -> torch.Tensor:
        """(B, L, 2) offsets and (B,) token side in degrees -> (B, L, 4K + 1) fixed features."""
        sigma = footprint_deg.float().reshape(-1, 1, 1, 1) / math.sqrt(12.0)  # (B, 1, 1, 1): box -> Gaussian
        phase = offsets_deg[..., None] * self.omega  # (B, L, 2, K)
        damp = torch.exp(-0.5 * (self.omega * sigma) ** 2)  # (B, 1, 1, K)
        feats = torch.cat([phase.sin() * damp, phase.cos() * damp], dim=-1).flatten(2)  # (B, L, 4K)
        scale = (torch.log10(footprint_deg.float().clamp(min=1e-9)) / 3.0).reshape(-1, 1, 1)  # ~[-2, 1]
        return torch.cat([feats, scale.expand(-1, feats.shape[1], 1)], dim=-1)

    def forward(self, grid: tuple[int, int], stride: int, image_size: tuple[int, int],
                pixel_scale_deg: torch.Tensor) -> torch.Tensor:
        offsets = cell_offsets_deg(grid, stride, image_size, pixel_scale_deg)  # (B, L, 2)
        footprint = pixel_scale_deg.float() * stride  # (B,)
        return self.proj(self.features(offsets, footprint))  # (B, L, D)


class PixelStem(nn.Module):
    """Per-band pixel features on 2x2-pixel cells, conditioned on the band and pooled over valid bands.

    Each band is a two-channel image (scaled value, masked indicator), rearranged losslessly into 2x2 blocks
    (``pixel_unshuffle``: (2, H, W) -> (8, H/2, W/2)), so every pixel's value survives while the convolutions run
    on a quarter of the positions: full-resolution convolutions with few channels are the slowest thing a CPU
    can be asked to do. A shared 3x3 conv, a FiLM (scale, shift) from the band embedding that tells it which
    band it sees, a 1x1 conv; the mean over valid bands gives (B, F, H/2, W/2). Token masks, when given, blank
    the masked cells of their band first. Dense outputs return to full resolution with ``pixel_shuffle``.
    """

    factor = 2  # pixels per stem cell side

    def __init__(self, channels: int, band_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * self.factor**2, channels, 3, padding=1)
        self.film = nn.Linear(band_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)  # starts band-agnostic
        nn.init.zeros_(self.film.bias)
        self.norm = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, channels, 1)

    def forward(self, scaled: torch.Tensor, band_valid: torch.Tensor, band_emb: torch.Tensor,
                pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """scaled (B, C, H, W), band_valid (B, C), band_emb (B, C, E), pixel_mask (B, C, H, W) bool or None
        (True = hidden) -> (B, F, H/2, W/2)."""
        B, C, H, W = scaled.shape
        x = scaled[band_valid]  # (N, H, W)
        hidden = (pixel_mask[band_valid] if pixel_mask is not None else torch.zeros_like(x, dtype=torch.bool))
        x = torch.stack([x.masked_fill(hidden, 0.0), hidden.to(x.dtype)], dim=1)  # (N, 2, H, W)
        x = F.pixel_unshuffle(x, self.factor)  # (N, 8, H/2, W/2)
        h = self.conv_in(x)  # (N, F, H/2, W/2)
        gamma, beta = self.film(band_emb[band_valid]).chunk(2, dim=-1)  # (N, F) each
        h = F.silu(self.norm(h) * (1 + gamma[..., None, None]) + beta[..., None, None])
        h = self.conv_out(h)
        full = h.new_zeros(B, C, *h.shape[1:])
        full[band_valid] = h
        return masked_band_mean(full, band_valid)  # (B, F, H/2, W/2)


# ------------------------------------------------------------------------------------------------------------
# What every backbone takes and returns
# ------------------------------------------------------------------------------------------------------------
@dataclass
class BackboneInputs:
    """One batch as the backbones see it (the tensors of the batch contract plus the tokenizer's output).

    Attributes:
        scaled: (B, C, H, W) scaled data, zeros on padding bands.
        band_valid: (B, C) bool. band_coord: (B, C) log10 wavelength [m]. instrument_id: (B,) int64.
        pixel_scale_deg: (B,) float.
        latents: (B, C, Dz, h, w) tokenizer latents (continuous or quantized, as the backbone asked), or None.
        codes: (B, C, h, w) int64 tokenizer codes (-1 on padding), or None.
    """

    scaled: torch.Tensor
    band_valid: torch.Tensor
    band_coord: torch.Tensor
    instrument_id: torch.Tensor
    pixel_scale_deg: torch.Tensor
    latents: torch.Tensor | None = None
    codes: torch.Tensor | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.scaled.shape[-2]), int(self.scaled.shape[-1])


@dataclass
class BackboneOutput:
    """What every backbone returns.

    Attributes:
        token_features: (B, C, L, D) per (band, token) features, L = h' * w' row-major; zeros on padding bands.
        feature_map: (B, D, h', w') the token features averaged over valid bands.
        pooled: (B, D) one vector per patch.
        grid: (h', w') the token grid.
        dense_features: (B, Df, H, W) full-resolution features for the heads, or None when not asked for.
        cache: backbone-private intermediates that ``forward_dense`` reuses (the U-Net's skip connections).
    """

    token_features: torch.Tensor
    feature_map: torch.Tensor
    pooled: torch.Tensor
    grid: tuple[int, int]
    dense_features: torch.Tensor | None = None
    cache: object = None


def token_pixel_mask(token_mask: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, C, h', w') token mask -> (B, C, h' * stride, w' * stride) pixel mask."""
    return token_mask.repeat_interleave(stride, dim=-2).repeat_interleave(stride, dim=-1)


__all__ = [
    "BackboneInputs",
    "BackboneOutput",
    "token_pixel_mask",
    "BandEmbedding",
    "InstrumentEmbedding",
    "PixelStem",
    "SkyPositionEmbedding",
    "cell_offsets_deg",
    "masked_band_mean",
]
