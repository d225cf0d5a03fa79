"""Write and read catalogs: FITS, ECSV or VOTable by extension, plus a DS9 region file beside each.

Every file is written to a temporary name and renamed (:func:`skyfm.utils.atomic_path`), so a crash never leaves a
half-written catalog. The region file ``<stem>.reg`` holds one circle per source, labelled with its row number and
score: radius the 1-sigma position error, or half the (sharpest band's) PSF FWHM when there is none (or it is smaller than a pixel,
which would be invisible), in sky coordinates when the catalog has them, else in image pixels (DS9's ``image``
frame is 1-based; the conversion is done here). Written with the ``regions`` package; catalogs of more than
2000 rows get the same text formatted in bulk (regions needs ~0.4 ms per row).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import QTable, Table

from skyfm.errors import SkyfmError
from skyfm.utils import atomic_path

FORMATS = {".fits": "fits", ".fit": "fits", ".fts": "fits", ".ecsv": "ascii.ecsv", ".vot": "votable",
           ".xml": "votable", ".csv": "ascii.csv"}
WRITE_SUFFIXES = (".fits", ".fit", ".ecsv", ".vot", ".xml")
FAST_REGIONS_ABOVE = 2000  # larger catalogs get the same DS9 text formatted in bulk (regions takes ~0.4 ms a row)


def catalog_format(path: str | Path, writing: bool = True) -> str:
    """The astropy format name for a catalog path, or a SkyfmError listing the supported extensions."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 and not writing:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    allowed = WRITE_SUFFIXES if writing else tuple(FORMATS)
    if suffix not in allowed:
        raise SkyfmError(f"{path}: catalog files end in {', '.join(allowed)}; got '{suffix or 'no extension'}'")
    return FORMATS[suffix]


def _fits_ready(table: QTable) -> QTable:
    """A copy whose metadata FITS can hold: lists (class_names) become one comma-separated string."""
    t = table.copy(copy_data=False)
    meta = {}
    for k, v in t.meta.items():
        if isinstance(v, (list, tuple)):
            meta[k] = ",".join(str(s) for s in v)
        elif isinstance(v, (str, int, float, bool, np.integer, np.floating)):
            meta[k] = v
    t.meta = meta
    return t


def _without_int8(table: QTable) -> QTable:
    """A copy with signed 8-bit integer columns (the ``fit`` column) made 16-bit: VOTable has no such type and
    FITS reads it back as booleans."""
    t = table.copy(copy_data=False)
    for name in t.colnames:
        if getattr(t[name], "dtype", None) == np.int8:
            t[name] = t[name].astype(np.int16)
    return t


def write_catalog(table: QTable | Table, path: str | Path, *, regions: bool = True, psf_fwhm_deg: float | None = None,
                  psf_fwhm_pix: float | None = None) -> Path:
    """Write ``table`` to ``path`` (``.fits``, ``.ecsv``, ``.vot`` / ``.xml``), atomically, and ``<stem>.reg``.

    Args:
        regions: also write the DS9 region file beside the catalog.
        psf_fwhm_deg, psf_fwhm_pix: PSF size for region circles of sources without a position error; by default
            taken from ``table.meta['instrument']`` (its first band), else 3 pixels.
    Returns:
        The catalog path.
    """
    path = Path(path)
    fmt = catalog_format(path)
    if path.is_dir():
        raise SkyfmError(f"{path} is a folder; give a catalog file name")
    out = _fits_ready(_without_int8(table)) if fmt == "fits" else _without_int8(table) if fmt == "votable" else table
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # VOUnit / HIERARCH chatter
            out.write(tmp, format=fmt, overwrite=True)
    if regions:
        write_regions(table, path.with_suffix(".reg"), psf_fwhm_deg=psf_fwhm_deg, psf_fwhm_pix=psf_fwhm_pix)
    return path


