"""Class probabilities and extension.

Channels of this family: ``class`` (K logits: ``agn / pulsar / other`` for counts instruments, from the truth's
``class_group``; ``star / galaxy`` for CCDs, from ``class``) and ``extension`` (1: ln(1 + extension / native
pixel), where extension is the 68% radius of a gamma-ray source's shape or a galaxy's half-light radius, deg).
Artefacts (cosmic rays, trails, hot pixels) are not a class: they are negatives of the heatmap.

**Calibrated classes of CCD sources.** A network trained on patches where nearly every source is a star learns
that prior: the shipped CCD heads rank galaxies above stars (ROC area 0.7-0.9 on validation field images) but
never call one a galaxy (Run 17 in ``docs/benchmarks.md``). Where the refinement measures a Kron aperture (sparse
places, :mod:`skyfm.catalog.kron`), the light a source holds beyond its PSF model says what its morphology is, as
SExtractor's ``CLASS_STAR`` or SDSS's PSF-minus-model magnitude do. A head's ``class_calibration`` is a logistic
regression on the network's logit and those measurements (:data:`CALIBRATION_FEATURES`), fitted on validation
images (``benchmarks/choose_class.py``, :func:`fit_logistic`); :func:`calibrate_class_prob` applies it.

**Classes of gamma-ray sources from their spectra.** The counts heads' class channels call nearly every Fermi-LAT
source an AGN (validation balanced accuracy over agn / pulsar / other about 1/3, chance). A pulsar's spectrum is
hard and cut off at a few GeV, an AGN's soft and straight, and the likelihood refinement measures each source's
flux in every energy bin; a head's ``spectral_classifier`` is a multinomial logistic regression on the shape of
that spectrum (:data:`SPECTRAL_FEATURES`), fitted on validation images (``benchmarks/choose_spectral_class.py``,
:func:`fit_multinomial`); :func:`spectral_class_prob` applies it to the rows the likelihood fit measured.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_index(truth, class_names: list[str], kind: str) -> np.ndarray:
    """(N,) int class of each truth row in ``class_names``; -1 when unknown (ignored by the loss)."""
    n = len(truth)
    column = None
    for name in (("class_group", "class") if kind == "counts" else ("class",)):
        if name in truth.colnames:
            column = name
            break
    if column is None:
        return np.full(n, -1, dtype=np.int64)
    lookup = {c: i for i, c in enumerate(class_names)}
    return np.array([lookup.get(str(v).strip().lower(), -1) for v in truth[column]], dtype=np.int64)


def class_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over rows with a known class (target >= 0); 0 when there are none."""
    ok = target >= 0
    if not bool(ok.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[ok].float(), target[ok])


def extension_target(extension_deg, pixel_scale_deg: float) -> np.ndarray:
    ext = np.nan_to_num(np.asarray(extension_deg, dtype=np.float64), nan=0.0)
    return np.log1p(np.clip(ext, 0, None) / pixel_scale_deg).astype(np.float32)


def extension_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ok = torch.isfinite(target)
    if not bool(ok.any()):
        return pred.sum() * 0.0
    return F.smooth_l1_loss(pred.float()[ok], target[ok], beta=0.5)


def decode_extension(pred: np.ndarray, pixel_scale_deg: float) -> np.ndarray:
    """Extension in deg from the head's output."""
    return np.expm1(np.clip(pred, 0, 20)) * pixel_scale_deg


CALIBRATION_FEATURES = {
    "net_logit": "ln(p / (1 - p)) of the network's probability of the calibrated class",
    "kron_excess": "asinh(kron_excess / 2): light beyond the PSF model, in sigma, its tail compressed",
    "kron_snr": "ln(flux_kron / flux_kron_err), clipped to [0, ln 1e4]: at a given excess, a brighter source is "
                "less extended",
    "kron_size": "ln(kron_size), clipped to [ln 0.3, ln 10]: the Kron radius over a point source's",
}


