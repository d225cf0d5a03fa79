"""Read the images users actually have: any FITS image with a celestial WCS, Fermi ``gtbin`` counts cubes, and
the patch files skyfm's simulators write.

* :func:`read_image` reads a whole image into a :class:`~skyfm.data.Patch`.
* :func:`open_image` opens one lazily (memory-mapped, nothing read until asked): for mosaics too large for memory,
  read window by window (``read_window``) or tile by tile (:func:`skyfm.data.tiling.iter_tiles`).
* :func:`inspect_file` says what skyfm sees in a file (``skyfm info``), HEALPix maps included.

What is read, and how:

* the image is the first HDU with image data (or the one named by ``hdu=``). 2-D images become (1, H, W);
  3-D cubes (C, H, W); leading axes of length 1 (radio images' Stokes and frequency axes) are dropped.
* a cube with an ``EBOUNDS`` table is a counts cube (gtbin CCUBE): one band per energy bin, edges in keV; so is a
  cube whose ``BANDSHDU`` keyword names its bins' table (gammapy's ``COUNTS_BANDS``). Bins that are not the
  instrument's are summed into its bands (:func:`group_energy_planes`; an :class:`EnergyBinsWarning` says how).
* a file written by :func:`skyfm.data.write_patch` is read whole, all bands and its truth (:func:`read_patch`).
* invalid pixels (NaN or inf, BLANK integers, non-zero pixels of a ``MASK`` image HDU, pixels an HST or JWST
  ``DQ`` extension flags as unusable: :data:`DQ_BAD_BITS`) become ``Patch.mask`` and 0 in ``Patch.data``.
* the instrument comes from ``instrument=`` (``--instrument``), else from the header (TELESCOP / INSTRUME /
  SKYFMINS). A one-band image of a many-band instrument takes its band from ``band=``, else from the FILTER /
  BAND header keys; a one-band counts map from ``band=``, EBOUNDS or gtbin's ENERGY data-subspace keywords.
* without a celestial WCS the image is read in pixels (``wcs=None``) and a :class:`NoWCSWarning` says so.

Every problem a user can cause (a missing, empty, truncated or non-FITS file, an HDU with no image, an image with
the wrong number of dimensions or no valid pixel) raises a one-line :class:`~skyfm.errors.SkyfmError`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning, SingularMatrixError
from astropy.wcs.utils import proj_plane_pixel_scales

from skyfm.data.fits_io import EBOUNDS_HDU, MASK_HDU, _ROLE_KEY, read_ebounds, read_patch
from skyfm.data.patch import Patch
from skyfm.errors import SkyfmError
from skyfm.instruments import Instrument, instrument_from_header, load_instrument
from skyfm.utils import format_angle

FORMAT_IMAGE = "image"
FORMAT_CUBE = "counts cube"
FORMAT_SIMULATED = "simulated patch"
FORMAT_HEALPIX = "HEALPix map"

# Header keys that name the filter of an optical/IR image, in the order they are trusted. HST/ACS splits its two
# filter wheels into FILTER1/FILTER2 (one of them CLEAR); WFPC2 uses FILTNAM1; WISE Atlas images carry BAND = 1..4.
_FILTER_KEYS = ("FILTER", "BAND", "FILTER1", "FILTER2", "FILTNAM1")

# Rows of pixels read at a time when scanning a whole lazily opened image (masked fraction): bounds memory.
_SCAN_PIXELS = 4_000_000


class NoWCSWarning(UserWarning):
    """The image has no celestial WCS: skyfm works in pixels and cannot give sky positions."""


# ----------------------------------------------------------------------------------------------------------------
# Opening a file: a clear line for everything that is not a readable FITS file.
# ----------------------------------------------------------------------------------------------------------------
_NOT_FITS_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"\x89HDF": "an HDF5 file",
}
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"PK\x03\x04")  # gzip, bzip2, zip: astropy opens these itself


def check_fits_file(path: str | Path) -> Path:
    """``path`` as a Path if it is an existing, non-empty file that starts like FITS; else a SkyfmError."""
    path = Path(path)
    if not path.exists():
        raise SkyfmError(f"file not found: {path}")
    if not path.is_file():
        raise SkyfmError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(80)
    except OSError as e:
        raise SkyfmError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise SkyfmError(f"{path} is empty (0 bytes), not a FITS file")
    for magic, what in _NOT_FITS_MAGIC.items():
        if head.startswith(magic):
            raise SkyfmError(f"{path} is {what}, not a FITS file")
    if not head.startswith(b"SIMPLE  =") and not head.startswith(_COMPRESSED_MAGIC):
        raise SkyfmError(f"{path} is not a FITS file (it does not start with a SIMPLE card)")
    return path


def open_fits(path: str | Path, memmap: bool = True) -> fits.HDUList:
    """Open a FITS file, reading every header now so that a corrupt or truncated file fails here, clearly."""
    path = check_fits_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's "may have been truncated" becomes our own error below
            hdul = fits.open(path, memmap=memmap, lazy_load_hdus=False)
    except (OSError, EOFError, ValueError, TypeError, IndexError, fits.VerifyError) as e:
        raise SkyfmError(f"{path} is a corrupt FITS file ({_first_line(e)})") from None
    if _is_compressed(path):  # offsets count decompressed bytes: a cut stream fails when read instead
        return hdul
    size = path.stat().st_size
    for i, (hdu, stored) in enumerate(zip(hdul, _stored_sizes(path, hdul))):
        info = hdu.fileinfo()
        if info is not None and info["datLoc"] + stored > size:
            hdul.close()
            raise SkyfmError(f"{path} is truncated: HDU {i} ({hdu.name}) needs {info['datLoc'] + stored} bytes, "
                             f"the file has {size}")
    return hdul


def _stored_sizes(path: Path, hdul: fits.HDUList) -> list[int]:
    """The data size in bytes of each HDU of ``hdul`` as stored: a tile-compressed image (``.fits.fz``, a
    ``CompImageHDU``) as the binary table that holds it (the image's own size is the decompressed one, which a
    compressed file never holds)."""
    if not any(isinstance(hdu, fits.CompImageHDU) for hdu in hdul):
        return [hdu.size for hdu in hdul]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False, lazy_load_hdus=False, disable_image_compression=True) as raw:
            return [hdu.size for hdu in raw]


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4).startswith(_COMPRESSED_MAGIC)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_healpix(hdu) -> bool:
    header = hdu.header
    return isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)) and (
        str(header.get("PIXTYPE", "")).upper() == "HEALPIX" or ("NSIDE" in header and "ORDERING" in header)
    )


def _has_image(hdu) -> bool:
    return hdu.is_image and hdu.header.get("NAXIS", 0) > 0 and hdu.header.get(_ROLE_KEY) not in ("SOURCES", "MASK")


def _hdu_label(hdul: fits.HDUList, index: int) -> str:
    name = hdul[index].name
    return f"HDU {index}" + (f" ({name})" if name and name != "PRIMARY" else "")


def _hdu_list_summary(hdul: fits.HDUList) -> str:
    parts = []
    for i, h in enumerate(hdul):
        kind = "image" if _has_image(h) else "empty" if h.is_image else "table"
        parts.append(f"{i} {h.name or '-'} ({kind})")
    return ", ".join(parts)


class MoreImagesWarning(UserWarning):
    """A file holds several images of one size (a mosaic camera's CCDs) and only one is read."""


class DataQualityWarning(UserWarning):
    """A file has a data-quality (DQ) extension whose flags skyfm cannot read (not an HST or JWST file)."""


# extensions that accompany a science image rather than being one: weights, errors, data quality, exposure maps
_AUXILIARY_HDU_NAMES = {"WHT", "WEIGHT", "WHT_MAP", "CTX", "CON", "ERR", "ERROR", "SIGMA", "RMS", "VAR", "VARIANCE",
                        "IVAR", "INVVAR", "DQ", "MASK", "BPM", "FLAGS", "EXP", "EXPMAP", "EXPOSURE", "SAMP", "TIME",
                        "NOISE", "UNC", "UNCERT", "HDRTAB", "BACKGROUND", "BKG", "MODEL", "RESIDUAL"}


def science_hdus(hdul: fits.HDUList) -> list[int]:
    """Indices of a file's science images: the first HDU with image data and those of the same 2-D size that are
    not a weight, error, mask or exposure map (:data:`_AUXILIARY_HDU_NAMES`): a mosaic camera's CCDs, one per
    extension. ``skyfm detect --hdu all`` detects in each."""
    first = next((i for i, h in enumerate(hdul) if _has_image(h)), None)
    if first is None:
        return []
    shape = tuple(hdul[first].header.get(f"NAXIS{k}") for k in (1, 2))
    return [first] + [i for i, h in enumerate(hdul)
                      if i > first and _has_image(h) and tuple(h.header.get(f"NAXIS{k}") for k in (1, 2)) == shape
                      and h.name.upper() not in _AUXILIARY_HDU_NAMES]


def _other_science_hdus(hdul: fits.HDUList, index: int) -> list[str]:
    """Labels of the science images (:func:`science_hdus`) other than ``index``."""
    return [_hdu_label(hdul, i) for i in science_hdus(hdul) if i != index]


def select_hdu(hdul: fits.HDUList, hdu: int | str | None, path: Path) -> int:
    """Index of the HDU to read: ``hdu`` (an index, a digit string or an EXTNAME) or the first with image data."""
    if hdu is None:
        for i, h in enumerate(hdul):
            if _has_image(h):
                return i
        if any(_is_healpix(h) for h in hdul):
            raise SkyfmError(f"{path} is a HEALPix map, not an image: cut it into tiles with skyfm.data.healpix "
                             "(healpix_to_patch, healpix_tiles)")
        raise SkyfmError(f"{path} has no image data (HDUs: {_hdu_list_summary(hdul)})")
    if isinstance(hdu, str) and hdu.strip().lstrip("-").isdigit():
        hdu = int(hdu)
    if isinstance(hdu, int):
        if not 0 <= hdu < len(hdul):
            raise SkyfmError(f"{path} has {len(hdul)} HDUs (0-{len(hdul) - 1}); there is no HDU {hdu}")
        return hdu
    names = [h.name.upper() for h in hdul]
    if str(hdu).upper() not in names:
        raise SkyfmError(f"{path} has no HDU named '{hdu}'; its HDUs are {_hdu_list_summary(hdul)}")
    return names.index(str(hdu).upper())


# ----------------------------------------------------------------------------------------------------------------
# Shape, WCS, instrument and bands of one image HDU.
# ----------------------------------------------------------------------------------------------------------------
def _image_shape(header: fits.Header, where: str) -> tuple[tuple[int, ...], int]:
    """(C, H, W) of an image HDU and the number of leading length-1 axes dropped to get there."""
    naxis = int(header.get("NAXIS", 0))
    full = tuple(int(header.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))  # numpy order
    if naxis == 0 or 0 in full:
        raise SkyfmError(f"{where} has no pixels (shape {full})")
    shape, dropped = full, 0
    while len(shape) > 3 and shape[0] == 1:  # e.g. radio images (Stokes, frequency, y, x) with single planes
        shape, dropped = shape[1:], dropped + 1
    if len(shape) not in (2, 3):
        raise SkyfmError(f"{where} is {naxis}-D with shape {full}: skyfm reads 2-D images and 3-D cubes (bands, y, x)")
    return (1,) + shape if len(shape) == 2 else shape, dropped


def pixel_scale_deg(wcs: WCS) -> float:
    """Mean pixel scale (deg) of a celestial WCS at its reference point; rectangular or rotated pixels are fine."""
    return float(np.mean(proj_plane_pixel_scales(wcs)))


def celestial_wcs(header: fits.Header, where: str, hdul: fits.HDUList | None = None) -> WCS | None:
    """The 2-D celestial WCS of an image's first two axes, or None (with a :class:`NoWCSWarning`) if it has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            full = WCS(header, fobj=hdul)
            has_celestial = full.has_celestial
    except SingularMatrixError:
        raise SkyfmError(f"{where} has a celestial WCS with a zero or singular pixel scale (CDELT / CD matrix)") from None
    except (ValueError, KeyError, MemoryError) as e:  # astropy's WCS errors are ValueErrors
        # wcslib puts where it failed first and why last: the last line is the one a user can act on.
        reason = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise SkyfmError(f"{where} has an unreadable WCS ({reason[-1].strip()})") from None
    if not has_celestial:
        warnings.warn(NoWCSWarning(f"{where}: no celestial WCS: working in pixels"), stacklevel=3)
        return None
    if {full.wcs.lng, full.wcs.lat} != {0, 1}:
        raise SkyfmError(f"{where}: its celestial WCS axes are axes {full.wcs.lng + 1} and {full.wcs.lat + 1}; "
                         "skyfm needs them on the image's first two axes (x, y)")
    wcs = full.celestial
    try:
        scale = pixel_scale_deg(wcs)
    except (ValueError, MemoryError) as e:
        raise SkyfmError(f"{where} has a celestial WCS without a usable pixel scale ({_first_line(e)})") from None
    if not (np.isfinite(scale) and scale > 0):
        raise SkyfmError(f"{where} has a celestial WCS without a usable pixel scale (got {scale} deg)")
    return wcs


def resolve_instrument(instrument, headers: list[fits.Header]) -> tuple[Instrument | None, str]:
    """The instrument (or None) and where it came from: the option, or the header keys that named it."""
    if instrument is not None:
        return load_instrument(instrument), "option"
    for header in headers:
        inst = instrument_from_header(header)
        if inst is not None:
            keys = [f"{k}={header[k]!r}" for k in ("SKYFMINS", "TELESCOP", "INSTRUME") if k in header]
            return inst, "header (" + ", ".join(keys) + ")"
    named = [f"{k}={h[k]!r}" for h in headers[:1] for k in ("TELESCOP", "INSTRUME") if k in h]
    return None, "unknown" + (f" ({', '.join(named)})" if named else " (no TELESCOP / INSTRUME in the header)")


def energy_label(lo_kev: float, hi_kev: float) -> str:
    """'0.3-1.16 GeV': an energy range in the unit that reads best."""
    for unit, kev in (("TeV", 1e9), ("GeV", 1e6), ("MeV", 1e3), ("keV", 1.0)):
        if lo_kev >= 0.07 * kev or unit == "keV":
            return f"{lo_kev / kev:.4g}-{hi_kev / kev:.4g} {unit}"
    raise AssertionError("unreachable")


def band_names_for_energies(edges_kev: np.ndarray, inst: Instrument | None) -> list[str]:
    """The instrument's band names when its energy bins match ``edges_kev`` (to 0.1%), else energy labels."""
    if inst is not None and inst.is_counts and len(inst.bands) == len(edges_kev):
        ref = np.array([[b.energy[0].to_value(u.keV), b.energy[1].to_value(u.keV)] for b in inst.bands])
        if np.allclose(ref, edges_kev, rtol=1e-3):
            return [b.name for b in inst.bands]
    if inst is not None and inst.is_counts and len(edges_kev) == 1:
        for b in inst.bands:  # one bin of a counts map that is one of the instrument's bins
            ref = np.array([b.energy[0].to_value(u.keV), b.energy[1].to_value(u.keV)])
            if np.allclose(ref, edges_kev[0], rtol=1e-3):
                return [b.name]
    return [energy_label(lo, hi) for lo, hi in edges_kev]


# A counts cube binned otherwise than its instrument (gtbin with 30 log bins, gammapy with 10 per decade) is summed
# into the instrument's bands: a plane joins the band that holds at least MIN_PLANE_SHARE of its photons, and a band
# is kept only where the planes it took hold at least MIN_BAND_COVER of the band's own photons (photons counted for
# a power law of index 2, as the likelihood's band weights assume: a 0.1-1 GeV plane has 74% of its photons below
# 0.3 GeV). Below either, the band's PSF and exposure, which the models and the likelihood fit assume, would not
# describe the counts summed into it.
MIN_PLANE_SHARE = 0.5
MIN_BAND_COVER = 0.5


class EnergyBinsWarning(UserWarning):
    """A counts cube's energy planes were summed into its instrument's bands (some perhaps left out)."""


@dataclass(frozen=True)
class EnergyGrouping:
    """How the energy planes of a counts cube are summed into its instrument's bands.

    Attributes:
        bands: the instrument band of each group.
        planes: for each group, the indices of the cube's planes summed into it.
        edges_kev: (G, 2) each group's own energy range (its lowest and highest plane edge), keV.
        left_out: indices of the planes no band took (outside the instrument's range, across two bands, or in a
            band they cover too little of).
        n_planes: planes in the cube.
    """

    bands: list[str]
    planes: list[list[int]]
    edges_kev: np.ndarray
    left_out: list[int]
    n_planes: int

    def summary(self, inst_name: str) -> str:
        """One line for users: which planes went into which band, and which were left out."""
        groups = ", ".join(f"{b} <- {_plane_ranges(p)} ({energy_label(*e)})"
                           for b, p, e in zip(self.bands, self.planes, self.edges_kev))
        text = f"its {self.n_planes} energy planes are not {inst_name}'s bands: summed as {groups}"
        if self.left_out:
            text += (f"; {_plane_ranges(self.left_out)} left out (outside the bands, across two of them, or too "
                     "small a part of one)")
        return text

    def apply(self, planes: np.ndarray) -> np.ndarray:
        """(G, ...) float32 sums of (n_planes, ...) ``planes`` by group (NaN where any summed plane is NaN)."""
        planes = np.asarray(planes)
        if planes.shape[0] != self.n_planes:
            raise SkyfmError(f"expected {self.n_planes} energy planes to group, got {planes.shape[0]}")
        return np.stack([planes[idx].sum(axis=0, dtype=np.float32) for idx in self.planes])


def _plane_ranges(indices: list[int]) -> str:
    """'planes 1-3, 7' or 'plane 2': one-based plane numbers (as EBOUNDS channels count) in runs."""
    runs, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            runs.append(f"{start + 1}" if start == k else f"{start + 1}-{k + 1}")
            start = None
    return ("plane " if len(indices) == 1 else "planes ") + ", ".join(runs)


def group_energy_planes(edges_kev: np.ndarray, inst: Instrument, where: str = "the cube") -> EnergyGrouping:
    """How to sum planes with energy ranges ``edges_kev`` (N, 2, keV) into ``inst``'s bands (rules above).

    Raises a SkyfmError when the edges are not positive increasing pairs, or when no band can be made."""
    edges = np.asarray(edges_kev, dtype=np.float64).reshape(-1, 2)
    if not (np.isfinite(edges).all() and (edges[:, 0] > 0).all() and (edges[:, 1] > edges[:, 0]).all()):
        raise SkyfmError(f"{where}: its energy bins need 0 < E_MIN < E_MAX on every row")
    own = np.array([[b.energy[0].to_value(u.keV), b.energy[1].to_value(u.keV)] for b in inst.bands])

    def photons(lo, hi):  # integral of E^-2 over [lo, hi] (0 where empty)
        return np.where(hi > lo, 1.0 / lo - 1.0 / np.maximum(hi, lo), 0.0)

    shared = photons(np.maximum(edges[:, None, 0], own[None, :, 0]), np.minimum(edges[:, None, 1], own[None, :, 1]))
    share = shared / photons(edges[:, 0], edges[:, 1])[:, None]  # (N planes, B bands) share of a plane's photons
    home = np.argmax(share, axis=1)
    joins = share[np.arange(len(edges)), home] >= MIN_PLANE_SHARE
    bands, planes, group_edges = [], [], []
    for b, band in enumerate(inst.bands):
        members = [int(k) for k in np.flatnonzero(joins & (home == b))]
        if not members or shared[members, b].sum() < MIN_BAND_COVER * photons(own[b, 0], own[b, 1]):
            continue
        bands.append(band.name)
        planes.append(members)
        group_edges.append([edges[members, 0].min(), edges[members, 1].max()])
    if not bands:
        own_text = ", ".join(f"{b.name} {energy_label(*e)}" for b, e in zip(inst.bands, own))
        span = energy_label(edges[:, 0].min(), edges[:, 1].max())
        raise SkyfmError(f"{where}: its {len(edges)} energy bin(s) ({span}) cannot be summed into any of "
                         f"{inst.name}'s bands ({own_text}); a one-bin map can be read as one of them with band= "
                         "(--band)")
    taken = {k for p in planes for k in p}
    return EnergyGrouping(bands=bands, planes=planes, edges_kev=np.array(group_edges), n_planes=len(edges),
                          left_out=[k for k in range(len(edges)) if k not in taken])


# A CCD image's pixel unit (BUNIT) as skyfm's CCD models need it: the instrument's ADU, whose noise its gain and
# read noise describe (the PSF fit's weights, its chi-square and every fit-SNR rule rest on them). Electrons are
# divided by the gain and rates multiplied by the exposure time (a Hubble _drc image in e-/s); catalog fluxes are
# given back in the image's own unit.
_ADU_UNITS = {"adu": u.adu, "dn": u.adu, "datanumber": u.adu, "count": u.ct, "counts": u.ct, "ct": u.ct, "cts": u.ct}
_ELECTRON_UNITS = ("electron", "electrons", "e-", "e")
_RATE_SUFFIXES = ("/s", "/sec", "/second", "s-1", "s**-1", "s^-1", ".s-1")
_EXPTIME_KEYS = ("EXPTIME", "TEXPTIME", "EXPOSURE", "XPOSURE")


class ImageUnitWarning(UserWarning):
    """A CCD image's pixel unit (BUNIT) is not one skyfm can convert to its instrument's ADU, or needs a guess."""


def image_units(headers: list[fits.Header], inst: Instrument, bands: list[str], where: str):
    """(ADU per unit of the image, the image's unit for catalog fluxes or None when it is the ADU itself, whether
    the header told) for a CCD image with ``BUNIT`` in the first of ``headers`` that has one (the image HDU's, then
    the primary's).

    ADU, DN or counts: 1, told (as WISE's Atlas images say). Electrons: 1 / gain. Per second: times the exposure
    time (EXPTIME, TEXPTIME, EXPOSURE or XPOSURE; else the band's nominal one, with an :class:`ImageUnitWarning`).
    No BUNIT, or one skyfm does not convert (MJy/sr, nanomaggies): 1, not told: the pixels' own noise may tell
    (:func:`units_from_noise`)."""
    raw = bunit_text(headers)
    text = raw.lower().replace(" ", "")
    if inst.is_counts:
        return 1.0, None, True
    if not text:
        return 1.0, None, False
    per_second = next((text[: -len(s)] for s in _RATE_SUFFIXES if text.endswith(s)), None)
    base = text if per_second is None else per_second
    gain = float((inst.noise or {}).get("gain", 1.0)) or 1.0
    if base in _ADU_UNITS:
        factor, unit = 1.0, _ADU_UNITS[base]
    elif base in _ELECTRON_UNITS:
        factor, unit = 1.0 / gain, u.electron
    else:
        return 1.0, None, False
    if per_second is not None:
        found = _first_positive(headers, _EXPTIME_KEYS)
        exptime = None if found is None else found[1]
        if exptime is None:
            known = [inst.band(b).exposure_time for b in bands if b in {x.name for x in inst.bands}]
            exptime = float(known[0]) if known and known[0] else 1.0
            warnings.warn(ImageUnitWarning(
                f"{where}: BUNIT {raw!r} is a rate but the header has no EXPTIME: {exptime:g} s assumed "
                f"({inst.name}'s nominal exposure)"), stacklevel=3)
        factor, unit = factor * exptime, unit / u.s
    return factor, (None if (factor == 1.0 and unit == u.adu) else unit), True


def _check_bunit_option(bunit: str, inst: Instrument | None, fmt: str, where: str) -> None:
    """A unit given in place of the header's BUNIT must be one :func:`image_units` converts, for a CCD image."""
    if inst is None:
        raise SkyfmError(f"{where}: --bunit needs the instrument (--instrument NAME), whose gain converts it")
    if inst.is_counts or fmt == FORMAT_SIMULATED:
        raise SkyfmError(f"{where}: --bunit is for CCD images read from a file; this one is "
                         f"{'a counts cube (counts)' if inst.is_counts else 'a skyfm simulated patch (ADU)'}")
    _, _, told = image_units([fits.Header({"BUNIT": bunit.strip(), "EXPTIME": 1.0})], inst, [], where)
    if not told:
        raise SkyfmError(f"--bunit {bunit!r} is not a unit skyfm converts: give ADU, DN, counts or electrons, or any "
                         "of these per second (e.g. 'electron/s')")


def bunit_text(headers: list[fits.Header]) -> str:
    """BUNIT of the first of ``headers`` that has a non-empty one, stripped; '' if none."""
    return next((str(h["BUNIT"]).strip() for h in headers if str(h.get("BUNIT", "")).strip()), "")


# A file that does not say its unit is read as the instrument's ADU unless its sky's noise says it is this many times
# finer (a rate, a calibrated flux): a file in ADU gives 0.87-1.09 (validation patches as simulated, cluster cores
# aside), e-/s EXPTIME / gain (60-300 here). Only finer: in a crowded core, structure between pixels inflates the
# noise and the scale comes out low (0.05 on a Hubble cluster core), and a file in units coarser than the ADU is rare.
UNIT_SCALE_LIMIT = 4.0
UNIT_SAMPLE_STRIPS = 32  # strips of ccd_noise.SKY_BLOCK rows, spread over the image, that the noise is read in


def units_from_noise(image: "ImageFile", headers: list[fits.Header], where: str) -> None:
    """Set ``image``'s ADU per unit and unit from its pixels' noise where its header does not say them (no BUNIT,
    or one skyfm does not convert): :func:`skyfm.instruments.ccd_noise.noise_unit_scale` of each band, read in
    :data:`UNIT_SAMPLE_STRIPS` strips spread over the image, their median taken when it exceeds
    :data:`UNIT_SCALE_LIMIT`; then the image's saturation level (:func:`image_saturation`) in the unit settled on.
    Catalog fluxes come back in the file's unit (BUNIT where astropy parses it, else dimensionless). An unconverted
    BUNIT read as ADU is warned of (:class:`ImageUnitWarning`), as is a scale taken from the noise."""
    from skyfm.instruments.ccd_noise import SKY_BLOCK, noise_unit_scale

    inst, raw, noise = image.instrument, bunit_text(headers), image.instrument.noise or {}
    gain = image.gain or float(noise.get("gain", 1.0)) or 1.0
    read_noise = float(noise.get("read_noise", 0.0))
    n_rows = image.height // SKY_BLOCK
    scale = float("nan")
    if n_rows and not image.problems:
        starts = np.unique(np.linspace(0, n_rows - 1, min(n_rows, UNIT_SAMPLE_STRIPS)).astype(int)) * SKY_BLOCK
        planes = np.concatenate([image.read_window(y, y + SKY_BLOCK, 0, image.width) for y in starts], axis=1)
        pixel_area = (inst.pixel_scale_deg * 3600.0) ** 2  # arcsec^2
        if image.wcs is not None:
            pixel_area = float(np.prod(proj_plane_pixel_scales(image.wcs))) * 3600.0 ** 2
        exptime = _first_positive(headers, _EXPTIME_KEYS)  # the sky of a sky-subtracted file grew with its exposure
        scales = [noise_unit_scale(plane, gain, read_noise,
                                   _nominal_sky_e(inst, band, pixel_area, None if exptime is None else exptime[1]))
                  for plane, band in zip(planes, image.bands)]
        scales = [c for c in scales if np.isfinite(c)]
        scale = float(np.median(scales)) if scales else float("nan")
    said = None
    if scale > UNIT_SCALE_LIMIT:
        image.adu_per_unit = scale
        unit = parse_unit(raw)
        image.unit = u.dimensionless_unscaled if unit is None else unit
        said = (f"{where}: {f'BUNIT {raw!r} is not a unit skyfm converts' if raw else 'no BUNIT says its unit'}; its "
                f"sky's noise gives {scale:.4g} {inst.name} ADU per unit (gain {gain:g}, read noise {read_noise:g} "
                "e-): read so; catalog fluxes in the file's unit (a BUNIT of ADU, electrons or electrons/s in the "
                "header says otherwise)")
    elif raw:
        why = (f"its noise agrees within {UNIT_SCALE_LIMIT:g}x" if np.isfinite(scale) else
               f"no {SKY_BLOCK}-px box of sky to measure its noise in")
        said = (f"{where}: BUNIT {raw!r} is not a unit skyfm converts (ADU, DN, counts or electrons, or these per "
                f"second): read as {inst.name}'s ADU ({why})")
    if said is not None:
        image.notes.append(said)
        warnings.warn(ImageUnitWarning(said), stacklevel=3)
    image.saturation_adu, note = image_saturation(headers, inst, image.adu_per_unit, where)  # in the unit settled
    if note:
        image.notes.append(note)


def _nominal_sky_e(inst: Instrument, band: str, pixel_area_arcsec2: float,
                   exposure_s: float | None = None) -> float | None:
    """The band's nominal sky (its YAML ``sky``, AB mag / arcsec^2, over ``exposure_s``, default its
    ``exposure_time``), e- per pixel of ``pixel_area_arcsec2``; None where the YAML does not give it."""
    try:
        b = inst.band(band)
        exposure = float(exposure_s if exposure_s is not None else b.exposure_time)
        sky_e = 10.0 ** (-0.4 * (float(b.sky) - float(b.zeropoint))) * exposure * pixel_area_arcsec2
    except (AttributeError, TypeError, ValueError, KeyError, SkyfmError):
        return None
    return sky_e if np.isfinite(sky_e) and sky_e > 0 else None


_SATURATION_KEYS = ("SATURATE", "SATLEVEL", "SATURAT")  # SExtractor's SATUR_KEY default first
_COMBINED_KEYS = ("NCOMBINE", "NDRIZIM")  # imcombine's / a drizzle's number of exposures


def image_saturation(headers: list[fits.Header], inst: Instrument, adu_per_unit: float, where: str):
    """(the CCD image's saturation level in ADU or None, a note or None) from its headers (the image HDU's, then
    the primary's).

    A level in the header (SATURATE, SATLEVEL or SATURAT; in the image's unit, as SExtractor's SATUR_LEVEL reads
    it) is taken as it is. Else an image that combines N > 1 exposures (NCOMBINE, a drizzle's NDRIZIM) saturates at
    N x the instrument's single-exposure level: a drizzled rate image times its total EXPTIME holds unsaturated
    stars far above one exposure's full well, which the PSF fit would otherwise leave out as clipped cores. None:
    the instrument's level (``noise.saturation``) stands."""
    if inst.is_counts:
        return None, None
    found = _first_positive(headers, _SATURATION_KEYS)
    if found is not None:
        adu = found[1] * adu_per_unit
        return adu, f"{where}: saturation level {adu:.6g} ADU from {found[0]}"
    own = (inst.noise or {}).get("saturation")
    combined = _first_positive(headers, _COMBINED_KEYS)
    if own and combined is not None and combined[1] > 1:
        adu = float(own) * combined[1]
        return adu, (f"{where}: saturation level {adu:.6g} ADU ({combined[0]} {combined[1]:g} x {inst.name}'s "
                     f"{float(own):g})")
    return None, None


def _first_positive(headers: list[fits.Header], keys) -> tuple[str, float] | None:
    """(key, value) of the first of ``keys`` holding a positive finite number in the first of ``headers`` that has
    one, else None."""
    return next(((k, float(h[k])) for h in headers for k in keys if k in h and _is_positive_number(h[k])), None)


_GAIN_KEYS = ("GAIN", "EGAIN")  # SExtractor's GAIN_KEY default first


def image_gain(headers: list[fits.Header], inst: Instrument, unit, where: str):
    """(the CCD image's gain in e- per ADU or None, a note or None): GAIN or EGAIN of its headers (the image HDU's,
    then the primary's) for an image in ADU (no BUNIT, ADU or DN: ``unit`` None), where it differs from the
    instrument's by more than 1%. The PSF fit weights each pixel by the sources' Poisson noise, flux / gain: a
    camera read out at another gain than the YAML's would have its bright stars' errors off by the square root of
    the ratio. Images in electrons need none (converted to ADU and weighted with the same gain, any gain fits)."""
    if inst.is_counts or unit is not None:
        return None, None
    found = _first_positive(headers, _GAIN_KEYS)
    own = float((inst.noise or {}).get("gain", 1.0)) or 1.0
    if found is None or abs(found[1] / own - 1.0) <= 0.01:
        return None, None
    return found[1], f"{where}: gain {found[1]:.6g} e-/ADU from {found[0]} ({inst.name}'s: {own:g})"


def _is_positive_number(value) -> bool:
    try:
        return float(value) > 0 and np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _dss_energy_kev(header: fits.Header) -> np.ndarray | None:
    """(1, 2) energy range (keV) from the data-subspace keywords gtbin writes (DSTYPn = 'ENERGY'), if any."""
    for key, value in header.items():
        if key.startswith("DSTYP") and str(value).strip().upper() == "ENERGY":
            n = key[5:]
            match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*:\s*([0-9.eE+-]+)\s*", str(header.get(f"DSVAL{n}", "")))
            if match:
                unit = u.Unit(str(header.get(f"DSUNI{n}", "MeV")).strip() or "MeV")
                lo, hi = (float(v) * unit for v in match.groups())
                return np.array([[lo.to_value(u.keV), hi.to_value(u.keV)]])
    return None


def _filter_band(headers: list[fits.Header], inst: Instrument) -> tuple[str | None, str | None]:
    """(band name, None) from the filter keywords of the first of ``headers`` that names a band of ``inst`` (the
    image HDU's, then the primary's: a drizzled HST file keeps FILTER1 / FILTER2 in its primary header), or (None,
    the reason none fits)."""
    seen = []
    for header in headers:
        for key in _FILTER_KEYS:
            if key not in header:
                continue
            value = str(header[key]).strip()
            if not value or value.upper().startswith("CLEAR"):
                continue
            seen.append(f"{key}={value!r}")
            for b in inst.bands:
                if b.name.lower() == value.lower():
                    return b.name, None
            if value.isdigit():  # WISE Atlas images say BAND = 1 for W1
                ends = [b.name for b in inst.bands if b.name.endswith(value)]
                if len(ends) == 1:
                    return ends[0], None
    names = " ".join(b.name for b in inst.bands)
    if seen:
        return None, f"{', '.join(seen)} is not a band of {inst.name} ({names}); pass band= (--band)"
    return None, f"it has no FILTER or BAND keyword to tell which {inst.name} band ({names}) it is; pass band= (--band)"


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ImageFile:
    """A FITS image opened lazily: headers and WCS read, pixels read only by :meth:`read_window`.

    Attributes:
        path: the file.
        format: ``image``, ``counts cube`` or ``simulated patch``.
        shape: (C, H, W) of the image.
        wcs: its 2-D celestial WCS, or None (pixels only).
        instrument: the :class:`~skyfm.instruments.Instrument`, or None when neither the option nor the header says.
        instrument_source: ``option``, ``header (TELESCOP='WISE')`` or why it is unknown.
        bands: one name per plane (``?`` where unknown; see ``problems``).
        energy_edges_kev: (C, 2) energy edges for counts data, else None.
        hdu_label: which HDU holds the image (``HDU 0``, ``HDU 1 (SCI)``).
        problems: what stops :func:`read_image` from making a Patch (an unknown instrument or band), one line each.
        notes: what a user should know about how the pixels are read (energy planes summed), one line each.
        energy_grouping: how a counts cube's energy planes are summed into the instrument's bands, or None when
            its planes are the bands.
        adu_per_unit: what :meth:`read_window` multiplies the file's pixels by to give the instrument's ADU
            (:func:`image_units`: 1 unless a CCD image's BUNIT is electrons or a rate).
        unit: the file's own pixel unit when it is not the ADU (catalog fluxes are given back in it), else None.
        saturation_adu: the image's own saturation level in the instrument's ADU (:func:`image_saturation`), or
            None: the instrument's (``noise.saturation``).
        gain: the image's own gain, e- per ADU (:func:`image_gain`), or None: the instrument's (``noise.gain``).
    """

    path: Path
    format: str
    shape: tuple[int, int, int]
    wcs: WCS | None
    instrument: Instrument | None
    instrument_source: str
    bands: list[str]
    energy_edges_kev: np.ndarray | None
    hdu_label: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    energy_grouping: EnergyGrouping | None = None
    adu_per_unit: float = 1.0
    unit: u.UnitBase | None = None
    saturation_adu: float | None = None
    gain: float | None = None
    _hdul: fits.HDUList | None = field(default=None, repr=False)
    _planes: list[tuple[int, tuple]] = field(default_factory=list, repr=False)  # (hdu index, leading index)
    _n_planes: int = 0  # planes in the file (more than shape[0] when energy planes are summed)
    _mask_hdu: int | None = field(default=None, repr=False)
    # (headers, where) of a CCD image whose header does not say its unit: open_image asks its noise (units_from_noise)
    _units_from: tuple | None = field(default=None, repr=False)
    _dq: tuple[int, int] | None = field(default=None, repr=False)  # (DQ HDU index, bad bits): DQ_BAD_BITS
    _mask_file: tuple[fits.HDUList, int, int | None] | None = field(default=None, repr=False)  # (file, HDU, bits)
    _loaded: dict = field(default_factory=dict, repr=False)  # HDUs astropy could not section, read whole

    # -- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
        if self._mask_file is not None:
            self._mask_file[0].close()
            self._mask_file = None

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- facts -------------------------------------------------------------------------------------------------
    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]

    @property
    def pixel_scale_deg(self) -> float | None:
        """Mean pixel scale in degrees, or None without a WCS."""
        return None if self.wcs is None else pixel_scale_deg(self.wcs)

    # -- pixels ------------------------------------------------------------------------------------------------
    def _section(self, index: int, key: tuple) -> np.ndarray:
        """Pixels of one HDU through astropy's lazy section (only the rows asked for are read from disk)."""
        if index in self._loaded:
            return self._loaded[index][key]
        try:
            return np.asarray(self._hdul[index].section[key])
        except (IndexError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "memory-mapped" not in str(e):
                raise SkyfmError(f"{self.path}: cannot read {self.hdu_label} ({_first_line(e)})") from None
            # Scaled integer images (BSCALE / BZERO / BLANK) cannot be memory-mapped, and astropy's section fails
            # on a few BLANK pixels (it indexes .flat with a tuple): read such an HDU whole, once, without memmap.
            try:
                self._loaded[index] = fits.getdata(self.path, ext=index, memmap=False)
            except (OSError, EOFError, ValueError, TypeError) as e2:
                raise SkyfmError(f"{self.path}: cannot read {self.hdu_label} ({_first_line(e2)})") from None
            return self._loaded[index][key]
        except (OSError, EOFError) as e:  # EOFError: a cut gzip stream
            raise SkyfmError(f"{self.path}: cannot read {self.hdu_label} ({_first_line(e)})") from None

    def read_window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of rows ``y0:y1``, columns ``x0:x1`` as float32 (C, h, w); invalid pixels, and pixels of the
        window that lie outside the image, are NaN."""
        if self._hdul is None:
            raise SkyfmError(f"{self.path} is closed")
        if not (y0 < y1 and x0 < x1):
            raise SkyfmError(f"empty window rows {y0}:{y1}, columns {x0}:{x1}")
        out = np.full((self._n_planes or self.shape[0], y1 - y0, x1 - x0), np.nan, dtype=np.float32)
        ry0, ry1 = max(y0, 0), min(y1, self.height)
        rx0, rx1 = max(x0, 0), min(x1, self.width)
        if ry0 >= ry1 or rx0 >= rx1:
            return out
        inner = out[:, ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0]
        rows, cols = slice(ry0, ry1), slice(rx0, rx1)
        plane = 0
        for index, lead in self._planes:
            block = self._section(index, lead + (Ellipsis, rows, cols))
            block = block.reshape((-1,) + block.shape[-2:])
            inner[plane:plane + len(block)] = block
            plane += len(block)
        for values, bits in self._bad_pixel_flags(rows, cols):  # non-zero (or with one of ``bits`` set): invalid
            flagged = values != 0 if bits is None else (np.nan_to_num(values).astype(np.int64) & bits) != 0
            inner[np.broadcast_to(flagged, inner.shape)] = np.nan
        inner[~np.isfinite(inner)] = np.nan
        if self.adu_per_unit != 1.0:
            out *= np.float32(self.adu_per_unit)
        return out if self.energy_grouping is None else self.energy_grouping.apply(out)

    def _bad_pixel_flags(self, rows: slice, cols: slice):
        """(values, bits) of each bad-pixel source of the window: a MASK image HDU (bits None: non-zero is bad), a
        mask file beside the image (``mask=``, ``skyfm detect --mask``; its ``mask_bits``), an HST / JWST ``DQ``
        extension (:data:`DQ_BAD_BITS`)."""
        if self._mask_hdu is not None:
            yield self._section(self._mask_hdu, (Ellipsis, rows, cols)), None
        if self._mask_file is not None:
            mask_hdul, mask_index, bits = self._mask_file
            try:
                values = np.asarray(mask_hdul[mask_index].section[(Ellipsis, rows, cols)])
            except (OSError, EOFError, ValueError, TypeError, IndexError) as e:
                raise SkyfmError(f"{mask_hdul.filename()}: cannot read the mask ({_first_line(e)})") from None
            yield values, bits
        if self._dq is not None:
            dq_index, bad_bits = self._dq
            yield self._section(dq_index, (Ellipsis, rows, cols)), bad_bits

    def read_patch_window(self, y0: int, y1: int, x0: int, x1: int) -> Patch:
        """Rows ``y0:y1``, columns ``x0:x1`` as a Patch with its own WCS; invalid or outside pixels masked and 0."""
        data = self.read_window(y0, y1, x0, x1)
        wcs = None if self.wcs is None else self.wcs.slice((slice(y0, y1), slice(x0, x1)))
        return _patch_from_pixels(self, data, wcs, meta={"tile_y0": y0, "tile_x0": x0})

    def masked_fraction(self) -> float:
        """Fraction of pixels invalid in any band, scanned a block of rows at a time (bounded memory)."""
        rows = max(1, _SCAN_PIXELS // (self.shape[0] * self.width))
        bad = 0
        for y0 in range(0, self.height, rows):
            block = self.read_window(y0, min(y0 + rows, self.height), 0, self.width)
            bad += int(np.isnan(block).any(axis=0).sum())
        return bad / (self.height * self.width)

    def require_patchable(self) -> None:
        """Raise the first problem that stops these pixels from becoming a Patch (unknown instrument or band)."""
        if self.problems:
            raise SkyfmError(self.problems[0])


def _patch_from_pixels(image: ImageFile, data: np.ndarray, wcs: WCS | None, meta: dict) -> Patch:
    image.require_patchable()
    invalid = np.isnan(data).any(axis=0)
    data[:, invalid] = 0.0
    return Patch(
        data=data, instrument=image.instrument.name, bands=list(image.bands), wcs=wcs,
        mask=invalid if invalid.any() else None, energy_edges_kev=image.energy_edges_kev,
        meta={"file": image.path.name, "hdu": image.hdu_label, **meta, **_unit_meta(image)},
    )


def _unit_meta(image: ImageFile) -> dict:
    """What a Patch's meta says of pixels read in another unit than the instrument's ADU (``skyfm denoise``
    writes its output back in it)."""
    return {} if image.unit is None else {"adu_per_unit": image.adu_per_unit, "unit": image.unit.to_string()}


# The data-quality flags (a ``DQ`` extension beside each ``SCI``, same EXTVER) that make a pixel unusable, by
# TELESCOP. HST (ACS, WFC3, STIS): every flag but CTE tails (32) and warm pixels (64), which measure fine, and
# full-well and A-to-D saturation (256, 2048), which skyfm finds itself from the pixel values and needs unmasked
# to place and measure saturated stars. JWST: DO_NOT_USE (1), set by its pipeline on whatever it judged unusable.
DQ_BAD_BITS = {"HST": ~(32 | 64 | 256 | 2048), "JWST": 1}


def _dq_hdu_for(hdul: fits.HDUList, index: int, shape: tuple[int, int, int], headers: list[fits.Header],
                where: str) -> tuple[tuple[int, int] | None, str | None]:
    """((DQ HDU index, bad bits), note) for the science HDU ``index``: its ``DQ`` extension (same EXTVER, same
    size) when the telescope's flags are known (:data:`DQ_BAD_BITS`); else (None, a note if a DQ is ignored)."""
    ver = hdul[index].ver
    for i, h in enumerate(hdul):
        if i == index or h.name.upper() != "DQ" or h.ver != ver or not _has_image(h):
            continue
        if _hdu_shape(h) not in (shape[1:], shape):
            continue
        telescope = next((str(hd["TELESCOP"]).strip().upper() for hd in headers if "TELESCOP" in hd), "")
        label = _hdu_label(hdul, i)
        if telescope not in DQ_BAD_BITS:
            return None, (f"{where}: {label} holds data-quality flags, but skyfm knows what they mean only for "
                          f"{' and '.join(DQ_BAD_BITS)} files (TELESCOP {telescope or 'missing'}): not used; give "
                          "the bad pixels as a MASK image HDU (non-zero = bad) or as NaN")
        bits = DQ_BAD_BITS[telescope]
        return (i, bits), (f"{where}: pixels flagged in {label} masked ({telescope} data-quality bits "
                           f"{_bit_list(bits)})")
    return None, None


def _bit_list(bits: int) -> str:
    """``1`` or ``all but 32, 64, ...`` for a (possibly complemented) bit mask."""
    if bits >= 0:
        return ", ".join(str(1 << k) for k in range(bits.bit_length()) if bits >> k & 1)
    return "all but " + ", ".join(str(1 << k) for k in range((~bits).bit_length()) if ~bits >> k & 1)


def _hdu_shape(hdu) -> tuple[int, ...]:
    """An image HDU's data shape in numpy order, from its header (no pixels read)."""
    return tuple(int(hdu.header.get(f"NAXIS{k}", 0)) for k in range(hdu.header.get("NAXIS", 0), 0, -1))


def _mask_hdu_for(hdul: fits.HDUList, shape: tuple[int, int, int]) -> int | None:
    """Index of a user's ``MASK`` image HDU matching the image's (H, W) or (C, H, W), else None."""
    for i, h in enumerate(hdul):
        if h.name.upper() == MASK_HDU and h.is_image and h.header.get(_ROLE_KEY) != "MASK":
            if _hdu_shape(h) in (shape[1:], shape):
                return i
    return None


def bands_hdu(hdul: fits.HDUList, header: fits.Header, where: str) -> int | None:
    """Index of the table giving the energy range of each plane of an image or map, else None: the HDU its
    ``BANDSHDU`` keyword names (the gamma-astro-data-formats convention gammapy writes, e.g. ``COUNTS_BANDS``),
    else ``EBOUNDS`` (Fermi's gtbin); a named table that is missing is an error."""
    names = [h.name.upper() for h in hdul]
    named = str(header.get("BANDSHDU", "")).strip().upper()
    if named:
        if named not in names:
            raise SkyfmError(f"{where}: its BANDSHDU keyword names a table {named!r} that the file does not have "
                             f"(HDUs: {_hdu_list_summary(hdul)})")
        return names.index(named)
    return names.index(EBOUNDS_HDU) if EBOUNDS_HDU in names else None


def _skyfm_science_hdus(hdul: fits.HDUList) -> list[int]:
    return [i for i, h in enumerate(hdul) if h.is_image and h.header.get(_ROLE_KEY) == "SCIENCE"]


def open_image(path: str | Path, *, instrument=None, hdu: int | str | None = None, band: str | None = None,
               mask: str | Path | None = None, mask_bits: int | None = None, bunit: str | None = None) -> ImageFile:
    """Open a FITS image lazily (memory-mapped; pixels are read only by ``read_window``). See the module docstring.

    ``mask``: a bad-pixel mask in a FITS file of its own, as many pipelines write beside their images (a
    MeerLICHT / BlackGEM ``_mask.fits.fz``, a ZTF ``mskimg``): non-zero pixels are bad, or with ``mask_bits`` only
    those with one of these bits set (leave a pipeline's saturation flags out: skyfm finds saturated stars from the
    pixel values and needs them). Its HDU is the image's own index where the mask file has an image of the size
    there (one mask per CCD), else its first image. The returned :class:`ImageFile` holds the file(s) open: use it
    in a ``with`` block or call ``close()``.

    ``bunit``: a CCD image's pixel unit, in place of its header's BUNIT (a file with none, or a wrong one): ADU, DN,
    counts, electrons, or any of these per second (the exposure time from the header's EXPTIME).
    """
    hdul = open_fits(path, memmap=True)
    try:
        image = _describe_image(Path(path), hdul, instrument, hdu, band, bunit)
    except BaseException:
        hdul.close()
        raise
    return _with_units(_attach_mask(image, mask, mask_bits))


def _with_units(image: ImageFile) -> ImageFile:
    """``image`` with its unit from its pixels' noise where its header does not say it (:func:`units_from_noise`);
    closed on any error."""
    if image._units_from is not None:
        try:
            units_from_noise(image, *image._units_from)
        except BaseException:
            image.close()
            raise
    return image


def _attach_mask(image: ImageFile, mask, mask_bits: int | None) -> ImageFile:
    """``image`` with a bad-pixel mask file (:func:`open_image`'s ``mask``, ``mask_bits``); closed on any error."""
    try:
        if mask is None:
            if mask_bits is not None:
                raise SkyfmError("mask bits were given without a mask file (--mask-bits needs --mask)")
            return image
        image._mask_file = _open_mask_file(Path(mask), image._planes[0][0], image.shape, mask_bits)
    except BaseException:
        image.close()
        raise
    return image


def _open_mask_file(path: Path, index: int, shape: tuple[int, int, int], bits: int | None):
    """(HDUList, HDU index, bits) of a bad-pixel mask file for an image HDU ``index`` of ``shape`` (C, H, W)."""
    check_fits_file(path)
    if bits is not None and (isinstance(bits, bool) or int(bits) <= 0):
        raise SkyfmError(f"mask bits should be a positive integer (a sum of bit values), got {bits!r}")
    hdul = open_fits(path, memmap=True)
    try:
        images = [i for i, h in enumerate(hdul) if _has_image(h)]
        if not images:
            raise SkyfmError(f"{path} (the mask) has no image data (HDUs: {_hdu_list_summary(hdul)})")
        chosen = index if index in images and _hdu_shape(hdul[index]) in (shape[1:], shape) else images[0]
        if _hdu_shape(hdul[chosen]) not in (shape[1:], shape):
            got = " x ".join(str(n) for n in _hdu_shape(hdul[chosen]))
            raise SkyfmError(f"{path} (the mask, {_hdu_label(hdul, chosen)}) is {got} pixels but the image is "
                             f"{shape[1]} x {shape[2]}")
        return hdul, chosen, None if bits is None else int(bits)
    except BaseException:
        hdul.close()
        raise


HEALPIX_MASK_ERROR = "--mask is for pixel images; a HEALPix map marks bad pixels with UNSEEN or NaN"


def parse_mask_bits(text: str | None) -> int | None:
    """``--mask-bits``: bit values separated by commas (``1,2,16``) or their sum (``19``, ``0x13``) -> their sum
    (None: none given)."""
    if text is None:
        return None
    try:
        values = [int(part.strip(), 0) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise SkyfmError(f"--mask-bits should be bit values such as 1,2,16 or their sum, got {text!r}")
    total = 0
    for v in values:
        total |= v
    return total


def _describe_image(path: Path, hdul: fits.HDUList, instrument, hdu, band, bunit: str | None = None) -> ImageFile:
    index = select_hdu(hdul, hdu, path)
    header = hdul[index].header
    label = _hdu_label(hdul, index)
    where = f"{path} {label}" if index else str(path)
    if not _has_image(hdul[index]):
        if _is_healpix(hdul[index]):
            raise SkyfmError(f"{where} is a HEALPix map, not an image: cut it into tiles with skyfm.data.healpix")
        raise SkyfmError(f"{where} has no image data (it is a {type(hdul[index]).__name__})")
    shape, dropped = _image_shape(header, where)
    headers = [header] + ([hdul[0].header] if index else [])
    inst, inst_source = resolve_instrument(instrument, headers)
    lead = (0,) * dropped
    planes = [(index, lead)]
    science = _skyfm_science_hdus(hdul)
    fmt = FORMAT_IMAGE
    problems = []
    if inst is None:
        problems.append(f"unknown instrument in {path} {inst_source.removeprefix('unknown ')}; "
                        "pass instrument= (--instrument NAME or a YAML file)")
    if hdu is None and "SKYFMINS" in hdul[0].header and science:
        fmt = FORMAT_SIMULATED
        if instrument is not None and inst.name != str(hdul[0].header["SKYFMINS"]):
            raise SkyfmError(f"{path} was simulated for {hdul[0].header['SKYFMINS']}, not {inst.name}")
        if len(science) > 1:  # a CCD patch: one 2-D image HDU per band
            planes = [(i, ()) for i in science]
            shape = (len(science),) + shape[1:]
    edges = None
    bands_index = bands_hdu(hdul, header, where)
    if bands_index is not None:
        edges = read_ebounds(hdul[bands_index], where)
        if len(edges) != shape[0]:
            raise SkyfmError(f"{where} has {shape[0]} energy plane(s) but its {hdul[bands_index].name} table has "
                             f"{len(edges)} rows")
        if fmt == FORMAT_IMAGE and int(header["NAXIS"]) - dropped == 3:
            fmt = FORMAT_CUBE
    not_counts = _not_counts(hdul, headers) if inst is not None and inst.is_counts and bands_index is None else None
    if not_counts:  # before the bands' problem, which a cube of one plane per energy would also have
        problems.append(f"{where}: {not_counts}")
    bands, edges, band_problem, grouping = _bands(hdul, planes, shape, inst, band, edges, where)
    if band_problem:
        problems.append(f"{where}: {band_problem}")
    notes = []
    others = _other_science_hdus(hdul, index) if hdu is None and fmt != FORMAT_SIMULATED else []
    if others:  # a camera's CCDs, one per extension: say that only one is read
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        notes.append(f"{path}: read {label}; {len(others)} other image HDU(s) of the same size ({shown}) are not "
                     "read: choose one with hdu= (--hdu), or detect in all with skyfm detect --hdu all")
        warnings.warn(MoreImagesWarning(notes[-1]), stacklevel=3)
    if grouping is not None:
        notes.append(f"{where}: {grouping.summary(inst.name)}")
        warnings.warn(EnergyBinsWarning(notes[-1]), stacklevel=3)
    adu_per_unit, unit, saturation_adu, gain, unit_told = 1.0, None, None, None, True
    if bunit is not None:
        _check_bunit_option(bunit, inst, fmt, where)
        raw = bunit_text(headers)
        aside = f", not the header's BUNIT {raw!r}" if raw and raw != bunit.strip() else ""
        notes.append(f"{where}: pixels in {bunit.strip()}, as --bunit says{aside}")
    if inst is not None and fmt != FORMAT_SIMULATED:
        told = headers if bunit is None else [fits.Header({"BUNIT": bunit.strip()})] + list(headers)
        adu_per_unit, unit, unit_told = image_units(told, inst, bands, where)
        if unit is not None:
            notes.append(f"{where}: pixels in {unit.to_string()}, read as {inst.name}'s ADU (x {adu_per_unit:.6g}); "
                         f"catalog fluxes in {unit.to_string()}")
        saturation_note = None
        if unit_told:  # else in the unit the noise gives (units_from_noise)
            saturation_adu, saturation_note = image_saturation(headers, inst, adu_per_unit, where)
        gain, gain_note = image_gain(headers, inst, unit, where)
        notes += [n for n in (saturation_note, gain_note) if n is not None]
    dq = None
    if fmt != FORMAT_SIMULATED:
        dq, dq_note = _dq_hdu_for(hdul, index, shape, headers, where)
        if dq_note:
            notes.append(dq_note)
            if dq is None:
                warnings.warn(DataQualityWarning(dq_note), stacklevel=3)
    wcs = celestial_wcs(header, where, hdul)
    return ImageFile(
        path=path, format=fmt, shape=(len(bands),) + shape[1:], wcs=wcs, instrument=inst,
        instrument_source=inst_source, bands=bands, energy_edges_kev=edges, hdu_label=label, problems=problems,
        notes=notes, energy_grouping=grouping, adu_per_unit=adu_per_unit, unit=unit, saturation_adu=saturation_adu,
        gain=gain, _units_from=None if unit_told else (headers, where),
        _hdul=hdul, _planes=planes, _n_planes=shape[0], _mask_hdu=_mask_hdu_for(hdul, shape),
        _dq=dq,
    )


def _bands(hdul, planes, shape, inst: Instrument | None, band: str | None, edges: np.ndarray | None, where: str):
    """(band names, energy edges keV or None, problem or None, EnergyGrouping or None) for the planes of an
    image; a counts cube binned otherwise than its instrument gets the names and edges of its summed groups."""
    names, edges, problem = _plane_bands(hdul, planes, shape, inst, band, edges)
    if edges is None or inst is None or not inst.is_counts or problem or band is not None:
        return names, edges, problem, None
    if set(names) <= {b.name for b in inst.bands}:
        return names, edges, problem, None
    grouping = group_energy_planes(edges, inst, where)
    return list(grouping.bands), grouping.edges_kev, None, grouping


#: the HDUs of a gammapy MapDataset file that ``skyfm detect`` reads beside its COUNTS, and the option for each
MAP_DATASET_OPTIONS = (("BACKGROUND", "--background"), ("EXPOSURE", "--exposure"), ("PSF", "--psf"))


def map_dataset_parts(hdu_names) -> list[tuple[str, str]]:
    """[(HDU name, the skyfm detect option that reads it)] of :data:`MAP_DATASET_OPTIONS` among ``hdu_names``
    (upper case) of a gammapy MapDataset file (one with a ``COUNTS`` image); [] for any other file."""
    names = set(hdu_names)
    return [(key, option) for key, option in MAP_DATASET_OPTIONS if key in names] if "COUNTS" in names else []


def parse_unit(text: str):
    """An astropy unit from a header's BUNIT text, or None where it is empty or astropy does not know it (quietly:
    the Fermi-LAT models' 'photon/cm**2/MeV/s/sr' draws a warning about its many slashes)."""
    if not text:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        unit = u.Unit(text, parse_strict="silent")
    return None if isinstance(unit, u.UnrecognizedUnit) else unit


def _not_counts(hdul, headers: list[fits.Header]) -> str | None:
    """Why an image given for a counts instrument, with no EBOUNDS, holds no counts, or None: an exposure cube
    (gtexpcube2's: BUNIT cm2 s) or a model intensity cube (the interstellar-emission model: BUNIT ph cm-2 s-1 MeV-1
    sr-1), or planes at energies rather than bins (an ENERGIES table). gtbin and gtmodel counts cubes carry
    EBOUNDS, so they are not questioned."""
    raw = bunit_text(headers)
    unit = parse_unit(raw)
    if unit is not None:
        if unit.is_equivalent(u.cm**2 * u.s):
            return (f"its pixels are an exposure (BUNIT {raw!r}), not counts: give it to skyfm detect as "
                    "--exposure, beside the counts cube")
        if set(unit.decompose().bases) & {u.m, u.s, u.kg, u.rad}:  # an intensity, a flux: physical dimensions
            return f"its pixels are in {raw!r}, not counts: a counts cube (gtbin's) is what skyfm detects in"
    if any(h.name == "ENERGIES" for h in hdul):
        return ("its planes are at energies (an ENERGIES table: an exposure or model cube), not counts in energy "
                "bins (EBOUNDS): an exposure cube goes to skyfm detect as --exposure")
    return None


def _plane_bands(hdul, planes, shape, inst: Instrument | None, band: str | None, edges: np.ndarray | None):
    """(band names, energy edges keV or None, problem or None) for the planes of an image."""
    n = shape[0]
    if band is not None and n > 1:
        return ["?"] * n, edges, f"band= names the band of a one-band image, but this one has {n} planes"
    if len(planes) > 1:  # a simulated CCD patch: FILTER on each band's HDU
        return [str(hdul[i].header.get("FILTER", f"band{k}")) for k, (i, _) in enumerate(planes)], None, None
    header = hdul[planes[0][0]].header
    if band is not None:
        if inst is None:
            return [band], edges, None
        b = inst.band(band)
        if b.energy is not None:
            edges = np.array([[b.energy[0].to_value(u.keV), b.energy[1].to_value(u.keV)]])
        return [b.name], edges, None
    if inst is not None and inst.is_counts and edges is None:
        edges = _dss_energy_kev(header) if n == 1 else None
        if edges is None and n == len(inst.bands):
            edges = np.array([[b.energy[0].to_value(u.keV), b.energy[1].to_value(u.keV)] for b in inst.bands])
    if edges is not None:
        return band_names_for_energies(edges, inst), edges, None
    if inst is None:
        return ["?"] * n, None, None
    if n == 1:
        if len(inst.bands) == 1:
            return [inst.bands[0].name], None, None
        name, problem = _filter_band([header] + ([hdul[0].header] if planes[0][0] != 0 else []), inst)
        return [name or "?"], None, problem
    if n == len(inst.bands):  # a cube with one plane per band of the instrument, in its order
        return [b.name for b in inst.bands], None, None
    return ["?"] * n, None, (f"it has {n} planes but {inst.name} has {len(inst.bands)} bands; "
                             "read one plane with hdu= or give the planes' bands in EBOUNDS")


# ----------------------------------------------------------------------------------------------------------------
def read_image(path: str | Path, *, instrument=None, hdu: int | str | None = None, band: str | None = None,
               mask: str | Path | None = None, mask_bits: int | None = None, bunit: str | None = None) -> Patch:
    """Read a FITS image (any image HDU, a gtbin counts cube or a skyfm patch file) into a Patch.

    Args:
        path: the FITS file (gzip / bzip2 compressed files too).
        instrument: instrument name or YAML path; default: from the header (TELESCOP / INSTRUME / SKYFMINS).
        hdu: HDU index or EXTNAME to read; default: the first HDU with image data (a skyfm patch: all bands).
        band: the band of a one-band image when its header does not say (FILTER / BAND / EBOUNDS).
        mask, mask_bits: a bad-pixel mask file beside the image, as :func:`open_image`.
        bunit: a CCD image's pixel unit in place of its header's BUNIT, as :func:`open_image`.

    Returns:
        A Patch: ``data`` float32 (C, H, W) with invalid pixels set to 0 and flagged in ``mask``; ``wcs`` the
        celestial WCS or None (then a :class:`NoWCSWarning` is issued); counts data carry ``energy_edges_kev``.
        A simulated patch also carries its truth, source image and contaminant mask.
    """
    with open_image(path, instrument=instrument, hdu=hdu, band=band, mask=mask, mask_bits=mask_bits,
                    bunit=bunit) as image:
        image.require_patchable()
        if image.format == FORMAT_SIMULATED:
            patch = read_patch(image.path)
            invalid = ~np.isfinite(patch.data)
            if image._mask_file is not None:  # a mask file given for a simulated patch too
                invalid |= np.isnan(image.read_window(0, image.height, 0, image.width))
            patch.data[invalid] = 0.0
            mask = invalid.any(axis=0)
            patch.mask = mask if mask.any() else None
        else:
            patch = _patch_from_pixels(image, image.read_window(0, image.height, 0, image.width), image.wcs, {})
    if patch.mask is not None and patch.mask.all():
        raise SkyfmError(f"{path}: every pixel is NaN, infinite or masked; there is no image to read")
    return patch


# ----------------------------------------------------------------------------------------------------------------
# What skyfm sees in a file: `skyfm info`.
# ----------------------------------------------------------------------------------------------------------------
def _healpix_index(hdul: fits.HDUList, hdu: int | str | None, path: Path) -> int | None:
    """Index of the HEALPix table to read (``hdu``, or the first one when the file has no image), else None."""
    if hdu is None:
        if any(_has_image(h) for h in hdul):
            return None
        return next((i for i, h in enumerate(hdul) if _is_healpix(h)), None)
    index = select_hdu(hdul, hdu, path)
    return index if _is_healpix(hdul[index]) else None


def wcs_summary(wcs: WCS, height: int, width: int) -> list[str]:
    """Lines describing a celestial WCS: projection, frame, centre (ra/dec and glon/glat), field size."""
    from astropy.wcs.utils import wcs_to_celestial_frame

    projection = wcs.wcs.ctype[0][5:].strip("-") or "linear"
    try:
        frame = wcs_to_celestial_frame(wcs).name
    except ValueError:
        frame = "unknown frame"
    centre = wcs.pixel_to_world((width - 1) / 2, (height - 1) / 2)
    icrs, gal = centre.icrs, centre.galactic
    scale = pixel_scale_deg(wcs)
    return [
        f"WCS:         {projection} projection, {frame} frame",
        f"centre:      ra {icrs.ra.deg:.5f}, dec {icrs.dec.deg:+.5f} deg; glon {gal.l.deg:.5f}, glat {gal.b.deg:+.5f} deg",
        f"field:       {format_angle(width * scale, 4)} x {format_angle(height * scale, 4)} (width x height)",
    ]


def _band_text(name: str, edges_kev: np.ndarray | None, k: int, inst: Instrument | None) -> str:
    if edges_kev is not None:
        label = energy_label(*edges_kev[k])
        return name if name == label else f"{name} ({label})"
    if inst is not None:
        try:
            return f"{name} ({inst.band(name).edges_label()})"
        except SkyfmError:
            pass
    return name


def inspect_file(path: str | Path, *, instrument=None, hdu: int | str | None = None, band: str | None = None,
                 mask=None, mask_bits: int | None = None, bunit: str | None = None) -> list[str]:
    """What skyfm sees in a file, as lines of text: format, instrument (and from where), shape, bands with their
    energy or wavelength ranges, pixel scale, WCS, masked fraction (with a bad-pixel mask file: counted in),
    truth rows."""
    hdul = open_fits(path, memmap=True)
    try:
        if _healpix_index(hdul, hdu, Path(path)) is not None:
            if mask is not None:
                raise SkyfmError(HEALPIX_MASK_ERROR)
            hdul.close()
            from skyfm.data.healpix import describe_healpix

            return describe_healpix(path, instrument=instrument, hdu=hdu)
        from skyfm.catalog.psf_file import describe_psf_file, only_psf

        if only_psf(hdul):
            hdul.close()
            return describe_psf_file(path, instrument=instrument)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EnergyBinsWarning)  # said below as a note
            image = _describe_image(Path(path), hdul, instrument, hdu, band, bunit)
    except BaseException:
        hdul.close()
        raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageUnitWarning)  # said below as a note
        image = _with_units(_attach_mask(image, mask, mask_bits))
    with image:
        inst = image.instrument
        lines = [
            f"file:        {image.path} ({image.hdu_label})",
            f"format:      {image.format}",
            f"instrument:  {inst.name} (from {image.instrument_source})" if inst else f"instrument:  {image.instrument_source}",
            f"shape:       {image.shape[0]} band(s) x {image.height} x {image.width} pixels (C, H, W)",
            "bands:       " + ", ".join(_band_text(b, image.energy_edges_kev, k, inst) for k, b in enumerate(image.bands)),
        ]
        if image.wcs is None:
            lines.append("WCS:         none: no celestial WCS, working in pixels")
        else:
            lines.insert(5, f"pixel scale: {format_angle(image.pixel_scale_deg, 4)}")
            lines += wcs_summary(image.wcs, image.height, image.width)
        masked = image.masked_fraction()
        if masked == 1.0:
            raise SkyfmError(f"{path}: every pixel is NaN, infinite or masked; there is no image to read")
        lines.append(f"masked:      {100 * masked:.3g}% of pixels")
        if image._mask_file is not None:
            mask_hdul, mask_index, bits = image._mask_file
            which = "its non-zero pixels" if bits is None else f"its pixels with bits {_bit_list(bits)}"
            lines[-1] += f" (counting {mask} {_hdu_label(mask_hdul, mask_index)}: {which})"
        if image.format == FORMAT_SIMULATED:
            hdul = image._hdul
            if "TRUTH" in [h.name for h in hdul]:
                lines.append(f"truth:       {hdul['TRUTH'].header.get('NAXIS2', 0)} true sources (TRUTH table)")
        beside = map_dataset_parts({h.name.upper() for h in image._hdul})
        if beside:  # a gammapy MapDataset file: the rest of what it holds
            lines.append("dataset:     " + ", ".join(k for k, _ in beside) + " beside the counts (a gammapy MapDataset "
                         "file?); skyfm detect uses them given this file as " + ", ".join(o for _, o in beside))
        lines += [f"note:        {p}" for p in image.notes + image.problems]
    return lines
