"""Diffuse gamma-ray backgrounds: two interstellar-emission models of the Galaxy, the isotropic background, and
the residual hadronic background of Cherenkov telescopes.

Everything is analytic or procedural (seeded), with no external data, so that any patch of sky can be simulated.
Intensities are photon intensities above 1 GeV (ph cm-2 s-1 sr-1) times a spectral shape, integrated per energy
bin by :mod:`skyfm.data.simulate.spectra`'s quadrature.

**Interstellar emission** (:data:`INTERSTELLAR_MODELS`) is the sum of two components, as in the LAT's Galactic
interstellar emission models:

* *gas*: pion decay (and bremsstrahlung) from cosmic rays hitting interstellar gas. Its map follows a gas column:
  a ridge along the plane (Gaussian in latitude, brighter towards the inner Galaxy) plus local gas that follows
  the cosecant law of a plane-parallel slab, multiplied by a log-normal random field with a turbulence-like power
  spectrum (molecular clouds and filaments, different for every seed). Its spectrum is the pion bump: hard below
  about 1 GeV, soft (index ~2.7) above.
* *ic*: inverse-Compton scattering of starlight and the CMB by cosmic-ray electrons: smooth, broad in latitude,
  with a harder power-law spectrum (index ~2.4).

The two models differ in every respect a detector could learn: ``gas-disk`` is gas-dominated, narrow in latitude
and clumpy, with a thin inverse-Compton layer; ``ic-halo`` has a thicker, smoother gas disk and a bright, broad
inverse-Compton halo, so it is brighter off the plane and spectrally harder above a few GeV (inverse-Compton
emission is harder than pion decay). Train on one, test on the other, as LAT analyses do with alternative models.
Both are normalised to the LAT sky: about 1e-4 ph cm-2 s-1 sr-1 above 1 GeV on the inner Galactic ridge and
(1-2)e-6 at high latitudes. At TeV energies (CTAO) the same models, extrapolated, give a faint diffuse component.

**Isotropic**: a power law (YAML ``background.isotropic``). **Hadronic** (CTAO): misclassified cosmic rays,
counts per deg2 per band (YAML ``background.hadronic``), with a seeded gentle gradient across the patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from skyfm.data.simulate.spectra import integrate_shape, smoothly_broken_power_law

ONE_GEV_MEV = 1.0e3
HIGHEST_ENERGY_MEV = 1.0e9  # 1 PeV: the upper end of "above 1 GeV" integrals


@dataclass(frozen=True)
class GasComponent:
    """Pion-decay emission from interstellar gas. Intensities are above 1 GeV, ph cm-2 s-1 sr-1."""

    ridge: float  # on the plane towards the Galactic centre
    ridge_lat_sigma_deg: float  # latitude width of the ridge
    ridge_lon_scale_deg: float  # half-brightness longitude of the inner-Galaxy excess
    ridge_lon_floor: float  # outer-Galaxy brightness, as a fraction of the centre's
    local: float  # towards the Galactic poles: local gas, ~1/sin|b|
    local_min_sin_b: float  # caps the cosecant law in the plane (the slab's finite extent)
    clump_sigma: float  # log-normal scatter of the column density
    clump_outer_scale_deg: float  # largest scale of the clumps
    spectrum: tuple[float, float, float]  # (index below, index above, break energy MeV)

    def intensity(self, glon: np.ndarray, glat: np.ndarray) -> np.ndarray:
        """Smooth intensity above 1 GeV (before the clumps) at (glon, glat) in degrees."""
        lon = _wrap180(glon)
        lon_profile = self.ridge_lon_floor + (1.0 - self.ridge_lon_floor) / (1.0 + (lon / self.ridge_lon_scale_deg) ** 2)
        ridge = self.ridge * lon_profile * np.exp(-0.5 * (glat / self.ridge_lat_sigma_deg) ** 2)
        sin_b = np.sin(np.radians(glat))
        local = self.local / np.sqrt(sin_b**2 + self.local_min_sin_b**2)
        return ridge + local

    def spectral_shape(self, energy_mev: np.ndarray) -> np.ndarray:
        low, high, brk = self.spectrum
        return smoothly_broken_power_law(energy_mev, low, high, brk)


@dataclass(frozen=True)
class InverseComptonComponent:
    """Inverse-Compton emission: smooth and broad. Intensities are above 1 GeV, ph cm-2 s-1 sr-1."""

    centre: float  # at (l, b) = (0, 0)
    lon_scale_deg: float
    lon_floor: float
    lat_scale_deg: float
    lat_power: float  # latitude profile (1 + (b / scale)^2)^-power
    index: float

    def intensity(self, glon: np.ndarray, glat: np.ndarray) -> np.ndarray:
        lon = _wrap180(glon)
        lon_profile = self.lon_floor + (1.0 - self.lon_floor) / (1.0 + (lon / self.lon_scale_deg) ** 2)
        return self.centre * lon_profile * (1.0 + (glat / self.lat_scale_deg) ** 2) ** (-self.lat_power)

    def spectral_shape(self, energy_mev: np.ndarray) -> np.ndarray:
        return (np.asarray(energy_mev, dtype=np.float64) / ONE_GEV_MEV) ** (-self.index)


@dataclass(frozen=True)
class InterstellarModel:
    name: str
    description: str
    gas: GasComponent
    ic: InverseComptonComponent


INTERSTELLAR_MODELS: dict[str, InterstellarModel] = {
    "gas-disk": InterstellarModel(
        name="gas-disk",
        description="gas-dominated: thin clumpy gas disk (pion-decay spectrum) and a thin inverse-Compton layer",
        gas=GasComponent(ridge=1.1e-4, ridge_lat_sigma_deg=1.0, ridge_lon_scale_deg=40.0, ridge_lon_floor=0.12,
                         local=5.0e-7, local_min_sin_b=0.05, clump_sigma=0.5, clump_outer_scale_deg=3.0,
                         spectrum=(1.5, 2.75, 1000.0)),
        ic=InverseComptonComponent(centre=2.0e-5, lon_scale_deg=60.0, lon_floor=0.15, lat_scale_deg=10.0,
                                   lat_power=1.0, index=2.45),
    ),
    "ic-halo": InterstellarModel(
        name="ic-halo",
        description="halo-dominated: thick smooth gas disk and a bright, broad, harder inverse-Compton halo",
        gas=GasComponent(ridge=7.5e-5, ridge_lat_sigma_deg=1.8, ridge_lon_scale_deg=55.0, ridge_lon_floor=0.15,
                         local=4.0e-7, local_min_sin_b=0.08, clump_sigma=0.2, clump_outer_scale_deg=8.0,
                         spectrum=(1.6, 2.65, 1500.0)),
        ic=InverseComptonComponent(centre=3.0e-5, lon_scale_deg=80.0, lon_floor=0.2, lat_scale_deg=15.0,
                                   lat_power=1.0, index=2.35),
    ),
}


def _wrap180(glon: np.ndarray) -> np.ndarray:
    return (np.asarray(glon, dtype=np.float64) + 180.0) % 360.0 - 180.0


@lru_cache(maxsize=64)
def band_fractions(model_name: str, component: str, edges_mev: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Fraction of a component's intensity above 1 GeV that falls in each energy bin: (C,)."""
    comp = getattr(INTERSTELLAR_MODELS[model_name], component)
    above_1gev = integrate_shape(comp.spectral_shape, ONE_GEV_MEV, HIGHEST_ENERGY_MEV)
    return np.array([integrate_shape(comp.spectral_shape, lo, hi) for lo, hi in edges_mev]) / above_1gev


