"""Shapes of extended gamma-ray sources on a pixel grid: uniform disks, 2-D Gaussians and the real LAT templates.

Every function here returns a *unit-sum stamp*: a small (h, w) array that sums to 1 and a (row, column) corner that
places it on the pixel grid (0-based, pixel centres at integers, x = column, y = row). Multiplying a stamp by a
source's expected counts and adding it to the grid puts all of the source's flux on the grid before the PSF
convolution; nothing is lost at the stamp's edges.

Sizes are in pixels of the target grid. The grids skyfm simulates are CAR projections centred on the patch, which
are locally Cartesian: angles on the sky map to pixels with the nominal pixel scale to within 2.5% at the corners
of a 25.6-degree Fermi-LAT patch, and the shapes are rendered in that flat approximation.

The LAT templates (``Extended_12years``, 21 maps) ship in ``skyfm/resources/fermi_extended_templates.fits.gz``,
made by ``scripts/make_fermi_resources.py``: each on a galactic CAR grid centred on its source's catalog position,
unit sum. They are read once per process (:func:`load_templates`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy.special import erf

from skyfm.errors import SkyfmError

MORPHOLOGIES = ("point", "disk", "gaussian", "template")
TEMPLATES_FILE = "fermi_extended_templates.fits.gz"
DISK_R68_PER_RADIUS = float(np.sqrt(0.68))  # a uniform disk holds 68% of its flux within sqrt(0.68) R
GAUSS_R68_PER_SIGMA = float(np.sqrt(-2.0 * np.log(1.0 - 0.68)))  # 1.5096 for a circular 2-D Gaussian
GAUSS_STAMP_SIGMAS = 4.0  # a Gaussian stamp reaches this many sigma (holds all but 1e-4 of the flux; renormalised)


@dataclass(frozen=True)
class Stamp:
    """A unit-sum image of one source and where its first pixel lies on the grid."""

    image: np.ndarray  # (h, w) float64, sums to 1
    row0: int  # grid row of image[0, 0]
    col0: int  # grid column of image[0, 0]


def add_stamp(grid: np.ndarray, stamp: Stamp, weight: float) -> None:
    """Add ``weight * stamp`` to a 2-D ``grid`` in place; the parts of the stamp off the grid are dropped."""
    h, w = stamp.image.shape
    r0, c0 = max(stamp.row0, 0), max(stamp.col0, 0)
    r1, c1 = min(stamp.row0 + h, grid.shape[0]), min(stamp.col0 + w, grid.shape[1])
    if r0 >= r1 or c0 >= c1:
        return
    grid[r0:r1, c0:c1] += weight * stamp.image[r0 - stamp.row0 : r1 - stamp.row0, c0 - stamp.col0 : c1 - stamp.col0]


# ----------------------------------------------------------------------------------------------------------------
# Analytic shapes
# ----------------------------------------------------------------------------------------------------------------
def disk_stamp(x: float, y: float, radius_pix: float) -> Stamp:
    """A uniform disk of ``radius_pix`` centred at (x, y), integrated over pixels.

    Pixels cut by the rim get the fraction of their area inside it: exactly by sub-sampling for small disks (radius
    below 4 px), and for larger ones by the linear rim approximation ``clip(R - r + 1/2, 0, 1)``, which is exact
    for a straight edge and errs by less than 1/(8 R) px^2 per rim pixel.
    """
    radius_pix = max(float(radius_pix), 1e-3)
    half = int(np.ceil(radius_pix + 1.0))
    ix, iy = int(np.round(x)), int(np.round(y))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    if radius_pix < 4.0:
        n_sub = int(np.clip(np.ceil(16.0 / radius_pix), 8, 64))
        sub = (np.arange(n_sub) + 0.5) / n_sub - 0.5
        gx = (offsets[:, None] + sub[None, :]).ravel() + ix - x
        gy = (offsets[:, None] + sub[None, :]).ravel() + iy - y
        inside = (gy[:, None] ** 2 + gx[None, :] ** 2) <= radius_pix**2
        size = offsets.size
        image = inside.reshape(size, n_sub, size, n_sub).mean(axis=(1, 3))
    else:
        dx = offsets[None, :] + ix - x
        dy = offsets[:, None] + iy - y
        image = np.clip(radius_pix - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
    return Stamp(image / image.sum(), iy - half, ix - half)


def gaussian_stamp(x: float, y: float, sigma_pix: float) -> Stamp:
    """A circular 2-D Gaussian of ``sigma_pix`` centred at (x, y): exact pixel integrals (products of erf)."""
    sigma_pix = max(float(sigma_pix), 1e-3)
    half = int(np.ceil(GAUSS_STAMP_SIGMAS * sigma_pix + 1.0))
    ix, iy = int(np.round(x)), int(np.round(y))
    edges = np.arange(-half - 0.5, half + 1.5)
    s = np.sqrt(2.0) * sigma_pix
    px = np.diff(0.5 * erf((edges + ix - x) / s))
    py = np.diff(0.5 * erf((edges + iy - y) / s))
    image = py[:, None] * px[None, :]
    return Stamp(image / image.sum(), iy - half, ix - half)


# ----------------------------------------------------------------------------------------------------------------
# The LAT templates
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """One LAT spatial template on its own galactic CAR grid (north up, longitude increasing to the left).

    Attributes:
        name: template file stem (``W44``, ``RXJ1713_2016_250GeV``, ...).
        image: (n, n) float64, unit sum, centred on ``centre`` (the source's catalog position).
        scale_deg: template pixel side.
        centre: (glon, glat) of the grid centre, deg.
        centroid_pix: (dx, dy) of the flux centroid from the grid centre, template pixels.
        r68_deg: 68% containment radius about the grid centre (the catalog position), deg.
        r68_centroid_deg: 68% containment radius about the flux centroid, deg.
        source_name: the 4FGL-DR2 source that uses it ('' when none does).
    """

    name: str
    image: np.ndarray
    scale_deg: float
    centre: tuple[float, float]
    centroid_pix: tuple[float, float]
    r68_deg: float
    r68_centroid_deg: float
    source_name: str


def _r68(image: np.ndarray, cx: float, cy: float, scale_deg: float) -> float:
    yy, xx = np.indices(image.shape, dtype=np.float64)
    r = np.hypot(xx - cx, yy - cy).ravel() * scale_deg
    order = np.argsort(r)
    return float(r[order][np.searchsorted(np.cumsum(image.ravel()[order]), 0.68)])


@lru_cache(maxsize=1)
def load_templates() -> dict[str, Template]:
    """All shipped LAT templates by name (read once per process)."""
    from astropy.io import fits

    path = resources.files("skyfm") / "resources" / TEMPLATES_FILE
    out: dict[str, Template] = {}
    with resources.as_file(path) as p, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(p) as hdul:
            for hdu in hdul[1:]:
                image = np.asarray(hdu.data, dtype=np.float64)
                image = image / image.sum()
                n = image.shape[0]
                c = (n - 1) / 2.0
                yy, xx = np.indices(image.shape, dtype=np.float64)
                cx, cy = float((image * xx).sum()), float((image * yy).sum())
                scale = abs(float(hdu.header["CDELT1"]))
                name = str(hdu.header["TEMPLATE"])
                out[name] = Template(
                    name=name, image=image, scale_deg=scale, centre=(float(hdu.header["CRVAL1"]), float(hdu.header["CRVAL2"])),
                    centroid_pix=(cx - c, cy - c), r68_deg=_r68(image, c, c, scale),
                    r68_centroid_deg=_r68(image, cx, cy, scale), source_name=str(hdu.header.get("SRCNAME", "")),
                )
    return out


def template_names() -> tuple[str, ...]:
    return tuple(sorted(load_templates()))


def get_template(name: str) -> Template:
    templates = load_templates()
    if name not in templates:
        raise SkyfmError(f"unknown LAT template '{name}'; the shipped ones are {', '.join(sorted(templates))}")
    return templates[name]


@lru_cache(maxsize=256)
def _split_pixels(name: str, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A template's pixels split into factor x factor equal sub-pixels (a template is constant within a pixel, so
    this is exact): the non-zero sub-pixels' offsets (dx, dy) from the grid centre in template pixels, and their
    flux fractions (unit sum)."""
    image = get_template(name).image
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) / factor**2
    yy, xx = np.nonzero(image > 0)
    centre = (image.shape[0] - 1) / 2.0
    weight = image[yy, xx]
    return (xx - centre) / factor, (yy - centre) / factor, weight / weight.sum()


