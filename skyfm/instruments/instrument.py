"""Instruments are data: a YAML file describes a telescope, this module reads and checks it.

A YAML file (see ``configs/instruments/*.yaml`` for five complete examples) has these keys:

``name``          unique name, used on the command line (``--instrument fermi-lat``).
``description``   one line for humans.
``kind``          ``counts`` (Poisson photon counts cubes: Fermi-LAT, CTAO) or ``ccd`` (calibrated CCD images).
``fits``          ``telescop`` / ``instrume``: header values that identify the instrument's files.
``frame``         ``galactic`` or ``icrs``: the sky frame of simulated patches.
``projection``    WCS projection code of simulated patches (``CAR``, ``TAN``).
``pixel_scale``   a quantity, e.g. ``0.1 deg`` or ``0.56 arcsec``.
``patch_size``    pixels, one number (square) or ``[height, width]``.
``bands``         a list; each band has ``name``, ``energy: [lo, hi]`` or ``wavelength: [lo, hi]`` (quantities),
                  ``psf`` (``model``: gaussian | moffat | king, with ``fwhm`` or ``r68``, ``beta`` for Moffat,
                  ``gamma`` for King; ``fwhm`` may be a range ``[lo, hi]`` to be drawn per image), and for
                  ``counts`` an ``exposure`` (``cm2 s``), for ``ccd`` a ``zeropoint`` (AB mag of a source giving
                  1 e-/s), ``sky`` (AB mag/arcsec^2) and ``exposure_time``.
``noise``         ``counts``: ``{model: poisson}``; ``ccd``: ``{model: ccd, gain: e-/ADU, read_noise: e-,
                  saturation: ADU}``.
``background``    instrument-specific background parameters, read by the simulators (documented in each YAML).
``contaminants``  ``ccd`` only: rates of cosmic rays, satellite trails, hot and bad pixels, bleed trails.
``scaling``       how images are scaled for the networks: ``{method: log1p | anscombe | asinh | counts-asinh[-mesh|-model]}``.
``simulation``    optional parameters of the simulators (populations, densities, bands per image), documented
                  in :mod:`skyfm.data.simulate`.

Every problem is reported as a :class:`~skyfm.errors.SkyfmError` that names the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np

from skyfm.errors import SkyfmError
from skyfm.instruments.psf import PSF
from skyfm.utils import read_yaml

KINDS = ("counts", "ccd")
SCALINGS = ("log1p", "anscombe", "asinh", "counts-asinh", "counts-asinh-mesh", "counts-asinh-model")
PSF_MODELS = ("gaussian", "moffat", "king")


def builtin_config_dir() -> Path:
    """The folder of the instrument YAML files that ship with skyfm."""
    return Path(str(resources.files("skyfm") / "configs" / "instruments"))


# ----------------------------------------------------------------------------------------------------------------
# Small parsing helpers: each raises a SkyfmError naming the file and the key.
# ----------------------------------------------------------------------------------------------------------------
class _Where:
    """Remembers which file and key is being read, for error messages."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> SkyfmError:
        return SkyfmError(f"{self.source}: '{key}' {problem}")

    def quantity(self, value: Any, key: str, physical_type: str | tuple[str, ...]) -> u.Quantity:
        if value is None:
            raise self.fail(key, "is missing")
        try:
            q = u.Quantity(value)
        except (TypeError, ValueError):
            raise self.fail(key, f"should be a quantity with units (like '0.1 deg'), got {value!r}") from None
        types = (physical_type,) if isinstance(physical_type, str) else physical_type
        if q.unit.physical_type not in types:
            raise self.fail(key, f"should be a {' or '.join(types)}, got {value!r}")
        if not np.isfinite(q.value).all() or (q.value <= 0).any():
            raise self.fail(key, f"should be positive and finite, got {value!r}")
        return q

    def number(self, value: Any, key: str, positive: bool = True) -> float:
        if value is None:
            raise self.fail(key, "is missing")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise self.fail(key, f"should be a number, got {value!r}") from None
        if not np.isfinite(x) or (positive and x <= 0):
            raise self.fail(key, f"should be a {'positive ' if positive else ''}finite number, got {value!r}")
        return x

    def range_(self, value: Any, key: str, physical_type: str | tuple[str, ...]) -> tuple[u.Quantity, u.Quantity]:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise self.fail(key, f"should be a two-element list [low, high], got {value!r}")
        lo, hi = (self.quantity(v, key, physical_type) for v in value)
        if not lo < hi:
            raise self.fail(key, f"should have low < high, got {value!r}")
        return lo, hi


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """One energy bin or filter of an instrument.

    Attributes:
        name: short name (``W1``, ``q``, ``0.3-0.85 GeV``).
        energy: (low, high) photon energy, for gamma-ray instruments; else None.
        wavelength: (low, high) wavelength, for optical/IR; else None.
        psf_spec: the ``psf`` mapping from the YAML (kept to draw a seeing per image when ``fwhm`` is a range).
        exposure: exposure (cm2 s) for counts instruments.
        zeropoint: AB magnitude of a source that gives 1 e-/s (ccd).
        sky: sky brightness, AB mag / arcsec^2 (ccd).
        exposure_time: seconds (ccd).
        nominal_psf_spec: where an observation's own PSF replaced the YAML's (:meth:`Instrument.with_psfs`), the
            YAML's; else None.
    """

    name: str
    psf_spec: dict
    energy: tuple[u.Quantity, u.Quantity] | None = None
    wavelength: tuple[u.Quantity, u.Quantity] | None = None
    exposure: float | None = None
    zeropoint: float | None = None
    sky: float | None = None
    exposure_time: float | None = None
    nominal_psf_spec: dict | None = None

    @property
    def psf(self) -> PSF:
        """The nominal PSF (the middle of the range when the YAML gives a seeing range)."""
        return psf_from_spec(self.psf_spec)

    @property
    def psf_breadth(self) -> float:
        """This band's PSF r68 over the instrument YAML's (1 unless an observation's own PSF replaced it)."""
        if self.nominal_psf_spec is None:
            return 1.0
        return self.psf.containment_radius() / psf_from_spec(self.nominal_psf_spec).containment_radius()

    def psf_with_fwhm(self, fwhm_deg: float, beta: float | None = None) -> PSF:
        """This band's PSF family with another FWHM (a night's seeing) and, for a Moffat PSF, another ``beta``
        (the weight of its wings: a night's atmosphere and optics)."""
        spec = dict(self.psf_spec, fwhm=f"{fwhm_deg} deg")
        spec.pop("r68", None)
        if beta is not None:
            if str(spec.get("model", "")).lower() != "moffat":
                raise SkyfmError(f"band {self.name} has a {spec.get('model')} PSF; only a Moffat PSF takes a beta")
            if not np.isfinite(beta) or beta <= 1.0:
                raise SkyfmError(f"a Moffat PSF needs beta > 1, got {beta!r}")
            spec["beta"] = float(beta)
        return psf_from_spec(spec)

    def fwhm_range_deg(self) -> tuple[float, float]:
        """The range of FWHM (deg) images of this band are drawn with; (f, f) for a fixed PSF."""
        fwhm = self.psf_spec.get("fwhm")
        if isinstance(fwhm, (list, tuple)):
            lo, hi = (u.Quantity(v).to_value(u.deg) for v in fwhm)
            return lo, hi
        f = self.psf.fwhm_deg
        return f, f

    @property
    def log10_wavelength_m(self) -> float:
        """log10 of the band's central wavelength in metres: one axis from TeV photons to the far infrared.

        Energies convert with lambda = h c / E; the centre is the geometric mean of the edges.
        """
        lo, hi = self.energy if self.energy is not None else self.wavelength
        lo_m, hi_m = (q.to_value(u.m, equivalencies=u.spectral()) for q in (lo, hi))
        return float(0.5 * (np.log10(lo_m) + np.log10(hi_m)))

    def edges_label(self) -> str:
        lo, hi = self.energy if self.energy is not None else self.wavelength
        return f"{lo.value:g}-{hi.to_value(lo.unit):g} {lo.unit}"


