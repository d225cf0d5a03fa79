"""The optical / infrared CCD image simulator: stars, galaxies, sky, CCD noise and contaminants, with truth.

:func:`simulate_ccd_patch` makes one :class:`~skyfm.data.Patch` of a ``kind: ccd`` instrument (MeerLICHT, Hubble,
WISE, or a user's YAML) on a TAN grid:

1. **Grid.** A north-up, east-left TAN WCS (ICRS) centred on ``center`` (drawn from the scene's Galactic
   latitudes when not given), ``size`` pixels, the YAML's pixel scale.
2. **Bands.** ``simulation.bands_per_image`` in the YAML: ``1`` (MeerLICHT: each filter is a separate image;
   drawn with ``simulation.band_weights``) or ``all`` (Hubble, WISE: every band on one aligned grid).
3. **Scene.** Stars and galaxies are counted on the sky in a reference r band (:mod:`.stars`, :mod:`.galaxies`),
   down to ``simulation.extra_depth_mag`` (default 1.5) magnitudes beyond the deepest band's 5-sigma
   point-source limit, so each instrument shows the sky its depth allows. Scenes (:data:`SCENES`): ``empty``,
   ``field`` (high latitude), ``crowded`` (Galactic plane), ``cluster`` (a King-profile globular cluster over a
   field); drawn with ``simulation.scene_weights`` when not given. Sources centred in a margin around the image
   spill their light in; the truth lists those centred inside.
4. **Photometry.** Band zero points (AB mag of 1 e-/s) and exposure times give electrons; ADU = e- / gain. The
   sky (AB mag / arcsec^2) gives e- per pixel. Seeing per band is drawn from the YAML FWHM range
   (``seeing=`` overrides).
5. **Rendering.** Stars with exact pixel-integrated PSF stamps (:func:`.render.add_point_sources`), bright ones
   with wider stamps so their wings do not stop short; galaxies as Sérsic profiles (:class:`.galaxies.GalaxyRenderer`).
   Stamps are normalised so that every source puts its whole flux on the sky: the source image conserves flux.
6. **Detector.** Poisson noise on sources + sky + contaminant light in electrons, charge bleeding beyond the full
   well along columns, Gaussian read noise, conversion to ADU, saturation, dead pixels
   (:mod:`.contaminants`; rates from the YAML ``contaminants`` section).

``inject=`` adds sources at chosen places (injection-recovery tests); ``contaminants=False`` gives an ideal
detector. The YAML ``simulation`` section (all keys optional)::

    simulation:
      bands_per_image: 1            # or all (default)
      band_weights: {q: 0.4, u: 0.12, ...}   # how often each band is drawn when bands_per_image < all
      scene_weights: {empty: 0.1, field: 0.55, crowded: 0.25, cluster: 0.1}
      extra_depth_mag: 1.5          # simulate sources this far beyond the 5-sigma limit
      scenes:                       # override a scene's densities
        field: {star_density: 0.35, galaxy_scale: 1.0}   # stars per arcmin^2 brighter than r = 20

Truth columns: ``x``, ``y`` (pix), ``ra``, ``dec`` (deg), ``flux`` (ADU summed over bands), ``flux_band`` (N, C)
ADU, ``mag`` (N, C) AB, ``class`` (star / galaxy), ``extension`` (half-light radius along the major axis, deg; 0
for stars), ``sersic_n`` (0 for stars), ``axis_ratio`` (1 for stars), ``position_angle`` (deg east of north),
``snr`` (in the best band, flux / sqrt(flux + n_eff (sky + rn^2)) in electrons, n_eff the noise-equivalent area),
``saturated`` (its central pixel is saturated in some band).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import astropy.units as u
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from skyfm.data.patch import CONTAMINANT_BITS, Patch
from skyfm.data.simulate import contaminants as cont
from skyfm.data.simulate.galaxies import (GALAXY_COUNTS, GalaxyRenderer, draw_galaxies, fine_factor, galaxy_colours,
                                          noise_pixels)
from skyfm.data.simulate.render import add_point_sources
from skyfm.data.simulate.stars import (NumberCounts, blackbody_colours, draw_king_cluster, field_star_temperatures,
                                       sample_cluster_stars)
from skyfm.errors import SkyfmError
from skyfm.instruments import Band, Instrument, load_instrument
from skyfm.instruments.psf import PSF

ARCSEC_PER_DEG = 3600.0
# Random streams: one per part of the simulation, so that switching contaminants off leaves the sky unchanged.
_STREAM_LAYOUT, _STREAM_STARS, _STREAM_GALAXIES, _STREAM_NOISE, _STREAM_CONTAMINANTS = range(5)
# Spectra that set how deep each population is drawn: a K dwarf, and a disc galaxy at z = 0.7
# (old-star temperature, young fraction, dust, redshift).
_TYPICAL_STAR_K = 5000.0
_TYPICAL_GALAXY = (4400.0, 0.3, 0.2, 0.7)
# A star's stamp is widened until its wing falls below this fraction of the sky noise per pixel.
_WING_THRESHOLD_SIGMA = 0.1
_MAX_WING_RADIUS_PIX = 64
_SOURCE_MARGIN_PIX = 8


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """What part of the sky a patch shows.

    Attributes:
        name: ``empty`` (a sparse high-latitude field, a tenth of the usual density: a few sources), ``field``,
            ``crowded``, ``cluster``, or your own.
        star_counts: field-star counts in the reference band (:class:`.stars.NumberCounts`).
        galaxy_scale: galaxy counts relative to :data:`.galaxies.GALAXY_COUNTS` (Galactic dust hides them in the
            plane).
        cluster: add a globular cluster (King profile) at a random centre.
        abs_glat: range of |Galactic latitude| (deg) that centres are drawn from.
        abs_glon: range of |Galactic longitude| (deg, -180..180) that centres are drawn from.
    """

    name: str
    star_counts: NumberCounts
    galaxy_scale: float = 1.0
    cluster: bool = False
    abs_glat: tuple[float, float] = (30.0, 90.0)
    abs_glon: tuple[float, float] = (0.0, 180.0)


def _star_counts(density_at_20: float, slopes=(0.25, 0.14), breaks=(19.0,)) -> NumberCounts:
    return NumberCounts(anchor_mag=20.0, anchor_density=density_at_20, slopes=slopes, breaks=breaks)


# Star counts at high latitude: about 0.35 per arcmin^2 brighter than r = 20, flattening to d log N/dm = 0.14 in
# the halo (Bahcall & Soneira); towards the inner Galactic plane about 100 times more, still rising steeply.
SCENES: dict[str, Scene] = {
    "empty": Scene("empty", _star_counts(0.035), galaxy_scale=0.1, abs_glat=(60.0, 90.0)),
    "field": Scene("field", _star_counts(0.35), galaxy_scale=1.0, abs_glat=(30.0, 90.0)),
    "crowded": Scene("crowded", _star_counts(30.0, slopes=(0.35, 0.25), breaks=(18.0,)), galaxy_scale=0.03,
                     abs_glat=(0.0, 5.0), abs_glon=(0.0, 60.0)),
    "cluster": Scene("cluster", _star_counts(0.5), galaxy_scale=0.7, cluster=True, abs_glat=(10.0, 60.0)),
}
DEFAULT_SCENE_WEIGHTS = {"empty": 0.1, "field": 0.55, "crowded": 0.25, "cluster": 0.1}


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BandSetup:
    """One band of one image: its PSF tonight and the numbers that turn magnitudes into electrons and ADU.

    Attributes:
        band: the instrument's band; psf: this image's PSF; fwhm_arcsec: its FWHM; pixel_scale_deg: pixel side.
        wavelength_um: central wavelength (geometric mean of the band edges).
        gain: e-/ADU; read_noise_e: e- rms; full_well_e: e- (the YAML saturation in ADU times the gain).
        zeropoint_adu: AB magnitude of a source that gives 1 ADU in total over the exposure.
        sky_e: sky electrons per pixel over the exposure.
        psf_radius_pix: stamp half-size holding 99.5% of the PSF.
        noise_pixels: noise-equivalent area of the pixelised PSF, 1 / sum(p^2), pixels.
        mag_limit: 5-sigma point-source limit (AB).
    """

    band: Band
    psf: PSF
    fwhm_arcsec: float
    pixel_scale_deg: float
    wavelength_um: float
    gain: float
    read_noise_e: float
    full_well_e: float
    zeropoint_adu: float
    sky_e: float
    psf_radius_pix: int
    noise_pixels: float
    mag_limit: float

    @property
    def saturation_adu(self) -> float:
        return self.full_well_e / self.gain

    @property
    def sky_sigma_e(self) -> float:
        """Noise of an empty pixel in electrons: sqrt(sky + read noise^2)."""
        return float(np.sqrt(self.sky_e + self.read_noise_e**2))

    def flux_adu(self, mag: np.ndarray) -> np.ndarray:
        return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - self.zeropoint_adu))

    def mag_from_adu(self, flux_adu: float) -> float:
        return float(self.zeropoint_adu - 2.5 * np.log10(flux_adu))


def band_setup(inst: Instrument, band: Band, fwhm_deg: float, psf_beta: float | None = None) -> BandSetup:
    """The photometric set-up of ``band`` of ``inst`` for an image with PSF FWHM ``fwhm_deg`` (and, for a Moffat
    PSF, power index ``psf_beta``; default the YAML's)."""
    scale_deg = inst.pixel_scale_deg
    psf = band.psf_with_fwhm(fwhm_deg, beta=psf_beta)
    gain = float(inst.noise["gain"])
    read_noise = float(inst.noise["read_noise"])
    exposure = float(band.exposure_time)
    zeropoint_adu = band.zeropoint + 2.5 * np.log10(exposure) - 2.5 * np.log10(gain)
    pixel_area_arcsec2 = (scale_deg * ARCSEC_PER_DEG) ** 2
    sky_e = 10.0 ** (-0.4 * (band.sky - band.zeropoint)) * exposure * pixel_area_arcsec2
    radius = psf.stamp_radius_pix(scale_deg)
    stamp = centred_stamp(psf, scale_deg, radius)
    n_eff = float(1.0 / np.sum(stamp**2))
    background = sky_e + read_noise**2
    limit_e = 0.5 * (25.0 + np.sqrt(625.0 + 100.0 * n_eff * background))  # solves F / sqrt(F + n B) = 5
    lo, hi = band.wavelength
    return BandSetup(
        band=band, psf=psf, fwhm_arcsec=fwhm_deg * ARCSEC_PER_DEG, pixel_scale_deg=scale_deg,
        wavelength_um=float(np.sqrt(lo.to_value(u.um) * hi.to_value(u.um))),
        gain=gain, read_noise_e=read_noise, full_well_e=float(inst.noise["saturation"]) * gain,
        zeropoint_adu=float(zeropoint_adu), sky_e=float(sky_e), psf_radius_pix=int(radius), noise_pixels=n_eff,
        mag_limit=float(zeropoint_adu - 2.5 * np.log10(limit_e / gain)),
    )


@lru_cache(maxsize=256)
def centred_stamp(psf: PSF, pixel_scale_deg: float, radius_pix: int) -> np.ndarray:
    """The pixel-integrated PSF of a source at a pixel centre, normalised to sum 1 (read-only, cached)."""
    stamp = psf.stamps(np.zeros(1), np.zeros(1), pixel_scale_deg, radius_pix)[0]
    stamp /= stamp.sum()
    stamp.setflags(write=False)
    return stamp


@lru_cache(maxsize=256)
def _stamp_sum(psf: PSF, pixel_scale_deg: float, radius_pix: int) -> float:
    """Fraction of the PSF inside a (2 r + 1)^2 stamp: stars are brightened by its inverse to keep their flux."""
    return float(psf.stamps(np.zeros(1), np.zeros(1), pixel_scale_deg, radius_pix)[0].sum())


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Sources:
    """Stars and galaxies of one patch, with their magnitude in every band of the patch."""

    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray  # (N, C) AB
    is_galaxy: np.ndarray
    r_e_pix: np.ndarray
    sersic_n: np.ndarray
    axis_ratio: np.ndarray
    position_angle: np.ndarray

    @classmethod
    def stars(cls, x, y, mag) -> "Sources":
        n = len(x)
        mag = np.asarray(mag, float)
        return cls(np.asarray(x, float), np.asarray(y, float), mag[:, None] if mag.ndim == 1 else mag,
                   np.zeros(n, bool), np.zeros(n), np.zeros(n), np.ones(n), np.zeros(n))

    @classmethod
    def concat(cls, parts: list["Sources"], n_bands: int) -> "Sources":
        parts = [p for p in parts if p is not None and len(p.x)]
        if not parts:
            return cls.stars(np.zeros(0), np.zeros(0), np.zeros((0, n_bands)))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("x", "y", "mag", "is_galaxy", "r_e_pix", "sersic_n", "axis_ratio", "position_angle")))

    def select(self, keep: np.ndarray) -> "Sources":
        return Sources(*(getattr(self, f)[keep] for f in
                         ("x", "y", "mag", "is_galaxy", "r_e_pix", "sersic_n", "axis_ratio", "position_angle")))


