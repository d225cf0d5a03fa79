"""PSF files for counts cubes: the point-spread function an observation really had, in place of the YAML's.

The instrument YAML gives each energy band one typical PSF (for Fermi-LAT a King function per bin, of all event
types together). A real analysis selects its events (Fermi-LAT's PSF3 quartile is about twice as sharp at 1 GeV as
all event types together, its PSF0 twice as broad), and the PSF changes with the incidence angles of the
observation; the LAT's tools therefore compute it for the data at hand, and an IACT's instrument response gives it
per energy and field-of-view offset. The Poisson likelihood fit and the TS map measure positions, fluxes and TS with
the PSF: a PSF too broad for the data spreads each source's counts and lowers its TS; one too sharp misplaces them.

:func:`read_psf_file` reads the three layouts these tools write:

* ``gtpsf`` (Fermi ScienceTools; gammapy's ``EnergyDependentTablePSF``): a ``PSF`` table with columns ``Energy``
  (MeV), ``Exposure`` (cm2 s) and ``Psf`` (sr^-1, one value per angle of the ``THETA`` table's ``Theta``, deg);
* ``psf_table`` (the gamma-astro-data-formats IRF of IACTs such as CTAO): one row with ``ENERG_LO`` / ``ENERG_HI``
  (TeV), ``THETA_LO`` / ``THETA_HI`` (field-of-view offset, deg), ``RAD_LO`` / ``RAD_HI`` (deg) and ``RPSF``
  (sr^-1); the offset nearest :data:`IACT_OFFSET_DEG` is taken;
* gammapy's ``PSFMap`` (``PSFMap.write``, and the ``PSF`` HDU of a ``MapDataset`` file): an image of the PSF (sr^-1)
  over true energy, angle and sky position, its ``BANDSHDU`` table giving the ``RAD`` (deg) and ``ENERGY_TRUE``
  (TeV) axes; the sky positions are averaged, weighted by the ``PSF_EXPOSURE`` image where there is one (one PSF
  for the cube, as for the other layouts).

:func:`band_psfs` gives each band of a cube one radial profile, the file's profiles averaged over the band's
energies with the weights of the counts a power-law source of index 2 gives there (its exposure x E^-2, the
spectrum the likelihood fit assumes), and fits it with a King function (:func:`fit_king`), the form of the LAT's
own PSF and one that also takes an IACT's near-Gaussian core (large gamma): every PSF consumer of skyfm (the
likelihood fits, the TS map, the background model's convolution, the extension test) then uses it unchanged. The
fit's largest containment error is reported, and :data:`MAX_CONTAINMENT_ERROR` beyond it is a warning (a PSF the
King form cannot follow, such as a sum of very different event types).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the power law that weighs a band (the likelihood fit's) and the rounding allowed at its edges, as for exposures
from skyfm.catalog.exposure import ENERGY_TOLERANCE, SPECTRAL_INDEX, log_energy_samples, log_energy_weights
from skyfm.errors import SkyfmError

#: energies per band, uniform in log energy, at which the file's PSF is averaged
PSF_ENERGY_SAMPLES = 32
#: the field-of-view offset (deg) whose PSF an IACT ``psf_table`` gives: a survey's sources sit 0-2.5 deg from the
#: pointing, and a cube of many pointings sees them at all of these
IACT_OFFSET_DEG = 1.0
#: containment fractions at which the King function is fitted to a band's profile (equal weight in containment)
FIT_FRACTIONS = np.linspace(0.05, 0.97, 47)
#: the King fit's largest containment error beyond which :func:`band_psfs` warns
MAX_CONTAINMENT_ERROR = 0.03


@dataclass
class PSFTable:
    """A radial PSF tabulated in energy and angle.

    Attributes:
        energies_mev: (E,) energies (MeV), increasing.
        theta_deg: (T,) angles from the source (deg), increasing, from 0 or near it.
        density: (E, T) the PSF per steradian at each energy and angle (integrates to about 1 over the sphere).
        exposure: (E,) exposure or effective area at each energy (any unit: only ratios are used), or None.
        source: the file, for messages.
        layout: ``"gtpsf"``, ``"psf_table"`` (an IACT IRF's, read at :data:`IACT_OFFSET_DEG`) or ``"psfmap"``
            (gammapy's, averaged over the sky).
    """

    energies_mev: np.ndarray
    theta_deg: np.ndarray
    density: np.ndarray
    exposure: np.ndarray | None
    source: str
    layout: str = "gtpsf"


def read_psf_file(path) -> PSFTable:
    """Read a ``gtpsf`` or IACT ``psf_table`` file (module docstring). A file with neither, tables of the wrong
    shape, and negative or non-finite values are errors naming the file."""
    from skyfm.data.readers import open_fits

    name = Path(path).name
    with open_fits(path, memmap=False) as hdul:
        gtpsf, iact = _psf_tables(hdul)
        if gtpsf is not None:
            table = _read_gtpsf(hdul, gtpsf, _columns(gtpsf), name)
        elif iact is not None:
            table = _read_psf_table(iact, _columns(iact), name)
        elif (psf_map := _psf_map(hdul)) is not None:
            table = _read_psf_map(hdul, *psf_map, name)
        else:
            raise SkyfmError(f"PSF file {name}: no PSF table in it (gtpsf's PSF and THETA tables, an IRF's "
                             "psf_table with ENERG_LO, RAD_LO and RPSF columns, or gammapy's PSF map)")
    return _checked(table)


def _columns(hdu) -> dict:
    """{upper-case column name: the file's own spelling} of a table HDU."""
    return {c.name.upper(): c.name for c in hdu.columns}


def _psf_tables(hdul) -> tuple:
    """(the first gtpsf ``PSF`` table, the first IRF ``psf_table``) of an open FITS file, each None if absent."""
    from astropy.io import fits

    tables = [h for h in hdul if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
    gtpsf = next((h for h in tables if {"ENERGY", "PSF"} <= set(_columns(h))), None)
    iact = next((h for h in tables if {"ENERG_LO", "RAD_LO", "RPSF"} <= set(_columns(h))), None)
    return gtpsf, iact


def _psf_map(hdul) -> tuple | None:
    """(image HDU, its axes table) of gammapy's PSF map in an open FITS file (an image whose ``BANDSHDU`` table has
    ``RAD_MIN`` and ``ENERGY_TRUE_MIN`` columns; the HDU named ``PSF`` first), or None."""
    images = [h for h in hdul if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) >= 3
              and str(h.header.get("BANDSHDU", "")).strip()]
    for hdu in sorted(images, key=lambda h: h.name.upper() != "PSF"):
        bands = str(hdu.header["BANDSHDU"]).strip()
        if bands in hdul and hasattr(hdul[bands], "columns") and {"RAD_MIN", "ENERGY_TRUE_MIN"} <= set(
                _columns(hdul[bands])):
            return hdu, hdul[bands]
    return None


def only_psf(hdul) -> bool:
    """Whether an open FITS file is a PSF file and nothing else: a PSF table with no image, or gammapy's PSF map
    with no image but it and its exposure (a ``MapDataset`` file's counts make it an image file)."""
    images = {h.name.upper() for h in hdul if getattr(h, "is_image", False) and h.data is not None}
    psf_map = _psf_map(hdul)
    if psf_map is not None:
        return images <= {psf_map[0].name.upper(), f"{psf_map[0].name.upper()}_EXPOSURE"}
    return not images and any(t is not None for t in _psf_tables(hdul))


def describe_psf_file(path, instrument=None) -> list[str]:
    """``skyfm info``'s lines for a PSF file: its layout and ranges, and per band of ``instrument`` (default:
    Fermi-LAT for gtpsf's layout, CTAO for a psf_table) the King function ``--psf`` would use beside the YAML's."""
    from skyfm.instruments import load_instrument

    table = read_psf_file(path)
    e = table.energies_mev
    lat_like = table.layout == "gtpsf" or (table.layout == "psfmap" and e[0] < 1e4)  # a map from 10 GeV down: LAT's
    inst = load_instrument(instrument or ("fermi-lat" if lat_like else "ctao"))
    layout = {"gtpsf": "gtpsf", "psf_table": f"an IRF's psf_table, read at {IACT_OFFSET_DEG:g} deg off axis",
              "psfmap": "gammapy's PSF map, averaged over the sky"}[table.layout]
    lines = [f"file:        {path}",
             f"format:      PSF file ({layout})",
             f"energies:    {len(e)}, {e[0]:g}-{e[-1]:g} MeV; angles: {len(table.theta_deg)}, "
             f"{table.theta_deg[0]:g}-{table.theta_deg[-1]:g} deg",
             f"instrument:  {inst.name}" + ("" if instrument else " (the layout's usual one; --instrument chooses)"),
             "bands:       the King function skyfm detect --psf fits to each (the YAML's in brackets)"]
    for band in (b for b in inst.bands if b.energy is not None):
        lo, hi = (q.to_value("MeV") for q in band.energy)
        try:
            psf, err = fit_king(table.theta_deg, band_profile(table, lo, hi))
        except SkyfmError as exc:
            lines.append(f"  {band.name:<6} {band.edges_label():<22} {str(exc).split(': ', 1)[-1]}")  # not covered
            continue
        own = band.psf
        own_shape = f"{own.beta:.2f}" if own.model == "moffat" else "Gaussian"
        lines.append(f"  {band.name:<6} {band.edges_label():<22} r68 {psf.containment_radius():.4f} deg "
                     f"({own.containment_radius():.4f}), King gamma {psf.beta:.2f} ({own_shape}), containment "
                     f"error {100 * err:.1f}%" + (" (above 3%: a warning)" if err > MAX_CONTAINMENT_ERROR else ""))
    return lines


def _read_gtpsf(hdul, hdu, cols: dict, name: str) -> PSFTable:
    theta_hdu = next((h for h in hdul if hasattr(h, "columns") and "THETA" in {c.name.upper() for c in h.columns}),
                     None)
    if theta_hdu is None:
        raise SkyfmError(f"PSF file {name}: a gtpsf PSF table needs its THETA table (column Theta, deg)")
    theta_col = next(c.name for c in theta_hdu.columns if c.name.upper() == "THETA")
    theta = np.asarray(theta_hdu.data[theta_col], dtype=np.float64).ravel()
    theta = theta * _angle_factor(theta_hdu.columns[theta_col].unit, name)
    energies = np.asarray(hdu.data[cols["ENERGY"]], dtype=np.float64).ravel()
    energies = energies * _energy_factor(hdu.columns[cols["ENERGY"]].unit, "MeV", name)
    density = np.asarray(hdu.data[cols["PSF"]], dtype=np.float64).reshape(len(energies), -1)
    if density.shape[1] != len(theta):
        raise SkyfmError(f"PSF file {name}: each Psf row has {density.shape[1]} values, the THETA table "
                         f"{len(theta)} angles")
    exposure = (np.asarray(hdu.data[cols["EXPOSURE"]], dtype=np.float64).ravel() if "EXPOSURE" in cols else None)
    return PSFTable(energies, theta, density, exposure, name)


def _read_psf_table(hdu, cols: dict, name: str) -> PSFTable:
    def axis(key: str) -> np.ndarray:
        if key not in cols:
            raise SkyfmError(f"PSF file {name}: the psf_table has no {key} column")
        return np.asarray(hdu.data[cols[key]][0], dtype=np.float64).ravel()

    e_lo, e_hi = axis("ENERG_LO"), axis("ENERG_HI")
    factor = _energy_factor(hdu.columns[cols["ENERG_LO"]].unit, "TeV", name)
    energies = np.sqrt(e_lo * e_hi) * factor
    offsets = 0.5 * (axis("THETA_LO") + axis("THETA_HI"))
    rad = 0.5 * (axis("RAD_LO") + axis("RAD_HI")) * _angle_factor(hdu.columns[cols["RAD_LO"]].unit, name)
    rpsf = np.asarray(hdu.data[cols["RPSF"]][0], dtype=np.float64)
    sizes = {"energy": len(energies), "offset": len(offsets), "rad": len(rad)}
    order = _axis_order(rpsf.shape, sizes, name)  # which stored axis is which
    rpsf = np.transpose(rpsf, [order.index(k) for k in ("energy", "offset", "rad")])
    at = int(np.argmin(np.abs(offsets - IACT_OFFSET_DEG)))
    return PSFTable(energies, rad, rpsf[:, at, :], None, name, layout="psf_table")


def _read_psf_map(hdul, hdu, bands, name: str) -> PSFTable:
    cols = _columns(bands)

    def axis(key: str, default_unit: str, factor) -> tuple[np.ndarray, int]:  # (bin centres in deg / MeV, bins)
        lo = np.unique(np.asarray(bands.data[cols[f"{key}_MIN"]], dtype=np.float64))
        hi = np.unique(np.asarray(bands.data[cols[f"{key}_MAX"]], dtype=np.float64)) if f"{key}_MAX" in cols else None
        if hi is None or len(hi) != len(lo):
            raise SkyfmError(f"PSF file {name}: its {bands.name} table's {key}_MIN and {key}_MAX do not make one axis")
        unit = bands.columns[cols[f"{key}_MIN"]].unit or default_unit
        return 0.5 * (lo + hi) * factor(unit, name), len(lo)

    rad, n_rad = axis("RAD", "deg", _angle_factor)
    energies, n_energy = axis("ENERGY_TRUE", "TeV", lambda unit, nm: _energy_factor(unit, "TeV", nm))
    psf = np.asarray(hdu.data, dtype=np.float64)
    if psf.ndim != 4:
        raise SkyfmError(f"PSF file {name}: its {hdu.name} image should have 4 axes (energy, angle, and the sky's "
                         f"two), got shape {psf.shape}")
    first = str(bands.header.get("AXCOLS1", "RAD_MIN")).upper()  # FITS axis 3, numpy axis 1: gammapy puts rad first
    order = ("energy", "rad") if first.startswith("RAD") else ("rad", "energy")
    if psf.shape[:2] != tuple({"energy": n_energy, "rad": n_rad}[k] for k in order):
        raise SkyfmError(f"PSF file {name}: its {hdu.name} image has shape {psf.shape}, not its table's "
                         f"{n_energy} energies and {n_rad} angles")
    if order == ("rad", "energy"):
        psf = psf.transpose(1, 0, 2, 3)
    psf = psf.reshape(n_energy, n_rad, -1)  # (E, R, pixels)
    exposure_name = f"{hdu.name}_EXPOSURE"
    weights = None
    if exposure_name in hdul and getattr(hdul[exposure_name], "is_image", False):
        weights = np.asarray(hdul[exposure_name].data, dtype=np.float64).reshape(n_energy, -1)
        if weights.shape[1] != psf.shape[2]:
            raise SkyfmError(f"PSF file {name}: its {exposure_name} image is not on the PSF map's sky grid")
    covered = np.nan_to_num(psf).sum(axis=1) > 0  # (E, pixels): where the map holds a PSF
    w = covered * (1.0 if weights is None else np.clip(np.nan_to_num(weights), 0.0, None))
    if not (w.sum(axis=1) > 0).all():
        raise SkyfmError(f"PSF file {name}: at some energy no sky position of its PSF map has a PSF")
    density = np.einsum("erp,ep->er", np.nan_to_num(psf), w) / w.sum(axis=1)[:, None]
    exposure = None if weights is None else w.sum(axis=1) / np.maximum(covered.sum(axis=1), 1)
    return PSFTable(energies, rad, density, exposure, name, layout="psfmap")


def _axis_order(shape: tuple, sizes: dict, name: str) -> list[str]:
    """The names of ``shape``'s axes, matched by length; the recommended order (numpy: rad, offset, energy) where
    lengths alone cannot tell."""
    import itertools

    if len(shape) != 3:
        raise SkyfmError(f"PSF file {name}: RPSF should have 3 axes (energy, offset, radius), got shape {shape}")
    preferred = ("rad", "offset", "energy")
    matches = [p for p in itertools.permutations(preferred) if all(shape[i] == sizes[k] for i, k in enumerate(p))]
    if not matches:
        raise SkyfmError(f"PSF file {name}: RPSF has shape {shape}, not the lengths of its energy, offset and "
                         f"radius axes ({sizes['energy']}, {sizes['offset']}, {sizes['rad']})")
    return list(preferred if preferred in matches else matches[0])


def _energy_factor(unit, default: str, name: str) -> float:
    import astropy.units as u

    try:
        return float(u.Unit(str(unit).strip() or default).to(u.MeV))
    except (ValueError, u.UnitConversionError):
        raise SkyfmError(f"PSF file {name}: energy unit {unit!r} is not an energy") from None


def _angle_factor(unit, name: str) -> float:
    import astropy.units as u

    try:
        return float(u.Unit(str(unit or "").strip() or "deg").to(u.deg))
    except (ValueError, u.UnitConversionError):
        raise SkyfmError(f"PSF file {name}: angle unit {unit!r} is not an angle") from None


def _checked(table: PSFTable) -> PSFTable:
    name = table.source
    if len(table.energies_mev) < 1 or len(table.theta_deg) < 3:
        raise SkyfmError(f"PSF file {name}: needs at least one energy and three angles")
    for what, values in (("energies", table.energies_mev), ("angles", table.theta_deg), ("PSF values", table.density)):
        if not np.isfinite(values).all() or (values < 0).any():
            raise SkyfmError(f"PSF file {name}: its {what} hold NaN, infinite or negative values")
    if (np.diff(table.theta_deg) <= 0).any():
        raise SkyfmError(f"PSF file {name}: its angles do not increase")
    order = np.argsort(table.energies_mev)
    table.energies_mev, table.density = table.energies_mev[order], table.density[order]
    if table.exposure is not None:
        table.exposure = table.exposure[order]
    if (table.density.max(axis=1) <= 0).any():
        raise SkyfmError(f"PSF file {name}: the PSF is zero at every angle at some energy")
    return table


def containment(theta_deg: np.ndarray, density: np.ndarray) -> np.ndarray:
    """(T,) the fraction of a tabulated PSF within each angle, over the sphere (2 pi sin(theta) d theta), scaled
    to 1 at the last angle (a table that stops short of the wings is read as holding the whole PSF)."""
    theta = np.radians(theta_deg)
    ring = 2.0 * np.pi * np.sin(theta) * density
    inner = 2.0 * np.pi * (1.0 - np.cos(theta[0])) * density[0]  # the cap inside the first angle
    cum = inner + np.concatenate([[0.0], np.cumsum(0.5 * (ring[1:] + ring[:-1]) * np.diff(theta))])
    return cum / cum[-1]


def fit_king(theta_deg: np.ndarray, density: np.ndarray):
    """(PSF, largest containment error): the King function (:meth:`skyfm.instruments.PSF.king`) whose containment
    best follows the tabulated profile's at the fractions :data:`FIT_FRACTIONS`."""
    from scipy.optimize import least_squares

    from skyfm.instruments.psf import PSF

    frac = containment(theta_deg, density)
    keep = np.concatenate([[True], np.diff(frac) > 0])  # strictly increasing for the inverse
    radii = np.interp(FIT_FRACTIONS, frac[keep], theta_deg[keep])  # (F,) deg
    r68 = float(np.interp(0.68, frac[keep], theta_deg[keep]))

    def king(params):
        alpha, beta = np.exp(params[0]), 1.0 + np.exp(params[1])
        return PSF("moffat", float(alpha), float(beta))

    def residuals(params):
        return king(params).containment(radii) - FIT_FRACTIONS

    start = PSF.king(gamma=2.5, r68_deg=r68)
    fit = least_squares(residuals, [np.log(start.width_deg), np.log(start.beta - 1.0)],
                        bounds=([-np.inf, np.log(0.02)], [np.inf, np.log(200.0)]))
    psf = king(fit.x)
    return psf, float(np.max(np.abs(residuals(fit.x))))


def band_profile(table: PSFTable, lo_mev: float, hi_mev: float, index: float = SPECTRAL_INDEX) -> np.ndarray:
    """(T,) the file's PSF averaged over the band [lo, hi] MeV, weighted by the counts of a power law of
    ``index`` (exposure x E^-index per unit energy; the exposure 1 where the file has none), the PSF linear in
    log energy between the file's energies. A band outside the file's energies is an error; one that reaches
    beyond them takes the nearest energy's PSF there."""
    e = table.energies_mev
    if hi_mev < e[0] * (1 - ENERGY_TOLERANCE) or lo_mev > e[-1] * (1 + ENERGY_TOLERANCE):
        raise SkyfmError(f"PSF file {table.source}: it covers {e[0]:g}-{e[-1]:g} MeV, not the band "
                         f"{lo_mev:g}-{hi_mev:g} MeV")
    # the midpoints of equal steps in log energy: the band's own edges, where a file may change from one band's PSF
    # to the next, are never sampled; beyond the file's energies, its nearest energy's PSF
    logs, _ = log_energy_samples(lo_mev, hi_mev, PSF_ENERGY_SAMPLES)
    samples = np.exp(logs)
    at = log_energy_weights(e, np.clip(samples, e[0], e[-1]))  # (E, S)
    exposure = 1.0 if table.exposure is None else table.exposure @ at
    weights = exposure * samples ** (1.0 - index)  # E^-index dE = E^(1 - index) d ln E, the samples even in ln E
    if not np.sum(weights) > 0:
        raise SkyfmError(f"PSF file {table.source}: zero exposure over the band {lo_mev:g}-{hi_mev:g} MeV")
    return (at @ weights) @ table.density / weights.sum()


def band_psfs(path_or_table, bands, index: float = SPECTRAL_INDEX) -> tuple[dict, dict]:
    """({band name: PSF}, {band name: largest containment error}) for ``bands`` (the instrument's
    :class:`~skyfm.instruments.instrument.Band` objects, each with its energy range) from a PSF file (module
    docstring); a warning names the bands whose King fit misses the file's containment by more than
    :data:`MAX_CONTAINMENT_ERROR`."""
    table = path_or_table if isinstance(path_or_table, PSFTable) else read_psf_file(path_or_table)
    psfs, errors = {}, {}
    for band in bands:
        if band.energy is None:
            raise SkyfmError(f"a PSF file is for counts cubes' energy bands; band {band.name} has none")
        lo, hi = (q.to_value("MeV") for q in band.energy)
        psfs[band.name], errors[band.name] = fit_king(table.theta_deg, band_profile(table, lo, hi, index))
    poor = {k: v for k, v in errors.items() if v > MAX_CONTAINMENT_ERROR}
    if poor:
        warnings.warn(f"PSF file {table.source}: a King function follows its PSF only to within "
                      + ", ".join(f"{100 * v:.0f}% ({k})" for k, v in poor.items())
                      + " of the containment; the fits use that King function", stacklevel=2)
    return psfs, errors