def psf_spec_of(psf: PSF) -> dict:
    """The YAML ``psf`` mapping of a :class:`PSF` (:func:`psf_from_spec` reads it back)."""
    if psf.model == "gaussian":
        return {"model": "gaussian", "fwhm": f"{psf.fwhm_deg!r} deg"}
    return {"model": "moffat", "fwhm": f"{psf.fwhm_deg!r} deg", "beta": float(psf.beta)}


def psf_from_spec(spec: dict, where: _Where | None = None, key: str = "psf") -> PSF:
    """Build a :class:`PSF` from a YAML ``psf`` mapping, e.g. ``{model: king, r68: 0.8 deg, gamma: 2.2}``."""
    where = where or _Where("psf")
    if not isinstance(spec, dict):
        raise where.fail(key, f"should be a mapping like {{model: gaussian, fwhm: 2 arcsec}}, got {spec!r}")
    model = spec.get("model")
    if model not in PSF_MODELS:
        raise where.fail(f"{key}.model", f"should be one of {', '.join(PSF_MODELS)}, got {model!r}")
    sizes = {}
    for name in ("fwhm", "r68"):
        if name in spec:
            value = spec[name]
            if isinstance(value, (list, tuple)):  # a seeing range: the nominal PSF is its middle
                lo, hi = where.range_(value, f"{key}.{name}", "angle")
                sizes[name] = float(0.5 * (lo + hi).to_value(u.deg))
            else:
                sizes[name] = float(where.quantity(value, f"{key}.{name}", "angle").to_value(u.deg))
    if len(sizes) != 1:
        raise where.fail(key, "needs exactly one of 'fwhm' or 'r68'")
    kw = {f"{k}_deg": v for k, v in sizes.items()}
    if model == "gaussian":
        return PSF.gaussian(**kw)
    if model == "moffat":
        return PSF.moffat(beta=where.number(spec.get("beta"), f"{key}.beta"), **kw)
    gamma = where.number(spec.get("gamma"), f"{key}.gamma")
    if "fwhm_deg" in kw:
        return PSF.moffat(beta=gamma, **kw)
    return PSF.king(gamma=gamma, r68_deg=kw["r68_deg"])


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instrument:
    """A telescope and its camera, as read from one YAML file. See the module docstring for the keys."""

    name: str
    kind: str
    bands: tuple[Band, ...]
    pixel_scale: u.Quantity
    patch_size: tuple[int, int]
    description: str = ""
    frame: str = "icrs"
    projection: str = "TAN"
    fits_ids: dict = field(default_factory=dict)
    noise: dict = field(default_factory=dict)
    background: dict = field(default_factory=dict)
    contaminants: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=lambda: {"method": "asinh"})
    simulation: dict = field(default_factory=dict)
    source: str = ""

    @property
    def pixel_scale_deg(self) -> float:
        return float(self.pixel_scale.to_value(u.deg))

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def is_counts(self) -> bool:
        return self.kind == "counts"

    def band(self, name_or_index: str | int) -> Band:
        """A band by name (case-insensitive) or index, with a clear error listing the choices."""
        if isinstance(name_or_index, int):
            if not 0 <= name_or_index < len(self.bands):
                raise SkyfmError(f"{self.name} has {len(self.bands)} bands; band index {name_or_index} is out of range")
            return self.bands[name_or_index]
        for b in self.bands:
            if b.name.lower() == str(name_or_index).lower():
                return b
        raise SkyfmError(
            f"{self.name} has no band '{name_or_index}'; its bands are {', '.join(b.name for b in self.bands)}"
        )

    def band_index(self, name: str) -> int:
        return self.bands.index(self.band(name))

    def psf_fwhm_pix(self, band: int = 0) -> float:
        return self.bands[band].psf.fwhm_deg / self.pixel_scale_deg

    def with_psfs(self, psfs: dict | None) -> "Instrument":
        """This instrument with other PSFs for some of its bands (``{band name: PSF}``; e.g. an observation's own,
        :func:`skyfm.catalog.psf_file.band_psfs`); None or {}: itself."""
        if not psfs:
            return self
        wanted = {self.band(name).name: psf for name, psf in psfs.items()}
        # a band given its own PSF stays as it is: the YAML's spec, not one rebuilt from it (rounding would differ)
        bands = tuple(replace(b, psf_spec=psf_spec_of(wanted[b.name]),
                              nominal_psf_spec=b.nominal_psf_spec or b.psf_spec)
                      if b.name in wanted and wanted[b.name] != b.psf else b for b in self.bands)
        return replace(self, bands=bands)

    def __repr__(self) -> str:
        return (
            f"Instrument({self.name!r}, kind={self.kind!r}, bands={[b.name for b in self.bands]}, "
            f"pixel_scale={self.pixel_scale}, patch_size={self.patch_size})"
        )


