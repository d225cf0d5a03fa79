"""Gamma-ray source populations: who is in the sky, where, how bright, with which spectrum, class and shape.

A population is named in the instrument's YAML (``simulation.populations``) with a ``kind`` and its parameters, so
that a new survey is a YAML edit. Four kinds exist:

``4fgl-real``       the real sky of 4FGL-DR2: every catalog source with its position, spectrum (PowerLaw,
                    LogParabola or PLSuperExpCutoff), class and extended morphology (disk, Gaussian or the LAT
                    template). Shipped as ``skyfm/resources/fermi_4fgl_dr2.fits.gz``.
``4fgl-resampled``  a new sky drawn from the catalog's distributions. Positions follow the catalog's source density
                    in (l, b) (a smoothed histogram). Each source takes the flux, spectrum, class and morphology of a
                    random catalog source from the same latitude zone, jittered. Below each zone's catalog threshold
                    ``S_c`` (the peak of its dN/dlogS, above which 4FGL is close to complete) the counts continue as
                    ``dN/dS ~ S^-faint_slope`` down to ``S_c / faint_factor``; the sources this model predicts beyond
                    those the catalog holds are added, with the spectra and classes of faint catalog sources.
``galactic-plane``  a CTAO Galactic Plane Survey population: longitudes uniform in the survey, latitudes Gaussian,
                    fluxes (Crab units above 1 TeV) from a power-law log N - log S reaching below today's survey
                    limits, power-law spectra with index ~ N(2.2, 0.05), a share extended (Gaussian, disk or a
                    Galactic LAT template, rescaled and rotated) up to about 1 deg, overlapping freely.
``toy``             the CTAO toy patch: 20-40 sources placed uniformly inside the patch, some extended.

Every population draws sources over the patch *and a margin around it* (a :class:`Footprint`), so that the light
of sources just outside spills in as it does on the sky. Positions are galactic (l, b) in degrees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources

import numpy as np
from astropy.wcs import WCS

from skyfm.data.simulate.spectra import SPECTRUM_TYPES, SpectrumSet
from skyfm.data.simulate.templates import (
    DISK_R68_PER_RADIUS,
    GAUSS_R68_PER_SIGMA,
    load_templates,
    morphology_r68_deg,
)
from skyfm.errors import SkyfmError

CATALOG_FILE = "fermi_4fgl_dr2.fits.gz"
FLUX1000_RANGE_MEV = (1.0e3, 1.0e5)  # 4FGL's Flux1000: 1-100 GeV
TEV_MEV = 1.0e6
ABOVE_1TEV_MEV = (1.0e6, 1.0e9)  # "above 1 TeV": 1 TeV - 1 PeV
LATITUDE_ZONES_DEG = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 90.0)  # |b| zones of the resampled 4FGL population
GALACTIC_TEMPLATE_MAX_ABS_B = 15.0  # templates centred closer to the plane are Galactic (not LMC, Cen A, ...)

CLASS_GROUPS = {
    "agn": ("bll", "fsrq", "bcu", "agn", "rdg", "nlsy1", "ssrq", "css", "sey"),
    "pulsar": ("psr", "msp"),
}


def class_group(cls: str) -> str:
    """``agn``, ``pulsar`` or ``other`` for a 4FGL-style class (``bll``, ``PSR``, ``snr``, ``unas``, ...)."""
    cls = str(cls).strip().lower()
    for group, members in CLASS_GROUPS.items():
        if cls in members:
            return group
    return "other"


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SourceList:
    """Sources of one patch, as arrays of length N (all angles in degrees).

    Attributes:
        glon, glat: position; for extended sources the centre (real templates: the catalog position; synthetic
            templates: the flux centroid).
        spectra: their spectra (normalisations in ph cm-2 s-1 MeV-1).
        cls: 4FGL-style class (``bll``, ``fsrq``, ``psr``, ``pwn``, ``snr``, ``unas`` = unassociated, ...).
        morphology: ``point``, ``disk``, ``gaussian`` or ``template``.
        size_deg: disk radius or Gaussian sigma (0 for points and templates).
        template: LAT template name ('' unless a template).
        template_scale: angular size factor applied to the template (1 = its real size).
        rotation_rad: extra rotation of a template on the sky (counter-clockwise, 0 for real sources).
        extension: 68% containment radius of the shape before the PSF (0 for points).
        name: 4FGL name; '' for synthetic sources (the truth table names them ``SIM Glll.lll+bb.bbb``).
        is_real: True for 4FGL-DR2 sources at their real positions.
    """

    glon: np.ndarray
    glat: np.ndarray
    spectra: SpectrumSet
    cls: np.ndarray
    morphology: np.ndarray
    size_deg: np.ndarray
    template: np.ndarray
    template_scale: np.ndarray
    rotation_rad: np.ndarray
    extension: np.ndarray
    name: np.ndarray
    is_real: np.ndarray

    def __len__(self) -> int:
        return len(self.glon)

    def subset(self, index) -> "SourceList":
        return SourceList(**{f.name: getattr(self, f.name)[index] if f.name != "spectra" else self.spectra.subset(index)
                             for f in fields(self)})

    @classmethod
    def concatenate(cls, parts: list["SourceList"]) -> "SourceList":
        parts = [p for p in parts if len(p)]
        if not parts:
            return empty_sources()
        return cls(**{f.name: (SpectrumSet.concatenate([p.spectra for p in parts]) if f.name == "spectra"
                               else np.concatenate([getattr(p, f.name) for p in parts])) for f in fields(cls)})


def empty_sources() -> SourceList:
    z = np.zeros(0)
    s = np.zeros(0, dtype=object)
    return SourceList(z, z, SpectrumSet.empty(), s, s, z, s, z, z, z, s, np.zeros(0, dtype=bool))


def synthetic_names(glon: np.ndarray, glat: np.ndarray) -> np.ndarray:
    """Catalog-style names from galactic positions: ``SIM G012.345+00.678``."""
    return np.array([f"SIM G{l % 360:07.3f}{b:+07.3f}" for l, b in zip(glon, glat)], dtype=object)


# ----------------------------------------------------------------------------------------------------------------
# Where to draw: the patch and its margin
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """The pixel grid of a patch (``shape``, ``wcs``) widened by ``margin_pix`` on every side (the PSF's reach), and
    by ``extension_reach_pix`` more for extended sources, whose light reaches farther from their centres."""

    wcs: WCS
    shape: tuple[int, int]
    margin_pix: int
    centre: tuple[float, float]  # (glon, glat) deg
    pixel_scale_deg: float
    frame: str = "galactic"  # the frame of the WCS: galactic or icrs
    extension_reach_pix: int = 0

    @property
    def radius_deg(self) -> float:
        """Angular radius about the centre of a cap that holds the grid widened for extended sources."""
        return self.cap_radius_deg(self.margin_pix + self.extension_reach_pix)

    def cap_radius_deg(self, pad: float) -> float:
        """Angular radius about the centre of a cap that holds the grid widened by ``pad`` pixels.

        For CAR this is exact: a pixel at native offsets (phi, theta) lies arccos(cos phi cos theta) <= hypot(phi,
        theta) from the centre. Other projections get 10% of room.
        """
        h, w = self.shape
        half_w = (w / 2 + pad) * self.pixel_scale_deg
        half_h = (h / 2 + pad) * self.pixel_scale_deg
        room = 1.01 if "CAR" in self.wcs.wcs.ctype[0] else 1.1
        return float(min(180.0, np.hypot(half_w, half_h) * room))

    def pixels(self, glon: np.ndarray, glat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel coordinates (x, y) of galactic sky positions (deg)."""
        if len(glon) == 0:
            return np.zeros(0), np.zeros(0)
        lon, lat = np.asarray(glon, float), np.asarray(glat, float)
        if self.frame != "galactic":
            lon, lat = galactic_to_icrs(lon, lat)
        x, y = self.wcs.wcs_world2pix(lon, lat, 0)
        return np.asarray(x), np.asarray(y)

    def world(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Galactic (glon, glat) in degrees of 0-based pixel coordinates."""
        lon, lat = self.wcs.wcs_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        if self.frame != "galactic":
            lon, lat = icrs_to_galactic(lon, lat)
        return np.asarray(lon) % 360.0, np.asarray(lat)

    def north_angle_rad(self, glon: float, glat: float) -> float:
        """Counter-clockwise angle from the grid's +y axis to galactic north at a position."""
        step = 0.01
        lat2 = glat + step if glat + step <= 90.0 else glat - step
        x, y = self.pixels(np.array([glon, glon]), np.array([glat, lat2]))
        dx, dy = (x[1] - x[0], y[1] - y[0]) if lat2 > glat else (x[0] - x[1], y[0] - y[1])
        return float(np.arctan2(-dx, dy))

    def in_padded(self, x: np.ndarray, y: np.ndarray, extra_pix: np.ndarray | float = 0.0) -> np.ndarray:
        """Pixel positions inside the grid widened by the margin plus ``extra_pix``."""
        h, w = self.shape
        m = self.margin_pix + extra_pix
        return (x >= -0.5 - m) & (x < w - 0.5 + m) & (y >= -0.5 - m) & (y < h - 0.5 + m)

    def in_reach(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Positions where a source, extended or not, may still light the patch."""
        return self.in_padded(x, y, self.extension_reach_pix)

    def in_patch(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        h, w = self.shape
        return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)

    def near(self, glon: np.ndarray, glat: np.ndarray) -> np.ndarray:
        """Positions within the footprint's cap: a cheap cut before the WCS."""
        cos_d = _unit(glon, glat) @ _unit(np.array([self.centre[0]]), np.array([self.centre[1]]))[0]
        return cos_d >= np.cos(np.radians(self.radius_deg))


@lru_cache(maxsize=1)
def _galactic_to_icrs_matrix() -> np.ndarray:
    """The rotation taking galactic unit vectors to ICRS ones (astropy's frames; a fixed rotation)."""
    from astropy.coordinates import SkyCoord

    basis = SkyCoord(l=[0.0, 90.0, 0.0], b=[0.0, 0.0, 90.0], unit="deg", frame="galactic").icrs
    return _unit(basis.ra.deg, basis.dec.deg).T  # columns: images of the galactic x, y, z axes


def _rotate(matrix: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = _unit(lon, lat) @ matrix.T
    return np.degrees(np.arctan2(v[..., 1], v[..., 0])) % 360.0, np.degrees(np.arcsin(np.clip(v[..., 2], -1, 1)))


def galactic_to_icrs(glon: np.ndarray, glat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of galactic positions, by astropy's galactic-to-ICRS rotation (agrees to 1e-9 deg)."""
    return _rotate(_galactic_to_icrs_matrix(), glon, glat)


def icrs_to_galactic(ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _rotate(_galactic_to_icrs_matrix().T, ra, dec)


def _unit(glon: np.ndarray, glat: np.ndarray) -> np.ndarray:
    lon, lat = np.radians(np.asarray(glon, float)), np.radians(np.asarray(glat, float))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def random_in_cap(centre: tuple[float, float], radius_deg: float, n: int, rng: np.random.Generator):
    """``n`` positions (glon, glat) uniform on the sphere within ``radius_deg`` of ``centre``."""
    l0, b0 = np.radians(centre[0]), np.radians(centre[1])
    cos_d = rng.uniform(np.cos(np.radians(radius_deg)), 1.0, n)
    sin_d = np.sqrt(1.0 - cos_d**2)
    az = rng.uniform(0.0, 2.0 * np.pi, n)
    c = np.array([np.cos(b0) * np.cos(l0), np.cos(b0) * np.sin(l0), np.sin(b0)])
    east = np.array([-np.sin(l0), np.cos(l0), 0.0])
    north = np.cross(c, east)
    v = cos_d[:, None] * c + sin_d[:, None] * (np.cos(az)[:, None] * north + np.sin(az)[:, None] * east)
    glon = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    glat = np.degrees(np.arcsin(np.clip(v[:, 2], -1.0, 1.0)))
    return glon, glat


def random_on_sphere(rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(0.0, 360.0)), float(np.degrees(np.arcsin(rng.uniform(-1.0, 1.0))))


# ----------------------------------------------------------------------------------------------------------------
# The shipped 4FGL-DR2 catalog
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Catalog4FGL:
    """4FGL-DR2 as arrays (see ``scripts/make_fermi_resources.py`` for how it was made)."""

    name: np.ndarray
    glon: np.ndarray
    glat: np.ndarray
    flux1000: np.ndarray  # ph cm-2 s-1, 1-100 GeV
    spectra: SpectrumSet
    cls: np.ndarray
    morphology: np.ndarray
    size_deg: np.ndarray  # disk radius or Gaussian sigma
    template: np.ndarray
    extension: np.ndarray  # r68, deg


@lru_cache(maxsize=1)
def load_4fgl() -> Catalog4FGL:
    """The shipped compact 4FGL-DR2 table (read once per process)."""
    from astropy.table import Table

    path = resources.files("skyfm") / "resources" / CATALOG_FILE
    with resources.as_file(path) as p, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = Table.read(p)
    arr = lambda c, dtype=np.float64: np.asarray(t[c], dtype=dtype)  # noqa: E731
    strings = lambda c: np.array([str(v).strip() for v in t[c]], dtype=object)  # noqa: E731
    morphology = strings("morphology")
    spectra = SpectrumSet(
        kind=np.array([SPECTRUM_TYPES.index(str(k).strip()) for k in t["spectrum_type"]]), norm=arr("norm"),
        pivot_mev=arr("pivot_energy"), index=arr("index"), beta=arr("beta"), expfactor=arr("expfactor"),
        exp_index=arr("exp_index"),
    )
    size = np.where(np.isin(morphology, ["disk", "gaussian"]), arr("ext_radius"), 0.0)
    return Catalog4FGL(
        name=strings("name"), glon=arr("glon"), glat=arr("glat"), flux1000=arr("flux1000"), spectra=spectra,
        cls=strings("class"), morphology=morphology, size_deg=size, template=strings("template"),
        extension=np.nan_to_num(arr("extension")),
    )


def _catalog_sources(cat: Catalog4FGL, rows: np.ndarray) -> SourceList:
    n = len(rows)
    return SourceList(
        glon=cat.glon[rows], glat=cat.glat[rows], spectra=cat.spectra.subset(rows), cls=cat.cls[rows],
        morphology=cat.morphology[rows], size_deg=cat.size_deg[rows], template=cat.template[rows],
        template_scale=np.ones(n), rotation_rad=np.zeros(n), extension=cat.extension[rows], name=cat.name[rows],
        is_real=np.ones(n, dtype=bool),
    )


def draw_real_4fgl(footprint: Footprint, rng: np.random.Generator, params: "_Params") -> SourceList:
    """Every 4FGL-DR2 source whose light can reach the patch (``rng`` is unused: the real sky is fixed)."""
    cat = load_4fgl()
    near = np.nonzero(footprint.near(cat.glon, cat.glat))[0]
    x, y = footprint.pixels(cat.glon[near], cat.glat[near])
    return _catalog_sources(cat, near[footprint.in_reach(x, y)])


# --- the resampled 4FGL sky -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ResampleModel:
    """What the resampled population needs from the catalog, computed once per process and parameter set."""

    lon_edges: np.ndarray  # deg
    lat_edges: np.ndarray  # deg
    density: np.ndarray  # (n_lat, n_lon) catalog sources per sr, smoothed in longitude
    zone_of_lat_bin: np.ndarray  # (n_lat,) latitude zone of each latitude bin
    extra_ratio: np.ndarray  # (n_zones,) faint sources to add per catalog-like source
    zone_rows: tuple[np.ndarray, ...]  # catalog rows of each zone
    zone_extended_rows: tuple[np.ndarray, ...]  # its extended sources
    zone_faint_rows: tuple[np.ndarray, ...]  # rows of each zone fainter than 3 S_c (spectra of faint sources)
    zone_threshold: np.ndarray  # (n_zones,) S_c, ph cm-2 s-1 (Flux1000)
    zone_faint_log_edges: tuple[np.ndarray, ...]  # log10 flux bin edges of the added faint sources
    zone_faint_cdf: tuple[np.ndarray, ...]  # their cumulative distribution over those bins


def _zone(abs_b: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(LATITUDE_ZONES_DEG, abs_b, side="right") - 1, 0, len(LATITUDE_ZONES_DEG) - 2)


@lru_cache(maxsize=8)
def _resample_model(faint_factor: float, faint_slope: float) -> _ResampleModel:
    from scipy.ndimage import gaussian_filter1d

    cat = load_4fgl()
    lon_edges = np.arange(0.0, 360.0 + 1e-9, 5.0)
    pos = np.array([0.0, 1.0, 2.0, 3.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0])
    lat_edges = np.concatenate([-pos[::-1], pos[1:]])
    counts, _, _ = np.histogram2d(cat.glat, cat.glon % 360.0, bins=[lat_edges, lon_edges])
    # Smooth along longitude (periodic) to tame the Poisson noise of ~10 sources per cell.
    counts = gaussian_filter1d(counts, sigma=1.0, axis=1, mode="wrap")
    cell_sr = np.radians(5.0) * np.diff(np.sin(np.radians(lat_edges)))[:, None]
    density = counts / cell_sr

    lat_centres = 0.5 * (lat_edges[1:] + lat_edges[:-1])
    zone_of_lat_bin = _zone(np.abs(lat_centres))
    zone_all = _zone(np.abs(cat.glat))
    n_zones = len(LATITUDE_ZONES_DEG) - 1
    log_s = np.log10(cat.flux1000)
    ratios, rows_by_zone, ext_rows_by_zone, faint_rows_by_zone, thresholds, faint_edges, faint_cdfs = ([] for _ in range(7))
    for z in range(n_zones):
        rows = np.nonzero(zone_all == z)[0]
        ls = log_s[rows]
        # Catalog threshold S_c: the peak of dN/dlogS (0.1 dex bins, lightly smoothed).
        edges = np.arange(np.floor(ls.min() * 10) / 10, ls.max() + 0.1, 0.1)
        hist, _ = np.histogram(ls, edges)
        smooth = np.convolve(hist, [0.25, 0.5, 0.25], mode="same")
        log_sc = edges[np.argmax(smooth)]
        s_c = 10.0**log_sc
        # Normalise dN/dS = A S^-slope to the catalog counts in [S_c, 2 S_c), where it is close to complete.
        n_ref = np.count_nonzero((ls >= log_sc) & (ls < log_sc + np.log10(2.0)))
        a = n_ref / _power_law_integral(s_c, 2.0 * s_c, faint_slope)
        # Below S_c, what the model predicts beyond what the catalog holds, in 0.05-dex bins.
        log_edges = np.arange(log_sc - np.log10(faint_factor), log_sc + 1e-9, 0.05)
        model = a * _power_law_integral(10.0 ** log_edges[:-1], 10.0 ** log_edges[1:], faint_slope)
        have, _ = np.histogram(ls, log_edges)
        extra = np.clip(model - have, 0.0, None)
        ratios.append(extra.sum() / max(len(rows), 1))
        rows_by_zone.append(rows)
        ext_rows_by_zone.append(rows[cat.morphology[rows] != "point"])
        faint_rows_by_zone.append(rows[ls < log_sc + np.log10(3.0)])
        thresholds.append(s_c)
        faint_edges.append(log_edges)
        faint_cdfs.append(np.cumsum(extra) / max(extra.sum(), 1e-300))
    return _ResampleModel(
        lon_edges=lon_edges, lat_edges=lat_edges, density=density, zone_of_lat_bin=zone_of_lat_bin,
        extra_ratio=np.array(ratios), zone_rows=tuple(rows_by_zone), zone_extended_rows=tuple(ext_rows_by_zone),
        zone_faint_rows=tuple(faint_rows_by_zone),
        zone_threshold=np.array(thresholds), zone_faint_log_edges=tuple(faint_edges), zone_faint_cdf=tuple(faint_cdfs),
    )


def _power_law_integral(lo, hi, slope: float):
    """Integral of S^-slope dS from lo to hi (slope != 1)."""
    return (np.asarray(hi, float) ** (1.0 - slope) - np.asarray(lo, float) ** (1.0 - slope)) / (1.0 - slope)


def _thinned_positions(footprint: Footprint, model: _ResampleModel, intensity: np.ndarray, pad_pix: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An inhomogeneous Poisson process on the sphere with ``intensity`` (per sr, on the model's l-b cells) over the
    grid widened by ``pad_pix``, by thinning uniform points in a cap. Returns glon, glat and latitude-cell index."""
    radius = footprint.cap_radius_deg(pad_pix)
    b_lo, b_hi = footprint.centre[1] - radius, footprint.centre[1] + radius
    lat_rows = (model.lat_edges[1:] > b_lo) & (model.lat_edges[:-1] < b_hi)
    peak = float(intensity[lat_rows].max())
    if peak <= 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    cap_sr = 2.0 * np.pi * (1.0 - np.cos(np.radians(radius)))
    glon, glat = random_in_cap(footprint.centre, radius, rng.poisson(peak * cap_sr), rng)
    ilat = np.clip(np.searchsorted(model.lat_edges, glat, side="right") - 1, 0, len(model.lat_edges) - 2)
    ilon = np.clip((glon // (model.lon_edges[1] - model.lon_edges[0])).astype(np.int64), 0, len(model.lon_edges) - 2)
    accept = np.nonzero(rng.uniform(0.0, peak, len(glon)) < intensity[ilat, ilon])[0]
    x, y = footprint.pixels(glon[accept], glat[accept])
    inside = accept[footprint.in_padded(x, y, pad_pix - footprint.margin_pix)]
    return glon[inside], glat[inside], ilat[inside]


def draw_resampled_4fgl(footprint: Footprint, rng: np.random.Generator, params: "_Params") -> SourceList:
    """A new sky from 4FGL-DR2's distributions, reaching ``faint_factor`` below its threshold (module docstring).

    Point sources are drawn over the grid and its PSF margin; extended ones, whose light reaches farther, also
    beyond it (only catalog-like extended sources live there: the process is split by type, which is exact).
    """
    faint_factor = params.number("faint_factor", 10.0, minimum=1.0)
    faint_slope = params.number("faint_slope", 1.8, minimum=1.01)
    flux_jitter = params.number("flux_jitter_dex", 0.05, minimum=0.0)
    index_jitter = params.number("index_jitter", 0.05, minimum=0.0)
    size_jitter = params.number("size_jitter_dex", 0.1, minimum=0.0)
    model = _resample_model(faint_factor, faint_slope)
    cat = load_4fgl()

    # All sources over the grid and its PSF margin ...
    intensity = model.density * (1.0 + model.extra_ratio[model.zone_of_lat_bin])[:, None]
    glon, glat, ilat = _thinned_positions(footprint, model, intensity, footprint.margin_pix, rng)
    zone = model.zone_of_lat_bin[ilat]
    ratio = model.extra_ratio[zone]
    faint = rng.uniform(size=len(glon)) < ratio / (1.0 + ratio)
    # ... and the extended ones beyond it, as far as their light reaches.
    ext_share = np.array([len(e) / max(len(r), 1) for e, r in zip(model.zone_extended_rows, model.zone_rows)])
    outer_pad = footprint.margin_pix + footprint.extension_reach_pix
    o_lon, o_lat, o_ilat = _thinned_positions(footprint, model, model.density * ext_share[model.zone_of_lat_bin][:, None],
                                              outer_pad, rng)
    ox, oy = footprint.pixels(o_lon, o_lat)
    outer = ~footprint.in_padded(ox, oy)
    glon, glat = np.concatenate([glon, o_lon[outer]]), np.concatenate([glat, o_lat[outer]])
    zone = np.concatenate([zone, model.zone_of_lat_bin[o_ilat[outer]]])
    faint = np.concatenate([faint, np.zeros(outer.sum(), dtype=bool)])
    extended_only = np.concatenate([np.zeros(len(faint) - outer.sum(), dtype=bool), np.ones(outer.sum(), dtype=bool)])
    n = len(glon)

    rows = np.empty(n, dtype=np.int64)
    flux = np.empty(n)
    for z in np.unique(zone):
        like = (zone == z) & ~faint & ~extended_only
        rows[like] = rng.choice(model.zone_rows[z], like.sum())
        ext = (zone == z) & extended_only
        if ext.any():
            rows[ext] = rng.choice(model.zone_extended_rows[z], ext.sum())
        like |= ext
        flux[like] = cat.flux1000[rows[like]] * 10.0 ** rng.normal(0.0, flux_jitter, like.sum())
        dim = (zone == z) & faint
        if dim.any():
            rows[dim] = rng.choice(model.zone_faint_rows[z], dim.sum())
            edges, cdf = model.zone_faint_log_edges[z], model.zone_faint_cdf[z]
            k = np.minimum(np.searchsorted(cdf, rng.uniform(size=dim.sum()), side="right"), len(cdf) - 1)
            flux[dim] = 10.0 ** rng.uniform(edges[k], edges[k + 1])

    spectra = cat.spectra.subset(rows)
    spectra = SpectrumSet(spectra.kind, spectra.norm, spectra.pivot_mev, spectra.index + rng.normal(0.0, index_jitter, n),
                          spectra.beta, spectra.expfactor, spectra.exp_index)
    spectra = spectra.scaled_to_photon_flux(flux, *FLUX1000_RANGE_MEV)
    size_factor = 10.0 ** rng.normal(0.0, size_jitter, n)
    morphology = cat.morphology[rows]
    is_template = morphology == "template"
    return SourceList(
        glon=glon, glat=glat, spectra=spectra, cls=cat.cls[rows], morphology=morphology,
        size_deg=cat.size_deg[rows] * size_factor, template=cat.template[rows],
        template_scale=np.where(is_template, size_factor, 1.0),
        rotation_rad=np.where(is_template, rng.uniform(0.0, 2.0 * np.pi, n), 0.0),
        extension=_extension(morphology, cat.size_deg[rows] * size_factor, cat.template[rows], size_factor),
        name=np.full(n, "", dtype=object), is_real=np.zeros(n, dtype=bool),
    )


def _extension(morphology: np.ndarray, size_deg: np.ndarray, template: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """68% containment radius (deg) of synthetic sources (templates about their flux centroid)."""
    out = np.zeros(len(morphology))
    for i in np.nonzero(morphology != "point")[0]:
        out[i] = morphology_r68_deg(morphology[i], size_deg[i], template[i], scale[i])
    return out


# --- CTAO: the Galactic-plane survey and the toy patch -------------------------------------------------------------
def _synthetic_tev_sources(glon: np.ndarray, glat: np.ndarray, rng: np.random.Generator, params: "_Params",
                           crab_above_1tev: float) -> SourceList:
    """Fluxes, power-law spectra, classes and shapes of synthetic TeV sources at the given positions."""
    n = len(glon)
    s_min, s_max = params.range_("flux_range", (5e-4, 3.0))
    slope = params.number("slope", 2.0, minimum=1.01)
    index_mean, index_sigma = params.pair("index", (2.2, 0.05))
    ext_fraction = params.number("extended_fraction", 0.5, minimum=0.0, maximum=1.0)
    ext_lo, ext_hi = params.range_("extension_range", (0.03, 1.0))
    shapes = params.weights("morphologies", {"gaussian": 0.6, "disk": 0.25, "template": 0.15})
    classes_point = params.weights("classes_point", {"unas": 0.6, "pwn": 0.25, "snr": 0.1, "bin": 0.05})
    classes_ext = params.weights("classes_extended", {"pwn": 0.55, "snr": 0.35, "unas": 0.1})

    # Fluxes (Crab units above 1 TeV) from dN/dS ~ S^-slope between s_min and s_max, by inverting its CDF.
    u = rng.uniform(size=n)
    a, b = s_min ** (1.0 - slope), s_max ** (1.0 - slope)
    crab_units = (a + u * (b - a)) ** (1.0 / (1.0 - slope))
    index = rng.normal(index_mean, index_sigma, n)
    spectra = SpectrumSet.power_law(np.ones(n), index, TEV_MEV).scaled_to_photon_flux(
        crab_units * crab_above_1tev, *ABOVE_1TEV_MEV)

    extended = rng.uniform(size=n) < ext_fraction
    r68 = np.where(extended, np.exp(rng.uniform(np.log(ext_lo), np.log(ext_hi), n)), 0.0)
    morphology = np.where(extended, rng.choice(list(shapes), n, p=list(shapes.values())), "point").astype(object)
    galactic_templates = [t.name for t in load_templates().values() if abs(t.centre[1]) < GALACTIC_TEMPLATE_MAX_ABS_B]
    template = np.where(morphology == "template", rng.choice(galactic_templates, n), "").astype(object)
    size = np.where(morphology == "disk", r68 / DISK_R68_PER_RADIUS,
                    np.where(morphology == "gaussian", r68 / GAUSS_R68_PER_SIGMA, 0.0))
    scale = np.ones(n)
    for i in np.nonzero(morphology == "template")[0]:
        scale[i] = r68[i] / load_templates()[template[i]].r68_centroid_deg
    cls = np.where(extended, rng.choice(list(classes_ext), n, p=list(classes_ext.values())),
                   rng.choice(list(classes_point), n, p=list(classes_point.values()))).astype(object)
    return SourceList(
        glon=glon % 360.0, glat=glat, spectra=spectra, cls=cls, morphology=morphology, size_deg=size,
        template=template, template_scale=scale, rotation_rad=np.where(morphology == "template",
                                                                       rng.uniform(0, 2 * np.pi, n), 0.0),
        extension=r68, name=np.full(n, "", dtype=object), is_real=np.zeros(n, dtype=bool),
    )


def draw_galactic_plane(footprint: Footprint, rng: np.random.Generator, params: "_Params") -> SourceList:
    """CTAO Galactic Plane Survey sources over the footprint (module docstring; parameters in the YAML)."""
    l_lo, l_hi = params.range_("glon", (-30.0, 30.0), positive=False)
    b_lo, b_hi = params.range_("glat", (-2.5, 2.5), positive=False)
    sigma_b = params.number("glat_sigma", 0.7)
    density_ref = params.number("density", 0.2)  # per deg2 of the survey, brighter than flux_ref (Crab units)
    flux_ref = params.number("flux_ref", 0.01)
    s_min, _ = params.range_("flux_range", (5e-4, 3.0))
    slope = params.number("slope", 2.0, minimum=1.01)
    density = density_ref * (s_min / flux_ref) ** (1.0 - slope)

    # Longitudes of the survey that the footprint covers (footprints are small next to 360 deg).
    half = footprint.radius_deg
    l_c = ((footprint.centre[0] + 180.0) % 360.0) - 180.0
    lo, hi = max(l_lo, l_c - half), min(l_hi, l_c + half)
    if hi <= lo:
        return empty_sources()
    n = rng.poisson(density * (hi - lo) * (b_hi - b_lo))
    glon = rng.uniform(lo, hi, n)
    glat = _truncated_normal(sigma_b, b_lo, b_hi, n, rng)
    x, y = footprint.pixels(glon % 360.0, glat)
    inside = footprint.in_reach(x, y)
    return _synthetic_tev_sources(glon[inside], glat[inside], rng, params, _crab(params))


def draw_toy(footprint: Footprint, rng: np.random.Generator, params: "_Params") -> SourceList:
    """The CTAO toy patch: ``n_sources`` (a range) sources uniform inside the patch itself."""
    n_lo, n_hi = params.range_("n_sources", (20, 40), strict=False)
    n = int(rng.integers(int(n_lo), int(n_hi) + 1))
    h, w = footprint.shape
    x = rng.uniform(-0.5, w - 0.5, n)
    y = rng.uniform(-0.5, h - 0.5, n)
    glon, glat = footprint.world(x, y)
    return _synthetic_tev_sources(glon, glat, rng, params, _crab(params))


def _truncated_normal(sigma: float, lo: float, hi: float, n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.special import ndtr, ndtri

    return sigma * ndtri(rng.uniform(ndtr(lo / sigma), ndtr(hi / sigma), n))


def _crab(params: "_Params") -> float:
    return params.number("crab_flux_above_1tev", 2.26e-11)  # ph cm-2 s-1 (HESS 2006)


# ----------------------------------------------------------------------------------------------------------------
# Populations as data: the YAML's simulation.populations
# ----------------------------------------------------------------------------------------------------------------
class _Params:
    """A population's YAML parameters, read with checks that name the file and the key."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def _fail(self, key: str, problem: str) -> SkyfmError:
        return SkyfmError(f"{self.where}.{key}' {problem}")

    def number(self, key: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
        value = self.raw.get(key, default)
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise self._fail(key, f"should be a number, got {value!r}") from None
        if not np.isfinite(x) or (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
            bounds = f"{'' if minimum is None else f'>= {minimum}'}{'' if maximum is None else f' and <= {maximum}'}"
            raise self._fail(key, f"should be a finite number {bounds}, got {value!r}")
        return x

    def pair(self, key: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self.raw.get(key, default)
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise self._fail(key, f"should be a two-element list, got {value!r}")
        try:
            return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            raise self._fail(key, f"should hold two numbers, got {value!r}") from None

    def range_(self, key: str, default: tuple[float, float], positive: bool = True,
               strict: bool = True) -> tuple[float, float]:
        lo, hi = self.pair(key, default)
        if not (lo < hi if strict else lo <= hi) or (positive and lo <= 0):
            order = "<" if strict else "<="
            raise self._fail(key, f"should be [low, high] with {'0 < ' if positive else ''}low {order} high, "
                                  f"got {[lo, hi]}")
        return lo, hi

    def weights(self, key: str, default: dict[str, float]) -> dict[str, float]:
        value = self.raw.get(key, default)
        if not isinstance(value, dict) or not value:
            raise self._fail(key, f"should be a mapping of names to weights, got {value!r}")
        try:
            w = {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise self._fail(key, f"should map names to numbers, got {value!r}") from None
        total = sum(w.values())
        if total <= 0 or min(w.values()) < 0:
            raise self._fail(key, f"should hold non-negative weights with a positive sum, got {value!r}")
        return {k: v / total for k, v in w.items()}


POPULATION_KINDS = {
    "4fgl-real": draw_real_4fgl,
    "4fgl-resampled": draw_resampled_4fgl,
    "galactic-plane": draw_galactic_plane,
    "toy": draw_toy,
}


@dataclass(frozen=True)
class Population:
    """One entry of the YAML's ``simulation.populations``."""

    name: str
    kind: str
    params: _Params

    @property
    def default_size(self) -> int | None:
        """Patch side (pixels) this population asks for (the toy patch: 512 = 10.24 deg), or None."""
        size = self.params.raw.get("size")
        return None if size is None else int(self.params.number("size", 0, minimum=16))

    def default_centre(self, rng: np.random.Generator, half_size_deg: tuple[float, float]) -> tuple[float, float]:
        """A patch centre (glon, glat): anywhere on the sky for 4FGL skies; inside the survey for CTAO's."""
        if self.kind.startswith("4fgl"):
            return random_on_sphere(rng)
        l_lo, l_hi = self.params.range_("glon", (-30.0, 30.0), positive=False)
        half_w = min(half_size_deg[1], 0.5 * (l_hi - l_lo))
        return float(rng.uniform(l_lo + half_w, l_hi - half_w) % 360.0), 0.0

    def max_extension_deg(self) -> float:
        """The largest 68% containment radius a source of this population may have (deg)."""
        if self.kind.startswith("4fgl"):  # the catalog's largest, with room for the resampling jitter
            return 1.5 * float(load_4fgl().extension.max())
        return self.params.range_("extension_range", (0.03, 1.0))[1]

    def draw(self, footprint: Footprint, rng: np.random.Generator) -> SourceList:
        return POPULATION_KINDS[self.kind](footprint, rng, self.params)


def get_population(inst, name: str | None = None) -> Population:
    """The population ``name`` (default: the YAML's ``simulation.default_population``) of a counts instrument."""
    sim = inst.simulation or {}
    pops = sim.get("populations") or {}
    where = f"{inst.source or inst.name}: 'simulation.populations"
    if not isinstance(pops, dict) or not pops:
        raise SkyfmError(f"{where}' is missing: {inst.name} defines no gamma-ray source populations")
    name = name or sim.get("default_population") or next(iter(pops))
    if name not in pops:
        raise SkyfmError(f"{inst.name} has no population '{name}'; choose one of {', '.join(pops)}")
    raw = pops[name] or {}
    if not isinstance(raw, dict):
        raise SkyfmError(f"{where}.{name}' should be a mapping of parameters, got {raw!r}")
    kind = str(raw.get("kind", name))
    if kind not in POPULATION_KINDS:
        raise SkyfmError(f"{where}.{name}.kind' should be one of {', '.join(POPULATION_KINDS)}, got {kind!r}")
    return Population(name=name, kind=kind, params=_Params(raw, f"{where}.{name}"))
