"""What a pretrained backbone and its tokenizer are worth, measured on fresh simulated patches with truth.

Three measurements (``benchmarks/pretrain.py`` prints them; issue 3, "Measured"):

* **Linear probe.** Per token cell, a label from the truth catalog (:func:`token_labels`: a bright source centred
  in the cell, or clean background); the frozen backbone's band-averaged token features (:func:`token_features`);
  a standardised logistic regression trained on some patches and scored on the others (:func:`linear_probe`).
  A backbone whose latent space separates sources from background scores near 1; chance is 0.5 (balanced).
* **Tokenizer.** Reconstruction error, codebook usage and perplexity over the whole evaluation set, and what
  encode / decode does to faint sources (5 <= snr < 10): their aperture flux ratio and how many stay detectable
  (:func:`tokenizer_report`).

Evaluation patches never come from the training streams: :func:`simulate_eval_set` draws instrument ``name``'s
patch ``i`` from ``patch_seed(instrument_seed(EVAL_SEED_OFFSET + seed, name), i)``, while training shards use
``instrument_seed(seed, name)`` with the recipe's seed (0 for the built-in recipes). Seeds are hashed
(``numpy.random.SeedSequence``), so the two sets of 32-bit patch seeds are independent draws; a collision would
need one of about 2**32 values to repeat.

Pixel conventions are the project's: 0-based pixel centres, x = column, y = row. A token cell ``(i, j)`` of stride
``s`` covers pixels ``[i*s, (i+1)*s)`` in y and ``[j*s, (j+1)*s)`` in x, i.e. the coordinates
``[i*s - 0.5, (i+1)*s - 0.5)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from skyfm.data.patch import Patch
from skyfm.errors import SkyfmError

EVAL_SEED_OFFSET = 10_000  # evaluation streams start from base seed EVAL_SEED_OFFSET + seed (training: seed)
EVAL_INSTRUMENTS = ("fermi-lat", "ctao", "meerlicht", "hubble", "wise")

POSITIVE, NEGATIVE, AMBIGUOUS = 1, 0, -1
LABELLINGS = ("light", "distance")  # how token_labels finds clean background cells

FAINT_SNR = (5.0, 10.0)  # the faint sources of the tokenizer report: 5 <= snr < 10
DETECT_SNR = 3.0  # aperture S/N for "detectable"
MIN_APERTURE_RADIUS_PIX = 1.5  # undersampled PSFs (Fermi's high-energy bins) still get a few pixels
ANNULUS_RADII = (2.0, 3.0)  # the background annulus, in aperture radii
MIN_BACKGROUND_COUNTS = 1.0  # counts: floor of the background in the aperture, for the Poisson noise
SPLIT_TRIES = 50  # random patch splits tried by the probe until both sides hold both classes


# --------------------------------------------------------------------------------------------- the data
def eval_patch_seed(instrument: str, index: int, seed: int = 0) -> int:
    """The simulator seed of evaluation patch ``index`` of ``instrument`` (see the module docstring)."""
    from skyfm.data.shards import instrument_seed
    from skyfm.data.simulate import patch_seed

    return patch_seed(instrument_seed(EVAL_SEED_OFFSET + int(seed), instrument), index)


def simulate_eval_set(instrument: str, n: int, size: int = 64, seed: int = 0, **options) -> list[Patch]:
    """``n`` fresh ``size`` x ``size`` patches of ``instrument``, with truth, from seeds no training run uses.

    By default the instrument's scenes and populations are drawn as for the training shards; ``options`` go to
    the simulator (e.g. ``scene="field"`` for a CCD, ``population="real"`` for Fermi-LAT).
    """
    from skyfm.data.simulate import simulate_patch
    from skyfm.instruments import load_instrument

    if n < 1:
        raise SkyfmError(f"the evaluation set needs at least one patch, got n={n}")
    name = load_instrument(instrument).name
    return [simulate_patch(name, eval_patch_seed(name, i, seed), size=size, **options) for i in range(n)]


def patch_fwhm_pix(patch: Patch) -> np.ndarray:
    """(C,) PSF FWHM in pixels of each band of ``patch``.

    CCD simulators record the seeing each band was drawn with in ``meta["seeing_<band>"]`` (arcsec); otherwise
    the instrument's nominal PSF.
    """
    from skyfm.instruments import load_instrument

    inst = load_instrument(patch.instrument)
    pixel_arcsec = inst.pixel_scale_deg * 3600.0
    fwhm = []
    for band in patch.bands:
        seeing = patch.meta.get(f"seeing_{band}")
        fwhm.append(float(seeing) / pixel_arcsec if seeing is not None else inst.psf_fwhm_pix(inst.band_index(band)))
    return np.asarray(fwhm)


# ------------------------------------------------------------------------------------------ token labels
def cell_source_snr(patch: Patch, grid: tuple[int, int], stride: int) -> np.ndarray:
    """(h', w') signal-to-noise of the true sources' expected light inside each token cell.

    Per band, the cell's sum of ``patch.source_image`` over the cell's noise: for counts the Poisson noise of the
    expected background counts in the cell (``patch.background_image``; without it, the data minus the source
    image), at least ``MIN_BACKGROUND_COUNTS``; for CCDs the band's robust sigma (of the data minus the source
    image) times sqrt(pixels). Bands are added in quadrature, as an optimal combination would.
    """
    from skyfm.instruments import load_instrument
    from skyfm.instruments.scaling import robust_background

    if patch.source_image is None:
        raise SkyfmError(f"a {patch.instrument} patch without its source-only image cannot be labelled by light")
    h, w = grid
    C = patch.n_bands

    def cell_sums(image: np.ndarray) -> np.ndarray:  # (C, H, W) -> (C, h, w)
        return image[:, :h * stride, :w * stride].reshape(C, h, stride, w, stride).sum(axis=(2, 4))

    source = np.asarray(patch.source_image, dtype=np.float64)
    residual = np.asarray(patch.data, dtype=np.float64) - source
    if load_instrument(patch.instrument).is_counts:
        expected = patch.background_image if patch.background_image is not None else residual
        variance = np.maximum(cell_sums(np.clip(np.asarray(expected, dtype=np.float64), 0, None)),
                              MIN_BACKGROUND_COUNTS)
    else:
        sigma = np.asarray([robust_background(band)[1] for band in residual])
        variance = np.broadcast_to((sigma**2 * stride**2)[:, None, None], (C, h, w))
    return np.sqrt((cell_sums(source) ** 2 / variance).sum(axis=0))


def token_labels(patch: Patch, grid: tuple[int, int], stride: int, min_snr: float = 5.0, clean_snr: float = 1.0,
                 background: str = "light", fwhm_pix: float | None = None) -> np.ndarray:
    """Source / background label of each token cell of ``patch``: (h', w') int8.

    * ``1`` (source): a true source with ``snr >= min_snr`` has its centre in the cell;
    * ``0`` (clean background), by ``background``:

      - ``"light"`` (default): the true sources' expected light in the cell is below ``clean_snr`` sigma of the
        cell's noise (:func:`cell_source_snr`; every source counts, also those centred outside the patch);
      - ``"distance"``: no true source with ``snr >= clean_snr`` lies within ``fwhm_pix`` of the cell (distance
        from the source centre to the nearest point of the cell's square; ``fwhm_pix`` defaults to the median
        PSF FWHM over the patch's bands, :func:`patch_fwhm_pix`). The wings of bright sources under wide or
        heavy-tailed PSFs (the LAT's King function at low energies) reach much further than one median FWHM,
        so "background" cells by distance can hold a bright neighbour's light at many sigma;

    * ``-1`` (ambiguous, ignored): anything else, e.g. a faint source inside, or a source's wing reaching in.

    ``snr`` is the truth catalog's (CCD: best band; counts: sqrt(TS) over all bins).
    """
    h, w = grid
    if patch.truth is None:
        raise SkyfmError(f"a {patch.instrument} patch without a truth catalog cannot be labelled")
    if h * stride > patch.height or w * stride > patch.width:
        raise SkyfmError(f"a {h}x{w} grid of {stride}-pixel tokens does not fit a {patch.height}x{patch.width} patch")
    if background not in LABELLINGS:
        raise SkyfmError(f"background labelling must be one of {', '.join(LABELLINGS)}, got {background!r}")
    labels = np.full((h, w), AMBIGUOUS, dtype=np.int8)
    if background == "light":
        labels[cell_source_snr(patch, grid, stride) < clean_snr] = NEGATIVE
    else:
        x = np.asarray(patch.truth["x"], dtype=float)
        y = np.asarray(patch.truth["y"], dtype=float)
        snr = np.asarray(patch.truth["snr"], dtype=float)
        if fwhm_pix is None:
            fwhm_pix = float(np.median(patch_fwhm_pix(patch)))
        # cell edges in pixel coordinates (pixel centres are integers)
        top, left = np.arange(h) * stride - 0.5, np.arange(w) * stride - 0.5
        noticeable = snr >= clean_snr
        # distance from each source to each cell's square: per axis, how far outside the [lo, lo + stride] interval
        ys, xs = y[noticeable, None], x[noticeable, None]
        dy = np.clip(np.maximum(top[None, :] - ys, ys - (top[None, :] + stride)), 0, None)  # (n, h)
        dx = np.clip(np.maximum(left[None, :] - xs, xs - (left[None, :] + stride)), 0, None)  # (n, w)
        near = (dy[:, :, None] ** 2 + dx[:, None, :] ** 2) <= fwhm_pix**2  # (n, h, w)
        labels[~near.any(axis=0)] = NEGATIVE
    labels[centred_source_snr(patch, grid, stride) >= min_snr] = POSITIVE
    return labels


# ----------------------------------------------------------------------------------------------- batching
@dataclass
class _Batch:
    patches: list[Patch]
    samples: list[dict]  # sample dicts: ``meta["scaling"]`` holds each patch's scaling parameters
    batch: dict  # collate_patches output


def _batches(patches: Sequence[Patch], batch_size: int) -> Iterator[_Batch]:
    """Consecutive patches in batches of up to ``batch_size`` (a new batch starts where the patch size changes),
    scaled as the shards scale them."""
    if batch_size < 1:
        raise SkyfmError(f"batch_size must be >= 1, got {batch_size}")
    chunk: list[Patch] = []
    for i, patch in enumerate(patches):
        if chunk and (len(chunk) == batch_size or patch.data.shape[1:] != chunk[0].data.shape[1:]):
            yield _make_batch(chunk, i - len(chunk))
            chunk = []
        chunk.append(patch)
    if chunk:
        yield _make_batch(chunk, len(patches) - len(chunk))


def _make_batch(chunk: list[Patch], first_index: int) -> _Batch:
    from skyfm.data.shards import collate_patches, sample_from_patch

    samples = [sample_from_patch(p, key=f"eval-{first_index + i}") for i, p in enumerate(chunk)]
    return _Batch(chunk, samples, collate_patches(samples))


def _model_inputs(model, batch: dict) -> tuple:
    keys = ("scaled", "band_valid", "band_coord", "instrument_id", "pixel_scale_deg")
    return tuple(batch[k].to(model.device) for k in keys)


# ------------------------------------------------------------------------------------------ token features
@dataclass
class TokenFeatures:
    """Frozen token features of an evaluation set, one row per token cell.

    Attributes:
        features: (N, D) float32, :attr:`FoundationOutput.feature_map` (token features averaged over valid bands);
            (N, max bands x D) with :func:`token_features`' ``bands="concat"``.
        labels: {labelling: (N,) int8}, :func:`token_labels` by each way of finding background cells
            (``"light"``, ``"distance"``; 1 source, 0 background, -1 ambiguous).
        patch_index: (N,) int, which patch of the input list the token comes from (the probe splits by it).
        instrument: (N,) str, the patch's instrument.
    """

    features: np.ndarray
    labels: dict[str, np.ndarray]
    patch_index: np.ndarray
    instrument: np.ndarray

    def select(self, keep: np.ndarray) -> "TokenFeatures":
        return TokenFeatures(self.features[keep], {k: v[keep] for k, v in self.labels.items()},
                             self.patch_index[keep], self.instrument[keep])


def token_features(model, patches: Sequence[Patch], batch_size: int = 32, min_snr: float = 5.0,
                   labellings: Sequence[str] = LABELLINGS, layer: int | None = None,
                   bands: str = "mean") -> TokenFeatures:
    """Token features and labels of every token cell of ``patches`` (no gradients, model in eval mode).

    The model is left in eval mode. ``min_snr`` is passed to :func:`token_labels`, once per labelling.
    ``layer``: None for the backbone's output (:attr:`FoundationOutput.feature_map`), or the index of a ViT
    block whose output tokens, averaged over the valid bands, are the features instead (as linear probes of
    masked-modeling backbones often read a block below the last).
    ``bands``: ``"mean"`` (the band-averaged map, D features per cell) or ``"concat"`` (each band's output token
    side by side, in the instrument's band order, zeros for bands a patch lacks: max bands x D features; the ViT
    keeps one token per band and cell, and a source may stand out in a few bands only).
    """
    if bands not in ("mean", "concat"):
        raise SkyfmError(f"bands should be 'mean' or 'concat', got {bands!r}")
    if bands == "concat" and layer is not None:
        raise SkyfmError("bands='concat' reads the backbone's output tokens; it does not combine with layer")
    n_bands = max((p.n_bands for p in patches), default=1)
    from skyfm.foundation.embeddings import masked_band_mean

    model.eval()
    stride = model.token_stride
    features, index, instrument = [], [], []
    labels: dict[str, list] = {name: [] for name in labellings}
    captured: list[torch.Tensor] = []
    hook = None
    if layer is not None:
        blocks = getattr(model.backbone, "blocks", None)
        if blocks is None or not -len(blocks) <= layer < len(blocks):
            raise SkyfmError(f"layer {layer} is not a block of this backbone "
                             f"({0 if blocks is None else len(blocks)} ViT blocks)")
        hook = blocks[layer].register_forward_hook(lambda module, args, output: captured.append(output))
    offset = 0
    try:
        with torch.no_grad():
            for chunk in _batches(patches, batch_size):
                captured.clear()
                out = model(*_model_inputs(model, chunk.batch), dense=False, codes=False)
                fmap = out.feature_map.float().cpu()  # (B, D, h', w')
                B, D, h, w = fmap.shape
                if layer is not None:  # the block's (B, C * L, D) tokens, band-averaged like feature_map
                    valid = chunk.batch["band_valid"]
                    tokens = captured[-1].float().cpu().reshape(B, valid.shape[1], h * w, D)
                    fmap = masked_band_mean(tokens, valid).transpose(1, 2).reshape(B, D, h, w)
                if bands == "concat":  # (B, C, L, D) output tokens, padding bands already zero
                    tokens = out.token_features.float().cpu()
                    tokens = F.pad(tokens, (0, 0, 0, 0, 0, n_bands - tokens.shape[1]))  # (B, n_bands, L, D)
                    features.append(tokens.permute(0, 2, 1, 3).reshape(B * h * w, n_bands * D).numpy())
                else:
                    features.append(fmap.permute(0, 2, 3, 1).reshape(B * h * w, D).numpy())
                for b, patch in enumerate(chunk.patches):
                    for name in labellings:
                        labels[name].append(token_labels(patch, (h, w), stride, min_snr=min_snr,
                                                         background=name).reshape(-1))
                    index.append(np.full(h * w, offset + b))
                    instrument.append(np.full(h * w, patch.instrument, dtype=object))
                offset += B
    finally:
        if hook is not None:
            hook.remove()
    return TokenFeatures(np.concatenate(features).astype(np.float32),
                         {name: np.concatenate(rows) for name, rows in labels.items()},
                         np.concatenate(index), np.concatenate(instrument).astype(str))


# ------------------------------------------------------------------------------------------ linear probe
def linear_probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0,
                 test_fraction: float = 0.3, return_predictions: bool = False) -> dict:
    """Logistic regression on standardised features, trained and scored on disjoint groups (patches).

    Tokens labelled -1 are dropped. The split is by ``groups`` (scikit-learn's ``GroupShuffleSplit``, about
    ``test_fraction`` of the patches held out): no patch has tokens on both sides, so neighbouring tokens of one
    source cannot leak into the test set. The split is the first of a seeded series in which both sides hold
    both classes. Classes
    are balanced by ``class_weight="balanced"`` in training; the scores are on the held-out tokens as they
    come: ``accuracy`` (share right, depends on the class mix), ``balanced_accuracy`` (mean of the two recalls:
    chance is 0.5 whatever the mix), ``majority`` (the accuracy of always answering the commoner class).

    Returns a dict: accuracy, balanced_accuracy, majority, n_train, n_test, n_test_source, n_test_background,
    n_train_patches, n_test_patches; with ``return_predictions`` also ``test_rows`` (the held-out tokens' rows
    of ``features``) and ``predicted`` (their predicted labels), to see which tokens the probe gets wrong.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import GroupShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels, groups = np.asarray(features), np.asarray(labels), np.asarray(groups)
    if not len(features) == len(labels) == len(groups):
        raise SkyfmError(f"features, labels and groups must have one row per token "
                         f"({len(features)}, {len(labels)}, {len(groups)})")
    keep = labels >= 0
    X, y, g = features[keep], labels[keep].astype(int), groups[keep]
    if np.unique(g).size < 2:
        raise SkyfmError("the linear probe needs labelled tokens from at least two patches")
    # the first of a fixed series of random splits with both classes on both sides (few patches may have none)
    splits = GroupShuffleSplit(n_splits=SPLIT_TRIES, test_size=test_fraction, random_state=seed).split(X, y, g)
    train, test = next(((a, b) for a, b in splits if np.unique(y[a]).size == 2 and np.unique(y[b]).size == 2),
                       (None, None))
    if train is None:
        raise SkyfmError(f"no split of these {np.unique(g).size} patches puts sources and background tokens on "
                         f"both sides; use more patches")
    probe = make_pipeline(StandardScaler(),
                          LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed))
    probe.fit(X[train], y[train])
    predicted = probe.predict(X[test])
    n_source = int((y[test] == POSITIVE).sum())
    extra = {"test_rows": np.flatnonzero(keep)[test], "predicted": predicted} if return_predictions else {}
    return {
        "accuracy": float(accuracy_score(y[test], predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y[test], predicted)),
        "majority": max(n_source, len(test) - n_source) / len(test),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "n_test_source": n_source,
        "n_test_background": int(len(test) - n_source),
        "n_train_patches": int(np.unique(g[train]).size),
        "n_test_patches": int(np.unique(g[test]).size),
        **extra,
    }


def probe_per_instrument(tokens: TokenFeatures, seed: int = 0, labelling: str = "light") -> dict[str, dict]:
    """:func:`linear_probe` on each instrument's tokens alone, with ``labelling``'s labels: {instrument: result}."""
    return {name: linear_probe(sub.features, sub.labels[labelling], sub.patch_index, seed=seed)
            for name in dict.fromkeys(tokens.instrument)
            for sub in [tokens.select(tokens.instrument == name)]}


SNR_BINS = ((5.0, 7.0), (7.0, 10.0), (10.0, 20.0), (20.0, np.inf))


def centred_source_snr(patch: Patch, grid: tuple[int, int], stride: int) -> np.ndarray:
    """(h', w') snr of the brightest true source centred in each token cell (0 where none)."""
    h, w = grid
    out = np.zeros((h, w))
    if patch.truth is None or len(patch.truth) == 0:
        return out
    x, y = np.asarray(patch.truth["x"], float), np.asarray(patch.truth["y"], float)
    snr = np.asarray(patch.truth["snr"], float)
    rows, cols = np.floor((y + 0.5) / stride).astype(int), np.floor((x + 0.5) / stride).astype(int)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    np.maximum.at(out, (rows[inside], cols[inside]), snr[inside])
    return out


def probe_errors(tokens: TokenFeatures, patches: Sequence[Patch], stride: int, seed: int = 0,
                 labelling: str = "light") -> dict[str, dict]:
    """Where each instrument's probe (:func:`probe_per_instrument`, same split) errs, on its held-out tokens.

    ``patches`` and ``tokens`` as :func:`token_features` made them (one row per cell, patch by patch). Returns
    {instrument: {"recall_by_snr": [(lo, hi, n, recall)], "fpr_by_background": [(lo, hi, n, false-positive
    rate)]}}: source-token recall by the snr of the brightest source centred in the cell (:data:`SNR_BINS`), and
    the background tokens' false-positive rate by quartile of their patch's mean true background per pixel and
    band (``patch.background_image``; empty where the simulation has none). A probe that fires on bright
    backgrounds reads intensity, not a source's excess over its background.
    """
    snr_rows, level_rows = [], []
    for patch in patches:
        grid = (patch.height // stride, patch.width // stride)
        snr_rows.append(centred_source_snr(patch, grid, stride).ravel())
        level = np.nan if patch.background_image is None else float(np.mean(patch.background_image))
        level_rows.append(np.full(grid[0] * grid[1], level))
    snr_all, level_all = np.concatenate(snr_rows), np.concatenate(level_rows)
    if len(snr_all) != len(tokens.features):
        raise SkyfmError(f"{len(patches)} patches give {len(snr_all)} token cells at stride {stride}, "
                         f"the features have {len(tokens.features)} rows")
    out = {}
    for name in dict.fromkeys(tokens.instrument):
        keep = tokens.instrument == name
        sub = tokens.select(keep)
        res = linear_probe(sub.features, sub.labels[labelling], sub.patch_index, seed=seed, return_predictions=True)
        rows, predicted = res["test_rows"], res["predicted"]
        truth = sub.labels[labelling][rows]
        snr, level = snr_all[keep][rows], level_all[keep][rows]
        by_snr = []
        for lo, hi in SNR_BINS:
            sel = (truth == POSITIVE) & (snr >= lo) & (snr < hi)
            by_snr.append((lo, hi, int(sel.sum()), float(np.mean(predicted[sel] == POSITIVE)) if sel.any() else np.nan))
        by_level = []
        background = (truth == NEGATIVE) & np.isfinite(level)
        if background.sum() >= 8:
            edges = np.quantile(level[background], [0.0, 0.25, 0.5, 0.75, 1.0])
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                sel = background & (level >= lo) & ((level < hi) if i < 3 else (level <= hi))
                by_level.append((float(lo), float(hi), int(sel.sum()),
                                 float(np.mean(predicted[sel] == POSITIVE)) if sel.any() else np.nan))
        out[name] = {"recall_by_snr": by_snr, "fpr_by_background": by_level}
    return out


# --------------------------------------------------------------------------------------- tokenizer report
def aperture_photometry(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> dict[str, np.ndarray]:
    """Background-subtracted aperture fluxes of a 2-D image at (x, y), with photutils.

    The aperture is a circle of ``radius`` pixels (exact pixel overlap; any part off the image is left out);
    the local background is measured in an annulus of ``ANNULUS_RADII`` aperture radii with 3-sigma clipping.
    Returns arrays in the image's units: ``flux`` (aperture sum minus background mean x area), ``background``
    (mean per pixel), ``background_std`` (per pixel) and ``area`` (pixels).
    """
    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture

    positions = np.column_stack([x, y])
    inside = ApertureStats(image, CircularAperture(positions, r=radius))
    annulus = CircularAnnulus(positions, r_in=ANNULUS_RADII[0] * radius, r_out=ANNULUS_RADII[1] * radius)
    around = ApertureStats(image, annulus, sigma_clip=SigmaClip(sigma=3.0, maxiters=5))

    def column(values) -> np.ndarray:
        return np.atleast_1d(np.asarray(getattr(values, "value", values), dtype=float))

    area, background = column(inside.sum_aper_area), column(around.mean)
    return {"flux": column(inside.sum) - background * area, "background": background,
            "background_std": column(around.std), "area": area}


def aperture_noise(photometry: dict[str, np.ndarray], counts: bool) -> np.ndarray:
    """1-sigma background noise of aperture fluxes measured by :func:`aperture_photometry`.

    CCD images: the annulus' clipped standard deviation times sqrt(area). Counts: Poisson, sqrt(expected
    background counts in the aperture), at least ``MIN_BACKGROUND_COUNTS`` (a nearly empty high-energy bin
    would otherwise make a single photon infinitely significant).
    """
    if counts:
        return np.sqrt(np.maximum(photometry["background"] * photometry["area"], MIN_BACKGROUND_COUNTS))
    return photometry["background_std"] * np.sqrt(photometry["area"])


def faint_source_photometry(patch: Patch, original: np.ndarray, recon: np.ndarray,
                            snr_range: tuple[float, float] = FAINT_SNR) -> dict[str, np.ndarray]:
    """Aperture photometry of ``patch``'s true sources with ``snr_range[0] <= snr < snr_range[1]``.

    ``original`` and ``recon`` are (C, H, W) in raw units (counts or ADU). Each source is measured in every band
    with an aperture of radius max(FWHM, ``MIN_APERTURE_RADIUS_PIX``) at its true position, and kept in the band
    where its original aperture S/N is highest; sources closer to the edge than that radius are skipped.
    Noise for both images is the original's (:func:`aperture_noise`): a smooth reconstruction has no noise of
    its own to measure. Returns arrays (one per source): ``flux_original``, ``flux_recon``, ``snr_original``,
    ``snr_recon``, ``band``.
    """
    from skyfm.instruments import load_instrument

    counts = load_instrument(patch.instrument).is_counts
    truth = patch.truth
    snr = np.asarray(truth["snr"], dtype=float) if truth is not None else np.zeros(0)
    faint = (snr >= snr_range[0]) & (snr < snr_range[1])
    x = np.asarray(truth["x"], dtype=float)[faint] if truth is not None else np.zeros(0)
    y = np.asarray(truth["y"], dtype=float)[faint] if truth is not None else np.zeros(0)
    C, H, W = original.shape
    fwhm = patch_fwhm_pix(patch)
    f_orig, f_recon, noise = (np.full((C, x.size), np.nan) for _ in range(3))
    for c in range(C):
        radius = max(float(fwhm[c]), MIN_APERTURE_RADIUS_PIX)
        whole = (x >= radius - 0.5) & (x <= W - 0.5 - radius) & (y >= radius - 0.5) & (y <= H - 0.5 - radius)
        if not whole.any():
            continue
        measured = aperture_photometry(original[c], x[whole], y[whole], radius)
        f_orig[c, whole] = measured["flux"]
        noise[c, whole] = aperture_noise(measured, counts)
        f_recon[c, whole] = aperture_photometry(recon[c], x[whole], y[whole], radius)["flux"]
    s_orig, s_recon = f_orig / noise, f_recon / noise
    usable = np.isfinite(s_orig)
    sources = np.flatnonzero(usable.any(axis=0))
    best = np.argmax(np.where(usable, s_orig, -np.inf), axis=0)[sources]
    return {
        "flux_original": f_orig[best, sources],
        "flux_recon": f_recon[best, sources],
        "snr_original": s_orig[best, sources],
        "snr_recon": s_recon[best, sources],
        "band": best,
    }


def tokenizer_report(model, patches: Sequence[Patch], batch_size: int = 32) -> dict[str, dict]:
    """How well the tokenizer keeps what detection needs, per instrument and over all patches (key ``"all"``).

    Per instrument (and ``"all"``):

    * ``mae``: mean absolute reconstruction error in scaled units, over valid bands and pixels;
    * ``mae_over_noise``: the mean over (patch, band) of that band's MAE divided by its noise in scaled units,
      the sigma-clipped MAD sigma of the scaled band (:func:`skyfm.instruments.scaling.robust_background`; its
      standard deviation for sparse counts bands whose MAD is zero). 1 means errors the size of the noise;
    * ``codebook_usage``: share of the codebook's codes used at least once over these patches; ``perplexity``:
      exp(entropy) of their code histogram (the number of equally used codes it is worth);
    * faint sources, true ``5 <= snr < 10`` (:func:`faint_source_photometry`, raw units: the reconstruction is
      unscaled with the patch's own scaling parameters, as the shards compute them): ``n_faint`` measured,
      ``n_faint_visible`` of them with aperture S/N >= 3 in the original, ``flux_ratio_median`` (and the 16th and
      84th percentiles ``flux_ratio_p16``, ``flux_ratio_p84``) of recon / original aperture flux over those,
      and ``detectable_share``: the share of them whose reconstruction S/N is still >= 3 (NaN when none).
    * ``n_patches``.

    The model is put in eval mode (a never-trained tokenizer initialises its codebook by k-means on the first
    batch it sees, as in training).
    """
    from skyfm.tokenizers.vqvae import CodeUsageMeter

    model.eval()
    tokenizer = model.tokenizer
    meters: dict[str, CodeUsageMeter] = {}
    sums: dict[str, dict[str, list]] = {}
    with torch.no_grad():
        for chunk in _batches(patches, batch_size):
            batch = chunk.batch
            out = tokenizer(batch["scaled"].to(model.device), batch["band_valid"].to(model.device))
            recon, codes = out.recon.float().cpu().numpy(), out.codes.cpu()
            for b, (patch, sample) in enumerate(zip(chunk.patches, chunk.samples)):
                C = patch.n_bands
                meters.setdefault(patch.instrument, CodeUsageMeter(tokenizer.num_codes)).update(codes[b, :C])
                numbers = _reconstruction_numbers(patch, sample, batch["scaled"][b, :C].numpy(), recon[b, :C])
                acc = sums.setdefault(patch.instrument, {k: [] for k in numbers})
                for key, value in numbers.items():
                    acc[key].append(value)
    if not sums:
        raise SkyfmError("tokenizer_report got no patches")
    report = {name: _summarise(acc, meters[name], len([p for p in patches if p.instrument == name]))
              for name, acc in sums.items()}
    overall = CodeUsageMeter(tokenizer.num_codes)
    for meter in meters.values():
        overall.counts += meter.counts
    merged = {k: [v for acc in sums.values() for v in acc[k]] for k in next(iter(sums.values()))}
    report["all"] = _summarise(merged, overall, len(patches))
    return report


def _reconstruction_numbers(patch: Patch, sample: dict, scaled: np.ndarray, recon: np.ndarray) -> dict:
    """One patch's entries of :func:`tokenizer_report`: (C, H, W) ``scaled`` input and ``recon`` in scaled units."""
    from skyfm.instruments.scaling import robust_background, unscale_image

    err = np.abs(recon - scaled)
    noise = np.asarray([robust_background(band)[1] for band in scaled])  # per band, scaled units
    raw_recon = unscale_image(recon, sample["meta"]["scaling"])
    phot = faint_source_photometry(patch, np.asarray(patch.data, dtype=np.float32), raw_recon)
    return {"abs_err": float(err.sum()), "n_pix": err.size, "err_over_noise": err.mean(axis=(1, 2)) / noise,
            **{k: phot[k] for k in ("flux_original", "flux_recon", "snr_original", "snr_recon")}}


def _summarise(acc: dict[str, list], meter, n_patches: int) -> dict:
    """The report entries of one instrument (or all) from the accumulated per-patch numbers."""
    f_orig, f_recon = np.concatenate(acc["flux_original"]), np.concatenate(acc["flux_recon"])
    s_orig, s_recon = np.concatenate(acc["snr_original"]), np.concatenate(acc["snr_recon"])
    visible = s_orig >= DETECT_SNR
    ratio = f_recon[visible] / f_orig[visible]
    pct = (lambda q: float(np.percentile(ratio, q))) if ratio.size else (lambda q: math.nan)
    return {
        "n_patches": n_patches,
        "mae": float(np.sum(acc["abs_err"]) / max(np.sum(acc["n_pix"]), 1)),
        "mae_over_noise": float(np.mean(np.concatenate(acc["err_over_noise"]))),
        "codebook_usage": meter.usage,
        "perplexity": meter.perplexity,
        "n_faint": int(s_orig.size),
        "n_faint_visible": int(visible.sum()),
        "flux_ratio_median": pct(50),
        "flux_ratio_p16": pct(16),
        "flux_ratio_p84": pct(84),
        "detectable_share": float((s_recon[visible] >= DETECT_SNR).mean()) if visible.any() else math.nan,
    }


__all__ = [
    "EVAL_INSTRUMENTS",
    "EVAL_SEED_OFFSET",
    "LABELLINGS",
    "SNR_BINS",
    "TokenFeatures",
    "aperture_noise",
    "aperture_photometry",
    "cell_source_snr",
    "centred_source_snr",
    "eval_patch_seed",
    "faint_source_photometry",
    "linear_probe",
    "patch_fwhm_pix",
    "probe_errors",
    "probe_per_instrument",
    "simulate_eval_set",
    "token_features",
    "token_labels",
    "tokenizer_report",
]
