"""Gamma-ray source spectra in the forms of the Fermi-LAT catalogs, integrated over energy bins.

Three forms cover 4FGL-DR2 (``gll_psc_v27``), with ``E`` and the pivot energy ``E0`` in MeV and the normalisation
``K`` the differential flux at ``E0`` (ph cm-2 s-1 MeV-1):

* ``PowerLaw``:          ``dN/dE = K (E/E0)^-index``
* ``LogParabola``:       ``dN/dE = K (E/E0)^(-index - beta ln(E/E0))``
* ``PLSuperExpCutoff``:  ``dN/dE = K (E/E0)^-index exp(a (E0^b - E^b))``  (4FGL-DR2's ``PLSuperExpCutoff2``:
  ``a`` = ``PLEC_Expfactor`` in MeV^-b, ``b`` = ``PLEC_Exp_Index``; the cutoff energy is ``a^(-1/b)``).

Photon fluxes over a range of energies are integrated by Gauss-Legendre quadrature in ``ln E`` on sub-ranges no
wider than a factor :data:`MAX_RATIO_PER_PIECE`, which is exact to better than 1e-8 for these smooth forms.
A :class:`SpectrumSet` holds N spectra as arrays so that every operation is vectorised over sources.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

SPECTRUM_TYPES = ("PowerLaw", "LogParabola", "PLSuperExpCutoff")
POWER_LAW, LOG_PARABOLA, PLEC = range(3)

MAX_RATIO_PER_PIECE = 4.0  # widest energy ratio integrated by one Gauss-Legendre rule
QUADRATURE_NODES = 12  # nodes per piece


@lru_cache(maxsize=64)
def _log_energy_nodes(e_lo_mev: float, e_hi_mev: float) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature energies (MeV) and weights such that ``sum(w * f(E)) = integral of f dE`` over [lo, hi]."""
    n_pieces = max(1, int(np.ceil(np.log(e_hi_mev / e_lo_mev) / np.log(MAX_RATIO_PER_PIECE))))
    x, w = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
    edges = np.linspace(np.log(e_lo_mev), np.log(e_hi_mev), n_pieces + 1)
    half = 0.5 * np.diff(edges)
    mid = 0.5 * (edges[1:] + edges[:-1])
    log_e = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    energy = np.exp(log_e)
    weights = (half[:, None] * w[None, :]).ravel() * energy  # dE = E d(ln E)
    energy.flags.writeable = weights.flags.writeable = False  # shared by every caller through the cache
    return energy, weights


