"""Detections -> a catalog table with the columns, units and descriptions of DESIGN.md.

:func:`build_catalog` is the one place where a list of detections becomes an :class:`astropy.table.QTable`, so
that every producer (the skyfm detector, the baselines, the likelihood fit) writes the same columns:

==============  =========================================================================================
``x``, ``y``    pixel position, 0-based, centre of the first pixel at (0, 0); x = column, y = row [pix]
``glon/glat``   Galactic coordinates [deg] when the frame is galactic (gamma-ray instruments), then also
``ra/dec``      ICRS [deg]; for icrs frames only ``ra``, ``dec``. Present only when a WCS is given.
``pos_err``     1-sigma position uncertainty per axis (circular) [deg with a WCS, else pix]
``flux``        total flux [ct for counts instruments, adu for CCDs, dimensionless when unknown]
``flux_err``    1-sigma uncertainty of ``flux``
``score``       detection score: a probability in [0, 1] (skyfm) or a significance (SNR, sqrt(TS)) for
                baselines; ``meta['score_kind']`` says which
``class``       most probable class name; ``class_prob`` (N, K) probabilities with ``meta['class_names']``
``extension``   68% containment radius of the source shape before the PSF [deg]
==============  =========================================================================================

Columns that a producer does not know are left out rather than filled with placeholders.
"""

from __future__ import annotations

import warnings
from typing import Any

import astropy.units as u
import numpy as np
from astropy.table import QTable
from astropy.wcs import WCS

from skyfm.errors import SkyfmError

DESCRIPTIONS = {
    "x": "Pixel column of the source centre (0-based; the centre of the first pixel is 0)",
    "y": "Pixel row of the source centre (0-based; the centre of the first pixel is 0)",
    "glon": "Galactic longitude of the source centre",
    "glat": "Galactic latitude of the source centre",
    "ra": "Right ascension (ICRS) of the source centre",
    "dec": "Declination (ICRS) of the source centre",
    "pos_err": "1-sigma position uncertainty along each axis (circular approximation)",
    "flux": "Total flux of the source (counts for counts cubes, ADU for CCD images), all bands",
    "flux_err": "1-sigma uncertainty of flux",
    "score": "Detection score: probability in [0, 1] or significance (SNR, sqrt(TS)); see meta score_kind",
    "class": "Most probable class",
    "class_prob": "Class probabilities, one per entry of meta class_names (CCD rows with a Kron aperture and "
                  "counts rows the likelihood fit measured: calibrated on their morphology or spectrum)",
    "extension": "68% containment radius of the source shape before the PSF",
    "flux_band": "Flux per band (counts or ADU), one per band of the image",
    "flux_band_err": "1-sigma uncertainty of flux_band",
    "ts": "Test statistic 2 (lnL(source) - lnL(no source)) of the Poisson likelihood",
    "assoc_name": "Name of the associated reference-catalog source ('' when none)",
    "assoc_sep": "Separation from the associated reference source",
}


def _frame_of(instrument, wcs: WCS | None) -> str | None:
    """'galactic' or 'icrs' (the instrument's frame, else the WCS's), or None without a WCS."""
    if wcs is None:
        return None
    if instrument is not None:
        from skyfm.instruments import load_instrument

        return load_instrument(instrument).frame
    ctype = str(wcs.wcs.ctype[0]).upper()
    return "galactic" if ctype.startswith("GLON") else "icrs"


FLUX_LIKE_COLUMNS = ("flux_band", "flux_band_err", "flux_confusion", "flux_blend", "flux_kron",
                     "flux_kron_err")  # flux units


def flux_unit(instrument) -> u.UnitBase:
    """ct for counts instruments, adu for CCDs, dimensionless when the instrument is unknown."""
    if instrument is None:
        return u.dimensionless_unscaled
    from skyfm.instruments import load_instrument

    return u.ct if load_instrument(instrument).is_counts else u.adu