def _parse_band(raw: Any, i: int, kind: str, where: _Where) -> Band:
    key = f"bands[{i}]"
    if not isinstance(raw, dict):
        raise where.fail(key, f"should be a mapping, got {raw!r}")
    name = str(raw.get("name", "")).strip()
    if not name:
        raise where.fail(f"{key}.name", "is missing")
    energy = wavelength = None
    if ("energy" in raw) == ("wavelength" in raw):
        raise where.fail(key, "needs exactly one of 'energy: [lo, hi]' or 'wavelength: [lo, hi]'")
    if "energy" in raw:
        energy = where.range_(raw["energy"], f"{key}.energy", "energy")
    else:
        wavelength = where.range_(raw["wavelength"], f"{key}.wavelength", "length")
    psf_spec = raw.get("psf")
    psf_from_spec(psf_spec, where, f"{key}.psf")  # validate now, build lazily
    extra: dict[str, float] = {}
    if kind == "counts":
        extra["exposure"] = _exposure(raw, key, where)
    else:
        extra["zeropoint"] = where.number(raw.get("zeropoint"), f"{key}.zeropoint")
        extra["sky"] = where.number(raw.get("sky"), f"{key}.sky")
        extra["exposure_time"] = float(where.quantity(raw.get("exposure_time"), f"{key}.exposure_time",
                                                      "time").to_value(u.s))
    return Band(name=name, psf_spec=dict(psf_spec), energy=energy, wavelength=wavelength, **extra)


