"""Two independent noisy copies of one sky image, for the denoising pretraining term (Noise2Noise).

A network that regresses one noisy copy of an image from another, with a squared error, learns the conditional
mean of the target: the noise-free sky (sources + background), because the target's noise is independent of
everything the network sees and cannot be predicted. The copies come from the one observation, with no truth:

* **Counts** (scaling ``log1p`` or ``anscombe``): binomial thinning. Each pixel's ``n`` counts are split into
  ``A ~ Binomial(n, p)`` and ``B = n - A``; for Poisson data ``A`` and ``B`` are independent Poisson images of
  rates ``p * rate`` and ``(1 - p) * rate``. The input is ``A / p`` and the target ``B / (1 - p)``: both have the
  sky's rate as their mean.
* **CCD images** (scaling ``asinh``, with the band's sky and noise sigma estimated robustly): recorruption
  (Pang et al. 2021, "Recorrupted-to-Recorrupted"). With ``z ~ N(0, 1)``, the input is ``x + alpha sigma z`` and
  the target ``x - sigma z / alpha``; for Gaussian noise of sigma their noises are uncorrelated (the cross term
  ``sigma^2 - sigma^2`` vanishes), and both have the noise-free image as their mean. The sources' own Poisson
  noise is not in sigma; only bright stars' cores, where it dominates, keep a little correlated noise.

Both copies are scaled with the sample's own scaling parameters (the ones the shards computed from the full
observation), so they live in the units the backbone always sees. The input's noise is a little above the
observation's (``1 / sqrt(p)``, ``sqrt(1 + alpha^2)``): close enough for the features learned on it to serve the
full-depth images of inference.
"""

from __future__ import annotations

import torch

from skyfm.errors import SkyfmError

INPUT_FRACTION = 0.7  # counts: share of each pixel's counts in the input copy (the target gets the rest)
RECORRUPTION_ALPHA = 0.5  # CCDs: input noise sqrt(1 + alpha^2) sigma, target noise sqrt(1 + 1 / alpha^2) sigma


def split_counts(counts: torch.Tensor, fraction: float, generator: torch.Generator | None = None):
    """(input, target) rate images from binomial thinning of ``counts`` (any shape, non-negative counts).

    Counts are rounded to whole numbers first (a counts cube holds whole numbers; an exposure-weighted one is
    thinned approximately).
    """
    if not 0.0 < fraction < 1.0:
        raise SkyfmError(f"the input fraction of binomial thinning must be in (0, 1), got {fraction}")
    n = counts.clamp(min=0).round()
    kept = torch.binomial(n, torch.full_like(n, fraction), generator=generator)
    return kept / fraction, (n - kept) / (1.0 - fraction)


def split_gaussian(image: torch.Tensor, sigma: torch.Tensor, alpha: float, generator: torch.Generator | None = None):
    """(input, target) recorrupted copies of ``image`` (..., C, H, W) whose noise has per-band ``sigma`` (..., C)."""
    if alpha <= 0:
        raise SkyfmError(f"the recorruption alpha must be > 0, got {alpha}")
    z = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    noise = sigma[..., None, None] * z
    return image + alpha * noise, image - noise / alpha


def noise_split(batch: dict, generator: torch.Generator | None = None, fraction: float = INPUT_FRACTION,
                alpha: float = RECORRUPTION_ALPHA) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target), both (B, C, H, W) scaled like ``batch["scaled"]``: two independent noisy copies of each
    sample's raw ``batch["image"]`` (see the module docstring), per the sample's scaling in ``batch["scaling"]``.

    Padding bands stay zero in both.
    """
    from skyfm.data.shards import apply_scaling
    from skyfm.instruments.scaling import counts_scaled

    if "scaling" not in batch:
        raise SkyfmError("noise_split needs the batch's per-sample scaling parameters (collate_patches 'scaling')")
    image, valid = batch["image"], batch["band_valid"]
    # the noise is drawn on the CPU (the scaling parameters live there), from a generator seeded by the given one
    # (which may live on a GPU): the same generator state gives the same copies on any device
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.zeros_like(batch["scaled"]), torch.zeros_like(batch["scaled"])
    for i, params in enumerate(batch["scaling"]):
        c = int(valid[i].sum())
        raw = image[i, :c].float().cpu()
        if counts_scaled(params):
            noisy, target = split_counts(raw, fraction, generator)
        elif params["method"] == "asinh":
            sigma = torch.tensor(params["sigma"], dtype=torch.float32)
            noisy, target = split_gaussian(raw, sigma, alpha, generator)
        else:
            raise SkyfmError(f"noise_split does not know the scaling method {params['method']!r}")
        inputs[i, :c] = apply_scaling(noisy, params).to(inputs.device)
        targets[i, :c] = apply_scaling(target, params).to(targets.device)
    return inputs, targets


__all__ = ["INPUT_FRACTION", "RECORRUPTION_ALPHA", "noise_split", "split_counts", "split_gaussian"]
