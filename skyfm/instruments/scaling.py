"""Instrument-aware scaling of images for the networks, and its inverse.

Photon counts span zero to thousands and CCD images carry an arbitrary sky level; networks want inputs of order
one. Each instrument's YAML names one method:

* ``log1p``: ``log(1 + counts)``, for counts cubes (keeps zero at zero, compresses bright sources).
* ``anscombe``: ``2 sqrt(counts + 3/8)``, the variance-stabilising transform for Poisson counts (noise ~ 1).
* ``asinh``: background-normalised ``asinh((x - sky) / (softening * sigma))`` per band, with the sky level and
  noise ``sigma`` estimated robustly from the image (sigma-clipped median and MAD): noise is about one unit, the
  sky is zero, and bright sources are compressed logarithmically.
* ``counts-asinh``: the same for counts cubes, with the sky a clipped mean of the counts (a median is 0 for
  sparse counts) and sigma its Poisson sigma, ``sqrt(sky + 1)`` (the 1: a bin with almost no background must not
  turn a single photon into tens of sigma). Its parameters are stored as ``asinh``'s, so that everything that
  applies or inverts ``asinh`` does the same with these.
* ``counts-asinh-mesh``: the same with a background that varies across the image: the clipped mean in a mesh of
  ``MESH_PIX`` x ``MESH_PIX`` boxes (a box far above its neighbours takes their median, as in SExtractor's
  background mesh), interpolated bilinearly to every pixel (:func:`sky_sigma_maps`); the mesh is stored in the parameters.
* ``counts-asinh-model``: the same with the background taken from a model of it rather than from the counts: the
  image's expected background cube (a Fermi-LAT analysis's interstellar-emission and isotropic model; a simulated
  patch's ``background_image``), as ``MODEL_MESH_PIX`` box means. Without a model it is an error.

:func:`scale_image` returns the scaled array and the per-band parameters that :func:`unscale_image` needs.
"""

from __future__ import annotations

import numpy as np

from skyfm.errors import SkyfmError

MAD_TO_SIGMA = 1.4826