def _exposure(raw: dict, key: str, where: _Where) -> float:
    value = raw.get("exposure")
    try:
        exposure = float(u.Quantity(value).to_value(u.cm**2 * u.s))
    except (TypeError, ValueError, u.UnitConversionError):
        raise where.fail(f"{key}.exposure", f"should be an exposure like '3e11 cm2 s', got {value!r}") from None
    if not exposure > 0:
        raise where.fail(f"{key}.exposure", f"should be positive, got {value!r}")
    return exposure


def parse_instrument(raw: Any, source: str = "<instrument>") -> Instrument:
    """Check a parsed YAML mapping and build the :class:`Instrument`."""
    where = _Where(source)
    if not isinstance(raw, dict):
        raise SkyfmError(f"{source}: an instrument file should be a YAML mapping of keys, got {type(raw).__name__}")
    for key in ("name", "kind", "pixel_scale", "bands"):
        if key not in raw:
            raise where.fail(key, "is missing")
    kind = raw["kind"]
    if kind not in KINDS:
        raise where.fail("kind", f"should be one of {', '.join(KINDS)}, got {kind!r}")
    pixel_scale = where.quantity(raw["pixel_scale"], "pixel_scale", "angle")
    size = raw.get("patch_size", 256)
    size = (size, size) if isinstance(size, int) else size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s >= 8 for s in size)):
        raise where.fail("patch_size", f"should be an integer >= 8 or [height, width], got {raw.get('patch_size')!r}")
    bands_raw = raw["bands"]
    if not isinstance(bands_raw, list) or not bands_raw:
        raise where.fail("bands", "should be a non-empty list")
    bands = tuple(_parse_band(b, i, kind, where) for i, b in enumerate(bands_raw))
    if len({b.name.lower() for b in bands}) != len(bands):
        raise where.fail("bands", "has two bands with the same name")
    scaling = raw.get("scaling", {"method": "log1p" if kind == "counts" else "asinh"})
    if not isinstance(scaling, dict) or scaling.get("method") not in SCALINGS:
        raise where.fail("scaling.method", f"should be one of {', '.join(SCALINGS)}, got {scaling!r}")
    noise = raw.get("noise", {"model": "poisson" if kind == "counts" else "ccd"})
    if kind == "ccd":
        for key in ("gain", "read_noise", "saturation"):
            where.number((noise or {}).get(key), f"noise.{key}", positive=key != "read_noise")
    frame = raw.get("frame", "galactic" if kind == "counts" else "icrs")
    if frame not in ("galactic", "icrs"):
        raise where.fail("frame", f"should be galactic or icrs, got {frame!r}")
    fits_ids = raw.get("fits", {}) or {}
    fits_ids = {k: [str(v).upper() for v in (vals if isinstance(vals, list) else [vals])] for k, vals in fits_ids.items()}
    return Instrument(
        name=str(raw["name"]),
        kind=kind,
        bands=bands,
        pixel_scale=pixel_scale,
        patch_size=(int(size[0]), int(size[1])),
        description=str(raw.get("description", "")),
        frame=frame,
        projection=str(raw.get("projection", "CAR" if kind == "counts" else "TAN")).upper(),
        fits_ids=fits_ids,
        noise=dict(noise or {}),
        background=dict(raw.get("background") or {}),
        contaminants=dict(raw.get("contaminants") or {}),
        scaling=dict(scaling),
        simulation=dict(raw.get("simulation") or {}),
        source=source,
    )


