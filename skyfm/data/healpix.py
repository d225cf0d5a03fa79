"""HEALPix maps cut into flat tiles: Fermi-LAT all-sky counts maps (``gtbin`` HEALPIX mode) and the like.

A HEALPix map is a FITS binary table (``PIXTYPE = 'HEALPIX'``) with ``NSIDE``, ``ORDERING`` (RING or NESTED) and
``COORDSYS`` (G, C or E); each data column is one map, here one band (an energy bin, with edges in an ``EBOUNDS``
table when the file has one). Partial-sky maps list their pixels in a ``PIXEL`` column (``INDXSCHM =
'EXPLICIT'``); pixels a map does not cover are NaN and become masked.

:func:`healpix_to_patch` cuts one tile (CAR or TAN) with :func:`reproject.reproject_from_healpix`;
:func:`healpix_tiles` covers the sky, or a region of it, one tile at a time, so that an nside 1024 map (12.6
million pixels per band) is never reprojected whole.

Counts are conserved. A counts map holds counts per HEALPix pixel, not a surface brightness, so the map is
interpolated as counts per HEALPix pixel (a surface brightness in units of one HEALPix pixel's solid angle) and
multiplied by each output pixel's solid angle over the HEALPix pixel's, 4 pi / (12 nside^2): a HEALPix pixel's
counts spread over the output pixels by area. Intensity maps (surface brightness) are interpolated as they are.

Interpolation is bilinear by default. Nearest-neighbour copies each HEALPix pixel into the output pixels whose
centres fall in it; when output pixels are not much smaller than HEALPix pixels some HEALPix pixels are sampled
once and others twice, so the counts of a compact source come out too high or too low by up to the ratio of the
pixel sizes, depending on where it sits. Bilinear weights sum to one around every HEALPix pixel centre (a
partition of unity), so a pixel's counts are spread over the tile in proportion to area whatever the phase of the
two grids, and a point source keeps its centroid. The price is a slight smoothing (about one HEALPix pixel) and
correlated noise between neighbouring output pixels; pass ``order='nearest-neighbor'`` to keep pixels
independent when the output pixels are much smaller than the HEALPix ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from astropy_healpix import HEALPix, npix_to_nside

from skyfm.data.fits_io import read_ebounds
from skyfm.data.patch import Patch
from skyfm.data.readers import (
    EnergyBinsWarning,
    _is_healpix,
    _not_counts,
    band_names_for_energies,
    bands_hdu,
    energy_label,
    group_energy_planes,
    open_fits,
    resolve_instrument,
    select_hdu,
)
from skyfm.errors import SkyfmError
from skyfm.instruments import Instrument

# COORDSYS values (first letter) -> astropy frame names.
_FRAMES = {"G": "galactic", "C": "icrs", "Q": "icrs", "E": "barycentrictrueecliptic"}
# Celestial axis names of each frame, as WCS CTYPE prefixes.
_AXES = {"galactic": ("GLON", "GLAT"), "icrs": ("RA", "DEC"), "barycentrictrueecliptic": ("ELON", "ELAT")}
_UNSEEN = -1.6375e30  # healpy's marker of a pixel without data
_INDEX_COLUMNS = ("PIXEL", "PIX", "INDEX", "IPIX")
_COUNTS_UNITS = ("count", "counts", "ct", "cts", "photon", "photons", "events")
PROJECTIONS = ("CAR", "TAN")


@dataclass
class HealpixMap:
    """A HEALPix map with one or more bands.

    Attributes:
        values: (C, npix) float64, in the map's pixel order; NaN where the map has no data.
        nside: HEALPix resolution parameter.
        nested: True for NESTED ordering, False for RING.
        frame: astropy frame name of the map (``galactic``, ``icrs``, ``barycentrictrueecliptic``).
        columns: the table columns the bands came from.
        bands: one name per band.
        counts: True when values are counts per HEALPix pixel (conserved when cut), False for surface brightness.
        instrument: the instrument, or None when neither the header nor the caller says.
        instrument_source: where the instrument came from.
        energy_edges_kev: (C, 2) energy edges for counts maps with EBOUNDS, else None.
        source: the file it came from, or a description.
    """

    values: np.ndarray
    nside: int
    nested: bool
    frame: str
    columns: list[str]
    bands: list[str]
    counts: bool
    instrument: Instrument | None = None
    instrument_source: str = "unknown"
    energy_edges_kev: np.ndarray | None = None
    source: str = "<map>"
    meta: dict = field(default_factory=dict)

    @property
    def npix(self) -> int:
        return self.values.shape[1]

    @property
    def pixel_area_sr(self) -> float:
        """Solid angle of one HEALPix pixel (sr): 4 pi / (12 nside^2)."""
        return 4 * np.pi / self.npix

    @property
    def resolution_deg(self) -> float:
        """Side of a HEALPix pixel, the square root of its solid angle (deg)."""
        return float(np.degrees(np.sqrt(self.pixel_area_sr)))

    @property
    def healpix(self) -> HEALPix:
        return HEALPix(nside=self.nside, order="nested" if self.nested else "ring", frame=self.frame)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _healpix_hdu(hdul: fits.HDUList, hdu, path: Path) -> int:
    if hdu is not None:
        index = select_hdu(hdul, hdu, path)
        if not _is_healpix(hdul[index]):
            raise SkyfmError(f"{path} HDU {index} is not a HEALPix table (no PIXTYPE = 'HEALPIX')")
        return index
    for i, h in enumerate(hdul):
        if _is_healpix(h):
            return i
    raise SkyfmError(f"{path} has no HEALPix table (a binary table with PIXTYPE = 'HEALPIX', NSIDE and ORDERING)")


def _frame_of(header: fits.Header, where: str, frame: str | None) -> str:
    if frame is not None:
        return frame
    coordsys = str(header.get("COORDSYS", "")).strip().upper()
    if not coordsys:
        raise SkyfmError(f"{where} has no COORDSYS keyword; pass frame= ('galactic' or 'icrs')")
    if coordsys[0] not in _FRAMES:
        raise SkyfmError(f"{where} has COORDSYS = {coordsys!r}; skyfm knows G (galactic), C (celestial), E (ecliptic)")
    return _FRAMES[coordsys[0]]


def _is_counts(table: fits.BinTableHDU, column: str, inst: Instrument | None) -> bool:
    unit = str(table.columns[column].unit or "").strip().lower()
    if unit:
        return unit in _COUNTS_UNITS
    return bool(inst is not None and inst.is_counts)


def read_healpix(path: str | Path, *, hdu: int | str | None = None, columns: list[str] | None = None,
                 counts: bool | None = None, frame: str | None = None, instrument=None) -> HealpixMap:
    """Read a HEALPix FITS map (RING or NESTED, full-sky or explicit-index partial-sky).

    Args:
        path: the FITS file.
        hdu: the table HDU (index or name); default: the first HEALPix table.
        columns: data columns to read, one band each; default: every numeric column except the pixel index.
        counts: whether values are counts per pixel; default: from the column unit (counts, ct, ...), else from
            the instrument's kind.
        frame: override the COORDSYS keyword.
        instrument: instrument name or YAML path; default: from the header (TELESCOP / INSTRUME).
    """
    path = Path(path)
    with open_fits(path, memmap=True) as hdul:
        index = _healpix_hdu(hdul, hdu, path)
        table = hdul[index]
        header = table.header
        where = f"{path} HDU {index}"
        ordering, index_col, data_cols = map_layout(table, where)
        if columns is not None:
            names = [c.name for c in table.columns]
            missing = [c for c in columns if c not in names]
            if missing:
                raise SkyfmError(f"{where} has no column {', '.join(missing)}; its columns are {', '.join(names)}")
            data_cols = list(columns)
        nside = int(header.get("NSIDE", 0))
        values = _column_values(table, data_cols, index_col, nside, where)
        inst, inst_source = resolve_instrument(instrument, [header, hdul[0].header])
        bands_index = bands_hdu(hdul, header, where)
        if inst is not None and inst.is_counts and bands_index is None:  # an exposure or model map, not counts?
            unit = str(table.columns[data_cols[0]].unit or "").strip()
            problem = _not_counts(hdul, [fits.Header({"BUNIT": unit})] if unit else [])
            if problem is not None:
                raise SkyfmError(f"{where}: {problem}")
        edges = None if bands_index is None else read_ebounds(hdul[bands_index], where)
        if edges is not None and len(edges) != len(data_cols):
            raise SkyfmError(f"{where} has {len(data_cols)} map column(s) but {hdul[bands_index].name} has "
                             f"{len(edges)} rows")
        is_counts = _is_counts(table, data_cols[0], inst) if counts is None else bool(counts)
        frame_name = _frame_of(header, where, frame)
    if edges is not None:
        bands = band_names_for_energies(edges, inst)
        if inst is not None and inst.is_counts and not set(bands) <= {b.name for b in inst.bands}:
            grouping = group_energy_planes(edges, inst, where)
            warnings.warn(EnergyBinsWarning(f"{where}: {grouping.summary(inst.name)}"), stacklevel=2)
            values, edges, bands = grouping.apply(values), grouping.edges_kev, list(grouping.bands)
            data_cols = ["+".join(data_cols[k] for k in idx) for idx in grouping.planes]
    elif inst is not None and len(inst.bands) == len(data_cols):
        bands = [b.name for b in inst.bands]
    else:
        bands = list(data_cols)
    return HealpixMap(values=values, nside=npix_to_nside(values.shape[1]), nested=ordering == "NESTED",
                      frame=frame_name, columns=data_cols, bands=bands, counts=is_counts, instrument=inst,
                      instrument_source=inst_source, energy_edges_kev=edges, source=str(path))


def map_layout(table: fits.BinTableHDU, where: str) -> tuple[str, str | None, list[str]]:
    """(ORDERING, "RING" or "NESTED"; the pixel-index column of a partial-sky map, or None; the numeric data columns)
    of a HEALPix table, with an error for what skyfm cannot read."""
    header = table.header
    ordering = str(header.get("ORDERING", "")).strip().upper()
    if ordering not in ("RING", "NESTED"):
        raise SkyfmError(f"{where} has ORDERING = {ordering or 'nothing'!r}; skyfm reads RING or NESTED maps")
    names = [c.name for c in table.columns]
    index_col = next((n for n in names if n.upper() in _INDEX_COLUMNS), None)
    explicit = str(header.get("INDXSCHM", "")).strip().upper() == "EXPLICIT" or index_col is not None
    if explicit and index_col is None:
        raise SkyfmError(f"{where} is an explicit-index (partial-sky) map without a PIXEL column")
    data_cols = [n for n in names if n != index_col and np.issubdtype(table.columns[n].dtype.base, np.number)]
    if not data_cols:
        raise SkyfmError(f"{where} has no numeric data column")
    return ordering, index_col, data_cols


def _column_values(table, data_cols: list[str], index_col: str | None, nside: int, where: str) -> np.ndarray:
    """(C, npix) float64 of the data columns; NaN for unseen pixels and pixels a partial map leaves out."""
    columns = [np.asarray(table.data[c], dtype=np.float64).ravel() for c in data_cols]  # vector columns: row-major
    if index_col is not None:
        if nside <= 0:
            raise SkyfmError(f"{where} is a partial-sky map without an NSIDE keyword")
        npix = 12 * nside**2
        pix = np.asarray(table.data[index_col]).ravel().astype(np.int64)
        if pix.size and (pix.min() < 0 or pix.max() >= npix):
            raise SkyfmError(f"{where}: PIXEL values run outside 0..{npix - 1} for NSIDE = {nside}")
        values = np.full((len(columns), npix), np.nan)
        for k, col in enumerate(columns):
            values[k, pix] = col
    else:
        values = np.stack(columns)
        try:
            found = npix_to_nside(values.shape[1])
        except ValueError:
            raise SkyfmError(f"{where} has {values.shape[1]} pixels, not 12 nside^2 for any nside") from None
        if nside and found != nside:
            raise SkyfmError(f"{where} has NSIDE = {nside} but {values.shape[1]} pixels (NSIDE {found})")
    values[(values == _UNSEEN) | ~np.isfinite(values)] = np.nan
    return values


def _as_map(path_or_map, **read_options) -> HealpixMap:
    return path_or_map if isinstance(path_or_map, HealpixMap) else read_healpix(path_or_map, **read_options)


# ----------------------------------------------------------------------------------------------------------------
# Flat tiles
# ----------------------------------------------------------------------------------------------------------------
def sky_wcs(lon: float, lat: float, shape: tuple[int, int], pixel_scale_deg: float, projection: str = "CAR",
            frame: str = "galactic") -> WCS:
    """A celestial WCS of ``shape`` (H, W) pixels of ``pixel_scale_deg`` centred on (lon, lat) deg in ``frame``.

    CAR tiles off the equator are oblique (the projection's equator runs through the tile centre), as fermipy
    and gtbin cut them: pixels stay nearly square at every latitude.
    """
    projection = projection.upper()
    if projection not in PROJECTIONS:
        raise SkyfmError(f"projection should be one of {', '.join(PROJECTIONS)}, got {projection!r}")
    if frame not in _AXES:
        raise SkyfmError(f"frame should be one of {', '.join(_AXES)}, got {frame!r}")
    if not (np.isfinite(pixel_scale_deg) and pixel_scale_deg > 0):
        raise SkyfmError(f"pixel scale should be a positive number of degrees, got {pixel_scale_deg!r}")
    height, width = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = [f"{axis:-<4}-{projection}" for axis in _AXES[frame]]
    wcs.wcs.crval = [lon % 360.0, lat]
    wcs.wcs.crpix = [(width + 1) / 2, (height + 1) / 2]  # FITS pixels are 1-based: the centre of the grid
    wcs.wcs.cdelt = [-pixel_scale_deg, pixel_scale_deg]
    wcs.wcs.cunit = ["deg", "deg"]
    if frame == "icrs":
        wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


def pixel_solid_angle(wcs: WCS, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) solid angle of every pixel in sr, exact for any projection.

    Each pixel is the spherical quadrilateral between its four corners, split into two triangles whose areas
    come from the Van Oosterom & Strackee (1983) formula, tan(omega / 2) = |a.(b x c)| / (1 + a.b + b.c + c.a).
    """
    height, width = shape
    ys, xs = np.mgrid[-0.5:height:1.0, -0.5:width:1.0]
    lon, lat = wcs.wcs_pix2world(xs, ys, 0)
    lon, lat = np.radians(lon), np.radians(lat)
    corners = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)
    a, b, c, d = corners[:-1, :-1], corners[:-1, 1:], corners[1:, 1:], corners[1:, :-1]
    return _triangle_area(a, b, c) + _triangle_area(a, c, d)