def template_stamp(name: str, x: float, y: float, pixel_scale_deg: float, *, scale: float = 1.0,
                   rotation_rad: float = 0.0, anchor: str = "centre") -> Stamp:
    """A LAT template placed on the grid, optionally resized and rotated.

    Each template pixel (split into sub-pixels no larger than a grid pixel) deposits its flux on the four nearest
    grid pixels (cloud-in-cell), which conserves flux and the centroid exactly.

    Args:
        name: template name (see :func:`template_names`).
        x, y: grid position (pixels) of the anchor point.
        pixel_scale_deg: grid pixel side.
        scale: angular size factor (1 = the source's real size).
        rotation_rad: counter-clockwise rotation on the grid (0 = galactic north along +y, as in the template);
            includes the angle between galactic north and the grid's +y axis at the source.
        anchor: ``"centre"`` puts the template's grid centre (the 4FGL catalog position) at (x, y); ``"centroid"``
            puts its flux centroid there (for synthetic sources, whose position is their centroid).
    """
    tpl = get_template(name)
    step_pix = tpl.scale_deg * scale / pixel_scale_deg  # template pixel in grid pixels
    # Sub-pixels no farther apart than a grid pixel: the cloud-in-cell deposit then leaves no gaps.
    dx, dy, weight = _split_pixels(name, max(1, int(np.ceil(step_pix))))
    u, v = dx * step_pix, dy * step_pix  # offsets in grid pixels, before rotation
    if anchor == "centroid":
        cu, cv = np.asarray(tpl.centroid_pix) * step_pix
        u, v = u - cu, v - cv
    elif anchor != "centre":
        raise ValueError(f"anchor must be 'centre' or 'centroid', got {anchor!r}")
    cos, sin = np.cos(rotation_rad), np.sin(rotation_rad)
    gx = x + cos * u - sin * v
    gy = y + sin * u + cos * v
    # Cloud-in-cell deposit on a box that holds every touched pixel.
    x0, y0 = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = gx - x0, gy - y0
    col0, row0 = int(x0.min()), int(y0.min())
    w_box, h_box = int(x0.max()) - col0 + 2, int(y0.max()) - row0 + 2
    image = np.zeros(h_box * w_box)
    for step_y, wy in ((0, 1.0 - fy), (1, fy)):
        for step_x, wx in ((0, 1.0 - fx), (1, fx)):
            flat = (y0 - row0 + step_y) * w_box + (x0 - col0 + step_x)
            image += np.bincount(flat, weights=weight * wy * wx, minlength=h_box * w_box)
    return Stamp(image.reshape(h_box, w_box) / image.sum(), row0, col0)


# ----------------------------------------------------------------------------------------------------------------
def morphology_r68_deg(morphology: str, size_deg: float, template: str = "", scale: float = 1.0) -> float:
    """68% containment radius (deg) of a shape: ``size_deg`` is a disk's radius or a Gaussian's sigma."""
    if morphology == "point":
        return 0.0
    if morphology == "disk":
        return DISK_R68_PER_RADIUS * size_deg
    if morphology == "gaussian":
        return GAUSS_R68_PER_SIGMA * size_deg
    if morphology == "template":
        return get_template(template).r68_centroid_deg * scale
    raise ValueError(f"unknown morphology {morphology!r}; use one of {MORPHOLOGIES}")
