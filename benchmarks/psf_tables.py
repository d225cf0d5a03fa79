"""PSF-fit stamp tables: build time and accuracy of the summed-area builder against direct oversampled stamps.

Run (from the repository root):

    .venv/bin/python benchmarks/psf_tables.py

The PSF fit of CCD detections (``skyfm.catalog.psf_fit``) interpolates pixel-integrated PSF stamps from a table
of sub-pixel offsets (``StampTable``: 97 x 97 offsets at 32 phases per pixel for the fit, 13 x 13 at 4 phases for
the seeing search). ``StampTable`` fills it from one summed-area table of the profile on a fine grid. The
reference here, ``direct``, is how the tables were built before: ``PSF.stamps`` at every offset with the fit's
oversampling (``_oversample``). Accuracy: the largest difference to stamps integrated with 32 x 32 sub-pixels,
over 50 random offsets within the table's reach, as a fraction of the stamp's peak (bilinear interpolation
between offsets included). One thread.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def direct_table(psf, scale: float, r: int, phases: int) -> np.ndarray:
    """The previous builder: PSF.stamps at every table offset, oversampled as the fit's tables need."""
    from skyfm.catalog.psf_fit import TABLE_REACH_PIX, _oversample

    n = int(round(2 * TABLE_REACH_PIX * phases))
    offsets = np.linspace(-TABLE_REACH_PIX, TABLE_REACH_PIX, n + 1)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    k, os_ = 2 * r + 1, _oversample(psf, scale)
    stamps = psf.stamps(dx.ravel(), dy.ravel(), scale, radius_pix=r, oversample=os_)
    return stamps.reshape(n + 1, n + 1, k, k)


def main() -> None:
    from skyfm.catalog.psf_fit import TABLE_PHASES, SEEING_PHASES, StampTable
    from skyfm.instruments import load_instrument

    print("| PSF | FWHM (px) | box radius (px) | phases | build, direct (s) | build, summed-area (s) | "
          "max error / peak, direct | summed-area |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, band in (("meerlicht", "q"), ("hubble", None), ("wise", "W1"), ("wise", "W4")):
        inst = load_instrument(name)
        b = inst.band(band) if band else inst.bands[0]
        psf, scale = b.psf, inst.pixel_scale_deg
        fwhm = psf.fwhm_deg / scale
        r = int(max(2, np.ceil(1.5 * fwhm)))
        dx, dy = rng.uniform(-1.4, 1.4, (2, 50))
        exact = psf.stamps(dx, dy, scale, radius_pix=r, oversample=32)
        for phases in (TABLE_PHASES, SEEING_PHASES):
            t = time.perf_counter()
            ref = StampTable.__new__(StampTable)
            ref.table, ref.steps = direct_table(psf, scale, r, phases), int(round(3.0 * phases))
            t_direct = time.perf_counter() - t
            t = time.perf_counter()
            new = StampTable(psf, scale, r, phases)
            t_new = time.perf_counter() - t
            err = [np.abs(tab(dx, dy)[0] - exact).max() / exact.max() for tab in (ref, new)]
            print(f"| {name} {b.name} ({psf.model}) | {fwhm:.1f} | {r} | {phases} | {t_direct:.3f} | {t_new:.3f} | "
                  f"{err[0]:.1e} | {err[1]:.1e} |")


if __name__ == "__main__":
    main()
