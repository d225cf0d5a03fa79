"""Write and read patches as FITS files in the formats users already have.

Counts instruments (Fermi-LAT, CTAO) use the layout Fermi's ``gtbin`` writes for counts cubes (CCUBE):

    PRIMARY   3-D image (energy, y, x), counts, celestial WCS on axes 1-2, energy on axis 3
    EBOUNDS   table: CHANNEL, E_MIN, E_MAX (keV)

CCD instruments use 2-D image HDUs with a celestial WCS, one per band (``FILTER`` names the band):

    PRIMARY   band 0 image (ADU)
    <band>    one image HDU per further band, EXTNAME = band name

Simulated patches add their truth after these:

    SOURCES   (C, H, W) float32: the expected source-only image (no background, no noise, no contaminants)
    MASK      (C, H, W) uint8: contaminant bits (:data:`skyfm.data.patch.CONTAMINANT_BITS`), CCDs only
    TRUTH     binary table: the true sources

Files are written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from skyfm.data.patch import Patch
from skyfm.errors import SkyfmError
from skyfm.utils import atomic_path

TRUTH_HDU = "TRUTH"
SOURCES_HDU = "SOURCES"
MASK_HDU = "MASK"
EBOUNDS_HDU = "EBOUNDS"
_ROLE_KEY = "SKYFMROL"  # marks HDUs skyfm wrote: SCIENCE, SOURCES, MASK


def ebounds_hdu(edges_kev: np.ndarray) -> fits.BinTableHDU:
    """An ``EBOUNDS`` table as gtbin writes it (energies in keV)."""
    edges_kev = np.asarray(edges_kev, dtype=np.float64)
    cols = [
        fits.Column("CHANNEL", "J", array=np.arange(1, len(edges_kev) + 1)),
        fits.Column("E_MIN", "D", unit="keV", array=edges_kev[:, 0]),
        fits.Column("E_MAX", "D", unit="keV", array=edges_kev[:, 1]),
    ]
    hdu = fits.BinTableHDU.from_columns(cols, name=EBOUNDS_HDU)
    hdu.header["TELESCOP"] = "GLAST"
    return hdu


def read_ebounds(hdu: fits.BinTableHDU, where: str | None = None) -> np.ndarray:
    """(C, 2) energy edges in keV from an ``EBOUNDS`` (or gammapy ``*_BANDS``) HDU, honouring its TUNIT (keV, MeV,
    GeV or TeV); ``where`` names the file in errors."""
    import astropy.units as u

    table = Table.read(hdu)
    out = []
    for name in ("E_MIN", "E_MAX"):
        if name not in table.colnames:
            raise SkyfmError(f"{where + ': ' if where else ''}its {hdu.name} table has no {name} column (energy bin "
                             "edges; a table of energies at bin centres describes a model cube, not counts)")
        col = table[name]
        unit = col.unit or u.keV
        out.append(np.asarray(u.Quantity(col, unit).to_value(u.keV), dtype=np.float64))
    return np.stack(out, axis=1)


def _celestial_header(wcs: WCS | None) -> fits.Header:
    return fits.Header() if wcs is None else wcs.to_header()


def _cube_header(wcs: WCS | None, edges_kev: np.ndarray) -> fits.Header:
    """The 2-D celestial WCS extended with a tabulated-looking energy axis, as counts cubes carry."""
    header = _celestial_header(wcs)
    if wcs is not None:
        header["WCSAXES"] = 3
        header["CTYPE3"] = "Energy"
        header["CUNIT3"] = "MeV"
        header["CRPIX3"] = 1.0
        header["CRVAL3"] = float(edges_kev[0, 0] / 1e3)
        # Log-spaced bins: the energy axis is informative only; EBOUNDS holds the exact edges.
        header["CDELT3"] = float((edges_kev[-1, 1] - edges_kev[0, 0]) / 1e3 / len(edges_kev))
    return header


def write_patch(patch: Patch, path: str | Path, overwrite: bool = True) -> Path:
    """Write a patch as one FITS file (layout in the module docstring); returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SkyfmError(f"{path} exists; pass overwrite=True to replace it")
    inst = patch.instrument_config()
    hdus: list[fits.hdu.base._BaseHDU] = []
    common = {
        "TELESCOP": (inst.fits_ids.get("telescop", [inst.name.upper()])[0], "telescope"),
        "INSTRUME": (inst.fits_ids.get("instrume", [inst.name.upper()])[0], "instrument"),
        "SKYFMINS": (inst.name, "skyfm instrument name"),
    }
    if inst.is_counts:
        edges = patch.energy_edges_kev
        if edges is None:
            edges = np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")] for b in inst.bands])
        header = _cube_header(patch.wcs, edges)
        header.update(common)
        header["BUNIT"] = "counts"
        header[_ROLE_KEY] = "SCIENCE"
        _put_meta(header, patch.meta)
        hdus.append(fits.PrimaryHDU(patch.data, header=header))
        hdus.append(ebounds_hdu(edges))
    else:
        for i, band in enumerate(patch.bands):
            header = _celestial_header(patch.wcs)
            header.update(common)
            header["FILTER"] = (band, "band")
            header["BUNIT"] = "adu"
            header[_ROLE_KEY] = "SCIENCE"
            b = inst.band(band)
            header["EXPTIME"] = (b.exposure_time, "s")
            header["MAGZP"] = (b.zeropoint - 2.5 * np.log10(inst.noise["gain"]), "AB mag of 1 ADU/s")
            header["GAIN"] = (inst.noise["gain"], "e-/ADU")
            header["RDNOISE"] = (inst.noise["read_noise"], "e-")
            header["SATURATE"] = (inst.noise["saturation"], "ADU")
            if i == 0:
                _put_meta(header, patch.meta)
                hdus.append(fits.PrimaryHDU(patch.data[0], header=header))
            else:
                hdus.append(fits.ImageHDU(patch.data[i], header=header, name=band))
    if patch.source_image is not None:
        h = fits.ImageHDU(np.asarray(patch.source_image, dtype=np.float32), header=_celestial_header(patch.wcs), name=SOURCES_HDU)
        h.header[_ROLE_KEY] = "SOURCES"
        h.header["COMMENT"] = "Expected source-only image: no background, noise or contaminants."
        hdus.append(h)
    if patch.contaminant_mask is not None:
        h = fits.ImageHDU(np.asarray(patch.contaminant_mask, dtype=np.uint8), header=_celestial_header(patch.wcs), name=MASK_HDU)
        h.header[_ROLE_KEY] = "MASK"
        h.header["COMMENT"] = "Contaminant bits: 1 cosmic ray, 2 satellite trail, 4 saturated, 8 bleed trail,"
        h.header["COMMENT"] = "16 hot pixel, 32 bad pixel."
        hdus.append(h)
    if patch.truth is not None:
        hdus.append(fits.table_to_hdu(patch.truth, character_as_bytes=False))
        hdus[-1].name = TRUTH_HDU
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return path


