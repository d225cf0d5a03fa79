"""The gamma-ray counts-cube simulator (Fermi-LAT, CTAO): sources and backgrounds, PSF per bin, Poisson counts.

:func:`simulate_counts_patch` builds one patch of an instrument whose YAML has ``kind: counts``:

1. **Grid.** A CAR projection (or the YAML's) centred on the patch, ``size`` pixels of the YAML's pixel scale, in
   the YAML's frame (galactic for both built-in telescopes). CAR centred on the patch is what ``gtbin`` makes: an
   oblique plate carree, locally Cartesian, whose pixels shrink by ``cos`` of the offset from the centre row
   (solid angles per pixel row are computed exactly).
2. **Sources** from a population (:mod:`~skyfm.data.simulate.populations`), drawn over the patch and a margin as
   wide as the widest PSF (and the largest extended source) so that the light of sources outside spills in.
3. **Expected counts** of each source in each energy bin: its spectrum integrated over the bin
   (:mod:`~skyfm.data.simulate.spectra`) times the bin's exposure (YAML, cm2 s) times ``exposure_scale``.
4. **Images.** Point sources are spread by each bin's pixel-integrated PSF, truncated where it holds 99.5% of the
   flux and renormalised so that every expected count lands on the sky. Compact PSFs come from a cached table of
   stamps at 1/16-px sub-pixel phases, interpolated bilinearly for sources of one expected count or more (which
   keeps centroids exact) and the nearest phase for fainter ones. A narrow core with long wings (the LAT's King
   PSF at 1-4 GeV) is split: its tapered core from the table, its smooth halo by cloud-in-cell and an FFT.
   Well-sampled PSFs (FWHM >= 4 px) go entirely through cloud-in-cell and the FFT, as
   :func:`skyfm.data.simulate.render.add_point_sources` does. Extended sources
   (:mod:`~skyfm.data.simulate.templates`) are rendered as unit-sum stamps and convolved with the PSF; so is the
   Galactic interstellar emission (:mod:`~skyfm.data.simulate.diffuse`). Convolutions are FFTs over a grid padded
   by the PSF radius, whose circular wrap never reaches the patch. The CAR pixels' shrinking away from the centre
   row (2.5% at the corners of a 25.6-deg patch) is neglected in the shapes, not in the solid angles.
5. **Backgrounds**: Galactic interstellar emission (two models: ``gas-disk``, ``ic-halo``), isotropic emission,
   and for Cherenkov telescopes the residual hadronic background; ``include_background=False`` leaves them out.
6. **Counts**: one Poisson draw per pixel and bin of (sources + backgrounds).

The patch's ``truth`` (an astropy Table with units) has one row per source whose centre lies inside the patch
(sources in the margin shine into the patch but have no row):

``x``, ``y``              pixels (0-based; x = column, y = row)
``glon``, ``glat``, ``ra``, ``dec``   deg
``flux``                  expected counts, all bins (the whole source, also what its PSF spreads beyond the edge)
``flux_band``             (N, C) expected counts per bin
``flux_phys``             photon flux over the instrument's energy range, ph cm-2 s-1
``flux1000``              photon flux 1-100 GeV, ph cm-2 s-1 (4FGL's Flux1000); NaN where the instrument's bins
                          do not cover 1-100 GeV (CTAO)
``spectrum``              ``PowerLaw``, ``LogParabola`` or ``PLSuperExpCutoff``
``index``                 photon index (LogParabola: alpha)
``beta_or_cutoff``        LogParabola: beta; PLSuperExpCutoff: cutoff energy ``a^(-1/b)`` in MeV; PowerLaw: 0
``class``, ``class_group``  4FGL-style class (``bll``, ``fsrq``, ``psr``, ``pwn``, ``snr``, ``unas`` = unassociated,
                          ...) and its group (``agn``, ``pulsar``, ``other``)
``extension``             68% containment radius of the source's shape before the PSF, deg (0 for points)
``morphology``, ``template``  ``point`` / ``disk`` / ``gaussian`` / ``template``, and the LAT template's name
``snr``                   sqrt(TS) of the source against the simulated background (other sources not counted):
                          per bin, signal = 68% of its counts and background = the expected background in a
                          circle of radius ``sqrt(r68_psf^2 + extension^2)``, TS = 2 ((s + b) ln(1 + s/b) - s);
                          summed over bins
``name``, ``is_real_4fgl``  4FGL name or ``SIM Glll.lll+bb.bbb``; True for real 4FGL-DR2 sources

Everything that does not depend on the seed (catalog, templates, PSF stamp tables, kernel FFTs, spectral integrals
of the diffuse models) is cached per process; see ``benchmarks/simulate.py`` for the speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import astropy.units as u
import numpy as np
import scipy.fft
from astropy.table import Table
from astropy.wcs import WCS

from skyfm.data.patch import Patch
from skyfm.data.simulate import diffuse
from skyfm.data.simulate.populations import (
    FLUX1000_RANGE_MEV,
    Footprint,
    SourceList,
    class_group,
    galactic_to_icrs,
    get_population,
    synthetic_names,
)
from skyfm.data.simulate.templates import Stamp, add_stamp, disk_stamp, gaussian_stamp, template_stamp
from skyfm.errors import SkyfmError
from skyfm.instruments import Instrument, load_instrument
from skyfm.instruments.psf import PSF

PSF_FRACTION = 0.995  # point-source stamps hold this fraction of the PSF before renormalisation
MAX_TABLE_RADIUS_PIX = 10  # wider PSFs are split into a tabulated core and an FFT halo, or go through the FFT
WELL_SAMPLED_FWHM_PIX = 4.0  # cloud-in-cell + FFT renders PSFs at least this wide to within 2% in variance
CORE_RADIUS_FWHM = 2.5  # the tabulated core of a split PSF reaches this many FWHM...
CORE_TAPER_PIX = 3.0  # ...and tapers to zero over its last 3 pixels
TABLE_PHASES = 16  # sub-pixel phases per pixel of the stamp table
INTERPOLATE_ABOVE_COUNTS = 1.0  # sources this bright get interpolated stamps, fainter ones the nearest phase
EXTENDED_REACH_R68 = 3.5  # an extended source's light reaches this many r68 from its centre
DIFFUSE_STEP_DEG = 0.3  # sampling of the interstellar-emission maps before interpolation to pixels
MIN_APERTURE_BACKGROUND = 0.1  # counts: the floor of the background in the snr estimate


# ----------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------
def simulate_counts_patch(
    inst: Instrument | str,
    seed: int,
    *,
    center: tuple[float, float] | None = None,
    size: int | tuple[int, int] | None = None,
    population: str | None = None,
    galactic_model: str | None = None,
    exposure_scale: float = 1.0,
    include_background: bool = True,
) -> Patch:
    """Simulate one counts cube of a gamma-ray instrument, with its truth (module docstring).

    Args:
        inst: a counts instrument (``fermi-lat``, ``ctao``, or a YAML of your own).
        seed: the same (instrument, seed, options) give the same patch, bit for bit.
        center: (glon, glat) of the patch centre in degrees; default drawn by the population (anywhere on the sky
            for 4FGL skies, inside the survey for CTAO's plane and toy patches).
        size: pixels, one number (square) or (height, width); default the population's (toy: 512) or the YAML's.
        population: a name from the YAML's ``simulation.populations``: ``real`` / ``resampled`` (Fermi-LAT),
            ``plane`` / ``toy`` (CTAO); default the YAML's ``simulation.default_population``.
        galactic_model: interstellar-emission model (``gas-disk``, ``ic-halo``, or ``none``); default the YAML's
            ``background.galactic.default``.
        exposure_scale: multiplies every exposure (and the hadronic background): 0.1 is a tenth of the survey.
        include_background: False leaves out every background (then the data are Poisson counts of sources only).

    Returns:
        A :class:`~skyfm.data.Patch` with ``data`` (C, H, W) float32 counts, ``source_image`` (expected counts of
        the sources alone), zero ``contaminant_mask``, ``truth``, ``energy_edges_kev`` and ``meta`` (seed,
        population, galactic_model, center_glon, center_glat, exposure_scale, background, n_rendered).
    """
    inst = load_instrument(inst)
    if not inst.is_counts:
        raise SkyfmError(f"{inst.name} is a {inst.kind} instrument; the counts-cube simulator needs kind: counts")
    if not (np.isfinite(exposure_scale) and exposure_scale > 0):
        raise SkyfmError(f"exposure_scale should be a positive number, got {exposure_scale!r}")
    pop = get_population(inst, population)
    model_name = _galactic_model_name(inst, galactic_model) if include_background else "none"
    rng_centre, rng_sources, rng_diffuse, rng_counts = (np.random.default_rng(s)
                                                        for s in np.random.SeedSequence(int(seed)).spawn(4))

    shape = _patch_shape(size if size is not None else (pop.default_size or inst.patch_size))
    scale = inst.pixel_scale_deg
    if center is None:
        center = pop.default_centre(rng_centre, (0.5 * shape[0] * scale, 0.5 * shape[1] * scale))
    center = _check_center(center)
    optics = [_band_optics(b.psf, scale) for b in inst.bands]
    margin = max(o.radius for o in optics)
    wcs = patch_wcs(inst, center, shape)
    footprint = Footprint(wcs=wcs, shape=shape, margin_pix=margin, centre=center, pixel_scale_deg=scale,
                          frame=inst.frame,
                          extension_reach_pix=int(np.ceil(EXTENDED_REACH_R68 * pop.max_extension_deg() / scale)))
    sources = pop.draw(footprint, rng_sources)
    x, y = footprint.pixels(sources.glon, sources.glat)
    reach = EXTENDED_REACH_R68 * sources.extension / scale
    keep = footprint.in_padded(x, y, reach)
    sources, x, y = sources.subset(keep), x[keep], y[keep]

    edges_mev = band_edges_mev(inst)
    exposure = np.array([b.exposure for b in inst.bands]) * exposure_scale
    band_flux = sources.spectra.band_fluxes(edges_mev)  # (N, C) ph cm-2 s-1
    counts = band_flux * exposure[None, :]  # (N, C) expected counts

    grid = _PaddedGrid.for_patch(shape, margin)
    source_image, background = _render(inst, optics, grid, footprint, sources, x, y, counts, model_name,
                                       include_background, exposure, rng_diffuse)
    expected = source_image + background
    data = rng_counts.poisson(expected).astype(np.float32)

    inside = footprint.in_patch(x, y)
    truth = _truth_table(inst, sources.subset(inside), x[inside], y[inside], counts[inside], band_flux[inside],
                         background, optics, footprint)
    meta = {
        "seed": int(seed), "population": pop.name, "galactic_model": model_name, "center_glon": float(center[0]),
        "center_glat": float(center[1]), "exposure_scale": float(exposure_scale), "background": bool(include_background),
        "n_rendered": int(len(sources)),
    }
    return Patch(
        data=data, instrument=inst.name, bands=[b.name for b in inst.bands], wcs=wcs, truth=truth,
        source_image=source_image.astype(np.float32), contaminant_mask=np.zeros(data.shape, dtype=np.uint8),
        energy_edges_kev=edges_mev * 1e3, meta=meta, background_image=background.astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------
def _patch_shape(size) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise SkyfmError(f"size should be one number or (height, width), got {size!r}")
        h, w = size
    else:
        h = w = size
    try:
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise SkyfmError(f"size should be a whole number of pixels, got {size!r}") from None
    if min(h, w) < 16:
        raise SkyfmError(f"size should be at least 16 pixels, got {size!r}")
    return h, w


def _check_center(center) -> tuple[float, float]:
    try:
        glon, glat = (float(v) for v in center)
    except (TypeError, ValueError):
        raise SkyfmError(f"center should be (glon, glat) in degrees, got {center!r}") from None
    if not (np.isfinite(glon) and -90.0 <= glat <= 90.0):
        raise SkyfmError(f"center should be (glon, glat) with -90 <= glat <= 90, got {center!r}")
    return glon % 360.0, glat


def patch_wcs(inst: Instrument, center: tuple[float, float], shape: tuple[int, int]) -> WCS:
    """The 2-D celestial WCS of a patch: the YAML's projection and frame, centred on ``center`` (glon, glat)."""
    h, w = shape
    wcs = WCS(naxis=2)
    proj = inst.projection
    if inst.frame == "galactic":
        wcs.wcs.ctype = [f"GLON-{proj}", f"GLAT-{proj}"]
        wcs.wcs.crval = [center[0], center[1]]
    else:
        ra, dec = galactic_to_icrs(np.array([center[0]]), np.array([center[1]]))
        wcs.wcs.ctype = [f"RA---{proj}", f"DEC--{proj}"]
        wcs.wcs.crval = [float(ra[0]), float(dec[0])]
        wcs.wcs.radesys = "ICRS"
    wcs.wcs.crpix = [(w + 1) / 2.0, (h + 1) / 2.0]  # 1-based: the patch centre
    wcs.wcs.cdelt = [-inst.pixel_scale_deg, inst.pixel_scale_deg]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.set()
    return wcs


def band_edges_mev(inst: Instrument) -> np.ndarray:
    """(C, 2) energy edges of the instrument's bins, MeV."""
    return np.array([[b.energy[0].to_value(u.MeV), b.energy[1].to_value(u.MeV)] for b in inst.bands])


def _row_solid_angle_sr(inst: Instrument, grid: "_PaddedGrid", shape: tuple[int, int]) -> np.ndarray:
    """Solid angle (sr) of the pixels of each row of the padded grid: (Hp, 1).

    In CAR the native latitude of a row is linear in the row index (0 on the patch's centre row) and a pixel spans
    ``dphi * (sin(theta_top) - sin(theta_bottom))``; other projections use the flat ``cdelt^2``.
    """
    step = np.radians(inst.pixel_scale_deg)
    rows = np.arange(grid.shape[0]) - grid.row0 - (shape[0] - 1) / 2.0
    if inst.projection != "CAR":
        return np.full((grid.shape[0], 1), step**2)
    theta = rows * step
    return (step * (np.sin(theta + step / 2) - np.sin(theta - step / 2)))[:, None]


@dataclass(frozen=True)
class _PaddedGrid:
    """A grid holding the patch at (row0, col0), padded so that FFTs of its size are fast."""

    shape: tuple[int, int]
    row0: int
    col0: int

    @classmethod
    def for_patch(cls, shape: tuple[int, int], margin: int) -> "_PaddedGrid":
        hp, wp = (_fast_even_length(n + 2 * margin) for n in shape)
        return cls((hp, wp), (hp - shape[0]) // 2, (wp - shape[1]) // 2)

    def crop(self, shape: tuple[int, int], margin: int) -> tuple[slice, slice, tuple[int, int]]:
        """Slices of a sub-grid with at least ``margin`` around the patch (fast FFT size), and its patch origin."""
        hc, wc = (min(_fast_even_length(n + 2 * margin), full) for n, full in zip(shape, self.shape))
        r, c = self.row0 - (hc - shape[0]) // 2, self.col0 - (wc - shape[1]) // 2
        return slice(r, r + hc), slice(c, c + wc), (self.row0 - r, self.col0 - c)


@lru_cache(maxsize=256)
def _fast_even_length(n: int) -> int:
    """The smallest even length >= n whose FFT is fast."""
    m = scipy.fft.next_fast_len(n, real=True)
    while m % 2:
        m = scipy.fft.next_fast_len(m + 1, real=True)
    return m


# ----------------------------------------------------------------------------------------------------------------
# PSF per bin: stamp tables and kernel FFTs, cached per process
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BandOptics:
    """How a bin's point sources are rendered (see :func:`_band_optics`)."""

    psf: PSF
    pixel_scale_deg: float
    radius: int  # half-size of the full PSF stamp, pixels (holds PSF_FRACTION)
    method: str  # "table", "table+halo" or "fft"
    core_radius: int  # half-size of the table stamps (= radius unless split into core and halo)

    @property
    def use_table(self) -> bool:
        return self.method != "fft"


@lru_cache(maxsize=64)
def _band_optics(psf: PSF, pixel_scale_deg: float) -> _BandOptics:
    """Pick the rendering of a bin's point sources from its PSF in pixels.

    * ``table``: stamps up to :data:`MAX_TABLE_RADIUS_PIX` from the phase table: exact shapes.
    * ``table+halo``: a narrow core with long wings (the LAT's King function at 1-4 GeV): the core, tapered to zero
      at ``core_radius``, comes from the table; the smooth remainder (the halo) is deposited by cloud-in-cell and
      convolved by FFT, where the deposit's smoothing (1/6 px^2) is negligible against the halo's scale.
    * ``fft``: well-sampled PSFs (FWHM >= 4 px): cloud-in-cell and one FFT, as ``render.add_point_sources`` does.
    """
    radius = psf.stamp_radius_pix(pixel_scale_deg, fraction=PSF_FRACTION)
    fwhm_pix = psf.fwhm_deg / pixel_scale_deg
    if radius <= MAX_TABLE_RADIUS_PIX:
        return _BandOptics(psf, pixel_scale_deg, radius, "table", radius)
    if fwhm_pix < WELL_SAMPLED_FWHM_PIX:
        core = int(np.ceil(max(CORE_RADIUS_FWHM * fwhm_pix, CORE_TAPER_PIX + 2)))
        return _BandOptics(psf, pixel_scale_deg, radius, "table+halo", core)
    return _BandOptics(psf, pixel_scale_deg, radius, "fft", radius)


def _core_taper(rho: np.ndarray, core_radius: int) -> np.ndarray:
    """1 inside ``core_radius - CORE_TAPER_PIX``, falling as cos^2 to 0 at ``core_radius`` (pixels)."""
    t = np.clip((core_radius - rho) / CORE_TAPER_PIX, 0.0, 1.0)
    return np.sin(0.5 * np.pi * t) ** 2


def _unit_psf_stamps(psf: PSF, pixel_scale_deg: float, radius: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    stamps = psf.stamps(dx, dy, pixel_scale_deg, radius)
    return stamps / stamps.sum(axis=(1, 2), keepdims=True)


@lru_cache(maxsize=64)
def _halo_kernel(optics: _BandOptics) -> np.ndarray:
    """The part of the centred unit-sum PSF stamp outside the tapered core: (2 R + 1, 2 R + 1)."""
    r = optics.radius
    full = _unit_psf_stamps(optics.psf, optics.pixel_scale_deg, r, np.zeros(1), np.zeros(1))[0]
    offsets = np.arange(-r, r + 1)
    rho = np.hypot(offsets[:, None], offsets[None, :])
    return full * (1.0 - _core_taper(rho, optics.core_radius))


@lru_cache(maxsize=64)
def _stamp_table(optics: _BandOptics) -> np.ndarray:
    """Stamps for sub-pixel offsets on a (P+1) x (P+1) grid over [-1/2, 1/2]^2: (P+1, P+1, S, S), S = 2 core + 1.

    Plain PSFs: unit-sum stamps. Split PSFs: the tapered core of each phase's stamp, scaled so that core plus halo
    hold exactly one source's flux.
    """
    phases = np.linspace(-0.5, 0.5, TABLE_PHASES + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(phases, phases, indexing="ij"))
    rc = optics.core_radius
    if optics.method == "table+halo":
        stamps = optics.psf.stamps(dx, dy, optics.pixel_scale_deg, rc)
        offsets = np.arange(-rc, rc + 1, dtype=np.float64)
        rho = np.hypot(offsets[None, :, None] - dy[:, None, None], offsets[None, None, :] - dx[:, None, None])
        stamps *= _core_taper(rho, rc)
        stamps *= (1.0 - _halo_kernel(optics).sum()) / stamps.sum(axis=(1, 2), keepdims=True)
    else:
        stamps = _unit_psf_stamps(optics.psf, optics.pixel_scale_deg, rc, dx, dy)
    size = 2 * rc + 1
    return stamps.reshape(TABLE_PHASES + 1, TABLE_PHASES + 1, size, size)


@lru_cache(maxsize=64)
def _kernel_fft(optics: _BandOptics, grid_shape: tuple[int, int], part: str = "full") -> np.ndarray:
    """rfft2 of the unit-sum pixel-integrated PSF (or its halo), centred on pixel (0, 0) of a periodic grid."""
    r = optics.radius
    if part == "halo":
        kernel = _halo_kernel(optics)
    else:
        kernel = _unit_psf_stamps(optics.psf, optics.pixel_scale_deg, r, np.zeros(1), np.zeros(1))[0]
    padded = np.zeros(grid_shape)
    padded[: 2 * r + 1, : 2 * r + 1] = kernel
    return scipy.fft.rfft2(np.roll(padded, (-r, -r), axis=(0, 1)))


def add_points_from_table(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, optics: _BandOptics,
                          chunk: int = 1024) -> None:
    """Add point sources to ``image`` in place with stamps from the cached table of sub-pixel phases.

    Sources with at least :data:`INTERPOLATE_ABOVE_COUNTS` expected counts get the four nearest phases' stamps
    interpolated bilinearly, which keeps their centroid exact and agrees with exact stamps
    (:func:`skyfm.data.simulate.render.add_point_sources`) to better than 0.5% of each pixel's value; fainter
    ones take the nearest phase's stamp (at most 1/32 px off, invisible under a few photons). Stamps are unit-sum:
    every expected count lands on the sky.
    """
    h, w = image.shape
    r = optics.core_radius
    size = 2 * r + 1
    ix, iy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    keep = (ix + r >= 0) & (ix - r < w) & (iy + r >= 0) & (iy - r < h) & (flux > 0)
    if not keep.any():
        return
    x, y, ix, iy, flux = x[keep], y[keep], ix[keep], iy[keep], flux[keep]
    table = _stamp_table(optics).reshape(TABLE_PHASES + 1, TABLE_PHASES + 1, -1)
    px, py = (x - ix + 0.5) * TABLE_PHASES, (y - iy + 0.5) * TABLE_PHASES
    # Accumulate on the image padded by the stamp's diameter, where every kept stamp fits whole: no clipping.
    pad = 2 * r
    wp = w + 2 * pad
    acc = np.zeros((h + 2 * pad) * wp)
    stamp_offsets = (np.arange(size)[:, None] * wp + np.arange(size)[None, :]).ravel()
    corner = (iy - r + pad) * wp + (ix - r + pad)  # flat index of each stamp's first pixel on the padded image
    bright = flux >= INTERPOLATE_ABOVE_COUNTS
    for group in (np.nonzero(bright)[0], np.nonzero(~bright)[0]):
        for start in range(0, len(group), chunk):
            k = group[start : start + chunk]
            if bright[k[0]]:  # interpolate between the four nearest phases
                jx = np.minimum(px[k].astype(np.int64), TABLE_PHASES - 1)
                jy = np.minimum(py[k].astype(np.int64), TABLE_PHASES - 1)
                fx, fy = (px[k] - jx)[:, None], (py[k] - jy)[:, None]
                stamps = ((1 - fy) * ((1 - fx) * table[jy, jx] + fx * table[jy, jx + 1])
                          + fy * ((1 - fx) * table[jy + 1, jx] + fx * table[jy + 1, jx + 1]))
            else:
                stamps = table[np.rint(py[k]).astype(np.int64), np.rint(px[k]).astype(np.int64)]
            stamps *= flux[k, None]
            acc += np.bincount((corner[k, None] + stamp_offsets[None, :]).ravel(), weights=stamps.ravel(),
                               minlength=acc.size)
    image += acc.reshape(h + 2 * pad, wp)[pad : pad + h, pad : pad + w]


def _deposit_cloud_in_cell(grid: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> None:
    """Share each source's flux among its four nearest pixels (bilinear weights), in place."""
    h, w = grid.shape
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    acc = np.zeros(h * w)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            rows, cols = y0 + dy, x0 + dx
            ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            acc += np.bincount(rows[ok] * w + cols[ok], weights=(flux * wy * wx)[ok], minlength=h * w)
    grid += acc.reshape(h, w)


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
def _extended_stamps(sources: SourceList, x: np.ndarray, y: np.ndarray, grid: _PaddedGrid, footprint: Footprint,
                     scale: float) -> dict[int, Stamp]:
    """Unit-sum stamps of the extended sources on the padded grid, by source index."""
    stamps = {}
    for i in np.nonzero(sources.morphology != "point")[0]:
        gx, gy = x[i] + grid.col0, y[i] + grid.row0
        kind = sources.morphology[i]
        if kind == "disk":
            stamps[i] = disk_stamp(gx, gy, sources.size_deg[i] / scale)
        elif kind == "gaussian":
            stamps[i] = gaussian_stamp(gx, gy, sources.size_deg[i] / scale)
        else:
            north = footprint.north_angle_rad(sources.glon[i], sources.glat[i])
            stamps[i] = template_stamp(sources.template[i], gx, gy, scale, scale=sources.template_scale[i],
                                       rotation_rad=north + sources.rotation_rad[i],
                                       anchor="centre" if sources.is_real[i] else "centroid")
    return stamps


def _render(inst, optics, grid, footprint, sources, x, y, counts, model_name, include_background, exposure,
            rng_diffuse):
    """Expected counts of the sources and of the backgrounds: two (C, H, W) float64 arrays."""
    h, w = footprint.shape
    n_bands = len(inst.bands)
    scale = inst.pixel_scale_deg
    source_image = np.zeros((n_bands, h, w))
    background = np.zeros((n_bands, h, w))
    ext = _extended_stamps(sources, x, y, grid, footprint, scale)
    is_point = sources.morphology == "point"
    omega = _row_solid_angle_sr(inst, grid, footprint.shape)  # (Hp, 1)
    diffuse_maps = (_interstellar_maps(inst, model_name, grid, footprint, rng_diffuse) if model_name != "none"
                    else None)
    edges_mev = band_edges_mev(inst)
    edges = tuple(map(tuple, edges_mev))
    galactic_scale = _galactic_scale(inst)
    patch_rows = slice(grid.row0, grid.row0 + h)
    tilt = _hadronic_tilt(inst, (h, w), rng_diffuse)
    px, py, point_counts = x[is_point], y[is_point], counts[is_point]
    for c, opt in enumerate(optics):
        rows, cols, (pr, pc) = grid.crop(footprint.shape, opt.radius)
        sub_shape = (rows.stop - rows.start, cols.stop - cols.start)
        in_patch = (slice(pr, pr + h), slice(pc, pc + w))
        # Light convolved with the full PSF: extended sources, and point sources of the "fft" bins.
        src = np.zeros(sub_shape)
        for i, stamp in ext.items():
            if counts[i, c] > 0:
                add_stamp(src, Stamp(stamp.image, stamp.row0 - rows.start, stamp.col0 - cols.start), counts[i, c])
        if opt.method == "fft":
            _deposit_cloud_in_cell(src, px + pc, py + pr, point_counts[:, c])
        spectrum = scipy.fft.rfft2(src) * _kernel_fft(opt, sub_shape) if src.any() else None
        if opt.method == "table+halo":  # the halo of the point sources, convolved with the halo kernel
            halo = np.zeros(sub_shape)
            _deposit_cloud_in_cell(halo, px + pc, py + pr, point_counts[:, c])
            halo_spectrum = scipy.fft.rfft2(halo) * _kernel_fft(opt, sub_shape, "halo")
            spectrum = halo_spectrum if spectrum is None else spectrum + halo_spectrum
        if spectrum is not None:
            source_image[c] = scipy.fft.irfft2(spectrum, s=sub_shape)[in_patch]
        if opt.use_table:
            add_points_from_table(source_image[c], px, py, point_counts[:, c], opt)
        if diffuse_maps is not None:
            fractions = {k: diffuse.band_fractions(model_name, k, edges)[c] for k in diffuse_maps}
            bkg = sum(fractions[k] * diffuse_maps[k][rows, cols] for k in diffuse_maps)
            bkg *= omega[rows] * (exposure[c] * galactic_scale)
            background[c] = _convolve(bkg, _kernel_fft(opt, sub_shape))[in_patch]
        if include_background:
            background[c] += _flat_backgrounds(inst, c, edges_mev, omega[patch_rows], exposure, (h, w), tilt)
    np.clip(source_image, 0.0, None, out=source_image)  # FFT round-off: tiny negatives
    np.clip(background, 0.0, None, out=background)
    return source_image, background


def _convolve(image: np.ndarray, kernel_fft: np.ndarray) -> np.ndarray:
    return scipy.fft.irfft2(scipy.fft.rfft2(image) * kernel_fft, s=image.shape)


def _galactic_model_name(inst: Instrument, requested: str | None) -> str:
    """The interstellar-emission model to use: ``requested``, else the YAML's ``background.galactic.default``;
    it must be one the YAML lists in ``background.galactic.models`` (all known models when it lists none)."""
    cfg = (inst.background or {}).get("galactic") or {}
    known = list(diffuse.INTERSTELLAR_MODELS)
    listed = cfg.get("models") or known
    unknown = [m for m in listed if m not in known]
    if unknown:
        raise SkyfmError(f"{inst.source}: 'background.galactic.models' lists unknown models {unknown}; "
                         f"skyfm knows {', '.join(known)}")
    name = str(requested if requested is not None else cfg.get("default", "none"))
    choices = [str(m) for m in listed] + ["none"]
    if name not in choices:
        raise SkyfmError(f"unknown galactic model '{name}' for {inst.name}; choose one of {', '.join(choices)}")
    return name


def _galactic_scale(inst: Instrument) -> float:
    cfg = (inst.background or {}).get("galactic") or {}
    try:
        value = float(cfg.get("scale", 1.0))
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise SkyfmError(f"{inst.source}: 'background.galactic.scale' should be a number >= 0, got {cfg.get('scale')!r}")
    return value


def _interstellar_maps(inst, model_name, grid, footprint, rng) -> dict[str, np.ndarray]:
    """Interstellar emission (ph cm-2 s-1 sr-1 above 1 GeV) per component on the padded grid.

    Evaluated every ~0.3 deg (the clumps' finest scale) and interpolated bilinearly to pixels.
    """
    step = max(1, int(round(DIFFUSE_STEP_DEG / inst.pixel_scale_deg)))
    hp, wp = grid.shape
    ny, nx = hp // step + 2, wp // step + 2  # coarse nodes at padded pixels 0, step, ... beyond the last pixel
    cols, rows = np.meshgrid(np.arange(nx) * step - grid.col0, np.arange(ny) * step - grid.row0)
    glon, glat = footprint.world(cols.astype(float).ravel(), rows.astype(float).ravel())
    maps = diffuse.interstellar_maps(model_name, glon.reshape(ny, nx), glat.reshape(ny, nx),
                                     step * inst.pixel_scale_deg, rng)
    return {k: _upsample_linear(m, step, grid.shape) for k, m in maps.items()}


def _upsample_linear(coarse: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation from nodes every ``step`` pixels (starting at pixel 0) to every pixel of ``shape``."""
    out = coarse
    for axis, n in enumerate(shape):
        i0, f = _interpolation_weights(n, coarse.shape[axis], step)
        lo, hi = np.take(out, i0, axis=axis), np.take(out, i0 + 1, axis=axis)
        f = f[:, None] if axis == 0 else f[None, :]
        out = lo + f * (hi - lo)
    return out


@lru_cache(maxsize=32)
def _interpolation_weights(n_fine: int, n_coarse: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """For every fine index: the coarse node below it and the fractional distance to it."""
    pos = np.arange(n_fine) / step
    i0 = np.minimum(pos.astype(np.int64), n_coarse - 2)
    return i0, pos - i0


def _hadronic_tilt(inst: Instrument, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray | None:
    """The seeded gentle gradient of the hadronic background across the patch (the same in every bin), or None."""
    had = (inst.background or {}).get("hadronic")
    if not had:
        return None
    amplitude = float(had.get("gradient", 0.0)) if isinstance(had, dict) else 0.0
    return diffuse.hadronic_gradient(shape, amplitude, rng)


def _flat_backgrounds(inst, c, edges_mev, omega_rows, exposure, shape, tilt) -> np.ndarray:
    """Isotropic emission and the residual hadronic background of bin ``c``, expected counts (H, W)."""
    bg = inst.background or {}
    out = np.zeros(shape)
    iso = bg.get("isotropic")
    if iso:
        try:
            intensity, index = float(iso["intensity_above_1gev"]), float(iso["index"])
        except (KeyError, TypeError, ValueError):
            raise SkyfmError(f"{inst.source}: 'background.isotropic' needs numbers intensity_above_1gev and index, "
                             f"got {iso!r}") from None
        per_sr = diffuse.isotropic_band_intensity(intensity, index, edges_mev)[c]
        out += per_sr * omega_rows * exposure[c]
    had = bg.get("hadronic")
    if had:
        rates = had.get("counts_per_deg2") if isinstance(had, dict) else None
        if not isinstance(rates, (list, tuple)) or len(rates) != len(inst.bands):
            raise SkyfmError(f"{inst.source}: 'background.hadronic.counts_per_deg2' should list one number per band "
                             f"({len(inst.bands)}), got {rates!r}")
        deg2 = omega_rows * (180.0 / np.pi) ** 2
        exposure_scale = exposure[c] / inst.bands[c].exposure  # the hadronic rate scales with observing time
        out += float(rates[c]) * deg2 * exposure_scale * tilt
    return out


# ----------------------------------------------------------------------------------------------------------------
# Truth
# ----------------------------------------------------------------------------------------------------------------
def _truth_table(inst, sources: SourceList, x, y, counts, band_flux, background, optics, footprint) -> Table:
    """The truth catalog (columns in the module docstring), brightest first."""
    order = np.argsort(-counts.sum(axis=1), kind="stable")
    sources, x, y, counts, band_flux = sources.subset(order), x[order], y[order], counts[order], band_flux[order]
    spec = sources.spectra
    edges = band_edges_mev(inst)
    e_lo, e_hi = float(edges[:, 0].min()), float(edges[:, 1].max())
    contiguous = np.allclose(edges[1:, 0], edges[:-1, 1], rtol=1e-9)
    covers_flux1000 = e_lo <= FLUX1000_RANGE_MEV[0] and e_hi >= FLUX1000_RANGE_MEV[1]
    ra, dec = galactic_to_icrs(sources.glon, sources.glat)
    groups = {c: class_group(c) for c in set(sources.cls)}
    names = np.asarray(sources.name, dtype=object).copy()
    unnamed = names == ""
    names[unnamed] = synthetic_names(sources.glon[unnamed], sources.glat[unnamed])
    photon_flux = u.ph / u.cm**2 / u.s
    strings = lambda values, width: np.asarray(values, dtype=f"U{width}")  # noqa: E731
    columns = {
        "x": u.Quantity(x, u.pix),
        "y": u.Quantity(y, u.pix),
        "glon": u.Quantity(sources.glon % 360.0, u.deg),
        "glat": u.Quantity(sources.glat, u.deg),
        "ra": u.Quantity(ra, u.deg),
        "dec": u.Quantity(dec, u.deg),
        "flux": u.Quantity(counts.sum(axis=1), u.ct),
        "flux_band": u.Quantity(counts.reshape(len(sources), len(inst.bands)), u.ct),
        "flux_phys": u.Quantity(band_flux.sum(axis=1) if contiguous else spec.photon_flux(e_lo, e_hi), photon_flux),
        "flux1000": u.Quantity(spec.photon_flux(*FLUX1000_RANGE_MEV) if covers_flux1000
                               else np.full(len(sources), np.nan), photon_flux),
        "spectrum": strings(spec.type_names, 16),
        "index": spec.index,
        "beta_or_cutoff": np.where(spec.kind == 1, spec.beta, np.where(spec.kind == 2, np.nan_to_num(spec.cutoff_mev), 0.0)),
        "class": strings(sources.cls, 8),
        "class_group": strings([groups[c] for c in sources.cls], 8),
        "extension": u.Quantity(sources.extension, u.deg),
        "morphology": strings(sources.morphology, 8),
        "template": strings(sources.template, 24),
        "snr": _snr(counts, sources.extension, x, y, background, optics, footprint.pixel_scale_deg),
        "name": strings(names, 24),
        "is_real_4fgl": np.asarray(sources.is_real, dtype=bool),
    }
    t = Table(list(columns.values()), names=list(columns))
    t.meta["EXTNAME"] = "TRUTH"
    t.meta["COMMENT"] = ["Rows: sources whose centre lies inside the patch; flux columns are expected counts.",
                         "beta_or_cutoff: LogParabola beta, PLSuperExpCutoff cutoff energy (MeV), PowerLaw 0."]
    return t


def _snr(counts, extension, x, y, background, optics, scale) -> np.ndarray:
    """sqrt(TS) of each source against the expected background in an r68 aperture (module docstring)."""
    n = len(x)
    if n == 0:
        return np.zeros(0)
    h, w = background.shape[1:]
    ix = np.clip(np.round(x).astype(np.int64), 0, w - 1)
    iy = np.clip(np.round(y).astype(np.int64), 0, h - 1)
    ts = np.zeros(n)
    for c, opt in enumerate(optics):
        r68 = np.hypot(opt.psf.containment_radius(0.68), extension)
        aperture_pix = np.pi * (r68 / scale) ** 2
        b = np.maximum(background[c, iy, ix] * aperture_pix, MIN_APERTURE_BACKGROUND)
        s = 0.68 * counts[:, c]
        ts += 2.0 * ((s + b) * np.log1p(s / b) - s)
    return np.sqrt(np.clip(ts, 0.0, None))
