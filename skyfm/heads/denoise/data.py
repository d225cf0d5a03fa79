"""Training and validation images for the denoiser, simulated on the fly with their source-only truth.

Every image is one band of one simulated patch (``crop`` x ``crop`` pixels), in network space
(:mod:`skyfm.heads.denoise.transforms`): the observation, the source-only target, the valid-pixel plane and the
band's features. What is drawn depends only on the seed it is drawn from, so a training run is the same however
often it is stopped and resumed.

Seeds: training patches use seeds below 2**31 (``patch_seed(run_seed, i) & 0x7fffffff``); validation and benchmark
patches use seeds from :data:`HELD_OUT_SEED_BASE` = 2**31 upward, so the two sets can never share a patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skyfm.data.simulate import patch_seed, simulate_patch
from skyfm.heads.denoise.transforms import band_features, band_transform, instrument_kind
from skyfm.instruments import load_instrument

HELD_OUT_SEED_BASE = 2**31

DEFAULT_MIX = {"fermi-lat": 0.3, "ctao": 0.15, "meerlicht": 0.3, "hubble": 0.1, "wise": 0.15}


def train_seed(run_seed: int, index: int) -> int:
    """Seed of training patch ``index`` of a run: always below 2**31 (disjoint from held-out seeds)."""
    return patch_seed(run_seed, index) & 0x7FFFFFFF


def simulation_options(instrument: str, rng: np.random.Generator, fermi_plane_fraction: float = 0.4) -> dict:
    """Random simulator options for a training patch: populations, Galactic-plane centres, diffuse models."""
    if instrument == "fermi-lat":
        opts = {"population": "real" if rng.random() < 0.4 else "resampled",
                "galactic_model": "gas-disk" if rng.random() < 0.5 else "ic-halo"}
        if rng.random() < fermi_plane_fraction:
            opts["center"] = (float(rng.uniform(0, 360)), float(rng.uniform(-3, 3)))
        return opts
    if instrument == "ctao":
        return {"population": "plane" if rng.random() < 0.7 else "toy"}
    return {}


@dataclass
class Sample:
    """One band of one patch in network space; arrays (H, W) float32."""

    obs: np.ndarray
    target: np.ndarray
    present: np.ndarray
    features: np.ndarray
    instrument: str


def patch_samples(patch, softening: float = 1.0, bands=None, compress: float = 0.0) -> list[Sample]:
    """The bands (all, or the indices ``bands``) of a simulated patch as network-space samples."""
    inst = load_instrument(patch.instrument)
    kind = instrument_kind(inst)
    valid = np.ones(patch.data.shape[1:], bool) if patch.mask is None else ~patch.mask
    out = []
    for c in range(patch.n_bands) if bands is None else bands:
        tr = band_transform(patch.data[c], kind, softening, valid=valid, compress=compress)
        bi = inst.band_index(patch.bands[c])
        out.append(Sample(obs=tr.observation(patch.data[c]) * valid, target=tr.target(patch.source_image[c]),
                          present=valid.astype(np.float32), features=band_features(inst, bi),
                          instrument=inst.name))
    return out


def _augment(s: Sample, rng: np.random.Generator) -> Sample:
    k, flip = int(rng.integers(4)), bool(rng.integers(2))

    def f(a):
        a = np.rot90(a, k)
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    return Sample(f(s.obs), f(s.target), f(s.present), s.features, s.instrument)


def draw_batch(step_seed: int, n: int, crop: int, mix: dict | None = None, max_bands_per_patch: int = 3,
               softening: float = 1.0, fermi_plane_fraction: float = 0.4, seed_of=None,
               compress: float = 0.0) -> list[Sample]:
    """``n`` augmented one-band samples from freshly simulated patches; a function of ``step_seed`` only.

    ``seed_of(j)`` gives the simulator seed of the j-th patch drawn (default ``train_seed(step_seed, j)``).
    """
    mix = mix or DEFAULT_MIX
    names = list(mix)
    p = np.asarray([mix[k] for k in names], float)
    p /= p.sum()
    rng = np.random.default_rng([int(step_seed), 7])
    seed_of = seed_of or (lambda j: train_seed(step_seed, j))
    out: list[Sample] = []
    j = 0
    while len(out) < n:
        name = names[int(rng.choice(len(names), p=p))]
        patch = simulate_patch(name, seed_of(j), size=crop, **simulation_options(name, rng, fermi_plane_fraction))
        j += 1
        take = rng.permutation(patch.n_bands)[:max_bands_per_patch]
        out.extend(_augment(s, rng) for s in patch_samples(patch, softening, bands=take, compress=compress))
    return out[:n]


def stack(samples: list[Sample]):
    """Torch tensors obs, target, present (B, 1, H, W) and features (B, F) of a list of samples."""
    import torch

    def t(name):
        return torch.from_numpy(np.stack([getattr(s, name) for s in samples])[:, None].astype(np.float32))

    return t("obs"), t("target"), t("present"), torch.from_numpy(np.stack([s.features for s in samples]))