def _put_meta(header: fits.Header, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for key, value in meta.items():
            if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
                header[key.upper()] = value.item() if isinstance(value, np.generic) else value


def read_patch(path: str | Path) -> Patch:
    """Read a patch file written by :func:`write_patch` (a simulated patch with its truth).

    For arbitrary user files (any image HDU, any size, HEALPix maps) use :func:`skyfm.data.read_image`.
    """
    path = Path(path)
    if not path.is_file():
        raise SkyfmError(f"file not found: {path}")
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as e:
        raise SkyfmError(f"{path} is not a readable FITS file ({e})") from None
    with hdul:
        primary = hdul[0]
        name = primary.header.get("SKYFMINS")
        if name is None:
            raise SkyfmError(f"{path} was not written by skyfm (no SKYFMINS keyword); read it with read_image")
        from skyfm.instruments import load_instrument

        inst = load_instrument(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(primary.header).celestial if "CTYPE1" in primary.header else None
        meta = _read_meta(primary.header)
        if inst.is_counts:
            data = np.asarray(primary.data, dtype=np.float32)
            edges = read_ebounds(hdul[EBOUNDS_HDU])
            bands = [b.name for b in inst.bands][: data.shape[0]]
        else:
            science = [h for h in hdul if h.is_image and h.header.get(_ROLE_KEY) == "SCIENCE"]
            data = np.stack([np.asarray(h.data, dtype=np.float32) for h in science])
            bands = [str(h.header["FILTER"]) for h in science]
            edges = None
        names = [h.name for h in hdul]
        source_image = np.asarray(hdul[SOURCES_HDU].data, dtype=np.float32) if SOURCES_HDU in names else None
        cmask = np.asarray(hdul[MASK_HDU].data, dtype=np.uint8) if MASK_HDU in names else None
        truth = Table.read(hdul[TRUTH_HDU]) if TRUTH_HDU in names else None
    mask = ~np.isfinite(data).all(axis=0)
    return Patch(
        data=data, instrument=inst.name, bands=bands, wcs=wcs, mask=mask if mask.any() else None, truth=truth,
        source_image=source_image, contaminant_mask=cmask, energy_edges_kev=edges, meta=meta,
    )


_STANDARD_KEYS = {
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "WCSAXES", "TELESCOP", "INSTRUME",
    "SKYFMINS", "BUNIT", "FILTER", "EXPTIME", "MAGZP", "GAIN", "RDNOISE", "SATURATE", "COMMENT", "HISTORY",
    "EQUINOX", "RADESYS", "LONPOLE", "LATPOLE", "MJDREF", "DATEREF", "MJD-OBS", "DATE-OBS", _ROLE_KEY,
}


def _read_meta(header: fits.Header) -> dict:
    meta = {}
    for key, value in header.items():
        if key in _STANDARD_KEYS or key.startswith(("CTYPE", "CRPIX", "CRVAL", "CDELT", "CUNIT", "CROTA", "PV", "PC", "CD")):
            continue
        meta[key.lower()] = value
    return meta
