"""The VQ-VAE tokenizer: one codebook for every band of every instrument.

The tokenizer is channel-agnostic. Each band of a patch, after the instrument's scaling
(:func:`skyfm.instruments.scale_image`), is encoded on its own as a one-channel image, so a 6-bin Fermi-LAT counts
cube and a one-band MeerLICHT image share one encoder, one codebook and one decoder. Which band and which
instrument a token came from reaches the backbone later, as embeddings.

Shapes (``ds`` = ``config.downsample``, ``h = H / ds``, ``w = W / ds``, ``D`` = ``config.latent_dim``)::

    scaled (B, C, H, W) -> per band (N, 1, H, W)      N = number of valid bands in the batch
      encoder            -> (N, D, h, w)              continuous latents
      quantizer          -> (N, D, h, w), codes (N, h, w)
      decoder            -> (N, 1, H, W)              reconstruction in scaled units
    -> recon (B, C, H, W), codes (B, C, h, w) (-1 on padding bands), latents (B, C, D, h, w)

The encoder and decoder are the ResNet-block convolutional stacks of VQGAN / diffusers' ``VQModel``, made small.
The quantizer comes from ``vector-quantize-pytorch``: ``VectorQuantize`` with an exponential-moving-average
codebook, k-means initialisation on the first batch and dead-code restarts (codes whose EMA cluster size falls
below ``dead_code_threshold`` are replaced by random encoder outputs of the current batch), or ``FSQ`` (finite
scalar quantisation, no codebook to collapse).

The loss is a reconstruction term in scaled space (L1 or MSE over valid bands), an optional source-weighted term
(the same error averaged over pixels where simulated sources contribute at least about one noise sigma, see
:func:`source_weights`, so faint point sources are not traded for a smoother background), and the VQ commitment
term.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from skyfm.errors import SkyfmError

QUANTIZERS = ("vq", "fsq")
RECON_LOSSES = ("l1", "mse")


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class TokenizerConfig:
    """Hyper-parameters of :class:`VQVAETokenizer`.

    Attributes:
        downsample: pixels per latent cell side: 4 or 8 (a power of two).
        channels: encoder widths, from full resolution down to the latent grid; ``log2(downsample) + 1`` values
            (the decoder mirrors them).
        num_res_blocks: ResNet blocks per resolution level.
        latent_dim: dimension D of a latent vector (one per band per cell).
        quantizer: ``vq`` (EMA codebook, k-means init, dead-code restarts) or ``fsq``.
        codebook_size: number of codes for ``vq``; for ``fsq`` it is the product of ``fsq_levels``.
        fsq_levels: levels per FSQ dimension, e.g. (8, 8, 8) for 512 codes.
        ema_decay: EMA decay of the codebook (``vq``); lower adapts faster, higher is smoother.
        kmeans_init: initialise the codebook with k-means on the first batch it sees.
        kmeans_iters: k-means iterations of that initialisation.
        dead_code_threshold: a code whose EMA cluster size falls below this is restarted (0 disables).
        commitment_weight: weight of the commitment loss ||z - sg(q)||^2.
        recon_loss: ``l1`` or ``mse``, in scaled units.
        source_weight: weight of the source-weighted reconstruction term (0 disables).
    """

    downsample: int = 4
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = 1
    latent_dim: int = 16
    quantizer: str = "vq"
    codebook_size: int = 512
    fsq_levels: tuple[int, ...] = (8, 8, 8)
    ema_decay: float = 0.95
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 2.0
    commitment_weight: float = 0.25
    recon_loss: str = "l1"
    source_weight: float = 1.0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SkyfmError` naming the first bad field."""
        ds = self.downsample
        if ds < 2 or ds & (ds - 1):
            raise SkyfmError(f"tokenizer.downsample must be a power of two >= 2, got {ds}")
        if len(self.channels) != self.num_downsamples + 1 or min(self.channels) < 1:
            raise SkyfmError(f"tokenizer.channels needs log2(downsample) + 1 = {self.num_downsamples + 1} "
                             f"positive widths, got {list(self.channels)}")
        if self.quantizer not in QUANTIZERS:
            raise SkyfmError(f"tokenizer.quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if self.recon_loss not in RECON_LOSSES:
            raise SkyfmError(f"tokenizer.recon_loss must be one of {', '.join(RECON_LOSSES)}, got {self.recon_loss!r}")
        if self.quantizer == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 3):
            raise SkyfmError(f"tokenizer.fsq_levels must be levels >= 3, got {list(self.fsq_levels)}")
        if self.latent_dim < 1 or self.codebook_size < 2 or self.num_res_blocks < 0:
            raise SkyfmError("tokenizer.latent_dim >= 1, codebook_size >= 2 and num_res_blocks >= 0 are required")

    @property
    def num_downsamples(self) -> int:
        return int(round(math.log2(self.downsample)))

    @property
    def num_codes(self) -> int:
        """The number of distinct codes the quantizer can emit."""
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size


