"""Stellar populations for the CCD simulator: number counts, a simple stellar locus, and globular clusters.

Magnitudes are AB, in a *reference band* at :data:`REFERENCE_WAVELENGTH_UM` (an r-like band); the magnitude in an
instrument's band follows from the source's spectrum (see :func:`blackbody_colours`). Counting in one reference
band makes the sky the same for every instrument: how many of its sources an image shows follows from the
instrument's depth alone.

Three pieces:

* :class:`NumberCounts`: differential counts dN/dm per arcmin^2 per magnitude, exponential in magnitude
  (log10 dN/dm piecewise linear), used for field stars and galaxies alike. Counts are normalised by the
  surface density brighter than an anchor magnitude, the number star-count papers quote.
* :func:`blackbody_colours`: the colours of a black body of temperature T, m_band - m_ref in AB. For stars from
  3000 K to 10 000 K this reproduces the stellar locus to about 0.1-0.2 mag (g - r of the Sun: 0.48 vs 0.44
  observed; W1 - W2 (AB) on the Rayleigh-Jeans tail: -0.66 vs about -0.64).
* :class:`KingCluster`: a globular cluster whose projected star density follows King (1962),
  Sigma(r) = k [(1 + (r/rc)^2)^-1/2 - (1 + (rt/rc)^2)^-1/2]^2, with a luminosity function rising from the tip of
  the red-giant branch to the main-sequence turn-off and below it, and temperatures along an old isochrone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Wavelength (micron) of the band that all source magnitudes are drawn in: an r band.
REFERENCE_WAVELENGTH_UM = 0.62
# h c / k in micron kelvin: the black-body exponent is x = HC_OVER_K / (lambda T).
HC_OVER_K_UM_K = 14387.77
ARCSEC_PER_ARCMIN = 60.0


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NumberCounts:
    """Differential source counts, exponential in magnitude: log10(dN/dm) is piecewise linear in m.

    Attributes:
        anchor_mag, anchor_density: there are ``anchor_density`` sources per arcmin^2 between ``bright_mag`` and
            ``anchor_mag`` (reference-band AB magnitudes).
        slopes: d log10(dN/dm) / dm in each magnitude segment (0.6 would be a Euclidean universe; stars at high
            latitude have about 0.15-0.25, galaxies 0.45 bright and 0.3 faint).
        breaks: magnitudes between the segments (``len(slopes) - 1`` of them, increasing).
        bright_mag: no source is brighter than this.
    """

    anchor_mag: float
    anchor_density: float
    slopes: tuple[float, ...]
    breaks: tuple[float, ...] = ()
    bright_mag: float = 6.0

    def __post_init__(self):
        if len(self.breaks) != len(self.slopes) - 1:
            raise ValueError("NumberCounts needs one break fewer than slopes")

    def _edges(self) -> np.ndarray:
        return np.array([self.bright_mag, *self.breaks, np.inf])

    def _unnormalised_cumulative(self, m: np.ndarray) -> np.ndarray:
        """Integral of dN/dm from ``bright_mag`` to ``m`` with dN/dm = 1 at ``bright_mag``."""
        return _cumulative(np.asarray(m, dtype=np.float64), self._edges(), np.asarray(self.slopes, dtype=float))

    @property
    def _norm(self) -> float:
        return self.anchor_density / float(self._unnormalised_cumulative(np.array(self.anchor_mag)))

    def density(self, m_lo: float, m_hi: float) -> float:
        """Sources per arcmin^2 with ``m_lo <= m < m_hi``."""
        m_lo, m_hi = max(m_lo, self.bright_mag), max(m_hi, self.bright_mag)
        c = self._unnormalised_cumulative(np.array([m_lo, m_hi]))
        return float(self._norm * (c[1] - c[0]))

    def sample(self, rng: np.random.Generator, n: int, m_lo: float, m_hi: float) -> np.ndarray:
        """``n`` magnitudes drawn from the counts between ``m_lo`` and ``m_hi`` (exact inverse of the CDF)."""
        m_lo, m_hi = max(m_lo, self.bright_mag), max(m_hi, self.bright_mag)
        edges = self._edges()
        slopes = np.asarray(self.slopes, dtype=float)
        c_lo, c_hi = _cumulative(np.array([m_lo, m_hi]), edges, slopes)
        target = c_lo + rng.random(n) * (c_hi - c_lo)
        return _inverse_cumulative(target, edges, slopes)


def _segment_values(edges: np.ndarray, slopes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dN/dm at each segment's start (1 at the first) and the cumulative integral up to each segment's start."""
    widths = np.diff(edges[:-1])
    log_n0 = np.concatenate([[0.0], np.cumsum(slopes[:-1] * widths)])
    n0 = 10.0**log_n0
    seg_int = np.array([_segment_integral(n0[k], slopes[k], widths[k]) for k in range(len(widths))])
    c0 = np.concatenate([[0.0], np.cumsum(seg_int)])
    return n0, c0


