"""Pictures a person would rather look at than read: patches with their sources overlaid.

Stretches follow what astronomers use: an asinh stretch with a black sky for CCD images (a colour composite of
three bands when there are three or more); for counts cubes a counts map summed over energy bins, each bin smoothed
by a fraction of its PSF, in log scale with a heat colour map, as Fermi-LAT count maps are shown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skyfm.utils import atomic_path

CLASS_COLOURS = {
    "star": "#ffd92f", "galaxy": "#66c2a5", "agn": "#fc8d62", "pulsar": "#8da0cb", "other": "#e78ac3",
    "artefact": "#ff3030", "unk": "#e5e5e5",
}


def _asinh_stretch(image: np.ndarray, q: float = 8.0) -> np.ndarray:
    """Map an image to [0, 1]: zero at the sky level, asinh compression of bright sources."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image)
    sky = np.median(finite)
    noise = 1.4826 * np.median(np.abs(finite - sky)) or (np.std(finite) or 1.0)
    lo = sky  # a dark sky, so the eye goes to sources rather than to noise
    hi = max(np.percentile(finite, 99.7), sky + 20 * noise)
    x = np.clip((image - lo) / (hi - lo), 0, 1)
    return np.arcsinh(q * x) / np.arcsinh(q)


def _smooth(image: np.ndarray, sigma_pix: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma_pix) if sigma_pix > 0.3 else image


def display_image(patch, bands: list[int] | None = None) -> np.ndarray:
    """An (H, W) or (H, W, 3) array in [0, 1] to show with ``imshow(origin='lower')``."""
    data = np.nan_to_num(patch.data.astype(np.float64))
    c = data.shape[0]
    inst = patch.instrument_config()
    if inst.is_counts:
        # Smooth each bin by a fraction of its PSF so that sparse high-energy photons show as sources.
        smoothed = sum(_smooth(data[i], 0.5 * inst.bands[i].psf.fwhm_deg / inst.pixel_scale_deg / 2.355)
                       for i in range(c))
        img = np.log1p(smoothed / (np.median(smoothed) or 1.0))
        lo, hi = np.percentile(img, [1.0, 99.9])
        import matplotlib

        return matplotlib.colormaps["inferno"](np.clip((img - lo) / ((hi - lo) or 1.0), 0, 1))[..., :3]
    if bands is None:
        bands = [0] if c < 3 else [0, 1, c - 1]  # Hubble F435W/F606W/F814W; WISE W1/W2/W4 as in its atlas images
    if len(bands) == 3:
        return np.stack([_asinh_stretch(data[i]) for i in bands[::-1]], axis=-1)  # longest wavelength in red
    return _asinh_stretch(data[bands[0]])


def plot_patch(patch, ax=None, catalog=None, truth: bool = True, title: str | None = None, show_mask: bool = True,
               max_markers: int = 3000, min_snr: float | None = 3.0):
    """Show a patch with its true sources (circles, coloured by class) and/or a detection catalog (crosses).

    Args:
        patch: a :class:`~skyfm.data.Patch`.
        ax: matplotlib axes (a new figure when None).
        catalog: optional table with ``x``, ``y`` columns (0-based pixels) to mark as detections.
        truth: mark ``patch.truth`` when present.
        min_snr: mark only true sources at or above this SNR (``snr`` column), so that the many simulated sources
            below any detection threshold do not hide the sky; None marks them all.
        show_mask: tint contaminant-mask pixels (cosmic rays, trails, ...) red.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    img = display_image(patch)
    ax.imshow(img, origin="lower", cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    if show_mask and patch.contaminant_mask is not None and patch.contaminant_mask.any():
        m = patch.contaminant_mask.any(axis=0)
        overlay = np.zeros(m.shape + (4,))
        overlay[m] = (1.0, 0.19, 0.19, 0.45)  # translucent red: the artefact stays visible under it
        ax.imshow(overlay, origin="lower", interpolation="nearest")
    if truth and patch.truth is not None and len(patch.truth):
        t = patch.truth
        if min_snr is not None and "snr" in t.colnames:
            t = t[np.asarray(t["snr"], dtype=float) >= min_snr]
        if len(t) > max_markers:  # a globular-cluster core: show the brightest
            t = t[np.argsort(-np.asarray(t["flux"]))[:max_markers]]
        flux = np.asarray(t["flux"], dtype=float)
        size = 6 + 30 * np.clip(np.log10(np.clip(flux, 1e-3, None) / np.nanmedian(flux) + 1), 0, 2)
        cls = [str(c) for c in t["class_group"]] if "class_group" in t.colnames else [str(c) for c in t["class"]]
        colours = [CLASS_COLOURS.get(c, "#e5e5e5") for c in cls]
        ax.scatter(t["x"], t["y"], s=size, facecolors="none", edgecolors=colours, linewidths=0.7)
        for c in sorted(set(cls)):
            ax.scatter([], [], s=20, facecolors="none", edgecolors=CLASS_COLOURS.get(c, "#e5e5e5"), label=c)
    if catalog is not None and len(catalog):
        ax.scatter(catalog["x"], catalog["y"], marker="+", s=25, c="#00e5ff", linewidths=0.7, label="detected")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_title(title or _describe(patch, min_snr), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _describe(patch, min_snr: float | None) -> str:
    inst = patch.instrument_config()
    h, w = patch.height, patch.width
    side = h * inst.pixel_scale_deg
    size = f"{side:.3g} deg" if side >= 0.5 else (f"{side * 60:.3g} arcmin" if side * 60 >= 1 else f"{side * 3600:.3g} arcsec")
    n = "" if patch.truth is None else f", {len(patch.truth)} sources"
    if min_snr is not None and patch.truth is not None and "snr" in patch.truth.colnames:
        n += f" ({int((np.asarray(patch.truth['snr']) >= min_snr).sum())} SNR>={min_snr:g} circled)"
    scene = patch.meta.get("scene") or patch.meta.get("population") or ""
    scene = f" ({scene})" if scene else ""
    return f"{inst.name}{scene}: {patch.bands[0] if len(patch.bands) == 1 else f'{len(patch.bands)} bands'}, {size}{n}"


def save_gallery(patches, path, ncols: int = 3, title: str | None = None):
    """One panel per patch with truth overlaid, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    n = len(patches)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 5 * nrows), squeeze=False)
    for ax, patch in zip(axes.ravel(), patches):
        plot_patch(patch, ax)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path, dpi: int = 110, **savefig_kwargs) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (never a half-written file), close it, return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **savefig_kwargs)
    plt.close(fig)
    return path

