"""Exposure cubes: a counts cube's physical photon fluxes from the exposure its observation had.

A counts catalog's ``flux_phys`` (ph cm-2 s-1) is each band's fitted counts over the band's exposure, summed over the
bands. Without more to go on, the exposure is the instrument YAML's one number per band (a typical exposure; the
simulator's). A real observation's exposure varies over the sky and with energy (for Fermi-LAT, the survey's time
on each direction and the effective area's rise from 100 MeV to 1 GeV), and a cube of another mission length or
event selection has another exposure altogether: ``flux_phys`` from the YAML is then off by their ratio (a cube of
three times the YAML's exposure gives fluxes three times too bright).

Fermi's ``gtexpcube2`` writes the exposure as a cube in cm2 s: a 3-D primary image (energy, lat, lon) on a celestial
grid of its own (often the whole sky, coarser than the counts), with an ``ENERGIES`` table of the energy of each plane
(MeV; the counts cube's bin edges, so one plane more than bins). gammapy writes the same (``format =
"fgst-template"``) or, by default, planes per bin of true energy with the table its ``BANDSHDU`` keyword names
(``ENERGY_TRUE_MIN`` / ``_MAX``, TeV), in m2 s, and a ``MapDataset`` file holds its exposure as the ``EXPOSURE`` image
beside the counts; the exposure is read in its file's unit (BUNIT; cm2 s where none is given).
:func:`read_exposure_cube` reads any of these, a 2-D map (one exposure for every energy), and a HEALPix table of one
column per plane with the same energy tables (all-sky or partial, RING or NESTED: :class:`HealpixSkyCube`, as HEALPix
analyses keep their exposure); :meth:`SkyCube.band_exposure` gives each source its exposure per band: bilinear in the
sky at the source's position, and over the band the mean weighted by a power law of index 2 (the spectrum the
likelihood fit assumes, ``skyfm.catalog.likelihood.powerlaw_band_weights``), the exposure linear in log energy between
planes where the planes are energies (``gtexpcube2``'s), constant over each bin where they are bins.
:func:`apply_exposure` puts the result into a catalog.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError

#: points per band, uniform in log energy, at which the exposure is averaged
ENERGY_SAMPLES = 64
#: spectral index of the power law that weighs the exposure over a band (the likelihood fit's)
SPECTRAL_INDEX = 2.0
#: a band may reach this far (relative) beyond the cube's energies: rounding in the files' edges
ENERGY_TOLERANCE = 1e-3
#: a source this many pixels beyond the cube's edge takes the edge's exposure: gtexpcube2 cmap=COUNTS_CUBE makes the
#: exposure on the counts cube's own grid, and a fitted position may lie just outside it
EDGE_MARGIN_PIX = 2.0

ENERGY_TABLES = ("ENERGIES", "EBOUNDS", "BANDS")


@dataclass
class SkyCube:
    """Planes of a quantity on a celestial grid, one per energy or energy bin: an exposure cube
    (:func:`read_exposure_cube`) or an intensity cube (:func:`skyfm.catalog.background_model.read_intensity_cube`).

    Attributes:
        data: (P, H, W) the quantity (exposure: cm2 s), one plane per energy or energy bin (P = 1: the same at every
            energy). May be a memory map: only the pixels asked for are read.
        energies_mev: (P,) energy of each plane (MeV), increasing, for a cube of energies; else None.
        bins_mev: (P, 2) energy bin of each plane (MeV), for a cube of bins; else None.
        wcs: celestial WCS of the planes.
        source: the file, for messages.
        what: what the cube is, for messages ("exposure cube").
        unit: the file's unit of ``data`` (BUNIT, or the HEALPix column's TUNIT), as written; "" if none.
        scale: what the values read are multiplied by (an exposure in m2 s, as gammapy writes it: 1e4 to cm2 s).
    """

    data: np.ndarray
    energies_mev: np.ndarray | None
    bins_mev: np.ndarray | None
    wcs: object
    source: str
    what: str = "exposure cube"
    unit: str = ""
    scale: float = 1.0

    def at_sky(self, coords, clamp: bool = False) -> np.ndarray:
        """(N, P) value of each plane at ``coords`` (a SkyCoord of N positions in any frame): bilinear between
        pixel centres; NaN outside the cube's pixels (:meth:`at_pixels`)."""
        return self.at_pixels(*self.sky_to_pixels(coords), clamp=clamp)

    def sky_to_pixels(self, coords) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel positions (x, y) on the cube of ``coords`` (a SkyCoord in any frame)."""
        return tuple(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in self.wcs.world_to_pixel(coords))

    def covers(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Whether each pixel position lies on the cube (or within :data:`EDGE_MARGIN_PIX` of its edge)."""
        _, height, width = self.data.shape
        m = EDGE_MARGIN_PIX
        return (np.isfinite(px) & np.isfinite(py) & (px >= -0.5 - m) & (px <= width - 0.5 + m)
                & (py >= -0.5 - m) & (py <= height - 0.5 + m))

    def at_pixels(self, px: np.ndarray, py: np.ndarray, clamp: bool = False) -> np.ndarray:
        """(N, P) value of each plane at 0-based pixel positions of the cube; NaN more than
        :data:`EDGE_MARGIN_PIX` outside its pixels (within it, the edge pixels' value), or with ``clamp`` the
        nearest edge pixel's value wherever the position is finite."""
        from scipy.ndimage import map_coordinates

        n_planes, height, width = self.data.shape
        inside = (np.isfinite(px) & np.isfinite(py)) if clamp else self.covers(px, py)
        px, py = np.clip(px, 0, width - 1), np.clip(py, 0, height - 1)
        out = np.full((len(px), n_planes), np.nan)
        if not inside.any():
            return out
        # only the box around the sources is read (an all-sky cube may be memory-mapped)
        x0 = min(max(int(np.floor(px[inside].min())) - 1, 0), width - 1)
        x1 = max(min(int(np.ceil(px[inside].max())) + 2, width), x0 + 1)
        y0 = min(max(int(np.floor(py[inside].min())) - 1, 0), height - 1)
        y1 = max(min(int(np.ceil(py[inside].max())) + 2, height), y0 + 1)
        points = np.stack([py[inside] - y0, px[inside] - x0])
        for k in range(n_planes):
            box = np.asarray(self.data[k, y0:y1, x0:x1], dtype=np.float64)
            out[inside, k] = map_coordinates(box, points, order=1, mode="nearest")
        return out * self.scale

    def plane_weights(self, energies_mev) -> np.ndarray:
        """(P, S) matrix that turns the planes' values into the values at ``energies_mev`` (S,): linear in log
        energy between a cube's energies (flat beyond the first and last), constant over each of its bins."""
        energies = np.asarray(energies_mev, dtype=np.float64)
        if self.energies_mev is None and self.bins_mev is None:
            return np.ones((1, len(energies)))
        if self.energies_mev is not None:  # flat beyond the ends: the energies clipped into the planes' range
            return log_energy_weights(self.energies_mev, np.clip(energies, self.energies_mev[0], self.energies_mev[-1]))
        inside = (energies[None] >= self.bins_mev[:, :1]) & (energies[None] < self.bins_mev[:, 1:])
        inside[-1] |= energies >= self.bins_mev[-1, 1]  # the last bin's upper edge
        return inside.astype(np.float64)

    def check_energies(self, edges_mev: np.ndarray) -> None:
        """An error naming the first band of ``edges_mev`` (C, 2) that reaches outside the cube's energies."""
        from skyfm.data.readers import energy_label

        if self.energies_mev is None and self.bins_mev is None:
            return
        nodes = self.energies_mev if self.energies_mev is not None else self.bins_mev
        lo, hi = float(np.min(nodes)), float(np.max(nodes))
        outside = (edges_mev[:, 0] < lo * (1 - ENERGY_TOLERANCE)) | (edges_mev[:, 1] > hi * (1 + ENERGY_TOLERANCE))
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            raise SkyfmError(f"{self.what} {self.source}: it covers {energy_label(lo * 1e3, hi * 1e3)}, but the "
                             f"image's band {k} is {energy_label(*edges_mev[k] * 1e3)}; make the {self.what} for "
                             "the counts cube's energy range")

    def band_weights(self, energy_edges_kev) -> np.ndarray:
        """(P, C) matrix that turns the planes' values into each band's: over the band, their mean weighted by a
        power law of index :data:`SPECTRAL_INDEX` (:meth:`plane_weights` between planes). Bands outside the cube's
        energies are an error."""
        edges = np.asarray(energy_edges_kev, dtype=np.float64).reshape(-1, 2) / 1e3  # MeV
        self.check_energies(edges)
        weights = np.zeros((self.data.shape[0], len(edges)))
        for c, (e_lo, e_hi) in enumerate(edges):
            log_e, _ = log_energy_samples(e_lo, e_hi)
            w = np.exp((1.0 - SPECTRAL_INDEX) * log_e)  # a power law E^-index per unit ln E
            weights[:, c] = self.plane_weights(np.exp(log_e)) @ (w / w.sum())
        return weights

    def band_exposure(self, coords, energy_edges_kev) -> np.ndarray:
        """(N, C) exposure (cm2 s) of each band at ``coords`` (SkyCoord, N positions); NaN outside the cube."""
        return self.at_sky(coords) @ self.band_weights(energy_edges_kev)