# ----------------------------------------------------------------------------------------------- conv blocks
def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups. Never BatchNorm: a band's output must not depend on the rest of the batch."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ResBlock(nn.Module):
    """Pre-activation ResNet block (GroupNorm, SiLU, 3x3 conv, twice), with a 1x1 skip when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(N, 1, H, W) scaled band -> (N, latent_dim, H / ds, W / ds) continuous latents.

    A 3x3 stem at full resolution, then per halving a stride-2 conv (widening to the level's width) and
    ``num_res_blocks`` ResNet blocks; no blocks at full resolution, where convolutions cost the most on a CPU.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        ch = config.channels
        self.conv_in = nn.Conv2d(1, ch[0], 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch[i - 1], ch[i], 3, stride=2, padding=1),
                          *(ResBlock(ch[i], ch[i]) for _ in range(config.num_res_blocks)))
            for i in range(1, len(ch))
        )
        self.mid = ResBlock(ch[-1], ch[-1])
        self.norm_out = group_norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], config.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x))  # (N, ch0, H, W)
        for stage in self.stages:
            h = stage(h)  # halves the resolution
        h = self.mid(h)  # (N, ch_last, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, D, h, w)


class Decoder(nn.Module):
    """(N, latent_dim, h, w) quantized latents -> (N, 1, h * ds, w * ds) reconstruction in scaled units.

    The mirror of :class:`Encoder`; each doubling is nearest-neighbour upsampling then a 3x3 conv (no checkerboard
    artefacts, unlike a strided transposed conv).
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        ch = config.channels
        self.conv_in = nn.Conv2d(config.latent_dim, ch[-1], 3, padding=1)
        self.mid = ResBlock(ch[-1], ch[-1])
        self.stages = nn.ModuleList(
            nn.ModuleDict({
                "blocks": nn.Sequential(*(ResBlock(ch[i], ch[i]) for _ in range(config.num_res_blocks))),
                "up": nn.Conv2d(ch[i], ch[i - 1], 3, padding=1),
            })
            for i in reversed(range(1, len(ch)))
        )
        self.norm_out = group_norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (N, ch_last, h, w)
        for stage in self.stages:
            h = stage["blocks"](h)
            h = stage["up"](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # doubles the resolution
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 1, H, W)


# ------------------------------------------------------------------------------------------------- outputs
@dataclass
class TokenizerOutput:
    """What :meth:`VQVAETokenizer.forward` returns.

    Attributes:
        recon: (B, C, H, W) reconstruction in scaled units (zeros on padding bands).
        codes: (B, C, h, w) int64 code indices, -1 on padding bands.
        loss: scalar training loss = recon_loss + source_weight * source_loss + commit_loss.
        recon_loss: scalar reconstruction error over valid bands (L1 or MSE, scaled units).
        source_loss: scalar reconstruction error over source pixels (0 when no weights are given).
        commit_loss: scalar VQ commitment loss (already multiplied by ``commitment_weight``; 0 for FSQ).
        perplexity: scalar tensor, exp(entropy) of the batch's code histogram (== number of codes if uniform).
        usage: share of the codebook used in this batch, in [0, 1].
    """

    recon: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    source_loss: torch.Tensor
    commit_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: float


