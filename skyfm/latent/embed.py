"""Embeddings: one vector per patch (tile) and one per source, with the metadata to find them again.

What a vector is
----------------
The foundation model gives, per tile, token features averaged over bands (``feature_map``, (D, h', w'), one cell
per ``token_stride`` pixels; its mean over the cells is ``pooled``) and full-resolution ``dense_features``
(Df, H, W), the features the detector heads read. An embedding joins both, each block scaled to unit length::

    patch  vector = [ unit(pooled)                     , unit(mean of dense features over valid pixels) ] / sqrt(2)
    source vector = [ unit(feature_map at the source)  , unit(dense features at the source)              ] / sqrt(2)

(bilinear sampling at the source's sub-pixel position). Vectors have D + Df dimensions (160 for skyfm-tiny) and
unit length, so that the token block (context: what the sky around looks like) and the dense block (the source
itself) weigh the same, and cosine similarity, inner product and L2 distance all rank neighbours alike. Patch
and source vectors live in one space: a patch's token block is the mean of its cells' token features.

Where sources come from (per file, first that applies): ``sources=`` (a catalog: FITS / ECSV / VOTable with
``ra``/``dec``, ``glon``/``glat`` or ``x``/``y``; with a ``file`` column its rows go to the input of that name),
else the file's TRUTH table (simulated files; sources with ``snr >= min_snr``), else the detector
(:func:`skyfm.detect.detect_patch`, when the detector is installed). Images larger than a tile are cut into
overlapping tiles (:mod:`skyfm.data.tiling`); each source is embedded once, in the tile whose core owns it.

The output is a :mod:`pyarrow` table, one row per vector, written as Parquet (:func:`write_embeddings`). Columns:
``id`` (row number), ``kind`` (patch / source), ``file``, ``tile`` (index in the file's tile grid), ``tile_x0``,
``tile_y0``, ``tile_w``, ``tile_h`` (the tile's window, full-image pixels), ``instrument``, ``bands`` (comma
separated), ``x``, ``y`` (full-image pixels, 0-based; a patch: its window's centre), ``ra``, ``dec``, ``glon``,
``glat`` (deg; null without a WCS), ``class``, ``flux``, ``snr``, ``score`` (when known; null otherwise),
``origin`` (truth / catalog / detector; null for patches), ``n_sources`` (patches: sources in the tile's core),
``thumbnail`` (PNG bytes, :mod:`skyfm.latent.thumbs`) and ``embedding`` (fixed-size list of float32). The
schema's metadata ``skyfm.embedding`` (JSON) records the model, the vector layout and the command.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from skyfm.errors import SkyfmError

EMBED_META_KEY = b"skyfm.embedding"
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fits.bz2")
DEFAULT_TILE = 64  # pixels: the patch size the shipped tiny models were pretrained on
DEFAULT_OVERLAP = 16

METADATA_COLUMNS = ("id", "kind", "file", "tile", "tile_x0", "tile_y0", "tile_w", "tile_h", "instrument", "bands",
                    "x", "y", "ra", "dec", "glon", "glat", "class", "flux", "snr", "score", "origin", "n_sources",
                    "thumbnail")


# =============================================================================================== the model
def load_embedding_model(model_dir: str | Path | None = None, map_location: str = "cpu"):
    """(FoundationModel, description, detector or None) to embed with.

    ``model_dir``: a FoundationModel directory (``config.json`` + ``model.safetensors``, e.g.
    ``runs/pretrain-tiny/model``), or a detector directory (its backbone is used, through
    :func:`skyfm.heads.load_detector`). None: the backbone of the default detector shipped with skyfm, when the
    detector is installed; otherwise a SkyfmError asking for ``--model``. The detector (when one was loaded) is
    returned too, so that sources are found by the same model that embeds them.
    """
    from skyfm.foundation.model import FoundationModel

    load_detector = _detector_loader()
    if model_dir is None:
        if load_detector is None:
            raise SkyfmError("no default model is installed (the detector is not part of this skyfm yet): pass "
                             "--model DIR, a foundation model folder such as runs/pretrain-tiny/model")
        detector = load_detector(None)
        return _eval(detector.foundation, map_location), "default detector backbone", detector
    path = Path(model_dir)
    if not path.exists():
        raise SkyfmError(f"model directory {path} does not exist")
    try:
        return FoundationModel.from_pretrained(path, map_location=map_location), str(path), None
    except SkyfmError as foundation_error:
        if load_detector is None:
            raise
        try:
            detector = load_detector(path)
        except SkyfmError as detector_error:
            raise SkyfmError(f"{path} is neither a foundation model ({foundation_error}) nor a detector "
                             f"({detector_error})") from None
        return _eval(detector.foundation, map_location), f"{path} (detector backbone)", detector


def _eval(model, map_location):
    return model.to(map_location).eval()


def _detector_loader():
    """skyfm.heads.load_detector, or None while the detector is not installed."""
    try:
        from skyfm.heads import load_detector
    except ImportError:
        return None
    return load_detector


def _detect_fn():
    """skyfm.detect.detect_patch, or None while the detector is not installed."""
    try:
        from skyfm.detect import detect_patch
    except ImportError:
        return None
    return detect_patch


# ======================================================================================= vectors of tiles
def _unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _bare(patch):
    """The patch without truth / source image / contaminants: the model needs pixels only (faster to encode)."""
    return replace(patch, truth=None, source_image=None, contaminant_mask=None)


@dataclass
class TileVectors:
    """What :func:`embed_tiles` returns for a batch of tiles."""

    patch: np.ndarray  # (B, D + Df) float32 unit vectors
    sources: list[np.ndarray]  # per tile (n_i, D + Df)
    scaled: np.ndarray  # (B, C, H, W) scaled pixels the model saw (for thumbnails)
    band_valid: np.ndarray  # (B, C) bool
    band_coord: np.ndarray  # (B, C)
    pixel_valid: np.ndarray  # (B, H, W) bool


def embed_tiles(model, patches: Sequence, positions: Sequence[np.ndarray | None] | None = None,
                instrument=None, blocks: str = "both") -> TileVectors:
    """Embed tiles of one size in one forward pass.

    Args:
        model: a FoundationModel (eval mode).
        patches: :class:`~skyfm.data.Patch` tiles, all of the same height and width (multiples of the model's
            token stride).
        positions: per tile, an (n, 2) array of (x, y) tile pixel positions to embed as sources (or None).
        instrument: the Instrument (or YAML path) for patches of a user's instrument; default: each patch's.
        blocks: ``both`` (the layout in the module docstring), ``token`` or ``dense`` (one block only; for
            ablations, e.g. in benchmarks/latent.py).
    """
    import torch
    import torch.nn.functional as F

    from skyfm.data.shards import collate_patches, sample_from_patch
    from skyfm.foundation.model import BATCH_KEYS

    if blocks not in ("both", "token", "dense"):
        raise SkyfmError(f"blocks must be both, token or dense, got {blocks!r}")
    samples = [sample_from_patch(_bare(p), key=f"tile-{i}", instrument=instrument) for i, p in enumerate(patches)]
    batch = collate_patches(samples)
    positions = list(positions) if positions is not None else [None] * len(patches)
    with torch.no_grad():
        out = model(*(batch[k].to(model.device) for k in BATCH_KEYS), dense=blocks != "token", codes=False)
        fmap = out.feature_map.float()
        B, H, W = fmap.shape[0], batch["scaled"].shape[-2], batch["scaled"].shape[-1]
        valid = (~batch["pixel_mask"]).to(model.device)
        parts = []
        if blocks != "dense":
            parts.append(_unit(out.pooled.float()))
        if blocks != "token":
            dense = out.dense_features.float()
            w = valid.float()[:, None]
            parts.append(_unit((dense * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1.0)))
        scale = 1.0 / math.sqrt(len(parts))
        patch_vec = torch.cat(parts, dim=1) * scale
        source_vecs = []
        for b, pos in enumerate(positions):
            if pos is None or len(pos) == 0:
                source_vecs.append(np.zeros((0, patch_vec.shape[1]), dtype=np.float32))
                continue
            pos = torch.as_tensor(np.asarray(pos, dtype=np.float32), device=model.device).reshape(-1, 2)
            # normalised coordinates of align_corners=False: pixel centre x -> (x + 0.5) / W * 2 - 1
            grid = torch.stack([(pos[:, 0] + 0.5) / W * 2 - 1, (pos[:, 1] + 0.5) / H * 2 - 1], dim=-1)[None, :, None]
            sampled = []
            if blocks != "dense":
                sampled.append(_unit(F.grid_sample(fmap[b:b + 1], grid, mode="bilinear", padding_mode="border",
                                                   align_corners=False)[0, :, :, 0].T))
            if blocks != "token":
                sampled.append(_unit(F.grid_sample(dense[b:b + 1], grid, mode="bilinear", padding_mode="border",
                                                   align_corners=False)[0, :, :, 0].T))
            source_vecs.append((torch.cat(sampled, dim=1) * scale).cpu().numpy().astype(np.float32))
    return TileVectors(patch=patch_vec.cpu().numpy().astype(np.float32), sources=source_vecs,
                       scaled=batch["scaled"].numpy(), band_valid=batch["band_valid"].numpy(),
                       band_coord=batch["band_coord"].numpy(), pixel_valid=(~batch["pixel_mask"]).numpy())


# ========================================================================================== source lists
@dataclass
class SourceList:
    """Sources of one image, in full-image pixels, with what is known about them."""

    x: np.ndarray
    y: np.ndarray
    origin: str
    cls: np.ndarray | None = None
    flux: np.ndarray | None = None
    snr: np.ndarray | None = None
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def take(self, keep: np.ndarray) -> "SourceList":
        pick = lambda a: None if a is None else a[keep]  # noqa: E731
        return SourceList(self.x[keep], self.y[keep], self.origin, pick(self.cls), pick(self.flux), pick(self.snr),
                          pick(self.score))


def _column(table, names: Iterable[str], dtype=float) -> np.ndarray | None:
    for name in names:
        if name in table.colnames:
            col = table[name]
            values = np.asarray(getattr(col, "value", col))
            if values.ndim != 1:
                continue
            if dtype is str:
                return np.asarray([str(v).strip() for v in values], dtype=object)
            try:
                return values.astype(float)
            except (TypeError, ValueError):
                return None
    return None


def sources_from_table(table, wcs, origin: str, where: str, min_snr: float | None = None) -> SourceList:
    """Full-image pixel positions (and class, flux, snr, score) of the rows of an astropy table.

    Positions come from ``ra``/``dec`` or ``glon``/``glat`` through ``wcs`` when the image has one and the table
    has them, else from ``x``/``y``. Rows with ``snr < min_snr`` are dropped when the table has ``snr``.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    x = y = None
    if wcs is not None:
        for lon, lat, frame in (("ra", "dec", "icrs"), ("glon", "glat", "galactic")):
            lon_v, lat_v = _column(table, [lon, lon.upper()]), _column(table, [lat, lat.upper()])
            if lon_v is not None and lat_v is not None:
                coords = SkyCoord(lon_v * u.deg, lat_v * u.deg, frame=frame)
                x, y = (np.asarray(v, dtype=float) for v in wcs.world_to_pixel(coords))
                break
    if x is None:
        x, y = _column(table, ["x", "X"]), _column(table, ["y", "Y"])
    if x is None or y is None:
        sky = "ra/dec or glon/glat, or " if wcs is not None else ""
        raise SkyfmError(f"{where} has no source positions: it needs {sky}x/y columns (0-based pixels); "
                         f"its columns are {', '.join(table.colnames[:12]) or 'none'}")
    sources = SourceList(x=x, y=y, origin=origin, cls=_column(table, ["class", "CLASS", "class_group"], dtype=str),
                         flux=_column(table, ["flux", "FLUX"]), snr=_column(table, ["snr", "SNR"]),
                         score=_column(table, ["score", "SCORE"]))
    keep = np.isfinite(sources.x) & np.isfinite(sources.y)
    if min_snr is not None and sources.snr is not None:
        keep &= sources.snr >= min_snr
    return sources.take(keep)