def calibration_features(prob, kron_excess, flux_kron, flux_kron_err, kron_size) -> dict[str, np.ndarray]:
    """:data:`CALIBRATION_FEATURES` of N sources: ``prob`` (N,) the network's probability of the class, and the
    Kron columns (NaN where not measured, which makes every feature of that row NaN but ``net_logit``)."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-6, 1 - 1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.asarray(flux_kron, dtype=np.float64) / np.asarray(flux_kron_err, dtype=np.float64)
        size = np.asarray(kron_size, dtype=np.float64)
        return {"net_logit": np.log(p / (1 - p)),
                "kron_excess": np.arcsinh(np.asarray(kron_excess, dtype=np.float64) / 2),
                "kron_snr": np.where(np.isfinite(snr), np.log(np.clip(snr, 1.0, 1e4)), np.nan),
                "kron_size": np.where(np.isfinite(size), np.log(np.clip(size, 0.3, 10.0)), np.nan)}


def calibrate_class_prob(class_prob, class_names, calibration: dict, kron_excess, flux_kron, flux_kron_err,
                         kron_size) -> np.ndarray:
    """(N, K) class probabilities with ``calibration["class"]``'s replaced by the logistic regression
    ``intercept + sum(coef[f] * feature f)`` where every feature it uses is finite (elsewhere the network's); the
    other classes share the rest in the network's proportions (equally where the network gave them nothing)."""
    prob = np.asarray(class_prob, dtype=np.float64)
    k = list(class_names).index(calibration["class"])
    feats = calibration_features(prob[:, k], kron_excess, flux_kron, flux_kron_err, kron_size)
    logit = np.full(len(prob), float(calibration["intercept"]))
    for name, c in calibration["coef"].items():
        logit = logit + float(c) * feats[name]
    ok = np.isfinite(logit)
    p_new = 1.0 / (1.0 + np.exp(-np.clip(np.where(ok, logit, 0.0), -50, 50)))
    others = prob.copy()
    others[:, k] = 0.0
    total = others.sum(axis=1)
    # a network sure of the class leaves the others nothing to share in proportion: they share the rest equally
    none = total <= 1e-12
    others[none] = 1.0
    others[:, k] = 0.0
    out = others * ((1.0 - p_new) / others.sum(axis=1))[:, None]
    out[:, k] = p_new
    return np.where(ok[:, None], out, prob)


def fit_logistic(X, y, l2: float = 0.1, n_iter: int = 50) -> tuple[float, np.ndarray]:
    """(intercept, coefficients) of a logistic regression of ``y`` (N,) bool on ``X`` (N, F), by Newton steps with
    an L2 penalty ``l2`` on the coefficients (not the intercept); a few features, a few thousand rows."""
    X = np.asarray(X, dtype=np.float64)
    A = np.hstack([np.ones((len(X), 1)), X])
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(A.shape[1])
    penalty = np.full(A.shape[1], float(l2))
    penalty[0] = 0.0
    for _ in range(n_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(A @ w, -50, 50)))
        grad = A.T @ (p - y) + penalty * w
        hess = (A * (p * (1 - p))[:, None]).T @ A + np.diag(penalty) + 1e-9 * np.eye(A.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(w[0]), w[1:]


SPECTRAL_FEATURES = {
    "shape": "per band, the band flux over its error divided by the root sum of squares of the positive ones (at "
             "least 1): the shape of the source's significance across the energy bins, whatever its brightness",
    "snr": "ln of that root sum of squares (at least 1): how far the shape can be trusted",
    "net": "per class, ln of the network's probability (at least 1e-4) less their mean: what the image around the "
           "source told the network (its extension, its neighbourhood)",
}


def spectral_features(flux_band, flux_band_err, names, class_prob=None) -> np.ndarray:
    """(N, F) :data:`SPECTRAL_FEATURES` ``names`` (in that order; ``shape`` gives one column per band, ``net`` one
    per class of ``class_prob`` (N, K)) of N sources' band fluxes and errors (N, C); rows with a non-finite flux or
    error are NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.asarray(flux_band, dtype=np.float64) / np.asarray(flux_band_err, dtype=np.float64)
    finite = np.all(np.isfinite(z), axis=1)
    z = np.where(finite[:, None], z, 0.0)
    norm = np.maximum(np.sqrt(np.sum(np.clip(z, 0.0, None) ** 2, axis=1)), 1.0)
    columns = {"shape": z / norm[:, None], "snr": np.log(norm)[:, None]}
    if "net" in names:
        if class_prob is None:
            raise ValueError("the 'net' feature needs the network's class_prob")
        logp = np.log(np.clip(np.asarray(class_prob, dtype=np.float64), 1e-4, 1.0))
        columns["net"] = logp - logp.mean(axis=1, keepdims=True)
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise ValueError(f"unknown spectral features {unknown}; choose from {sorted(columns)}")
    out = np.hstack([columns[n] for n in names])
    out[~finite] = np.nan
    return out


def spectral_class_prob(class_prob, classifier: dict, flux_band, flux_band_err, rows=None) -> np.ndarray:
    """(N, K) class probabilities: the softmax of ``classifier``'s multinomial logistic regression on the
    standardised :func:`spectral_features` where they are finite (and ``rows``, (N,) bool, says the likelihood fit
    measured the row), the network's ``class_prob`` elsewhere. ``classifier``: ``{"features": names, "mean": (F,),
    "scale": (F,), "coef": (F, K), "intercept": (K,)}``, classes in the head's order."""
    prob = np.asarray(class_prob, dtype=np.float64)
    X = (spectral_features(flux_band, flux_band_err, classifier["features"], prob) - np.asarray(classifier["mean"])) \
        / np.asarray(classifier["scale"])
    logits = X @ np.asarray(classifier["coef"], dtype=np.float64) + np.asarray(classifier["intercept"])
    ok = np.all(np.isfinite(logits), axis=1) & (True if rows is None else np.asarray(rows, bool))
    logits = np.where(ok[:, None], logits, 0.0)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return np.where(ok[:, None], p, prob)