# ----------------------------------------------------------------------------------------------------------------
def simulate_ccd_patch(
    inst: Instrument | str,
    seed: int,
    *,
    scene: str | Scene | None = None,
    bands: list[str] | str | None = None,
    center: tuple[float, float] | None = None,
    size: int | tuple[int, int] | None = None,
    seeing: float | dict | None = None,
    psf_beta: float | None = None,
    contaminants: bool = True,
    inject: Table | dict | None = None,
) -> Patch:
    """Simulate one CCD image patch with its truth (the full recipe is in the module docstring).

    Args:
        inst: a ``kind: ccd`` instrument or its name.
        seed: the same instrument, seed and options give the same patch, bit for bit.
        scene: ``empty``, ``field``, ``crowded``, ``cluster``, or a :class:`Scene`; default drawn from
            ``simulation.scene_weights``.
        bands: band name(s) to simulate, aligned on one grid; default from ``simulation.bands_per_image``.
        center: (ra, dec) of the patch centre in degrees (ICRS); default drawn from the scene's sky.
        size: patch side in pixels, or (height, width); default the instrument's ``patch_size``.
        seeing: PSF FWHM in arcsec for every band, or a {band: arcsec} mapping; default drawn per band from the
            YAML's FWHM range (fixed for space telescopes).
        psf_beta: the Moffat power index of every band's PSF (smaller: heavier wings; real nights and optics give
            about 2-5); default the YAML's. Only for instruments with Moffat PSFs.
        contaminants: False gives an ideal detector: no cosmic rays, trails, hot or dead pixels, no saturation or
            bleeding, and no extra saturating star.
        inject: extra sources at chosen places, as a table or mapping of columns: ``x``, ``y`` (pixels), ``mag``
            (AB; (N,) for the same magnitude in every band or (N, C) per band), and for galaxies
            ``r_e_arcsec`` (> 0) with optional ``sersic_n`` (1), ``axis_ratio`` (1), ``position_angle`` (0 deg).

    Returns:
        A :class:`~skyfm.data.Patch` with ``data`` (C, H, W) float32 ADU, ``source_image`` (expected source-only
        ADU), ``contaminant_mask`` (C, H, W) uint8, ``truth`` and ``meta`` (seed, scene, per band: seeing FWHM
        in arcsec, sky in ADU per pixel, zero point for ADU, 5-sigma limit, number of cosmic rays).
    """
    inst = load_instrument(inst)
    if inst.kind != "ccd":
        raise SkyfmError(f"{inst.name} is a {inst.kind} instrument; simulate_ccd_patch needs a ccd instrument")
    layout = np.random.default_rng([int(seed), _STREAM_LAYOUT])
    shape = _patch_shape(inst, size)
    chosen = _choose_bands(inst, bands, layout)
    the_scene = _choose_scene(inst, scene, layout)
    fwhm = _choose_seeing(inst, chosen, seeing, layout)
    ra0, dec0 = _choose_center(the_scene, center, layout)
    setups = [band_setup(inst, b, f, psf_beta) for b, f in zip(chosen, fwhm)]
    wcs = tan_wcs(ra0, dec0, shape, inst.pixel_scale_deg)
    rates = cont.ContaminantRates.from_config(inst.contaminants, inst.source or inst.name)

    sources, scene_meta = _draw_sources(int(seed), inst, the_scene, setups, shape, rates, contaminants, inject)
    flux_adu = np.stack([s.flux_adu(sources.mag[:, c]) for c, s in enumerate(setups)], axis=1)  # (N, C)
    source_image = _render_sources(sources, flux_adu, setups, shape, inst.pixel_scale_deg)
    data, cmask, band_meta = _expose(int(seed), source_image, setups, rates, contaminants)
    truth = _truth_table(sources, flux_adu, setups, wcs, cmask, shape, inst.pixel_scale_deg)
    meta = {"seed": int(seed), "scene": the_scene.name, **scene_meta, **band_meta,
            "n_stars": int(np.sum(truth["class"] == "star")), "n_galaxies": int(np.sum(truth["class"] == "galaxy")),
            "contaminants": bool(contaminants), **({} if psf_beta is None else {"psf_beta": float(psf_beta)})}
    return Patch(data=data, instrument=inst.name, bands=[s.band.name for s in setups], wcs=wcs, truth=truth,
                 source_image=source_image.astype(np.float32), contaminant_mask=cmask, meta=meta)