def _region_radius(table, psf_fwhm_deg, psf_fwhm_pix) -> tuple[np.ndarray, str]:
    """Circle radii and their unit ('deg' or 'pix')."""
    n = len(table)
    sky = "ra" in table.colnames or "glon" in table.colnames
    scale = None
    if psf_fwhm_deg is None and psf_fwhm_pix is None and table.meta.get("instrument"):
        try:
            from skyfm.instruments import load_instrument

            inst = load_instrument(table.meta["instrument"])
            psf_fwhm_deg = min(b.psf.fwhm_deg for b in inst.bands)  # the sharpest band
            scale = inst.pixel_scale_deg
        except SkyfmError:
            pass
    if sky:
        floor = psf_fwhm_deg / 2 if psf_fwhm_deg is not None else (
            psf_fwhm_pix * scale / 2 if (psf_fwhm_pix and scale) else None)
        if "pos_err" in table.colnames:
            pe = u.Quantity(table["pos_err"])
            if pe.unit.physical_type == "angle":
                r = pe.to_value(u.deg)
                one_pix = scale or 0.0
                bad = ~np.isfinite(r) | (r < one_pix)
                if floor is not None:
                    r = np.where(bad, floor, r)
                return np.asarray(r, dtype=np.float64), "deg"
        if floor is None:
            floor = 3.0 * (scale or 1 / 3600)
        return np.full(n, floor), "deg"
    floor = psf_fwhm_pix / 2 if psf_fwhm_pix else (psf_fwhm_deg / scale / 2 if (psf_fwhm_deg and scale) else 3.0)
    if "pos_err" in table.colnames and u.Quantity(table["pos_err"]).unit == u.pix:
        r = u.Quantity(table["pos_err"]).to_value(u.pix)
        return np.where(~np.isfinite(r) | (r < 1.0), floor, r), "pix"
    return np.full(n, floor), "pix"


def write_regions(table, path: str | Path, *, psf_fwhm_deg: float | None = None, psf_fwhm_pix: float | None = None) -> Path:
    """A DS9 region file: one labelled circle per source (module docstring)."""
    from astropy.coordinates import SkyCoord
    from regions import CirclePixelRegion, CircleSkyRegion, PixCoord, Regions

    path = Path(path)
    radius, unit = _region_radius(table, psf_fwhm_deg, psf_fwhm_pix)
    score = np.asarray(table["score"], dtype=np.float64) if "score" in table.colnames else None
    names = table["assoc_name"] if "assoc_name" in table.colnames else None
    labels = []
    for i in range(len(table)):
        label = str(i)
        if score is not None and np.isfinite(score[i]):
            label += f" {score[i]:.3g}"
        if names is not None and str(names[i]):
            label += f" {names[i]}"
        labels.append(label)
    if len(table) > FAST_REGIONS_ABOVE:
        return _fast_regions(table, path, radius, unit, labels)
    regs = []
    if unit == "deg":
        if "glon" in table.colnames:
            coords = SkyCoord(u.Quantity(table["glon"], u.deg), u.Quantity(table["glat"], u.deg), frame="galactic")
        else:
            coords = SkyCoord(u.Quantity(table["ra"], u.deg), u.Quantity(table["dec"], u.deg), frame="icrs")
    else:
        xs = u.Quantity(table["x"]).value
        ys = u.Quantity(table["y"]).value
    for i in range(len(table)):
        meta = {"text": labels[i]}
        if unit == "deg":
            regs.append(CircleSkyRegion(coords[i], radius[i] * u.deg, meta=meta))
        else:
            regs.append(CirclePixelRegion(PixCoord(float(xs[i]), float(ys[i])), float(radius[i]), meta=meta))
    with atomic_path(path) as tmp:
        if regs:
            Regions(regs).write(str(tmp), format="ds9", overwrite=True)
        else:
            tmp.write_text("# Region file format: DS9\n# no sources\n")
    return path


