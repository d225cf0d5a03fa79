"""From a sky image to a source catalog: the detector over tiles, peak finding, merging, likelihood refinement.

    from skyfm.detect import detect_patch, detect_file
    catalog = detect_patch(patch)                          # a Patch in memory -> QTable (DESIGN.md columns)
    catalog = detect_file("image.fits", "catalog.fits")    # any size; writes catalog + DS9 regions

How:

1. **Tiles.** The image is cut into overlapping tiles (``tile_size``, ``tile_overlap`` of the detector's config;
   :mod:`skyfm.data.tiling`); each tile owns a core, and a detection is kept only by the tile that owns its
   position, so sources on tile edges appear once. Files are read tile by tile through a memory map
   (:func:`skyfm.data.open_image`): a 16k x 16k image is never held whole, nor copied per tile.
2. **Pixel scale.** The network was trained at the instrument's native pixel scale. An image whose WCS pixel
   differs by more than 10% is resampled per tile to the native scale (bilinear; counts rescaled to stay counts
   per pixel), and positions, errors and fluxes are mapped back to the image's own pixels.
3. **Peaks.** The centre heatmap's 3x3 local maxima above ``min_score`` (:func:`skyfm.heads.localization.find_peaks`),
   moved by the predicted sub-pixel offset; peaks whose refined positions fall within 1 px of a higher one are
   merged (neighbouring pixels of one source), pairs further apart stay split. Masked pixels give no detections.
   CCD images: a saturated star the network left out is added (score 1), and saturated stars take aperture
   fluxes (:func:`add_saturated_stars`); the PSF fit refines positions and point-source fluxes (with the second
   stars of blends that a first fit's residual shows beside the detections, :func:`find_companions`, catalog
   ``fit`` 5), and sources with light beyond their PSF model (galaxies) in sparse places get Kron aperture fluxes
   (:func:`refine_ccd_tile`, :mod:`skyfm.catalog.kron`); the fit's residual image is searched for the faint and
   diffuse sources no detection stands for (catalog ``fit`` 4). A head with ``unconfirmed_min_score`` keeps a peak
   the fit does not confirm (catalog ``fit`` 0) only above that higher threshold (at the head's own ``min_score``;
   any other threshold the caller gives applies to every detection), where its ``crowding`` is below
   ``unconfirmed_max_crowding``; a fit whose reduced chi-square exceeds ``unconfirmed_max_chi2`` confirms nothing.
4. **Counts cubes.** Each detection is refined by a Poisson likelihood fit with the instrument PSF per energy bin
   against the expected background (the simulator's or the user's model when given, else estimated from the
   counts, :func:`refine_counts`): position, flux per bin, and TS; the physical photon flux ``flux_phys``
   (ph cm-2 s-1) is the sum over bins of counts / exposure (as the simulator defines it). With a background model
   (``--background``) the likelihood also selects (``selection="likelihood"``): the TS map's peaks join the
   network's, all are fitted together, and the catalog keeps fitted TS >= 25 (:func:`add_ts_map_candidates`,
   :func:`select_by_ts`). Against a known background the likelihood-ratio test is close to the best a point-source
   detector can do, and the network, which never sees the model, did not beat it on validation skies; together
   they keep what the TS map finds, and the network's peaks split blends the TS map merges. Optionally
   (``test_extension``, ``--test-extension``) every source is then tested for extension
   (:func:`apply_extension_test`, :mod:`skyfm.catalog.extended`).
5. **Catalog** via :func:`skyfm.catalog.build_catalog`: x, y, sky coordinates, pos_err, flux, flux_err, score (the
   heatmap probability; 1 for saturated stars the saturation rule added; sqrt(TS) with likelihood selection, the
   probability then in ``net_score``), class + class_prob, extension, flux_band (+ ts, sqrt_ts, flux_phys for
   counts; + ts_ext with the extension test).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import itertools
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError
from skyfm.utils import PRECISIONS, bf16_is_fast, use_bf16  # noqa: F401 (PRECISIONS, bf16_is_fast: re-exported)
from skyfm.utils import resolve_device

MERGE_RADIUS_PIX = 1.0
RESAMPLE_TOLERANCE = 0.1

_DETECTORS: dict = {}


def get_detector(detector=None, device: str | None = "auto"):
    """A SourceDetector: the one given (on its own device), or one loaded from a folder or the shipped default onto
    ``device`` (:func:`skyfm.utils.resolve_device`: ``auto`` = a CUDA GPU where one is visible, else the CPU);
    loaded ones are cached per folder and device."""
    from skyfm.heads import SourceDetector, load_detector

    if isinstance(detector, SourceDetector):
        return detector
    dev = resolve_device(device)
    key = (None if detector is None else str(Path(detector).resolve()), str(dev))
    if key not in _DETECTORS:
        det = load_detector(detector, map_location=dev)
        if dev.type == "cpu":  # oneDNN's convolutions run 1.3-3x faster on NHWC tensors
            import torch

            det.to(memory_format=torch.channels_last)
        _DETECTORS[key] = det
    return _DETECTORS[key]


# ------------------------------------------------------------------------------------------------ accumulation
# what the CCD refinement measures (refine_ccd_tile), NaN for rows it did not, as the catalog describes it: (name,
# dtype, description); of counts cubes' rows only crowding (_crowded_flux_errors)
CCD_COLUMN_DOCS = (
    ("fit_chi2", np.float32,
     "Reduced chi-square of the PSF fit over the source's fit box, the other detections "
     "subtracted (about 1: a point source well fitted; NaN: no converged fit); the errors "
     "of fitted rows grow with its square root"),
    ("crowding", np.float32,
     "Detected neighbours per PSF FWHM^2 around the source (Gaussian-weighted within about 3 "
     "FWHM, itself left out; 0.01 a sparse field, 0.1 a crowded one, 0.5-1 a cluster core): "
     "the flux-error floor of PSF-fitted rows grows with it; NaN: not refined. Counts cubes: "
     "per FWHM^2 of the sharpest bin, among the catalog's rows; the statistical flux errors "
     "of likelihood-fitted rows grow with it (the head's fit_flux_err_scale_crowding)"),
    ("flux_confusion", np.float64,
     "Confusion noise at the source, in flux units: the scatter of PSF fluxes at blank "
     "places of the residual image around it (the light of undetected neighbours); the "
     "flux errors of refined rows are at least it; NaN: not refined, or a saturated star "
     "(aperture flux)"),
    ("flux_blend", np.float64,
     "Light of the detected neighbours that overlaps the source's PSF, in flux units "
     "(their fitted fluxes weighted by the overlap of two PSFs at their separation, within "
     "3 FWHM): the flux errors of PSF-fitted rows hold the head's fit_flux_err_blend times "
     "it; NaN: not refined, or a residual-search find"),
    ("flux_kron", np.float64,
     "Kron aperture flux (skyfm.catalog.kron: 2.5 Kron radii, the other detections' PSF "
     "models subtracted, divided by the PSF's share inside the aperture), the total flux "
     "of an extended source; NaN: not refined, saturated, the aperture off the image, or a "
     "crowded place (crowding above the head's kron_max_crowding, else 0.1)"),
    ("flux_kron_err", np.float64,
     "Error of flux_kron, flux units: the sky and Poisson noise in the aperture or, "
     "where larger, the scatter of the residual image in such apertures at blank "
     "places nearby (confusion)"),
    ("kron_excess", np.float32,
     "Light beyond the PSF model, in sigma: (flux_kron - PSF flux) / its error; about 0 "
     "+- 1 for a point source, several for a galaxy; rows at or above the head's "
     "kron_excess_min take flux_kron (fit 3)"),
    ("kron_size", np.float32,
     "Kron radius (first moment of the light, the neighbours' models subtracted) over a "
     "point source's at the image's seeing: about 1 for a star, more for a resolved galaxy; "
     "NaN where flux_kron is"),
)
REFINEMENT_COLUMNS = tuple(name for name, _, _ in CCD_COLUMN_DOCS)
# Not catalog columns: a CCD tile's rows whose Kron aperture runs off the tile (``kron_cut``) and their PSF-fitted
# band fluxes (``psf_flux_band``), which detect_tiles measures on cut-outs across the tiles (_measure_cut_apertures)
PENDING_KEYS = ("kron_cut", "psf_flux_band")


def _not_refined(n: int) -> dict:
    """``fit`` 0 and NaN :data:`REFINEMENT_COLUMNS` for ``n`` rows."""
    return dict(fit=np.zeros(n, dtype=np.int8), **{k: np.full(n, np.nan) for k in REFINEMENT_COLUMNS})


def _no_rows(n_bands: int, n_classes: int) -> dict:
    """A tile's detections when there are none: every column of :func:`_decode_tile`'s, with no rows."""
    return dict(x=np.zeros(0), y=np.zeros(0), pos_err=np.zeros(0), flux=np.zeros(0), flux_err=np.zeros(0),
                score=np.zeros(0), class_prob=np.zeros((0, n_classes)), extension=np.zeros(0),
                flux_band=np.zeros((0, n_bands)), flux_band_err=np.zeros((0, n_bands)), **_not_refined(0))


@dataclass
class _Found:
    """Detections in full-image pixels, accumulated tile by tile."""

    n_bands: int
    class_names: list[str]
    rows: dict = field(default_factory=lambda: {k: [] for k in (
        "x", "y", "pos_err", "flux", "flux_err", "score", "class_prob", "extension", "flux_band", "flux_band_err",
        "fit", *REFINEMENT_COLUMNS, *PENDING_KEYS)})

    def add(self, **arrays):
        n = len(arrays["x"])  # tiles not refined have no pending rows
        arrays.setdefault("kron_cut", np.zeros(n, bool))
        arrays.setdefault("psf_flux_band", np.full((n, self.n_bands), np.nan))
        for k, v in arrays.items():
            self.rows[k].append(np.asarray(v))

    def arrays(self) -> dict:
        out = {}
        for k, v in self.rows.items():
            if v:
                out[k] = np.concatenate(v, axis=0)
            elif k in ("class_prob",):
                out[k] = np.zeros((0, len(self.class_names)))
            elif k in ("flux_band", "flux_band_err", "psf_flux_band"):
                out[k] = np.zeros((0, self.n_bands))
            else:
                out[k] = np.zeros(0)
        return out


NO_DATA_BLOCK = 5  # a CCD image's pixels of exactly 0 in a block this wide (or a region holding one) are no data


def zero_filled_mask(data: np.ndarray) -> np.ndarray | None:
    """(H, W) bool of a CCD image's no-data regions written as exact zeros (a drizzled or SWarp mosaic's edges,
    where no exposure fell), or None if there are none: pixels of 0.0 in any band whose connected zero region holds
    a :data:`NO_DATA_BLOCK` x :data:`NO_DATA_BLOCK` block. A sky with noise is never exactly 0 over a block, and a
    dead column (one pixel wide) stays for the PSF fit's own dead-pixel test."""
    from scipy import ndimage

    zero = np.asarray(data) == 0  # (C, H, W)
    if zero.sum(axis=(1, 2)).max(initial=0) < NO_DATA_BLOCK ** 2:
        return None
    block = np.ones((NO_DATA_BLOCK, NO_DATA_BLOCK), bool)
    out = np.zeros(zero.shape[1:], bool)
    for band in zero:
        if band.sum() >= NO_DATA_BLOCK ** 2:  # the zero regions holding a block, grown back into their thin tips
            out |= ndimage.binary_propagation(ndimage.binary_opening(band, structure=block), mask=band)
    return out if out.any() else None


def _prepare_tile(patch, inst):
    """Fill invalid pixels so the network sees no artificial edges: on CCD tiles each takes the pixel mirrored
    across the nearest valid edge (:func:`skyfm.data.tiling.mirror_fill`), 0 on counts. A flat fill (the band
    median, as before) changed the statistics the network's group norms take over the whole tile: a crowded
    MeerLICHT tile with a quarter of it masked lost 16% of its true detections elsewhere, mirrored 1%
    (``docs/benchmarks.md``, Run 23). A CCD tile's no-data regions written as zeros (:func:`zero_filled_mask`) are
    invalid too."""
    if not inst.is_counts:
        no_data = zero_filled_mask(patch.data)
        if no_data is not None:
            patch.mask = no_data if patch.mask is None else (patch.mask | no_data)
    if patch.mask is None:
        return patch
    valid = ~patch.mask
    if not valid.any():
        return None
    if not inst.is_counts:
        from skyfm.data.tiling import mirror_fill

        patch.data = mirror_fill(patch.data, patch.mask)
    else:
        patch.data[:, patch.mask] = 0.0
    return patch


def _zoom_patch(patch, out_size: tuple[int, int], counts: bool):
    """A tile resampled to ``out_size`` (bilinear), counts rescaled to stay counts per (new) pixel."""
    from scipy.ndimage import zoom

    from skyfm.data.patch import Patch

    h, w = patch.height, patch.width
    fy, fx = out_size[0] / h, out_size[1] / w
    data = zoom(patch.data, (1, fy, fx), order=1, mode="nearest", grid_mode=True)[:, :out_size[0], :out_size[1]]
    if counts:
        data = data / (fy * fx)
    elif fy * fx > 1.0 + RESAMPLE_TOLERANCE:
        data = _restore_pixel_noise(patch, data, fy * fx)
    mask = None if patch.mask is None else _zoom_mask(patch.mask, out_size)
    return Patch(data=data.astype(np.float32), instrument=patch.instrument, bands=list(patch.bands), wcs=None,
                 mask=mask, energy_edges_kev=patch.energy_edges_kev, meta=dict(patch.meta))