def _draw_sources(seed: int, inst: Instrument, scene: Scene, setups: list[BandSetup], shape: tuple[int, int],
                  rates: cont.ContaminantRates, contaminants: bool, inject) -> tuple["Sources", dict]:
    """Every source of the patch, centred on the image or in a margin around it, and facts about the scene."""
    height, width = shape
    scale_arcsec = inst.pixel_scale_deg * ARCSEC_PER_DEG
    margin = max(s.psf_radius_pix for s in setups) + _SOURCE_MARGIN_PIX
    bounds = (-0.5 - margin, width - 0.5 + margin, -0.5 - margin, height - 0.5 + margin)
    depth = float(inst.simulation.get("extra_depth_mag", 1.5))
    meta: dict = {}
    star_rng = np.random.default_rng([seed, _STREAM_STARS])
    parts = [_draw_field_stars(star_rng, scene, setups, bounds, scale_arcsec, depth)]
    if scene.cluster:
        cluster_stars, meta = _draw_cluster(star_rng, setups, bounds, shape, scale_arcsec, depth)
        parts.append(cluster_stars)
    parts.append(_draw_galaxies(np.random.default_rng([seed, _STREAM_GALAXIES]), scene, setups, bounds,
                                scale_arcsec, depth))
    contaminant_rng = np.random.default_rng([seed, _STREAM_CONTAMINANTS])
    if contaminants and contaminant_rng.random() < rates.bright_star_probability:
        parts.append(_bright_star(contaminant_rng, setups, shape))
    if inject is not None:
        parts.append(_injected_sources(inject, setups, scale_arcsec))
    return Sources.concat(parts, len(setups)), meta