@dataclass(frozen=True)
class SpectrumSet:
    """N source spectra (see the module docstring for the forms); every attribute is an (N,) array.

    Attributes:
        kind: index into :data:`SPECTRUM_TYPES`.
        norm: K, differential flux at the pivot energy, ph cm-2 s-1 MeV-1.
        pivot_mev: E0, MeV.
        index: photon index (PowerLaw, PLSuperExpCutoff) or alpha (LogParabola).
        beta: LogParabola curvature (0 for the other forms).
        expfactor: PLSuperExpCutoff ``a`` in MeV^-b (0 for the other forms).
        exp_index: PLSuperExpCutoff ``b`` (1 for the other forms; unused there).
    """

    kind: np.ndarray
    norm: np.ndarray
    pivot_mev: np.ndarray
    index: np.ndarray
    beta: np.ndarray
    expfactor: np.ndarray
    exp_index: np.ndarray

    def __post_init__(self):
        n = len(np.atleast_1d(self.kind))
        for f in fields(self):
            value = np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.int64 if f.name == "kind" else np.float64))
            if value.shape != (n,):
                raise ValueError(f"SpectrumSet.{f.name} has shape {value.shape}, expected ({n},)")
            object.__setattr__(self, f.name, value)

    # --- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def power_law(cls, norm, index, pivot_mev) -> "SpectrumSet":
        n = np.broadcast(np.atleast_1d(norm), np.atleast_1d(index), np.atleast_1d(pivot_mev)).shape
        return cls(
            kind=np.full(n, POWER_LAW), norm=np.broadcast_to(norm, n), pivot_mev=np.broadcast_to(pivot_mev, n),
            index=np.broadcast_to(index, n), beta=np.zeros(n), expfactor=np.zeros(n), exp_index=np.ones(n),
        )

    @classmethod
    def empty(cls) -> "SpectrumSet":
        return cls(*(np.zeros(0) for _ in fields(cls)))

    @classmethod
    def concatenate(cls, sets: list["SpectrumSet"]) -> "SpectrumSet":
        if not sets:
            return cls.empty()
        return cls(*(np.concatenate([getattr(s, f.name) for s in sets]) for f in fields(cls)))

    def __len__(self) -> int:
        return len(self.kind)

    def subset(self, index) -> "SpectrumSet":
        return SpectrumSet(*(getattr(self, f.name)[index] for f in fields(self)))

    def with_norm(self, norm: np.ndarray) -> "SpectrumSet":
        return SpectrumSet(self.kind, norm, self.pivot_mev, self.index, self.beta, self.expfactor, self.exp_index)

    # --- physics -----------------------------------------------------------------------------------------------
    @property
    def type_names(self) -> np.ndarray:
        return np.asarray(SPECTRUM_TYPES, dtype=object)[self.kind]

    @property
    def cutoff_mev(self) -> np.ndarray:
        """Cutoff energy ``a^(-1/b)`` of PLSuperExpCutoff spectra (MeV); NaN for the other forms."""
        out = np.full(len(self), np.nan)
        plec = (self.kind == PLEC) & (self.expfactor > 0)
        out[plec] = self.expfactor[plec] ** (-1.0 / self.exp_index[plec])
        return out

    def shape(self, energy_mev: np.ndarray) -> np.ndarray:
        """dN/dE / K at ``energy_mev`` (M,): an (N, M) array."""
        e = np.asarray(energy_mev, dtype=np.float64)[None, :]
        e0 = self.pivot_mev[:, None]
        log_x = np.log(e / e0)
        exponent = -self.index[:, None] * log_x - self.beta[:, None] * log_x**2  # LogParabola: beta = 0 for PL
        plec = self.kind == PLEC
        if plec.any():
            b = self.exp_index[plec, None]
            exponent[plec] += self.expfactor[plec, None] * (e0[plec] ** b - e ** b)
        return np.exp(exponent)

    def dnde(self, energy_mev: np.ndarray) -> np.ndarray:
        """Differential flux (ph cm-2 s-1 MeV-1) at ``energy_mev`` (M,): an (N, M) array."""
        return self.norm[:, None] * self.shape(energy_mev)

    def photon_flux(self, e_lo_mev: float, e_hi_mev: float) -> np.ndarray:
        """Photon flux (ph cm-2 s-1) between two energies (MeV), per source: (N,)."""
        energy, weights = _log_energy_nodes(float(e_lo_mev), float(e_hi_mev))
        return self.dnde(energy) @ weights

    def band_fluxes(self, edges_mev: np.ndarray) -> np.ndarray:
        """Photon flux (ph cm-2 s-1) in each energy bin: ``edges_mev`` is (C, 2) [low, high]; returns (N, C)."""
        edges_mev = np.asarray(edges_mev, dtype=np.float64)
        if len(self) == 0:
            return np.zeros((0, len(edges_mev)))
        nodes = [_log_energy_nodes(float(lo), float(hi)) for lo, hi in edges_mev]
        # One evaluation at every bin's nodes, then a block-diagonal sum: (N, M) @ (M, C).
        weights = np.zeros((sum(len(e) for e, _ in nodes), len(nodes)))
        start = 0
        for c, (energy, w) in enumerate(nodes):
            weights[start : start + len(energy), c] = w
            start += len(energy)
        return self.dnde(np.concatenate([e for e, _ in nodes])) @ weights

    def energy_flux(self, e_lo_mev: float, e_hi_mev: float) -> np.ndarray:
        """Energy flux (MeV cm-2 s-1) between two energies (MeV), per source: (N,)."""
        energy, weights = _log_energy_nodes(float(e_lo_mev), float(e_hi_mev))
        return self.dnde(energy) @ (weights * energy)

    def scaled_to_photon_flux(self, flux: np.ndarray, e_lo_mev: float, e_hi_mev: float) -> "SpectrumSet":
        """The same shapes with K chosen so that the photon flux between the two energies equals ``flux``."""
        unit = self.with_norm(np.ones(len(self))).photon_flux(e_lo_mev, e_hi_mev)
        return self.with_norm(np.asarray(flux, dtype=np.float64) / unit)


def smoothly_broken_power_law(energy_mev: np.ndarray, index_low: float, index_high: float, break_mev: float,
                              smoothness: float = 1.0) -> np.ndarray:
    """``(E/Eb)^-index_low * (1 + (E/Eb)^((index_high - index_low)/s))^-s``: shape of diffuse emission spectra.

    Used by :mod:`skyfm.data.simulate.diffuse` for the pion-decay bump of gas emission (hard below the break,
    soft above) and other interstellar components; unnormalised.
    """
    x = np.asarray(energy_mev, dtype=np.float64) / break_mev
    return x ** (-index_low) * (1.0 + x ** ((index_high - index_low) / smoothness)) ** (-smoothness)


def integrate_shape(shape_fn, e_lo_mev: float, e_hi_mev: float) -> float:
    """Integral (over MeV) of a 1-D spectral shape function between two energies, by the same quadrature."""
    energy, weights = _log_energy_nodes(float(e_lo_mev), float(e_hi_mev))
    return float(np.asarray(shape_fn(energy)) @ weights)