# ------------------------------------------------------------------------------------- codebook statistics
def code_histogram(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Counts of each code among ``codes`` (any shape, -1 entries ignored): (num_codes,) int64."""
    flat = codes.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat.long(), minlength=num_codes)


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 if one code is used, ``num_codes`` if all are used equally."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return entropy.exp().float()


def codebook_usage(counts: torch.Tensor) -> float:
    """Share of codes used at least once in a histogram."""
    return float((counts > 0).float().mean())


class CodeUsageMeter:
    """Accumulates code histograms over many batches: usage and perplexity of a whole evaluation set."""

    def __init__(self, num_codes: int):
        self.counts = torch.zeros(num_codes, dtype=torch.int64)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += code_histogram(codes.detach().cpu(), self.counts.numel())

    @property
    def usage(self) -> float:
        return codebook_usage(self.counts)

    @property
    def perplexity(self) -> float:
        return float(codebook_perplexity(self.counts))


# ----------------------------------------------------------------------------------------- source weights
def source_weights(image: torch.Tensor, source: torch.Tensor, band_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel weights in [0, 1] marking where simulated sources matter, for the source-weighted loss.

    A pixel's weight is its source signal-to-noise ratio, ``s / sqrt(sigma_b^2 + s)``, clipped to [0, 1]: 1
    where the sources stand at least one sigma above the noise, fading to 0 in their faint wings. ``s`` is the
    source-only image and ``sigma_b`` the band's background noise, estimated from ``image - source``: 1.4826 x its
    median absolute deviation, or, for sparse photon counts where that is zero, the Poisson sigma
    sqrt(mean counts). The ``+ s`` term is the sources' own Poisson noise (in counts; for CCD data in ADU it only
    matters where the weight is already 1). Works in the raw units of the batch, so no knowledge of the
    instrument's scaling is needed.

    Args:
        image: (B, C, H, W) raw data; source: (B, C, H, W) source-only image in the same units (zeros for real
            data, giving zero weights); band_valid: (B, C) bool or None.
    Returns:
        (B, C, H, W) float32 weights (0 on padding bands).
    """
    bkg = (image - source).flatten(2).float()  # (B, C, H*W)
    med = bkg.median(dim=-1, keepdim=True).values
    mad_sigma = 1.4826 * (bkg - med).abs().median(dim=-1, keepdim=True).values  # (B, C, 1)
    poisson_sigma = bkg.mean(dim=-1, keepdim=True).clamp(min=0).sqrt()
    sigma = torch.where(mad_sigma > 0, mad_sigma, poisson_sigma)
    s = source.flatten(2).float().clamp(min=0)
    w = (s / (sigma.square() + s).sqrt().clamp(min=1e-6)).clamp(0.0, 1.0).reshape(image.shape)
    if band_valid is not None:
        w = w * band_valid[:, :, None, None].to(w.dtype)
    return w


# ---------------------------------------------------------------------------------------------- tokenizer
@contextlib.contextmanager
def _quiet_vector_quantize():
    """vector-quantize-pytorch 1.34 logs a deprecation notice (through loguru, to stderr) for
    ``threshold_ema_dead_code`` each time a quantizer is built, i.e. on every ``skyfm detect``: one more line before
    a one-line error. Its replacement, ``dead_code_threshold_ratio``, is another rule (a share of the mean cluster
    size), and the absolute threshold still works, so the notice is kept off the terminal while building."""
    try:
        from loguru import logger
    except ImportError:  # versions before the notice do not log through loguru
        yield
        return
    logger.disable("vector_quantize_pytorch")
    try:
        yield
    finally:
        logger.enable("vector_quantize_pytorch")


class VQVAETokenizer(nn.Module):
    """Channel-agnostic VQ-VAE: each band is encoded, quantized and decoded as a one-channel image.

    All methods take the batch layout of the models, ``(B, C, H, W)`` scaled data and an optional ``(B, C)``
    bool ``band_valid`` (padding bands are skipped: they cost nothing, and never touch the codebook statistics).
    ``H`` and ``W`` must be multiples of ``config.downsample``.

    Note: with ``kmeans_init`` the codebook is initialised by k-means on the first batch the quantizer sees, in
    training or eval mode (the library's behaviour); train the tokenizer before relying on its codes.
    """

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or TokenizerConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "vq":
            from vector_quantize_pytorch import VectorQuantize

            with _quiet_vector_quantize():
                self.quantizer = VectorQuantize(
                    dim=config.latent_dim,
                    codebook_size=config.codebook_size,
                    decay=config.ema_decay,
                    kmeans_init=config.kmeans_init,
                    kmeans_iters=config.kmeans_iters,
                    threshold_ema_dead_code=config.dead_code_threshold,
                    commitment_weight=config.commitment_weight,
                )
        else:
            from vector_quantize_pytorch import FSQ

            self.quantizer = FSQ(levels=list(config.fsq_levels), dim=config.latent_dim)

    @property
    def num_codes(self) -> int:
        return self.config.num_codes

    # -- helpers between the batch layout (B, C, ...) and the per-band layout (N, ...) --------------------
    def _check(self, x: torch.Tensor, band_valid: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 4:
            raise SkyfmError(f"the tokenizer expects scaled data of shape (B, C, H, W), got {tuple(x.shape)}")
        ds = self.config.downsample
        if x.shape[-1] % ds or x.shape[-2] % ds:
            raise SkyfmError(f"patch size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the tokenizer's "
                             f"downsampling factor {ds}")
        if band_valid is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if band_valid.shape != x.shape[:2]:
            raise SkyfmError(f"band_valid has shape {tuple(band_valid.shape)}, expected {tuple(x.shape[:2])}")
        return band_valid.to(device=x.device, dtype=torch.bool)

    @staticmethod
    def _scatter(values: torch.Tensor, band_valid: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """(N, ...) values of the valid bands -> (B, C, ...) with ``fill`` on padding bands."""
        out = values.new_full((*band_valid.shape, *values.shape[1:]), fill)
        out[band_valid] = values
        return out

    # -- the three stages -------------------------------------------------------------------------------
    def encode_latents(self, x: torch.Tensor, band_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous (pre-quantization) latents: (B, C, H, W) -> (B, C, D, h, w), zeros on padding bands."""
        valid = self._check(x, band_valid)
        z = self.encoder(x[valid].unsqueeze(1))  # (N, D, h, w)
        return self._scatter(z, valid)

    def quantize(self, latents: torch.Tensor, band_valid: torch.Tensor | None = None):
        """Quantize (B, C, D, h, w) latents -> (codes (B, C, h, w) int64 with -1 on padding, quantized latents
        (B, C, D, h, w), commitment loss scalar)."""
        B, C, D, h, w = latents.shape
        valid = torch.ones((B, C), dtype=torch.bool, device=latents.device) if band_valid is None else band_valid.bool()
        z = latents[valid].flatten(2).transpose(1, 2)  # (N, h*w, D)
        if self.config.quantizer == "vq" and not self.training and self._codebook_initialised():
            q, idx = self._nearest_codes(z)
            commit = z.new_zeros(())
        elif self.config.quantizer == "vq":
            q, idx, commit = self.quantizer(z)
        else:
            q, idx = self.quantizer(z)
            commit = z.new_zeros(())
        q = q.transpose(1, 2).reshape(-1, D, h, w)  # (N, D, h, w)
        idx = idx.long().reshape(-1, h, w)  # (N, h, w)
        return self._scatter(idx, valid, fill=-1), self._scatter(q, valid), commit

    def _codebook_initialised(self) -> bool:
        initted = getattr(getattr(self.quantizer, "_codebook", None), "initted", None)
        return initted is not None and bool(initted)

    def _nearest_codes(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-codebook quantization: the nearest code by Euclidean distance, as the library's eval path
        computes it, without its N x K square roots and one-hot matrix (several times faster on a CPU).

        ``z``: (N, L, D) -> (quantized (N, L, D), codes (N, L)). The quantizer has no projections here
        (codebook_dim == latent_dim) and uses Euclidean distance, so this is exact.
        """
        codebook = self.quantizer.codebook.float()  # (K, D); float32 even under autocast, like the library
        flat = z.reshape(-1, z.shape[-1]).float()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the first term is the same for every code
        with torch.autocast(z.device.type, enabled=False):
            dist = torch.addmm(codebook.square().sum(1)[None], flat, codebook.t(), alpha=-2.0)  # (N*L, K)
        idx = dist.argmin(dim=1)
        return codebook[idx].reshape(z.shape).to(z.dtype), idx.reshape(z.shape[:-1])

    def encode(self, x: torch.Tensor, band_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) scaled data -> (codes (B, C, h, w) int64, -1 on padding; quantized latents (B, C, D, h, w))."""
        codes, quantized, _ = self.quantize(self.encode_latents(x, band_valid), band_valid)
        return codes, quantized

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) codes (-1 = padding) -> (B, C, D, h, w) quantized latents (zeros on padding)."""
        B, C, h, w = codes.shape
        valid = codes >= 0
        safe = codes.clamp(min=0).reshape(B * C, h * w)
        if self.config.quantizer == "vq":
            q = self.quantizer.get_output_from_indices(safe)  # (B*C, h*w, D)
        else:
            q = self.quantizer.indices_to_codes(safe)  # (B*C, h*w, D)
        q = q.reshape(B, C, h, w, -1).permute(0, 1, 4, 2, 3)  # (B, C, D, h, w)
        return q * valid[:, :, None].to(q.dtype)

    def decode(self, codes_or_latents: torch.Tensor, band_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, C, h, w) int or quantized latents (B, C, D, h, w) -> (B, C, H, W) reconstruction.

        Padding bands (codes -1, or ``band_valid`` False) decode to zeros.
        """
        if codes_or_latents.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            codes = codes_or_latents.long()
            if band_valid is None:
                band_valid = (codes >= 0).flatten(2).any(-1)
            latents = self.codes_to_latents(codes)
        else:
            latents = codes_or_latents
        B, C = latents.shape[:2]
        valid = torch.ones((B, C), dtype=torch.bool, device=latents.device) if band_valid is None else band_valid.bool()
        recon = self.decoder(latents[valid]).squeeze(1)  # (N, H, W)
        return self._scatter(recon, valid)

    # -- training ---------------------------------------------------------------------------------------
    def reconstruction_error(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel error (L1 or squared) in scaled units, same shape as the inputs."""
        diff = recon - target
        return diff.abs() if self.config.recon_loss == "l1" else diff.square()

    def forward(self, x: torch.Tensor, band_valid: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> TokenizerOutput:
        """Encode, quantize, decode and score a batch.

        Args:
            x: (B, C, H, W) scaled data (a stack of one-band images is (N, 1, H, W)).
            band_valid: (B, C) bool, False for padding bands; None means all valid.
            weights: optional (B, C, H, W) source weights in [0, 1] (see :func:`source_weights`) for the
                source-weighted term.
        """
        valid = self._check(x, band_valid)
        latents = self.encode_latents(x, valid)
        codes, quantized, commit = self.quantize(latents, valid)
        target = x[valid]  # (N, H, W)
        recon_valid = self.decoder(quantized[valid]).squeeze(1)  # (N, H, W)
        err = self.reconstruction_error(recon_valid, target)
        recon_loss = err.mean()
        source_loss = err.new_zeros(())
        if weights is not None and self.config.source_weight > 0:
            w = weights.to(device=err.device, dtype=err.dtype)[valid]  # (N, H, W)
            source_loss = (w * err).sum() / w.sum().clamp(min=1e-12)  # 0 when no pixel has a source
        loss = recon_loss + self.config.source_weight * source_loss + commit
        counts = code_histogram(codes.detach(), self.num_codes)
        return TokenizerOutput(
            recon=self._scatter(recon_valid, valid),
            codes=codes,
            loss=loss,
            recon_loss=recon_loss,
            source_loss=source_loss,
            commit_loss=commit,
            perplexity=codebook_perplexity(counts),
            usage=codebook_usage(counts),
        )
