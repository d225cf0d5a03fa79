"""Training patches for fine-tuning: simulated on the fly (a pure function of seed and step) or cut from the
user's FITS images with reference catalogs (``--pairs DIR``).

A pairs folder holds ``NAME.fits`` (any image :func:`skyfm.data.read_image` reads) and beside it a catalog
``NAME_truth.ecsv`` / ``NAME.ecsv`` / ``NAME_catalog.{ecsv,fits,vot}`` (what ``skyfm demo`` and ``skyfm detect``
write) with ``x``, ``y`` pixel columns (or ``ra``/``dec`` or ``glon``/``glat`` and the image's WCS), optionally
``flux``, ``class``, ``extension``, ``snr``. Training crops are random windows of the images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError
from skyfm.finetune.config import SEED_STRIDE, TRAIN_SEED_BASE, VAL_SEED_BASE, FinetuneConfig

# simulate_patch options a scene may give as a range [lo, hi], drawn uniformly per patch
RANGE_OPTIONS = ("seeing", "psf_beta")

CATALOG_SUFFIXES = ("_truth.ecsv", ".ecsv", "_catalog.ecsv", "_catalog.fits", "_catalog.vot", ".cat.fits")


def _scene_options(inst, scene: dict, rng: np.random.Generator, size: int) -> dict:
    from skyfm.instruments import load_instrument

    inst = load_instrument(inst)
    options = {k: v for k, v in scene.items() if k not in ("weight", "glat", "glon")}
    options["size"] = size
    for key in RANGE_OPTIONS:  # [lo, hi]: a value drawn per patch (a night's seeing, a PSF's wings)
        if isinstance(options.get(key), (list, tuple)):
            lo, hi = (float(v) for v in options[key])
            options[key] = float(rng.uniform(lo, hi))
    if inst.is_counts and ("glat" in scene or "glon" in scene):
        lo, hi = scene.get("glat", (-90.0, 90.0))
        l_lo, l_hi = scene.get("glon", (-180.0, 180.0))
        options["center"] = (float(rng.uniform(l_lo, l_hi)) % 360.0, float(rng.uniform(lo, hi)))
    return options


def choose(rng: np.random.Generator, weights) -> int:
    w = np.asarray(weights, dtype=float)
    return int(rng.choice(len(w), p=w / w.sum()))


def simulated_patches(config: FinetuneConfig, step: int, instruments: dict, specs: dict) -> list:
    """The batch of step ``step``: one instrument (drawn by weight), ``batch_size`` patches, scenes drawn."""
    from skyfm.data.simulate import simulate_patch

    rng = np.random.default_rng([config.seed, step, 7])
    names = list(specs)
    name = names[choose(rng, [specs[n]["weight"] for n in names])]
    inst = instruments[name]
    scenes = specs[name]["scenes"]
    B = config.data.batch_size
    patches = []
    for j in range(B):
        base = TRAIN_SEED_BASE + SEED_STRIDE * int(config.seed)
        if config.data.train_pool:
            seed = base + int(rng.integers(config.data.train_pool))
            local = np.random.default_rng([seed, 11])  # a pool patch is the same patch every time it is drawn
        else:
            seed = base + step * B + j
            local = rng
        scene = scenes[choose(local, [s.get("weight", 1.0) for s in scenes])]
        patches.append(simulate_patch(inst, seed, **_scene_options(inst, scene, local, config.data.size)))
    return patches


def augment(patch, k: int):
    """One of the 8 rotations / reflections of a square training patch (``k`` in 0..7), truth moved with it.

    The WCS is dropped (training does not use it). Reusing a simulated batch under a new transform halves the
    simulation cost per step; the sky is statistically invariant under these transforms.
    """
    from skyfm.data.patch import Patch

    if k % 8 == 0:
        return patch
    H, W = patch.height, patch.width

    def tr(a, axes=(-2, -1)):
        if a is None:
            return None
        a = np.rot90(a, k % 4, axes=axes)
        if k >= 4:
            a = np.flip(a, axis=axes[1])
        return np.ascontiguousarray(a)

    truth = None
    if patch.truth is not None:
        truth = patch.truth.copy()
        x, y = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
        for _ in range(k % 4):  # np.rot90 (counter-clockwise in array view): new[i, j] = old[j, W - 1 - i]
            x, y = y, (W - 1) - x
            H, W = W, H
        if k >= 4:
            x = (W - 1) - x
        truth["x"], truth["y"] = x, y
    return Patch(data=tr(patch.data), instrument=patch.instrument, bands=list(patch.bands), wcs=None,
                 mask=tr(patch.mask), truth=truth, source_image=tr(patch.source_image),
                 contaminant_mask=tr(patch.contaminant_mask), energy_edges_kev=patch.energy_edges_kev,
                 meta=dict(patch.meta))


def validation_patches(inst, specs_entry: dict, n: int, size: int, seed_offset: int = 0,
                       bands: list[str] | None = None) -> list:
    """``n`` validation patches of one instrument (seeds VAL_SEED_BASE + seed_offset + i), scenes as in training;
    ``bands``: every patch holds these bands (default: as the instrument's simulations draw them)."""
    from skyfm.data.simulate import simulate_patch

    out = []
    scenes = specs_entry["scenes"]
    for i in range(n):
        seed = VAL_SEED_BASE + seed_offset + i
        rng = np.random.default_rng([seed, 13])
        scene = scenes[choose(rng, [s.get("weight", 1.0) for s in scenes])]
        options = _scene_options(inst, scene, rng, size)
        if bands:
            options["bands"] = list(bands)
        out.append(simulate_patch(inst, seed, **options))
    return out


# ------------------------------------------------------------------------------------------------ user pairs
def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SkyfmError(f"--pairs folder not found: {folder}")
    pairs = []
    for image in sorted(folder.glob("*.fits")) + sorted(folder.glob("*.fits.gz")):
        stem = image.name.split(".fits")[0]
        if stem.endswith("_catalog") or stem.endswith("_truth"):
            continue
        for suffix in CATALOG_SUFFIXES:
            cat = folder / f"{stem}{suffix}"
            if cat.is_file():
                pairs.append((image, cat))
                break
    if not pairs:
        raise SkyfmError(f"{folder} holds no image + catalog pairs (NAME.fits with NAME_truth.ecsv, NAME.ecsv or "
                         "NAME_catalog.ecsv beside it)")
    return pairs


def _catalog_pixels(table, patch, path: Path):
    from astropy.table import Table

    t = Table(table)
    if {"x", "y"} <= set(t.colnames):
        x, y = np.asarray(t["x"], float), np.asarray(t["y"], float)
    else:
        if patch.wcs is None:
            raise SkyfmError(f"{path} has no x, y columns and its image has no WCS to place ra/dec")
        from astropy.coordinates import SkyCoord

        if {"ra", "dec"} <= set(t.colnames):
            c = SkyCoord(np.asarray(t["ra"], float), np.asarray(t["dec"], float), unit="deg", frame="icrs")
        elif {"glon", "glat"} <= set(t.colnames):
            c = SkyCoord(np.asarray(t["glon"], float), np.asarray(t["glat"], float), unit="deg", frame="galactic")
        else:
            raise SkyfmError(f"{path} needs x, y (pixels) or ra, dec / glon, glat columns")
        x, y = patch.wcs.world_to_pixel(c)
    truth = Table()
    truth["x"], truth["y"] = np.asarray(x, float), np.asarray(y, float)
    for name in ("flux", "flux_band", "class", "class_group", "extension", "snr"):
        if name in t.colnames:
            truth[name] = np.asarray(getattr(t[name], "value", t[name]))
    return truth


class PairCrops:
    """Random training crops of the user's images with their reference catalogs as truth."""

    def __init__(self, folder: str | Path, instrument=None, size: int = 64):
        from skyfm.catalog import read_table
        from skyfm.data import read_image

        self.items = []
        for image_path, cat_path in find_pairs(folder):
            patch = read_image(image_path, instrument=instrument)
            patch.truth = _catalog_pixels(read_table(cat_path), patch, cat_path)
            self.items.append(patch)
        self.size = size
        self.instrument = self.items[0].instrument

    def batch(self, seed: int, step: int, batch_size: int) -> list:
        from skyfm.data.tiling import Tile, tile_patch

        rng = np.random.default_rng([seed, step, 17])
        out = []
        for _ in range(batch_size):
            p = self.items[int(rng.integers(len(self.items)))]
            s = self.size
            y0 = int(rng.integers(0, max(p.height - s, 0) + 1))
            x0 = int(rng.integers(0, max(p.width - s, 0) + 1))
            tile = Tile(y0, y0 + s, x0, x0 + s, y0, min(y0 + s, p.height), x0, min(x0 + s, p.width))
            out.append(tile_patch(p, tile))
        return out


__all__ = ["PairCrops", "find_pairs", "simulated_patches", "validation_patches"]