def robust_background(band: np.ndarray, n_iter: int = 3, clip: float = 3.0, max_pixels: int = 65536) -> tuple[float, float]:
    """Sky level and noise sigma of one 2-D band by iterated sigma clipping (NaNs ignored).

    Uses at most ``max_pixels`` pixels on a regular sub-grid, so that a 16k x 16k image costs no more than a patch.
    """
    values = band[np.isfinite(band)]
    if values.size == 0:
        raise SkyfmError("cannot estimate the background of a band with no finite pixels")
    if values.size > max_pixels:
        values = values[:: values.size // max_pixels]
    med = float(np.median(values))
    sigma = float(MAD_TO_SIGMA * np.median(np.abs(values - med)))
    for _ in range(n_iter):
        if sigma <= 0:
            break
        keep = np.abs(values - med) < clip * sigma
        if keep.sum() < 16:
            break
        med = float(np.median(values[keep]))
        sigma = float(MAD_TO_SIGMA * np.median(np.abs(values[keep] - med)))
    if sigma <= 0:  # a very flat or mostly-empty band: fall back to the standard deviation
        sigma = float(np.std(values)) or 1.0
    return med, sigma


def scale_image(image: np.ndarray, method: str, softening: float = 1.0,
                background: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Scale a (C, H, W) image; returns (scaled float32 array, parameters for :func:`unscale_image`).
    ``background``: the (C, H, W) expected background counts that ``counts-asinh-model`` needs (others ignore it)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise SkyfmError(f"scaling expects a (bands, height, width) array, got shape {image.shape}")
    if method == "log1p":
        return np.log1p(np.clip(image, 0, None)), {"method": method}
    if method == "anscombe":
        return 2.0 * np.sqrt(np.clip(image, 0, None) + 0.375), {"method": method}
    if method == "asinh":
        sky, sigma = zip(*(robust_background(b) for b in image))
        params = {"method": method, "sky": list(map(float, sky)), "sigma": list(map(float, sigma)), "softening": softening}
    elif method == "counts-asinh":
        sky = [poisson_background(b) for b in image]
        params = {"method": "asinh", "estimator": "poisson", "sky": sky,
                  "sigma": [float(np.sqrt(b + 1.0)) for b in sky], "softening": softening}
    elif method == "counts-asinh-mesh":
        params = {"method": "asinh", "estimator": "poisson-mesh",
                  "sky_mesh": [poisson_mesh(b).tolist() for b in image], "softening": softening}
    elif method == "counts-asinh-model":
        if background is None:
            raise SkyfmError("scaling counts-asinh-model needs the image's background model (expected background "
                             "counts per pixel and bin, e.g. from the interstellar-emission model); none was given")
        background = np.asarray(background, dtype=np.float64)
        if background.shape != image.shape:
            raise SkyfmError(f"the background model has shape {background.shape}, the image {image.shape}")
        params = {"method": "asinh", "estimator": "poisson-mesh",
                  "sky_mesh": [box_means(b).tolist() for b in background], "softening": softening}
    else:
        raise SkyfmError(f"unknown scaling method '{method}'; use log1p, anscombe, asinh, counts-asinh, "
                         f"counts-asinh-mesh or counts-asinh-model")
    sky_a, sig_a = sky_sigma_maps(params, image.shape)
    return np.arcsinh((image - sky_a) / (sig_a * softening)).astype(np.float32), params


def counts_scaled(params: dict) -> bool:
    """Whether scaling parameters are those of a counts cube (log1p, anscombe, or asinh estimated the Poisson way:
    counts-asinh[-mesh|-model]), so that Poisson statistics apply to the raw image."""
    return params["method"] in ("log1p", "anscombe") or str(params.get("estimator", "")).startswith("poisson")


MESH_PIX = 8  # counts-asinh-mesh: the background mesh's box side (pixels)
MODEL_MESH_PIX = 4  # counts-asinh-model: a background model is smooth; 4-px boxes keep the ridge, not the bytes


def box_means(band: np.ndarray, box: int = MODEL_MESH_PIX) -> np.ndarray:
    """(ceil(H / box), ceil(W / box)) means of ``box`` x ``box`` blocks of one band (edge blocks over the pixels
    they have), the mesh :func:`sky_sigma_maps` interpolates back to pixels."""
    h, w = band.shape
    ny, nx = -(-h // box), -(-w // box)
    padded = np.full((ny * box, nx * box), np.nan)
    padded[:h, :w] = band
    return np.nanmean(padded.reshape(ny, box, nx, box), axis=(1, 3))


def poisson_mesh(band: np.ndarray, box: int = MESH_PIX) -> np.ndarray:
    """(ceil(H / box), ceil(W / box)) background counts per pixel of one counts band: each box's clipped mean
    (:func:`poisson_background`); a box far above the median of its 3 x 3 neighbourhood (1.5 x it plus 3 sigma:
    a source's wings) takes that median instead, as SExtractor's BACK_FILTERTHRESH does, so that a smooth ridge
    keeps its peak."""
    from scipy.ndimage import median_filter

    h, w = band.shape
    mesh = np.zeros((-(-h // box), -(-w // box)))
    for i in range(mesh.shape[0]):
        for j in range(mesh.shape[1]):
            cell = band[i * box:(i + 1) * box, j * box:(j + 1) * box]
            mesh[i, j] = poisson_background(cell) if np.isfinite(cell).any() else np.nan
    if np.isnan(mesh).any():
        mesh = np.where(np.isnan(mesh), np.nanmean(mesh) if np.isfinite(mesh).any() else 0.0, mesh)
    filtered = median_filter(mesh, size=3, mode="nearest")
    noise = 3.0 * np.sqrt(np.maximum(filtered, 0.0) + 1.0) / box  # 3 sigma of a box's mean
    return np.where(mesh > 1.5 * filtered + noise, filtered, mesh)


def _upsample(mesh: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a box mesh to pixels (box centres at (k + 0.5) * H / n - 0.5), flat beyond the
    outermost centres."""
    h, w = shape
    ys = np.clip((np.arange(h) + 0.5) * mesh.shape[0] / h - 0.5, 0, mesh.shape[0] - 1)
    xs = np.clip((np.arange(w) + 0.5) * mesh.shape[1] / w - 0.5, 0, mesh.shape[1] - 1)
    rows = np.stack([np.interp(ys, np.arange(mesh.shape[0]), mesh[:, j]) for j in range(mesh.shape[1])], axis=1)
    return np.stack([np.interp(xs, np.arange(mesh.shape[1]), r) for r in rows])


def sky_sigma_maps(params: dict, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(sky, sigma) of ``asinh`` parameters, broadcastable to a (C, H, W) image: per band numbers, or for
    ``counts-asinh-mesh`` and ``counts-asinh-model`` per-pixel maps from their mesh (sigma = sqrt(sky + 1)),
    without the softening."""
    if "sky_mesh" in params:
        sky = np.stack([_upsample(np.asarray(m, dtype=np.float64), shape[-2:]) for m in params["sky_mesh"]])
        sky = np.maximum(sky, 0.0).astype(np.float32)
        return sky, np.sqrt(sky + 1.0).astype(np.float32)
    return (np.asarray(params["sky"], dtype=np.float32)[:, None, None],
            np.asarray(params["sigma"], dtype=np.float32)[:, None, None])


def poisson_background(band: np.ndarray, clip: float = 5.0, n_iter: int = 3) -> float:
    """Background counts per pixel of one counts band: the mean without the pixels far above it (sources),
    ``counts > b + clip sqrt(b) + clip``, iterated. A mean, not a median: at < 1 count per pixel the median is 0."""
    values = band[np.isfinite(band)].astype(np.float64)
    if values.size == 0:
        raise SkyfmError("cannot estimate the background of a band with no finite pixels")
    level = float(values.mean())
    for _ in range(n_iter):
        keep = values <= level + clip * np.sqrt(max(level, 0.0)) + clip
        if keep.sum() < 16:
            break
        level = float(values[keep].mean())
    return max(level, 0.0)


def unscale_image(scaled: np.ndarray, params: dict) -> np.ndarray:
    """Invert :func:`scale_image` (Anscombe with the simple algebraic inverse)."""
    method = params["method"]
    scaled = np.asarray(scaled, dtype=np.float32)
    if method == "log1p":
        return np.expm1(scaled)
    if method == "anscombe":
        return (scaled / 2.0) ** 2 - 0.375
    if method == "asinh":
        sky, sigma = sky_sigma_maps(params, scaled.shape)
        return np.sinh(scaled) * sigma * params.get("softening", 1.0) + sky
    raise SkyfmError(f"unknown scaling method '{method}'")