def wcs_pixel_scale_deg(wcs: WCS) -> float:
    """Mean pixel side (deg) of a celestial WCS."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)))


def pixel_to_world(x, y, wcs: WCS, frame: str) -> dict[str, np.ndarray]:
    """World coordinates (deg) of 0-based pixel positions: glon/glat (+ ra/dec) for galactic, ra/dec for icrs."""
    from astropy.wcs.utils import pixel_to_skycoord

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) == 0:
        keys = ("glon", "glat", "ra", "dec") if frame == "galactic" else ("ra", "dec")
        return {k: np.zeros(0) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = pixel_to_skycoord(x, y, wcs.celestial, origin=0)
    out = {}
    if frame == "galactic":
        g = c.galactic
        out["glon"] = np.asarray(g.l.deg) % 360.0
        out["glat"] = np.asarray(g.b.deg)
    i = c.icrs
    out["ra"] = np.asarray(i.ra.deg) % 360.0
    out["dec"] = np.asarray(i.dec.deg)
    return out


def _as_array(name: str, value, n: int, unit=None) -> Any:
    if isinstance(value, u.Quantity):
        arr = value
        if unit is not None and arr.unit.is_equivalent(unit):
            arr = arr.to(unit)
        vals = arr.value
    else:
        vals = np.asarray(value)
        arr = vals if unit is None else u.Quantity(vals.astype(np.float64), unit)
    if np.ndim(vals) == 0 or len(vals) != n:
        raise SkyfmError(f"catalog column '{name}' has {np.size(vals)} values for {n} sources")
    return arr


def build_catalog(x, y, *, pos_err_pix=None, flux=None, flux_err=None, score=None, class_names=None,
                  class_prob=None, extension_deg=None, wcs: WCS | None = None, instrument=None,
                  extra: dict | None = None, score_kind: str | None = None, meta: dict | None = None) -> QTable:
    """A catalog :class:`~astropy.table.QTable` with DESIGN.md's columns (module docstring), units and
    descriptions.

    Args:
        x, y: pixel positions (0-based), (N,).
        pos_err_pix: 1-sigma position error per axis, pixels; written in deg when ``wcs`` is given.
        flux, flux_err: total flux and its 1-sigma error, in counts (counts instruments) or ADU (CCDs). Plain
            numbers are given the instrument's unit; Quantities keep theirs.
        score: detection probability or significance; say which with ``score_kind`` (``'probability'``,
            ``'snr'``, ``'sqrt_ts'``), stored in ``meta['score_kind']``.
        class_names, class_prob: K class names and (N, K) probabilities; ``class`` is the argmax.
        extension_deg: 68% radius of the source shape before the PSF, deg.
        wcs: celestial WCS of the pixel grid; adds sky coordinates in the instrument's frame (``glon``/``glat``
            and ``ra``/``dec`` for galactic instruments, ``ra``/``dec`` for icrs), or the WCS's own frame
            when no instrument is given.
        instrument: an Instrument or its name: gives the frame, the flux unit and ``meta['instrument']``.
        extra: more columns, ``{name: values}`` or ``{name: (values, description)}``; descriptions of the
            well-known names (``flux_band``, ``ts``, ...) are filled in.
        meta: more table metadata.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n = len(x)
    if len(y) != n:
        raise SkyfmError(f"catalog needs as many y as x positions, got {n} and {len(y)}")
    funit = flux_unit(instrument)
    t = QTable()
    t["x"] = u.Quantity(x, u.pix)
    t["y"] = u.Quantity(y, u.pix)
    frame = _frame_of(instrument, wcs)
    scale_deg = None
    if wcs is not None:
        for k, v in pixel_to_world(x, y, wcs, frame).items():
            t[k] = u.Quantity(v, u.deg)
        scale_deg = wcs_pixel_scale_deg(wcs)
    if pos_err_pix is not None:
        pe = np.asarray(_as_array("pos_err", pos_err_pix, n), dtype=np.float64)
        if isinstance(pos_err_pix, u.Quantity) and pos_err_pix.unit.physical_type == "angle":
            t["pos_err"] = pos_err_pix.to(u.deg)
        elif scale_deg is not None:
            t["pos_err"] = u.Quantity(pe * scale_deg, u.deg)
        else:
            t["pos_err"] = u.Quantity(pe, u.pix)
    if flux is not None:
        t["flux"] = _as_array("flux", flux, n, funit)
    if flux_err is not None:
        t["flux_err"] = _as_array("flux_err", flux_err, n, funit)
    if score is not None:
        t["score"] = np.asarray(_as_array("score", score, n), dtype=np.float64)
    if class_prob is not None:
        prob = np.asarray(class_prob, dtype=np.float64)
        if prob.ndim != 2 or prob.shape[0] != n:
            raise SkyfmError(f"class_prob should be (N, K) with N = {n}, got shape {prob.shape}")
        names = list(class_names) if class_names is not None else [f"class{k}" for k in range(prob.shape[1])]
        if len(names) != prob.shape[1]:
            raise SkyfmError(f"{len(names)} class names for {prob.shape[1]} class probabilities")
        width = max([len(s) for s in names] + [1])
        t["class"] = np.asarray([names[k] for k in prob.argmax(axis=1)] if n else [], dtype=f"U{width}")
        t["class_prob"] = prob
        t.meta["class_names"] = names
    if extension_deg is not None:
        t["extension"] = _as_array("extension", extension_deg, n, u.deg)
    for name, value in (extra or {}).items():
        desc = None
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
            value, desc = value
        if name in FLUX_LIKE_COLUMNS and not isinstance(value, u.Quantity):
            value = u.Quantity(np.asarray(value, dtype=np.float64), funit)
        arr = value if isinstance(value, u.Quantity) else np.asarray(value)
        if len(arr) != n:
            raise SkyfmError(f"catalog column '{name}' has {len(arr)} values for {n} sources")
        t[name] = arr
        if desc is not None:
            t[name].info.description = desc
    for name in t.colnames:
        if not t[name].info.description:
            t[name].info.description = DESCRIPTIONS.get(name, "")
    if instrument is not None:
        from skyfm.instruments import load_instrument

        t.meta["instrument"] = load_instrument(instrument).name
    if frame is not None:
        t.meta["frame"] = frame
    if score_kind is not None:
        t.meta["score_kind"] = score_kind
    t.meta.update(meta or {})
    return t


def empty_catalog(**kwargs) -> QTable:
    """A zero-row catalog with the same columns :func:`build_catalog` would give for these keyword choices."""
    return build_catalog(np.zeros(0), np.zeros(0), **kwargs)
