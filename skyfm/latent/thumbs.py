"""Small PNG thumbnails of patches and sources, stored with every embedding, and the neighbour grid of a search.

A thumbnail is drawn from the *scaled* pixels the network saw (log / asinh, instrument-aware), so a Fermi counts
cube and a WISE image look comparable: with three or more bands an RGB image (red = the longest wavelength, blue
= the shortest; for counts cubes red = the lowest energy), else grey. Each thumbnail (each channel) is stretched
on its own (1st to 99.5th percentile) and stored as PNG bytes (a few hundred bytes to ~2 kB each).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

THUMB_SIZE = 48  # pixels per side of a stored thumbnail
SOURCE_STAMP = 24  # image pixels per side of a source's cutout (resampled to THUMB_SIZE)


def _stretch(image: np.ndarray) -> np.ndarray:
    """(..., H, W) floats -> uint8 with a 1 - 99.5 percentile stretch over the whole array."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [1.0, 99.5])
    if hi <= lo:
        hi = lo + 1e-6
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0, 1)
    return (scaled * 255 + 0.5).astype(np.uint8)


def render_rgb(scaled: np.ndarray, band_coord: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) scaled pixels of valid bands -> (H, W) or (H, W, 3) uint8.

    ``band_coord`` (C,) log10 wavelength orders the bands for the RGB choice (red = longest wavelength).
    """
    scaled = np.asarray(scaled, dtype=np.float32)
    c = scaled.shape[0]
    if c >= 3:
        order = np.argsort(band_coord if band_coord is not None else -np.arange(c))  # short -> long wavelength
        blue, green, red = order[0], order[c // 2], order[-1]
        return np.stack([_stretch(scaled[red]), _stretch(scaled[green]), _stretch(scaled[blue])], axis=-1)
    return _stretch(scaled.mean(axis=0))


def png_bytes(pixels: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """PNG bytes of a (H, W) or (H, W, 3) uint8 image, resampled to ``size`` x ``size`` (nearest for upsampling)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image.size != (size, size):
        upsampling = image.size[0] < size
        image = image.resize((size, size), Image.NEAREST if upsampling else Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def patch_thumbnail(scaled: np.ndarray, band_coord: np.ndarray | None = None, valid: np.ndarray | None = None) -> bytes:
    """PNG thumbnail of a whole (C, H, W) scaled patch (``valid`` (H, W): padding is drawn black)."""
    rgb = render_rgb(scaled, band_coord)
    if valid is not None and not valid.all():
        rgb = rgb.copy()
        rgb[~valid] = 0
    return png_bytes(rgb)


def source_stamp(scaled: np.ndarray, x: float, y: float, half: int = SOURCE_STAMP // 2) -> np.ndarray:
    """(C, 2 half, 2 half) cutout of scaled pixels centred on pixel (x, y); outside the patch is NaN."""
    c, h, w = scaled.shape
    xi, yi = int(round(x)), int(round(y))
    out = np.full((c, 2 * half, 2 * half), np.nan, dtype=np.float32)
    y0, x0 = yi - half, xi - half
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y0 + 2 * half, h), max(x0, 0), min(x0 + 2 * half, w)
    if sy0 < sy1 and sx0 < sx1:
        out[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = scaled[:, sy0:sy1, sx0:sx1]
    return out


def source_thumbnail(scaled: np.ndarray, x: float, y: float, band_coord: np.ndarray | None = None) -> bytes:
    """PNG thumbnail of a source: a :data:`SOURCE_STAMP`-pixel cutout of the scaled patch around (x, y)."""
    return png_bytes(render_rgb(source_stamp(scaled, x, y), band_coord))


def decode_png(data: bytes | None) -> np.ndarray | None:
    """uint8 pixels of PNG bytes (None for None / empty)."""
    if not data:
        return None
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def save_neighbour_grid(rows: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """A PNG grid: one row per query, its thumbnail then its neighbours', each labelled.

    ``rows``: dicts with ``query`` (dict with ``thumbnail`` bytes or None and ``label``) and ``neighbours``
    (list of dicts with ``thumbnail``, ``label``). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skyfm.plotting import save_figure

    ncols = 1 + max((len(r["neighbours"]) for r in rows), default=0)
    nrows = max(len(rows), 1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.45 * ncols, 1.75 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for r, row in enumerate(rows):
        cells = [row["query"]] + list(row["neighbours"])
        for c, cell in enumerate(cells):
            ax = axes[r, c]
            pixels = decode_png(cell.get("thumbnail"))
            if pixels is not None:
                ax.imshow(pixels, cmap="gray", interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "no\nthumbnail", ha="center", va="center", fontsize=6, transform=ax.transAxes)
            ax.set_title(cell.get("label", ""), fontsize=5.5, color="C3" if c == 0 else "black")
            if c == 0:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("C3")
                    spine.set_linewidth(2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


__all__ = ["THUMB_SIZE", "decode_png", "patch_thumbnail", "png_bytes", "render_rgb", "save_neighbour_grid",
           "source_stamp", "source_thumbnail"]