@dataclass
class HealpixSkyCube(SkyCube):
    """A :class:`SkyCube` on a HEALPix grid (an all-sky or partial exposure map, as fermipy's HEALPix analyses and
    gtexpcube2's ``proj=HPX`` write them): ``data`` is (P, npix), NaN where a partial map has no pixel; ``wcs`` is
    None. Its "pixel positions" are the longitude and latitude (deg) in the map's frame, and values are bilinear
    between the HEALPix pixel centres (``astropy_healpix``)."""

    nside: int = 0
    nested: bool = False
    frame: str = "galactic"

    def sky_to_pixels(self, coords) -> tuple[np.ndarray, np.ndarray]:
        sky = coords.transform_to(self.frame).spherical
        return (np.atleast_1d(sky.lon.deg).astype(np.float64), np.atleast_1d(sky.lat.deg).astype(np.float64))

    def covers(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Whether each position lies where the map has data (every finite one, for an all-sky map)."""
        inside = np.isfinite(px) & np.isfinite(py)
        if inside.any() and np.isnan(self.data[0]).any():
            inside[inside] = np.isfinite(self._interpolate(px[inside], py[inside], planes=[0])[:, 0])
        return inside

    def at_pixels(self, px: np.ndarray, py: np.ndarray, clamp: bool = False) -> np.ndarray:
        """(N, P) value of each plane at (lon, lat) deg; NaN where the map has no data, or with ``clamp`` the mean of
        the positions that have (a partial map's stand-in beyond its edge, for the PSF's reach past the image)."""
        out = np.full((len(px), self.data.shape[0]), np.nan)
        finite = np.isfinite(px) & np.isfinite(py)
        out[finite] = self._interpolate(px[finite], py[finite])
        if clamp:
            missing = np.isnan(out) & finite[:, None]
            if missing.any():
                fill = np.nanmean(np.where(missing, np.nan, out), axis=0)
                out = np.where(missing, np.nan_to_num(fill)[None], out)
        return out * self.scale

    def _interpolate(self, lon_deg: np.ndarray, lat_deg: np.ndarray, planes=slice(None)) -> np.ndarray:
        """(N, P) bilinear values of the ``planes`` at the positions: the four neighbours and their weights found
        once for every plane."""
        import astropy.units as u
        from astropy_healpix import HEALPix

        grid = HEALPix(nside=self.nside, order="nested" if self.nested else "ring")
        index, weight = grid.bilinear_interpolation_weights(lon_deg * u.deg, lat_deg * u.deg)  # (4, N) each
        values = np.asarray(self.data[planes])[:, index]  # (P, 4, N): only the neighbours are read
        return (values * weight[None]).sum(axis=1).T.astype(np.float64)


def _read_healpix_cube(hdul, path, what: str, where: str, unit_text: str) -> HealpixSkyCube:
    """:func:`read_sky_cube` for a HEALPix table: one column per plane (or one vector column), RING or NESTED, all-sky
    or partial (a PIXEL column), its frame from COORDSYS, the planes' energies as for images."""
    from skyfm.data.healpix import _column_values, _frame_of, _healpix_hdu, map_layout, npix_to_nside

    table = hdul[_healpix_hdu(hdul, None, Path(path))]
    ordering, index_col, data_cols = map_layout(table, where)
    nside = int(table.header.get("NSIDE", 0))
    if len(data_cols) == 1 and table.columns[data_cols[0]].dtype.shape:  # one vector column: a plane per element
        values = np.asarray(table.data[data_cols[0]], dtype=np.float64).reshape(len(table.data), -1).T
        if index_col is not None:
            raise SkyfmError(f"{where}: a partial map with a vector column; write one column per plane")
    else:
        values = _column_values(table, data_cols, index_col, nside, where)
    energies, bins = _plane_energies(hdul, values.shape[0], where)
    seen = values[np.isfinite(values)]
    if seen.size == 0 or (seen < 0).any():
        raise SkyfmError(f"{where}: {'negative values' if seen.size else 'no data'}; it should be {unit_text}")
    # float32: an all-sky model of 30 planes at nside 1024 is 1.5 GB so, 3 GB in float64
    unit = next((str(table.columns[c].unit or "").strip() for c in data_cols if table.columns[c].unit), "")
    return HealpixSkyCube(data=values.astype(np.float32), energies_mev=energies, bins_mev=bins, wcs=None,
                          source=Path(path).name, what=what, unit=unit, nside=npix_to_nside(values.shape[1]),
                          nested=ordering == "NESTED", frame=_frame_of(table.header, where, None))


def log_energy_samples(lo_mev: float, hi_mev: float, n: int = ENERGY_SAMPLES) -> tuple[np.ndarray, float]:
    """(ln E of the midpoints of ``n`` equal steps in ln E over [lo, hi], the step): a band's quadrature nodes."""
    step = np.log(hi_mev / lo_mev) / n
    return np.log(lo_mev) + (np.arange(n) + 0.5) * step, float(step)


def log_energy_weights(nodes_mev, energies_mev) -> np.ndarray:
    """(P, S) weights of linear interpolation in log E between ``nodes_mev`` (P,) at ``energies_mev`` (S,), and of
    linear extrapolation from the two end nodes beyond them; applied to log values, a power law."""
    log_nodes, log_e = np.log(np.asarray(nodes_mev, np.float64)), np.log(np.asarray(energies_mev, np.float64))
    weights = np.zeros((len(log_nodes), len(log_e)))
    if len(log_nodes) == 1:
        weights[0] = 1.0
        return weights
    upper = np.clip(np.searchsorted(log_nodes, log_e), 1, len(log_nodes) - 1)  # the segment, or the end one
    t = (log_e - log_nodes[upper - 1]) / (log_nodes[upper] - log_nodes[upper - 1])
    columns = np.arange(len(log_e))
    weights[upper - 1, columns] = 1.0 - t
    weights[upper, columns] = t
    return weights


def read_exposure_cube(path) -> SkyCube:
    """Read an exposure cube (module docstring): the first HDU with image data, its celestial WCS (or, without an
    image, a HEALPix table: :class:`HealpixSkyCube`), the plane energies from its ``ENERGIES`` table (energies of
    the planes, MeV unless TUNIT says otherwise) or an ``EBOUNDS`` / ``BANDS`` table of bins (keV unless TUNIT says
    otherwise; each plane at its bin's log centre).
    A file of several images (gammapy's ``MapDataset``: COUNTS, EXPOSURE, BACKGROUND, ...) gives its ``EXPOSURE``
    image, its energies from the table its ``BANDSHDU`` keyword names (gammapy's ``ENERGY_TRUE`` bins). The exposure
    is read in the file's unit (BUNIT: gammapy writes m2 s, gtexpcube2 cm2 s; cm2 s where none is given).
    A file without a celestial WCS, a cube without an energy table or with one of the wrong length, NaN, infinite
    or negative exposures, and a unit that is no area x time are errors."""
    import astropy.units as u

    from skyfm.data.readers import parse_unit

    cube = read_sky_cube(path, "exposure cube", "cm2 s per pixel and energy", hdu_name="EXPOSURE")
    unit = parse_unit(cube.unit)
    if unit is not None:
        if not unit.is_equivalent(u.cm**2 * u.s):
            raise SkyfmError(f"exposure cube {cube.source}: its values are in {cube.unit!r}, not an exposure "
                             "(an area x time, cm2 s)")
        cube.scale = float(unit.to(u.cm**2 * u.s))
    step = _check_step(cube.data)
    sample = cube.data[:, ::step, ::step] if cube.data.ndim == 3 else cube.data[:, :: step * step]  # HEALPix: (P, npix)
    if not (np.nan_to_num(np.asarray(sample)) > 0).any():
        raise SkyfmError(f"exposure cube {cube.source}: the exposure is zero everywhere")
    return cube


def _check_step(data) -> int:
    """A large cube is checked on a grid of its pixels, every this many (the pixels used are checked where read)."""
    return 1 if data.size <= 1e8 else int(np.ceil(np.sqrt(data.size / 1e8)))


def read_sky_cube(path, what: str, unit_text: str, hdu_name: str | None = None) -> SkyCube:
    """Read a :class:`SkyCube` (:func:`read_exposure_cube`'s rules); ``what`` ("exposure cube") and ``unit_text``
    (what its values should be) name it in errors; ``hdu_name``: the image to take where the file has one of that
    name (else the first 2-D or 3-D image)."""
    from astropy.wcs import WCS, FITSFixedWarning

    from skyfm.data.readers import _is_healpix, open_fits

    where = f"{what} {Path(path).name}"
    with open_fits(path) as hdul:
        images = [h for h in hdul if h.is_image and h.data is not None and h.data.ndim in (2, 3)]
        image = next((h for h in images if h.name.upper() == hdu_name), images[0] if images else None)
        if image is None and any(_is_healpix(h) for h in hdul):
            return _read_healpix_cube(hdul, path, what, where, unit_text)
        if image is None:
            raise SkyfmError(f"{where}: no 2-D or 3-D image or HEALPix table in the file (gtexpcube2 and the Fermi-LAT "
                             "diffuse models hold theirs in the primary image)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(image.header).celestial
        if not wcs.has_celestial or wcs.naxis != 2:
            raise SkyfmError(f"{where}: its image has no celestial WCS, so the sources' sky positions cannot be "
                             "found on it")
        data = image.data if image.data.ndim == 3 else image.data[None]
        energies, bins = _plane_energies(hdul, data.shape[0], where, image.header)
        planes = np.asarray(data[:, :: _check_step(data), :: _check_step(data)])
        if not np.isfinite(planes).all() or (planes < 0).any():
            raise SkyfmError(f"{where}: NaN, infinite or negative values; it should be {unit_text}")
        unit = str(image.header.get("BUNIT", "")).strip()
    return SkyCube(data=data, energies_mev=energies, bins_mev=bins, wcs=wcs, source=Path(path).name, what=what,
                   unit=unit)


def _plane_energies(hdul, n_planes: int, where: str, header=None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(energies (P,) MeV, or None; bins (P, 2) MeV, or None) of a cube's ``n_planes`` planes from the table the
    image's ``header`` names in ``BANDSHDU`` (gammapy's; bins of true energy, ``ENERGY_TRUE_MIN`` / ``_MAX``, TeV
    unless TUNIT says otherwise), else its ``ENERGIES``, ``EBOUNDS`` or ``BANDS`` table (none needed for one
    plane)."""
    import astropy.units as u
    from astropy.table import Table

    if n_planes == 1:
        return None, None
    named = "" if header is None else str(header.get("BANDSHDU", "")).strip().upper()
    table_hdu = next((h for h in hdul if named and h.name.upper() == named and hasattr(h, "columns")), None)
    if table_hdu is None:
        table_hdu = next((h for name in ENERGY_TABLES for h in hdul if h.name == name), None)
    if table_hdu is None:
        raise SkyfmError(f"{where}: {n_planes} planes but no ENERGIES, EBOUNDS or BANDS table to say their energies")
    energies = bins = None
    table = Table.read(table_hdu)
    if "ENERGY_TRUE_MIN" in table.colnames and "ENERGY_TRUE_MAX" in table.colnames:
        lo, hi = (table[c] for c in ("ENERGY_TRUE_MIN", "ENERGY_TRUE_MAX"))
        bins = np.stack([np.asarray(u.Quantity(c, c.unit or u.TeV).to_value(u.MeV), dtype=np.float64)
                         for c in (lo, hi)], axis=1)
        n_given = len(bins)
        ordered = np.all(bins > 0) and np.all(bins[:, 1] > bins[:, 0]) and np.all(bins[1:, 0] >= bins[:-1, 1])
    elif "E_MIN" in table.colnames and "E_MAX" in table.colnames:
        from skyfm.data.fits_io import read_ebounds

        bins = read_ebounds(table_hdu, where=where) / 1e3  # MeV
        n_given = len(bins)
        ordered = np.all(bins > 0) and np.all(bins[:, 1] > bins[:, 0]) and np.all(bins[1:, 0] >= bins[:-1, 1])
    else:
        column = next((c for c in table.colnames if c.upper() in ("ENERGY", "ENERGIES")), table.colnames[0])
        col = table[column]
        energies = np.asarray(u.Quantity(col, col.unit or u.MeV).to_value(u.MeV), dtype=np.float64)
        n_given = len(energies)
        ordered = np.all(energies > 0) and np.all(np.diff(energies) > 0)
    if n_given != n_planes:
        raise SkyfmError(f"{where}: {n_planes} planes but its {table_hdu.name} table gives {n_given} energies")
    if not ordered:
        raise SkyfmError(f"{where}: the planes' energies should be positive and increasing")
    return energies, bins


def catalog_coords(table):
    """SkyCoord of a catalog's rows from its ``glon``/``glat`` or ``ra``/``dec`` columns; None without them."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    def deg(name):
        return np.asarray(getattr(table[name], "value", table[name]), dtype=np.float64)

    if "glon" in table.colnames and "glat" in table.colnames:
        return SkyCoord(l=deg("glon") * u.deg, b=deg("glat") * u.deg, frame="galactic")
    if "ra" in table.colnames and "dec" in table.colnames:
        return SkyCoord(ra=deg("ra") * u.deg, dec=deg("dec") * u.deg, frame="icrs")
    return None


def apply_exposure(table, cube: SkyCube, energy_edges_kev):
    """``table`` with ``flux_phys`` from ``cube``: each row's bands' counts (``flux_band``, the likelihood fit's)
    over the exposure at its position (:meth:`SkyCube.band_exposure`), summed. ``energy_edges_kev`` (C, 2):
    the energy bins of ``flux_band``'s columns. Rows outside the cube, or where its exposure is zero, get NaN (a
    warning says how many); the table's meta ``exposure_cube`` names the file. A catalog without ``flux_phys`` (no
    likelihood refinement) or without sky coordinates is an error."""
    import astropy.units as u

    from skyfm.heads.flux import flux_phys

    if len(table) == 0:  # nothing detected (a HEALPix map's empty catalog has no flux_phys column either)
        out = table.copy(copy_data=False)
        out.meta["exposure_cube"] = cube.source
        return out
    if "flux_phys" not in table.colnames:
        raise SkyfmError("--exposure gives the physical fluxes of the Poisson likelihood refinement; this catalog "
                         "has none (a CCD image, or --no-refine)")
    coords = catalog_coords(table)
    if coords is None:
        raise SkyfmError(f"--exposure {cube.source}: the image has no celestial WCS, so its sources cannot be "
                         "placed on the exposure cube")
    out = table.copy(copy_data=False)
    exposure = cube.band_exposure(coords, energy_edges_kev)  # (N, C)
    counts = np.clip(np.asarray(getattr(out["flux_band"], "value", out["flux_band"]), dtype=np.float64), 0, None)
    if counts.ndim == 1:
        counts = counts[:, None]
    if counts.shape[1] != exposure.shape[1]:
        raise SkyfmError(f"--exposure {cube.source}: the catalog has {counts.shape[1]} bands, the image "
                         f"{exposure.shape[1]} energy bins")
    usable = np.isfinite(exposure).all(axis=1) & (exposure > 0).all(axis=1)
    phys = np.full(len(out), np.nan)
    if usable.any():
        phys[usable] = flux_phys(counts[usable], exposure[usable])
    if not usable.all():
        warnings.warn(f"{int((~usable).sum())} of {len(out)} sources lie outside the exposure cube "
                      f"{cube.source} or where its exposure is zero or not a number: their flux_phys is NaN",
                      stacklevel=2)
    out["flux_phys"] = u.Quantity(phys, u.ph / u.cm**2 / u.s)
    out["flux_phys"].info.description = (f"Photon flux over the bands of the image: sum of counts / exposure per "
                                         f"bin, the exposure from {cube.source} at the source (power-law weighted "
                                         "over each bin)")
    out.meta["exposure_cube"] = cube.source
    return out


__all__ = ["SkyCube", "apply_exposure", "catalog_coords", "log_energy_samples", "log_energy_weights",
           "read_exposure_cube", "read_sky_cube"]