def _fast_regions(table, path: Path, radius: np.ndarray, unit: str, labels: list[str]) -> Path:
    """The same DS9 text the regions package writes, formatted in bulk (large catalogs)."""
    if unit == "deg":
        if "glon" in table.colnames:
            frame, lon, lat = "galactic", u.Quantity(table["glon"], u.deg).value, u.Quantity(table["glat"], u.deg).value
        else:
            frame, lon, lat = "icrs", u.Quantity(table["ra"], u.deg).value, u.Quantity(table["dec"], u.deg).value
        body = [f"circle({a:.8f},{b:.8f},{r:.10g}) # text={{{t}}}" for a, b, r, t in zip(lon, lat, radius, labels)]
    else:
        frame = "image"
        xs = u.Quantity(table["x"]).value + 1.0  # DS9's image frame is 1-based
        ys = u.Quantity(table["y"]).value + 1.0
        body = [f"circle({a:.8f},{b:.8f},{r:.10g}) # text={{{t}}}" for a, b, r, t in zip(xs, ys, radius, labels)]
    with atomic_path(path) as tmp:
        tmp.write_text("# Region file format: DS9 astropy/regions\n" + frame + "\n" + "\n".join(body) + "\n")
    return path


def read_table(path: str | Path, hdu: str | int | None = None) -> Table:
    """Any catalog or truth table file (FITS, ECSV, VOTable, CSV) as a Table, or a one-line SkyfmError.

    For a FITS file with several tables (a simulated patch), ``hdu`` picks one; by default a ``TRUTH`` HDU if there
    is one, else the first table.
    """
    path = Path(path)
    if not path.exists():
        raise SkyfmError(f"file not found: {path}")
    if path.is_dir():
        raise SkyfmError(f"{path} is a folder, not a table file")
    fmt = catalog_format(path, writing=False)
    try:
        if fmt == "fits":
            from astropy.io import fits

            with fits.open(path, memmap=False) as hdul:
                tables = [i for i, h in enumerate(hdul) if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
                if hdu is None:
                    names = [h.name for h in hdul]
                    hdu = names.index("TRUTH") if "TRUTH" in names else (tables[0] if tables else None)
                if hdu is None:
                    raise SkyfmError(f"{path} holds no table (no binary-table HDU)")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t = Table.read(hdul[hdu])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    t = Table.read(path, format=fmt)
                except ValueError:
                    t = _empty_ecsv(path) if fmt == "ascii.ecsv" else None
                    if t is None:
                        raise
    except SkyfmError:
        raise
    except Exception as e:  # astropy raises many types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SkyfmError(f"{path}: cannot read a table ({first})") from None
    cn = t.meta.get("class_names") or t.meta.get("CLASS_NAMES")
    if isinstance(cn, str):
        t.meta["class_names"] = cn.split(",")
    return t


def _empty_ecsv(path: Path) -> Table | None:
    """An ECSV file with a header and no rows, read from its header: astropy cannot read back the empty
    multi-dimensional columns (``class_prob``, ``flux_band``) it writes for a catalog with no sources. None when
    the file has data rows (the failure was something else)."""
    from astropy.io.misc import yaml  # astropy's SafeLoader with its own tags (units), no arbitrary objects

    lines = path.read_text().splitlines()
    header = [ln[2:] for ln in lines if ln.startswith("# ")]
    body = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if len(body) > 1:
        return None
    try:
        spec = yaml.load("\n".join(ln for ln in header if not ln.startswith("%ECSV")))
        cols = []
        for c in spec["datatype"]:
            sub = c.get("subtype", "")
            dtype, shape = (sub.split("[")[0], tuple(int(n) for n in sub.split("[")[1].rstrip("]").split(","))) \
                if "[" in sub else (c["datatype"], ())
            dtype = "U1" if dtype == "string" else dtype
            col = Table.Column(np.zeros((0, *shape), dtype=dtype), name=c["name"], description=c.get("description"))
            if c.get("unit"):
                col.unit = u.Unit(c["unit"])
            cols.append(col)
        meta = dict(spec.get("meta") or {})
        meta.pop("__serialized_columns__", None)
        return Table(cols, meta=meta)
    except Exception:  # noqa: BLE001 - not an empty skyfm catalog either: report the original error
        return None


def read_catalog(path: str | Path) -> QTable:
    """A catalog written by :func:`write_catalog` (or any table with ``x``, ``y``) as a QTable."""
    return QTable(read_table(path))