def _segment_integral(n0: float, slope: float, width):
    """Integral over [0, width] of n0 10^(slope t) dt (the slope -> 0 limit is n0 width)."""
    k = slope * np.log(10.0)
    if abs(k) < 1e-12:
        return n0 * width
    return n0 * np.expm1(k * width) / k


def _cumulative(m: np.ndarray, edges: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    n0, c0 = _segment_values(edges, slopes)
    m = np.clip(m, edges[0], None)
    seg = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, len(slopes) - 1)
    t = m - edges[seg]
    k = slopes[seg] * np.log(10.0)
    safe_k = np.where(np.abs(k) < 1e-12, 1.0, k)
    part = np.where(np.abs(k) < 1e-12, n0[seg] * t, n0[seg] * np.expm1(k * t) / safe_k)
    return c0[seg] + part


def _inverse_cumulative(c: np.ndarray, edges: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    n0, c0 = _segment_values(edges, slopes)
    seg = np.clip(np.searchsorted(c0, c, side="right") - 1, 0, len(slopes) - 1)
    rest = c - c0[seg]
    k = slopes[seg] * np.log(10.0)
    safe_k = np.where(np.abs(k) < 1e-12, 1.0, k)
    t = np.where(np.abs(k) < 1e-12, rest / n0[seg], np.log1p(rest * safe_k / n0[seg]) / safe_k)
    return edges[seg] + t


# ----------------------------------------------------------------------------------------------------------------
def blackbody_colours(temperature_k: np.ndarray, wavelengths_um: np.ndarray,
                      reference_um: float = REFERENCE_WAVELENGTH_UM) -> np.ndarray:
    """AB colours m(lambda) - m(reference) of black bodies, evaluated at each band's central wavelength.

    AB magnitudes measure f_nu, so the colour is -2.5 log10(B_nu(lambda, T) / B_nu(lambda_ref, T)) with
    B_nu proportional to nu^3 / (exp(h nu / k T) - 1).

    Args:
        temperature_k: (N,) temperatures in kelvin.
        wavelengths_um: (C,) band wavelengths in micron.
    Returns:
        (N, C) colours in magnitudes (negative: brighter than in the reference band).
    """
    t = np.asarray(temperature_k, dtype=np.float64)[:, None]
    lam = np.asarray(wavelengths_um, dtype=np.float64)[None, :]
    return _log_bnu(lam, t) - _log_bnu(np.array([[reference_um]]), t)


def _log_bnu(lam_um: np.ndarray, t_k: np.ndarray) -> np.ndarray:
    """-2.5 log10 of B_nu up to a constant, stable for large h nu / k T."""
    x = HC_OVER_K_UM_K / (lam_um * t_k)
    # log(expm1(x)) = x + log(-expm1(-x)), without overflow for cool stars at short wavelengths
    log_expm1 = x + np.log(-np.expm1(-x))
    return -2.5 * (-3.0 * np.log10(lam_um) - log_expm1 / np.log(10.0))


def field_star_temperatures(rng: np.random.Generator, n: int) -> np.ndarray:
    """Effective temperatures (K) of field stars: mostly G and K dwarfs and halo turn-off stars.

    Log-normal about 5200 K (0.07 dex) with a tail of cool M dwarfs, limited to 3000-15 000 K.
    """
    t = 10.0 ** rng.normal(np.log10(5200.0), 0.07, n)
    cool = rng.random(n) < 0.15  # M dwarfs dominate faint star counts in the disc
    t[cool] = rng.uniform(3000.0, 3900.0, cool.sum())
    return np.clip(t, 3000.0, 15000.0)


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KingCluster:
    """A globular cluster on the pixel grid.

    Attributes:
        x, y: centre, pixels.
        core_radius, tidal_radius: King radii, pixels.
        central_density: stars per arcmin^2 at the centre brighter than ``turnoff_mag + 2``.
        turnoff_mag: reference-band AB magnitude of the main-sequence turn-off (sets the distance).
    """

    x: float
    y: float
    core_radius: float
    tidal_radius: float
    central_density: float
    turnoff_mag: float

    @property
    def concentration(self) -> float:
        return self.tidal_radius / self.core_radius

    def luminosity_function(self) -> NumberCounts:
        """Stars per arcmin^2 at the centre, per magnitude: red-giant branch up to 6.5 mag above the turn-off,
        rising main sequence below it, falling again 6 mag below it where the mass function flattens."""
        m = self.turnoff_mag
        return NumberCounts(anchor_mag=m + 2.0, anchor_density=self.central_density, slopes=(0.35, 0.2, -0.15),
                            breaks=(m, m + 6.0), bright_mag=m - 6.5)

    def enclosed_fraction(self, r: np.ndarray) -> np.ndarray:
        """Number of stars within projected radius ``r`` (pixels) in units of pi rc^2 times the central density."""
        a = 1.0 / np.sqrt(1.0 + self.concentration**2)
        xx = (np.minimum(np.asarray(r, dtype=np.float64), self.tidal_radius) / self.core_radius) ** 2
        return np.log1p(xx) - 4.0 * a * (np.sqrt(1.0 + xx) - 1.0) + a * a * xx

    def sample_positions(self, rng: np.random.Generator, n: int, r_max: float) -> tuple[np.ndarray, np.ndarray]:
        """``n`` positions (pixels) drawn from the King profile within radius ``r_max`` of the centre."""
        r_grid = np.linspace(0.0, min(r_max, self.tidal_radius), 2049)
        cdf = self.enclosed_fraction(r_grid)
        r = np.interp(rng.random(n) * cdf[-1], cdf, r_grid)
        phi = rng.uniform(0.0, 2.0 * np.pi, n)
        return self.x + r * np.cos(phi), self.y + r * np.sin(phi)

    def expected_members(self, r_max: float, m_faint: float, pixel_scale_arcsec: float) -> float:
        """Expected number of members within ``r_max`` pixels brighter than ``m_faint``."""
        a = 1.0 / np.sqrt(1.0 + self.concentration**2)
        central_shape = (1.0 - a) ** 2  # King's bracket at r = 0: converts the central density to k
        area_arcmin2 = np.pi * (self.core_radius * pixel_scale_arcsec / ARCSEC_PER_ARCMIN) ** 2
        lf = self.luminosity_function()
        per_arcmin2 = lf.density(lf.bright_mag, m_faint)
        return float(per_arcmin2 / central_shape * area_arcmin2 * self.enclosed_fraction(np.array(r_max)))


def draw_king_cluster(rng: np.random.Generator, width: int, height: int, pixel_scale_arcsec: float) -> KingCluster:
    """A random globular cluster centred in the middle half of a ``width`` x ``height`` image.

    Core radii 0.1-0.6 arcmin and concentrations log10(rt/rc) 1.2-2.0 span the Milky Way's clusters (Harris
    1996); central densities 500-5000 stars per arcmin^2 to 2 mag below the turn-off and turn-offs at 16.5-20.5
    mag (distances 5-30 kpc) give cores from resolved to hopelessly crowded.
    """
    rc_arcsec = 10.0 ** rng.uniform(np.log10(6.0), np.log10(36.0))
    rc = rc_arcsec / pixel_scale_arcsec
    return KingCluster(
        x=float(rng.uniform(0.25, 0.75) * (width - 1)),
        y=float(rng.uniform(0.25, 0.75) * (height - 1)),
        core_radius=float(rc),
        tidal_radius=float(rc * 10.0 ** rng.uniform(1.2, 2.0)),
        central_density=float(10.0 ** rng.uniform(np.log10(500.0), np.log10(5000.0))),
        turnoff_mag=float(rng.uniform(16.5, 20.5)),
    )


def sample_cluster_stars(rng: np.random.Generator, cluster: KingCluster, bounds: tuple[float, float, float, float],
                         m_faint: float, pixel_scale_arcsec: float) -> tuple[np.ndarray, ...]:
    """Members of ``cluster`` inside ``bounds`` = (x_min, x_max, y_min, y_max) pixels, brighter than ``m_faint``.

    Returns:
        x, y (pixels), reference-band magnitudes and temperatures (K) of the members.
    """
    x_min, x_max, y_min, y_max = bounds
    corners_x = np.array([x_min, x_max, x_min, x_max]) - cluster.x
    corners_y = np.array([y_min, y_min, y_max, y_max]) - cluster.y
    r_max = float(np.max(np.hypot(corners_x, corners_y)))
    n = rng.poisson(cluster.expected_members(r_max, m_faint, pixel_scale_arcsec))
    x, y = cluster.sample_positions(rng, n, r_max)
    inside = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)
    x, y = x[inside], y[inside]
    lf = cluster.luminosity_function()
    mag = lf.sample(rng, x.size, lf.bright_mag, m_faint)
    return x, y, mag, cluster_temperatures(rng, mag, cluster.turnoff_mag)


def cluster_temperatures(rng: np.random.Generator, mag: np.ndarray, turnoff_mag: float) -> np.ndarray:
    """Temperatures (K) along an old, metal-poor isochrone, from the magnitude below or above the turn-off.

    Main sequence: 6000 K at the turn-off cooling by 400 K per magnitude to M dwarfs; subgiants and giants:
    5600 K cooling to about 4300 K at the tip; a quarter of the stars 3-4 mag above the turn-off sit on the
    horizontal branch instead, at 6500-11 000 K.
    """
    dm = np.asarray(mag) - turnoff_mag
    t = np.where(dm >= 0.0, 6000.0 - 400.0 * dm, 5600.0 + 200.0 * dm)
    horizontal_branch = (dm < -3.0) & (dm > -4.0) & (rng.random(dm.size) < 0.25)
    t = np.where(horizontal_branch, rng.uniform(6500.0, 11000.0, dm.size), t)
    return np.clip(t * rng.normal(1.0, 0.02, dm.size), 3000.0, 15000.0)