def _triangle_area(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    triple = np.abs(np.einsum("...i,...i->...", a, np.cross(b, c)))
    dots = 1 + np.einsum("...i,...i->...", a, b) + np.einsum("...i,...i->...", b, c) + np.einsum("...i,...i->...", c, a)
    return 2 * np.arctan2(triple, dots)


def reproject_map(hmap: HealpixMap, wcs: WCS, shape: tuple[int, int], order: str = "bilinear") -> np.ndarray:
    """(C, H, W) float64 of a HEALPix map on a WCS grid; counts maps conserve counts; NaN where the map has no data."""
    from reproject import reproject_from_healpix  # imported here: reproject (and dask) take 0.6 s to import

    out = np.empty((len(hmap.bands),) + tuple(shape))
    for k in range(len(hmap.bands)):
        out[k], _ = reproject_from_healpix((hmap.values[k], hmap.frame), wcs, shape_out=shape,
                                           nested=hmap.nested, order=order)
    if hmap.counts:
        out *= pixel_solid_angle(wcs, shape) / hmap.pixel_area_sr
    return out


def _lonlat_in_frame(center, frame: str) -> tuple[float, float]:
    if isinstance(center, SkyCoord):
        c = center.transform_to(frame).represent_as("unitspherical")
        return float(c.lon.deg), float(c.lat.deg)
    try:
        lon, lat = (float(v) for v in center)
    except (TypeError, ValueError):
        raise SkyfmError(f"centre should be a SkyCoord or (lon, lat) in degrees, got {center!r}") from None
    if not -90 <= lat <= 90:
        raise SkyfmError(f"centre latitude should be within -90..90 deg, got {lat}")
    return lon, lat


def _patch_from_map(hmap: HealpixMap, wcs: WCS, shape: tuple[int, int], order: str, meta: dict) -> Patch:
    if hmap.instrument is None:
        raise SkyfmError(f"unknown instrument in {hmap.source} {hmap.instrument_source.removeprefix('unknown ')}; "
                         "pass instrument= (--instrument NAME or a YAML file)")
    data = reproject_map(hmap, wcs, shape, order)
    invalid = ~np.isfinite(data).all(axis=0)
    data[:, invalid] = 0.0
    return Patch(
        data=data.astype(np.float32), instrument=hmap.instrument.name, bands=list(hmap.bands), wcs=wcs,
        mask=invalid if invalid.any() else None, energy_edges_kev=hmap.energy_edges_kev,
        meta={"healpix_nside": hmap.nside, "healpix_order": "nested" if hmap.nested else "ring",
              "reproject": order, **meta},
    )


def healpix_to_patch(path_or_map, center, size: int | tuple[int, int], pixel_scale_deg: float,
                     projection: str = "CAR", frame: str | None = None, *, order: str = "bilinear",
                     instrument=None, hdu: int | str | None = None) -> Patch:
    """Cut one flat tile out of a HEALPix map.

    Args:
        path_or_map: a HEALPix FITS file or a :class:`HealpixMap` (read it once to cut many tiles).
        center: a SkyCoord, or (lon, lat) in degrees in ``frame``.
        size: tile side in pixels, or (height, width).
        pixel_scale_deg: pixel side in degrees.
        projection: ``CAR`` (plate carrée, as gtbin) or ``TAN`` (gnomonic).
        frame: the tile's frame (``galactic``, ``icrs``); default: the map's.
        order: ``bilinear`` (default; see the module docstring) or ``nearest-neighbor``.
        instrument, hdu: passed to :func:`read_healpix` when reading a file.

    Returns:
        A Patch, counts conserved for counts maps, pixels without data masked.
    """
    hmap = _as_map(path_or_map, instrument=instrument, hdu=hdu)
    frame = frame or hmap.frame
    shape = (size, size) if np.isscalar(size) else tuple(size)
    lon, lat = _lonlat_in_frame(center, frame)
    wcs = sky_wcs(lon, lat, shape, pixel_scale_deg, projection, frame)
    return _patch_from_map(hmap, wcs, shape, order, {"tile_lon": lon, "tile_lat": lat})


# ----------------------------------------------------------------------------------------------------------------
# Covering the sky
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkyTile:
    """One tile of a sky tiling: its WCS, and the cell of the sky it owns (for merging detections).

    The cells of a tiling (latitude rings cut into equal longitude ranges) partition the region, and each lies
    inside its tile, so a detection kept only where :meth:`owns` is true is kept exactly once.
    """

    index: int
    lon: float
    lat: float
    wcs: WCS
    shape: tuple[int, int]
    lon_min: float
    lon_width: float
    lat_min: float
    lat_max: float

    def owns(self, lon, lat):
        """Whether sky position(s) (deg, in the tiling's frame) fall in this tile's cell; arrays broadcast."""
        lon, lat = np.asarray(lon, float), np.asarray(lat, float)
        dlon = (lon - self.lon_min) % 360.0
        top = lat <= self.lat_max if self.lat_max >= 90 else lat < self.lat_max  # the pole belongs to the top ring
        inside = (dlon < self.lon_width) & (lat >= self.lat_min) & top
        return inside if inside.ndim else bool(inside)


def _cell_inside_tile(wcs: WCS, shape, lon0: float, dlon: float, lat0: float, lat1: float) -> bool:
    """Whether the boundary of a lon/lat cell projects inside the tile (cells are convex enough for this)."""
    t = np.linspace(0.0, 1.0, 17)
    lon = np.concatenate([lon0 + t * dlon, lon0 + t * dlon, np.full_like(t, lon0), np.full_like(t, lon0 + dlon)])
    lat = np.concatenate([np.full_like(t, lat0), np.full_like(t, lat1), lat0 + t * (lat1 - lat0), lat0 + t * (lat1 - lat0)])
    with np.errstate(invalid="ignore"):
        x, y = wcs.wcs_world2pix(lon, lat, 0)
    height, width = shape
    return bool(np.all((x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)))


def sky_tiles(tile: int, pixel_scale_deg: float, overlap: int = 0, projection: str = "TAN", frame: str = "galactic",
              lon_range: tuple[float, float] | None = None, lat_range: tuple[float, float] = (-90.0, 90.0)) -> list[SkyTile]:
    """Square tiles of ``tile`` pixels that cover the sky, or a lon/lat box of it, with ``overlap`` pixels to spare.

    Latitude rings of equal height are cut into equal longitude cells, as few as keep every cell inside its
    tile; each tile is centred on its cell. ``lon_range`` = (start, stop) in degrees runs eastward and may wrap
    (``(330, 30)`` is the 60 degrees about l = 0); default: the full circle.
    """
    if tile < 2 or not 0 <= overlap < tile:
        raise SkyfmError(f"tile should be >= 2 pixels and overlap in 0..tile-1, got tile={tile}, overlap={overlap}")
    lat_lo, lat_hi = (float(v) for v in lat_range)
    if not -90 <= lat_lo < lat_hi <= 90:
        raise SkyfmError(f"lat_range should be (low, high) within -90..90, got {lat_range!r}")
    lon_start, lon_width = 0.0, 360.0
    if lon_range is not None:
        lon_start = float(lon_range[0]) % 360.0
        lon_width = (float(lon_range[1]) - float(lon_range[0])) % 360.0 or 360.0
    step = (tile - overlap) * pixel_scale_deg  # the most sky a cell may span, in degrees of arc
    shape = (tile, tile)
    n_rings = int(np.ceil((lat_hi - lat_lo) / step))
    while True:
        rings = _ring_cells(n_rings, lat_lo, lat_hi, lon_start, lon_width, step, tile, pixel_scale_deg, projection, frame)
        if rings is not None:
            break
        n_rings += 1  # a ring too tall for its tiles (large tiles, TAN stretching): use thinner rings
    tiles = []
    for lat0, lat1, n_lon in rings:
        dlon = lon_width / n_lon
        for j in range(n_lon):
            lon0 = lon_start + j * dlon
            lon, lat = (lon0 + dlon / 2) % 360.0, (lat0 + lat1) / 2
            wcs = sky_wcs(lon, lat, shape, pixel_scale_deg, projection, frame)
            tiles.append(SkyTile(len(tiles), lon, lat, wcs, shape, lon0 % 360.0, dlon, lat0, lat1))
    return tiles


def _ring_cells(n_rings, lat_lo, lat_hi, lon_start, lon_width, step, tile, scale, projection, frame):
    """[(lat0, lat1, n_lon)] per ring, or None if some ring cannot be covered however finely it is cut."""
    edges = np.linspace(lat_lo, lat_hi, n_rings + 1)
    rings = []
    for lat0, lat1 in zip(edges[:-1], edges[1:]):
        widest = 0.0 if lat0 <= 0 <= lat1 else min(abs(lat0), abs(lat1))  # latitude where the ring is widest
        n_lon = max(1, int(np.ceil(lon_width * np.cos(np.radians(widest)) / step)))
        limit = 4 * n_lon + 16
        while n_lon <= limit:
            dlon = lon_width / n_lon
            centre = (lon_start + dlon / 2, (lat0 + lat1) / 2)
            wcs = sky_wcs(*centre, (tile, tile), scale, projection, frame)
            if _cell_inside_tile(wcs, (tile, tile), lon_start, dlon, lat0, lat1):
                break
            n_lon += 1
        else:
            return None
        rings.append((float(lat0), float(lat1), n_lon))
    return rings


def healpix_tiles(path_or_map, tile: int, pixel_scale_deg: float, overlap: int = 0, projection: str = "TAN",
                  frame: str | None = None, lon_range: tuple[float, float] | None = None,
                  lat_range: tuple[float, float] = (-90.0, 90.0), *, order: str = "bilinear", instrument=None,
                  hdu: int | str | None = None) -> Iterator[tuple[SkyTile, Patch]]:
    """Yield (SkyTile, Patch) covering the sky or a lon/lat box of it, one tile reprojected at a time.

    The map is read once (its pixel values; an nside 1024 band is 100 MB); each tile's reprojection touches only
    that tile's pixels. Arguments as :func:`sky_tiles` and :func:`healpix_to_patch`.
    """
    hmap = _as_map(path_or_map, instrument=instrument, hdu=hdu)
    frame = frame or hmap.frame
    for sky_tile in sky_tiles(tile, pixel_scale_deg, overlap, projection, frame, lon_range, lat_range):
        meta = {"tile_index": sky_tile.index, "tile_lon": sky_tile.lon, "tile_lat": sky_tile.lat}
        yield sky_tile, _patch_from_map(hmap, sky_tile.wcs, sky_tile.shape, order, meta)


# ----------------------------------------------------------------------------------------------------------------
def describe_healpix(path: str | Path, *, instrument=None, hdu: int | str | None = None) -> list[str]:
    """What skyfm sees in a HEALPix file, as lines of text (for ``skyfm info``)."""
    hmap = read_healpix(path, instrument=instrument, hdu=hdu)
    inst = hmap.instrument
    if hmap.energy_edges_kev is not None:
        bands = [b if b == energy_label(*e) else f"{b} ({energy_label(*e)})" for b, e in zip(hmap.bands, hmap.energy_edges_kev)]
    else:
        bands = list(hmap.bands)
    covered = np.isfinite(hmap.values).all(axis=0)
    lines = [
        f"file:        {path}",
        "format:      HEALPix map" + (" (counts)" if hmap.counts else " (surface brightness)"),
        f"instrument:  {inst.name} (from {hmap.instrument_source})" if inst else f"instrument:  {hmap.instrument_source}",
        f"HEALPix:     NSIDE {hmap.nside}, {'NESTED' if hmap.nested else 'RING'} ordering, {hmap.frame} frame, "
        f"{hmap.npix} pixels of {hmap.resolution_deg:.4g} deg",
        f"shape:       {len(hmap.bands)} band(s) x {hmap.npix} pixels",
        "bands:       " + ", ".join(bands),
        f"coverage:    {100 * covered.mean():.3g}% of the sky ({100 * (1 - covered.mean()):.3g}% masked)",
    ]
    if hmap.counts:
        lines.append(f"counts:      {np.nansum(hmap.values):.6g} in all")
    if inst is None:
        lines.append("note:        pass --instrument to cut tiles from this map")
    return lines


__all__ = ["HealpixMap", "SkyTile", "healpix_tiles", "healpix_to_patch", "pixel_solid_angle", "read_healpix",
           "reproject_map", "sky_tiles", "sky_wcs"]
