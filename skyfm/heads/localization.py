"""Localization: a CenterNet centre heatmap, a sub-pixel offset and its predicted uncertainty.

Why a heatmap and not a CeDiRNet centre-direction field: point sources are (nearly) round and small compared with
the tiles, so a centre heatmap with a narrow Gaussian target (sigma ~ 0.35 FWHM, 1-2 px) puts a separate peak on
each member of a blended pair as soon as they are ~2 px apart, and peaks are found with one 3x3 max-pool, no
voting step. The offset head recovers the sub-pixel position; its predicted sigma (a Gaussian negative
log-likelihood) is the catalog's position error.

Channels of this family (per instrument head): ``heat`` (1, logits), ``offset`` (2: dx, dy in pixels from the
pixel centre), ``pos_logsigma`` (1: ln sigma of each offset component, pixels).

* targets: :func:`render_gaussian` (a Gaussian of peak 1 centred on the source's nearest pixel, max over sources);
* losses: :func:`focal_loss` (CenterNet's penalty-reduced focal loss, alpha = 2, beta = 4) and :func:`offset_nll`;
* decoding: :func:`find_peaks` (3x3 local maxima above a score, pixel + predicted offset).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOGSIGMA_RANGE = (-4.0, 3.0)


def render_gaussian(heat: np.ndarray, cx: int, cy: int, sigma: float) -> None:
    """In place: ``heat = max(heat, exp(-r^2 / 2 sigma^2))`` around pixel (cx, cy) (which gets exactly 1)."""
    H, W = heat.shape
    r = int(np.ceil(3 * sigma))
    y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, H), max(cx - r, 0), min(cx + r + 1, W)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma)).astype(np.float32)
    np.maximum(heat[y0:y1, x0:x1], g, out=heat[y0:y1, x0:x1])


def focal_loss(logits: torch.Tensor, target: torch.Tensor, neg_weight: torch.Tensor, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """CenterNet focal loss, summed and divided by the number of positives (pixels where target == 1).

    ``neg_weight`` (same shape) multiplies the negative term: 0 ignores a pixel (padding, faint true sources),
    >1 insists on it (contaminants).
    """
    logits = logits.float()
    pos = target >= 1.0
    log_p = F.logsigmoid(logits)
    log_1p = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = -((1 - p) ** alpha * log_p)[pos].sum()
    neg = (~pos).float() * neg_weight
    neg_loss = -((1 - target) ** beta * p**alpha * log_1p * neg).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1).float()


def offset_nll(pred: torch.Tensor, logsigma: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gaussian NLL of the offsets with predicted isotropic sigma, L1 error) averaged over the rows given.

    pred, target: (N, 2) pixels; logsigma: (N,) ln sigma.
    """
    if pred.numel() == 0:
        zero = pred.sum() * 0.0
        return zero, zero
    ls = logsigma.float().clamp(*LOGSIGMA_RANGE)
    err = pred.float() - target
    nll = (0.5 * (err**2).sum(dim=1) * torch.exp(-2 * ls) + 2 * ls).mean()
    return nll, err.abs().sum(dim=1).mean()


def find_peaks(heat_prob: torch.Tensor, min_score: float, valid: torch.Tensor | None = None,
               kernel: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local maxima of a (H, W) probability map above ``min_score``: (rows, cols, scores), highest first.

    A pixel is a peak when it equals the maximum of its ``kernel`` x ``kernel`` neighbourhood (CenterNet's NMS by
    max-pooling); two sources 2 px apart keep two peaks. Plateaus (equal neighbours) keep one pixel: the first in
    row-major order. ``valid`` (H, W) bool excludes pixels (masked or padding).
    """
    h = heat_prob[None, None]
    pooled = F.max_pool2d(h, kernel, stride=1, padding=kernel // 2)[0, 0]
    peak = (heat_prob >= pooled) & (heat_prob >= min_score)
    if valid is not None:
        peak &= valid
    rows, cols = torch.nonzero(peak, as_tuple=True)
    scores = heat_prob[rows, cols]
    if rows.numel() > 1:  # plateau: drop a peak with an equal-valued peak left of it or above it
        order = torch.argsort(scores, descending=True, stable=True)
        rows, cols, scores = rows[order], cols[order], scores[order]
    return rows, cols, scores


def merge_close(x: np.ndarray, y: np.ndarray, score: np.ndarray, radius: float) -> np.ndarray:
    """Indices to keep after dropping any detection within ``radius`` px of a higher-scoring kept one.

    Peaks on neighbouring pixels whose offsets point to the same position collapse to one here; a real pair
    (their refined positions > radius apart) survives.
    """
    order = np.argsort(-score, kind="stable")
    if radius <= 0 or len(order) < 2:
        return order
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.stack([x, y], axis=1)).query_pairs(radius, output_type="ndarray")  # (P, 2)
    if len(pairs) == 0:
        return order
    # greedy in score order, over the few detections that have a neighbour within the radius
    both = np.concatenate([pairs, pairs[:, ::-1]])  # each pair both ways, grouped by its first index
    both = both[np.argsort(both[:, 0], kind="stable")]
    starts = np.searchsorted(both[:, 0], np.arange(len(x) + 1))
    rank = np.empty(len(x), dtype=int)
    rank[order] = np.arange(len(x))
    removed = np.zeros(len(x), dtype=bool)
    for i in sorted(np.unique(pairs), key=rank.__getitem__):
        if not removed[i]:
            removed[both[starts[i]:starts[i + 1], 1]] = True
    return order[~removed[order]]


__all__ = ["find_peaks", "focal_loss", "merge_close", "offset_nll", "render_gaussian"]
