"""A counts cube's background model from the diffuse-emission files every Fermi-LAT analysis starts from.

The Poisson likelihood refinement and the TS map need the expected background counts in every pixel and bin
(``skyfm detect --background``). Fermi-LAT users seldom have those as a file: Fermitools make them (``gtsrcmaps``,
``gtmodel``) from the interstellar-emission model (``gll_iem_v07.fits``: a photon intensity, ph cm-2 s-1 MeV-1
sr-1, on an all-sky grid with an ``ENERGIES`` table of its planes' energies), the isotropic spectrum
(``iso_P8R3_SOURCE_V3_v1.txt``: energy in MeV, intensity, error) and the observation's exposure cube
(``gtexpcube2``). :func:`background_counts` does the same here: in each pixel of the counts cube and each of its
bins,

    mu = Omega_pixel * integral over the bin of (I_galactic(E) + I_isotropic(E)) * exposure(E) dE,

then convolves each bin with its PSF. The intensity is interpolated bilinearly in the sky and as a power law (linear
in log-log) between planes and, up to twice the last plane's energy (gll_iem_v07 and the isotropic spectra stop
below 1 TeV), beyond them, with a warning; the exposure as :class:`~skyfm.catalog.exposure.SkyCube` reads it; the
integral is a quadrature of 64 points per bin, uniform in log energy. The model is computed on the counts cube's
grid widened by the PSF kernels' radius, so that light from beyond the edge is counted, and cut back after the
convolution. The solid angle of each pixel comes from its corners on the sphere, so any projection is right.

No normalisation is fitted: a Fermi-LAT analysis frees the diffuse components' normalisations, skyfm takes the model
as given (:func:`background_counts` reports its total against the counts per bin, and ``skyfm detect`` warns when they
are far apart: a wrong exposure cube or a model of another event class).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from skyfm.catalog.exposure import SkyCube, log_energy_samples, log_energy_weights, read_sky_cube
from skyfm.errors import SkyfmError

#: the PSF kernels for the diffuse light reach out to the radius holding this fraction of the PSF (renormalised)
DIFFUSE_PSF_FRACTION = 0.995
#: at most this many pixels of kernel radius (the LAT's lowest bins at 0.1 deg pixels)
DIFFUSE_PSF_MAX_RADIUS = 40
#: quadrature points per bin
BIN_SAMPLES = 64
#: an intensity spectrum is extrapolated (a power law) up to this factor in energy beyond its last plane
EXTRAPOLATION_FACTOR = 2.0
#: pixels integrated at once (bounds the memory: a few hundred MB)
PIXEL_CHUNK = 65536
#: a model whose total counts in a bin are further than this factor from the counts' is warned of
MODEL_COUNTS_TOLERANCE = 1.5


def read_intensity_cube(path) -> SkyCube:
    """An interstellar-emission model cube (``gll_iem_v07.fits``; any photon intensity cube, ph cm-2 s-1 MeV-1
    sr-1, with its planes' energies in an ``ENERGIES`` table). A cube of bins rather than energies is an error."""
    cube = read_sky_cube(path, "intensity cube", "a photon intensity, ph cm-2 s-1 MeV-1 sr-1")
    if cube.energies_mev is None:
        raise SkyfmError(f"intensity cube {cube.source}: the planes of an intensity model are energies (an ENERGIES "
                         "table, as gll_iem_v07.fits has), not energy bins")
    return cube


def is_intensity_cube(path) -> bool:
    """Whether the FITS file ``path`` holds a photon intensity (BUNIT per cm2 s MeV sr, or planes at energies with an
    ``ENERGIES`` table and no ``EBOUNDS``) rather than expected counts: how ``skyfm detect --background`` tells an
    interstellar-emission model from a gtmodel counts cube."""
    import astropy.units as u

    from skyfm.data.readers import open_fits, parse_unit

    with open_fits(path) as hdul:
        names = {h.name for h in hdul}
        image = next((h for h in hdul if h.is_image and h.data is not None and h.header.get("NAXIS", 0) >= 2), None)
        raw = str(image.header.get("BUNIT", "")).strip() if image is not None else ""
    unit = parse_unit(raw)
    if unit is not None:
        per = (u.cm**-2 * u.s**-1 * u.MeV**-1 * u.sr**-1)
        return unit.is_equivalent(per) or unit.is_equivalent(u.ph * per)
    return "ENERGIES" in names and "EBOUNDS" not in names


def read_isotropic_spectrum(path) -> tuple[np.ndarray, np.ndarray]:
    """(energies MeV, intensity ph cm-2 s-1 MeV-1 sr-1) from an isotropic template text file, as the FSSC gives
    them (``iso_P8R3_SOURCE_V3_v1.txt``: whitespace-separated columns energy, intensity, error; ``#`` comments)."""
    path = Path(path)
    if not path.is_file():
        raise SkyfmError(f"isotropic spectrum {path}: file not found")
    try:
        table = np.loadtxt(path, comments="#", ndmin=2, dtype=np.float64)
    except ValueError as error:
        raise SkyfmError(f"isotropic spectrum {path.name}: not columns of numbers (energy in MeV, intensity in "
                         f"ph cm-2 s-1 MeV-1 sr-1[, error]): {str(error).splitlines()[0]}") from None
    if table.shape[1] < 2 or len(table) < 2:
        raise SkyfmError(f"isotropic spectrum {path.name}: needs at least two rows of energy (MeV) and intensity")
    energies, intensity = table[:, 0], table[:, 1]
    if not (np.all(np.isfinite(table[:, :2])) and np.all(energies > 0) and np.all(np.diff(energies) > 0)
            and np.all(intensity >= 0)):
        raise SkyfmError(f"isotropic spectrum {path.name}: energies should be positive and increasing, intensities "
                         "finite and >= 0")
    return energies, intensity


def _loglog(energies_mev: np.ndarray, nodes_mev: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Values at ``energies_mev`` interpolated as a power law between ``nodes_mev``, extrapolated as the power law
    of the last two nodes beyond the ends."""
    return np.exp(np.log(np.maximum(values, 1e-300)) @ log_energy_weights(nodes_mev, energies_mev))


def _widened(wcs, margin: int):
    """``wcs`` (celestial) for the grid grown by ``margin`` pixels on every side."""
    out = wcs.deepcopy()
    out.wcs.crpix = [c + margin for c in out.wcs.crpix]
    return out


def diffuse_kernels(inst, pixel_scale_deg: float, band_objs) -> list[np.ndarray]:
    """One PSF kernel per band for smooth emission, renormalised to 1 (a smooth sky loses no light to the
    truncation)."""
    from skyfm.catalog.likelihood import psf_kernels

    kernels = psf_kernels(inst, pixel_scale_deg, fraction=DIFFUSE_PSF_FRACTION, max_radius_pix=DIFFUSE_PSF_MAX_RADIUS,
                          psfs=[b.psf for b in band_objs])
    return [k / k.sum() for k in kernels]


def background_counts(wcs, shape: tuple[int, int], energy_edges_kev, exposure: SkyCube, intensity: SkyCube | None,
                      isotropic: tuple[np.ndarray, np.ndarray] | None, kernels: list[np.ndarray]) -> np.ndarray:
    """Expected background counts (C, H, W) float32 of a counts cube (module docstring).

    Args:
        wcs: the counts cube's celestial WCS; ``shape`` its (H, W).
        energy_edges_kev: (C, 2) its bins.
        exposure: the observation's exposure cube (:func:`~skyfm.catalog.exposure.read_exposure_cube`).
        intensity: the interstellar-emission model (:func:`read_intensity_cube`), or None.
        isotropic: (energies MeV, intensity) of the isotropic emission (:func:`read_isotropic_spectrum`), or None.
        kernels: one PSF kernel per bin, summing to 1 (:func:`diffuse_kernels`).

    Pixels the exposure or the intensity cube does not cover are an error (the model would be wrong there).
    """
    from scipy.signal import fftconvolve

    from skyfm.data.healpix import pixel_solid_angle

    if intensity is None and isotropic is None:
        raise SkyfmError("a background model needs an interstellar-emission cube, an isotropic spectrum, or both")
    edges = np.asarray(energy_edges_kev, dtype=np.float64).reshape(-1, 2) / 1e3  # MeV
    exposure.check_energies(edges)
    if intensity is not None:
        _check_reach(edges, intensity.energies_mev, f"intensity cube {intensity.source}")
    if isotropic is not None:
        _check_reach(edges, isotropic[0], "the isotropic spectrum")
    h, w = shape
    margin = max(k.shape[0] // 2 for k in kernels)
    big = _widened(wcs, margin)
    hb, wb = h + 2 * margin, w + 2 * margin
    omega = pixel_solid_angle(big, (hb, wb)).ravel()  # (N,) sr
    ys, xs = np.mgrid[0:hb, 0:wb]
    sky = big.pixel_to_world(xs.ravel(), ys.ravel())
    in_image = ((ys >= margin) & (ys < margin + h) & (xs >= margin) & (xs < margin + w)).ravel()
    pixels = {}
    for cube in (exposure, intensity):
        if cube is None:
            continue
        px, py = cube.sky_to_pixels(sky)
        if not cube.covers(px[in_image], py[in_image]).all():
            raise SkyfmError(f"{cube.what} {cube.source} does not cover the whole counts cube: make it on a grid that "
                             "does")
        pixels[id(cube)] = (px, py)  # beyond the image (the PSF's reach) a cube's edge stands in where it ends
    mu = np.zeros((len(edges), hb * wb))
    samples = [log_energy_samples(lo, hi, BIN_SAMPLES) for lo, hi in edges]
    for start in range(0, hb * wb, PIXEL_CHUNK):  # bounded memory on large cubes
        rows = slice(start, min(start + PIXEL_CHUNK, hb * wb))
        exp_planes = exposure.at_pixels(*(a[rows] for a in pixels[id(exposure)]), clamp=True)  # (n, P)
        log_gal = None
        if intensity is not None:
            gal = intensity.at_pixels(*(a[rows] for a in pixels[id(intensity)]), clamp=True)
            log_gal = np.log(np.maximum(gal, 1e-300))
        for c, (log_e, step) in enumerate(samples):
            energies = np.exp(log_e)
            total = np.zeros((rows.stop - rows.start, len(energies)))
            if log_gal is not None:
                total += np.exp(log_gal @ log_energy_weights(intensity.energies_mev, energies))
            if isotropic is not None:
                total += _loglog(energies, *isotropic)[None]
            exp_samples = exp_planes @ exposure.plane_weights(energies)  # (n, S)
            mu[c, rows] = omega[rows] * ((total * exp_samples) @ (energies * step))  # sum f E d(ln E) = int f dE
    out = np.zeros((len(edges), h, w), dtype=np.float32)
    for c in range(len(edges)):
        smooth = fftconvolve(mu[c].reshape(hb, wb), kernels[c], mode="same")
        out[c] = np.clip(smooth[margin:margin + h, margin:margin + w], 0.0, None)
    return out


def _check_reach(edges_mev: np.ndarray, nodes_mev: np.ndarray, what: str) -> None:
    """Bands within the nodes' energies are read; up to :data:`EXTRAPOLATION_FACTOR` beyond them the spectrum is
    extrapolated as a power law, with a warning (Fermi-LAT's gll_iem_v07 and isotropic spectra stop below 1 TeV);
    farther, an error."""
    lo, hi = float(nodes_mev[0]), float(nodes_mev[-1])
    if edges_mev.min() < lo / EXTRAPOLATION_FACTOR or edges_mev.max() > hi * EXTRAPOLATION_FACTOR:
        raise SkyfmError(f"{what} covers {lo:.4g}-{hi:.4g} MeV, too far from the image's {edges_mev.min():.4g}-"
                         f"{edges_mev.max():.4g} MeV to extrapolate")
    if edges_mev.min() < lo * 0.999 or edges_mev.max() > hi * 1.001:
        warnings.warn(f"{what} covers {lo:.4g}-{hi:.4g} MeV; the image's bins reach {edges_mev.min():.4g}-"
                      f"{edges_mev.max():.4g} MeV: extrapolated as the power law of its last two energies",
                      stacklevel=3)


__all__ = ["background_counts", "diffuse_kernels", "is_intensity_cube", "read_intensity_cube",
           "read_isotropic_spectrum"]
