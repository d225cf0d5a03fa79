"""Configuration of a :class:`~skyfm.heads.detector.SourceDetector`, saved as ``config.json`` beside the weights.

Diffusers-style: the config is a plain dataclass that round-trips through JSON, and it alone (with the backbone's
:class:`~skyfm.foundation.config.FoundationConfig`, nested under ``foundation``) rebuilds the network before the
weights are loaded. One :class:`InstrumentHeadConfig` per instrument: the light heads are per instrument (their
band count and class names differ), the backbone and the convolutional trunk are shared.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError

DETECTOR_FORMAT = "skyfm-detector"
DETECTOR_VERSION = 1

# Classes each kind of instrument is trained to tell apart (from the simulators' truth `class_group` / `class`).
COUNTS_CLASSES = ("agn", "pulsar", "other")
CCD_CLASSES = ("star", "galaxy")


@dataclass
class InstrumentHeadConfig:
    """The light heads of one instrument.

    Attributes:
        name: instrument name (``load_instrument(name)``), or a user's telescope name.
        kind: ``counts`` or ``ccd`` (decides flux units and the Poisson likelihood refinement).
        bands: band names, in the order of the per-band flux outputs.
        class_names: labels of the class logits.
        heat_sigma_pix: width (pixels) of the Gaussian centre targets; set from the sharpest band's PSF.
        pixel_scale_deg: the instrument's native pixel scale (extension outputs are learned in these pixels).
        spec: for a telescope that is not built in, its YAML mapping, so the saved detector is self-contained.
        min_score: this instrument's detection threshold (chosen on validation patches), else the detector's.
        unconfirmed_min_score: CCD images with the PSF-fit refinement: the threshold for a detection the fit does not
            confirm (its fit failed or is below SNR 5: catalog ``fit`` 0), higher than ``min_score`` where the
            network's faint peaks that no fit backs are mostly false (chosen on validation images,
            ``benchmarks/choose_unconfirmed.py``). None: ``min_score`` for every detection.
        unconfirmed_max_crowding: ... only where the detection's ``crowding`` is below this (in crowded places a
            fit fails on blends of real stars, in sparse ones on noise); None: everywhere.
        unconfirmed_max_chi2: ... and a fitted detection whose fit leaves a reduced chi-square (catalog
            ``fit_chi2``) above this counts as unconfirmed too: the light in its box is no point source (a saturated
            star's halo, a satellite trail, a bright galaxy broken into peaks) and the fit's significance means
            nothing there. None: every fit that reaches SNR 5 confirms.
        flux_err_scale, pos_err_scale: multipliers of the network's ``flux_err`` (and ``flux_band_err``) and
            ``pos_err``, calibrated on validation patches (:func:`skyfm.finetune.ship.calibrate_errors`) so that
            ``flux +- flux_err`` holds 68% of true fluxes and the median separation is 1.177 ``pos_err`` (the 2-D
            Gaussian value); 1.0 = as the network predicts them.
        fit_flux_err_scale, fit_pos_err_scale: the same for the errors of the Poisson likelihood fit of counts cubes
            (:func:`skyfm.detect.refine_counts`), which replace the network's there.
        fit_flux_err_floor, fit_pos_err_floor: systematic errors added in quadrature to the PSF fit's statistical
            ones on CCD images (:func:`skyfm.detect.refine_ccd_tile`): a fraction of the flux, and native pixels.
            Crowding, the PSF model and the background add an error that does not shrink with the SNR, so a floor
            (not a factor) is what makes bright and faint sources' errors honest together.
        fit_flux_err_floor_crowding: the part of that relative flux floor that grows with crowding: the floor of a
            PSF-fitted CCD flux is ``hypot(fit_flux_err_floor, fit_flux_err_floor_crowding * crowding)``, with
            ``crowding`` the density of detected neighbours per FWHM^2 (catalog column ``crowding``,
            :func:`skyfm.catalog.psf_fit.crowding`): a star may hide a companion too close to split, more likely
            the denser the field (0: one floor for every source).
        fit_flux_err_scale_crowding: counts cubes' likelihood-fit flux errors (against a background model) grow
            with the crowding: their statistical part is ``fit_flux_err_scale * (1 + fit_flux_err_scale_crowding *
            crowding)`` times the fit's, with ``crowding`` the detected neighbours per FWHM^2 of the sharpest bin
            (catalog column ``crowding``): the sources too faint to detect, which add to a fitted flux, are the
            more the denser the detected ones (0: one scale for every source).
        fit_flux_err_blend: PSF-fitted CCD rows' flux errors also hold ``fit_flux_err_blend * L``, in quadrature,
            with ``L`` the overlapping light of the detected neighbours (catalog column ``flux_blend``,
            :func:`skyfm.catalog.psf_fit.neighbour_light`): how a fit shares light between blended stars is as
            uncertain as the PSF model and the positions are, which a relative floor of the star's own flux misses
            for a faint star beside a bright one (0: none; chosen on validation patches, ``python -m
            skyfm.finetune.ship --calibrate-errors``).
        unfitted_flux_err_scale, unfitted_flux_err_confusion: the flux errors of the rows of a refined CCD catalog
            that keep the network's flux (catalog column ``fit`` < 2: the PSF fit was not significant, or the source
            is not point-like): ``hypot(unfitted_flux_err_scale * network error, unfitted_flux_err_confusion *
            flux_confusion)``, with ``flux_confusion`` the scatter of PSF fluxes at blank places of the residual
            image around the source (the light of undetected neighbours; catalog column ``flux_confusion``). The
            network's own scale (``flux_err_scale``) is chosen on unrefined catalogs, where such rows are a few
            among many; in a cluster core they are the faint stars whose light nobody assigns, and a factor on the
            network's errors alone cannot cover them without over-covering every other sky. None / 0: the
            network's scale, no confusion term (unrefined catalogs always keep that).
        fit_flux_err_scale_estbg, fit_flux_err_floor_estbg, fit_pos_err_scale_estbg: counts cubes whose background
            was estimated from the counts (no model given): the fit's errors then also carry the estimate's, so
            they get their own scales and floor (None: those of a fit against a model).
        psf_fit: whether CCD detections of this instrument are refined by the PSF fit (chosen on validation
            seeds; every shipped CCD head has it on: Hubble's was off while the fit made its positions worse, before
            the neighbours' wings and light entered the fit).
        mask_cosmic_rays: CCD images: leave the cosmic-ray pixels that L.A.Cosmic finds
            (:func:`skyfm.catalog.cosmics.cosmic_ray_mask`) out of the PSF fit (chosen on validation seeds: on for
            single exposures, Hubble's and MeerLICHT's, and for the WISE coadds since their hot pixels, which it
            finds too, were seen setting fits; ~0.5-1 s per Mpix per band).
        drop_trails: CCD images: drop the detections on satellite trails
            (:func:`skyfm.detect.drop_trail_detections`) unless the caller says otherwise (chosen on validation
            seeds: on for MeerLICHT and Hubble, single exposures that satellites cross).
        kron_excess_min: CCD images: a refined source whose light beyond its PSF model (the Kron aperture flux minus
            the PSF flux, aperture-corrected, over its error: catalog column ``kron_excess``) reaches this takes the
            Kron aperture flux (:mod:`skyfm.catalog.kron`; catalog ``fit`` 3), its error times
            ``kron_flux_err_scale`` (None: 1) with the relative floor ``kron_flux_err_floor`` (None: 0; what a Kron
            aperture misses of a galaxy's light depends on its profile) in quadrature, and an extension from its
            Kron radius. Rows are measured (and may take it) only where their ``crowding`` (detected neighbours
            per FWHM^2) is below ``kron_max_crowding`` (None: :data:`skyfm.detect.KRON_MAX_CROWDING`): in a
            crowded field an aperture holds its neighbours' misfit light and the PSF flux is the better one.
            ``kron_excess_min`` None: every row keeps the PSF or network flux (the Kron columns are still written).
        kron_centroid: CCD images: the rows that take the Kron flux (``fit`` 3, and residual-search finds that do)
            also take the windowed centroid of their light (:func:`skyfm.catalog.kron.kron_photometry`'s ``x_win``,
            ``y_win``: SExtractor's ``XWIN_IMAGE``) as their position, where a PSF fit sees only a galaxy's core
            (chosen on validation field images: on for MeerLICHT and Hubble, whose galaxies are resolved; off for
            WISE, whose are barely).
        class_calibration: CCD images: the class probabilities of rows with a Kron measurement, from a logistic
            regression on the network's logit and the Kron columns (:func:`skyfm.heads.classification.
            calibrate_class_prob`): ``{"class": "galaxy", "intercept": b, "coef": {feature: c, ...}}`` with
            features from :data:`skyfm.heads.classification.CALIBRATION_FEATURES`, fitted on validation images
            (``benchmarks/choose_class.py``). None: the network's probabilities everywhere.
        spectral_classifier: counts cubes: the class probabilities of rows the likelihood fit measured, from a
            multinomial logistic regression on the shape of their spectrum across the energy bins
            (:func:`skyfm.heads.classification.spectral_class_prob`): ``{"features": [...], "mean": [...],
            "scale": [...], "coef": [[...]], "intercept": [...]}`` (features from :data:`skyfm.heads.
            classification.SPECTRAL_FEATURES`, classes in ``class_names``' order), fitted on validation images
            (``benchmarks/choose_spectral_class.py``). None: the network's probabilities.
            ``spectral_classifier_estbg``: the same for fits against a background estimated from the counts (no
            model given), whose band errors differ; None: the network's probabilities there.
        residual_search: CCD images: after the PSF fit, look in its residual image for faint or diffuse sources that no
            detection stands for (:func:`skyfm.catalog.residual_search.find_residual_sources`, catalog ``fit`` 4):
            ``{"min_snr": s, "intercept": a, "slope": b, "flux_err_floor": f, "kron_excess_min": k,
            "pos_err_scale": p}``: the smallest peak significance of a find, its ``score``
            ``1 / (1 + exp(-(a + b ln snr)))``, the relative floor of its flux error, the ``kron_excess`` from which
            a find takes its Kron flux rather than its PSF flux, and the factor on its position error (chosen on
            validation images, ``benchmarks/choose_residual_search.py``). None: no search.
        companion_search: CCD images: before the PSF fit, look in a first fit's residual image for point sources
            beside the detections that the network took as one with them (blends in crowded fields; catalog ``fit``
            5, :func:`skyfm.detect.find_companions`): ``{"min_snr": s, "intercept": a, "slope": b, "min_crowding":
            c}``: the smallest peak significance of a candidate, the ``score`` ``1 / (1 + exp(-(a + b ln fit_snr)))``
            of a companion the fit confirms, and the ``crowding`` (detected neighbours per PSF FWHM^2) it needs (in
            sparse fields a galaxy's light beside its point model is no second star; chosen on validation images,
            ``benchmarks/choose_companions.py``). None: no search.
        band_subsets: images with only some of the head's bands (a WISE W1 image; the networks are trained on
            every band of an instrument whose simulations draw them all): ``{"W1": {"min_score": m,
            "unconfirmed_min_score": u}, "W1+W2": {...}}``, keyed by the image's bands joined with ``+`` in the
            head's order, the thresholds chosen for that subset on validation images
            (``benchmarks/choose_band_subsets.py``; :meth:`for_bands`), and error scales and floors calibrated on
            images of those bands (:data:`SUBSET_SCALE_KEYS`, :data:`SUBSET_FLOOR_KEYS`; ``python -m
            skyfm.finetune.ship --calibrate-errors --bands ...``). A subset not listed keeps the head's own.
        likelihood_passes: counts cubes with a background model: how many times likelihood selection looks for
            sources (:func:`skyfm.detect.detect_patch`; chosen on validation seeds); None: the module default,
            :data:`skyfm.detect.LIKELIHOOD_PASSES`.
        likelihood_extension_test: counts cubes with a background model: test every source for extension
            (:func:`skyfm.detect.apply_extension_test`) unless the caller says otherwise (chosen on validation
            seeds).
        likelihood_without_model: counts cubes without a background model: select by the fitted TS against the
            estimated background too, not by the network's probability (:func:`skyfm.detect.resolve_selection`;
            chosen on validation seeds: CTAO F1 0.748 -> 0.788 over 20 plane cubes, while Fermi-LAT lost 0.03-0.10
            outside the ic-halo plane).
        likelihood_keep_far_moves: likelihood selection keeps a candidate's fit that moved farther than
            :func:`skyfm.detect._max_fit_move_pix` where no other fit is near where it ended and a network peak is
            (:func:`skyfm.detect.refine_counts`, ``keep_far_moves``; chosen on validation seeds, two sets of 8
            cubes: Fermi-LAT plane F1 +0.007 / +0.006, association of 10-20 sigma point sources 0.852 -> 0.887 /
            0.764 -> 0.782; CTAO's fits run onto its extended sources' pieces, F1 -0.001 / -0.004).
        likelihood_split_test: likelihood selection fits each bright source again as two and keeps the pair where
            it fits enough better (:func:`skyfm.detect.apply_split_test`: blends in crowded fields, which TS maps
            do not resolve; chosen on validation seeds, docs/benchmarks.md Run 43).
        likelihood_extension_first: with ``likelihood_passes`` > 1 and the extension test, test the first pass's
            sources for extension before the next passes look for more, so that those passes search the background
            plus the extended sources as they are, not plus a point where each is (whose rim comes back as false
            sources), and test the new ones against that (:func:`skyfm.detect._detect_likelihood`; chosen on
            validation seeds, docs/benchmarks.md Run 48: CTAO plane F1 +0.019 / +0.025 over one pass; on Fermi-LAT,
            against its extension test at the end, -0.004 at high latitude and -0.006 in the plane).
        likelihood_model_error: the background model's fractional error (0.03 for Fermi-LAT, the 4FGL catalog's);
            likelihood selection then also takes the candidates of the TS map of a likelihood weighted for it
            (:func:`skyfm.catalog.likelihood.likelihood_weights`) and keeps those at weighted TS >= min_ts
            (:func:`skyfm.detect.add_ts_map_candidates`; docs/benchmarks.md Run 45). None: not.
    """

    name: str
    kind: str
    bands: list[str]
    class_names: list[str]
    heat_sigma_pix: float = 1.0
    pixel_scale_deg: float = 1.0
    spec: dict | None = None
    min_score: float | None = None
    unconfirmed_min_score: float | None = None
    unconfirmed_max_crowding: float | None = None
    unconfirmed_max_chi2: float | None = None
    flux_err_scale: float = 1.0
    pos_err_scale: float = 1.0
    fit_flux_err_scale: float = 1.0
    fit_pos_err_scale: float = 1.0
    fit_flux_err_floor: float = 0.0
    fit_pos_err_floor: float = 0.0
    fit_flux_err_floor_crowding: float = 0.0
    fit_flux_err_scale_crowding: float = 0.0
    fit_flux_err_blend: float = 0.0
    unfitted_flux_err_scale: float | None = None
    unfitted_flux_err_confusion: float = 0.0
    fit_flux_err_scale_estbg: float | None = None
    fit_flux_err_floor_estbg: float | None = None
    fit_pos_err_scale_estbg: float | None = None
    psf_fit: bool = True
    mask_cosmic_rays: bool = False
    drop_trails: bool = False
    kron_excess_min: float | None = None
    kron_flux_err_scale: float | None = None
    kron_flux_err_floor: float | None = None
    kron_max_crowding: float | None = None
    kron_centroid: bool = False
    class_calibration: dict | None = None
    spectral_classifier: dict | None = None
    spectral_classifier_estbg: dict | None = None
    residual_search: dict | None = None
    companion_search: dict | None = None
    band_subsets: dict | None = None
    likelihood_passes: int | None = None
    likelihood_extension_test: bool = False
    likelihood_without_model: bool = False
    likelihood_keep_far_moves: bool = False
    likelihood_split_test: bool = False
    likelihood_extension_first: bool = False
    likelihood_model_error: float | None = None

    def _number(self, name: str, default: float, allow_zero: bool) -> float:
        """Field ``name`` as a finite float (``default`` when None); positive, or >= 0 with ``allow_zero``."""
        raw = getattr(self, name)
        try:
            v = default if raw is None else float(raw)
        except (TypeError, ValueError):
            v = float("nan")
        if not ((0.0 <= v if allow_zero else 0.0 < v) and v < float("inf")):
            need = "a number >= 0" if allow_zero else "a positive number"
            raise SkyfmError(f"head {self.name}: {name} should be {need}, got {raw!r}")
        return v

    def _fit_key(self, key: str, estimated: bool) -> str:
        """``key`` or, for a fit against an estimated background, its ``_estbg`` twin when that is set."""
        return f"{key}_estbg" if estimated and getattr(self, f"{key}_estbg", None) is not None else key

    def error_floors(self, estimated: bool = False) -> tuple[float, float]:
        """(relative flux, position in pixels) floors of the fit's errors (the PSF fit of CCD images, the likelihood
        fit of counts cubes), added in quadrature; ``estimated``: a counts cube's background estimated from it."""
        return (self._number(self._fit_key("fit_flux_err_floor", estimated), 0.0, allow_zero=True),
                self._number("fit_pos_err_floor", 0.0, allow_zero=True))

    def flux_floor_per_crowding(self) -> float:
        """``fit_flux_err_floor_crowding``: the relative flux floor per detected neighbour per FWHM^2 (CCD fits)."""
        return self._number("fit_flux_err_floor_crowding", 0.0, allow_zero=True)

    def flux_scale_per_crowding(self) -> float:
        """``fit_flux_err_scale_crowding``: how much the statistical flux errors of counts-cube fits grow per detected
        neighbour per FWHM^2."""
        return self._number("fit_flux_err_scale_crowding", 0.0, allow_zero=True)

    def blend_flux_error_weight(self) -> float:
        """``fit_flux_err_blend``: the share of the neighbours' overlapping light that the flux errors of PSF-fitted
        CCD rows hold (in quadrature)."""
        return self._number("fit_flux_err_blend", 0.0, allow_zero=True)

    def unfitted_flux_error_terms(self) -> tuple[float, float]:
        """(scale of the network's flux error, weight of the confusion scatter) for the rows of a refined CCD catalog
        that keep the network's flux: ``unfitted_flux_err_scale`` (default the network's ``flux_err_scale``) and
        ``unfitted_flux_err_confusion`` (default 0)."""
        default = self._number("flux_err_scale", 1.0, allow_zero=False)
        return (self._number("unfitted_flux_err_scale", default, allow_zero=False),
                self._number("unfitted_flux_err_confusion", 0.0, allow_zero=True))

    def unconfirmed_threshold(self, min_score: float) -> float:
        """The threshold of the detections the PSF fit does not confirm: ``unconfirmed_min_score`` (a number in
        (0, 1]) or, when unset or lower, ``min_score``."""
        v = self._number("unconfirmed_min_score", min_score, allow_zero=False)
        if v > 1.0:
            raise SkyfmError(f"head {self.name}: unconfirmed_min_score should be a probability in (0, 1], "
                             f"got {self.unconfirmed_min_score!r}")
        return max(v, float(min_score))

    def unconfirmed_crowding_limit(self) -> float:
        """``unconfirmed_max_crowding`` (a number >= 0), inf when unset."""
        if self.unconfirmed_max_crowding is None:
            return float("inf")
        return self._number("unconfirmed_max_crowding", 0.0, allow_zero=True)

    def unconfirmed_chi2_limit(self) -> float:
        """``unconfirmed_max_chi2`` (a positive number), inf when unset."""
        if self.unconfirmed_max_chi2 is None:
            return float("inf")
        return self._number("unconfirmed_max_chi2", 1.0, allow_zero=False)

    def kron_settings(self, default_max_crowding: float) -> tuple[float, float, float, float]:
        """(``kron_excess_min``, ``kron_flux_err_scale``, ``kron_flux_err_floor``, ``kron_max_crowding``): inf
        (never), 1, 0 and ``default_max_crowding`` when unset."""
        excess = float("inf") if self.kron_excess_min is None else self._number("kron_excess_min", 0.0, True)
        crowd = self._number("kron_max_crowding", default_max_crowding, allow_zero=True)
        return (excess, self._number("kron_flux_err_scale", 1.0, allow_zero=False),
                self._number("kron_flux_err_floor", 0.0, allow_zero=True), crowd)

    def residual_search_terms(self) -> dict | None:
        """``residual_search`` checked (``min_snr`` a positive number, finite ``intercept`` and ``slope``, optional
        ``flux_err_floor`` >= 0, default 0, ``kron_excess_min``, default 2, and ``pos_err_scale`` > 0, default 1),
        as floats, or None when unset."""
        cfg = self.residual_search
        if cfg is None:
            return None
        try:
            out = {k: float(cfg[k]) for k in ("min_snr", "intercept", "slope")}
            out["flux_err_floor"] = float(cfg.get("flux_err_floor", 0.0))
            out["kron_excess_min"] = float(cfg.get("kron_excess_min", 2.0))
            out["pos_err_scale"] = float(cfg.get("pos_err_scale", 1.0))
            ok = (set(cfg) <= set(out) and all(np.isfinite(v) for k, v in out.items() if k != "kron_excess_min")
                  and out["min_snr"] > 0 and out["flux_err_floor"] >= 0 and not np.isnan(out["kron_excess_min"])
                  and out["pos_err_scale"] > 0)
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise SkyfmError(f"head {self.name}: residual_search should be {{'min_snr': a positive number, "
                             f"'intercept': a number, 'slope': a number[, 'flux_err_floor': a number >= 0, "
                             f"'kron_excess_min': a number, 'pos_err_scale': a number > 0]}}, got {cfg!r}")
        return out

    def companion_search_terms(self) -> dict | None:
        """``companion_search`` checked (``min_snr`` a positive number, finite ``intercept`` and ``slope``, optional
        ``min_crowding`` >= 0, default 0), as floats, or None when unset."""
        cfg = self.companion_search
        if cfg is None:
            return None
        try:
            out = {k: float(cfg[k]) for k in ("min_snr", "intercept", "slope")}
            out["min_crowding"] = float(cfg.get("min_crowding", 0.0))
            ok = (set(cfg) <= set(out) and all(np.isfinite(v) for v in out.values()) and out["min_snr"] > 0
                  and out["min_crowding"] >= 0)
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise SkyfmError(f"head {self.name}: companion_search should be {{'min_snr': a positive number, "
                             f"'intercept': a number, 'slope': a number[, 'min_crowding': a number >= 0]}}, "
                             f"got {cfg!r}")
        return out

    def for_bands(self, bands) -> "InstrumentHeadConfig":
        """This head for an image of ``bands``: a copy with the thresholds and error terms ``band_subsets`` gives
        for that subset of its bands, else the head itself. (All of its bands are a key too, for a head trained on
        images of fewer: MeerLICHT's, one band per image.)"""
        if not self.band_subsets:
            return self
        key = subset_key(self.bands, bands)
        override = self.band_subsets.get(key)
        if override is None:
            return self
        try:
            values = {k: float(v) for k, v in override.items()}
        except (AttributeError, TypeError, ValueError):
            values = None
        if values is None or not all(_subset_value_ok(k, v) for k, v in values.items()):
            raise SkyfmError(f"head {self.name}: band_subsets[{key!r}] should map "
                             f"{' and/or '.join(SUBSET_THRESHOLD_KEYS)} to probabilities in (0, 1], "
                             f"{', '.join(SUBSET_SCALE_KEYS)} to positive numbers and "
                             f"{', '.join(SUBSET_FLOOR_KEYS)} to numbers >= 0, got {override!r}")
        return dataclasses.replace(self, **values)

    def class_calibration_terms(self) -> dict | None:
        """``class_calibration`` checked (a known class, a finite intercept, known features with finite
        coefficients), or None when unset."""
        cal = self.class_calibration
        if cal is None:
            return None
        from skyfm.heads.classification import CALIBRATION_FEATURES

        bad = f"head {self.name}: class_calibration should be {{'class': one of {self.class_names}, 'intercept': " \
              f"a number, 'coef': {{feature: number}} with features from {sorted(CALIBRATION_FEATURES)}}}, got {cal!r}"
        try:
            ok = (cal["class"] in self.class_names and np.isfinite(float(cal["intercept"]))
                  and isinstance(cal["coef"], dict) and set(cal["coef"]) <= set(CALIBRATION_FEATURES)
                  and all(np.isfinite(float(v)) for v in cal["coef"].values()))
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise SkyfmError(bad)
        return cal

    def spectral_classifier_terms(self, estimated: bool = False) -> dict | None:
        """``spectral_classifier`` (``estimated``: ``spectral_classifier_estbg``, for fits against a background
        estimated from the counts) checked (known features; mean, scale, coef and intercept of matching, finite
        shapes, one coefficient column per class), or None when unset."""
        spec = self.spectral_classifier_estbg if estimated else self.spectral_classifier
        if spec is None:
            return None
        from skyfm.heads.classification import SPECTRAL_FEATURES

        K = len(self.class_names)
        bad = (f"head {self.name}: spectral_classifier should hold 'features' from {sorted(SPECTRAL_FEATURES)}, "
               f"'mean' and 'scale' (one per feature column: {self.n_bands} for 'shape', {K} for 'net'), 'coef' "
               f"(columns x {K} classes) and 'intercept' ({K}), all finite")
        try:
            names = list(spec["features"])
            n = sum({"shape": self.n_bands, "net": K}.get(f, 1) for f in names)
            mean, scale = np.asarray(spec["mean"], float), np.asarray(spec["scale"], float)
            coef, intercept = np.asarray(spec["coef"], float), np.asarray(spec["intercept"], float)
            ok = (set(names) <= set(SPECTRAL_FEATURES) and mean.shape == scale.shape == (n,)
                  and coef.shape == (n, K) and intercept.shape == (K,) and np.all(scale > 0)
                  and all(np.all(np.isfinite(a)) for a in (mean, scale, coef, intercept)))
        except (TypeError, ValueError, KeyError):
            ok = False
        if not ok:
            raise SkyfmError(bad)
        return spec

    def error_scales(self, fit: bool = False, estimated: bool = False) -> tuple[float, float]:
        """(flux_err, pos_err) multipliers: those of the network's errors, or with ``fit`` of the likelihood fit's
        (against a background model, or with ``estimated`` one estimated from the counts)."""
        if not fit:
            return (self._number("flux_err_scale", 1.0, allow_zero=False),
                    self._number("pos_err_scale", 1.0, allow_zero=False))
        return (self._number(self._fit_key("fit_flux_err_scale", estimated), 1.0, allow_zero=False),
                self._number(self._fit_key("fit_pos_err_scale", estimated), 1.0, allow_zero=False))

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def n_outputs(self) -> int:
        """Channels of this instrument's output convolution (see :data:`skyfm.heads.detector.CHANNELS`)."""
        return 1 + 2 + 1 + 2 + 2 * self.n_bands + len(self.class_names) + 1

    @classmethod
    def for_instrument(cls, inst) -> "InstrumentHeadConfig":
        """Heads for a :class:`~skyfm.instruments.Instrument` (or its name / YAML path)."""
        from skyfm.instruments import load_instrument

        from skyfm.instruments import list_instruments

        inst = load_instrument(inst)
        spec = None
        if inst.name not in list_instruments() and inst.source and Path(inst.source).is_file():
            from skyfm.utils import read_yaml

            spec = read_yaml(inst.source, "instrument file")
        scale = inst.pixel_scale_deg
        fwhm_pix = min(b.psf.fwhm_deg for b in inst.bands) / scale
        # Narrow targets keep the peaks of blended pairs apart; never below one pixel so a peak is learnable.
        sigma = float(min(max(0.35 * fwhm_pix, 1.0), 2.0))
        return cls(name=inst.name, kind="counts" if inst.is_counts else "ccd", bands=[b.name for b in inst.bands],
                   class_names=list(COUNTS_CLASSES if inst.is_counts else CCD_CLASSES), heat_sigma_pix=sigma,
                   pixel_scale_deg=float(scale), spec=spec)

    def instrument(self):
        """The :class:`~skyfm.instruments.Instrument` of this head (built in, or rebuilt from ``spec``)."""
        from skyfm.instruments import load_instrument
        from skyfm.instruments.instrument import parse_instrument

        if self.spec is not None:
            return parse_instrument(self.spec, f"<{self.name} in the detector config>")
        return load_instrument(self.name)


@dataclass
class DetectorConfig:
    """Everything that defines a SourceDetector besides its backbone.

    Attributes:
        heads: one :class:`InstrumentHeadConfig` per instrument the detector knows.
        trunk_channels: width of the shared convolutional trunk on the dense features.
        trunk_depth: 3x3 conv layers in the trunk.
        min_target_snr: true sources at least this significant are positives of the heatmap.
        ignore_snr: sources between this and ``min_target_snr`` are neither positives nor negatives.
        contaminant_weight: extra weight of negatives on contaminant pixels (cosmic rays, trails, ...).
        focal_alpha, focal_beta: CenterNet focal-loss exponents.
        loss_weights: weights of the loss terms (heat, offset, flux, band_flux, class, extension).
        tile_size: default tile side for detection on large images (multiple of the token stride).
        tile_overlap: default overlap of detection tiles, pixels.
        min_score: default detection threshold.
        training: how the weights were made (command, recipe, seeds); informational.
    """

    heads: dict[str, InstrumentHeadConfig] = field(default_factory=dict)
    trunk_channels: int = 48
    trunk_depth: int = 2
    min_target_snr: float = 3.0
    ignore_snr: float = 1.5
    contaminant_weight: float = 4.0
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "heat": 1.0, "offset": 1.0, "flux": 0.5, "band_flux": 0.25, "class": 0.5, "extension": 0.5})
    tile_size: int = 128
    tile_overlap: int = 32
    min_score: float = 0.3
    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"format": DETECTOR_FORMAT, "version": DETECTOR_VERSION}
        d.update(dataclasses.asdict(self))
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "DetectorConfig":
        if not isinstance(data, dict) or data.get("format") != DETECTOR_FORMAT:
            raise SkyfmError(f"{source} is not a skyfm detector config (no format: {DETECTOR_FORMAT})")
        if int(data.get("version", 0)) > DETECTOR_VERSION:
            raise SkyfmError(f"{source} was written by a newer skyfm (detector config version {data['version']})")
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SkyfmError(f"{source}: unknown detector config key(s) {', '.join(unknown)}")
        try:
            heads = {k: InstrumentHeadConfig(**v) for k, v in (data.pop("heads", None) or {}).items()}
            return cls(heads=heads, **data)
        except TypeError as e:
            raise SkyfmError(f"{source}: bad detector head config ({e})") from None


# the calibrated error terms (skyfm.finetune.ship.calibrate_errors writes them): scales of the network's and the
# fits' errors; the fits' systematic errors, added in quadrature (the CCD flux floor's part that grows with crowding,
# the blended CCD rows' share of their neighbours' light)
SCALE_KEYS = ("flux_err_scale", "pos_err_scale", "fit_flux_err_scale", "fit_pos_err_scale")
FLOOR_KEYS = ("fit_flux_err_floor", "fit_pos_err_floor", "fit_flux_err_floor_crowding", "fit_flux_err_scale_crowding",
              "fit_flux_err_blend")
# refined CCD rows that keep the network's flux: a scale of its error and a weight of the confusion noise
UNFITTED_SCALE_KEYS, UNFITTED_WEIGHT_KEYS = ("unfitted_flux_err_scale",), ("unfitted_flux_err_confusion",)
SUBSET_THRESHOLD_KEYS = ("min_score", "unconfirmed_min_score")
# an image of other bands than the training images' (all six of MeerLICHT's) has its own error calibration too
SUBSET_SCALE_KEYS = SCALE_KEYS + UNFITTED_SCALE_KEYS
SUBSET_FLOOR_KEYS = FLOOR_KEYS + UNFITTED_WEIGHT_KEYS


def _subset_value_ok(key: str, value: float) -> bool:
    if key in SUBSET_THRESHOLD_KEYS:
        return 0.0 < value <= 1.0
    if key in SUBSET_SCALE_KEYS:
        return 0.0 < value < float("inf")
    return key in SUBSET_FLOOR_KEYS and 0.0 <= value < float("inf")


def subset_key(head_bands, bands) -> str:
    """``band_subsets``' key of an image's bands: those of the head it has, joined with ``+`` in the head's order."""
    have = set(bands)
    return "+".join(b for b in head_bands if b in have)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkyfmError(f"{path}: cannot read the {what} ({e})") from None


__all__ = ["CCD_CLASSES", "COUNTS_CLASSES", "DetectorConfig", "InstrumentHeadConfig"]
