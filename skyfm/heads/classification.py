"""Class probabilities and extension.

Channels of this family: ``class`` (K logits: ``agn / pulsar / other`` for counts instruments, from the truth's
``class_group``; ``star / galaxy`` for CCDs, from ``class``) and ``extension`` (1: ln(1 + extension / native
pixel), where extension is the 68% radius of a gamma-ray source's shape or a galaxy's half-light radius, deg).
Artefacts (cosmic rays, trails, hot pixels) are not a class: they are negatives of the heatmap.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_index(truth, class_names: list[str], kind: str) -> np.ndarray:
    """(N,) int class of each truth row in ``class_names``; -1 when unknown (ignored by the loss)."""
    n = len(truth)
    column = None
    for name in (("class_group", "class") if kind == "counts" else ("class",)):
        if name in truth.colnames:
            column = name
            break
    if column is None:
        return np.full(n, -1, dtype=np.int64)
    lookup = {c: i for i, c in enumerate(class_names)}
    return np.array([lookup.get(str(v).strip().lower(), -1) for v in truth[column]], dtype=np.int64)


def class_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows with a known class (target >= 0); 0 when there are none."""
    ok = target >= 0
    if not bool(ok.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[ok].float(), target[ok])


def extension_target(extension_deg, pixel_scale_deg: float) -> np.ndarray:
    ext = np.nan_to_num(np.asarray(extension_deg, dtype=np.float64), nan=0.0)
    return np.log1p(np.clip(ext, 0, None) / pixel_scale_deg).astype(np.float32)


def extension_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(target)
    if not bool(ok.any()):
        return pred.sum() * 0.0
    return F.smooth_l1_loss(pred.float()[ok], target[ok], beta=0.5)


def decode_extension(pred: np.ndarray, pixel_scale_deg: float) -> np.ndarray:
    """Extension in deg from the head's output."""
    return np.expm1(np.clip(pred, 0, 20)) * pixel_scale_deg


__all__ = ["class_index", "class_loss", "decode_extension", "extension_loss", "extension_target"]