def read_catalog(path: str | Path):
    """An astropy Table from a FITS / ECSV / VOTable / CSV catalog, or a one-line SkyfmError."""
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise SkyfmError(f"source catalog not found: {path}")
    name = path.name.lower()
    fmt = None
    if name.endswith((".ecsv",)):
        fmt = "ascii.ecsv"
    elif name.endswith((".csv",)):
        fmt = "ascii.csv"
    elif name.endswith((".vot", ".xml")):
        fmt = "votable"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as e:  # astropy raises many types for unreadable tables
        raise SkyfmError(f"cannot read the source catalog {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ========================================================================================== input files
def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files from the command line: FITS files as given, folders expanded to the FITS files inside (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES))
            if not found:
                raise SkyfmError(f"folder {path} holds no FITS files (*.fits, *.fit, *.fits.gz)")
            files.extend(found)
        elif not path.exists():
            raise SkyfmError(f"input not found: {path}")
        else:
            files.append(path)
    if not files:
        raise SkyfmError("no input files: give one or more FITS images, counts cubes or folders of them")
    return files


def tile_shape(height: int, width: int, tile: int, stride: int) -> tuple[int, int]:
    """Tile (height, width): ``tile`` along axes longer than it, else the axis rounded up to the token stride."""
    if tile % stride:
        raise SkyfmError(f"--tile {tile} is not a multiple of {stride} pixels, the model's token size")
    up = lambda n: min(tile, -(-n // stride) * stride)  # noqa: E731
    return up(height), up(width)


@dataclass
class _Item:
    """One tile waiting for its batch."""

    file: str
    tile_index: int
    tile: object  # skyfm.data.Tile
    patch: object  # Patch of the tile
    sources: SourceList | None  # in tile pixels
    n_owned: int | None


@dataclass
class _Rows:
    columns: dict = field(default_factory=lambda: {c: [] for c in METADATA_COLUMNS})
    vectors: list = field(default_factory=list)

    def add(self, vector: np.ndarray, **values) -> None:
        for c in METADATA_COLUMNS:
            if c != "id":
                self.columns[c].append(values.get(c))
        self.columns["id"].append(len(self.vectors))
        self.vectors.append(vector)


def _sky(wcs, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """ra, dec, glon, glat (deg) of pixel positions; NaN without a WCS."""
    n = len(x)
    if wcs is None or n == 0:
        nan = np.full(n, np.nan)
        return {"ra": nan, "dec": nan, "glon": nan, "glat": nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = wcs.pixel_to_world(np.asarray(x, float), np.asarray(y, float))
        icrs, gal = coords.icrs, coords.galactic
    return {"ra": np.atleast_1d(icrs.ra.deg), "dec": np.atleast_1d(icrs.dec.deg),
            "glon": np.atleast_1d(gal.l.deg), "glat": np.atleast_1d(gal.b.deg)}


def _opt(a, i, kind=float):
    if a is None:
        return None
    v = a[i]
    if kind is float:
        v = float(v)
        return v if math.isfinite(v) else None
    return None if v is None or str(v) in ("", "--", "None") else str(v)


class Embedder:
    """Embeds images file by file, tile by tile, batching tiles of one size together (see the module docstring).

    >>> embedder = Embedder(model, min_snr=5.0)
    >>> table = embedder.embed_files(["a.fits", "b.fits"], progress=True)   # a pyarrow Table
    """

    def __init__(self, model, *, instrument=None, band: str | None = None, catalog=None, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, batch_size: int = 16, min_snr: float = 5.0, detect: bool = True,
                 min_score: float | None = None, detector=None, model_name: str = "", with_sources: bool = True):
        self.model = model
        self.instrument = instrument
        self.band = band
        self.catalog = catalog
        self.tile = int(tile)
        self.overlap = int(overlap)
        self.batch_size = int(batch_size)
        self.min_snr = min_snr
        self.detect = detect
        self.min_score = min_score
        self.detector = detector
        self.model_name = model_name
        self.with_sources = with_sources
        self.rows = _Rows()
        self.notes: list[str] = []
        self._pending: dict[tuple[int, int], list[_Item]] = {}
        self._wcs: dict[str, object] = {}
        self._detector_tried = False
        if self.batch_size < 1:
            raise SkyfmError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0 <= self.overlap < self.tile:
            raise SkyfmError(f"--overlap must be at least 0 and smaller than --tile ({self.tile}), got {overlap}")

    # ------------------------------------------------------------------------------------------ sources
    def _file_sources(self, path: Path, wcs, truth, n_files: int) -> SourceList | None:
        if not self.with_sources:
            return None
        if self.catalog is not None:
            table = self.catalog
            if "file" in table.colnames:
                names = np.asarray([Path(str(f)).name for f in table["file"]])
                table = table[names == path.name]
            elif n_files > 1 and not any(c in table.colnames for c in ("ra", "RA", "glon", "GLON")):
                raise SkyfmError("a catalog with pixel positions only fits one image: give one input file, or a "
                                 "'file' column naming each row's image, or ra/dec columns")
            return sources_from_table(table, wcs, "catalog", f"catalog {self._catalog_name}")
        if truth is not None and len(truth) and {"x", "y"} <= set(truth.colnames):
            return sources_from_table(truth, None, "truth", f"{path} TRUTH", min_snr=self.min_snr)
        return None  # the detector runs per tile

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _get_detector(self):
        """The detector for files without a catalog or truth: the one given, else the default; None (with a note)
        when there is none."""
        if self._detector_tried:
            return self.detector
        self._detector_tried = True
        if self.detector is None:
            load_detector = _detector_loader()
            why = "the detector is not installed"
            if load_detector is not None:
                try:
                    self.detector = load_detector(None)
                except SkyfmError as e:
                    why = str(e).split(";")[0]
            if self.detector is None:
                self._note(f"patch vectors only for files without --sources or a TRUTH table: no detector ({why})")
        return self.detector

    def _detector_sources(self, patch) -> SourceList | None:
        if not (self.with_sources and self.detect):
            return None
        detect_patch = _detect_fn()
        detector = self._get_detector() if detect_patch is not None else None
        if detect_patch is None:
            self._note("patch vectors only for files without --sources or a TRUTH table: no detector "
                       "(skyfm.detect is not installed)")
        if detector is None:
            return None
        table = detect_patch(patch, detector=detector, min_score=self.min_score, selection="network")
        if table is None or len(table) == 0:
            return SourceList(np.zeros(0), np.zeros(0), "detector")
        return sources_from_table(table, None, "detector", "the detector's catalog")

    # -------------------------------------------------------------------------------------------- files
    def _open(self, path: Path):
        """(tile source for iter_tiles, full WCS, truth table, closer) of one file."""
        from skyfm.data.readers import FORMAT_SIMULATED, open_image, read_image

        image = open_image(path, instrument=self.instrument, band=self.band)
        if image.format == FORMAT_SIMULATED:
            image.close()
            patch = read_image(path, instrument=self.instrument, band=self.band)
            return patch, patch.wcs, patch.truth, (patch.height, patch.width), lambda: None
        image.require_patchable()
        truth = _truth_hdu(path)
        return image, image.wcs, truth, (image.height, image.width), image.close

    def count_tiles(self, paths: Sequence[Path]) -> int:
        from skyfm.data.readers import open_image
        from skyfm.data.tiling import tile_grid

        total = 0
        for path in paths:
            with open_image(path, instrument=self.instrument, band=self.band) as image:
                shape = tile_shape(image.height, image.width, self.tile, self.model.token_stride)
                total += len(tile_grid(image.height, image.width, shape, self._overlap_for(shape)))
        return total

    def _overlap_for(self, shape: tuple[int, int]) -> tuple[int, int]:
        return tuple(min(self.overlap, s - 1) for s in shape)

    def iter_items(self, path: Path, n_files: int) -> Iterator[_Item]:
        from skyfm.data.tiling import iter_tiles

        source, wcs, truth, (height, width), close = self._open(path)
        try:
            self._wcs[str(path)] = wcs
            sources = self._file_sources(path, wcs, truth, n_files)
            if sources is not None:
                inside = (sources.x >= -0.5) & (sources.x < width - 0.5) & (sources.y >= -0.5) & (sources.y < height - 0.5)
                sources = sources.take(inside)
            shape = tile_shape(height, width, self.tile, self.model.token_stride)
            for i, (t, patch) in enumerate(iter_tiles(source, shape, self._overlap_for(shape))):
                if sources is not None:
                    owned = sources.take(t.owns(sources.x, sources.y))
                    owned.x, owned.y = owned.x - t.x0, owned.y - t.y0
                else:
                    owned = self._detector_sources(patch)
                    if owned is not None:
                        keep = t.owns(owned.x + t.x0, owned.y + t.y0)
                        owned = owned.take(np.atleast_1d(keep))
                yield _Item(str(path), i, t, patch, owned, None if owned is None else len(owned))
        finally:
            close()

    # ------------------------------------------------------------------------------------------ batches
    def add(self, item: _Item) -> None:
        key = tuple(item.patch.data.shape[1:])
        self._pending.setdefault(key, []).append(item)
        if len(self._pending[key]) >= self.batch_size:
            self._flush(key)

    def flush(self) -> None:
        for key in list(self._pending):
            self._flush(key)

    def _flush(self, key) -> None:
        from skyfm.latent.thumbs import patch_thumbnail, source_thumbnail

        items = self._pending.pop(key, [])
        if not items:
            return
        positions = [None if it.sources is None else np.stack([it.sources.x, it.sources.y], axis=1) for it in items]
        vec = embed_tiles(self.model, [it.patch for it in items], positions, instrument=self.instrument)
        for b, it in enumerate(items):
            t, patch = it.tile, it.patch
            bv = vec.band_valid[b]
            scaled, coord = vec.scaled[b][bv], vec.band_coord[b][bv]
            height, width = patch.height, patch.width
            file_name = Path(it.file).name
            common = {"file": file_name, "tile": it.tile_index, "tile_x0": t.x0, "tile_y0": t.y0, "tile_w": width,
                      "tile_h": height, "instrument": patch.instrument, "bands": ",".join(patch.bands)}
            cx, cy = (t.x0 + t.x1 - 1) / 2, (t.y0 + t.y1 - 1) / 2
            sky = _sky(patch.wcs, np.array([cx - t.x0]), np.array([cy - t.y0]))
            self.rows.add(vec.patch[b], kind="patch", x=cx, y=cy, **{k: _opt(v, 0) for k, v in sky.items()},
                          n_sources=it.n_owned, thumbnail=patch_thumbnail(scaled, coord, vec.pixel_valid[b]), **common)
            s = it.sources
            if s is None or len(s) == 0:
                continue
            sky = _sky(patch.wcs, s.x, s.y)
            for j in range(len(s)):
                self.rows.add(vec.sources[b][j], kind="source", x=float(s.x[j] + t.x0), y=float(s.y[j] + t.y0),
                              **{k: _opt(v, j) for k, v in sky.items()}, origin=s.origin,
                              **{"class": _opt(s.cls, j, str)}, flux=_opt(s.flux, j), snr=_opt(s.snr, j),
                              score=_opt(s.score, j), thumbnail=source_thumbnail(scaled, s.x[j], s.y[j], coord),
                              **common)

    # ---------------------------------------------------------------------------------------------- run
    @property
    def _catalog_name(self) -> str:
        return getattr(self.catalog, "meta", {}).get("skyfm_path", "")

    def embed_files(self, paths: Sequence[str | Path], progress: bool = False):
        from tqdm import tqdm

        paths = [Path(p) for p in paths]
        total = self.count_tiles(paths)
        with tqdm(total=total, desc="embedding", unit="tile", disable=not progress) as bar:
            for path in paths:
                for item in self.iter_items(path, len(paths)):
                    self.add(item)
                    bar.update(1)
            self.flush()
        return self.table()

    def table(self, extra_meta: dict | None = None):
        """The rows embedded so far as a pyarrow Table (ids in row order)."""
        if not self.rows.vectors:
            raise SkyfmError("nothing was embedded: the inputs gave no tiles")
        dim = int(self.rows.vectors[0].shape[0])
        meta = {"model": self.model_name, "model_name": getattr(self.model.config, "name", ""),
                "dim": dim, "token_dim": int(self.model.embed_dim), "dense_dim": int(self.model.dense_dim),
                "layout": "[unit(token features), unit(dense features)] / sqrt(2), unit length",
                "tile": self.tile, "overlap": self.overlap, "min_snr": self.min_snr, **(extra_meta or {})}
        return make_table(self.rows.columns, np.stack(self.rows.vectors), meta)


def _truth_hdu(path: Path):
    """The TRUTH table of a FITS file, or None."""
    from astropy.io import fits
    from astropy.table import Table

    try:
        with fits.open(path, memmap=True) as hdul:
            if "TRUTH" not in [h.name for h in hdul]:
                return None
            return Table.read(hdul["TRUTH"])
    except (OSError, ValueError, KeyError):
        return None


# ============================================================================================ the table
def _schema_types():
    import pyarrow as pa

    return {"id": pa.int64(), "kind": pa.string(), "file": pa.string(), "tile": pa.int32(), "tile_x0": pa.int32(),
            "tile_y0": pa.int32(), "tile_w": pa.int32(), "tile_h": pa.int32(), "instrument": pa.string(),
            "bands": pa.string(), "x": pa.float64(), "y": pa.float64(), "ra": pa.float64(), "dec": pa.float64(),
            "glon": pa.float64(), "glat": pa.float64(), "class": pa.string(), "flux": pa.float64(),
            "snr": pa.float64(), "score": pa.float64(), "origin": pa.string(), "n_sources": pa.int32(),
            "thumbnail": pa.binary()}


def make_table(columns: dict, vectors: np.ndarray, meta: dict):
    """A pyarrow Table of metadata ``columns`` (lists or arrays, :data:`METADATA_COLUMNS`; missing ones null) and
    ``vectors`` (N, D) float32 as the fixed-size-list column ``embedding``; ``meta`` goes to the schema."""
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    types = _schema_types()
    arrays, names = [], []
    for name in METADATA_COLUMNS:
        values = columns.get(name)
        if values is None:
            values = list(range(n)) if name == "id" else [None] * n
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            values = [None if not math.isfinite(v) else float(v) for v in values]
        arrays.append(pa.array(list(values) if isinstance(values, np.ndarray) else values, type=types[name]))
        names.append(name)
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim))
    names.append("embedding")
    schema_meta = {EMBED_META_KEY: json.dumps(meta).encode()}
    return pa.Table.from_arrays(arrays, names=names).replace_schema_metadata(schema_meta)


def write_embeddings(table, path: str | Path) -> Path:
    """Write an embeddings table as Parquet, atomically (no half-written file on failure)."""
    import pyarrow.parquet as pq

    from skyfm.utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_embeddings(path: str | Path, columns: Sequence[str] | None = None):
    """(metadata Table without the embedding column, vectors (N, D) float32, schema meta dict) of a Parquet file.

    Raises a one-line SkyfmError for a missing or non-Parquet file, a file without an ``embedding`` column, an
    empty one, vectors of unequal length or non-finite values.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise SkyfmError(f"embeddings file not found: {path}")
    if path.is_dir():
        raise SkyfmError(f"{path} is a folder, not an embeddings Parquet file (is it an index folder? use --index)")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SkyfmError(f"{path} is not a Parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if "embedding" not in names:
        raise SkyfmError(f"{path} has no 'embedding' column (columns: {', '.join(names[:12])}); "
                         "make one with `skyfm embed`")
    wanted = None if columns is None else [c for c in dict.fromkeys([*columns, "embedding"]) if c in names]
    try:
        table = pf.read(columns=wanted)
    except (pa.ArrowInvalid, OSError) as e:
        raise SkyfmError(f"cannot read {path} ({str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise SkyfmError(f"{path} holds no embeddings (0 rows)")
    vectors = vectors_of(table.column("embedding"), str(path))
    raw = (pf.schema_arrow.metadata or {}).get(EMBED_META_KEY)
    meta = json.loads(raw) if raw else {}
    return table.drop_columns(["embedding"]), vectors, meta


def vectors_of(column, where: str) -> np.ndarray:
    """(N, D) float32 from a pyarrow list / fixed-size-list column."""
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
        values = col.flatten().to_numpy(zero_copy_only=False)
        if col.null_count:
            raise SkyfmError(f"{where}: {col.null_count} rows have no embedding")
        vectors = values.reshape(-1, dim)
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = np.asarray(col.value_lengths().fill_null(0))
        if len(set(lengths.tolist())) != 1 or lengths[0] == 0:
            raise SkyfmError(f"{where}: embeddings have different lengths ({sorted(set(lengths.tolist()))[:5]})")
        vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), int(lengths[0]))
    else:
        raise SkyfmError(f"{where}: the 'embedding' column is {col.type}, not a list of numbers")
    try:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise SkyfmError(f"{where}: the 'embedding' column does not hold numbers") from None
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors)).any(axis=1).sum())
        raise SkyfmError(f"{where}: {bad} embeddings contain NaN or infinite values")
    return vectors


def embed_command(inputs, out, *, model_dir=None, instrument=None, band=None, sources=None, tile=DEFAULT_TILE,
                  overlap=DEFAULT_OVERLAP, batch_size=16, min_snr=5.0, patches_only=False, min_score=None,
                  command: str = "", progress: bool = True) -> tuple[Path, dict]:
    """What ``skyfm embed`` does; returns (output path, summary counts)."""
    import torch

    files = expand_inputs(inputs)
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise SkyfmError(f"--out {out} should end in .parquet")
    catalog = None
    if sources is not None:
        catalog = read_catalog(sources)
        catalog.meta["skyfm_path"] = str(sources)
    if instrument is not None:
        from skyfm.instruments import load_instrument

        instrument = load_instrument(instrument)
    model, described, detector = load_embedding_model(model_dir)
    embedder = Embedder(model, instrument=instrument, band=band, catalog=catalog, tile=tile, overlap=overlap,
                        batch_size=batch_size, min_snr=min_snr, detector=detector, model_name=described,
                        with_sources=not patches_only, min_score=min_score)
    with torch.inference_mode():  # scoped: a global set_grad_enabled(False) would leak into the caller
        embedder.embed_files(files, progress=progress)
    table = embedder.table({"command": command, "inputs": [str(f) for f in files]})
    write_embeddings(table, out)
    kinds = table.column("kind").to_pylist()
    summary = {"files": len(files), "patches": kinds.count("patch"), "sources": kinds.count("source"),
               "dim": int(table.schema.field("embedding").type.list_size), "notes": embedder.notes}
    return out, summary


__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "EMBED_META_KEY", "Embedder", "METADATA_COLUMNS", "SourceList",
           "TileVectors", "embed_command", "embed_tiles", "expand_inputs", "load_embedding_model", "make_table",
           "read_catalog", "read_embeddings", "sources_from_table", "tile_shape", "vectors_of", "write_embeddings"]
