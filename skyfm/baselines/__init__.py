"""The baselines skyfm must beat, configured as an astronomer would run them on the same images.

Each takes a :class:`~skyfm.data.Patch` and returns a catalog (:func:`skyfm.catalog.build_catalog`) with at least
``x``, ``y``, ``flux``, ``score`` (the method's own significance: SNR or sqrt(TS), ``meta['score_kind']``) and,
where the method gives one, ``flux_err``. Detection thresholds are deliberately low (about 2-3 sigma) so that a
precision-recall sweep over ``score`` can pick each method's best operating point; cut on ``score`` for a
fixed threshold (SNR >= 5, TS >= 25).

* :func:`sep_detect` — SExtractor's algorithm (sep): a mesh background (64-px boxes, 3x3 median filter), a
  detection filter (SExtractor's ``default.conv``, a 3 x 3 pyramid), a 1.5-sigma threshold over 5 pixels,
  32-level deblending at contrast 1e-4 (crowded-field setting) with cleaning, and photometry in circular apertures of radius 1 FWHM
  with the PSF's aperture correction (gain-aware errors on CCDs); ``score`` is the SNR in a 1-FWHM aperture of
  the detection image. ``"sep-nofilter"`` (``filter=False, minarea=3``) is the crowded-field configuration:
  no detection filter (any smoothing merges close neighbours before deblending can split them) and a smaller
  minimum area for the sharper unfiltered peaks.
* :func:`photutils_detect` — photutils: a sigma-clipped ``Background2D``, then ``method="dao"``
  (``DAOStarFinder`` at the PSF FWHM, aperture photometry as above) or ``method="segmentation"``
  (``detect_sources`` at 1.5 sigma over 5 pixels on the image filtered by a Gaussian of FWHM min(PSF, 3 px),
  ``deblend_sources`` at contrast 1e-4, ``SourceCatalog`` Kron fluxes).
* :func:`tsmap_detect` — the gamma-ray astronomer's method (fermipy ``find_sources``, gammapy ``TSMapEstimator``): a
  Poisson likelihood TS map of a power-law point source (photon index 2.2) with the PSF of each energy bin, fitted
  at each pixel against the background under the kernel as gammapy does (since Run 46; before, the approximation of
  a background constant over the kernel), peaks (TS >= 16 candidates) refined by a likelihood fit of position and
  per-bin fluxes with neighbours held fixed, then a second TS map of the residual (background + fitted sources) for
  sources hiding next to brighter ones, fitted against everything found before. ``background="true"`` uses the
  simulator's expected background (the analysis with a perfect interstellar-emission model); ``"estimated"``
  estimates it from the counts (:func:`skyfm.catalog.likelihood.estimate_background`).

**Multi-band images** (Hubble, WISE, a MeerLICHT stack): with ``band=None`` sep and photutils detect on the
inverse-variance-weighted coadd of the background-subtracted bands (the chi-like detection image of SExtractor's
dual-image mode) and measure ``flux`` as the sum over bands of each band's aperture flux (the truth's ``flux`` is
summed over bands too); ``band="W1"`` detects and measures in that band alone. Counts cubes are summed over energy
bins for sep and photutils (they are not the gamma-ray baseline: the TS map is).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from skyfm.catalog.table import build_catalog
from skyfm.errors import SkyfmError

SEP_BOX = 64
SEP_FILTER = 3
DETECT_SIGMA = 1.5
MIN_AREA = 5
APERTURE_FWHM = 1.0  # aperture radius in PSF FWHM (near-optimal SNR for a Moffat/Gaussian)
TS_SPECTRAL_INDEX = 2.2


# ----------------------------------------------------------------------------------------------------------------
# Shared image preparation
# ----------------------------------------------------------------------------------------------------------------
def _fwhm_pix(patch, c: int) -> float:
    """The PSF FWHM of plane ``c`` in pixels: the image's seeing when the patch records it, else the nominal."""
    inst = patch.instrument_config()
    band = inst.band(patch.bands[c])
    seeing = patch.meta.get(f"seeing_{patch.bands[c]}")
    if seeing is not None:
        return float(seeing) / 3600.0 / inst.pixel_scale_deg
    return band.psf.fwhm_deg / inst.pixel_scale_deg