def _zoom_mask(mask: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """A (H, W) or (C, H, W) bool mask resampled to ``out_size`` as :func:`_zoom_patch` resamples its tile: each new
    pixel takes the old one it falls in."""
    from scipy.ndimage import zoom

    h, w = mask.shape[-2:]
    factors = (*(1,) * (mask.ndim - 2), out_size[0] / h, out_size[1] / w)
    out = zoom(mask.astype(np.float32), factors, order=0, mode="nearest", grid_mode=True) > 0.5
    return out[..., :out_size[0], :out_size[1]]


# the share of the missing white noise that _restore_pixel_noise adds: all of it (validation images, pixels 1.5x and
# 2x coarser, mean F1 of Hubble, crowded MeerLICHT and WISE: 0.737 / 0.713 at 1.0, 0.726 / 0.724 at 0.75)
RESTORED_NOISE = 1.0
# a tile's sky is flattened for the network where its background mesh spans more than this many rms (flat simulated
# skies: at most 0.8, so the benchmarks' images are left as they are; a 1.5-sigma gradient across a 512^2 MeerLICHT
# field already doubled its false positives) ...
FLAT_SKY_MIN_RANGE = 1.0
FLAT_SKY_BOX = 64  # ... with a mesh of this box (SExtractor's BACK_SIZE default; 32 took nebulae out better and cost
# the drawn MeerLICHT validation scenes 0.014 F1, their cluster cores' glow; nebulae are now followed by the mesh's
# finer one where the coarse one misses them, skyfm.catalog.psf_fit.extended_light)


def flat_sky_view(patch, fwhm_pix: list | None = None, inst=None):
    """A CCD tile as the network should see it: where a band's smooth background (the PSF fit's SExtractor-style
    mesh, :func:`~skyfm.catalog.psf_fit.background_and_rms`, with the extended light of nebulae that the mesh
    misses, :func:`~skyfm.catalog.psf_fit.extended_light`) varies across the tile by more than
    :data:`FLAT_SKY_MIN_RANGE` rms, it is taken out, around the tile's median sky. The networks were trained on
    skies flat across a tile: on a sky gradient (scattered light, the moon, a bright star's halo) or nebulosity
    they fired everywhere (a 3-sigma gradient across three 512^2 MeerLICHT fields: 2500 false positives;
    ``benchmarks/sky_backgrounds.py``, ``docs/benchmarks.md`` Run 23). The noise is left as it is (made uniform too, a cluster core's catalog lost
    half its stars). Only the network's input: the PSF fit measures its own background. ``fwhm_pix``: each band's
    PSF FWHM in pixels (:func:`sky_fwhm_pix`; the finest scale the background may follow). ``inst``: where given,
    its saturated pixels (:func:`saturation_mask`) are left out of the mesh, as the PSF fit's are (a bleed column's
    light is no sky)."""
    from dataclasses import replace

    from skyfm.catalog.psf_fit import background_and_rms

    data = np.array(patch.data, dtype=np.float32)
    mask = np.zeros(data.shape, bool)
    if patch.mask is not None:
        mask |= np.asarray(patch.mask, bool)
    if inst is not None:
        mask |= saturation_mask(data, inst)
    changed = False
    for c in range(data.shape[0]):
        bg, rms = background_and_rms(data[c], mask[c], box=FLAT_SKY_BOX,
                                     fwhm_pix=None if fwhm_pix is None else fwhm_pix[c])
        if np.ptp(bg) > FLAT_SKY_MIN_RANGE * float(np.median(rms)):
            data[c] = (data[c] - bg + float(np.median(bg))).astype(np.float32)
            changed = True
    return replace(patch, data=data) if changed else patch


def sky_fwhm_pix(inst, bands, seeing: dict | None = None) -> list[float]:
    """Each band's PSF FWHM in the instrument's pixels, for the background meshes of CCD tiles: the image's measured
    seeing (arcsec, :func:`measure_seeing`) where there is one, else the band's nominal PSF."""
    seeing = seeing or {}
    return [(seeing[b] / 3600.0 if b in seeing else inst.band(b).psf.fwhm_deg) / inst.pixel_scale_deg for b in bands]


def _restore_pixel_noise(patch, upsampled: np.ndarray, area: float) -> np.ndarray:
    """A CCD tile of pixels coarser than the network's, interpolated onto its grid (``upsampled``, values per
    image pixel), with white noise added so that each band's per-pixel noise is what an image of the same depth
    sampled at the network's pixels would have: ``sqrt(area)`` times the image pixels' (sums of ``area`` network
    pixels), of which interpolation keeps only a smooth part. The networks were trained on white noise: on the
    smooth one they fire on its blobs (four WISE W1+W2 images at unWISE's 2.75" pixels: 10,000 false positives,
    ``benchmarks/pixel_scales.py``)."""
    from skyfm.instruments.scaling import robust_background

    valid = None if patch.mask is None else ~np.asarray(patch.mask, bool)
    rng = np.random.default_rng(upsampled.shape[1] * upsampled.shape[2] + int(area * 1000))
    out = np.array(upsampled, dtype=np.float32)
    for c in range(out.shape[0]):
        coarse = patch.data[c] if valid is None else patch.data[c][valid]
        if coarse.size < 16:
            continue
        _, sigma = robust_background(np.asarray(coarse, np.float32))
        _, kept = robust_background(out[c])
        add = RESTORED_NOISE * np.sqrt(max(area * sigma ** 2 - kept ** 2, 0.0))
        out[c] += (add * rng.standard_normal(out[c].shape)).astype(np.float32)
    return out


def _decode_tile(det, out, i: int, patch, units, min_score: float, head, inst):
    """Detections of tile ``i`` of a batch output, in the tile's (network) pixels."""
    import torch

    from skyfm.heads.classification import decode_extension
    from skyfm.heads.flux import decode_flux
    from skyfm.heads.localization import find_peaks, merge_close

    prob = torch.sigmoid(out.heat[i, 0].float())
    valid = None
    if patch.mask is not None:
        valid = ~torch.from_numpy(np.asarray(patch.mask, bool)).to(prob.device)
    rows, cols, scores = find_peaks(prob, min_score, valid)
    if rows.numel() == 0:
        return None
    r, c = rows, cols
    dx = out.offset[i, 0, r, c].float().cpu().numpy()
    dy = out.offset[i, 1, r, c].float().cpu().numpy()
    x = c.cpu().numpy() + np.clip(dx, -1.5, 1.5)
    y = r.cpu().numpy() + np.clip(dy, -1.5, 1.5)
    score = scores.cpu().numpy().astype(np.float64)
    keep = merge_close(x, y, score, MERGE_RADIUS_PIX)
    sel = torch.as_tensor(keep, dtype=torch.long, device=r.device)
    r, c = r[sel], c[sel]
    x, y, score = x[keep], y[keep], score[keep]
    pos_err = np.exp(out.pos_logsigma[i, 0, r, c].float().cpu().numpy())
    flux, flux_err = decode_flux(out.flux[i, 0, r, c].float().cpu().numpy(), out.flux[i, 1, r, c].float().cpu().numpy(),
                                 float(np.sum(units)))
    k = len(head.class_names)
    logits = out.class_logits[i, :k, r, c].float()  # (K, N)
    class_prob = torch.softmax(logits, dim=0).T.cpu().numpy()
    extension = decode_extension(out.extension[i, 0, r, c].float().cpu().numpy(), head.pixel_scale_deg)
    band_flux = np.full((len(x), patch.n_bands), np.nan)
    band_err = np.full((len(x), patch.n_bands), np.nan)
    for j, b in enumerate(patch.bands):
        if b in head.bands:
            kb = head.bands.index(b)
            band_flux[:, j], band_err[:, j] = decode_flux(out.band_flux[i, kb, 0, r, c].float().cpu().numpy(),
                                                          out.band_flux[i, kb, 1, r, c].float().cpu().numpy(),
                                                          float(units[j]))
    known = np.isfinite(band_flux).all(axis=0)
    if 0 < known.sum() < _bands_per_training_image(inst):
        # the total-flux head learned the sum over as many bands as its training images held (WISE: all four): of an
        # image holding fewer (a W1 tile, a cube with bands left out) it gives no sum over those it holds (an
        # eighth of a W1 tile's), which its band heads, each of one band, do give (MeerLICHT's head, trained on one
        # band, is left alone); their errors add as fully correlated ones (a blend or a misjudged profile errs alike
        # in every band), which covered more true fluxes on validation images than a quadrature sum (WISE W1+W2
        # 0.646 vs 0.615)
        flux = band_flux[:, known].sum(axis=1)
        flux_err = band_err[:, known].sum(axis=1)
    flux_scale, pos_scale = head.error_scales()  # calibrated on validation patches (1.0: as predicted)
    return dict(x=x, y=y, pos_err=pos_err * pos_scale, flux=flux, flux_err=flux_err * flux_scale, score=score,
                class_prob=class_prob, extension=extension, flux_band=band_flux, flux_band_err=band_err * flux_scale,
                **_not_refined(len(x)))


def _bands_per_training_image(inst) -> int:
    """How many bands the simulated images an instrument's heads are trained on hold (its YAML's
    ``simulation.bands_per_image``; all by default)."""
    per_image = (inst.simulation or {}).get("bands_per_image", "all")
    return inst.n_bands if per_image == "all" else int(per_image)


def _native_tile(det, inst, pixel_scale: float | None, tile_size: int) -> tuple[int, float]:
    """(tile side in image pixels, zoom = network pixels per image pixel) for an image of ``pixel_scale`` deg."""
    if pixel_scale is None or not np.isfinite(pixel_scale) or pixel_scale <= 0:
        return tile_size, 1.0
    zoom = pixel_scale / inst.pixel_scale_deg
    if abs(zoom - 1.0) <= RESAMPLE_TOLERANCE:
        return tile_size, 1.0
    side = max(8, int(round(tile_size / zoom)))
    return side, tile_size / side


class SeeingWarning(UserWarning):
    """A CCD image's stars are broader than those its instrument's networks were trained on."""


SEEING_WARN_TOLERANCE = 0.2  # warn when the measured FWHM exceeds the top of the trained range by more than this
SEEING_WINDOW = 1024  # the seeing is measured on the central window of this side
SEEING_FACTORS = np.linspace(0.6, 3.0, 25)  # its trial widths, x the band's nominal FWHM
SEEING_LOCUS = 1.25  # ... from the sources within this factor of the narrowest ones' width (galaxies are broader)
SEEING_MAX_ELLIPTICITY = 0.45  # ... and round ones only (a satellite trail's peaks are lines across the fit box)


def measure_seeing(source, inst, pixel_scale: float | None = None) -> dict:
    """{band: PSF FWHM in arcsec} of a CCD image whose instrument's PSF varies (a seeing range in its YAML; a space
    telescope's is fixed: {}), fitted (:func:`~skyfm.catalog.psf_fit.estimate_fwhm`, trial widths
    :data:`SEEING_FACTORS` x nominal, wider than the PSF fit's own search) on the bright isolated peaks of the
    central :data:`SEEING_WINDOW` square, at ``pixel_scale`` deg per pixel (default the instrument's). With no star /
    galaxy labels here, the widths taken are the stellar locus (within :data:`SEEING_LOCUS` of the narrowest
    fifth's; a galaxy only comes out broader) of round peaks (ellipticity up to :data:`SEEING_MAX_ELLIPTICITY`; a
    satellite trail's peaks are lines): without both, 7 of 328 bands of six-band validation images (2-3" seeing)
    came out at 3.6-8" and gave a false :class:`SeeingWarning`. Bands with too few such stars are left out.
    ``source``: a Patch or an opened image."""
    from scipy import ndimage

    from skyfm.catalog.psf_fit import background_and_rms, estimate_fwhm

    if inst.is_counts:
        return {}
    scale = float(pixel_scale) if pixel_scale and np.isfinite(pixel_scale) else inst.pixel_scale_deg
    varying = [(c, inst.band(b)) for c, b in enumerate(source.bands)
               if len(set(inst.band(b).fwhm_range_deg())) > 1]
    if not varying:
        return {}
    h, w = source.height, source.width
    y0, x0 = max(0, (h - SEEING_WINDOW) // 2), max(0, (w - SEEING_WINDOW) // 2)
    y1, x1 = min(h, y0 + SEEING_WINDOW), min(w, x0 + SEEING_WINDOW)
    if hasattr(source, "read_window"):  # an opened image: only the window is read
        data = np.asarray(source.read_window(y0, y1, x0, x1), dtype=np.float64)
        invalid = ~np.isfinite(data)
    else:
        data = np.asarray(source.data[:, y0:y1, x0:x1], dtype=np.float64)
        invalid = ~np.isfinite(data)
        if source.mask is not None:
            invalid |= np.asarray(source.mask, bool)[None, y0:y1, x0:x1]
    invalid |= saturation_mask(np.nan_to_num(data), inst)
    seeing = {}
    for c, band in varying:
        valid = ~invalid[c]
        if valid.sum() < 64 * 64:
            continue
        image = np.where(valid, data[c], np.median(data[c][valid]))
        bg, rms = background_and_rms(image, ~valid, extended=False)  # the seeing is not known yet
        nominal_pix = band.psf.fwhm_deg / scale
        signal = (image - bg) / rms
        peaks = valid & (signal > 5.0)
        peaks &= signal == ndimage.maximum_filter(signal, size=max(3, int(round(nominal_pix)) | 1))
        py, px = np.nonzero(peaks)
        quick_snr = signal[py, px] * 1.5 * nominal_pix  # as refine_ccd_tile ranks its sources
        fwhm = estimate_fwhm(image, bg, rms, band.psf_with_fwhm, band.psf.fwhm_deg, scale, px, py, quick_snr,
                             factors=SEEING_FACTORS, locus=SEEING_LOCUS, max_ellipticity=SEEING_MAX_ELLIPTICITY)
        if fwhm != band.psf.fwhm_deg:  # an estimate, not the fallback of too few stars
            seeing[band.name] = fwhm * 3600.0
    return seeing


def _seeing_meta(seeing: dict) -> dict:
    """Catalog meta keys ``seeing_<band>``: the measured PSF FWHM of each band, arcsec (:func:`measure_seeing`)."""
    return {f"seeing_{name}": round(float(v), 3) for name, v in seeing.items()}


def _warn_if_broad_seeing(seeing: dict, inst) -> None:
    """A :class:`SeeingWarning` for the bands of ``seeing`` (arcsec, :func:`measure_seeing`) broader than the top
    of their trained range by more than :data:`SEEING_WARN_TOLERANCE`: on such images the networks split stars
    into several peaks and lose faint ones (MeerLICHT, trained on 2-3": crowded fields at 4.5" F1 0.59, at 5.5"
    0.48, level with sep-nofilter; ``docs/benchmarks.md`` Run 24)."""
    broad = []
    for name, arcsec in seeing.items():
        lo, hi = (3600.0 * v for v in inst.band(name).fwhm_range_deg())
        if arcsec > (1.0 + SEEING_WARN_TOLERANCE) * hi:
            broad.append(f"{name} {arcsec:.1f}\" (trained on {lo:.1f}-{hi:.1f}\")")
    if broad:
        warnings.warn(SeeingWarning(
            f"the image's stars are broader than the {inst.name} networks were trained on: seeing {', '.join(broad)}; "
            "expect split stars and fewer faint ones (the catalog's meta holds the measured seeing)"), stacklevel=3)


def _release_file_pages(source) -> None:
    """Drop the pages of a memory-mapped image that tiles already read from this process's resident set.

    They are clean file pages (re-read from the page cache if needed again), but a mapping keeps them resident:
    without this, streaming a 16k x 16k float32 image would end with the whole 1 GB file counted as resident.
    """
    import mmap

    hdul = getattr(source, "_hdul", None)
    m = getattr(getattr(hdul, "_file", None), "_mmap", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        m.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


def training_patch_size(det) -> int:
    """The side (pixels) of the patches the detector was fine-tuned on (its recipe's ``data.size``), else 64."""
    recipe = (det.config.training or {}).get("recipe") or {}
    try:
        return int((recipe.get("data") or {}).get("size") or 64)
    except (TypeError, ValueError):
        return 64


def default_tiling(det, inst, n_bands: int) -> tuple[int, int]:
    """(tile side in pixels, attention window in tokens; 0 = global) when the caller gives neither.

    CCD images: large tiles (512 px, whatever ``n_bands``) with attention in windows the size of the training
    patches, so the overlap between tiles costs little and the transformer's cost is linear in the area. On
    validation seeds (9.5e8) this kept F1 within 0.01 of global attention on 128/256-px tiles at 2-3x the speed;
    images of several bands had 256-px tiles until Run 35, whose overlaps cost them 11-25% more time for the same
    F1 (``docs/benchmarks.md``). Counts cubes keep the detector's tile (128 px) and global attention: there the
    scaling of a tile depends on its size, and larger tiles lost 0.1 F1 on the Fermi plane on the same seeds.
    """
    base = int(det.config.tile_size)
    if inst.is_counts:
        return base, 0
    window = max(1, training_patch_size(det) // det.token_stride)
    return base * 4, window


def inference_settings(det, precision: str = "auto", attention_window: int | None = None) -> tuple[bool, int | None]:
    """(bf16, window) for running ``det`` over tiles; see :func:`inference_context`.

    precision: ``fp32``; ``bf16`` (autocast: matmuls and convolutions in bfloat16, heatmaps within ~0.01 of
        float32); ``auto`` = bf16 where it is native (:func:`skyfm.utils.bf16_is_fast`), else fp32.
    attention_window: tokens per side of the windows the ViT attends within (0: global attention over the
        whole tile; None: :func:`default_tiling`'s choice).
    """
    bf16 = use_bf16(precision, det.device)
    window = 0 if attention_window is None else int(attention_window)
    if window < 0:
        raise SkyfmError(f"attention_window must be >= 0 tokens (0 = global attention), got {window}")
    return bf16, (window or None)


@contextlib.contextmanager
def inference_context(det, bf16: bool, window: int | None):
    """No gradients, bf16 autocast when asked, the backbone's attention window set, and on a CPU the weights in
    channels-last order (all restored on exit)."""
    import torch

    backbone = det.foundation.backbone
    has_window = hasattr(backbone, "attention_window")  # U-Net backbones have no attention window
    before = backbone.attention_window if has_window else None
    if has_window:
        backbone.attention_window = window
    # a detector handed in (load_detector's, a fine-tuning run's) as get_detector leaves those it loads: oneDNN's
    # convolutions run 1.3-3x faster on NHWC tensors, and the same catalogs as the command line's come out
    reorder = det.device.type == "cpu" and not _channels_last(det)
    if reorder:
        det.to(memory_format=torch.channels_last)
    autocast = torch.autocast(det.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        if has_window:
            backbone.attention_window = before
        if reorder:
            det.to(memory_format=torch.contiguous_format)


def _channels_last(det) -> bool:
    """Whether ``det``'s convolution weights are in channels-last (NHWC) order: its first one wider than 1 x 1."""
    import torch

    for module in det.modules():
        if isinstance(module, torch.nn.Conv2d) and module.weight.shape[-1] > 1 and module.weight.shape[1] > 1:
            return module.weight.is_contiguous(memory_format=torch.channels_last)
    return True


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def _even_tile(length: int, side: int, overlap: int, stride: int, granule: int) -> int:
    """The tile length along one image axis of ``length`` pixels: the whole axis (a multiple of the token
    ``stride``) when it fits in ``side``; else, with ``granule`` > 0, the shortest multiple of ``granule`` that
    covers the axis with as few tiles as ``side``-long ones would need (a 2048-px axis: five tiles of 448 px, not
    four of 512 and a fifth that repeats 416 of its 512 px), and ``side`` with ``granule`` 0."""
    if _round_up(length, stride) <= side:
        return _round_up(length, stride)
    if granule <= 0 or side - overlap <= 0:
        return side
    n_tiles = math.ceil((length - overlap) / (side - overlap))
    return min(side, _round_up(math.ceil((length - overlap) / n_tiles) + overlap, granule))


def detect_tiles(source, inst, det, *, min_score: float, tile_size: int | None = None, overlap: int | None = None,
                 batch_size: int | None = None, progress: bool = False, pixel_scale: float | None = None,
                 precision: str = "auto", attention_window: int | None = None, refine: bool = True,
                 drop_trails: bool | None = None, mask_cosmic_rays: bool | None = None,
                 refine_workers: int | None = None, image_seeing: dict | None = None) -> dict:
    """Run the detector over every tile of ``source`` (a Patch or an opened ImageFile) -> full-image arrays.

    ``precision`` and ``attention_window``: see :func:`inference_settings`. ``refine``: PSF-fit refinement of
    the bright detections of CCD tiles (:func:`refine_ccd_tile`, which ``mask_cosmic_rays`` passes on); counts
    cubes are refined after all tiles (:func:`refine_counts`). ``drop_trails``: on CCD tiles, drop the detections
    on satellite trails that the tile's image shows (:func:`drop_trail_detections`; None: the head's
    ``drop_trails``). ``refine_workers``: threads for the CCD tiles' refinement and trail filter
    (:func:`_refine_workers`; the estimates carried from tile to tile, seeing and colours, are taken in tile order,
    so the catalog is the same for any number); with more than one, a batch's tiles are refined (or filtered) while
    the network runs on the next batch. ``image_seeing``: the image's measured seeing (:func:`measure_seeing`), for
    the scale of the tiles' background meshes (:func:`sky_fwhm_pix`).
    """
    import torch
    from tqdm.auto import tqdm

    from skyfm.catalog.table import FLUX_LIKE_COLUMNS
    from skyfm.data.tiling import iter_tiles, tile_grid
    from skyfm.heads.localization import merge_close

    head = det.head_config(inst.name).for_bands(source.bands)
    drop_trails = head.drop_trails if drop_trails is None else bool(drop_trails)
    stride = det.token_stride
    default_tile, default_window = default_tiling(det, inst, len(source.bands))
    tile_size = default_tile if tile_size is None else tile_size
    attention_window = default_window if attention_window is None else attention_window
    tile_size = _round_up(int(tile_size), stride)
    overlap = int(det.config.tile_overlap if overlap is None else overlap)
    _, height, width = source.shape
    side, zoom = _native_tile(det, inst, pixel_scale, tile_size)
    if zoom == 1.0:  # small images: one tile just big enough (a multiple of the token stride)
        granule = stride * (attention_window or 1) if not inst.is_counts else 0  # counts: scaling depends on size
        tile_hw = (_even_tile(height, side, overlap, stride, granule), _even_tile(width, side, overlap, stride, granule))
        over = (min(overlap, tile_hw[0] - stride), min(overlap, tile_hw[1] - stride))
    else:
        tile_hw = (side, side)
        o = max(0, min(int(round(overlap / zoom)), side - 1))
        over = (o, o)
    net_hw = tile_hw if zoom == 1.0 else (tile_size, tile_size)
    if batch_size is None:
        if det.device.type == "cuda":  # ~4 M band-pixels per pass (16 one-band 512^2 tiles: 3.7 GB of GPU memory;
            # the network alone ran at 132 Mpix/s there against 114 for 8 tiles on an H200, docs/benchmarks.md,
            # "On a GPU")
            batch_size = max(2, min(32, (4 * 2**20) // (net_hw[0] * net_hw[1] * len(source.bands))))
        else:  # about 0.5 Mpix per forward pass: the memory of 8 tiles of 256^2, whatever the tile
            batch_size = max(2, min(8, (8 * 256 * 256) // (net_hw[0] * net_hw[1])))
    over = (max(over[0], 0), max(over[1], 0))
    grid = tile_grid(height, width, tile_hw, over)
    found = _Found(n_bands=len(source.bands), class_names=list(head.class_names))
    bf16, window = inference_settings(det, precision, attention_window)
    seeing: dict = {}  # per band, the PSF fit's seeing estimates of the tiles so far
    sky_fwhm = None if inst.is_counts else sky_fwhm_pix(inst, source.bands, image_seeing)
    bar = tqdm(total=len(grid), desc="detecting", unit="tile", disable=not progress or len(grid) < 4)

    ccd_refine = refine and not inst.is_counts  # the PSF fit of CCD tiles (counts cubes are refined after all tiles)
    search = ccd_refine and (head.residual_search is not None or head.companion_search is not None)
    # at the head's own threshold, a peak the PSF fit does not confirm (fit 0) needs the head's higher one where it
    # has one; any other threshold the caller chose applies to every detection
    own = min_score == default_min_score(det, head)
    unconfirmed = head.unconfirmed_threshold(min_score) if ccd_refine and head.psf_fit and own else min_score
    unconfirmed_crowding = head.unconfirmed_crowding_limit()
    unconfirmed_chi2 = head.unconfirmed_chi2_limit()
    trail_filter = drop_trails and not inst.is_counts
    workers = _refine_workers(refine_workers) if ccd_refine or trail_filter else 1
    pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
    # the steps that carry estimates from tile to tile (seeing, colours) in tile order, whatever the threads
    turns, tickets = _TileTurns(("seeing", "colours")), itertools.count()
    colours: dict = {}  # the fitted detections' band fluxes of the tiles so far
    cosmic_pixels: list = []  # the tiles' cosmic-ray pixels, for the Kron apertures measured across tiles
    tile_cosmics = cosmic_pixels if zoom == 1.0 else None  # (zoomed tiles' pixels are not the image's)
    # averaged onto coarser pixels a cosmic ray is no sharper than a star, so a tile of pixels finer than the
    # instrument's has its hits found and cleaned on its own pixels before it is resampled (Hubble images at 0.6x its
    # pixels: F1 0.763 -> 0.815). Coarser pixels keep the pass on the resampled tile, and no detection is dropped as
    # a hit: there L.A.Cosmic takes stars for hits (the PSF undersampled in the image's pixels, smooth in the
    # resampled ones; at 2x Hubble's pixels, F1 0.602 -> 0.127 with the hits found on the image's pixels, 0.551 with
    # the test on the resampled tile's)
    hit_test = zoom <= 1.0
    cosmics_before_zoom = zoom < 1.0 and not inst.is_counts and (
        head.mask_cosmic_rays if mask_cosmic_rays is None else mask_cosmic_rays)

    def refined(k, p, d, cosmics):
        try:
            d = refine_ccd_tile(d, p, inst, head, seeing, mask_cosmic_rays=mask_cosmic_rays, colours=colours,
                                sky_fwhm=sky_fwhm,
                                turn=lambda name: turns.turn(k, name), cosmic_pixels=tile_cosmics,
                                whole_image=len(grid) == 1, cosmics=cosmics, hit_test=hit_test)
        finally:
            turns.skip(k)
        found = np.isin(d["fit"], (4, 5))  # the residual search's finds and companions
        if search:  # as the network's peaks, above the threshold in use
            d, found = _take(d, ~found | (d["score"] >= min_score)), found[~found | (d["score"] >= min_score)]
        if unconfirmed > min_score:
            sparse = np.nan_to_num(d["crowding"], nan=0.0) < unconfirmed_crowding
            # a fit far off the data (reduced chi-square above the head's limit) confirms nothing either
            misfit = ~found & (np.nan_to_num(d["fit_chi2"], nan=0.0) > unconfirmed_chi2)
            d = _take(d, ((d["fit"] != 0) & ~misfit) | (d["score"] >= unconfirmed) | ~sparse)
        return trails_only(k, p, d, cosmics) if trail_filter else d

    def trails_only(k, p, d, cosmics):  # in the refinement's threads too, beside the network's next batch
        return drop_trail_detections(d, p, inst, pixel_scale=(pixel_scale or inst.pixel_scale_deg) / zoom)

    post = refined if ccd_refine else trails_only if trail_filter else None  # what the threads do to a tile

    # A batch's tiles are refined in threads while the network runs on the next batch: the batch in flight is
    # finished (its fits waited for, its rows added in tile order) after the next one is submitted
    in_flight: list = []  # [(decoded tiles, their refinement futures or None, tiles in the batch)]
    # pending and decoded tiles: (tile, patch, its cosmic-ray pixels found before zooming or None[, decoded rows])

    def flush(items):
        if not items:
            return
        batch = det.make_batch([p if inst.is_counts else flat_sky_view(p, sky_fwhm, inst) for _, p, _ in items])
        with inference_context(det, bf16, window):
            out = det({k: (v.to(det.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        decoded = []
        for i, (t, p, c) in enumerate(items):
            d = _decode_tile(det, out, i, p, batch["flux_units"][i], min_score, head, inst)
            if not inst.is_counts:
                d = add_saturated_stars(d, p, inst, head)
            if d is None and search:  # nothing detected: the residual search may still find something
                d = _no_rows(p.n_bands, len(head.class_names))
            if d is not None:
                decoded.append((t, p, c, d))
        futures = None
        if post is not None and decoded:
            # the tiles' fits run in threads (numpy and scipy release the GIL); their seeing estimates, which
            # accumulate from tile to tile, are taken in tile order, so the catalog is the same for any number
            jobs = [(next(tickets), p, d, c) for _, p, c, d in decoded]
            if pool is not None:
                futures = [pool.submit(post, *job) for job in jobs]
            else:
                decoded = [(t, p, c, post(*job)) for (t, p, c, _), job in zip(decoded, jobs)]
        in_flight.append((decoded, futures, len(items)))
        while len(in_flight) > (1 if pool is not None else 0):
            finish(*in_flight.pop(0))

    def finish(decoded, futures, n_items):
        if futures is not None:
            decoded = [(t, p, c, f.result()) for (t, p, c, _), f in zip(decoded, futures)]
        for t, p, _, d in decoded:
            f = 1.0 / zoom  # image pixels per network pixel
            d["x"] = t.x0 + (d["x"] + 0.5) * f - 0.5
            d["y"] = t.y0 + (d["y"] + 0.5) * f - 0.5
            d["pos_err"] = d["pos_err"] * f
            if zoom != 1.0 and not inst.is_counts:  # surface brightness was kept: sums scale with pixel area
                for k in ("flux", "flux_err", *FLUX_LIKE_COLUMNS, "psf_flux_band"):
                    d[k] = d[k] * f * f
            own = t.owns(d["x"], d["y"])
            if np.any(own):
                found.add(**{k: v[own] for k, v in d.items()})
        bar.update(n_items)

    pending = []
    try:
        for n_tile, (t, patch) in enumerate(iter_tiles(source, tile_hw, over)):
            if n_tile % 64 == 63:
                _release_file_pages(source)
            patch = _prepare_tile(patch, inst)
            if patch is None:
                bar.update(1)
                continue
            cosmics = None
            if zoom != 1.0:
                if cosmics_before_zoom:
                    from skyfm.catalog.cosmics import clean_cosmic_rays

                    cosmics = _cosmic_rays(patch.data, inst, patch.mask)
                    patch.data = clean_cosmic_rays(patch.data, cosmics[0])
                    cosmics = tuple(_zoom_mask(m, net_hw) for m in cosmics)
                patch = _zoom_patch(patch, net_hw, inst.is_counts)
                patch = _prepare_tile(patch, inst) or patch
            patch.truth = None
            pending.append((t, patch, cosmics))
            if len(pending) >= batch_size:
                flush(pending)
                pending = []
        flush(pending)
        while in_flight:
            finish(*in_flight.pop(0))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    arrays = found.arrays()
    if len(arrays["x"]) > 1:  # two tiles may each own one half of a source split across their core boundary
        keep = merge_close(arrays["x"], arrays["y"], arrays["score"], MERGE_RADIUS_PIX)
        keep = np.sort(keep)
        arrays = {k: v[keep] for k, v in arrays.items()}
    if np.any(arrays["kron_cut"]):  # on cut-outs of the image in its own pixels, zoomed tiles or not
        arrays = _measure_cut_apertures(
            arrays, source, inst, head, grid, tile_hw, inst.pixel_scale_deg if zoom == 1.0 else pixel_scale,
            seeing, colours, cosmic_pixels if zoom == 1.0 else None, mask_cosmic_rays, progress=progress)
    for k in PENDING_KEYS:
        arrays.pop(k)
    order = np.argsort(-arrays["score"], kind="stable")
    return {k: v[order] for k, v in arrays.items()}


class _TileTurns:
    """Lets threads pass each named section in the order of their tickets 0, 1, 2, ...: ``turn(k, name)`` waits
    for ticket k's turn at that section and hands it on at the end; ``skip(k)`` (after the job, whether or not it
    entered) hands on every section the job never took."""

    def __init__(self, sections=("seeing",)):
        self._next = dict.fromkeys(sections, 0)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def turn(self, k: int, name: str = "seeing"):
        with self._cond:
            self._cond.wait_for(lambda: self._next[name] == k)
        try:
            yield
        finally:
            with self._cond:
                self._next[name] = k + 1
                self._cond.notify_all()

    def skip(self, k: int) -> None:
        with self._cond:
            for name in self._next:
                self._cond.wait_for(lambda: self._next[name] >= k)
                if self._next[name] == k:
                    self._next[name] = k + 1
                    self._cond.notify_all()


def _refine_workers(workers: int | None) -> int:
    """Threads for the CCD tiles' refinement: ``workers``, or (None) the CPUs this process may use, at most 8."""
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(cpus, 8))
    if int(workers) < 1:
        raise SkyfmError(f"refine_workers must be >= 1, got {workers}")
    return int(workers)


# ------------------------------------------------------------------------------------------------ CCD refinement
PSF_FIT_MIN_SNR = 5.0  # detections whose PSF fit has a lower SNR keep the network's values
PSF_FIT_MAX_NEGATIVE = 5.0  # ... and those with a band flux below -this many sigma: no source has negative light
SEEING_TILES = 5  # tiles of one image whose seeing estimates are enough: later tiles take their median
PSF_FIT_PASSES = 2  # rounds of the PSF fit over all detections (each fitted with the others' current models)
COMPANION_MODEL_ERROR = 0.03  # a companion search's noise: the sky's and this share of the fitted models' light
COMPANION_MIN_SEPARATION = 0.5  # a companion lies at least this many FWHM from every detection (searched, fitted)
COSMIC_RAY_SEARCH_MARGIN = 1  # pixels around a flagged cosmic-ray pixel that the residual search also leaves out
# a detection with more than this share of the light within a FWHM of it on cosmic-ray pixels (the deeper test
# pass, _cosmic_rays) ...
COSMIC_RAY_LIGHT_MAX = 0.5
# ... and the light off them within two FWHM at a lower signal-to-noise ratio is a hit: dropped (chosen on validation
# images, benchmarks/choose_cosmic_rays.py)
COSMIC_RAY_SOURCE_SNR = 5.0


def saturation_mask(data: np.ndarray, inst) -> np.ndarray:
    """(C, H, W) bool: pixels at or above 99.9% of the instrument's saturation level (``noise.saturation``,
    ADU), grown by one pixel (a clipped core's edge pixels are already non-linear). All False when the instrument
    gives no level. In a band whose sky has been subtracted (:func:`~skyfm.instruments.ccd_noise.missing_sky`) a clipped
    core lies that much below the level, and the limit with it."""
    from scipy import ndimage

    from skyfm.instruments.ccd_noise import missing_sky

    noise = inst.noise or {}
    level = noise.get("saturation")
    if not level or not np.isfinite(float(level)):
        return np.zeros(data.shape, bool)
    limit = np.full(data.shape[0], 0.999 * float(level))
    for c in range(data.shape[0]):
        top = float(np.nanmax(data[c], initial=-np.inf))
        # a flat top short of the level (a few pixels within 1% of the band's highest; no star's peak is that flat)
        # is a clipped core with the sky taken off, if any sky was: no subtracted sky is half the level
        if 0.5 * float(level) <= top < limit[c] and np.count_nonzero(data[c] >= 0.99 * top) >= 3:
            limit[c] -= missing_sky(data[c], np.zeros(data.shape[1:], bool), float(noise.get("gain", 1.0)) or 1.0,
                                    float(noise.get("read_noise", 0.0)))
    full = data >= limit[:, None, None]
    if not full.any():
        return full
    return ndimage.binary_dilation(full, structure=np.ones((1, 3, 3), bool))


DEAD_PIXEL_SIGMA = 10.0  # a pixel this many sigma below the sky is a dead pixel or column: no light is negative
MAX_MASKED_SHARE = 0.1  # a source whose fit box is masked beyond this (a saturated core) keeps its own flux
KRON_MAX_CROWDING = 0.1  # Kron fluxes are measured below this crowding, or the head's kron_max_crowding
TRAIL_OTHER_BAND_SNR = 5.0  # a detection on one band's satellite trail stays where another band sees it this well
# the image-wide trail search leaves out a disc around each saturated star of 2 FWHM plus this many times its
# saturated core's radius (the largest circle inside it): the halo of a bright star lifts the lines through it for
# a distance that grows with the star (a Moffat wing: ~4x the core's radius to 5 sigma), and with a cluster's stars
# along them a line through one passed for a trail (300 Hubble F606W cluster validation patches, no trail drawn: 8
# false trails -> 2; of the trails drawn across 160 forced-trail patches it found 105 -> 104;
# runs/exp40/satmask.py)
TRAIL_HALO_CORE_RADII = 2.0


def _masked_share(mask: np.ndarray, x, y, psfs, scale: float) -> np.ndarray:
    """(N,) share of masked pixels (any band) in each source's PSF-fit box (1.5 x the widest FWHM)."""
    from skyfm.catalog.psf_fit import _stamp_indices, fit_radius_pix

    h, w = mask.shape[1:]
    r = fit_radius_pix(psfs, scale)
    _, _, flat, inside = _stamp_indices(np.asarray(x, float), np.asarray(y, float), r, h, w)
    masked = mask.any(axis=0).ravel()[flat] & inside
    return masked.sum(axis=(1, 2)) / np.maximum(inside.sum(axis=(1, 2)), 1)


def add_saturated_stars(d: dict | None, patch, inst, head) -> dict | None:
    """The detections of one CCD tile (``d``, tile pixels; None for none) plus one row for each saturated star the
    network left out; a saturated star the network did find takes the aperture flux below.

    A star bright enough to fill its core at the saturation level is a source whatever the network makes of its
    flat top and bleed column (bright ones are rare in training). Every connected region of
    :func:`saturation_mask` (all bands) that holds a 2 x 2 block of saturated pixels (a cosmic ray or a hot pixel
    rarely does) and has no detection within one PSF FWHM of it gets a row: at the region's centroid, score 1,
    class star, extension 0, and aperture photometry (the background-subtracted sum over the region grown by two
    FWHM, which keeps the charge a full well bled into its column) with its Poisson and sky error and the head's
    relative flux floor (:meth:`~skyfm.heads.config.InstrumentHeadConfig.error_floors`). The PSF fit on
    the unsaturated wings (:func:`refine_ccd_tile`) then gives the position; it keeps this flux, since a fit that
    sees only a ring around a masked core comes out low.
    """
    from scipy import ndimage

    data = np.asarray(patch.data, dtype=np.float64)
    saturated = saturation_mask(data, inst).any(axis=0)
    if patch.mask is not None:  # invalid pixels hold a fill (:func:`_prepare_tile`), not light
        saturated &= ~np.asarray(patch.mask, bool)
    if not saturated.any():
        return d
    core = ndimage.binary_erosion(saturated, structure=np.ones((2, 2), bool), border_value=0)
    labels, _ = ndimage.label(saturated)
    fwhm = max(inst.band(b).psf.fwhm_deg for b in patch.bands) / inst.pixel_scale_deg
    gain = float((inst.noise or {}).get("gain", 1.0)) or 1.0
    flux_floor = head.error_floors()[0]
    x0 = np.zeros(0) if d is None else np.asarray(d["x"], float)
    y0 = np.zeros(0) if d is None else np.asarray(d["y"], float)
    sky = [np.median(data[c]) for c in range(data.shape[0])]
    sky_var = np.array([(1.4826 * np.median(np.abs(data[c] - sky[c]))) ** 2 for c in range(data.shape[0])])
    d = None if d is None else {k: np.array(v, copy=True) for k, v in d.items()}
    rows = []
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[region] == k
        if not (core[region] & inside).any():
            continue
        ys, xs = np.nonzero(inside)
        yc, xc = ys.mean() + region[0].start, xs.mean() + region[1].start
        (y_lo, y_hi), (x_lo, x_hi) = (region[0].start, region[0].stop - 1), (region[1].start, region[1].stop - 1)
        # aperture photometry over the region grown by two FWHM: a full well spills into its column (bleeding),
        # so the sum keeps the charge the clipped core lost; error: Poisson (gain) plus the sky's scatter
        grow = int(np.ceil(2 * fwhm))  # (dilated in a window that holds the grown region, not the whole tile)
        window = (slice(max(y_lo - grow, 0), y_hi + grow + 1), slice(max(x_lo - grow, 0), x_hi + grow + 1))
        grown = ndimage.binary_dilation(labels[window] == k, iterations=grow)
        band_flux = np.array([np.sum((data[c][window] - sky[c])[grown]) for c in range(data.shape[0])])
        # ... and the systematic floor of every flux of the head: a bright star's Poisson error alone (0.3%) is far
        # below what the aperture misses or takes from neighbours (1-4% on simulated saturated stars)
        band_err = np.hypot(np.sqrt(np.abs(band_flux) / gain + grown.sum() * sky_var), flux_floor * band_flux)
        near = np.flatnonzero((x0 >= x_lo - fwhm) & (x0 <= x_hi + fwhm) & (y0 >= y_lo - fwhm) & (y0 <= y_hi + fwhm))
        if near.size:  # the network found it: the nearest detection takes the aperture flux
            j = near[np.argmin(np.hypot(x0[near] - xc, y0[near] - yc))]
            d["flux"][j], d["flux_err"][j] = band_flux.sum(), np.sqrt(np.sum(band_err ** 2))
            d["flux_band"][j], d["flux_band_err"][j] = band_flux, band_err
            continue
        rows.append((xc, yc, 0.5 * max(x_hi - x_lo, y_hi - y_lo) + 0.5, band_flux, band_err))
    if not rows:
        return d
    n, names = len(rows), list(head.class_names)
    class_prob = np.zeros((n, len(names)))
    class_prob[:, names.index("star") if "star" in names else 0] = 1.0
    band_flux, band_err = np.stack([r[3] for r in rows]), np.stack([r[4] for r in rows])
    new = dict(x=np.array([r[0] for r in rows]), y=np.array([r[1] for r in rows]),
               pos_err=np.array([r[2] for r in rows]), flux=band_flux.sum(axis=1),
               flux_err=np.sqrt(np.sum(band_err ** 2, axis=1)), score=np.ones(n), class_prob=class_prob,
               extension=np.zeros(n), flux_band=band_flux, flux_band_err=band_err, **_not_refined(n))
    if d is None:
        return new
    return {k: np.concatenate([d[k], new[k].astype(d[k].dtype, copy=False)]) if k in new else d[k] for k in d}


def refine_ccd_tile(d: dict, patch, inst, head, seeing: dict | None = None,
                    mask_cosmic_rays: bool | None = None, colours: dict | None = None, turn=None,
                    cosmic_pixels: list | None = None, whole_image: bool = False,
                    cosmics: tuple | None = None, hit_test: bool = True,
                    sky_fwhm: list | None = None) -> dict:
    """PSF-fit refinement of one CCD tile's detections (tile pixels), :mod:`skyfm.catalog.psf_fit`.

    Every detection is modelled (so that neighbours share their light) on the pixels below the instrument's
    saturation level (:func:`saturation_mask`: a clipped core or a bleed column is no PSF) and not more than
    :data:`DEAD_PIXEL_SIGMA` below the background (dead pixels and columns), but only those whose
    fit converged with a significance over all bands (sqrt of the sum of the bands' SNR^2) >= ``PSF_FIT_MIN_SNR``
    take the fitted position and position error; of these, the
    point-like ones (star probability >= 0.5 and extension under one pixel) also take the PSF flux and its error.
    The fit's Fisher errors grow with sqrt(max(1, reduced chi-square)) of each source's box (column ``fit_chi2``),
    flux errors are at least the scatter of PSF fluxes at blank places of the residual image nearby
    (:func:`~skyfm.catalog.psf_fit.blank_flux_scatter`: the confusion of undetected neighbours, catalog column
    ``flux_confusion``), then all take the head's calibrated scales and floors. Rows that keep the network's flux
    (not saturated) get ``hypot(a x the network's error, b x flux_confusion)`` with the head's
    :meth:`~skyfm.heads.config.InstrumentHeadConfig.unfitted_flux_error_terms`. Rows fitted where the field is
    sparse (``crowding`` below the head's ``kron_max_crowding``, else :data:`KRON_MAX_CROWDING`) also get a Kron
    aperture flux (:func:`~skyfm.catalog.kron.kron_photometry`, columns ``flux_kron``, ``flux_kron_err``,
    ``kron_excess``, ``kron_size``), which those with ``kron_excess`` >= the head's ``kron_excess_min`` take
    (``fit`` 3; with the head's ``kron_centroid`` also the windowed centroid of their light as position), and, with
    the head's ``class_calibration``, class probabilities from the network's and those
    measurements (:func:`~skyfm.heads.classification.calibrate_class_prob`). The seeing of each band is fitted on
    the tile's bright point-like detections, the others subtracted (:func:`estimate_fwhm`); with ``seeing`` (a dict
    kept across the tiles of one image) the median of the tiles' estimates so far is used, and once
    ``SEEING_TILES`` tiles have given one no more are made. Heads with
    ``psf_fit`` False (chosen on validation seeds) keep the network's values. With the head's
    ``companion_search``, the second stars of blends (:func:`find_companions`) are fitted with the detections and
    kept, as rows of ``fit`` 5 scored by the head's logistic in ln(fit SNR), where the fit confirms them (as above,
    and at least :data:`COMPANION_MIN_SEPARATION` FWHM from every detection); they take the fit's flux, also beside
    a saturated star.
    ``mask_cosmic_rays`` (default the head's setting): leave the tile's cosmic-ray pixels
    (:func:`~skyfm.catalog.cosmics.cosmic_ray_mask`) out of the fit, as its saturated ones. ``colours`` (a dict kept
    across the tiles of one image, like ``seeing``): the fitted detections' band fluxes of the tiles so far, whose
    colour template (:func:`colour_template`) gives the residual search's finds their total fluxes
    (:func:`_template_total`). ``turn(name)``: a context manager around the steps that read and add to ``seeing``
    (name ``seeing``) and ``colours`` (``colours``); :func:`detect_tiles`, refining tiles in threads, passes one
    that takes them in tile order. ``cosmic_pixels`` (a list kept across the tiles of one image): each tile
    appends its cosmic-ray pixels, (band, y, x) in image pixels (the tile's ``meta`` ``tile_y0``, ``tile_x0``), for
    :func:`_measure_cut_apertures`. Rows whose Kron aperture runs off the tile take no Kron measurement here: they
    carry ``kron_cut`` and their fitted ``psf_flux_band`` (:data:`PENDING_KEYS`) for it; unless the tile is the
    ``whole_image``, whose edges no cut-out could see past (the part of such an aperture on the image is measured,
    and none where more than a tenth of it is off). ``cosmics``: where the tile's cosmic rays were found before (a
    resampled tile's, on the image's own pixels), its :func:`_cosmic_rays`, in place of finding them on the tile.
    With cosmic-ray masking, detections and finds whose light within a FWHM is mostly on a hit's pixels (the
    detections' and the finds' test masks of :func:`_cosmic_rays`; :func:`~skyfm.catalog.cosmics.light_on_cosmic_rays`:
    a share above :data:`COSMIC_RAY_LIGHT_MAX`) and whose light
    off them within two FWHM has a signal-to-noise ratio below :data:`COSMIC_RAY_SOURCE_SNR` are dropped: the hits
    themselves (unless ``hit_test`` is False: :func:`detect_tiles` tiles resampled from coarser pixels).
    ``sky_fwhm``: each band's PSF FWHM in pixels for the background mesh (:func:`sky_fwhm_pix`; default the nominal
    PSFs').
    """
    from skyfm.catalog.psf_fit import (blank_flux_scatter, crowding, estimate_fwhm, fit_psf_sources, neighbour_light,
                                       residual_image)
    from skyfm.catalog.kron import kron_photometry

    n = len(d["x"])
    if not head.psf_fit or (n == 0 and head.residual_search is None):
        return d
    data = np.asarray(patch.data, dtype=np.float64)
    mask = saturation_mask(data, inst)  # (C, H, W): a saturated core or bleed column is no PSF
    if patch.mask is not None:
        mask |= np.asarray(patch.mask, bool)
    # a source whose box is mostly saturated or invalid keeps its own flux (below); a cosmic ray's few pixels are
    # only left out of the fit
    no_psf = mask.copy()
    if cosmics is None and (head.mask_cosmic_rays if mask_cosmic_rays is None else mask_cosmic_rays):
        cosmics = _cosmic_rays(data, inst, mask, test=hit_test)
    cosmics, cosmic_test, find_test = (None, None, None) if cosmics is None else cosmics
    if not hit_test:
        cosmic_test = find_test = None
    if cosmics is not None:
        cosmics = cosmics & ~mask
        mask |= cosmics
        if cosmic_pixels is not None:
            c, yy, xx = np.nonzero(cosmics)
            cosmic_pixels.append(np.stack([c, yy + patch.meta.get("tile_y0", 0), xx + patch.meta.get("tile_x0", 0)]
                                          ).astype(np.int32))
    scale = inst.pixel_scale_deg
    # (C, H, W); meshes no finer than the PSF allows (the image's seeing where measured, else the nominal PSF's)
    bg, rms = _sky(data, mask, sky_fwhm or sky_fwhm_pix(inst, patch.bands))
    fwhm_nominal = float(np.median([inst.band(b).psf.fwhm_deg for b in patch.bands])) / scale

    def on_cosmic_rays(x, y, test):  # detections whose light is mostly on cosmic-ray pixels, with no source beside
        if test is None or not len(x):
            return np.zeros(len(x), bool)
        from skyfm.catalog.cosmics import light_on_cosmic_rays

        # the share within a FWHM; the rest within two FWHM, where a star's wings still show when L.A.Cosmic has
        # flagged its core (as it does some bright undersampled stars': the grown mask then covers the first FWHM)
        image, radius = data - bg, max(fwhm_nominal, 1.5)
        share = light_on_cosmic_rays(image, rms, test, x, y, radius)[0]
        snr = light_on_cosmic_rays(image, rms, test, x, y, 2 * radius)[1]
        return (share > COSMIC_RAY_LIGHT_MAX) & (snr < COSMIC_RAY_SOURCE_SNR)

    hits = on_cosmic_rays(d["x"], d["y"], cosmic_test)
    if hits.any():
        d = _take(d, ~hits)
        n = len(d["x"])
    h, w = data.shape[1:]
    iy = np.clip(np.rint(d["y"]).astype(int), 0, h - 1)
    ix = np.clip(np.rint(d["x"]).astype(int), 0, w - 1)
    names = list(head.class_names)
    star = d["class_prob"][:, names.index("star")] if "star" in names else np.ones(n)
    point = (star >= 0.5) & (np.nan_to_num(d["extension"] / scale, nan=0.0) < 1.0)  # seeing from point sources

    def tile_fwhm(c: int) -> float:  # this tile's own seeing estimate (its nominal PSF's if too few stars)
        band = inst.band(patch.bands[c])
        # a quick SNR to rank sources for the seeing fit: peak / rms x the PSF's effective width
        quick = (data[c] - bg[c])[iy, ix] / rms[c][iy, ix] * 1.5 * band.psf.fwhm_deg / scale
        return estimate_fwhm(data[c], bg[c], rms[c], band.psf_with_fwhm, band.psf.fwhm_deg, scale, d["x"], d["y"],
                             quick, point=point)

    def settled(name: str) -> bool:  # SEEING_TILES tiles have given an estimate: later tiles take their median
        return seeing is not None and len(seeing.get(name, ())) >= SEEING_TILES

    # estimated before this tile's turn (in parallel with other tiles' fits), where the seeing is not yet settled;
    # the turn below decides, in tile order, whether the estimate is used, as if the tiles ran one by one
    ahead = [None if settled(name) else tile_fwhm(c) for c, name in enumerate(patch.bands)]
    psfs = []
    turn = turn or (lambda name: contextlib.nullcontext())
    with turn("seeing"):  # tiles refined in threads take their turns here, in tile order
        for c, name in enumerate(patch.bands):
            band = inst.band(name)
            known = [] if seeing is None else seeing.setdefault(name, [])  # one image, one seeing: its tiles'
            if len(known) >= SEEING_TILES:  # settled: the median of the first tiles' estimates
                fwhm = float(np.median(known))
            else:
                fwhm = ahead[c] if ahead[c] is not None else tile_fwhm(c)
                if fwhm != band.psf.fwhm_deg:  # an estimate, not the nominal fallback of a tile with too few stars
                    known.append(fwhm)
                if known:
                    fwhm = float(np.median(known))
            psfs.append(_psf_at_seeing(band, fwhm))
    gain = float((inst.noise or {}).get("gain", 1.0))
    flux0 = np.nan_to_num(d["flux_band"], nan=0.0)  # only weights the first linear fit
    # dead pixels and columns read (near) zero: in a band with a bright sky (WISE W3 / W4) one is hundreds of sigma
    # below it and alone sets the chi-square, and so the errors, of every fit whose box holds it
    mask |= data < bg - DEAD_PIXEL_SIGMA * rms
    fwhm_pix = float(np.median([p.fwhm_deg for p in psfs])) / scale  # the tile's seeing, as fitted
    n_net = n  # the rows after these are companions (below)
    companion = head.companion_search_terms()
    if companion is not None and n:  # blends the network took for one source: their second star, fitted with all
        cx, cy = find_companions(data, bg, rms, psfs, scale, d["x"], d["y"], flux0, gain=gain, mask=mask,
                                 min_snr=companion["min_snr"], min_crowding=companion["min_crowding"])
        if cx.size:  # no network opinion of their class (1 / K each), as the residual search's finds
            new = _rows_like(d, cx.size, x=cx, y=cy, score=0.0, class_prob=1.0 / len(names), extension=0.0,
                             flux=0.0, flux_band=0.0, flux_err=np.inf, flux_band_err=np.inf, fit=0)
            d = {k: np.concatenate([np.asarray(d[k]), new[k]]) for k in d}
            flux0 = np.concatenate([flux0, np.zeros((cx.size,) + flux0.shape[1:])])
            point = np.concatenate([point, np.ones(cx.size, bool)])
            n = len(d["x"])
    fit = fit_psf_sources(data, bg, rms, psfs, scale, d["x"], d["y"], flux0, gain=gain, mask=mask,
                          passes=PSF_FIT_PASSES, n_iter=4)
    with np.errstate(invalid="ignore", divide="ignore"):
        # the fit's significance over all bands, sqrt(sum of the bands' SNR^2) (a chi-square detection image's):
        # the SNR of the summed flux lets a band that holds only noise (WISE W4 for most stars) drown the others
        band_snr = np.clip(np.nan_to_num(fit["flux_band"] / fit["flux_band_err"], nan=0.0), 0.0, None)
        fit_snr = np.sqrt((band_snr ** 2).sum(axis=1))
        # a band flux far below zero is no measurement of a source but a fit gone wrong: peaks crowded onto one
        # bright extended galaxy fitted as point sources trade hundreds of times its light between them
        physical = np.all(np.nan_to_num(fit["flux_band"], nan=0.0)
                          >= -PSF_FIT_MAX_NEGATIVE * np.nan_to_num(fit["flux_band_err"], nan=np.inf), axis=1)
    ok = fit["ok"] & (fit_snr >= PSF_FIT_MIN_SNR) & physical
    if n > n_net:  # a companion stays where its fit confirms it, apart from the detections
        from scipy.spatial import cKDTree

        apart, _ = cKDTree(np.c_[fit["x"][:n_net], fit["y"][:n_net]]).query(np.c_[fit["x"][n_net:], fit["y"][n_net:]])
        keep = np.r_[np.ones(n_net, bool), ok[n_net:] & (apart >= COMPANION_MIN_SEPARATION * fwhm_pix)]
        d, fit = _take(d, keep), _take(fit, keep)
        ok, point, fit_snr = ok[keep], point[keep], fit_snr[keep]
        n = len(d["x"])
        d["score"][n_net:] = 1.0 / (1.0 + np.exp(-(companion["intercept"] + companion["slope"]
                                                     * np.log(fit_snr[n_net:]))))
    flux_scale, pos_scale = head.error_scales(fit=True)  # calibrated on validation patches (1.0: as fitted)
    flux_floor, pos_floor = head.error_floors()  # systematic errors, in quadrature (0: none)
    # a fit that leaves more residual than the noise explains (an undetected neighbour, a blend, a galaxy taken
    # for a star) is less certain than its Fisher errors say: they grow with sqrt(reduced chi-square), as in
    # DAOPHOT; on validation patches this is what separates the good fits from the blends of cluster cores
    inflate = np.sqrt(np.clip(np.nan_to_num(fit["chi2_red"], nan=1.0), 1.0, None))
    d = dict(d)
    d["x"] = np.where(ok, fit["x"], d["x"])
    d["y"] = np.where(ok, fit["y"], d["y"])
    d["pos_err"] = np.where(ok, np.hypot(fit["pos_err"] * inflate * pos_scale, pos_floor), d["pos_err"])
    # the PSF flux where it is the more precise estimate (its statistical error below the network's calibrated
    # one): a band in which a faint source is lost in the noise (WISE W4) would otherwise swamp its total flux,
    # and the SNR cut above would keep only the upward fluctuations
    with np.errstate(invalid="ignore"):
        point = ok & point & (fit["flux_err"] * flux_scale < np.nan_to_num(d["flux_err"], nan=np.inf))
    saturated = _masked_share(no_psf, d["x"], d["y"], psfs, scale) >= MAX_MASKED_SHARE  # a clipped core: no PSF flux
    saturated[n_net:] = False  # ... but a companion beside one has no flux of its own to keep: it takes the fit's
    point &= ~saturated
    d["flux"] = np.where(point, fit["flux"], d["flux"])
    # nor do they know what else lies under a source, the light of neighbours too faint to detect (confusion, in
    # clusters far above the sky noise): PSF fluxes at blank places of the residual image measure it
    resid = residual_image(data, bg, rms, psfs, scale, fit)
    blank_band, blank = blank_flux_scatter(resid, rms, psfs, scale, fit["x"], fit["y"], mask=mask)
    stat = np.maximum(fit["flux_err"] * inflate, blank)
    stat_band = np.maximum(fit["flux_band_err"] * inflate[:, None], blank_band)
    # and a star may hide a companion too close to split, the likelier the denser the field: the relative floor
    # grows with the density of detected neighbours (per FWHM^2), calibrated with it
    crowd = crowding(d["x"], d["y"], (h, w), fwhm_pix)
    floor = np.hypot(flux_floor, head.flux_floor_per_crowding() * crowd)
    # and how the fit shares light with its neighbours is as uncertain as the PSF model and the positions are: an
    # error that is a share of their light that overlaps the star, not of its own (a faint star beside a bright one)
    light_band = neighbour_light(fit["x"], fit["y"], fit["flux_band"], fwhm_pix)  # (N, C)
    light = light_band.sum(axis=1)
    blend = head.blend_flux_error_weight()
    flux_err = np.hypot(np.hypot(stat * flux_scale, floor * fit["flux"]), blend * light)
    d["flux_err"] = np.where(point, flux_err, d["flux_err"])
    d["flux_band"] = np.where(point[:, None], fit["flux_band"], d["flux_band"])
    band_err = np.hypot(np.hypot(stat_band * flux_scale, floor[:, None] * fit["flux_band"]), blend * light_band)
    d["flux_band_err"] = np.where(point[:, None], band_err, d["flux_band_err"])
    # the rows that keep the network's flux: its statistical error and the confusion where the source stands (in a
    # cluster core the faint stars whose light neither the network nor the fit assigns)
    net_scale = head.error_scales()[0]  # the network's errors carry it (_decode_tile)
    unfitted_scale, confusion_weight = head.unfitted_flux_error_terms()
    keep_net = ~point & ~saturated  # a saturated star keeps the aperture flux and error add_saturated_stars gave
    d["flux_err"] = np.where(keep_net, np.hypot(d["flux_err"] * (unfitted_scale / net_scale),
                                                confusion_weight * blank), d["flux_err"])
    d["flux_band_err"] = np.where(keep_net[:, None], np.hypot(d["flux_band_err"] * (unfitted_scale / net_scale),
                                                              confusion_weight * blank_band), d["flux_band_err"])
    d["fit"] = (ok.astype(np.int8) + point.astype(np.int8)).astype(np.int8)
    # galaxies: the light their PSF model leaves in the residual, in a Kron aperture (the neighbours subtracted),
    # measured where the field is sparse enough for an aperture (crowded places have few galaxies and would cost
    # most of the time)
    kron_crowding = head.kron_settings(KRON_MAX_CROWDING)[3]
    search = head.residual_search_terms()
    finds = None
    if search is not None:  # sources no detection stands for: PSF-fitted on the residual, measured with the others
        from scipy import ndimage

        from skyfm.catalog.residual_search import find_residual_sources

        # L.A.Cosmic flags a hit's core; its edge pixels, a few sigma up, would still make a peak of the search's
        # matched filter: the search leaves the pixels next to a hit out too
        search_mask = mask
        if cosmics is not None and COSMIC_RAY_SEARCH_MARGIN > 0:
            search_mask = mask | ndimage.binary_dilation(cosmics, np.ones((1, 3, 3), bool),
                                                         iterations=COSMIC_RAY_SEARCH_MARGIN)
        found = find_residual_sources(resid, rms, search_mask, fwhm_pix, fit["x"], fit["y"],
                                      min_snr=search["min_snr"])
        if len(found):
            finds = _fit_finds(found, resid, bg, rms, psfs, scale, gain, mask)
            finds = _take(finds, ~on_cosmic_rays(finds["x"], finds["y"], find_test))
            if len(finds["x"]):
                resid = residual_image(resid + bg, bg, rms, psfs, scale, finds)  # their PSF models out too
            else:
                finds = None
    m = 0 if finds is None else len(finds["x"])
    select = np.concatenate([ok & ~saturated & (crowd < kron_crowding), np.ones(m, bool)])
    both = {k: np.concatenate([fit[k], finds[k]]) if m else fit[k] for k in ("x", "y", "flux_band")}
    kron = kron_photometry(resid, rms, psfs, scale, both["x"], both["y"], both["flux_band"], gain=gain, mask=mask,
                           select=select, windowed=bool(head.kron_centroid))
    if whole_image:
        kron["cut"][:] = False
    kron, kron_finds = _take(kron, slice(None, n)), _take(kron, slice(n, None))
    network = np.arange(n) < n_net  # companions are points
    # an aperture that runs off this tile holds part of the light: detect_tiles measures it whole on a cut-out of
    # the image across the tiles (_measure_cut_apertures), and until then the row keeps its PSF values
    whole = ~kron["cut"]
    d = _apply_kron(d, kron, whole, network & whole, head, scale)
    d["fit"][n_net:] = 5  # companions: position and flux from the fit, as fit 2
    d["kron_cut"] = kron["cut"] & network
    d["psf_flux_band"] = np.asarray(fit["flux_band"], dtype=np.float64)
    d["fit_chi2"] = np.where(fit["ok"], fit["chi2_red"], np.nan)
    d["crowding"] = crowd
    d["flux_confusion"] = np.where(saturated, np.nan, blank)
    d["flux_blend"] = light
    template = None  # one band: its flux is the total
    with turn("colours"):  # the image's colours, from its fitted detections of the tiles so far (tile order)
        if len(patch.bands) > 1:
            colours = {} if colours is None else colours
            if "settled" not in colours:
                colours.setdefault("flux", []).append(np.asarray(fit["flux_band"])[ok])
                colours.setdefault("err", []).append(np.asarray(fit["flux_band_err"])[ok])
            template = colour_template(colours)
    if m:
        d = _with_residual_finds(d, finds, kron_finds, head, search, scale, crowding(
            np.concatenate([d["x"], finds["x"]]), np.concatenate([d["y"], finds["y"]]), (h, w), fwhm_pix)[n:],
            template=template)
    return d


def _cosmic_rays(data: np.ndarray, inst, mask: np.ndarray | None, test: bool = True) -> tuple:
    """A CCD tile's cosmic rays for :func:`refine_ccd_tile`, three (C, H, W) bool masks: the hits L.A.Cosmic finds
    (:func:`~skyfm.catalog.cosmics.cosmic_ray_mask`), left out of the fits; the pixels whose light makes a network
    detection a hit: those of a deeper pass (:data:`~skyfm.catalog.cosmics.TEST_SIGMA_CLIP`, a hit's faint tail)
    joined to a hit (alone, the deeper pass also flags faint sources' peaks), grown by one pixel (a hit's edge
    pixels, a few sigma up); and those that make a residual-search find one, the deeper pass's grown, joined or not
    (a find stands where the network saw nothing: on the Hubble F606W validation fields the faint tails no 4.5-sigma
    pixel touches made a third of the finds, and testing them on the deeper pass took F1 0.499 -> 0.526, the scene
    mix unchanged). The last two None for ``test`` False."""
    from scipy import ndimage

    from skyfm.catalog.cosmics import SIGMA_CLIP, TEST_SIGMA_CLIP, cosmic_ray_masks

    if not test:
        return cosmic_ray_masks(data, inst, mask)[0], None, None
    # one pass, two limits; the deeper mask holds every hit (its candidates and growth limits are the lower ones)
    hits, deep = cosmic_ray_masks(data, inst, mask, (SIGMA_CLIP, TEST_SIGMA_CLIP))
    joined = ndimage.binary_propagation(hits, structure=np.ones((1, 3, 3), bool), mask=deep)
    grow = np.ones((1, 3, 3), bool)
    return hits, ndimage.binary_dilation(joined, grow), ndimage.binary_dilation(deep, grow)


def _sky(data: np.ndarray, mask: np.ndarray, fwhm_pix: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) background and rms of each band of a CCD tile
    (:func:`~skyfm.catalog.psf_fit.background_and_rms`, the ``mask``'s pixels left out; ``fwhm_pix``: each band's
    PSF FWHM in pixels)."""
    from skyfm.catalog.psf_fit import background_and_rms

    bg, rms = zip(*(background_and_rms(data[c], mask[c], fwhm_pix=None if fwhm_pix is None else fwhm_pix[c])
                    for c in range(data.shape[0])))
    return np.stack(bg), np.stack(rms)


def _psf_at_seeing(band, fwhm_deg: float):
    """``band``'s PSF at the seeing ``fwhm_deg``, in 3% steps of its nominal FWHM (tiles share stamp tables)."""
    nominal = band.psf.fwhm_deg
    return band.psf_with_fwhm(nominal * round(fwhm_deg / nominal / 0.03) * 0.03)


def _kron_flux(kron: dict, err_scale: float, floor: float) -> tuple:
    """(flux, flux_err, flux_band, flux_band_err) of rows that take their Kron fluxes: the aperture's errors times
    the head's ``kron_flux_err_scale``, a relative ``floor`` in quadrature."""
    return (kron["flux"], np.hypot(kron["flux_err"] * err_scale, floor * kron["flux"]), kron["flux_band"],
            np.hypot(kron["flux_band_err"] * err_scale, floor * kron["flux_band"]))


def _apply_kron(d: dict, kron: dict, rows, may_extend, head, scale: float) -> dict:
    """``d`` with the Kron measurements ``kron`` (:func:`~skyfm.catalog.kron.kron_photometry`, row for row) of
    ``rows`` written: the columns ``flux_kron``, ``flux_kron_err``, ``kron_excess``, ``kron_size`` (where a
    positive flux was measured), class probabilities from the head's ``class_calibration``; and those of
    ``may_extend`` whose light beyond the PSF model reaches the head's ``kron_excess_min`` take the Kron flux, the
    half-light radius as extension, with the head's ``kron_centroid`` the windowed centroid of their light as
    position (where a PSF fit settles on a galaxy's brightest part or on the side its neighbours' models left), and
    ``fit`` 3."""
    from skyfm.catalog.kron import half_light_radius_pix
    from skyfm.heads.classification import calibrate_class_prob

    d = dict(d)
    excess_min, kron_scale, kron_floor, _ = head.kron_settings(KRON_MAX_CROWDING)
    pos_scale, pos_floor = head.error_scales(fit=True)[1], head.error_floors()[1]
    measured = rows & np.isfinite(kron["flux"]) & (kron["flux"] > 0)
    extended = measured & may_extend & (kron["excess"] >= excess_min)
    flux, flux_err, flux_band, band_err = _kron_flux(kron, kron_scale, kron_floor)
    d["flux"] = np.where(extended, flux, d["flux"])
    d["flux_err"] = np.where(extended, flux_err, d["flux_err"])
    d["flux_band"] = np.where(extended[:, None], flux_band, d["flux_band"])
    d["flux_band_err"] = np.where(extended[:, None], band_err, d["flux_band_err"])
    d["extension"] = np.where(extended, half_light_radius_pix(kron["r1"], kron["r1_psf"]) * scale, d["extension"])
    centred = extended & np.isfinite(kron["x_win"])  # NaN unless the head has kron_centroid
    d["x"] = np.where(centred, kron["x_win"], d["x"])
    d["y"] = np.where(centred, kron["y_win"], d["y"])
    d["pos_err"] = np.where(centred, np.hypot(kron["pos_err_win"] * pos_scale, pos_floor), d["pos_err"])
    d["fit"] = np.where(extended, 3, d["fit"]).astype(np.int8)
    size = kron["r1"] / kron["r1_psf"]  # 1 for a point source
    calibration = head.class_calibration_terms()
    if calibration is not None:  # where an aperture says what the source's morphology is
        prob = calibrate_class_prob(d["class_prob"], list(head.class_names), calibration, kron["excess"],
                                    kron["flux"], kron["flux_err"], size)
        d["class_prob"] = np.where(rows[:, None], prob, d["class_prob"])
    for key, value in (("flux_kron", kron["flux"]), ("flux_kron_err", kron["flux_err"]),
                       ("kron_excess", kron["excess"]), ("kron_size", size)):
        d[key] = np.where(rows, np.where(measured, value, np.nan), d.get(key, np.nan))
    return d


COLOUR_MIN_SOURCES = 10  # well-measured detections an image's colour template needs
COLOUR_MIN_SNR = 10.0  # a detection measures the colours when its reference band has this SNR
COLOUR_SETTLE_SOURCES = 1000  # with this many, the template is settled: later tiles take it as it is


def colour_template(colours: dict) -> np.ndarray | None:
    """A typical detection's share of its light in each band, from the fitted detections of an image (``colours``:
    ``flux`` and ``err``, lists of (N, C) arrays of band fluxes and errors, one per tile so far): per band the
    median over the well-measured detections (SNR >= :data:`COLOUR_MIN_SNR` in the reference band, the band where
    most detections reach it) of the band's flux over the reference band's, clipped at 0 and normalised. None with
    one band, fewer than :data:`COLOUR_MIN_SOURCES` such detections, or no positive share. A median of ratios, not a
    ratio of sums: summed fluxes are the brightest detections' colours, and a few failed fits (peaks crowded onto a
    bright WISE galaxy, fitted to -3e5 in W1 and +1e7 in W4) set them alone. With :data:`COLOUR_SETTLE_SOURCES`
    the template is kept in ``colours`` (``settled``) and no longer recomputed."""
    if "settled" in colours:
        return colours["settled"]
    parts = colours.get("flux") or []
    flux = np.concatenate(parts) if parts else np.zeros((0, 0))
    if flux.ndim != 2 or flux.shape[1] < 2:
        return None
    err = np.concatenate(colours["err"])
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(err > 0, flux / err, 0.0)
    strong = np.nan_to_num(snr) >= COLOUR_MIN_SNR
    ref = int(np.argmax(strong.sum(axis=0)))
    good = strong[:, ref]
    if good.sum() < COLOUR_MIN_SOURCES:
        return None
    share = np.clip(np.nanmedian(flux[good] / flux[good, ref:ref + 1], axis=0), 0.0, None)
    if not np.isfinite(share).all() or share.sum() <= 0:
        return None
    template = share / share.sum()
    if good.sum() >= COLOUR_SETTLE_SOURCES:
        colours["settled"] = template
    return template


def _template_total(flux_band: np.ndarray, err_band: np.ndarray, template: np.ndarray):
    """(total, error) of sources whose band fluxes ``flux_band`` (N, C) +- ``err_band`` follow the colour
    ``template`` (C,, shares summing to 1) times a total: the least-squares total, each band by its inverse variance.

    A faint source's sum over bands takes every band's noise; where a band is deep noise for it (WISE W3/W4 for most
    sources, their errors 10-30x W1's in the same units) the sum is that noise, and the finds kept (those whose Kron
    sum is positive) take it upward (WISE finds' totals at 2x their true flux on validation). Weighted by
    template / variance such a band counts as little as it tells."""
    err = np.asarray(err_band, dtype=float)
    w = np.where(np.isfinite(err) & (err > 0), template / np.where(err > 0, err, 1.0) ** 2, 0.0)  # (N, C)
    info = (w * template).sum(axis=1)  # sum of template^2 / variance
    with np.errstate(invalid="ignore", divide="ignore"):
        total = (w * np.nan_to_num(flux_band)).sum(axis=1) / info
        return np.where(info > 0, total, np.nan), np.where(info > 0, 1.0 / np.sqrt(info), np.nan)


def find_companions(data, bg, rms, psfs, scale: float, x, y, flux0, *, gain: float, mask, min_snr: float,
                    min_crowding: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Point sources beside the detections ``x``, ``y`` that the network took as one with them (a blend of two
    stars within a FWHM or two, in crowded fields the commonest miss): the detections are PSF-fitted once, and the
    residual image's PSF-matched significance (:func:`~skyfm.catalog.residual_search.significance_map`, each
    pixel's noise widened by :data:`COMPANION_MODEL_ERROR` of the models there, for the PSF's misfit of bright
    stars; divided by its robust scatter, for the confusion of fainter stars) is searched for local peaks of at
    least ``min_snr`` and at least :data:`COMPANION_MIN_SEPARATION` FWHM from every fitted detection, the highest
    one nearest to each detection whose ``crowding`` (detected neighbours per FWHM^2,
    :func:`~skyfm.catalog.psf_fit.crowding`) is at least ``min_crowding``: where the field is sparse, the light
    beside a detection is mostly a galaxy's that its point model leaves, not a second star. Returns their positions
    (pixels); the caller fits them with the detections and keeps those the fit confirms."""
    from scipy.ndimage import maximum_filter
    from scipy.spatial import cKDTree

    from skyfm.catalog.psf_fit import crowding, fit_psf_sources, residual_image
    from skyfm.catalog.residual_search import normalised_significance, significance_map

    first = fit_psf_sources(data, bg, rms, psfs, scale, x, y, flux0, gain=gain, mask=mask, passes=1, n_iter=4)
    resid = residual_image(data, bg, rms, psfs, scale, first)  # (C, H, W)
    models = np.clip(data - bg - resid, 0.0, None)
    noise = np.sqrt(rms ** 2 + (COMPANION_MODEL_ERROR * models) ** 2)
    fwhm = float(np.median([p.fwhm_deg for p in psfs])) / scale
    sig = normalised_significance(*significance_map(resid, noise, mask, fwhm / 2.3548, with_coverage=True))
    peak = (sig == maximum_filter(sig, size=2 * int(round(0.5 * fwhm)) + 1)) & (sig >= min_snr)
    iy, ix = np.nonzero(peak)
    if iy.size == 0:
        return np.zeros(0), np.zeros(0)
    fx, fy = np.where(first["ok"], first["x"], x), np.where(first["ok"], first["y"], y)
    apart, nearest = cKDTree(np.c_[fx, fy]).query(np.c_[ix, iy])
    far = apart >= COMPANION_MIN_SEPARATION * fwhm
    if min_crowding > 0:
        far &= crowding(fx, fy, sig.shape, fwhm)[nearest] >= min_crowding
    if not far.any():
        return np.zeros(0), np.zeros(0)
    ix, iy, nearest, height = ix[far], iy[far], nearest[far], sig[iy[far], ix[far]]
    # one per detection, the highest: a star fitted alone to a blend moves towards its companion and leaves a
    # second, fainter peak on its other side, which is no source
    order = np.lexsort((-height, nearest))
    first_of = order[np.r_[True, nearest[order][1:] != nearest[order][:-1]]]
    return ix[first_of].astype(float), iy[first_of].astype(float)


def _fit_finds(found, resid, bg, rms, psfs, scale: float, gain: float, mask) -> dict:
    """The residual search's finds PSF-fitted on the residual image (the detections' models subtracted): their
    :func:`~skyfm.catalog.psf_fit.fit_psf_sources` result, with the search's position and no model where the fit
    failed, and ``snr``, ``sigma_pix`` of the search."""
    from skyfm.catalog.psf_fit import fit_psf_sources

    f = fit_psf_sources(resid + bg, bg, rms, psfs, scale, found.x, found.y, None, gain=gain, mask=mask,
                        passes=PSF_FIT_PASSES, n_iter=4)
    ok = f["ok"]
    f["x"] = np.where(ok, f["x"], found.x)
    f["y"] = np.where(ok, f["y"], found.y)
    f["flux_band"] = np.where(ok[:, None], np.nan_to_num(f["flux_band"]), 0.0)
    f["flux"] = np.where(ok, f["flux"], np.nan)
    f["snr"], f["sigma_pix"] = found.snr, found.sigma_pix
    return f


def _with_residual_finds(d: dict, finds: dict, kron: dict, head, search: dict, scale: float, crowd,
                         template: np.ndarray | None = None) -> dict:
    """``d`` with rows (``fit`` 4) for the residual search's ``finds`` (:func:`_fit_finds`): those whose light beyond
    the PSF model (``kron_excess``) reaches the search's ``kron_excess_min``, or whose PSF fit failed, take the Kron
    flux and the half-light radius from it, the others the PSF fit's flux (:func:`_finds_kron_choice`); finds with
    no Kron measurement (the aperture masked or off the image) are dropped, as a diffuse source's PSF flux would
    hold a fraction of its light, and so are those with no light in the aperture (Kron total <= 0; under the colour
    ``template`` where there is one) or a Kron row's Kron sum <= 0; but a find whose aperture runs off the tile
    (``kron["cut"]``) stays as a PSF row with no Kron measurement, pending the one :func:`detect_tiles` makes on a
    cut-out across the tiles (:func:`_measure_cut_apertures`), which settles it by these rules;
    errors with the search's relative floor; position the PSF fit's (else the search's peak; Kron rows of a head
    with ``kron_centroid``: their windowed centroid), error
    sqrt(2) sigma / snr (a Gaussian source's Cramér-Rao bound per axis, sigma the matched filter's) times the
    search's ``pos_err_scale``; ``score`` the head's logistic in ln(snr) (the share of such finds that were real
    sources on validation images); class probabilities from the head's calibration with no network opinion (each
    class 1 / K), else galaxy for Kron rows and 1 / K for the others. With a colour ``template`` (several bands,
    :func:`colour_template`) the PSF rows' total flux is :func:`_template_total` of their band fluxes, not their
    sum (the band fluxes stay as fitted; Kron rows keep the Kron total, the column ``flux_kron``)."""
    psf_flux, psf_err = finds["flux"], finds["flux_err"]
    if template is not None:
        psf_flux, psf_err = _template_total(finds["flux_band"], finds["flux_band_err"], template)
    psf = np.isfinite(psf_flux) & (psf_flux > 0)
    pending = kron["cut"]
    ext, keep = _finds_kron_choice(kron, psf, search, template)
    keep |= pending
    if not np.any(keep):
        return d
    k, f, psf_flux, psf_err = _take(kron, keep), _take(finds, keep), psf_flux[keep], psf_err[keep]
    ext, pending = ext[keep] & ~pending[keep], pending[keep]
    flux_scale, _ = head.error_scales(fit=True)
    floor = search["flux_err_floor"]
    score = 1.0 / (1.0 + np.exp(-(search["intercept"] + search["slope"] * np.log(f["snr"]))))
    pos_err = search["pos_err_scale"] * np.sqrt(2.0) * f["sigma_pix"] / f["snr"]
    rows = _rows_like(d, len(psf_flux), x=f["x"], y=f["y"], pos_err=pos_err, flux=psf_flux,
                      flux_err=np.hypot(psf_err * flux_scale, floor * psf_flux), score=score,
                      class_prob=1.0 / len(head.class_names), extension=0.0, flux_band=f["flux_band"],
                      flux_band_err=np.hypot(f["flux_band_err"] * flux_scale, floor * f["flux_band"]), fit=4,
                      fit_chi2=f["chi2_red"], crowding=crowd[keep], kron_cut=pending, psf_flux_band=f["flux_band"])
    rows = _finds_take_kron(rows, k, ~pending, ext, head, search, scale)
    return {key: np.concatenate([d[key], rows[key]]) for key in d}


def _finds_kron_choice(kron: dict, psf, search: dict, template) -> tuple[np.ndarray, np.ndarray]:
    """(extended, keep) of residual-search finds measured in Kron apertures (:func:`_with_residual_finds`'s rule):
    extended where the light beyond the PSF model reaches the search's ``kron_excess_min`` or the PSF fit failed
    (``psf`` False); kept where measured, with light in the aperture under the image's colours where it has them (a
    sum over bands would keep the finds whose deep-noise bands, WISE W3 / W4, came out high, and drop as many real
    ones), and an extended one's Kron sum positive."""
    kron_total = kron["flux"]
    if template is not None:
        kron_total = _template_total(kron["flux_band"], kron["flux_band_err"], template)[0]
    with np.errstate(invalid="ignore"):
        ext = (kron["excess"] >= search["kron_excess_min"]) | ~psf
        keep = np.isfinite(kron["flux"]) & (kron_total > 0) & (~ext | (kron["flux"] > 0))
    return ext, keep


def _finds_take_kron(rows: dict, kron: dict, measured, ext, head, search: dict, scale: float) -> dict:
    """Residual-search finds' ``rows`` with their Kron measurements ``kron`` (row for row) written where
    ``measured``: the Kron columns, class probabilities (the head's calibration, else galaxy for the extended);
    and the ``ext`` rows take the Kron flux (errors with the search's floor), the half-light radius, with the head's
    ``kron_centroid`` the windowed centroid, and no PSF chi-square."""
    from skyfm.catalog.kron import half_light_radius_pix
    from skyfm.heads.classification import calibrate_class_prob

    rows = dict(rows)
    _, kron_scale, _, _ = head.kron_settings(KRON_MAX_CROWDING)
    flux, flux_err, flux_band, band_err = _kron_flux(kron, kron_scale, search["flux_err_floor"])
    rows["flux"] = np.where(ext, flux, rows["flux"])
    rows["flux_err"] = np.where(ext, flux_err, rows["flux_err"])
    rows["flux_band"] = np.where(ext[:, None], flux_band, rows["flux_band"])
    rows["flux_band_err"] = np.where(ext[:, None], band_err, rows["flux_band_err"])
    rows["extension"] = np.where(ext, half_light_radius_pix(kron["r1"], kron["r1_psf"]) * scale, rows["extension"])
    rows["fit_chi2"] = np.where(ext, np.nan, rows["fit_chi2"])
    centred = ext & np.isfinite(kron["x_win"])  # as refine_ccd_tile's Kron rows (NaN unless kron_centroid)
    rows["x"] = np.where(centred, kron["x_win"], rows["x"])
    rows["y"] = np.where(centred, kron["y_win"], rows["y"])
    names = list(head.class_names)
    size = kron["r1"] / kron["r1_psf"]
    calibration = head.class_calibration_terms()
    if calibration is not None:
        prob = calibrate_class_prob(rows["class_prob"], names, calibration, kron["excess"], kron["flux"],
                                    kron["flux_err"], size)
        rows["class_prob"] = np.where(measured[:, None], prob, rows["class_prob"])
    elif "galaxy" in names:
        rows["class_prob"] = np.where(ext[:, None], np.eye(len(names))[names.index("galaxy")], rows["class_prob"])
    for key, value in (("flux_kron", kron["flux"]), ("flux_kron_err", kron["flux_err"]),
                       ("kron_excess", kron["excess"]), ("kron_size", size)):
        rows[key] = np.where(measured, value, rows[key])
    return rows


def _measure_cut_apertures(arrays: dict, source, inst, head, grid, tile_hw, scale: float, seeing: dict,
                           colours: dict, cosmic_pixels: list | None, mask_cosmic_rays: bool | None,
                           progress: bool = False) -> dict:
    """``arrays`` (image pixels, every tile's rows) with the Kron apertures that ran off their tile (``kron_cut``:
    a galaxy near a tile's edge, whose aperture may be 50-100 px across on a Hubble image) measured whole on a
    cut-out of the image, their tile and as far beyond it as the tile's largest aperture: the detections take their Kron
    flux by :func:`_apply_kron`'s rule, the residual search's finds kept pending by :func:`_with_residual_finds`
    are settled by its rules (:func:`_finds_kron_choice`; dropped where the aperture is masked or still off the
    image). The cut-out (pixels of ``scale`` deg) is treated as a tile is: saturated and dead pixels masked, and the
    cosmic-ray pixels the tiles found (``cosmic_pixels`` of :func:`refine_ccd_tile`; None: found on the cut-out,
    where ``mask_cosmic_rays`` or the head says), the background and rms of
    :func:`~skyfm.catalog.psf_fit.background_and_rms`; its residual holds every row's PSF model (the PSF-fitted
    band fluxes where there are, the catalog's elsewhere), the PSFs at the image's seeing as the tiles found it
    (``seeing``). ``progress``: a progress bar over the tiles that have such rows (where four or more do)."""
    from tqdm.auto import tqdm

    from skyfm.catalog.cosmics import cosmic_ray_mask
    from skyfm.catalog.kron import kron_photometry
    from skyfm.catalog.psf_fit import residual_image
    from skyfm.data.patch import Patch
    from skyfm.data.tiling import Tile, tile_patch

    cut, x, y = arrays["kron_cut"], arrays["x"], arrays["y"]
    finds = cut & (arrays["fit"] == 4)
    _, height, width = source.shape
    bands = list(source.bands)
    psfs = [_psf_at_seeing(inst.band(b), float(np.median(seeing[b])) if seeing.get(b) else inst.band(b).psf.fwhm_deg)
            for b in bands]
    gain = float((inst.noise or {}).get("gain", 1.0))
    max_r = 0.25 * min(tile_hw)  # kron_photometry's largest aperture on a tile
    margin = int(np.ceil(max_r)) + 2
    search = head.residual_search_terms()
    template = colour_template(colours) if len(bands) > 1 else None
    find_cosmics = cosmic_pixels is None and (head.mask_cosmic_rays if mask_cosmic_rays is None
                                              else mask_cosmic_rays)
    cosmics = np.concatenate(cosmic_pixels, axis=1) if cosmic_pixels else np.zeros((3, 0), np.int32)
    model_band = np.where(np.isfinite(arrays["psf_flux_band"]), arrays["psf_flux_band"],
                          np.nan_to_num(arrays["flux_band"]))
    keep = ~finds
    owned = [(t, np.flatnonzero(cut & t.owns(x, y))) for t in grid]
    owned = [(t, idx) for t, idx in owned if idx.size]
    for t, idx in tqdm(owned, desc="apertures across tiles", unit="tile", disable=not progress or len(owned) < 4):
        # the tile and a margin: a cut-out about the sources alone would take a large galaxy's light for background
        y0, y1 = max(0, t.y0 - margin), min(height, t.y1 + margin)
        x0, x1 = max(0, t.x0 - margin), min(width, t.x1 + margin)
        window = Tile(y0, y1, x0, x1, y0, y1, x0, x1)
        patch = tile_patch(source, window) if isinstance(source, Patch) else source.read_patch_window(y0, y1, x0, x1)
        patch = _prepare_tile(patch, inst)
        if patch is None:
            continue
        data = np.asarray(patch.data, dtype=np.float64)
        mask = saturation_mask(data, inst)
        if patch.mask is not None:
            mask |= np.asarray(patch.mask, bool)
        if find_cosmics:
            mask |= cosmic_ray_mask(data, inst, mask=mask)
        hit = (cosmics[1] >= y0) & (cosmics[1] < y1) & (cosmics[2] >= x0) & (cosmics[2] < x1)
        mask[cosmics[0, hit], cosmics[1, hit] - y0, cosmics[2, hit] - x0] = True
        bg, rms = _sky(data, mask, [p.fwhm_deg / scale for p in psfs])
        mask |= data < bg - DEAD_PIXEL_SIGMA * rms
        near = np.flatnonzero((x >= x0 - 0.5) & (x < x1 - 0.5) & (y >= y0 - 0.5) & (y < y1 - 0.5))
        local = {"x": x[near] - x0, "y": y[near] - y0, "flux_band": model_band[near]}
        resid = residual_image(data, bg, rms, psfs, scale, local)
        select = np.isin(near, idx)
        kron = kron_photometry(resid, rms, psfs, scale, local["x"], local["y"], local["flux_band"], gain=gain,
                               mask=mask, select=select, windowed=bool(head.kron_centroid), max_radius_pix=max_r)
        kron = _take(kron, select)
        kron["x_win"], kron["y_win"] = kron["x_win"] + x0, kron["y_win"] + y0
        rows = near[select]
        is_find = finds[rows]
        sub = _apply_kron(_take(arrays, rows), kron, ~is_find, ~is_find, head, scale)
        if search is not None and is_find.any():
            psf = np.isfinite(sub["flux"]) & (sub["flux"] > 0)  # a pending find's flux is its PSF fit's
            ext, measured = _finds_kron_choice(kron, psf, search, template)
            sub = _finds_take_kron(sub, kron, is_find & measured, is_find & measured & ext, head, search, scale)
            keep[rows[is_find & measured]] = True
        for k in arrays:
            arrays[k][rows] = sub[k]
    return _take(arrays, keep)


def _saturated_halos(cores: np.ndarray, reach: float, core_radii: float) -> np.ndarray:
    """(H, W) bool: a disc around each saturated region of ``cores`` ((H, W) bool) of radius ``reach`` px plus
    ``core_radii`` times the region's own radius (its largest inscribed circle's: a trail's or bleed column's
    saturated pixels are a narrow line, a star's core a disc), centred on that circle's centre."""
    from scipy import ndimage

    labels, n = ndimage.label(cores)
    inside = ndimage.distance_transform_edt(cores)  # each core pixel's distance to the nearest unsaturated one
    index = np.arange(1, n + 1)
    out = np.zeros(cores.shape, dtype=bool)
    h, w = cores.shape
    radii, centres = ndimage.maximum(inside, labels, index), ndimage.maximum_position(inside, labels, index)
    for radius, (cy, cx) in zip(radii, centres):
        r = reach + core_radii * float(radius)
        ys = slice(max(int(cy - r), 0), min(int(cy + r) + 2, h))
        xs = slice(max(int(cx - r), 0), min(int(cx + r) + 2, w))
        yy, xx = np.mgrid[ys, xs]
        out[ys, xs] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


def drop_trail_detections(d: dict, patch, inst, pixel_scale: float | None = None) -> dict:
    """The detections of one CCD tile (``d``, tile pixels) less those on satellite trails that the tile shows
    (:func:`skyfm.catalog.trails.find_trails` on its pixels, and on one-band tiles the fainter ones its detections
    line up along, :func:`~skyfm.catalog.trails.trails_through_detections`; saturated stars and their bleed columns
    left out, and from the first search also the halos of saturated stars, :func:`_saturated_halos`; ``pixel_scale``
    in deg per tile pixel); a detection on a trail stays where a point source of its own stands above the trail's
    profile (:func:`skyfm.catalog.trails.point_sources_on_trail`).

    A many-band tile's bands are often separate exposures (MeerLICHT's, Hubble's) and a satellite crosses one of
    them: each band is searched on its own, and a detection on a band's trail also stays where another band that
    no trail crosses there sees a point source (matched-filter SNR ``TRAIL_OTHER_BAND_SNR``,
    :func:`skyfm.catalog.trails.point_source_snr`; a row's own band fluxes would not do: the network's per-band
    errors are wide). A trail seen in every band (simultaneous exposures) leaves no band to vouch."""
    from scipy import ndimage

    from skyfm.catalog.trails import (find_trails, noise_units, on_trail, point_source_snr, point_sources_on_trail,
                                      trails_through_detections)

    if len(d["x"]) == 0:
        return d
    scale = pixel_scale or inst.pixel_scale_deg
    fwhms = [inst.band(b).psf.fwhm_deg / scale for b in patch.bands]
    data = np.asarray(patch.data, dtype=np.float64)
    cores = saturation_mask(data, inst).any(axis=0)
    saturated, halos = cores, cores
    if cores.any():  # a bleed column is a straight ridge too, and a saturated star's halo lifts lines
        reach = 2 * float(np.median(fwhms))
        saturated = ndimage.binary_dilation(cores, iterations=int(np.ceil(reach)))
        halos = saturated | _saturated_halos(cores, reach, TRAIL_HALO_CORE_RADII)
    noise = [noise_units(band) for band in data]  # each band in noise units, once for every step below
    trails = []  # per band
    for band, fwhm in enumerate(fwhms):
        image = data[band:band + 1]
        found = find_trails(image, fwhm, mask=halos, noise=noise[band])
        # one band only: in a many-band image the stars that the other bands show along a line were what the
        # detections' lines found (six-band MeerLICHT validation: 69 more rows dropped, 33 true)
        if data.shape[0] == 1:
            found += trails_through_detections(image, d["x"], d["y"], fwhm, mask=saturated, known=found,
                                               noise=noise[band])
        trails.append(found)
    crossed = np.array([on_trail(d["x"], d["y"], found) for found in trails])  # (B, N)
    on = np.zeros(len(d["x"]), dtype=bool)
    for band, fwhm in enumerate(fwhms):
        hit = crossed[band] & ~on
        if hit.any():
            hit[hit] = ~point_sources_on_trail(data[band:band + 1], trails[band], d["x"][hit], d["y"][hit], fwhm,
                                               mask=saturated, noise=noise[band])
        # another band vouches for a row where no trail of its own crosses it (trails of two bands can overlap)
        for other in np.flatnonzero(np.arange(data.shape[0]) != band):
            vouch = hit & ~crossed[other]
            if vouch.any():  # saturated pixels too: a star's bleed column is no trail
                snr = point_source_snr(data[other], d["x"][vouch], d["y"][vouch], fwhms[other], noise=noise[other])
                hit[vouch] = np.nan_to_num(snr, nan=0.0) < TRAIL_OTHER_BAND_SNR
        on |= hit
    if not on.any():
        return d
    keep = ~on
    return {k: (v[keep] if isinstance(v, np.ndarray) and v.shape[:1] == keep.shape else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------- counts refinement
def _fit_catalog_errors(head, estimated: bool, flux, flux_err, flux_band, flux_band_err, pos_err_pix):
    """A likelihood fit's statistical errors as the catalog gives them: times the head's ``fit_*`` scales, with its
    floors (relative for fluxes, pixels for positions) in quadrature (1.0 and 0 without a head; the ``_estbg`` ones
    against an estimated background), positions at least 0.05 px. -> (flux_err, flux_band_err, pos_err)."""
    flux_scale, pos_scale = head.error_scales(fit=True, estimated=estimated) if head is not None else (1.0, 1.0)
    flux_floor, pos_floor = head.error_floors(estimated) if head is not None else (0.0, 0.0)
    flux_err = np.hypot(np.asarray(flux_err) * flux_scale, flux_floor * np.abs(flux))
    band_err = np.hypot(np.asarray(flux_band_err) * flux_scale, flux_floor * np.abs(flux_band))
    pos_err = np.maximum(np.hypot(np.asarray(pos_err_pix, dtype=float) * pos_scale, pos_floor), 0.05)
    return flux_err, band_err, pos_err


def refine_counts(arrays: dict, data: np.ndarray, inst, pixel_scale: float | None, background=None,
                  bands: list[str] | None = None, head=None, estimated: bool | None = None, high_pass=None,
                  unresolved: bool = True, return_background: bool = False, keep_far_moves: bool = False,
                  fitted_elsewhere: tuple | None = None, network_peaks: tuple | None = None,
                  ts_weights=None, classify: bool = True):
    """Poisson likelihood refinement of counts-cube detections: position, flux per bin, TS, physical flux.

    With a background model and ``unresolved`` (the default) the detections are fitted twice: the second time
    against the model plus the light it lacks on scales broader than the PSF (:func:`~skyfm.catalog.likelihood.
    add_unresolved`: the counts less the model and the first fit's sources with TS >= ``UNRESOLVED_MIN_TS``,
    smoothed), so that the sources too faint to detect, which a diffuse model does not hold, do not add their
    summed light to the fluxes and TS of those found; and plus those sources' light beyond the fits' kernels (which
    hold 97% of a PSF), out to :data:`PSF_WING_FRACTION` (:func:`~skyfm.catalog.likelihood.psf_wing_tables`), so
    that the wings of a very bright source are no ring of faint ones. ``return_background``: also return that
    background (or the one the fit used), ``(arrays, background)``. ``ts_weights`` (C, H, W;
    :func:`~skyfm.catalog.likelihood.likelihood_weights`): also column ``ts_weighted``, the weighted likelihood's
    TS (each bin's share of the fit's TS times that bin's weight at the fitted position). ``classify`` False: the
    class probabilities are left as they are (likelihood selection classifies once, at its end).

    Flux errors are the fit's, marginalised over the overlapping neighbours (:func:`~skyfm.catalog.likelihood.
    fit_point_sources`), with the confusion variance the residual counts show around each source added in
    quadrature (:func:`~skyfm.catalog.likelihood.confusion_variance`: undetected sources, misfits of the model).
    The fit's flux and position errors are then multiplied by the head's ``fit_flux_err_scale`` and
    ``fit_pos_err_scale``, and its ``fit_flux_err_floor`` (a relative error) and ``fit_pos_err_floor`` (pixels)
    are added in quadrature (calibrated on validation patches; 1.0 and 0 without a head); against a background
    ``estimated`` from the counts (default: when ``background`` is None) the ``_estbg`` scales and floor where the
    head has them.

    Without ``background`` it is estimated from the counts twice (:func:`~skyfm.catalog.likelihood.
    estimate_background`): positions are fitted against the estimate that keeps the sources in (a high-pass
    filter: what neighbours and diffuse gradients do to a position cancels), then fluxes and TS at those
    positions against the estimate that leaves the detections out (the first holds the sources' own wings: on
    validation patches it took 59% of Fermi-LAT fluxes, ``benchmarks/estimated_background.py``); ``high_pass``:
    the first, when the caller has it already.

    A fit that moves its candidate :func:`_max_fit_move_pix` or farther is not kept (the row keeps its start, TS
    NaN): such a fit has usually run off to a neighbour. ``keep_far_moves`` (likelihood selection) keeps it where it
    ends farther than the sharpest bin's PSF FWHM (:func:`_peak_separation`) from every other fit and from the
    positions of ``fitted_elsewhere`` (x, y), and, with ``network_peaks`` (x, y, probability), as near a network peak
    of probability :data:`FAR_MOVE_MIN_SCORE` or more: then the candidate sat beside a source no other candidate
    holds, the network saw it too, and the fit found it (:func:`_moved_fits_kept`)."""
    from skyfm.catalog import likelihood
    from skyfm.heads.flux import flux_phys

    n = len(arrays["x"])
    if n == 0:
        arrays.update(ts=np.zeros(0), flux_phys=np.zeros(0))
        return (arrays, background) if return_background else arrays
    band_objs = [inst.band(b) for b in bands] if bands else list(inst.bands)
    kernels = likelihood.psf_kernels(inst, pixel_scale, psfs=[b.psf for b in band_objs])
    estimated = background is None if estimated is None else estimated
    tables = likelihood.psf_tables(kernels)  # cached by kernel: built once per instrument and pixel scale
    if background is None:
        if high_pass is None:
            high_pass = likelihood.estimate_background(data, kernels)
        fit = likelihood.fit_point_sources(data, high_pass, tables, arrays["x"], arrays["y"], arrays["flux"],
                                           marginal_errors=False)  # its positions are kept, not its fluxes
        masked = likelihood.estimate_background(data, kernels, sources=(arrays["x"], arrays["y"]))
        placed = np.isfinite(fit["x"]) & np.isfinite(fit["y"])
        x0, y0 = np.where(placed, fit["x"], arrays["x"]), np.where(placed, fit["y"], arrays["y"])
        phot = likelihood.fit_point_sources(data, masked, tables, x0, y0, fit["flux"], fit_position=False)
        fit = {**phot, "x": fit["x"], "y": fit["y"], "pos_err_pix": fit["pos_err_pix"]}
        flux_background = masked
    else:
        fit = likelihood.fit_point_sources(data, background, tables, arrays["x"], arrays["y"], arrays["flux"],
                                           marginal_errors=not unresolved)  # with unresolved, only a first fit
        if unresolved:
            found = np.isfinite(fit["x"]) & np.isfinite(fit["flux"]) & (fit["ts"] >= UNRESOLVED_MIN_TS)
            if PSF_WINGS:
                wide = likelihood.psf_kernels(inst, pixel_scale, fraction=PSF_WING_FRACTION,
                                              max_radius_pix=PSF_WING_MAX_RADIUS_PIX, psfs=[b.psf for b in band_objs])
                background = likelihood.add_point_sources(background, likelihood.psf_wing_tables(kernels, wide),
                                                          fit["x"][found], fit["y"][found], fit["flux_band"][found])
            background = likelihood.add_unresolved(np.nan_to_num(np.asarray(data, dtype=np.float64)), background,
                                                   kernels, fit["x"][found], fit["y"][found], fit["flux_band"][found])
            placed = np.isfinite(fit["x"]) & np.isfinite(fit["y"]) & np.isfinite(fit["flux"])
            x0, y0 = np.where(placed, fit["x"], arrays["x"]), np.where(placed, fit["y"], arrays["y"])
            fit = likelihood.fit_point_sources(data, background, tables, x0, y0,
                                               np.where(placed, fit["flux"], arrays["flux"]))
        flux_background = background
    moved = np.hypot(fit["x"] - arrays["x"], fit["y"] - arrays["y"])
    finite = np.isfinite(fit["x"]) & np.isfinite(fit["y"]) & np.isfinite(fit["flux"])
    ok = finite & (moved < _max_fit_move_pix(band_objs))
    if keep_far_moves:
        ok |= _moved_fits_kept(fit, finite, ok, _peak_separation(band_objs, pixel_scale or inst.pixel_scale_deg),
                               fitted_elsewhere, network_peaks)
    for key in ("x", "y"):
        arrays[key] = np.where(ok, fit[key], arrays[key])
    # what the counts scatter beyond Poisson noise where no source was fitted (undetected sources, misfits)
    everything = likelihood.add_point_sources(flux_background, kernels, fit["x"][ok], fit["y"][ok],
                                              fit["flux_band"][ok])
    conf_band, conf = likelihood.confusion_variance(data, everything, kernels, arrays["x"], arrays["y"])
    flux_err, band_err, pe = _fit_catalog_errors(head, estimated, fit["flux"], np.sqrt(fit["flux_err"] ** 2 + conf),
                                                 fit["flux_band"], np.sqrt(fit["flux_band_err"] ** 2 + conf_band),
                                                 fit["pos_err_pix"])
    arrays["flux"] = np.where(ok, fit["flux"], arrays["flux"])
    arrays["flux_err"] = np.where(ok, flux_err, arrays["flux_err"])
    arrays["flux_band"] = np.where(ok[:, None], fit["flux_band"], arrays["flux_band"])
    arrays["flux_band_err"] = np.where(ok[:, None], band_err, arrays["flux_band_err"])
    arrays["pos_err"] = np.where(ok & np.isfinite(pe), pe, arrays["pos_err"])
    arrays["ts"] = np.where(ok, fit["ts"], np.nan)
    if ts_weights is not None:  # the weighted likelihood's TS: each bin's share of it times the bin's weight there
        iy = np.clip(np.round(np.nan_to_num(fit["y"])).astype(int), 0, ts_weights.shape[1] - 1)
        ix = np.clip(np.round(np.nan_to_num(fit["x"])).astype(int), 0, ts_weights.shape[2] - 1)
        arrays["ts_weighted"] = np.where(ok, np.sum(fit["ts_band"] * ts_weights[:, iy, ix].T, axis=1), np.nan)
    arrays["fit"] = np.where(ok, 2, 0).astype(np.int8)
    exposure = np.array([b.exposure for b in band_objs], dtype=np.float64)
    arrays["flux_phys"] = flux_phys(np.clip(arrays["flux_band"], 0, None), exposure)
    if classify:
        arrays["class_prob"] = _spectral_classes(arrays, head, estimated, ok)
    return (arrays, background) if return_background else arrays


def _spectral_classes(arrays: dict, head, estimated: bool, rows: np.ndarray) -> np.ndarray:
    """The class probabilities of the fitted ``rows`` from their measured spectrum (band fluxes and their statistical
    errors, :func:`fit_statistical_band_errors`) and the network's probabilities (the head's
    ``spectral_classifier``: a pulsar's spectrum is cut off at GeV); the others' as they are."""
    classifier = None if head is None else head.spectral_classifier_terms(estimated)
    if classifier is None or not np.any(rows):
        return arrays["class_prob"]
    from skyfm.heads.classification import spectral_class_prob

    crowd = arrays.get("crowding", np.zeros(len(arrays["flux_band"])))
    stat = fit_statistical_band_errors(head, estimated, arrays["flux_band"], arrays["flux_band_err"], crowd)
    return spectral_class_prob(arrays["class_prob"], classifier, arrays["flux_band"], stat, rows=rows)


def fit_statistical_band_errors(head, estimated: bool, flux_band, flux_band_err, crowding) -> np.ndarray:
    """(N, C) the likelihood fit's statistical band errors inside a counts catalog's ``flux_band_err``: the head's
    relative floor, fit scale and growth with ``crowding`` (N,) taken out (:func:`_fit_catalog_errors`,
    :func:`_crowded_flux_errors`). The spectral classifier reads these, so that a new calibration of the errors does
    not move the class probabilities (``benchmarks/choose_spectral_class.py`` fits it on them)."""
    flux_band, err = np.asarray(flux_band, dtype=np.float64), np.asarray(flux_band_err, dtype=np.float64)
    scale, floor = head.error_scales(fit=True, estimated=estimated)[0], head.error_floors(estimated)[0]
    per_crowding = 0.0 if estimated else head.flux_scale_per_crowding()
    grow = 1.0 + per_crowding * np.nan_to_num(np.asarray(crowding, dtype=np.float64), nan=0.0)
    stat = np.sqrt(np.maximum(err ** 2 - (floor * np.abs(flux_band)) ** 2, 0.0))
    return stat / (scale * grow[:, None])


# The fits' kernels hold 97% of a PSF (likelihood.psf_kernels' default); the light beyond, of the sources the first
# fit finds, joins the background of the second out to where the PSF holds this fraction (at most this radius).
# Without it a Geminga-like source (6e5 counts) left rings of false sources at the edge of the 1-4 GeV kernel
# (10-12 px; 13 of 96 false rows on 8 validation plane cubes lay 9-20 px from a source of TS > 3e4): docs/benchmarks.md,
# Run 42. ``PSF_WINGS = False`` leaves them out (as before).
PSF_WING_FRACTION = 0.995
PSF_WING_MAX_RADIUS_PIX = 40
PSF_WINGS = True
MAX_FIT_MOVE_PIX = 3.0  # a candidate whose Poisson fit moves it farther has run off to a neighbour: not kept
FAR_MOVE_MIN_SCORE = 0.2  # such a fit is kept (keep_far_moves) only beside a network peak at least this probable


def _moved_fits_kept(fit: dict, finite: np.ndarray, ok: np.ndarray, separation: float,
                     fitted_elsewhere: tuple | None = None, network_peaks: tuple | None = None) -> np.ndarray:
    """(N,) bool: the fits that moved too far (``finite & ~ok``) but ended farther than ``separation`` from every
    kept fit, from every moved one kept before them (highest TS first) and from ``fitted_elsewhere`` (x, y), and,
    where ``network_peaks`` (x, y, probability) are given, within ``separation`` of one of probability
    :data:`FAR_MOVE_MIN_SCORE` or more."""
    x, y = np.asarray(fit["x"], dtype=np.float64), np.asarray(fit["y"], dtype=np.float64)
    taken_x, taken_y = list(x[ok]), list(y[ok])  # where a source is held; each moved fit kept joins them
    if fitted_elsewhere is not None:
        taken_x += list(np.asarray(fitted_elsewhere[0], dtype=np.float64))
        taken_y += list(np.asarray(fitted_elsewhere[1], dtype=np.float64))
    if network_peaks is not None:
        px, py, score = (np.asarray(v, dtype=np.float64) for v in network_peaks)
        seen_x, seen_y = px[score >= FAR_MOVE_MIN_SCORE], py[score >= FAR_MOVE_MIN_SCORE]

    def near(xs, ys, i) -> bool:
        return len(xs) > 0 and float(np.min(np.hypot(np.asarray(xs) - x[i], np.asarray(ys) - y[i]))) <= separation

    kept = np.zeros(len(ok), dtype=bool)
    moved = np.flatnonzero(finite & ~ok)
    for i in moved[np.argsort(-np.nan_to_num(np.asarray(fit["ts"])[moved], nan=-np.inf), kind="stable")]:
        if near(taken_x, taken_y, i) or (network_peaks is not None and not near(seen_x, seen_y, i)):
            continue
        kept[i] = True
        taken_x.append(x[i])
        taken_y.append(y[i])
    return kept


def _max_fit_move_pix(band_objs) -> float:
    """:data:`MAX_FIT_MOVE_PIX`, widened by the median breadth of the bands' PSFs over the YAML's where an
    observation's own PSF is broader (``--psf``): a blend's fit moves its candidates in proportion to the PSF (a
    cube of 1.6x the YAML's PSF lost a source of SNR 62 whose fit moved 4 px, ``benchmarks/psf_file.py``)."""
    return MAX_FIT_MOVE_PIX * max(1.0, float(np.median([b.psf_breadth for b in band_objs])))


# ------------------------------------------------------------------------------------------ likelihood selection
SELECTIONS = ("auto", "network", "likelihood")
LIKELIHOOD_MIN_TS = 25.0  # the 4FGL convention: TS >= 25, about 4 sigma for 4 free parameters
UNRESOLVED_MIN_TS = LIKELIHOOD_MIN_TS  # refine_counts models the sources a catalog keeps; the rest is unresolved
TS_MAP_INDEX = 2.2  # photon index of the TS map's test source (the TS-map baseline's)
WEAK_SCORE = 0.05  # network peaks this weak only lend their class and extension to TS-map candidates
CANDIDATE_TS = 16.0  # TS-map peaks fitted as candidates (the fit, neighbours included, then decides)
# A second pass looks for sources in the TS map of the background plus the sources found. On validation skies
# (benchmarks/likelihood_selection.py) it found more Fermi-LAT sources (F1 0.906 -> 0.923) but fitted the residuals
# of extended CTAO sources as point sources (0.812 -> 0.761) and left the Fermi plane as it was: one by default.
# Since the fits see the unresolved light (docs/benchmarks.md, Run 11) two passes raise every Fermi-LAT case
# (0.907 -> 0.927, plane 0.781 -> 0.795, ic-halo 0.752 -> 0.817) and still cost CTAO (0.812 -> 0.780): the shipped
# Fermi-LAT head sets ``likelihood_passes: 2``. CTAO's does too since Run 48, with ``likelihood_extension_first``: its
# extended sources in the model the second pass searches (as they are, not as points), validation F1 +0.02.
LIKELIHOOD_PASSES = 1
# A background model whose structure is not the sky's (another interstellar model, other gas clumps) puts its misfits
# into the TS map as sources: validation Fermi-LAT plane cubes (runs/exp38/gof.py), F1 0.507 with the other model
# rescaled per bin, 0.579 with no model, 0.787 with the true one. The counts tell: where they fall 3 sigma short of the
# model, a 2% error of the model allowed (skyfm.catalog.likelihood.model_deficit), true models left at most 1.6% of a
# bin's places (one of ~60), wrong ones 2-14% (runs/exp38/deficit_tolerance.py). At 1% of the places and at least 5
# of them, the model is corrected to the counts over the image at 1 PSF FWHM. 16 validation cubes
# (runs/exp38/fallback.py, fallback2.py), the other model / a half-and-half mix of the two: per bin 0.51 / 0.58 (6
# cubes), at 2 FWHM 0.59 / 0.69 (6) and 0.50 / 0.66 (10 more), at 1 FWHM 0.60 / 0.67 and 0.58 / 0.73, no model 0.58
# and 0.66; at 0.5 FWHM 0.44 / 0.53 (6).
MODEL_DEFICIT_TOLERANCE = 0.02  # the relative error a model may have beside Poisson noise
MODEL_DEFICIT_LIMIT = 0.01
MODEL_DEFICIT_MIN_PLACES = 5
LOCAL_CORRECTION_FWHM = 1.0


def resolve_selection(selection: str, inst, background, refine: bool = True, head=None) -> str:
    """``"network"`` (heatmap probability >= min_score) or ``"likelihood"`` (fitted TS >= min_ts).

    ``"auto"``: the likelihood where it can be trusted, i.e. a refined counts cube with a background model, or
    without one where the instrument's ``head`` says so (``likelihood_without_model``, chosen on validation seeds:
    CTAO); else the network (an estimated background is biased near sources, and CCD images have no Poisson
    likelihood here)."""
    if selection not in SELECTIONS:
        raise SkyfmError(f"selection should be one of {', '.join(SELECTIONS)}; got {selection!r}")
    if selection == "auto":
        trusted = background is not None or bool(getattr(head, "likelihood_without_model", False))
        return "likelihood" if inst.is_counts and refine and trusted else "network"
    if selection == "likelihood" and not inst.is_counts:
        raise SkyfmError(f"likelihood selection is for counts cubes; {inst.name} is a {inst.kind} instrument")
    if selection == "likelihood" and not refine:
        raise SkyfmError("likelihood selection needs the likelihood refinement; drop --no-refine or choose "
                         "--selection network")
    return selection


def _take(arrays: dict, index) -> dict:
    """Every per-row array of ``arrays`` indexed by ``index`` (a mask or slice); scalars (e.g. ``r1_psf``) kept."""
    return {k: (v if np.ndim(v) == 0 else v[index]) for k, v in arrays.items()}


def _rows_like(arrays: dict, n: int, **values) -> dict:
    """``n`` new rows with the keys (and trailing shapes) of ``arrays``: given ``values``, else NaN / 0."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        fill = np.nan if np.issubdtype(v.dtype, np.floating) else 0
        out[k] = np.full((n,) + v.shape[1:], fill, dtype=v.dtype)
    for k, v in values.items():
        out[k] = np.broadcast_to(np.asarray(v, dtype=out[k].dtype), out[k].shape).copy()
    return out


def _peak_separation(band_objs, scale: float) -> float:
    """How far apart two TS-map peaks or fitted sources must be to count as two: the sharpest bin's PSF FWHM,
    at least 2 px (the TS-map baseline's ``min_separation_pix``)."""
    return max(2.0, min(b.psf.fwhm_deg for b in band_objs) / scale)


def add_ts_map_candidates(arrays: dict, data: np.ndarray, inst, pixel_scale: float | None, background,
                          bands: list[str] | None, min_score: float, candidate_ts: float = CANDIDATE_TS,
                          exclude: tuple | None = None, ts_weights=None) -> dict:
    """Likelihood selection's candidates: the network's peaks at ``min_score`` and the peaks of the Poisson TS map
    (against ``background``, a power law of index 2.2 as test source) with ``TS >= candidate_ts`` that no such
    network peak, nor any position of ``exclude`` (x, y), lies near (within the sharpest bin's PSF FWHM, at
    least 2 px). With ``ts_weights`` (C, H, W; :func:`~skyfm.catalog.likelihood.likelihood_weights`) the peaks
    of the weighted likelihood's TS map join them where no peak of the plain one is near: sources whose light in
    a broad, bright bin the model gets a few percent wrong (a soft source in the Galactic plane, its low-energy
    light over- or under-predicted by its neighbours' fits), flagged True in an extra column ``weighted_only``.

    ``arrays`` holds the network's peaks down to :data:`WEAK_SCORE`: the weaker ones give a TS-map candidate
    their probability (column ``score`` before the selection), class probabilities and extension when within that
    distance, and are otherwise dropped; a TS-map candidate with none gets probability 0, equal class
    probabilities and no extension. The sources a TS map alone would miss (blends the network splits) and those
    the network misses (faint sources the background model makes significant) are then fitted together."""
    from skyfm.catalog import likelihood

    band_objs = [inst.band(b) for b in bands] if bands else list(inst.bands)
    scale = pixel_scale or inst.pixel_scale_deg
    kernels = likelihood.psf_kernels(inst, scale, psfs=[b.psf for b in band_objs])
    edges = np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")] for b in band_objs])
    weights = likelihood.powerlaw_band_weights(inst, TS_MAP_INDEX, edges)
    counts = np.nan_to_num(np.asarray(data, dtype=np.float64))
    model = np.asarray(background, dtype=np.float64)
    ts, flux = likelihood.ts_map(counts, model, kernels, band_weights=weights, return_flux=True)
    separation = _peak_separation(band_objs, scale)
    px, py, _ = likelihood.find_peaks(ts, candidate_ts, separation)
    n_plain = len(px)
    if ts_weights is not None:
        wx, wy, _ = likelihood.find_peaks(likelihood.ts_map(counts, model, kernels, band_weights=weights,
                                                            weights=ts_weights), candidate_ts, separation)
        if len(wx) and len(px):
            far = np.hypot(wx[:, None] - px[None], wy[:, None] - py[None]).min(axis=1) > separation
            wx, wy = wx[far], wy[far]
        px, py = np.concatenate([px, wx]), np.concatenate([py, wy])
    weighted_only = np.arange(len(px)) >= n_plain
    strong = np.asarray(arrays["score"]) >= min_score
    net = {k: np.asarray(v)[strong] for k, v in arrays.items()}
    weak = {k: np.asarray(v)[~strong] for k, v in arrays.items()}
    ex_x, ex_y = net["x"], net["y"]
    if exclude is not None:
        ex_x, ex_y = np.concatenate([ex_x, exclude[0]]), np.concatenate([ex_y, exclude[1]])
    if len(px) and len(ex_x):
        d = np.hypot(px[:, None] - ex_x[None], py[:, None] - ex_y[None])
        new = d.min(axis=1) > separation
        px, py, weighted_only = px[new], py[new], weighted_only[new]
    n = len(px)
    if ts_weights is not None:
        net["weighted_only"] = np.zeros(len(net["x"]), dtype=bool)
    if n == 0:
        return net
    k = np.asarray(arrays["class_prob"]).shape[1]
    iy = np.clip(np.round(py).astype(int), 0, ts.shape[0] - 1)
    ix = np.clip(np.round(px).astype(int), 0, ts.shape[1] - 1)
    rows = _rows_like(arrays, n, x=px, y=py, score=0.0, pos_err=1.0, flux=flux[iy, ix], class_prob=1.0 / k,
                      extension=0.0)
    if len(weak["x"]):
        d = np.hypot(px[:, None] - weak["x"][None], py[:, None] - weak["y"][None])
        j = np.argmin(d, axis=1)
        near = d[np.arange(n), j] <= separation
        for key in ("score", "class_prob", "extension"):
            rows[key][near] = weak[key][j[near]]
    if ts_weights is not None:
        rows["weighted_only"] = weighted_only
    return {key: np.concatenate([net[key], rows[key]]) for key in net}


def apply_extension_test(arrays: dict, counts, background, kernels, scale: float, head, estimated: bool,
                         min_ts: float, exposure=None) -> dict:
    """Likelihood selection's extension test (:func:`skyfm.catalog.extended.extension_test`) applied to the
    selected rows: extended sources get their Gaussian fit (position, counts, ``extension`` as r68 in deg, errors
    scaled as :func:`refine_counts` scales a fit's), the pieces they absorb are dropped, and the pieces that stay
    significant get their new point fit. The rows it fits carry the fit's own Fisher errors times the head's
    point-fit scales and floors, without the confusion term: those scales were calibrated on point sources, not on
    extended ones. ``exposure`` (C,) cm2 s: their ``flux_phys`` from their new counts (else it stays the point
    fit's)."""
    from skyfm.catalog import extended
    from skyfm.heads.flux import flux_phys

    res = extended.extension_test(counts, background, kernels, arrays["x"], arrays["y"], arrays["flux_band"],
                                  arrays["ts"], min_ts=min_ts)
    ch = res["changed"] & res["kept"]
    arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}  # the caller's rows stay as they were
    if ch.any():
        fb, fb_err = res["flux_band"][ch], res["flux_band_err"][ch]
        flux = fb.sum(axis=1)
        arrays["x"][ch], arrays["y"][ch], arrays["ts"][ch] = res["x"][ch], res["y"][ch], res["ts"][ch]
        arrays["flux_band"][ch], arrays["flux"][ch] = fb, flux
        arrays["flux_err"][ch], arrays["flux_band_err"][ch], arrays["pos_err"][ch] = _fit_catalog_errors(
            head, estimated, flux, np.sqrt(np.sum(fb_err ** 2, axis=1)), fb, fb_err, res["pos_err_pix"][ch])
        ext = res["extension_pix"][ch] > 0
        arrays["extension"][np.flatnonzero(ch)[ext]] = res["extension_pix"][ch][ext] * scale
        if exposure is not None and "flux_phys" in arrays:
            arrays["flux_phys"][ch] = flux_phys(np.clip(fb, 0, None), exposure)
    arrays["ts_ext"] = res["ts_ext"]
    keep = res["kept"]
    return {k: v[keep] for k, v in arrays.items()}


SPLIT_MIN_SEPARATION = 1.0  # a split's two sources lie at least this many times _peak_separation apart


def apply_split_test(arrays: dict, counts, background, kernels, inst, scale: float | None, bands, head,
                     estimated: bool, min_ts: float) -> dict:
    """Likelihood selection's blend test (:func:`skyfm.catalog.split.split_test`): each bright source fitted again
    as two; where two fit enough better, the fainter becomes a new row (its class, extension and network score
    those of the row it came from), and every row a split made or moved is fitted again by :func:`refine_counts`
    against the background and the other rows (errors, TS and physical flux as every fit's). A split whose rows
    that fit brings closer than the split's least separation is undone (the row as it was, fitted once more with
    the others): two sources must stay resolved to count as two. Column ``ts_split`` (NaN where no split)."""
    from skyfm.catalog import likelihood, split

    band_objs = [inst.band(b) for b in bands] if bands else list(inst.bands)
    min_separation = SPLIT_MIN_SEPARATION * _peak_separation(band_objs, scale or inst.pixel_scale_deg)
    res = split.split_test(counts, background, kernels, arrays["x"], arrays["y"], arrays["flux_band"],
                           arrays["ts"], min_ts=min_ts, min_separation=min_separation,
                           max_move=_max_fit_move_pix(band_objs))
    n, parent = len(arrays["x"]), res["parent"]
    undone = np.zeros(n, dtype=bool)  # by the input row each split family descends from
    while True:  # the refit, and again where it undid a split (each round undoes one more family, or ends)
        family = undone[parent]
        rows = {k: np.concatenate([np.asarray(v), np.asarray(v)[parent[n:]]]) for k, v in arrays.items()}
        split_made = ~family  # rows whose values are the split's (or untouched ones)
        for key, value in (("x", res["x"]), ("y", res["y"]), ("flux_band", res["flux_band"])):
            rows[key][split_made] = value[split_made]
        rows["flux"][split_made] = res["flux_band"][split_made].sum(axis=1)
        rows["ts_split"] = np.where(split_made, res["ts_split"], np.nan)
        changed = res["changed"] & split_made
        refit_rows = changed | (family & (np.arange(len(parent)) < n))  # an undone split's row: fitted again
        keep = ~family | (np.arange(len(parent)) < n)
        if not refit_rows.any():
            return _take(rows, keep)
        fixed = likelihood.add_point_sources(background, kernels, rows["x"][keep & ~refit_rows],
                                             rows["y"][keep & ~refit_rows], rows["flux_band"][keep & ~refit_rows])
        refit = refine_counts(_take(rows, refit_rows), counts, inst, scale, fixed, bands=bands, head=head,
                              estimated=estimated, unresolved=False, classify=False)
        for k, v in refit.items():
            rows[k] = np.asarray(rows[k]).copy() if k in rows else np.full((len(parent),) + np.shape(v)[1:], np.nan)
            rows[k][refit_rows] = v
        too_close = np.zeros(n, dtype=bool)
        for f in np.unique(parent[changed]):
            members = np.flatnonzero((parent == f) & changed)
            d = np.hypot(rows["x"][members, None] - rows["x"][None, members],
                         rows["y"][members, None] - rows["y"][None, members])
            np.fill_diagonal(d, np.inf)
            too_close[f] = np.min(d) < min_separation
        if not too_close.any():
            return _take(rows, keep)
        undone |= too_close


def _weighted_only_at_weighted_ts(arrays: dict, min_ts: float) -> dict:
    """The fitted candidates less the columns ``weighted_only`` and ``ts_weighted``, with TS NaN (dropped by
    :func:`select_by_ts`) where only the weighted TS map found a candidate and its fit's weighted TS is under
    ``min_ts``: such a source must be significant where the model's few percent are allowed for, not only in its
    plain TS, which the bright bin it was found despite dominates."""
    out = dict(arrays)
    weighted_only = out.pop("weighted_only", None)
    ts_weighted = out.pop("ts_weighted", None)
    if weighted_only is None or ts_weighted is None:
        return out
    weak = np.asarray(weighted_only, bool) & ~(np.nan_to_num(ts_weighted, nan=-np.inf) >= min_ts)
    out["ts"] = np.where(weak, np.nan, out["ts"])
    return out


def select_by_ts(arrays: dict, min_ts: float, separation: float) -> dict:
    """Rows with fitted ``TS >= min_ts``, one per source: of two fits that converged within half ``separation``
    the higher TS stays. Sorted by TS, highest first."""
    from scipy.spatial import cKDTree

    ts = np.nan_to_num(np.asarray(arrays["ts"], dtype=np.float64), nan=-np.inf)
    keep = ts >= min_ts
    order = np.argsort(-ts, kind="stable")
    if keep.sum() > 1:
        tree = cKDTree(np.stack([arrays["x"], arrays["y"]], axis=1))
        for i in order:
            if keep[i]:
                for j in tree.query_ball_point([arrays["x"][i], arrays["y"][i]], 0.5 * separation):
                    if j != i and ts[j] <= ts[i]:
                        keep[j] = False
    order = order[keep[order]]
    return {k: np.asarray(v)[order] for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------------- catalogs
def _catalog(arrays: dict, inst, wcs, head, score_kind: str = "probability", meta: dict | None = None):
    import astropy.units as u

    from skyfm.catalog import build_catalog

    extra = {"flux_band": arrays["flux_band"], "flux_band_err": arrays["flux_band_err"]}
    if "fit" in arrays and len(arrays["fit"]) == len(arrays["x"]):
        extra["fit"] = (np.asarray(arrays["fit"], dtype=np.int8),
                        "0: network position and flux; 1: position from the PSF fit; 2: position and flux from the "
                        "PSF fit (CCD point sources) or the Poisson likelihood fit (counts cubes); 3: position from "
                        "the PSF fit, flux from a Kron aperture (CCD extended sources, flux_kron); 4: a source the "
                        "network did not detect, found in the PSF fit's residual image "
                        "(skyfm.catalog.residual_search), flux from the PSF fit (on images of several bands the "
                        "total under the image's colours, not the sum of flux_band) or, where it is extended, a "
                        "Kron aperture; 5: a companion, a point source beside a detection that the network took as "
                        "one with it, found in a first PSF fit's residual image (skyfm.detect.find_companions), "
                        "position and flux from the PSF fit")
    for name, dtype, description in CCD_COLUMN_DOCS:
        if name in arrays and (not inst.is_counts or name == "crowding"):
            extra[name] = (np.asarray(arrays[name], dtype=dtype), description)
    if "net_score" in arrays:
        extra["net_score"] = (np.asarray(arrays["net_score"], dtype=np.float32),
                              "The network's heatmap probability at the source (0: a TS-map candidate the network "
                              "did not see); with likelihood selection ``score`` is sqrt(TS)")
    if "ts_ext" in arrays:
        extra["ts_ext"] = (np.asarray(arrays["ts_ext"], dtype=np.float64),
                           "Extension test (skyfm detect --test-extension): 2 delta ln L of the Gaussian model over "
                           "the point model with the pieces it replaced (Akaike-penalised), for the sources found "
                           "extended; NaN for point sources")
    if "ts_split" in arrays:
        extra["ts_split"] = (np.asarray(arrays["ts_split"], dtype=np.float64),
                             "Blend test: 2 delta ln L of two point sources over one, of the split that made or "
                             "moved this row (NaN: none did)")
    if "ts" in arrays:
        extra["ts"] = arrays["ts"]
        extra["sqrt_ts"] = (np.sqrt(np.clip(arrays["ts"], 0, None)), "Significance sqrt(TS) of the likelihood fit")
        extra["flux_phys"] = (u.Quantity(arrays["flux_phys"], u.ph / u.cm**2 / u.s),
                              "Photon flux over the bands of the image (sum of counts / exposure per bin)")
    return build_catalog(arrays["x"], arrays["y"], pos_err_pix=arrays["pos_err"], flux=arrays["flux"],
                         flux_err=arrays["flux_err"], score=arrays["score"], class_names=list(head.class_names),
                         class_prob=arrays["class_prob"], extension_deg=arrays["extension"], wcs=wcs,
                         instrument=inst, extra=extra, score_kind=score_kind, meta=meta)


def detect_patch(patch, detector=None, min_score: float | None = None, *, tile_size: int | None = None,
                 overlap: int | None = None, refine: bool = True, batch_size: int | None = None, progress: bool = False,
                 precision: str = "auto", attention_window: int | None = None, drop_trails: bool | None = None,
                 selection: str = "auto", min_ts: float = LIKELIHOOD_MIN_TS, passes: int | None = None,
                 test_extension: bool | None = None, split_blends: bool | None = None,
                 mask_cosmic_rays: bool | None = None, refine_workers: int | None = None, fit_background: bool = True,
                 psfs: dict | None = None, model_error: float | None = None):
    """Detect the sources of a :class:`~skyfm.data.Patch` (any size) -> catalog QTable (module docstring).

    Args:
        patch: the image (simulated or read); its instrument must have a head in the detector.
        detector: a SourceDetector, a model folder, or None for the shipped default.
        min_score: heatmap probability threshold (default the head's or the detector's; at that default a head's
            ``unconfirmed_min_score`` applies to the peaks the PSF fit does not confirm, any other to every peak).
        refine: for counts cubes, the Poisson likelihood refinement (TS, physical flux).
        precision, attention_window: how the network runs (:func:`inference_settings`): by default bf16 where
            the hardware has it natively, and the tiling of :func:`default_tiling`.
        drop_trails: CCD images: drop the detections on satellite trails (:func:`drop_trail_detections`; None:
            the head's ``drop_trails``, on for MeerLICHT and Hubble).
        mask_cosmic_rays: CCD images: leave cosmic-ray pixels out of the PSF fit (:func:`refine_ccd_tile`);
            default the head's ``mask_cosmic_rays``.
        refine_workers: threads for the CCD tiles' refinement (:func:`detect_tiles`; default: the CPUs, at most 8).
        selection: which detections the catalog keeps (:func:`resolve_selection`). ``"network"``: heatmap
            probability >= ``min_score``. ``"likelihood"`` (counts cubes; the default when the patch carries a
            background model, ``patch.background_image``): the network's peaks and the TS map's
            (:func:`add_ts_map_candidates`), fitted together, kept at fitted ``TS >= min_ts``; ``score`` is then
            sqrt(TS) and ``net_score`` the network's probability. ``passes`` (default the head's
            ``likelihood_passes``, else :data:`LIKELIHOOD_PASSES`) > 1: look again, in the TS map of
            the background plus the sources found, for sources beside them (:data:`LIKELIHOOD_PASSES`).
            ``test_extension`` (likelihood selection only; default the head's ``likelihood_extension_test``):
            test each source for extension (:func:`apply_extension_test`); extended ones get a Gaussian fit,
            ``extension`` and ``ts_ext``. True where likelihood selection does not run is an error.
            ``split_blends`` (likelihood selection only; default the head's ``likelihood_split_test``): fit each
            bright source again as two and keep the pair where it fits enough better (:func:`apply_split_test`;
            column ``ts_split``). True where likelihood selection does not run is an error.
            ``model_error`` (likelihood selection only; default the head's ``likelihood_model_error``, 0: none): the
            background model's fractional error; the peaks of the TS map of a likelihood weighted for it join the
            candidates (:func:`~skyfm.catalog.likelihood.likelihood_weights`, :func:`add_ts_map_candidates`) and
            are kept at weighted TS >= ``min_ts``.
            ``fit_background`` (likelihood selection with a model): the model first rescaled to the counts, one
            factor per bin (:func:`~skyfm.catalog.likelihood.correct_background_model`; catalog meta
            ``background_scale``), as LAT analyses free the diffuse normalisations, and a model whose structure the
            counts contradict corrected over the image (:data:`MODEL_DEFICIT_LIMIT`; a warning, catalog meta
            ``background_deficit`` and ``background_correction``); False: the model as given (still checked).
        psfs: counts cubes: ``{band name: PSF}``, the observation's own PSF for the likelihood fits, the TS map and
            the extension test in place of the instrument's (:func:`skyfm.catalog.psf_file.band_psfs` reads one
            from a gtpsf or IRF file); the network sees the pixels as they are.
    """
    from skyfm.instruments import load_instrument

    det = get_detector(detector)
    inst = det.instrument(patch.instrument) if patch.instrument in det.config.heads else load_instrument(patch.instrument)
    if psfs:
        if not inst.is_counts:
            raise SkyfmError(f"a PSF of the observation is for counts cubes; {inst.name} images have their seeing "
                             "measured on the image")
        inst = inst.with_psfs(psfs)
    head = det.head_config(inst.name).for_bands(patch.bands)
    min_score = default_min_score(det, head) if min_score is None else float(min_score)
    if patch.mask is not None and patch.mask.all():
        raise SkyfmError("every pixel of the image is masked or invalid: nothing to detect")
    if not np.isfinite(patch.data).all():
        patch = _finite_copy(patch)
    scale = _wcs_scale(patch.wcs)
    background = getattr(patch, "background_image", None)
    if inst.is_counts and background is not None and patch.mask is not None and patch.mask.any():
        patch = _model_filled(patch, background)
    chosen = resolve_selection(selection, inst, background, refine, head)
    if model_error is not None and not (np.isfinite(model_error) and 0 <= model_error < 1):
        raise SkyfmError(f"the background model's fractional error should be in [0, 1), got {model_error!r}")
    for flag, name in ((test_extension, "extension test"), (split_blends, "blend test (--split-blends)"),
                       (bool(model_error) or None, "weighted likelihood (--model-error)")):
        if flag is True and chosen != "likelihood":
            raise SkyfmError(f"the {name} needs likelihood selection: a counts cube with a background model "
                             "(--background)")
    if chosen == "likelihood":
        if passes is None:
            passes = head.likelihood_passes if head.likelihood_passes is not None else LIKELIHOOD_PASSES
        if not (isinstance(passes, (int, np.integer)) and passes >= 1):
            raise SkyfmError(f"{inst.name}: likelihood passes should be a whole number >= 1, got {passes!r}")
        if test_extension is None:
            test_extension = bool(head.likelihood_extension_test)
        return _detect_likelihood(patch, det, inst, head, scale, background, min_score, min_ts, passes=int(passes),
                                  extension=test_extension, split=split_blends, fit_background=fit_background,
                                  model_error=model_error,
                                  tile_size=tile_size,
                                  overlap=overlap,
                                  batch_size=batch_size, progress=progress, precision=precision,
                                  attention_window=attention_window)
    seeing = measure_seeing(patch, inst, scale)
    _warn_if_broad_seeing(seeing, inst)
    arrays = detect_tiles(patch, inst, det, min_score=min_score, tile_size=tile_size, overlap=overlap,
                          batch_size=batch_size, progress=progress, pixel_scale=scale, precision=precision,
                          attention_window=attention_window, refine=refine, drop_trails=drop_trails,
                          mask_cosmic_rays=mask_cosmic_rays, refine_workers=refine_workers, image_seeing=seeing)
    if inst.is_counts and refine:
        arrays = _refine_network_rows(arrays, patch.data, inst, scale, background, list(patch.bands), head)
    return _catalog(arrays, inst, patch.wcs, head, meta={"min_score": min_score, "selection": "network",
                                                         **_seeing_meta(seeing)})


def _detect_likelihood(patch, det, inst, head, scale, background, min_score: float, min_ts: float,
                       candidate_ts: float = CANDIDATE_TS, passes: int = LIKELIHOOD_PASSES, extension: bool = False,
                       fit_background: bool = True, keep_far_moves: bool | None = None, split: bool | None = None,
                       model_error: float | None = None, extension_first: bool | None = None, **tiling):
    """detect_patch's likelihood selection (its docstring). ``extension``: test the sources for extension
    (:func:`apply_extension_test`); ``fit_background``: rescale the model to the counts first; ``keep_far_moves``:
    :func:`refine_counts`'s, default the head's ``likelihood_keep_far_moves``; ``split``: the blend test
    (:func:`apply_split_test`), default the head's ``likelihood_split_test``; ``model_error``: the background
    model's fractional error for the weighted likelihood's candidates (:func:`add_ts_map_candidates`,
    ``ts_weights``), default the head's ``likelihood_model_error``, 0 or None: none; ``extension_first``: with
    ``extension`` and more than one pass, test the first pass's sources for extension before the next passes search
    the background plus them (and the new ones against that), not every source at the end; default the head's
    ``likelihood_extension_first``."""
    from skyfm.catalog import likelihood

    bands = list(patch.bands)
    band_objs = [inst.band(b) for b in bands]
    kernels = likelihood.psf_kernels(inst, scale, psfs=[b.psf for b in band_objs])
    estimated = background is None
    keep_far = bool(getattr(head, "likelihood_keep_far_moves", False) if keep_far_moves is None else keep_far_moves)
    counts = np.nan_to_num(patch.data.astype(np.float64))
    found = detect_tiles(patch, inst, det, min_score=min(WEAK_SCORE, min_score), pixel_scale=scale, **tiling)
    weak = {k: np.asarray(v)[np.asarray(found["score"]) < min_score] for k, v in found.items()}
    peaks = (np.asarray(found["x"]), np.asarray(found["y"]), np.asarray(found["score"]))  # all, down to WEAK_SCORE
    meta = {"min_score": min_score, "selection": "likelihood", "min_ts": float(min_ts)}
    if not estimated:
        strong = np.asarray(found["score"]) >= min_score
        background, meta_model = _fitted_background_model(counts, background, kernels,
                                                          (np.asarray(found["x"])[strong],
                                                           np.asarray(found["y"])[strong]),
                                                          patch.mask, fit_background)
        meta.update(meta_model)
    search = likelihood.estimate_background(counts, kernels) if estimated else background
    epsilon = getattr(head, "likelihood_model_error", None) if model_error is None else model_error
    # a model's error: against an estimate from the counts themselves (not validated there) no weights
    weights = likelihood.likelihood_weights(search, kernels, float(epsilon)) if epsilon and not estimated else None
    arrays = add_ts_map_candidates(found, patch.data, inst, scale, search, bands, min_score, candidate_ts,
                                   ts_weights=weights)
    # estimated: refine_counts fits positions against the search estimate, fluxes against one without the sources
    arrays, fitted_against = refine_counts(arrays, patch.data, inst, scale, None if estimated else background,
                                           bands=bands, head=head, estimated=estimated,
                                           high_pass=search if estimated else None, return_background=True,
                                           keep_far_moves=keep_far, network_peaks=peaks,
                                           ts_weights=weights, classify=False)
    arrays = _weighted_only_at_weighted_ts(arrays, min_ts)
    if estimated and (passes > 1 or extension):  # the model of later steps: the estimate without the candidates
        background = likelihood.estimate_background(counts, kernels, sources=(arrays["x"], arrays["y"]))
    elif not estimated:  # the model with the unresolved sources' light
        background = fitted_against
    deg_per_pix = scale or inst.pixel_scale_deg
    separation = _peak_separation(band_objs, deg_per_pix)
    exposure = np.array([b.exposure for b in band_objs])  # the extended fits' flux_phys
    arrays = select_by_ts(arrays, min_ts, separation)
    if extension_first is None:
        extension_first = bool(getattr(head, "likelihood_extension_first", False))
    extension_first = extension and passes > 1 and extension_first
    if extension_first:  # extended sources as they are in the model the next passes search
        arrays = apply_extension_test(arrays, counts, background, kernels, deg_per_pix, head, estimated, min_ts,
                                      exposure=exposure)
        arrays = select_by_ts(arrays, min_ts, separation)
    for _ in range(passes - 1):  # sources beside those found: in the TS map of the background plus them
        model = _sources_model(background, kernels, arrays, deg_per_pix)
        more = add_ts_map_candidates(weak, patch.data, inst, scale, model, bands, np.inf, candidate_ts,
                                     exclude=(arrays["x"], arrays["y"]), ts_weights=weights)
        if len(more["x"]) == 0:
            break
        more = refine_counts(more, patch.data, inst, scale, model, bands=bands, head=head, estimated=estimated,
                             unresolved=False, keep_far_moves=keep_far, fitted_elsewhere=(arrays["x"], arrays["y"]),
                             network_peaks=peaks, ts_weights=weights, classify=False)
        more = _weighted_only_at_weighted_ts(more, min_ts)
        if extension_first:
            more = select_by_ts(more, min_ts, separation)
            more = apply_extension_test(more, counts, model, kernels, deg_per_pix, head, estimated, min_ts,
                                        exposure=exposure)
        arrays = select_by_ts({k: np.concatenate([arrays[k], more[k]]) for k in arrays}, min_ts, separation)
    if bool(getattr(head, "likelihood_split_test", False)) if split is None else split:
        arrays = apply_split_test(arrays, counts, background, kernels, inst, scale, bands, head, estimated, min_ts)
        arrays = select_by_ts(arrays, min_ts, separation)
    if extension and not extension_first:
        arrays = apply_extension_test(arrays, counts, background, kernels, deg_per_pix, head, estimated, min_ts,
                                      exposure=exposure)
        arrays = select_by_ts(arrays, min_ts, separation)
    arrays = _crowded_flux_errors(arrays, head, counts.shape[-2:], _sharpest_fwhm_pix(band_objs, deg_per_pix),
                                  estimated)
    # once, from the final spectra (the blend and extension tests refit rows) and the network's probabilities
    arrays["class_prob"] = _spectral_classes(arrays, head, estimated, np.asarray(arrays["fit"]) == 2)
    arrays["net_score"] = arrays["score"]
    arrays["score"] = np.sqrt(np.clip(arrays["ts"], 0, None))
    return _catalog(arrays, inst, patch.wcs, head, score_kind="sqrt_ts", meta=meta)


def _refine_network_rows(arrays: dict, data, inst, scale, background, bands: list[str], head) -> dict:
    """Network selection's counts-cube rows refined (:func:`refine_counts`), their flux errors grown with their
    crowding (:func:`_crowded_flux_errors`), then classified from the band errors the catalog gives (the head's
    spectral classifier is fitted on catalogs)."""
    arrays = refine_counts(arrays, data, inst, scale, background, bands=bands, head=head, classify=False)
    fwhm = _sharpest_fwhm_pix([inst.band(b) for b in bands], scale or inst.pixel_scale_deg)
    arrays = _crowded_flux_errors(arrays, head, np.shape(data)[-2:], fwhm, estimated=background is None)
    arrays["class_prob"] = _spectral_classes(arrays, head, background is None, np.asarray(arrays["fit"]) == 2)
    return arrays


def _sharpest_fwhm_pix(band_objs, deg_per_pix: float) -> float:
    """The sharpest bin's PSF FWHM in pixels (what a counts row's ``crowding`` is per FWHM^2 of)."""
    return min(b.psf.fwhm_deg for b in band_objs) / deg_per_pix


def _crowded_flux_errors(arrays: dict, head, shape, fwhm_pix: float, estimated: bool) -> dict:
    """Column ``crowding`` (detected neighbours per ``fwhm_pix``^2, :func:`~skyfm.catalog.psf_fit.crowding`: the
    final rows, so that candidates the selection dropped count for nothing) and, against a background model, the
    fitted rows' flux errors grown with it: their statistical part (the errors less the head's relative floor) times
    ``1 + fit_flux_err_scale_crowding * crowding``. One scale had covered the densest third of the Fermi-LAT
    validation rows 0.60 and the others 0.83 (docs/benchmarks.md, "Run 51"): the sources too faint to detect add to
    a fit's flux the more, the denser the detected ones."""
    from skyfm.catalog.psf_fit import crowding

    rho = crowding(arrays["x"], arrays["y"], shape, fwhm_pix)
    arrays = {**arrays, "crowding": rho}
    per_crowding = 0.0 if head is None or estimated else head.flux_scale_per_crowding()
    if per_crowding == 0.0 or not len(rho):
        return arrays
    fitted = np.asarray(arrays["fit"]) == 2
    grow = 1.0 + per_crowding * rho
    floor = head.error_floors()[0]
    for key, flux_key, g in (("flux_err", "flux", grow), ("flux_band_err", "flux_band", grow[:, None])):
        err, flux = np.asarray(arrays[key], dtype=np.float64), np.asarray(arrays[flux_key], dtype=np.float64)
        systematic = floor * np.abs(flux)
        stat = np.sqrt(np.maximum(err ** 2 - systematic ** 2, 0.0))
        mask = fitted if err.ndim == 1 else fitted[:, None]
        arrays[key] = np.where(mask, np.hypot(stat * g, systematic), err)
    return arrays


def _sources_model(background, kernels, arrays: dict, scale: float) -> np.ndarray:
    """The background plus every row's image: point sources through the PSF, the rows the extension test found
    extended (``ts_ext`` finite) as their Gaussian through it."""
    from skyfm.catalog import extended, likelihood

    ts_ext = np.asarray(arrays.get("ts_ext", np.full(len(arrays["x"]), np.nan)), dtype=np.float64)
    ext_pix = np.asarray(arrays["extension"], dtype=np.float64) / scale
    is_ext = np.isfinite(ts_ext) & (ext_pix > 0)
    x, y, fb = np.asarray(arrays["x"]), np.asarray(arrays["y"]), np.asarray(arrays["flux_band"])
    model = likelihood.add_point_sources(background, kernels, x[~is_ext], y[~is_ext], fb[~is_ext])
    for i in np.flatnonzero(is_ext):  # add_point_sources takes the extended source's tables as its PSF
        model = likelihood.add_point_sources(model, extended.extended_tables(kernels, ext_pix[i]), x[i:i + 1],
                                             y[i:i + 1], fb[i:i + 1])
    return model


def _fitted_background_model(counts, model, kernels, sources, invalid, fit_background: bool):
    """(the background model the likelihood selection uses, catalog meta): ``model`` rescaled to the counts, one
    factor per bin (``fit_background``); where the counts still fall short of it too often for its structure to be
    the sky's (:func:`~skyfm.catalog.likelihood.model_deficit` over :data:`MODEL_DEFICIT_LIMIT` and
    :data:`MODEL_DEFICIT_MIN_PLACES` in a bin), corrected over the image on scales of :data:`LOCAL_CORRECTION_FWHM`
    PSF FWHM, with a warning (as given, ``fit_background=False``: the warning only)."""
    from skyfm.catalog import likelihood

    meta = {}
    if fit_background:
        rescaled, scale_map = likelihood.correct_background_model(counts, model, kernels, sources, invalid=invalid)
        meta["background_scale"] = ",".join(f"{v:.4f}" for v in scale_map.mean(axis=(1, 2)))
    else:
        rescaled = model
    share, short = likelihood.model_deficit(counts, rescaled, kernels, sources, tolerance=MODEL_DEFICIT_TOLERANCE,
                                            invalid=invalid)
    meta["background_deficit"] = ",".join("nan" if np.isnan(v) else f"{v:.4f}" for v in share)
    failed = (np.nan_to_num(share) > MODEL_DEFICIT_LIMIT) & (short >= MODEL_DEFICIT_MIN_PLACES)
    if not failed.any():
        meta["background_correction"] = "per bin" if fit_background else "none"
        return rescaled, meta
    # one message for every tile of a map (the CLI says each distinct warning once); the numbers are in the meta
    what = (f"the background model does not follow the counts: in a band over {100 * MODEL_DEFICIT_LIMIT:g}% of the "
            "places away from sources hold 3 sigma fewer counts than it predicts, "
            f"a {100 * MODEL_DEFICIT_TOLERANCE:g}% error allowed (catalog meta background_deficit, per band; a model "
            "of the sky's structure stays under it)")
    if not fit_background:
        warnings.warn(f"{what}; used as given (--background-as-is)", stacklevel=4)
        meta["background_correction"] = "none"
        return rescaled, meta
    warnings.warn(f"{what}; it is corrected to the counts on scales of {LOCAL_CORRECTION_FWHM:g} PSF FWHM (meta "
                  "background_correction): fewer false sources from its misfits, and fewer faint or extended sources "
                  "found", stacklevel=4)
    corrected, _ = likelihood.correct_background_model(counts, model, kernels, sources, invalid=invalid,
                                                       smoothing_fwhm=LOCAL_CORRECTION_FWHM)
    meta["background_correction"] = f"local, {LOCAL_CORRECTION_FWHM:g} FWHM"
    return corrected, meta


def default_min_score(det, head) -> float:
    """The instrument's threshold chosen on validation patches, else the detector's default."""
    return float(head.min_score if head.min_score is not None else det.config.min_score)


def _model_filled(patch, background):
    """A counts patch whose masked pixels (no data: NaN, a mask) hold the background model's counts rather than zeros,
    which the likelihood would read as a deficit under the model."""
    import copy

    p = copy.copy(patch)
    p.data = np.where(patch.mask[None], background, patch.data).astype(np.float32)
    return p


def _finite_copy(patch):
    import copy

    p = copy.copy(patch)
    bad = ~np.isfinite(patch.data)
    p.data = np.where(bad, 0.0, patch.data).astype(np.float32)
    m = bad.any(axis=0)
    p.mask = m if patch.mask is None else (patch.mask | m)
    return p


def _wcs_scale(wcs) -> float | None:
    if wcs is None:
        return None
    from skyfm.data.readers import pixel_scale_deg

    try:
        return float(pixel_scale_deg(wcs))
    except Exception:  # noqa: BLE001 - a degenerate WCS: work in native pixels
        return None


# --------------------------------------------------------------------------------------------------------- files
def read_background_model(path, shape: tuple, grouping=None) -> np.ndarray:
    """A counts cube's background model from a FITS file: expected background counts per pixel and bin, (C, H, W)
    float32 of ``shape``. The ``BACKGROUND`` HDU when there is one (``skyfm denoise`` writes it), else the first
    HDU with image data (a gtmodel / gtsrcmaps model cube). Wrong shape, NaN or negative values are errors.
    ``grouping``: the counts cube's :class:`~skyfm.data.readers.EnergyGrouping`, if its planes were summed into the
    instrument's bands; a model with the cube's own planes is summed the same way."""
    from skyfm.data.readers import open_fits

    with open_fits(path) as hdul:
        chosen = next((h for h in hdul if h.name == "BACKGROUND" and h.is_image and h.data is not None), None)
        if chosen is None:
            chosen = next((h for h in hdul if h.is_image and h.data is not None and h.data.ndim >= 2), None)
        if chosen is None:
            raise SkyfmError(f"--background {path}: no image data in the file")
        model = np.asarray(chosen.data, dtype=np.float32)
    if model.ndim == 2:
        model = model[None]
    if grouping is not None and model.shape[0] == grouping.n_planes and model.shape[0] != shape[0]:
        model = grouping.apply(model)
    if model.shape != tuple(shape):
        raise SkyfmError(f"--background {path}: shape {model.shape} does not match the counts cube's {tuple(shape)} "
                         "(bins, height, width)")
    if not np.isfinite(model).all() or (model < 0).any():
        raise SkyfmError(f"--background {path}: the model has NaN, infinite or negative values; it should be "
                         "expected counts per pixel and bin")
    return model


def _diffuse_inputs(background, isotropic, exposure_cube) -> tuple | None:
    """(intensity cube or None, isotropic spectrum or None) when ``skyfm detect`` is to make the background model
    from the diffuse-emission files (``--background`` an intensity cube, ``--isotropic``), else None; read now, so
    that a bad file fails before any work."""
    from skyfm.catalog import background_model as bm

    intensity = background is not None and bm.is_intensity_cube(background)
    if not intensity and isotropic is None:
        return None
    if exposure_cube is None:
        given = "--background is an intensity cube" if intensity else "--isotropic is given"
        raise SkyfmError(f"{given}: its counts need the observation's exposure, --exposure EXPCUBE (gtexpcube2's)")
    if isotropic is not None and background is not None and not intensity:
        raise SkyfmError("--isotropic adds to an interstellar-emission intensity cube (gll_iem); --background "
                         f"{Path(background).name} is a counts model, which holds the isotropic counts already")
    return (bm.read_intensity_cube(background) if intensity else None,
            None if isotropic is None else bm.read_isotropic_spectrum(isotropic))


def diffuse_background(image, inst, energy_edges_kev, exposure_cube, intensity, isotropic) -> np.ndarray:
    """A counts cube's background model (C, H, W) from an interstellar-emission intensity cube and an isotropic
    spectrum through the observation's exposure cube (:func:`skyfm.catalog.background_model.background_counts`),
    with a warning where a bin's model holds far more or far fewer counts than the cube (a wrong exposure, a model
    of another event class)."""
    from skyfm.catalog import background_model as bm

    if image.wcs is None:
        raise SkyfmError("the counts cube has no celestial WCS: a background model cannot be placed on it")
    band_objs = [inst.band(b) if b in {x.name for x in inst.bands} else None for b in image.bands]
    if None in band_objs:
        raise SkyfmError(f"the cube's bands {image.bands} are not all {inst.name}'s: no PSF to spread the model with")
    kernels = bm.diffuse_kernels(inst, image.pixel_scale_deg, band_objs)
    model = bm.background_counts(image.wcs, (image.height, image.width), energy_edges_kev, exposure_cube, intensity,
                                 isotropic, kernels)
    counts = np.nansum(image.read_window(0, image.height, 0, image.width), axis=(1, 2))
    for c, (m, n) in enumerate(zip(model.sum(axis=(1, 2)), counts)):
        if n >= 100 and not 1 / 2 <= m / n <= bm.MODEL_COUNTS_TOLERANCE:
            warnings.warn(f"band {image.bands[c]}: the background model holds {m:.0f} counts, the cube {n:.0f}; check "
                          "the exposure cube and the diffuse models (event class, IRFs)", stacklevel=3)
    return model


class DenoisedInputWarning(UserWarning):
    """The input is a ``skyfm denoise`` output, not an observed image."""


def _warn_if_denoised(path: Path) -> None:
    """Warn when ``path`` is a ``skyfm denoise`` output (primary header ``DENOISED = T``): the detectors are
    trained on observed images, and on a clean one, whose noise is gone, they fire on structure everywhere."""
    from astropy.io import fits

    try:
        denoised = bool(fits.getheader(path, 0).get("DENOISED", False))
    except (OSError, ValueError):  # the readers give the one-line error for a file they cannot read
        return
    if denoised:
        warnings.warn(f"{path.name} is a skyfm denoise output (DENOISED = T); the detector was trained on observed "
                      "images and finds spurious sources on clean ones: run skyfm detect on the observed image",
                      DenoisedInputWarning, stacklevel=3)


def _warn_of_unused_dataset_hdus(path: Path, options: dict) -> None:
    """Warn when ``path`` is a gammapy MapDataset file (:func:`skyfm.data.readers.map_dataset_parts`) that holds a
    background model, an exposure or a PSF map that no option uses (``options``: {option: the file given or None}):
    without them the background is estimated from the counts, flux_phys takes the YAML's exposure and the fits its
    PSF."""
    from astropy.io import fits

    from skyfm.data.readers import map_dataset_parts

    try:
        with fits.open(path) as hdul:
            names = {h.name.upper() for h in hdul}
    except (OSError, ValueError):  # the readers give the one-line error for a file they cannot read
        return
    unused = [(name, option) for name, option in map_dataset_parts(names) if options.get(option) is None]
    if unused:
        warnings.warn(f"{path.name} also holds " + ", ".join(n for n, _ in unused) + " (a gammapy MapDataset file): "
                      "skyfm detect uses them given the file as " + ", ".join(o for _, o in unused), stacklevel=3)


def detect_file(path, out=None, *, instrument=None, band: str | None = None, model_dir=None,
                min_score: float | None = None, plot: bool = False, associate=None, hdu=None,
                tile_size: int | None = None, batch_size: int | None = None, progress: bool = True, refine: bool = True,
                precision: str = "auto", attention_window: int | None = None, drop_trails: bool | None = None,
                background=None, selection: str = "auto", min_ts: float = LIKELIHOOD_MIN_TS,
                test_extension: bool | None = None, split_blends: bool | None = None,
                mask_cosmic_rays: bool | None = None, residual_search: bool | None = None, device: str | None = "auto",
                mask=None, mask_bits: int | None = None, exposure=None, bunit: str | None = None, isotropic=None,
                fit_background: bool = True, psf=None, model_error: float | None = None):
    """Detect sources in a FITS image, counts cube or HEALPix map of any size; write ``out`` when given.

    Images are read lazily tile by tile (memory-mapped). HEALPix maps are cut into sky tiles at the instrument's
    native pixel scale (:func:`skyfm.data.healpix.healpix_tiles`); counts maps get each tile's likelihood
    refinement (:func:`_detect_healpix`). With ``out``: the catalog (FITS / ECSV /
    VOTable by extension) and a DS9 region file beside it; with ``plot`` also ``OUT.png`` (images up to ~4k
    pixels a side). Nothing is written when anything fails. Returns the catalog.

    ``background``: for a counts cube (for a HEALPix map only an intensity cube, below), a FITS file with its
    background model (:func:`read_background_model`), which the Poisson likelihood refinement fits against instead of
    an estimate from the counts (the detector's error scales were calibrated that way); ``selection`` and ``min_ts`` as
    :func:`detect_patch` (likelihood selection, the default with a model, on cubes up to 64 M voxels), and
    ``test_extension``, ``split_blends``, ``model_error``; ``mask_cosmic_rays`` as :func:`detect_patch`.
    ``residual_search`` False: CCD images without the heads' searches of the PSF fit's residual
    (:func:`refine_ccd_tile`; catalog ``fit`` 4 and 5): only the network's detections; None or True: the heads' own
    settings. ``device``: where the network runs
    (:func:`skyfm.utils.resolve_device`; the PSF and likelihood fits run on the CPU). ``mask``, ``mask_bits``: a
    bad-pixel mask file beside the image (:func:`skyfm.data.open_image`; with ``hdu="all"`` each CCD takes the
    mask file's HDU of the same index where it has one of the CCD's size). ``exposure``: for a counts cube, an
    exposure cube file (gtexpcube2's; :mod:`skyfm.catalog.exposure`) that ``flux_phys`` takes each source's exposure
    from, instead of the instrument YAML's one number per band; with it, ``background`` may also be an
    interstellar-emission intensity cube (gll_iem_v07.fits) and ``isotropic`` an isotropic spectrum (its text file),
    from which the background model is made (:func:`diffuse_background`). ``bunit``: a CCD image's pixel unit in
    place of its header's BUNIT (:func:`skyfm.data.open_image`). ``fit_background`` as :func:`detect_patch`.
    ``psf``: for a counts cube or map, a PSF file of the observation (gtpsf's, an IACT IRF's psf_table, gammapy's
    PSF map; :mod:`skyfm.catalog.psf_file`) whose PSF, one King function per band, the likelihood refinement, the TS
    map and a background model made with ``exposure`` use instead of the instrument YAML's (catalog meta
    ``psf_file``, ``psf_r68``). A gammapy ``MapDataset`` file serves as the counts (its ``COUNTS``), ``background``
    (its ``BACKGROUND``), ``exposure`` (its ``EXPOSURE``) and ``psf`` (its PSF map) at once. ``out`` (or its region
    file or plot) the name of one of the inputs is an error before any work.
    """
    from skyfm.catalog import write_catalog
    from skyfm.catalog.io import catalog_format
    from skyfm.data import open_image
    from skyfm.data.readers import FORMAT_SIMULATED, check_fits_file

    path = Path(path)
    check_fits_file(path)
    if out is not None:
        catalog_format(out)  # a bad extension fails before any work
        _refuse_writing_over_inputs(out, plot, {"the input": path, "the --background": background,
                                                "the --exposure": exposure, "the --isotropic": isotropic,
                                                "the --psf": psf, "the --mask": mask, "the --associate": associate})
    if isinstance(hdu, str) and hdu.strip().lower() == "all":
        return _detect_every_hdu(path, out, plot=plot, associate=associate, instrument=instrument, band=band,
                                 model_dir=model_dir, min_score=min_score, tile_size=tile_size,
                                 batch_size=batch_size, progress=progress, refine=refine, precision=precision,
                                 attention_window=attention_window, drop_trails=drop_trails, background=background,
                                 selection=selection, min_ts=min_ts, test_extension=test_extension,
                                 split_blends=split_blends, mask_cosmic_rays=mask_cosmic_rays,
                                 residual_search=residual_search, device=device,
                                 mask=mask, mask_bits=mask_bits, exposure=exposure, bunit=bunit,
                                 isotropic=isotropic, fit_background=fit_background, psf=psf,
                                 model_error=model_error)
    _warn_if_denoised(path)
    _warn_of_unused_dataset_hdus(path, {"--background": background, "--exposure": exposure, "--psf": psf})
    det = get_detector(model_dir, device=device)
    if residual_search is False:  # a copy: the cached detector keeps its heads' settings
        det = copy.copy(det)
        det.config = copy.deepcopy(det.config)
        for head in det.config.heads.values():
            head.residual_search = head.companion_search = None
    if background is not None:
        check_fits_file(background)
    exposure_cube = None
    if exposure is not None:
        from skyfm.catalog.exposure import read_exposure_cube

        if not refine:
            raise SkyfmError("--exposure gives the physical fluxes of the Poisson likelihood refinement, which "
                             "--no-refine leaves out")
        exposure_cube = read_exposure_cube(exposure)
    if psf is not None:
        check_fits_file(psf)
        if not refine:
            raise SkyfmError("--psf is the PSF of the Poisson likelihood refinement, which --no-refine leaves out")
    psf_meta = {}
    diffuse = _diffuse_inputs(background, isotropic, exposure_cube)
    energy_edges = None
    if _is_healpix_file(path, hdu):
        if mask is not None:
            from skyfm.data.readers import HEALPIX_MASK_ERROR

            raise SkyfmError(HEALPIX_MASK_ERROR)
        if background is not None and (diffuse is None or diffuse[0] is None):
            raise SkyfmError("--background for a HEALPix map is the interstellar-emission intensity cube (with "
                             "--exposure), from which each sky tile's model is made; a counts model is not read")
        if test_extension is True:
            raise SkyfmError("--test-extension is for counts cubes in pixel images, not HEALPix maps")
        if split_blends is True:
            raise SkyfmError("--split-blends is for counts cubes in pixel images, not HEALPix maps (their tiles "
                             "take the instrument head's choice)")
        if model_error is not None:
            raise SkyfmError("--model-error is for counts cubes in pixel images, not HEALPix maps (their tiles "
                             "take the instrument head's choice)")
        if bunit is not None:
            raise SkyfmError("--bunit is for CCD images in pixel images, not HEALPix maps")
        table, patch_for_plot, energy_edges = _detect_healpix(
            path, det, instrument, min_score, progress, batch_size, precision=precision,
            attention_window=attention_window, refine=refine, selection=selection, min_ts=min_ts, diffuse=diffuse,
            exposure_cube=exposure_cube, fit_background=fit_background, psf=psf)
        min_score = table.meta.get("min_score")
    else:
        with open_image(path, instrument=instrument, hdu=hdu, band=band, mask=mask, mask_bits=mask_bits,
                        bunit=bunit) as image:
            image.require_patchable()
            inst = image.instrument
            # the file's own noise model where its header gives one (SATURATE, a drizzle's NDRIZIM; GAIN)
            own = {k: v for k, v in (("saturation", image.saturation_adu), ("gain", image.gain)) if v is not None}
            if own:
                inst = dataclasses.replace(inst, noise={**inst.noise, **own})
            for option, given in (("--background", background), ("--exposure", exposure), ("--isotropic", isotropic),
                                  ("--psf", psf)):
                if given is not None and not inst.is_counts:
                    raise SkyfmError(f"{option} is for counts cubes; {path.name} is a {inst.name} image")
            psfs, psf_meta = _psfs_from_file(psf, inst, image.bands)
            inst = inst.with_psfs(psfs)
            energy_edges = image.energy_edges_kev
            if energy_edges is None and inst.is_counts:
                energy_edges = [[e.to_value("keV") for e in inst.band(name).energy] for name in image.bands]
            if diffuse is not None:
                model = diffuse_background(image, inst, energy_edges, exposure_cube, *diffuse)
            else:
                model = (None if background is None
                         else read_background_model(background, image.shape, image.energy_grouping))
            head = det.head_config(inst.name).for_bands(image.bands)
            min_score = default_min_score(det, head) if min_score is None else float(min_score)
            small = image.shape[0] * image.height * image.width <= 64e6
            if image.format == FORMAT_SIMULATED or (inst.is_counts and small):
                from skyfm.data import read_image

                patch = read_image(path, instrument=instrument, hdu=hdu, band=band, mask=mask, mask_bits=mask_bits,
                                   bunit=bunit)
                if model is not None:
                    from dataclasses import replace

                    patch = replace(patch, background_image=model)
                table = detect_patch(patch, det, min_score, tile_size=tile_size, refine=refine,
                                     drop_trails=drop_trails, selection=selection, min_ts=min_ts,
                                     test_extension=test_extension, split_blends=split_blends,
                                     batch_size=batch_size, progress=progress,
                                     precision=precision, attention_window=attention_window,
                                     mask_cosmic_rays=mask_cosmic_rays, fit_background=fit_background, psfs=psfs,
                                     model_error=model_error)
                patch_for_plot = patch
            else:
                if image.masked_fraction() >= 1.0:
                    raise SkyfmError(f"{path}: every pixel is NaN, infinite or masked; there is no image to read")
                for flag, name in ((test_extension, "extension test"), (split_blends, "blend test"),
                                   (bool(model_error) or None, "weighted likelihood (--model-error)")):
                    if flag is True:
                        raise SkyfmError(f"the {name} needs likelihood selection, for counts cubes up to 64 M voxels; "
                                         f"this one has {image.shape[0] * image.height * image.width / 1e6:.0f} M")
                if resolve_selection(selection, inst, model, refine) == "likelihood":
                    if selection == "likelihood":  # the TS map is computed on the whole cube at once
                        raise SkyfmError("likelihood selection is for counts cubes up to 64 M voxels; this one has "
                                         f"{image.shape[0] * image.height * image.width / 1e6:.0f} M: choose "
                                         "--selection network")
                    warnings.warn("the cube is over 64 M voxels: detections are selected by the network's "
                                  "probability (likelihood selection computes the TS map on the whole cube)",
                                  stacklevel=2)
                scale = image.pixel_scale_deg
                seeing = measure_seeing(image, inst, scale)
                _warn_if_broad_seeing(seeing, inst)
                arrays = detect_tiles(image, inst, det, min_score=min_score, tile_size=tile_size,
                                      batch_size=batch_size, progress=progress, pixel_scale=scale,
                                      precision=precision, attention_window=attention_window, refine=refine,
                                      drop_trails=drop_trails, mask_cosmic_rays=mask_cosmic_rays,
                                      image_seeing=seeing)
                if inst.is_counts and refine:
                    data = image.read_window(0, image.height, 0, image.width)
                    data = np.nan_to_num(data, nan=0.0)
                    arrays = _refine_network_rows(arrays, data, inst, scale, model, list(image.bands), head)
                table = _catalog(arrays, inst, image.wcs, head, meta={"min_score": min_score, **_seeing_meta(seeing)})
                patch_for_plot = None
                if plot and image.height * image.width <= 4096 * 4096:
                    patch_for_plot = image.read_patch_window(0, image.height, 0, image.width)
            if image.unit is not None:
                table = in_image_units(table, image.adu_per_unit, image.unit)
    if exposure_cube is not None:
        from skyfm.catalog.exposure import apply_exposure

        table = apply_exposure(table, exposure_cube, energy_edges)
    table.meta.update(psf_meta)
    table.meta["input"] = path.name
    if associate is not None:
        table = associate_catalog(table, associate)
    if out is not None:
        out = Path(out)
        png = out.with_suffix(".png") if plot else None
        if png is not None and patch_for_plot is not None:
            save_overlay(patch_for_plot, table, png)
        write_catalog(table, out)
    return table


def _refuse_writing_over_inputs(out, plot: bool, inputs: dict) -> None:
    """An error, before any work, where the catalog ``out``, its region file or its plot would overwrite one of
    ``inputs`` ({option: path or None}): a gammapy dataset file is given as the counts and as --psf, and ``--out``
    the same name would have replaced it with the catalog."""
    out = Path(out)
    written = [out, out.with_suffix(".reg")] + ([out.with_suffix(".png")] if plot else [])
    for option, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        clash = next((w for w in written if w.exists() and w.resolve() == Path(given).resolve()), None)
        if clash is not None:
            raise SkyfmError(f"--out {out}: skyfm detect would write {clash.name} over {option} file; choose "
                             "another name")


def _psfs_from_file(psf, inst, bands) -> tuple[dict, dict]:
    """({band name: PSF}, catalog meta) from ``--psf`` for ``bands`` of a counts image; ({}, {}) without one."""
    if psf is None:
        return {}, {}
    from skyfm.catalog.psf_file import band_psfs

    psfs, _ = band_psfs(psf, [inst.band(b) for b in bands])
    return psfs, {"psf_file": Path(psf).name,
                  "psf_r68": ",".join(f"{p.containment_radius(0.68):.4f}" for p in psfs.values())}


def _detect_every_hdu(path: Path, out, *, plot: bool, associate, **options):
    """:func:`detect_file` with ``hdu="all"``: every science image of a file of several (a mosaic camera's CCDs,
    one per extension: :func:`skyfm.data.readers.science_hdus`) detected on its own, with its own WCS, background
    and seeing, into one catalog with a column ``hdu`` (the extension's name, else its index). Catalog meta:
    each CCD's measured seeing as ``seeing_<band>_<hdu>``, ``hdus`` the HDUs read. A CCD that cannot be read
    (every pixel NaN, a band that cannot be told) is skipped with a warning; if none can, its error is raised. No
    overlay is drawn (``plot``: one per CCD would be needed)."""
    from astropy.table import vstack

    from skyfm.catalog import write_catalog
    from skyfm.data.readers import open_fits, science_hdus

    with open_fits(path, memmap=True) as hdul:
        indices = science_hdus(hdul)
        names = [hdul[i].name if hdul[i].name and hdul[i].name != "PRIMARY" else str(i) for i in indices]
    if not indices:  # a table or a HEALPix map: the single-HDU path says what it is
        return detect_file(path, out, plot=plot, associate=associate, **options)
    if plot:
        warnings.warn("--plot draws one image; with --hdu all no overlay is written", stacklevel=3)
    tables, meta, skipped, done = [], {}, [], []
    for index, name in zip(indices, names):
        try:
            table = detect_file(path, None, hdu=index, **options)
        except SkyfmError as error:  # a dead CCD (every pixel NaN) need not lose the others: said, and skipped
            skipped.append(error)
            warnings.warn(f"HDU {name} skipped: {error}", stacklevel=3)
            continue
        done.append(name)
        table["hdu"] = np.full(len(table), name, dtype=f"U{max(len(n) for n in names)}")
        table["hdu"].info.description = "The file's HDU (EXTNAME, else index) the source was detected in"
        for key, value in list(table.meta.items()):
            if key.startswith("seeing_"):
                meta[f"{key}_{name}"] = value
                del table.meta[key]
        tables.append(table)
    if not tables:
        raise skipped[0]
    units = {str(t["flux"].unit) or "the file's own" for t in tables if "flux" in t.colnames}
    if len(units) > 1:  # CCDs read in different units (BUNIT, or the unit each one's noise gave): one catalog in ADU
        warnings.warn(f"the HDUs were read in different units ({', '.join(sorted(units))}): the catalog's fluxes are "
                      "all in the instrument's ADU", stacklevel=3)
        tables = [in_instrument_units(t) for t in tables]
    table = vstack(tables, metadata_conflicts="silent")
    table.meta.update(meta)
    table.meta["hdus"] = ",".join(done)
    if associate is not None:
        table = associate_catalog(table, associate)
    if out is not None:
        write_catalog(table, Path(out))
    return table


IN_IMAGE_UNIT = " (here in the image's own unit)"  # what in_image_units adds to the flux columns' descriptions


def in_image_units(table, adu_per_unit: float, unit):
    """The catalog's fluxes in the image's own unit (electrons, e-/s: :func:`skyfm.data.readers.image_units`; a unit
    its noise gave: :func:`skyfm.data.readers.units_from_noise`) rather than the instrument's ADU that detection
    worked in; meta ``flux_unit`` and ``adu_per_unit`` say which."""
    _rescale_fluxes(table, lambda v: v / adu_per_unit, unit, lambda d: d and f"{d}{IN_IMAGE_UNIT}")
    # dimensionless: a file with no BUNIT whose unit its noise gave (skyfm.data.readers.units_from_noise)
    table.meta["flux_unit"] = unit.to_string() or "the image's pixel unit"
    table.meta["adu_per_unit"] = float(adu_per_unit)  # the instrument's ADU per unit of the image, as detected
    return table


def in_instrument_units(table):
    """The catalog's fluxes back in the instrument's ADU where :func:`in_image_units` gave them in the image's own
    unit (its meta ``adu_per_unit``); other catalogs as they are."""
    import astropy.units as u

    if "adu_per_unit" not in table.meta:
        return table
    table = table.copy()
    factor = float(table.meta.pop("adu_per_unit"))
    _rescale_fluxes(table, lambda v: v * factor, u.adu, lambda d: (d or "").replace(IN_IMAGE_UNIT, "") or None)
    table.meta["flux_unit"] = "adu"
    return table


def _rescale_fluxes(table, convert, unit, describe) -> None:
    """Every flux column of ``table`` as ``convert(values)`` in ``unit``, its description passed through
    ``describe``."""
    from skyfm.catalog.table import FLUX_LIKE_COLUMNS

    for name in ("flux", "flux_err", *FLUX_LIKE_COLUMNS):
        if name in table.colnames:
            description = table[name].info.description
            table[name] = convert(table[name].value) * unit
            table[name].info.description = describe(description)


def _is_healpix_file(path: Path, hdu) -> bool:
    from skyfm.data.readers import _is_healpix, open_fits

    with open_fits(path) as hdul:
        if hdu is not None:
            try:
                return _is_healpix(hdul[hdu])
            except (KeyError, IndexError):
                return False
        has_image = any(h.is_image and h.header.get("NAXIS", 0) >= 2 for h in hdul)
        return not has_image and any(_is_healpix(h) for h in hdul)


def _detect_healpix(path: Path, det, instrument, min_score: float, progress: bool, batch_size: int,
                    lon_range=None, lat_range=(-90.0, 90.0), precision: str = "auto", attention_window=None,
                    refine: bool = True, selection: str = "auto", min_ts: float = LIKELIHOOD_MIN_TS, diffuse=None,
                    exposure_cube=None, fit_background: bool = True, psf=None):
    """Sky tiles of a HEALPix map at the instrument's native pixel scale, each detection kept by the tile whose
    sky cell owns it (:class:`skyfm.data.healpix.SkyTile`), so the all-sky catalog has each source once ->
    (catalog, None, the bands' energy edges keV or None).

    Counts maps get each tile's Poisson likelihood refinement (:func:`detect_patch`; TS, ``flux_phys``), against a
    background model made for the tile from ``diffuse`` (:func:`_diffuse_inputs`, with ``exposure_cube``) where
    given (then the likelihood selection by default), else one estimated from the tile's counts; ``psf``: a PSF
    file of the observation (:func:`detect_file`)."""
    from astropy.table import vstack
    from astropy.wcs.utils import pixel_to_skycoord
    from tqdm.auto import tqdm

    from skyfm.catalog import empty_catalog
    from skyfm.catalog.exposure import catalog_coords
    from skyfm.data.healpix import healpix_tiles, read_healpix

    hmap = read_healpix(path, instrument=instrument)
    if hmap.instrument is None:
        raise SkyfmError(f"{path} is a HEALPix map of an unknown instrument: pass --instrument NAME")
    inst = hmap.instrument
    edges = None
    if inst.is_counts:
        edges = (hmap.energy_edges_kev if hmap.energy_edges_kev is not None
                 else np.array([[e.to_value("keV") for e in b.energy] for b in inst.bands]))
    elif diffuse is not None or exposure_cube is not None or psf is not None:
        raise SkyfmError(f"--exposure, --background, --isotropic and --psf are for counts maps; {path.name} is a "
                         f"{inst.name} map")
    own = {b.name for b in inst.bands}
    map_bands = list(hmap.bands) if set(hmap.bands) <= own else [b.name for b in inst.bands]
    psfs, psf_meta = _psfs_from_file(psf, inst, map_bands)  # only the map's bands: the file need not cover others
    inst = inst.with_psfs(psfs)
    head = det.head_config(inst.name)
    min_score = default_min_score(det, head) if min_score is None else float(min_score)
    tile = det.config.tile_size * 2
    if lon_range is None and lat_range == (-90.0, 90.0):
        lon_range, lat_range = _healpix_coverage(hmap)
    tables, kernels = [], None
    tiles = healpix_tiles(hmap, tile, inst.pixel_scale_deg, overlap=det.config.tile_overlap, frame=hmap.frame,
                          lon_range=lon_range, lat_range=lat_range)
    for sky_tile, patch in tqdm(tiles, desc="detecting", unit="sky tile", disable=not progress):
        if patch.mask is not None and patch.mask.all():
            continue
        if len(patch.bands) == len(inst.bands) and "?" in patch.bands:
            patch.bands = [b.name for b in inst.bands]
        if inst.is_counts and refine:
            if diffuse is not None:
                from skyfm.catalog.background_model import background_counts, diffuse_kernels

                if kernels is None:  # every tile has the map's bands and the instrument's pixel scale
                    kernels = diffuse_kernels(inst, inst.pixel_scale_deg, [inst.band(b) for b in patch.bands])
                patch.background_image = background_counts(patch.wcs, patch.data.shape[1:], edges, exposure_cube,
                                                           *diffuse, kernels)
            t = detect_patch(patch, det, min_score, refine=True, selection=selection, min_ts=min_ts,
                             batch_size=batch_size, precision=precision, attention_window=attention_window,
                             fit_background=fit_background, psfs=psfs)
            if len(t):
                sph = catalog_coords(t).transform_to(hmap.frame).spherical
                t = t[sky_tile.owns(sph.lon.deg, sph.lat.deg)]
            if len(t):
                t["tile"] = np.full(len(t), sky_tile.index)
                tables.append(t)
            continue
        arrays = detect_tiles(patch, inst, det, min_score=min_score, batch_size=batch_size, precision=precision,
                              attention_window=attention_window)
        if not len(arrays["x"]):
            continue
        c = pixel_to_skycoord(arrays["x"], arrays["y"], patch.wcs, origin=0).transform_to(hmap.frame)
        sph = c.spherical
        own = sky_tile.owns(sph.lon.deg, sph.lat.deg)
        arrays = {k: v[own] for k, v in arrays.items()}
        if len(arrays["x"]):
            t = _catalog(arrays, inst, patch.wcs, head)
            t["tile"] = np.full(len(t), sky_tile.index)
            tables.append(t)
    if tables:
        table = vstack(tables, metadata_conflicts="silent")
        table.meta["min_score"] = min_score
        table.meta["note"] = "x, y are pixels of each row's sky tile (column tile); use the sky coordinates"
    else:
        table = empty_catalog(class_names=list(head.class_names), instrument=inst)
    table.meta.update(psf_meta)
    return table, None, edges


def _healpix_coverage(hmap):
    """(lon_range or None, lat_range) of the pixels of a map that hold data, so a partial map is not tiled
    over the whole sky."""
    from astropy_healpix import HEALPix

    valid = np.flatnonzero(np.isfinite(hmap.values).any(axis=0))
    if valid.size == 0:
        raise SkyfmError(f"{hmap.source}: the HEALPix map holds no valid pixel")
    if valid.size > 0.5 * hmap.values.shape[1]:
        return None, (-90.0, 90.0)
    hp = HEALPix(nside=hmap.nside, order="nested" if hmap.nested else "ring")
    lon, lat = hp.healpix_to_lonlat(valid)
    lon, lat = lon.deg, lat.deg
    pad = 2.0 * float(hp.pixel_resolution.to_value("deg"))
    lat_range = (max(-90.0, float(lat.min()) - pad), min(90.0, float(lat.max()) + pad))
    if np.abs(lat_range).max() > 80:
        return None, lat_range
    centred = (lon - float(np.median(lon)) + 180.0) % 360.0 - 180.0  # longitudes around the coverage's middle
    lo, hi = float(centred.min()) - pad, float(centred.max()) + pad
    if hi - lo >= 300:
        return None, lat_range
    mid = float(np.median(lon))
    return ((mid + lo) % 360.0, (mid + lo) % 360.0 + (hi - lo)), lat_range


def associate_catalog(table, reference):
    """Add the name of the associated reference source to each row (skyfm.catalog.associate)."""
    from skyfm import catalog

    return catalog.associate(table, reference)


def save_overlay(patch, table, path) -> Path:
    """The image with the detections overlaid, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skyfm.plotting import plot_patch, save_figure

    fig, ax = plt.subplots(figsize=(7, 7))
    plot_patch(patch, ax=ax, catalog=table, truth=patch.truth is not None,
               title=f"{patch.instrument}: {len(table)} detections")
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


__all__ = ["detect_file", "detect_patch", "detect_tiles", "get_detector", "refine_counts", "save_overlay"]


# ---------------------------------------------------------------------------------------------------------- demo
def run_demo(out_dir, scenes, seed: int = 2026, size: int | None = None, progress: bool = True) -> list[dict]:
    """``skyfm demo``: simulate -> write FITS -> detect -> evaluate against the truth, for every instrument.

    Writes into ``out_dir`` per instrument: ``NAME.fits`` (its real format), ``NAME_truth.ecsv``,
    ``NAME_catalog.fits`` + ``.reg`` (the detections), ``NAME_catalog.png`` (overlay: truth circles, detection
    crosses), and for all: ``metrics.json``, ``recall_vs_snr.png`` and ``gallery.png``. Returns one summary per
    instrument.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skyfm.data import write_patch
    from skyfm.data.simulate import patch_seed, simulate_patch
    from skyfm.finetune.evaluate import SNR_MIN, match_radius_pix, score_patch
    from skyfm.instruments import load_instrument
    from skyfm.plotting import save_figure, save_gallery
    from skyfm.utils import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    det = get_detector(None)
    summaries, patches, curves = [], [], {}
    for i, (name, options) in enumerate(scenes):
        opts = dict(options)
        if size is not None:
            opts["size"] = size
        patch = simulate_patch(name, patch_seed(seed, i), **opts)
        inst = load_instrument(name)
        fits_path = out / f"{name}.fits"
        write_patch(patch, fits_path)
        with atomic_path(out / f"{name}_truth.ecsv") as tmp:
            patch.truth.write(tmp, format="ascii.ecsv", overwrite=True)
        t0 = time.perf_counter()
        cat = detect_file(fits_path, out / f"{name}_catalog.fits", plot=True, progress=False)
        seconds = time.perf_counter() - t0
        s = score_patch(cat, patch, inst)
        prec = s["tp"] / max(s["tp"] + s["fp"], 1)
        rec = s["tp"] / max(s["n_true"], 1)
        summary = {"instrument": name, "shape": list(patch.shape), "n_true_snr5": s["n_true"], "n_detected": len(cat),
                   "precision": round(prec, 3), "recall": round(rec, 3),
                   "f1": round(2 * prec * rec / max(prec + rec, 1e-9), 3), "match_radius_pix": match_radius_pix(inst),
                   "median_sep_pix": round(float(np.median(s["sep"])), 3) if s["sep"] else None,
                   "artefact_detections": s["artefact_det"], "detect_seconds": round(seconds, 2)}
        summaries.append(summary)
        patches.append(patch)
        curves[name] = _recall_curve(cat, patch, inst)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps({"snr_min": SNR_MIN, "instruments": summaries}, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (centres, recall) in curves.items():
        ax.plot(centres, recall, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("true SNR")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("skyfm demo: recall vs SNR (default detector)")
    save_figure(fig, out / "recall_vs_snr.png", dpi=110, bbox_inches="tight")
    save_gallery(patches, out / "gallery.png", title="skyfm demo: simulated patches with true sources")
    return summaries


def _recall_curve(cat, patch, inst):
    from skyfm.catalog import match_catalogs

    snr = np.asarray(patch.truth["snr"], float)
    edges = np.array([1.5, 3, 5, 10, 20, 50, 1e9])
    x = np.asarray(getattr(cat["x"], "value", cat["x"]), float)
    y = np.asarray(getattr(cat["y"], "value", cat["y"]), float)
    found = np.zeros(len(snr), bool)
    if len(x) and len(snr):
        _, ti, _ = match_catalogs((x, y), patch.truth, match_radius_pix_for(inst))
        found[ti] = True
    centres, recall = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (snr >= lo) & (snr < hi)
        if sel.sum():
            centres.append(np.sqrt(lo * min(hi, 100.0)))
            recall.append(found[sel].mean())
    return centres, recall


def match_radius_pix_for(inst) -> float:
    from skyfm.finetune.evaluate import match_radius_pix

    return match_radius_pix(inst)