def read_instrument_file(path: str | Path) -> Instrument:
    path = Path(path)
    return parse_instrument(read_yaml(path, "instrument file"), str(path))


@lru_cache(maxsize=None)
def _builtin(name: str) -> Instrument:
    return read_instrument_file(builtin_config_dir() / f"{name}.yaml")


def list_instruments() -> list[str]:
    """Names of the instruments that ship with skyfm."""
    return sorted(p.stem for p in builtin_config_dir().glob("*.yaml"))


def load_instrument(name_or_path: str | Path | Instrument) -> Instrument:
    """An instrument by built-in name (``fermi-lat``), alias, or path to a YAML file."""
    if isinstance(name_or_path, Instrument):
        return name_or_path
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return read_instrument_file(text)
    key = text.lower()
    if key in list_instruments():
        return _builtin(key)
    for name in list_instruments():
        if key in (a.lower() for a in _builtin(name).fits_ids.get("aliases", [])):
            return _builtin(name)
    raise SkyfmError(f"unknown instrument '{text}'; choose one of {', '.join(list_instruments())} or give a YAML file")


def instrument_from_header(header) -> Instrument | None:
    """The built-in instrument whose TELESCOP / INSTRUME values match a FITS header, or None."""
    telescop = str(header.get("TELESCOP", "")).strip().upper()
    instrume = str(header.get("INSTRUME", "")).strip().upper()
    if "SKYFMINS" in header:  # written by skyfm's own simulators
        try:
            return load_instrument(header["SKYFMINS"])
        except SkyfmError:
            pass
    for name in list_instruments():
        inst = _builtin(name)
        tel_ok = telescop and telescop in inst.fits_ids.get("telescop", [])
        ins_ids = inst.fits_ids.get("instrume", [])
        if tel_ok and (not ins_ids or not instrume or instrume in ins_ids):
            return inst
    return None
