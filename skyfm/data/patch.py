"""The Patch: what flows from readers and simulators into scaling, the tokenizer and the heads.

A patch is an image of one instrument on one pixel grid: ``data`` is float32 of shape (C, H, W), one plane per
energy bin or filter, with pixel (0, 0) centred at x = 0, y = 0 (x = column, y = row). Simulated patches also
carry their truth: the source catalog, the expected source-only image (for the denoiser) and a bit mask of the
contaminants (cosmic rays, trails, ...) that are not sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

# Bits of the contaminant mask (uint8). A pixel may carry several.
CONTAMINANT_BITS = {
    "cosmic_ray": 1,
    "satellite_trail": 2,
    "saturated": 4,
    "bleed_trail": 8,
    "hot_pixel": 16,
    "bad_pixel": 32,
}


@dataclass
class Patch:
    """An image of one instrument, with its world coordinates and, when simulated, its truth.

    Attributes:
        data: (C, H, W) float32. Counts per pixel per energy bin (counts instruments) or ADU per band (CCDs).
        instrument: instrument name (see :func:`skyfm.instruments.load_instrument`).
        bands: band names, one per plane of ``data``.
        wcs: 2-D celestial WCS of the pixel grid, or None when the image has none (then work in pixels).
        mask: (H, W) bool, True where a pixel is invalid (NaN in the file, masked, off the detector); or None.
        truth: simulated source catalog (see :mod:`skyfm.data.simulate` for its columns); None for real data.
        source_image: (C, H, W) float32 expected source-only image (no background, no noise, no contaminants).
        contaminant_mask: (C, H, W) uint8 with :data:`CONTAMINANT_BITS`.
        energy_edges_kev: (C, 2) energy edges of counts bins in keV (the EBOUNDS convention), else None.
        background_image: (C, H, W) float32 expected background counts (interstellar, isotropic, hadronic: the
            whole model except the sources), for simulated counts patches only; None for real data and CCDs.
            Kept in memory only: it is not written to FITS files or shards (``read_patch`` gives None).
        meta: scalar facts worth keeping (seed, seeing per band, background model, ...); written to the header.
    """

    data: np.ndarray
    instrument: str
    bands: list[str]
    wcs: WCS | None = None
    mask: np.ndarray | None = None
    truth: Table | None = None
    source_image: np.ndarray | None = None
    contaminant_mask: np.ndarray | None = None
    energy_edges_kev: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    background_image: np.ndarray | None = None

    def __post_init__(self):
        self.data = np.asarray(self.data, dtype=np.float32)
        if self.data.ndim != 3:
            raise ValueError(f"Patch.data must be (C, H, W), got shape {self.data.shape}")
        if len(self.bands) != self.data.shape[0]:
            raise ValueError(f"{len(self.bands)} band names for {self.data.shape[0]} planes")
        if self.wcs is not None and self.wcs.naxis != 2:
            raise ValueError("Patch.wcs must be a 2-D celestial WCS")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def n_bands(self) -> int:
        return self.data.shape[0]

    @property
    def height(self) -> int:
        return self.data.shape[1]

    @property
    def width(self) -> int:
        return self.data.shape[2]

    def instrument_config(self):
        """The :class:`~skyfm.instruments.Instrument` this patch belongs to."""
        from skyfm.instruments import load_instrument

        return load_instrument(self.instrument)

    def __repr__(self) -> str:
        n_truth = "" if self.truth is None else f", {len(self.truth)} true sources"
        wcs = "no WCS" if self.wcs is None else f"{self.wcs.wcs.ctype[0].split('-')[0]} WCS"
        return f"Patch({self.instrument}, bands={self.bands}, shape={self.shape}, {wcs}{n_truth})"