def isotropic_band_intensity(intensity_above_1gev: float, index: float, edges_mev: np.ndarray) -> np.ndarray:
    """Photon intensity (ph cm-2 s-1 sr-1) per bin of a power law with the given intensity above 1 GeV: (C,)."""
    edges_mev = np.asarray(edges_mev, dtype=np.float64)
    # Integral of E^-index from lo to hi, relative to its integral above 1 GeV (index > 1).
    lo, hi = edges_mev[:, 0] / ONE_GEV_MEV, edges_mev[:, 1] / ONE_GEV_MEV
    return intensity_above_1gev * (lo ** (1.0 - index) - hi ** (1.0 - index))


def lognormal_clumps(shape: tuple[int, int], step_deg: float, sigma: float, outer_scale_deg: float,
                     rng: np.random.Generator, slope: float = 3.0) -> np.ndarray:
    """A log-normal random field of mean 1 on a grid of ``step_deg`` pixels: ``exp(sigma g - sigma^2 / 2)``.

    ``g`` is a unit-variance Gaussian random field with power spectrum ``(k^2 + k0^2)^(-slope/2)``, ``k0 = 1 /
    outer_scale``; slope 3 is the projected spectrum of interstellar turbulence (a Kolmogorov-like cascade seen in
    column density). The field is periodic on the grid; grids are larger than the patch, so this is not seen.
    """
    if sigma <= 0:
        return np.ones(shape)
    ny, nx = shape
    ky = np.fft.fftfreq(ny, d=step_deg)[:, None]
    kx = np.fft.rfftfreq(nx, d=step_deg)[None, :]
    amplitude = (kx**2 + ky**2 + (1.0 / outer_scale_deg) ** 2) ** (-slope / 4.0)
    noise = np.fft.rfft2(rng.standard_normal(shape))
    g = np.fft.irfft2(noise * amplitude, s=shape)
    g /= g.std() or 1.0
    return np.exp(sigma * g - 0.5 * sigma**2)


def interstellar_maps(model_name: str, glon: np.ndarray, glat: np.ndarray, step_deg: float,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Intensity above 1 GeV (ph cm-2 s-1 sr-1) of each component on a 2-D grid of sky positions.

    Args:
        model_name: a key of :data:`INTERSTELLAR_MODELS`.
        glon, glat: (ny, nx) galactic coordinates (deg) of a regular grid of ``step_deg`` spacing.
        rng: draws the gas clumps.

    Returns:
        ``{"gas": (ny, nx), "ic": (ny, nx)}``.
    """
    model = INTERSTELLAR_MODELS[model_name]
    clumps = lognormal_clumps(glon.shape, step_deg, model.gas.clump_sigma, model.gas.clump_outer_scale_deg, rng)
    return {"gas": model.gas.intensity(glon, glat) * clumps, "ic": model.ic.intensity(glon, glat)}


def hadronic_gradient(shape: tuple[int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A plane ``1 + a (cos(t) u + sin(t) v)`` over the patch (u, v in [-1, 1]), t random: acceptance changes
    across a survey mosaic tilt the residual cosmic-ray background by up to ``amplitude`` at the edges."""
    h, w = shape
    theta = rng.uniform(0.0, 2.0 * np.pi)
    u = np.linspace(-1.0, 1.0, w)[None, :]
    v = np.linspace(-1.0, 1.0, h)[:, None]
    return 1.0 + amplitude * (np.cos(theta) * u + np.sin(theta) * v)