def _expose(seed: int, source_image: np.ndarray, setups: list[BandSetup], rates: cont.ContaminantRates,
            contaminants: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Each band's exposure of the source image: (data ADU, contaminant mask, per-band facts for the header)."""
    n_bands, height, width = source_image.shape
    data = np.empty((n_bands, height, width), dtype=np.float32)
    cmask = np.zeros((n_bands, height, width), dtype=np.uint8)
    meta: dict = {}
    for c, setup in enumerate(setups):
        noise_rng = np.random.default_rng([seed, _STREAM_NOISE, c])
        band_rng = np.random.default_rng([seed, _STREAM_CONTAMINANTS, c + 1])
        data[c], cmask[c], facts = _observe(source_image[c], setup, rates, contaminants, noise_rng, band_rng)
        name = setup.band.name
        meta.update({f"seeing_{name}": setup.fwhm_arcsec, f"sky_{name}": setup.sky_e / setup.gain,
                     f"zp_{name}": setup.zeropoint_adu, f"mlim_{name}": round(setup.mag_limit, 3),
                     **{f"{k}_{name}": v for k, v in facts.items()}})
    return data, cmask, meta


# ----------------------------------------------------------------------------------------------------------------
# Choices: each validates what the user gave, or draws from the YAML's simulation section.
# ----------------------------------------------------------------------------------------------------------------
def _patch_shape(inst: Instrument, size) -> tuple[int, int]:
    if size is None:
        return inst.patch_size
    shape = (size, size) if np.isscalar(size) else tuple(size)
    if len(shape) != 2 or not all(float(s).is_integer() and s >= 16 for s in shape):
        raise SkyfmError(f"patch size should be an integer >= 16 or (height, width), got {size!r}")
    return int(shape[0]), int(shape[1])


def _choose_bands(inst: Instrument, bands, rng: np.random.Generator) -> list[Band]:
    if bands is not None:
        names = [bands] if isinstance(bands, str) else list(bands)
        if not names:
            raise SkyfmError(f"no bands given; {inst.name} has {', '.join(b.name for b in inst.bands)}")
        chosen = []
        for name in names:
            b = inst.band(name)
            if b not in chosen:
                chosen.append(b)
        return chosen
    per_image = inst.simulation.get("bands_per_image", "all")
    if per_image == "all":
        return list(inst.bands)
    if not isinstance(per_image, int) or not 1 <= per_image <= inst.n_bands:
        raise SkyfmError(f"{inst.source or inst.name}: 'simulation.bands_per_image' should be 'all' or an integer "
                         f"from 1 to {inst.n_bands}, got {per_image!r}")
    weights = _weights(inst, "band_weights", {b.name: 1.0 for b in inst.bands}, [b.name for b in inst.bands])
    idx = rng.choice(inst.n_bands, size=per_image, replace=False, p=weights)
    return [inst.bands[i] for i in sorted(idx)]


def _weights(inst: Instrument, key: str, default: dict, names: list[str]) -> np.ndarray:
    """Normalised weights over ``names`` from ``simulation.<key>`` (names missing there get weight 0)."""
    raw = inst.simulation.get(key, default)
    where = f"{inst.source or inst.name}: 'simulation.{key}'"
    if not isinstance(raw, dict):
        raise SkyfmError(f"{where} should be a mapping of name: weight, got {raw!r}")
    lookup = {str(k).lower(): v for k, v in raw.items()}
    unknown = set(lookup) - {n.lower() for n in names}
    if unknown:
        raise SkyfmError(f"{where} names {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    try:
        w = np.array([float(lookup.get(n.lower(), 0.0)) for n in names])
    except (TypeError, ValueError):
        raise SkyfmError(f"{where} should map names to numbers, got {raw!r}") from None
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise SkyfmError(f"{where} should hold non-negative weights, not all zero, got {raw!r}")
    return w / w.sum()


def _choose_scene(inst: Instrument, scene, rng: np.random.Generator) -> Scene:
    if isinstance(scene, Scene):
        return scene
    names = list(SCENES)
    if scene is None:
        weights = _weights(inst, "scene_weights", DEFAULT_SCENE_WEIGHTS, names)
        scene = names[rng.choice(len(names), p=weights)]
    key = str(scene).lower()
    if key not in SCENES:
        raise SkyfmError(f"unknown scene '{scene}'; choose one of {', '.join(names)}")
    return _scene_with_overrides(inst, SCENES[key])


def _scene_with_overrides(inst: Instrument, scene: Scene) -> Scene:
    """The scene with the densities of the YAML's ``simulation.scenes.<name>``, if any."""
    overrides = (inst.simulation.get("scenes") or {}).get(scene.name)
    if not overrides:
        return scene
    where = f"{inst.source or inst.name}: 'simulation.scenes.{scene.name}'"
    allowed = {"star_density", "galaxy_scale"}
    if not isinstance(overrides, dict) or set(overrides) - allowed:
        raise SkyfmError(f"{where} should be a mapping with keys {', '.join(sorted(allowed))}, got {overrides!r}")
    try:
        values = {k: float(v) for k, v in overrides.items()}
    except (TypeError, ValueError):
        raise SkyfmError(f"{where} should hold numbers, got {overrides!r}") from None
    if any(not np.isfinite(v) or v < 0 for v in values.values()):
        raise SkyfmError(f"{where} should hold non-negative numbers, got {overrides!r}")
    if "star_density" in values:
        scene = replace(scene, star_counts=replace(scene.star_counts, anchor_density=values["star_density"]))
    if "galaxy_scale" in values:
        scene = replace(scene, galaxy_scale=values["galaxy_scale"])
    return scene


def _choose_seeing(inst: Instrument, bands: list[Band], seeing, rng: np.random.Generator) -> list[float]:
    """PSF FWHM (deg) per band: drawn uniformly from the YAML range, or the user's arcsec values."""
    drawn = [float(rng.uniform(*b.fwhm_range_deg())) for b in bands]  # always drawn: keeps the stream aligned
    if seeing is None:
        return drawn
    if isinstance(seeing, dict):
        given = {inst.band(k).name: v for k, v in seeing.items()}
        values = [given.get(b.name) for b in bands]
    else:
        values = [seeing] * len(bands)
    out = []
    for b, value, default in zip(bands, values, drawn):
        if value is None:
            out.append(default)
            continue
        arcsec = u.Quantity(value, u.arcsec).to_value(u.arcsec) if isinstance(value, u.Quantity) else value
        try:
            arcsec = float(arcsec)
        except (TypeError, ValueError):
            raise SkyfmError(f"seeing for band {b.name} should be a FWHM in arcsec, got {value!r}") from None
        if not np.isfinite(arcsec) or arcsec <= 0:
            raise SkyfmError(f"seeing for band {b.name} should be a positive FWHM in arcsec, got {value!r}")
        out.append(arcsec / ARCSEC_PER_DEG)
    return out


def _choose_center(scene: Scene, center, rng: np.random.Generator) -> tuple[float, float]:
    """(ra, dec) in degrees: the user's, or drawn uniformly on the sphere within the scene's Galactic zone."""
    l_lo, l_hi = scene.abs_glon
    b_lo, b_hi = scene.abs_glat
    sin_b = rng.uniform(np.sin(np.deg2rad(b_lo)), np.sin(np.deg2rad(b_hi)))
    glat = np.rad2deg(np.arcsin(sin_b)) * rng.choice([-1.0, 1.0])
    glon = rng.uniform(l_lo, l_hi) * rng.choice([-1.0, 1.0]) % 360.0
    if center is not None:
        try:
            ra, dec = (float(v) for v in center)
        except (TypeError, ValueError):
            raise SkyfmError(f"center should be (ra, dec) in degrees, got {center!r}") from None
        if not (np.isfinite(ra) and -90.0 <= dec <= 90.0):
            raise SkyfmError(f"center should be (ra, dec) in degrees with -90 <= dec <= 90, got {center!r}")
        return ra % 360.0, dec
    return galactic_to_icrs(glon, glat)


@lru_cache(maxsize=1)
def _galactic_to_icrs_matrix() -> np.ndarray:
    """The fixed rotation from Galactic to ICRS unit vectors, from astropy's frames."""
    from astropy.coordinates import SkyCoord

    basis = SkyCoord(l=[0.0, 90.0, 0.0], b=[0.0, 0.0, 90.0], unit="deg", frame="galactic").icrs
    return np.stack([basis.cartesian.x.value, basis.cartesian.y.value, basis.cartesian.z.value])  # columns: images


def galactic_to_icrs(glon_deg: float, glat_deg: float) -> tuple[float, float]:
    """(ra, dec) degrees of a Galactic position, without the cost of a SkyCoord per call."""
    l, b = np.deg2rad(glon_deg), np.deg2rad(glat_deg)
    v = _galactic_to_icrs_matrix() @ np.array([np.cos(b) * np.cos(l), np.cos(b) * np.sin(l), np.sin(b)])
    return float(np.rad2deg(np.arctan2(v[1], v[0])) % 360.0), float(np.rad2deg(np.arcsin(np.clip(v[2], -1, 1))))


def tan_wcs(ra_deg: float, dec_deg: float, shape: tuple[int, int], pixel_scale_deg: float) -> WCS:
    """A north-up, east-left TAN WCS (ICRS) with (ra, dec) at the centre of an image of ``shape`` (H, W)."""
    h, w = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = [(w + 1) / 2.0, (h + 1) / 2.0]  # FITS pixels are 1-based: this is 0-based (w - 1) / 2
    wcs.wcs.cdelt = [-pixel_scale_deg, pixel_scale_deg]
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
def _faint_limit(setups: list[BandSetup], colours: np.ndarray, depth: float) -> float:
    """Reference-band magnitude to draw down to: ``depth`` beyond the band that sees this spectrum deepest."""
    return float(max(s.mag_limit - c for s, c in zip(setups, colours)) + depth)


def _uniform_positions(rng: np.random.Generator, n: int, bounds) -> tuple[np.ndarray, np.ndarray]:
    x_min, x_max, y_min, y_max = bounds
    return rng.uniform(x_min, x_max, n), rng.uniform(y_min, y_max, n)


def _area_arcmin2(bounds, scale_arcsec: float) -> float:
    x_min, x_max, y_min, y_max = bounds
    return (x_max - x_min) * (y_max - y_min) * (scale_arcsec / 60.0) ** 2


def _draw_field_stars(rng, scene: Scene, setups, bounds, scale_arcsec, depth) -> Sources:
    wavelengths = np.array([s.wavelength_um for s in setups])
    m_faint = _faint_limit(setups, blackbody_colours(np.array([_TYPICAL_STAR_K]), wavelengths)[0], depth)
    counts = scene.star_counts
    n = rng.poisson(counts.density(counts.bright_mag, m_faint) * _area_arcmin2(bounds, scale_arcsec))
    mag_ref = counts.sample(rng, n, counts.bright_mag, m_faint)
    x, y = _uniform_positions(rng, n, bounds)
    colours = blackbody_colours(field_star_temperatures(rng, n), wavelengths)
    return Sources.stars(x, y, mag_ref[:, None] + colours)


def _draw_cluster(rng, setups, bounds, shape, scale_arcsec, depth) -> tuple[Sources, dict]:
    wavelengths = np.array([s.wavelength_um for s in setups])
    m_faint = _faint_limit(setups, blackbody_colours(np.array([_TYPICAL_STAR_K]), wavelengths)[0], depth)
    cluster = draw_king_cluster(rng, shape[1], shape[0], scale_arcsec)
    x, y, mag_ref, temperature = sample_cluster_stars(rng, cluster, bounds, m_faint, scale_arcsec)
    meta = {"cl_x": round(cluster.x, 2), "cl_y": round(cluster.y, 2),
            "cl_rc": round(cluster.core_radius * scale_arcsec, 2),
            "cl_rt": round(cluster.tidal_radius * scale_arcsec, 1),
            "cl_dens": round(cluster.central_density, 1), "cl_mto": round(cluster.turnoff_mag, 2)}
    return Sources.stars(x, y, mag_ref[:, None] + blackbody_colours(temperature, wavelengths)), meta


def _draw_galaxies(rng, scene: Scene, setups, bounds, scale_arcsec, depth) -> Sources:
    wavelengths = np.array([s.wavelength_um for s in setups])
    typical = galaxy_colours(*(np.array([v]) for v in _TYPICAL_GALAXY), wavelengths)[0]
    m_faint = _faint_limit(setups, typical, depth)
    density = GALAXY_COUNTS.density(GALAXY_COUNTS.bright_mag, m_faint) * scene.galaxy_scale
    n = rng.poisson(density * _area_arcmin2(bounds, scale_arcsec))
    pop = draw_galaxies(rng, GALAXY_COUNTS.sample(rng, n, GALAXY_COUNTS.bright_mag, m_faint))
    x, y = _uniform_positions(rng, n, bounds)
    return Sources(x=x, y=y, mag=pop.mag[:, None] + pop.colours(wavelengths), is_galaxy=np.ones(n, bool),
                   r_e_pix=pop.r_e_arcsec / scale_arcsec, sersic_n=pop.sersic_n, axis_ratio=pop.axis_ratio,
                   position_angle=pop.position_angle)


def _bright_star(rng, setups, shape) -> Sources:
    """A star inside the image whose peak reaches 2-50 times the full well in the first band: it saturates and
    bleeds. Its colours are those of a K star."""
    h, w = shape
    first = setups[0]
    peak_fraction = float(centred_stamp(first.psf, first.pixel_scale_deg, first.psf_radius_pix).max())
    flux_e = 10.0 ** rng.uniform(np.log10(2.0), np.log10(50.0)) * first.full_well_e / peak_fraction
    mag0 = first.mag_from_adu(flux_e / first.gain)
    wavelengths = np.array([s.wavelength_um for s in setups])
    colours = blackbody_colours(np.array([4500.0]), wavelengths)[0]
    mags = mag0 + colours - colours[0]
    return Sources.stars([rng.uniform(0, w - 1)], [rng.uniform(0, h - 1)], mags[None, :])


def _injected_sources(inject, setups, scale_arcsec) -> Sources:
    """User-placed sources (see :func:`simulate_ccd_patch`)."""
    table = inject if isinstance(inject, Table) else Table(dict(inject))
    for col in ("x", "y", "mag"):
        if col not in table.colnames:
            raise SkyfmError(f"injected sources need columns x, y and mag; '{col}' is missing")
    n, c = len(table), len(setups)
    mag = np.asarray(table["mag"], dtype=np.float64)
    if mag.ndim == 1:
        mag = np.repeat(mag[:, None], c, axis=1)
    if mag.shape != (n, c):
        raise SkyfmError(f"injected 'mag' should have shape ({n},) or ({n}, {c}) for {c} band(s), got {mag.shape}")

    def column(name, default):
        return np.asarray(table[name], dtype=np.float64) if name in table.colnames else np.full(n, default)

    r_e = column("r_e_arcsec", 0.0)
    return Sources(x=column("x", 0.0), y=column("y", 0.0), mag=mag, is_galaxy=r_e > 0,
                   r_e_pix=r_e / scale_arcsec, sersic_n=np.where(r_e > 0, column("sersic_n", 1.0), 0.0),
                   axis_ratio=np.where(r_e > 0, column("axis_ratio", 1.0), 1.0),
                   position_angle=np.where(r_e > 0, column("position_angle", 0.0), 0.0))


# ----------------------------------------------------------------------------------------------------------------
# Rendering and the detector
# ----------------------------------------------------------------------------------------------------------------
def _render_sources(sources: Sources, flux_adu: np.ndarray, setups: list[BandSetup], shape: tuple[int, int],
                    pixel_scale_deg: float) -> np.ndarray:
    """(C, H, W) expected ADU of all sources: stars by exact stamps, galaxies by the Sérsic renderer."""
    out = np.zeros((len(setups), *shape))
    is_star = ~sources.is_galaxy
    renderer = None
    if sources.is_galaxy.any():
        g = sources.is_galaxy
        renderer = GalaxyRenderer(
            sources.x[g], sources.y[g], sources.r_e_pix[g], sources.sersic_n[g], sources.axis_ratio[g],
            sources.position_angle[g], shape, pad=max(s.psf_radius_pix for s in setups),
            fine=max(fine_factor(s.psf.fwhm_deg / pixel_scale_deg) for s in setups))
    for c, setup in enumerate(setups):
        if is_star.any():
            _add_stars(out[c], sources.x[is_star], sources.y[is_star], flux_adu[is_star, c], setup)
        if renderer is not None:
            out[c] += renderer.image(flux_adu[sources.is_galaxy, c], setup.psf, pixel_scale_deg)
    return out


def _add_stars(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, setup: BandSetup) -> None:
    """Point sources with stamps normalised to their full flux. A star whose PSF wing would be visibly cut at the
    99.5% radius gets a wider stamp, wide enough for its wing to fade below a tenth of the sky noise; stars are
    grouped by stamp size (steps of 1.5x) so that each group is rendered at once."""
    psf, scale = setup.psf, setup.pixel_scale_deg
    r0 = setup.psf_radius_pix
    threshold_adu = _WING_THRESHOLD_SIGMA * setup.sky_sigma_e / setup.gain
    radii = np.arange(r0, max(r0, _MAX_WING_RADIUS_PIX) + 1)
    wing = psf.profile(radii * scale) * scale**2  # fraction of the flux per pixel at each radius, decreasing
    # The first radius where flux * wing < threshold: searchsorted on the increasing -wing.
    first_faint = np.searchsorted(-wing, -threshold_adu / np.maximum(flux, 1e-300))
    needed = radii[np.minimum(first_faint, radii.size - 1)]
    ladder = np.unique(np.minimum(np.ceil(r0 * 1.5 ** np.arange(12)).astype(int), radii[-1]))
    group = np.searchsorted(ladder, needed)  # the smallest stamp size in the ladder that is wide enough
    for g in np.unique(group):
        selected = group == g
        radius = int(ladder[g])
        add_point_sources(image, x[selected], y[selected], flux[selected] / _stamp_sum(psf, scale, radius),
                          psf, scale, radius_pix=radius, method="stamps")


def _observe(source_adu: np.ndarray, setup: BandSetup, rates: cont.ContaminantRates, contaminants: bool,
             noise_rng: np.random.Generator, band_rng: np.random.Generator):
    """One band's exposure: (data ADU float32, contaminant mask uint8, facts for the header)."""
    shape = source_adu.shape
    mask = np.zeros(shape, dtype=np.uint8)
    expected_e = source_adu * setup.gain + setup.sky_e
    facts: dict = {}
    sigma_e = setup.sky_sigma_e
    if contaminants:
        facts["ncr"] = cont.add_cosmic_rays(band_rng, expected_e, mask, rates, sigma_e)
        facts["trail"] = bool(band_rng.random() < cont.trail_probability(rates, shape))
        if facts["trail"]:
            cont.add_satellite_trail(band_rng, expected_e, mask, setup.psf, setup.pixel_scale_deg, sigma_e,
                                     setup.full_well_e)
        cont.add_hot_pixels(band_rng, expected_e, mask, rates, sigma_e, setup.full_well_e)
    electrons = noise_rng.poisson(expected_e).astype(np.float64)
    if contaminants:
        full = cont.bleed_saturated(electrons, setup.full_well_e, mask)
        dead = cont.dead_pixels(band_rng, shape, rates)
    electrons += noise_rng.normal(0.0, setup.read_noise_e, shape)
    adu = electrons / setup.gain
    if contaminants:
        # Full wells read out at the saturation level; the converter clips everything above it.
        np.minimum(adu, setup.saturation_adu, out=adu)
        adu[full] = setup.saturation_adu
        adu[dead] = 0.0
        mask[dead] |= CONTAMINANT_BITS["bad_pixel"]
    return adu.astype(np.float32), mask, facts


# ----------------------------------------------------------------------------------------------------------------
def _truth_table(sources: Sources, flux_adu: np.ndarray, setups: list[BandSetup], wcs: WCS, cmask: np.ndarray,
                 shape: tuple[int, int], pixel_scale_deg: float) -> Table:
    """The catalogue of sources centred inside the image, with units (columns in the module docstring)."""
    h, w = shape
    inside = (sources.x >= -0.5) & (sources.x < w - 0.5) & (sources.y >= -0.5) & (sources.y < h - 0.5)
    src, flux = sources.select(inside), flux_adu[inside]
    ra, dec = wcs.wcs_pix2world(src.x, src.y, 0)
    snr = np.zeros(flux.shape)
    for c, s in enumerate(setups):
        n_eff = np.where(src.is_galaxy, noise_pixels(s.noise_pixels, s.psf.fwhm_deg / pixel_scale_deg, src.r_e_pix,
                                                     src.axis_ratio), s.noise_pixels)
        flux_e = np.clip(flux[:, c] * s.gain, 0.0, None)
        snr[:, c] = flux_e / np.sqrt(flux_e + n_eff * (s.sky_e + s.read_noise_e**2))
    rows = np.clip(np.round(src.y).astype(int), 0, h - 1)
    cols = np.clip(np.round(src.x).astype(int), 0, w - 1)
    saturated = (cmask[:, rows, cols] & CONTAMINANT_BITS["saturated"]).any(axis=0)
    n = len(src.x)
    return Table(
        {
            "x": src.x * u.pix,
            "y": src.y * u.pix,
            "ra": np.asarray(ra) * u.deg,
            "dec": np.asarray(dec) * u.deg,
            "flux": flux.sum(axis=1) * u.adu,
            "flux_band": flux.reshape(n, len(setups)) * u.adu,
            "mag": src.mag.reshape(n, len(setups)) * u.mag,
            "class": np.where(src.is_galaxy, "galaxy", "star"),
            "extension": src.r_e_pix * pixel_scale_deg * u.deg,
            "sersic_n": src.sersic_n,
            "axis_ratio": src.axis_ratio,
            "position_angle": src.position_angle * u.deg,
            "snr": snr.max(axis=1) if n else np.zeros(0),
            "saturated": saturated,
        }
    )