def _psf(patch, c: int):
    inst = patch.instrument_config()
    band = inst.band(patch.bands[c])
    seeing = patch.meta.get(f"seeing_{patch.bands[c]}")
    return band.psf if seeing is None else band.psf_with_fwhm(float(seeing) / 3600.0)


def _planes(patch, band) -> list[int]:
    if band is None:
        return list(range(patch.n_bands))
    if isinstance(band, int):
        if not 0 <= band < patch.n_bands:
            raise SkyfmError(f"band index {band} is out of range for {patch.n_bands} bands")
        return [band]
    names = [b.lower() for b in patch.bands]
    if str(band).lower() not in names:
        raise SkyfmError(f"this image has no band '{band}'; its bands are {', '.join(patch.bands)}")
    return [names.index(str(band).lower())]


def _valid_mask(patch) -> np.ndarray | None:
    m = None
    if patch.mask is not None:
        m = np.asarray(patch.mask, dtype=bool)
    bad = ~np.isfinite(patch.data).all(axis=0)
    if bad.any():
        m = bad if m is None else (m | bad)
    return m


class _Prepared:
    """Background-subtracted planes, their noise, the detection image and its PSF."""

    def __init__(self, patch, band, background: str = "sep"):
        inst = patch.instrument_config()
        self.inst = inst
        self.counts = inst.is_counts
        self.planes = _planes(patch, band)
        self.mask = _valid_mask(patch)
        data = np.nan_to_num(patch.data.astype(np.float64), nan=0.0)
        if self.counts:
            # counts cubes: one image summed over the selected bins; PSF: the count-weighted FWHM
            img = data[self.planes].sum(axis=0)
            from skyfm.catalog.likelihood import powerlaw_band_weights

            wts = powerlaw_band_weights(inst, TS_SPECTRAL_INDEX)[self.planes]
            wts = wts / wts.sum()
            fwhms = np.array([_fwhm_pix(patch, c) for c in self.planes])
            self.fwhm = float(np.sum(wts * fwhms))
            self.band_fwhm = np.array([self.fwhm])
            self.aperture_fraction = float(np.sum(wts * [_psf(patch, c).containment(
                APERTURE_FWHM * self.fwhm * inst.pixel_scale_deg) for c in self.planes]))
            subs, rmss, bkgs = [], [], []
            sub, rms, bkg_img = _background(img, self.mask, background)
            self.subs, self.rms, self.bkgs = [sub], [rms], [bkg_img]
            self.detect = sub
            self.detect_rms = rms
            self.gain = 1.0
        else:
            self.subs, self.rms, self.bkgs = [], [], []
            for c in self.planes:
                sub, rms, bkg_img = _background(data[c], self.mask, background)
                self.subs.append(sub)
                self.rms.append(rms)
                self.bkgs.append(bkg_img)
            self.band_fwhm = np.array([_fwhm_pix(patch, c) for c in self.planes])
            if len(self.planes) == 1:
                self.detect, self.detect_rms = self.subs[0], self.rms[0]
                self.fwhm = float(self.band_fwhm[0])
            else:
                w = np.array([1.0 / max(r, 1e-12) ** 2 for r in self.rms])
                self.detect = np.sum([wi * s for wi, s in zip(w, self.subs)], axis=0) / w.sum()
                self.detect_rms = float(1.0 / np.sqrt(w.sum()))
                self.fwhm = float(np.sum(w * self.band_fwhm) / w.sum())  # the coadd's effective PSF
            self.gain = float(inst.noise.get("gain", 1.0))
            self.aperture_fraction = [
                float(_psf(patch, c).containment(APERTURE_FWHM * f * inst.pixel_scale_deg))
                for c, f in zip(self.planes, self.band_fwhm)
            ]

    def aperture_photometry(self, x, y):
        """Aperture-corrected total flux and error summed over the planes (apertures of 1 FWHM of each band's
        PSF), and the SNR in one aperture of the detection image: (flux, flux_err, snr)."""
        import sep

        flux = np.zeros(len(x))
        var = np.zeros(len(x))
        if len(x) == 0:
            return flux, var, np.zeros(0)
        fracs = [self.aperture_fraction] if self.counts else self.aperture_fraction
        for sub, rms, frac, fwhm in zip(self.subs, self.rms, fracs, self.band_fwhm):
            r = max(APERTURE_FWHM * fwhm, 1.5)
            f, e, _ = sep.sum_circle(np.ascontiguousarray(sub), x, y, r, err=float(rms), gain=self.gain,
                                     mask=self.mask, subpix=5)
            flux += f / frac
            var += (e / frac) ** 2
        if len(self.subs) == 1:
            snr = flux / np.maximum(np.sqrt(var), 1e-30)
        else:
            r = max(APERTURE_FWHM * self.fwhm, 1.5)
            f, e, _ = sep.sum_circle(np.ascontiguousarray(self.detect), x, y, r, err=self.detect_rms,
                                     mask=self.mask, subpix=5)
            snr = f / np.maximum(e, 1e-30)
        return flux, np.sqrt(var), snr


