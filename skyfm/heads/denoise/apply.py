"""Run a denoiser on images of any size: tiles, several samples, mean and uncertainty in the data's units.

:func:`denoise_patch` takes a :class:`~skyfm.data.Patch` and returns the clean (source-only) image and its per-pixel
uncertainty, both (C, H, W) in the patch's units (counts per bin, ADU): the mean of ``samples`` diffusion samples,
each drawn with ``steps`` DDIM steps, and the calibrated 1-sigma error built from their spread
(:mod:`skyfm.heads.denoise.calibrate`). Images larger than the model's tile are cut
into overlapping tiles (:func:`skyfm.data.tiling.tile_grid`); each output pixel comes from the tile that owns it.
With ``return_background`` it also returns the background the denoiser removed (:func:`removed_background`).
:func:`denoise_file` does the same for a FITS file and writes the result (``skyfm denoise``).
:func:`generate` samples new source-only images with no observation at all (unconditional, per band).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from skyfm.errors import SkyfmError
from skyfm.heads.denoise.calibrate import UNCERT_MEANING, apply_calibration, uncertainty_kind
from skyfm.heads.denoise.flux import check_flux_correction, forced_flux_correction
from skyfm.heads.denoise.model import Denoiser, pad_to_multiple
from skyfm.heads.denoise.transforms import band_features, band_transform, instrument_kind
from skyfm.utils import check_precision, resolve_device, use_bf16
from skyfm.instruments import load_instrument
from skyfm.instruments.scaling import robust_background


BACKGROUND_SMOOTHING_PIX = 3.0  # Gaussian sigma (pixels) that takes the noise out of data - clean
BACKGROUND_FLOOR_COUNTS = 1e-3  # counts cubes: a Poisson rate, never 0 (a likelihood needs log(rate))


def removed_background(data: np.ndarray, clean: np.ndarray, kind: str, valid=None,
                       sigma_pix: float = BACKGROUND_SMOOTHING_PIX) -> np.ndarray:
    """What the denoiser took away, without the noise: ``data - clean`` smoothed with a Gaussian of ``sigma_pix``
    per band, (C, H, W) float32 in the data's units.

    ``clean`` should be the plain mean of the samples (no flux correction): the network's own split of every pixel
    into sources and the rest, so the background holds what it judged not to be a source (diffuse emission, sky,
    unresolved faint sources, the artefacts it removed). On counts cubes (``kind == "counts"``) it is a background
    rate per pixel, at least :data:`BACKGROUND_FLOOR_COUNTS`. Masked pixels (``valid`` False) neither enter the
    smoothing (a normalised convolution) nor get a value (0).

    Caution: as the background of a likelihood test it is circular, since data minus it is the clean image (plus
    noise): a TS map run against it finds the denoiser's own sources, faint false ones included. On the detection
    benchmark's Fermi-LAT skies that cost precision (docs/benchmarks.md, "The removed background as a product").
    """
    from scipy.ndimage import gaussian_filter

    c, h, w = data.shape
    valid = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    weight = gaussian_filter(valid.astype(np.float64), sigma_pix)
    out = np.zeros((c, h, w), np.float32)
    for i in range(c):
        removed = np.where(valid, np.asarray(data[i], np.float64) - clean[i], 0.0)
        if kind == "counts":
            removed = np.maximum(removed, 0.0)  # a pixel's counts below the clean mean: noise, no negative rate
        smooth = gaussian_filter(removed, sigma_pix) / np.maximum(weight, 1e-12)
        if kind == "counts":
            smooth = np.maximum(smooth, BACKGROUND_FLOOR_COUNTS)
        out[i] = np.where(valid, smooth, 0.0)
    return out


def default_model_dir() -> Path:
    """Where the default denoiser ships: ``skyfm/resources/models/denoiser-default``."""
    import skyfm

    return Path(skyfm.__file__).parent / "resources" / "models" / "denoiser-default"


@lru_cache(maxsize=4)
def _load_cached(path: str, device: str) -> Denoiser:
    return Denoiser.from_pretrained(path).to(device)


def load_denoiser(model_dir: str | Path | None = None, device: str | None = "auto") -> Denoiser:
    """A denoiser from ``model_dir`` (config.json + model.safetensors), or the default shipped one, on ``device``
    (:func:`skyfm.utils.resolve_device`: ``auto`` = a CUDA GPU where one is visible, else the CPU)."""
    if model_dir is None:
        path = default_model_dir()
        if not (path / "model.safetensors").is_file():
            raise SkyfmError(f"no default denoiser is installed ({path}); pass --model DIR")
    else:
        path = Path(model_dir)
    return _load_cached(str(path.resolve()), str(resolve_device(device)))


def denoise_patch(patch, model: Denoiser | None = None, *, samples: int | None = None, steps: int | None = None,
                  seed: int = 0, tile: int | None = None, overlap: int | None = None, progress=None,
                  threads: int | None = None, eta: float | None = None,
                  flux_correction: str = "forced", calibrated: bool = True,
                  flux_config=None, precision: str = "auto", return_background: bool = False):
    """Clean image and uncertainty, (C, H, W) float32 each, in the units of ``patch.data`` (and with
    ``return_background`` the removed background as a third array).

    The samples are averaged in data units (each is inverted from network space first), so the mean image is the
    mean of the samples' fluxes, not the inverse of a network-space mean (biased low by Jensen's inequality: the
    inverse transforms are convex).

    The uncertainty is the samples' standard deviation (``ddof=1``: the unbiased variance of K samples; with
    ``ddof=0`` the std of K = 4 samples is 13% smaller), scaled with each source by the flux correction, then,
    with ``calibrated`` and where the model's config has an ``uncertainty_calibration`` for this instrument and
    flux correction, turned into a calibrated 1-sigma error by :func:`skyfm.heads.denoise.calibrate.apply_calibration`
    (a factor on the spread and floors added in quadrature, chosen on validation seeds). One sample (``samples=1``)
    has no spread: the uncertainty is then NaN everywhere (unknown), never a pretended 0.

    Args:
        patch: the observed patch (counts cube or CCD image); masked pixels come back as 0 in both arrays.
        model: a :class:`Denoiser` (default: :func:`load_denoiser`).
        samples: diffusion samples per pixel (mean and std over them); default the model's ``default_samples``.
        steps: DDIM steps per sample (default the model's ``default_steps``).
        seed: the same seed gives the same result.
        tile, overlap: tile side and overlap in pixels (default the model's ``tile``, ``tile_overlap``).
        progress: a callable called once per network evaluation (e.g. a tqdm ``update``), or None.
        threads: torch threads (default: leave torch's setting).
        eta: DDIM eta (0: deterministic given the initial noise; 1: DDPM-like); default the model's ``eta``.
        flux_correction: ``forced`` (default): each source of the clean image is rescaled so that its aperture
            flux is the observed one minus the background the denoiser removed (:mod:`.flux`; the denoiser alone
            keeps 0.1-0.9 of it); ``none``: the plain mean of the samples.
        calibrated: apply the model's uncertainty calibration (default); False: the raw spread of the samples
            (what :mod:`skyfm.heads.denoise.calibrate` chooses the calibration from).
        flux_config: :class:`~skyfm.heads.denoise.flux.ForcedFluxConfig` of the forced correction (default: its
            defaults, which the shipped calibration was chosen with).
        precision: ``auto`` (default: bfloat16 autocast where the CPU or GPU has it natively, else float32),
            ``fp32`` or ``bf16``.
        return_background: also return :func:`removed_background` of the plain mean of the samples (before any
            flux correction): ``clean, std, background``.
    """
    check_flux_correction(flux_correction)
    check_precision(precision)
    model = model or load_denoiser()
    bf16 = use_bf16(precision, next(model.parameters()).device)
    cfg = model.config
    samples = int(samples or cfg.default_samples)
    if samples < 1:
        raise SkyfmError(f"--samples must be at least 1, got {samples}")
    if threads:
        torch.set_num_threads(threads)
    inst = load_instrument(patch.instrument)
    kind = instrument_kind(inst)
    c, h, w = patch.shape
    valid = np.ones((h, w), bool) if patch.mask is None else ~np.asarray(patch.mask, bool)
    transforms = [band_transform(patch.data[i], kind, cfg.ccd_softening, valid=valid, compress=cfg.counts_compress) for i in range(c)]
    obs = np.stack([tr.observation(patch.data[i]) for i, tr in enumerate(transforms)]) * valid
    feats = torch.from_numpy(np.stack([band_features(inst, inst.band_index(b)) for b in patch.bands]))
    feats = feats.repeat_interleave(samples, dim=0)  # (C * K, F), band-major
    clean = np.zeros((c, h, w), np.float32)
    std = np.zeros((c, h, w), np.float32)
    from skyfm.data.tiling import tile_grid

    tile = int(tile or cfg.tile)
    overlap = int(cfg.tile_overlap if overlap is None else overlap)
    overlap = min(overlap, tile - 1)
    tiles = tile_grid(h, w, tile, overlap)
    # channels-last: oneDNN's faster convolution layout on CPU (1.2-1.3x here on 256 x 256 patches); set on every
    # call, so that a model gives the same numbers however it was loaded
    model.eval().to(memory_format=torch.channels_last)
    for k, t in enumerate(tiles):
        y1, x1 = min(t.y1, h), min(t.x1, w)
        win, (th, tw) = pad_to_multiple(obs[:, t.y0:y1, t.x0:x1], cfg.multiple)
        pres, _ = pad_to_multiple(valid[None, t.y0:y1, t.x0:x1].astype(np.float32), cfg.multiple)
        o = torch.from_numpy(win).repeat_interleave(samples, dim=0)[:, None]
        p = torch.from_numpy(pres).expand(c * samples, -1, -1)[:, None].contiguous()
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0]))
        x = model.sample(o, p, feats, steps=steps, generator=gen, callback=progress, eta=eta, bf16=bf16)
        x = x[:, 0, :th, :tw].cpu().numpy().reshape(c, samples, th, tw)
        data = np.stack([transforms[i].inverse_target(x[i]) for i in range(c)])  # (C, K, th, tw) data units
        mean = data.mean(axis=1)
        sd = data.std(axis=1, ddof=1) if samples > 1 else np.full_like(mean, np.nan)
        cy0, cy1, cx0, cx1 = t.core_y0 - t.y0, t.core_y1 - t.y0, t.core_x0 - t.x0, t.core_x1 - t.x0
        clean[:, t.core_y0:t.core_y1, t.core_x0:t.core_x1] = mean[:, cy0:cy1, cx0:cx1]
        std[:, t.core_y0:t.core_y1, t.core_x0:t.core_x1] = sd[:, cy0:cy1, cx0:cx1]
    clean *= valid
    std = np.where(valid, std, 0.0).astype(np.float32)  # (NaN * 0 would stay NaN where samples == 1)
    background = removed_background(patch.data, clean, kind, valid) if return_background else None
    if flux_correction == "forced":
        clean, std = correct_fluxes(patch, clean, std, valid, config=flux_config)
    if calibrated and samples > 1:  # (one sample: NaN, nothing to calibrate)
        std = apply_calibration(patch, clean, std, cfg, flux_correction, valid=valid)
    return (clean, std, background) if return_background else (clean, std)


def band_fwhm_pix(patch, c: int, inst=None) -> float:
    """PSF FWHM in pixels of band ``c`` of a patch: the patch's measured seeing where it has one, else nominal."""
    inst = inst or load_instrument(patch.instrument)
    seeing = (patch.meta or {}).get(f"seeing_{patch.bands[c]}")
    if seeing is not None and np.isfinite(float(seeing)) and float(seeing) > 0:
        return float(seeing) / 3600 / inst.pixel_scale_deg
    return float(inst.band(patch.bands[c]).psf.fwhm_deg / inst.pixel_scale_deg)


def correct_fluxes(patch, clean: np.ndarray, std: np.ndarray, valid=None, config=None):
    """(clean, std) with every source's aperture flux forced to the observed one, band by band
    (:func:`skyfm.heads.denoise.flux.forced_flux_correction`)."""
    inst = load_instrument(patch.instrument)
    kind = instrument_kind(inst)
    c, h, w = patch.shape
    if valid is None:
        valid = np.ones((h, w), bool) if patch.mask is None else ~np.asarray(patch.mask, bool)
    out, out_std = clean.copy(), std.copy()
    for i in range(c):
        sigma = None
        if kind == "ccd":  # the robust sky sigma, as the CCD transform uses
            sigma = robust_background(np.where(valid, np.asarray(patch.data[i], np.float32), np.nan))[1]
        out[i], out_std[i], _ = forced_flux_correction(patch.data[i], clean[i], std[i],
                                                       band_fwhm_pix(patch, i, inst), kind, sigma=sigma,
                                                       valid=valid, config=config)
    return out * valid, np.where(valid, out_std, 0.0).astype(np.float32)


def n_evaluations(patch_shape, model: Denoiser, steps: int | None = None, tile: int | None = None,
                  overlap: int | None = None) -> int:
    """How many network evaluations (batched over bands and samples) :func:`denoise_patch` makes."""
    from skyfm.data.tiling import tile_grid

    cfg = model.config
    tile = int(tile or cfg.tile)
    overlap = min(int(cfg.tile_overlap if overlap is None else overlap), tile - 1)
    return len(tile_grid(patch_shape[-2], patch_shape[-1], tile, overlap)) * int(steps or cfg.default_steps)


@torch.no_grad()
def generate(model: Denoiser, instrument, band: str | int, n: int, size: int = 64, steps: int | None = None,
             seed: int = 0, precision: str = "auto") -> np.ndarray:
    """``n`` new source-only images (n, size, size) of one band, in network space, with no observation.

    Network space is the variance-stabilised one (:mod:`skyfm.heads.denoise.transforms`): about one unit per noise
    sigma of a typical observation.
    """
    inst = load_instrument(instrument)
    bi = band if isinstance(band, int) else inst.band_index(band)
    size = int(np.ceil(size / model.config.multiple) * model.config.multiple)
    zeros = torch.zeros(n, 1, size, size)
    feats = torch.from_numpy(np.repeat(band_features(inst, bi)[None], n, axis=0))
    gen = torch.Generator().manual_seed(int(seed))
    bf16 = use_bf16(precision, next(model.parameters()).device)
    x = model.sample(zeros, zeros, feats, steps=steps, generator=gen, bf16=bf16)
    return np.clip(x[:, 0].cpu().numpy(), 0 if inst.is_counts else None, None)


# ----------------------------------------------------------------------------------------------------------------
# Files: `skyfm denoise`
# ----------------------------------------------------------------------------------------------------------------
_STRUCTURAL = ("SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "BSCALE", "BZERO", "BLANK", "EXTNAME",
               "EXTVER", "CHECKSUM", "DATASUM", "SKYFMROL")


def _clean_header(header):
    from astropy.io import fits

    out = fits.Header()
    for card in header.cards:
        key = card.keyword
        if key in _STRUCTURAL or key.startswith("NAXIS"):
            continue
        out.append(card, end=True)
    return out


def denoise_file(path: str | Path, out: str | Path, *, instrument=None, model_dir=None, samples: int | None = None,
                 steps: int | None = None, seed: int = 0, hdu=None, band: str | None = None, tile: int | None = None,
                 progress: bool = False, overwrite: bool = True, flux_correction: str = "forced",
                 precision: str = "auto", device: str | None = "auto", mask=None, mask_bits: int | None = None) -> Path:
    """Denoise a FITS image or counts cube into ``out``: the clean image (primary HDU, same shape as the input
    image), its uncertainty (``UNCERT`` HDU), the background it removed (``BACKGROUND`` HDU,
    :func:`removed_background`), the input header and WCS, and the input's ``EBOUNDS`` if any.

    Masked or NaN input pixels are NaN in both outputs. The file is written atomically: on any error nothing is
    left at ``out``. ``flux_correction``: see :func:`denoise_patch` (recorded as header keyword ``DNFLUX``);
    ``precision`` as there; ``device`` as :func:`load_denoiser`; ``mask``, ``mask_bits``: a bad-pixel mask file
    beside the image (:func:`skyfm.data.open_image`), its pixels NaN in the outputs as the input's own masked ones.
    ``UNCERT`` is the calibrated 1-sigma error of the clean image where the model has a calibration for the
    instrument (:mod:`skyfm.heads.denoise.calibrate`), else the samples' std; NaN with one sample. Header keyword
    ``DNUNCERT`` says which (``calibrated``, ``partly calibrated``, ``spread``, ``none``), a COMMENT in the
    ``UNCERT`` header what it means.
    """
    import warnings

    from astropy.io import fits

    from skyfm.data.fits_io import ebounds_hdu
    from skyfm.data.readers import EnergyBinsWarning, MoreImagesWarning, open_fits, read_image, select_hdu
    from skyfm.utils import atomic_path

    check_flux_correction(flux_correction)
    check_precision(precision)  # a bad value fails before anything is read
    path, out = Path(path), Path(out)
    if out.exists() and not overwrite:
        raise SkyfmError(f"{out} exists")
    if out.resolve() == path.resolve():
        raise SkyfmError(f"--out {out} is the input file; choose another name")
    if out.suffix.lower() not in (".fits", ".fit", ".fts") and not out.name.lower().endswith((".fits.gz",)):
        raise SkyfmError(f"--out should be a FITS file name (.fits), got {out.name}")
    model = load_denoiser(model_dir, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch = read_image(path, instrument=instrument, hdu=hdu, band=band, mask=mask, mask_bits=mask_bits)
        with open_fits(path) as hdul:
            index = select_hdu(hdul, hdu, path)
            header = hdul[index].header.copy()
            in_shape = tuple(hdul[index].data.shape) if hdul[index].data is not None else patch.shape
            ebounds = next((h.copy() for h in hdul if h.name == "EBOUNDS"), None)
            if ebounds is not None:
                ebounds = fits.BinTableHDU(data=ebounds.data.copy(), header=ebounds.header.copy(), name="EBOUNDS")
    summed = [w for w in caught if issubclass(w.category, EnergyBinsWarning)]
    for w in summed + [w for w in caught if issubclass(w.category, MoreImagesWarning)]:
        warnings.warn(w.message, stacklevel=2)  # the other reading warnings stay quiet here, as before
    if summed:  # the output has the instrument's bands, not the input's planes
        ebounds = ebounds_hdu(patch.energy_edges_kev)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_evaluations(patch.shape, model, steps, tile), desc=f"denoising {path.name}",
                   unit="step", leave=False)
    try:
        clean, std, background = denoise_patch(patch, model, samples=samples, steps=steps, seed=seed, tile=tile,
                                               progress=None if bar is None else (lambda: bar.update(1)),
                                               flux_correction=flux_correction, precision=precision,
                                               return_background=True)
    finally:
        if bar is not None:
            bar.close()
    adu_per_unit = float(patch.meta.get("adu_per_unit", 1.0))  # back to the input's unit (e-/s: image_units)
    if adu_per_unit != 1.0:
        clean, std, background = clean / adu_per_unit, std / adu_per_unit, background / adu_per_unit
    if patch.mask is not None:
        clean[:, patch.mask] = np.nan
        std[:, patch.mask] = np.nan
        background[:, patch.mask] = np.nan
    squeeze = len(in_shape) != 3 and patch.n_bands == 1
    shape_clean = clean.reshape(in_shape) if int(np.prod(in_shape)) == clean.size else (clean[0] if squeeze else clean)
    shape_std = std.reshape(shape_clean.shape)
    shape_background = background.reshape(shape_clean.shape)
    hdr = _clean_header(header)
    hdr["DENOISED"] = (True, "source-only image from skyfm denoise")
    hdr["DNMODEL"] = (str(model_dir or "denoiser-default")[-60:], "denoiser model")
    hdr["DNSAMPLE"] = (int(samples or model.config.default_samples), "diffusion samples averaged")
    hdr["DNSTEPS"] = (int(steps or model.config.default_steps), "DDIM steps per sample")
    hdr["DNSEED"] = (int(seed), "sampling seed")
    hdr["DNFLUX"] = (flux_correction, "source flux correction (forced: aperture photometry)")
    n_samples = int(samples or model.config.default_samples)
    kind = uncertainty_kind(model.config, load_instrument(patch.instrument).name, patch.bands, flux_correction,
                            n_samples)
    hdr["DNUNCERT"] = (kind, "UNCERT: calibrated, spread or none (NaN)")
    hdr["HISTORY"] = "skyfm denoise: mean of diffusion samples of the source-only image"
    if summed:
        hdr["HISTORY"] = "skyfm denoise: the input's energy planes summed into the instrument's bands (EBOUNDS)"
    if flux_correction == "forced":
        hdr["HISTORY"] = "skyfm denoise: sources rescaled to their observed aperture flux; UNCERT with them"
    hdus = [fits.PrimaryHDU(shape_clean.astype(np.float32), header=hdr)]
    uhdr = hdr.copy()
    uhdr["COMMENT"] = f"UNCERT (same units as the primary HDU): {UNCERT_MEANING[kind]}."
    hdus.append(fits.ImageHDU(shape_std.astype(np.float32), header=uhdr, name="UNCERT"))
    bhdr = hdr.copy()
    bhdr["DNBKGSIG"] = (BACKGROUND_SMOOTHING_PIX, "BACKGROUND: Gaussian smoothing sigma (pixels)")
    bhdr["COMMENT"] = ("BACKGROUND (same units as the input): input minus the denoiser's mean source-only image "
                       "(before any flux correction), smoothed: diffuse emission, sky, unresolved sources and removed "
                       "artefacts." + (" Counts per pixel, >= 1e-3."
                                       if instrument_kind(load_instrument(patch.instrument)) == "counts" else ""))
    hdus.append(fits.ImageHDU(shape_background.astype(np.float32), header=bhdr, name="BACKGROUND"))
    if ebounds is not None:
        hdus.append(ebounds)
    with atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="silentfix")
    return out
