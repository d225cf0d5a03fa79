"""The diffusion denoising head: sample the source-only image of an observed patch, with its uncertainty.

* :class:`Denoiser` / :class:`DenoiserConfig` (:mod:`.model`): a small diffusers ``UNet2DModel`` predicting the
  clean image, DDPM for training and DDIM for few-step sampling.
* :mod:`.transforms`: the variance-stabilised spaces (Anscombe for counts, background-normalised asinh for CCDs).
* :func:`denoise_patch`, :func:`denoise_file` (:mod:`.apply`): any size of image, tiled; mean and std of samples,
  then (by default) forced photometry of each source against the data (:mod:`.flux`), so that fluxes are kept;
  the spread of the samples made a calibrated 1-sigma error per instrument and band (:mod:`.calibrate`, chosen on
  validation seeds and stored in the model's config.json).
* :func:`train_denoiser` (:mod:`.train`): seeded, resumable training on simulated patches.
* :func:`load_denoiser`: the default denoiser shipped in ``skyfm/resources/models/denoiser-default``, or yours.
"""

from __future__ import annotations

from skyfm.heads.denoise.model import Denoiser, DenoiserConfig


def __getattr__(name):
    if name in ("denoise_patch", "denoise_file", "load_denoiser", "default_model_dir", "generate"):
        from skyfm.heads.denoise import apply

        return getattr(apply, name)
    if name in ("train_denoiser", "TrainConfig"):
        from skyfm.heads.denoise import train

        return getattr(train, name)
    raise AttributeError(f"module 'skyfm.heads.denoise' has no attribute {name!r}")


__all__ = ["Denoiser", "DenoiserConfig", "TrainConfig", "default_model_dir", "denoise_file", "denoise_patch",
           "generate", "load_denoiser", "train_denoiser"]