def _background(img: np.ndarray, mask, method: str):
    """(background-subtracted image, global rms, background image) with sep's or photutils' mesh background."""
    img = np.ascontiguousarray(img, dtype=np.float64)
    h, w = img.shape
    box = int(min(SEP_BOX, max(8, min(h, w) // 2)))
    if method == "photutils":
        from astropy.stats import SigmaClip
        from photutils.background import Background2D, MedianBackground, StdBackgroundRMS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                bkg = Background2D(img, box, mask=mask, filter_size=(SEP_FILTER, SEP_FILTER),
                                   sigma_clip=SigmaClip(sigma=3.0), bkg_estimator=MedianBackground(),
                                   bkg_rms_estimator=StdBackgroundRMS(), exclude_percentile=50.0)
                back, rms = bkg.background, float(bkg.background_rms_median)
            except ValueError:  # too many masked pixels: fall back to sep's estimate
                return _background(img, mask, "sep")
        return img - back, max(rms, 1e-12), back
    import sep

    bkg = sep.Background(img, mask=mask, bw=box, bh=box, fw=SEP_FILTER, fh=SEP_FILTER)
    back = bkg.back()
    return img - back, max(float(bkg.globalrms), 1e-12), back


def _gaussian_filter_kernel(fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    r = int(np.ceil(2.0 * fwhm))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    return k / k.sum()


def _catalog(patch, x, y, flux, flux_err, score, score_kind, method, extra=None):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return build_catalog(x, y, flux=np.asarray(flux, dtype=np.float64),
                         flux_err=None if flux_err is None else np.asarray(flux_err, dtype=np.float64),
                         score=np.asarray(score, dtype=np.float64), wcs=patch.wcs, instrument=patch.instrument,
                         score_kind=score_kind, meta={"method": method}, extra=extra)


def _inside(x, y, shape):
    h, w = shape
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5) & np.isfinite(x) & np.isfinite(y)


# ----------------------------------------------------------------------------------------------------------------
# sep
# ----------------------------------------------------------------------------------------------------------------
def sep_detect(patch, band=None, thresh: float = DETECT_SIGMA, minarea: int = MIN_AREA, deblend_cont: float = 1e-4,
               filter: bool = True):
    """sep (SExtractor) detection and aperture photometry; ``score`` is the aperture SNR (module docstring).

    ``filter=False`` detects on the unfiltered image (crowded fields: see ``"sep-nofilter"`` in the module docstring).
    """
    import sep

    prep = _Prepared(patch, band, "sep")
    # SExtractor's default.conv; PSF-matched filters merge neighbours in crowded fields, and so, less, does this one
    kernel = sep.default_kernel if filter else None
    old = sep.get_extract_pixstack()
    sep.set_extract_pixstack(max(old, 3_000_000))
    sep.set_sub_object_limit(4096)
    try:
        objs = sep.extract(np.ascontiguousarray(prep.detect), thresh, err=prep.detect_rms, mask=prep.mask,
                           minarea=minarea, filter_kernel=kernel, filter_type="matched", deblend_nthresh=32,
                           deblend_cont=deblend_cont, clean=True, clean_param=1.0)
    except Exception as e:  # sep raises plain Exceptions on pixel-stack overflows
        raise SkyfmError(f"sep could not extract sources: {e}") from None
    x = np.asarray(objs["x"], dtype=np.float64)
    y = np.asarray(objs["y"], dtype=np.float64)
    ok = _inside(x, y, patch.data.shape[1:])
    x, y = x[ok], y[ok]
    flux, err, score = prep.aperture_photometry(x, y)
    return _catalog(patch, x, y, flux, err, score, "snr", "sep")


# ----------------------------------------------------------------------------------------------------------------
# photutils
# ----------------------------------------------------------------------------------------------------------------
def photutils_detect(patch, method: str = "dao", band=None, threshold: float | None = None):
    """photutils DAOStarFinder (``"dao"``) or image segmentation (``"segmentation"``); ``score`` is the SNR.

    ``threshold`` is in units of the background rms: default 2.5 for DAO (on the PSF-filtered image, as DAOFIND
    defines it) and 1.5 per pixel of the filtered image over 5 connected pixels for segmentation.
    """
    if method not in ("dao", "segmentation"):
        raise SkyfmError(f"photutils_detect: method should be 'dao' or 'segmentation', got {method!r}")
    prep = _Prepared(patch, band, "photutils")
    h, w = patch.data.shape[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "dao":
            from photutils.detection import DAOStarFinder

            thr = 2.5 if threshold is None else float(threshold)
            finder = DAOStarFinder(threshold=thr * prep.detect_rms, fwhm=max(prep.fwhm, 1.0), exclude_border=False,
                                   sharpness_range=(0.1, 1.2), roundness_range=(-1.0, 1.0))
            tab = finder(prep.detect, mask=prep.mask)
            if tab is None or len(tab) == 0:
                x = y = np.zeros(0)
            else:
                xc = "x_centroid" if "x_centroid" in tab.colnames else "xcentroid"
                yc = "y_centroid" if "y_centroid" in tab.colnames else "ycentroid"
                x = np.asarray(tab[xc], dtype=np.float64)
                y = np.asarray(tab[yc], dtype=np.float64)
            ok = _inside(x, y, (h, w))
            x, y = x[ok], y[ok]
            flux, err, score = prep.aperture_photometry(x, y)
            return _catalog(patch, x, y, flux, err, score, "snr", "photutils-dao")
        from astropy.convolution import convolve_fft
        from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources

        thr = DETECT_SIGMA if threshold is None else float(threshold)
        kernel = _gaussian_filter_kernel(min(prep.fwhm, 3.0))  # the photutils recipe: a ~3-px Gaussian
        conv = convolve_fft(prep.detect, kernel, normalize_kernel=True, mask=prep.mask, boundary="fill",
                            fill_value=0.0, preserve_nan=False)
        # the filtered image's noise: the rms times the kernel's noise gain
        segm = detect_sources(conv, thr * prep.detect_rms, n_pixels=MIN_AREA, mask=prep.mask)
        if segm is None:
            return _catalog(patch, [], [], [], [], [], "snr", "photutils-segmentation")
        try:
            segm = deblend_sources(conv, segm, n_pixels=MIN_AREA, n_levels=32, contrast=1e-4, progress_bar=False)
        except Exception:  # deblending can fail on pathological segments; keep the undeblended map
            pass
        err_img = np.full(prep.detect.shape, prep.detect_rms)
        cat = SourceCatalog(prep.detect, segm, convolved_data=conv, error=err_img, mask=prep.mask)
        x = np.asarray(cat.xcentroid, dtype=np.float64)
        y = np.asarray(cat.ycentroid, dtype=np.float64)
        seg_flux = np.asarray(cat.segment_flux, dtype=np.float64)
        seg_err = np.asarray(cat.segment_flux_err, dtype=np.float64)
        ok = _inside(x, y, (h, w))
        x, y, seg_flux, seg_err = x[ok], y[ok], seg_flux[ok], seg_err[ok]
        kron = np.asarray(cat.kron_flux, dtype=np.float64)[ok]
        kron_err = np.asarray(cat.kron_flux_err, dtype=np.float64)[ok]
        score = np.where(seg_err > 0, seg_flux / np.maximum(seg_err, 1e-30), 0.0)
        if len(prep.planes) == 1 or prep.counts:
            flux, err = kron, kron_err
        else:  # Kron apertures measured on the coadd do not give per-band sums; use the aperture photometry
            flux, err, _ = prep.aperture_photometry(x, y)
        bad = ~np.isfinite(flux)
        if bad.any():
            f2, e2, _ = prep.aperture_photometry(x[bad], y[bad])
            flux[bad], err[bad] = f2, e2
        score = np.nan_to_num(score)
        return _catalog(patch, x, y, flux, err, score, "snr", "photutils-segmentation")


# ----------------------------------------------------------------------------------------------------------------
# TS map (counts cubes)
# ----------------------------------------------------------------------------------------------------------------
def tsmap_detect(patch, background: str = "true", ts_min: float = 25.0, candidate_ts: float = 16.0,
                 index: float = TS_SPECTRAL_INDEX, n_iter: int = 2, min_separation_pix: float | None = None):
    """Poisson likelihood TS-map detection of point sources in a counts cube (module docstring).

    Args:
        background: ``"true"`` (the simulator's ``patch.background_image``), ``"estimated"`` (from the counts),
            or a (C, H, W) array of expected background counts.
        ts_min: the catalog threshold (TS >= 25: the 4FGL convention); rows with ``ts < ts_min`` are kept in the
            table for precision-recall sweeps only when ``candidate_ts < ts_min`` (default 16), so cut on
            ``score >= sqrt(ts_min)`` for the catalog.
        index: photon index of the test source's power law.
        n_iter: TS maps computed (each one of the residual after fitting the sources found so far).
        min_separation_pix: the least distance between two peaks of one TS map (default: the sharpest bin's
            PSF FWHM, at least 2 pixels).

    Returns:
        catalog with ``flux`` (counts, all bins), ``flux_err``, ``pos_err``, ``score`` = sqrt(TS) and ``ts``,
        ``flux_band`` per bin.
    """
    from skyfm.catalog import likelihood as lk

    inst = patch.instrument_config()
    if not inst.is_counts:
        raise SkyfmError(f"tsmap_detect works on counts cubes; {inst.name} is a {inst.kind} instrument")
    counts = np.nan_to_num(patch.data.astype(np.float64))
    psfs = [inst.band(b).psf for b in patch.bands]
    scale = inst.pixel_scale_deg
    if patch.wcs is not None:
        from skyfm.catalog.table import wcs_pixel_scale_deg

        scale = wcs_pixel_scale_deg(patch.wcs)
    kernels = lk.psf_kernels(inst, scale, psfs=psfs)
    # fits use kernels out to 16 px at most (the LAT's lowest bin holds ~90% there): 5x fewer pixels than 24
    tables = [_psf_table(p, round(scale, 12), min((k.shape[0] - 1) // 2, 16)) for p, k in zip(psfs, kernels)]
    if isinstance(background, str):
        if background == "true":
            if patch.background_image is None:
                raise SkyfmError("tsmap_detect(background='true') needs a simulated patch with background_image; "
                                 "use background='estimated' for real data")
            bkg = np.asarray(patch.background_image, dtype=np.float64)
        elif background == "estimated":
            bkg = lk.estimate_background(counts, kernels)
        else:
            raise SkyfmError(f"background should be 'true', 'estimated' or an array, got {background!r}")
    else:
        bkg = np.asarray(background, dtype=np.float64)
        if bkg.shape != counts.shape:
            raise SkyfmError(f"background has shape {bkg.shape}, the counts {counts.shape}")
    energy_edges = patch.energy_edges_kev
    wts = lk.powerlaw_band_weights(inst, index, energy_edges)
    if min_separation_pix is None:
        min_separation_pix = max(2.0, min(p.fwhm_deg for p in psfs) / scale)
    fit = None
    model = bkg
    for it in range(max(1, n_iter)):
        ts, flux = lk.ts_map(counts, model, kernels, band_weights=wts, return_flux=True)
        if fit is not None and len(fit["x"]):  # no new peak on top of a source already found
            from scipy import ndimage

            near = np.zeros(ts.shape, dtype=bool)
            near[np.clip(np.round(fit["y"]).astype(int), 0, ts.shape[0] - 1),
                 np.clip(np.round(fit["x"]).astype(int), 0, ts.shape[1] - 1)] = True
            near = ndimage.binary_dilation(near, iterations=int(np.ceil(min_separation_pix)))
            ts = np.where(near, 0.0, ts)
        px, py, _ = lk.find_peaks(ts, candidate_ts, min_separation_pix)
        if len(px) == 0:
            if fit is None:
                continue
            break
        iy = np.clip(np.round(py).astype(int), 0, ts.shape[0] - 1)
        ix = np.clip(np.round(px).astype(int), 0, ts.shape[1] - 1)
        # new sources are fitted against the background plus the sources already fitted (held fixed)
        new = lk.fit_point_sources(counts, model, tables, px, py, flux[iy, ix], n_pass=1)
        keep = new["ts"] >= 0.5 * min(candidate_ts, ts_min)
        new = {k: v[keep] for k, v in new.items()}
        fit = new if fit is None else {k: np.concatenate([fit[k], new[k]]) for k in fit}
        if it < n_iter - 1:
            model = lk.add_point_sources(model, tables, new["x"], new["y"], new["flux_band"])
    xs = np.zeros(0) if fit is None else fit["x"]
    if fit is None or len(xs) == 0:
        return _catalog(patch, [], [], [], [], [], "sqrt_ts", f"tsmap-{background if isinstance(background, str) else 'given'}",
                        extra={"ts": np.zeros(0)})
    # drop duplicates that converged onto one source (keep the higher TS)
    order = np.argsort(-fit["ts"], kind="stable")
    keep = np.ones(len(xs), dtype=bool)
    from scipy.spatial import cKDTree

    tree = cKDTree(np.stack([fit["x"], fit["y"]], axis=1))
    for i in order:
        if not keep[i]:
            continue
        for j in tree.query_ball_point([fit["x"][i], fit["y"][i]], 0.5 * min_separation_pix):
            if j != i and fit["ts"][j] <= fit["ts"][i]:
                keep[j] = False
    keep &= fit["ts"] >= candidate_ts
    keep &= _inside(fit["x"], fit["y"], counts.shape[1:])
    fit = {k: v[keep] for k, v in fit.items()}
    order = np.argsort(-fit["ts"], kind="stable")
    fit = {k: v[order] for k, v in fit.items()}
    t = build_catalog(fit["x"], fit["y"], pos_err_pix=fit["pos_err_pix"], flux=fit["flux"], flux_err=fit["flux_err"],
                      score=np.sqrt(fit["ts"]), wcs=patch.wcs, instrument=inst, score_kind="sqrt_ts",
                      meta={"method": f"tsmap-{background if isinstance(background, str) else 'given'}",
                            "ts_min": float(ts_min), "index": float(index)},
                      extra={"ts": fit["ts"], "flux_band": fit["flux_band"], "flux_band_err": fit["flux_band_err"]})
    return t


@lru_cache(maxsize=64)
def _psf_table(psf, scale: float, radius: int):
    from skyfm.catalog.likelihood import PSFTable

    return PSFTable.from_psf(psf, scale, radius)


BASELINES = {
    "sep": lambda patch, **kw: sep_detect(patch, **kw),
    "sep-nofilter": lambda patch, **kw: sep_detect(patch, **{"filter": False, "minarea": 3, **kw}),
    "photutils-dao": lambda patch, **kw: photutils_detect(patch, method="dao", **kw),
    "photutils-segmentation": lambda patch, **kw: photutils_detect(patch, method="segmentation", **kw),
    "tsmap-true": lambda patch, **kw: tsmap_detect(patch, background="true", **kw),
    "tsmap-estimated": lambda patch, **kw: tsmap_detect(patch, background="estimated", **kw),
}

__all__ = ["BASELINES", "photutils_detect", "sep_detect", "tsmap_detect"]
