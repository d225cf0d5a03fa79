"""Simulators with truth for every instrument: gamma-ray counts cubes and CCD images.

:func:`simulate_patch` is the one entry point: it picks the simulator from the instrument's ``kind`` and returns a
:class:`~skyfm.data.Patch` with its image, truth catalog, source-only image and contaminant mask. The same
instrument, seed and options give the same patch, bit for bit.
"""

from __future__ import annotations

from skyfm.data.patch import Patch
from skyfm.instruments import Instrument, load_instrument


def patch_seed(seed: int, index: int) -> int:
    """The seed of patch ``index`` in a run started from ``seed``: independent streams, stable across runs."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def simulate_patch(instrument: str | Instrument, seed: int, **options) -> Patch:
    """Simulate one patch of ``instrument`` from ``seed``.

    ``options`` go to the instrument family's simulator: :func:`skyfm.data.simulate.gamma.simulate_counts_patch`
    for counts instruments, :func:`skyfm.data.simulate.ccd.simulate_ccd_patch` for CCDs (see their docstrings).
    """
    inst = load_instrument(instrument)
    if inst.is_counts:
        from skyfm.data.simulate.gamma import simulate_counts_patch

        return simulate_counts_patch(inst, seed, **options)
    from skyfm.data.simulate.ccd import simulate_ccd_patch

    return simulate_ccd_patch(inst, seed, **options)


__all__ = ["patch_seed", "simulate_patch"]
