"""Cut images of any size into overlapping tiles, and map tile pixels back to the full image and the sky.

A network sees fixed-size patches; survey images are larger (a MeerLICHT frame is 10560 x 10560 pixels) or
smaller. :func:`tile_grid` lays overlapping tiles over an image:

* along an axis longer than a tile, tiles start every ``tile - overlap`` pixels and the last one is shifted inward
  so that it ends at the image edge: every pixel a network sees is real, nothing is padded;
* along an axis shorter than a tile, one tile starts at 0 and runs past the edge; the pixels beyond the image are
  padded with zeros and masked.

Each tile *owns* a core region: the overlaps are split at their middle, so every pixel of the image belongs to
exactly one core and a source detected in several tiles is kept only by the tile that owns its position
(:meth:`Tile.owns`). A core lies at least ``overlap // 2`` pixels inside its tile wherever a neighbour exists, so
a source found in a core has context on every side.

Coordinates follow the skyfm convention: 0-based pixel centres, x = column, y = row; pixel ``i`` spans
``[i - 0.5, i + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from skyfm.data.patch import Patch
from skyfm.errors import SkyfmError

if TYPE_CHECKING:
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS


@dataclass(frozen=True)
class Tile:
    """One tile of an image, in full-image pixel indices (half-open ranges, numpy style).

    Attributes:
        y0, y1, x0, x1: the window the tile covers: rows ``y0:y1``, columns ``x0:x1``. A tile of an image smaller
            than the tile size runs past the image edge (``y1 > height``); those pixels are padding.
        core_y0, core_y1, core_x0, core_x1: the part of the image this tile owns (inside the window and the image).
        row, col: the tile's position in the grid.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int
    row: int = 0
    col: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the tile window in pixels."""
        return self.y1 - self.y0, self.x1 - self.x0

    def owns(self, x, y):
        """Whether full-image pixel position(s) (x, y) fall in this tile's core; arrays broadcast.

        Positions are continuous (a sub-pixel source centroid): pixel ``i`` owns ``[i - 0.5, i + 0.5)``, so
        neighbouring cores meet without a gap or an overlap.
        """
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        inside = ((x >= self.core_x0 - 0.5) & (x < self.core_x1 - 0.5)
                  & (y >= self.core_y0 - 0.5) & (y < self.core_y1 - 0.5))
        return inside if inside.ndim else bool(inside)

    def __repr__(self) -> str:
        return (f"Tile(rows {self.y0}:{self.y1}, cols {self.x0}:{self.x1}; core rows {self.core_y0}:{self.core_y1},"
                f" cols {self.core_x0}:{self.core_x1})")


def _axis_windows(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) of the tiles along one image axis of ``length`` pixels."""
    if length <= tile:
        return [(0, tile, 0, length)]  # one tile, padded past the edge
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]  # the last tile ends exactly at the edge
    # Split each overlap at its middle: the boundary between tiles i and i+1 lies halfway between where tile
    # i+1 starts and where tile i ends.
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(len(starts) - 1)] + [length]
    return [(s, s + tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v for v in pair):
        raise SkyfmError(f"{name} should be an integer or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def tile_grid(height: int, width: int, tile: int | tuple[int, int], overlap: int | tuple[int, int] = 0) -> list[Tile]:
    """Tiles of ``tile`` pixels (square, or (height, width)) overlapping by ``overlap`` pixels, covering an image.

    Tiles are listed row by row. See the module docstring for how edges and cores are placed.
    """
    tile_h, tile_w = _pair(tile, "tile")
    over_h, over_w = _pair(overlap, "overlap")
    if height < 1 or width < 1:
        raise SkyfmError(f"cannot tile an image of {height} x {width} pixels")
    if min(tile_h, tile_w) < 1:
        raise SkyfmError(f"tile size must be positive, got {tile!r}")
    if not (0 <= over_h < tile_h and 0 <= over_w < tile_w):
        raise SkyfmError(f"overlap must be at least 0 and smaller than the tile ({tile!r}), got {overlap!r}")
    rows = _axis_windows(height, tile_h, over_h)
    cols = _axis_windows(width, tile_w, over_w)
    return [
        Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1, row=r, col=c)
        for r, (y0, y1, cy0, cy1) in enumerate(rows)
        for c, (x0, x1, cx0, cx1) in enumerate(cols)
    ]


def to_full_image(x, y, tile: Tile):
    """Full-image pixel position(s) of tile pixel position(s) (x, y); arrays broadcast."""
    return np.asarray(x, dtype=float) + tile.x0, np.asarray(y, dtype=float) + tile.y0


def to_sky(x, y, tile: Tile, wcs: WCS) -> SkyCoord:
    """Sky position(s) of tile pixel position(s) (x, y), through the full image's celestial WCS."""
    if wcs is None:
        raise SkyfmError("this image has no celestial WCS: positions exist in pixels only")
    return wcs.pixel_to_world(*to_full_image(x, y, tile))


def _window(array: np.ndarray, tile: Tile, fill=0) -> np.ndarray:
    """``array[..., y0:y1, x0:x1]`` of a (..., H, W) array, padded with ``fill`` where the tile runs past it."""
    height, width = array.shape[-2:]
    out = np.full(array.shape[:-2] + tile.shape, fill, dtype=array.dtype)
    h, w = min(tile.y1, height) - tile.y0, min(tile.x1, width) - tile.x0
    out[..., :h, :w] = array[..., tile.y0:tile.y0 + h, tile.x0:tile.x0 + w]
    return out


def _tile_truth(truth, tile: Tile):
    """The truth rows inside a tile's window, with x, y moved to tile pixels; None when there is no truth."""
    if truth is None or not {"x", "y"} <= set(truth.colnames):
        return None
    x, y = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    inside = (x >= tile.x0 - 0.5) & (x < tile.x1 - 0.5) & (y >= tile.y0 - 0.5) & (y < tile.y1 - 0.5)
    rows = truth[inside]
    rows["x"] = rows["x"] - tile.x0
    rows["y"] = rows["y"] - tile.y0
    return rows


def mirror_fill(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 copy of a CCD image with its masked pixels filled: each takes the pixel mirrored across
    the nearest valid one (reflection padding, in any shape), else (a mirror off the image or itself masked) the
    band's sky plus noise at its robust level and scatter. A flat fill changes the statistics a network's group
    norms take over its whole input (``docs/benchmarks.md``, Run 23); a mirror keeps them those of the sky."""
    from scipy import ndimage

    from skyfm.instruments.scaling import robust_background

    out = np.array(data, dtype=np.float32)
    mask = np.asarray(mask, bool)
    valid = ~mask
    if not mask.any() or not valid.any():
        return out
    h, w = mask.shape
    my, mx = np.nonzero(mask)
    _, (ny, nx) = ndimage.distance_transform_edt(mask, return_indices=True)
    ry, rx = 2 * ny[my, mx] - my, 2 * nx[my, mx] - mx
    ok = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
    ok[ok] = valid[ry[ok], rx[ok]]
    rng = np.random.default_rng(int(my.size))
    for c in range(out.shape[0]):
        sky, sigma = robust_background(out[c][valid])
        fill = (sky + sigma * rng.standard_normal(my.size)).astype(np.float32)
        fill[ok] = out[c][ry[ok], rx[ok]]
        out[c][my, mx] = fill
    return out


def tile_patch(image: Patch, tile: Tile) -> Patch:
    """The part of a patch under one tile: data, mask, WCS (``wcs.slice``), truth, source and background images cut alike."""
    height, width = image.height, image.width
    mask = np.ones(tile.shape, dtype=bool)  # padding is masked
    mask[: min(tile.y1, height) - tile.y0, : min(tile.x1, width) - tile.x0] = False
    if image.mask is not None:
        mask |= _window(image.mask, tile, fill=True)
    wcs = None
    if image.wcs is not None:
        wcs = image.wcs.slice((slice(tile.y0, tile.y1), slice(tile.x0, tile.x1)))
    return Patch(
        data=_window(image.data, tile),
        instrument=image.instrument,
        bands=list(image.bands),
        wcs=wcs,
        mask=mask if mask.any() else None,
        truth=_tile_truth(image.truth, tile),
        source_image=None if image.source_image is None else _window(image.source_image, tile),
        background_image=None if image.background_image is None else _window(image.background_image, tile),
        contaminant_mask=None if image.contaminant_mask is None else _window(image.contaminant_mask, tile),
        energy_edges_kev=image.energy_edges_kev,
        meta=dict(image.meta, tile_y0=tile.y0, tile_x0=tile.x0),
    )


def iter_tiles(image, tile: int | tuple[int, int], overlap: int | tuple[int, int] = 0) -> Iterator[tuple[Tile, Patch]]:
    """Yield (Tile, Patch) over an image, one tile at a time.

    ``image`` is a :class:`~skyfm.data.Patch` held in memory, or an image opened lazily with
    :func:`skyfm.data.open_image` (then each tile is read from disk as it is needed, so a 10k x 10k mosaic never
    sits in memory whole). Each tile's patch has its own WCS, so its pixel positions map to the sky directly;
    :func:`to_full_image` maps them back to the full image.
    """
    if isinstance(image, Patch):
        height, width = image.height, image.width
        for t in tile_grid(height, width, tile, overlap):
            yield t, tile_patch(image, t)
        return
    _, height, width = image.shape
    for t in tile_grid(height, width, tile, overlap):
        yield t, image.read_patch_window(t.y0, t.y1, t.x0, t.x1)