def fit_multinomial(X, y, n_classes: int, l2: float = 1.0, class_weight=None) -> tuple[np.ndarray, np.ndarray]:
    """(coef (F, K), intercept (K,)) of a multinomial logistic regression of ``y`` (N,) int on ``X`` (N, F), with an
    L2 penalty ``l2`` on the coefficients and per-class weights ``class_weight`` (K,) (e.g. balanced: N / (K n_k))."""
    from scipy.optimize import minimize

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    N, F = X.shape
    K = int(n_classes)
    A = np.hstack([np.ones((N, 1)), X])
    Y = np.eye(K)[y]
    w = np.ones(N) if class_weight is None else np.asarray(class_weight, dtype=np.float64)[y]
    penalty = np.r_[0.0, np.full(F, float(l2))][:, None]

    def loss(theta):
        W = theta.reshape(F + 1, K)
        L = A @ W
        L -= L.max(axis=1, keepdims=True)
        logp = L - np.log(np.exp(L).sum(axis=1, keepdims=True))
        value = -np.sum(w * np.sum(Y * logp, axis=1)) / w.sum() + 0.5 * np.sum(penalty * W ** 2) / N
        grad = A.T @ ((np.exp(logp) - Y) * w[:, None]) / w.sum() + penalty * W / N
        return value, grad.ravel()

    theta = minimize(loss, np.zeros((F + 1) * K), jac=True, method="L-BFGS-B").x.reshape(F + 1, K)
    return theta[1:], theta[0]


__all__ = ["CALIBRATION_FEATURES", "calibrate_class_prob", "calibration_features", "class_index", "class_loss",
           "decode_extension", "extension_loss", "extension_target", "fit_logistic", "fit_multinomial",
           "SPECTRAL_FEATURES", "spectral_class_prob", "spectral_features"]
