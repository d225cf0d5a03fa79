"""Named model configurations and the factory, in the style of timm's ``create_model``.

    >>> import skyfm
    >>> skyfm.list_models()
    ['skyfm-base', 'skyfm-tiny', 'skyfm-unet-base', 'skyfm-unet-tiny']
    >>> model = skyfm.create_model("skyfm-tiny")                                   # random weights
    >>> model = skyfm.create_model("skyfm-tiny", pretrained_dir="runs/tiny/model")  # trained weights
    >>> model = skyfm.create_model("skyfm-tiny", backbone={"depth": 4})            # a variant

A registered function returns a :class:`~skyfm.foundation.config.FoundationConfig`; ``@register_model`` adds it.

* ``skyfm-tiny``: ViT, D=128, 6 blocks, 8-pixel tokens, 2.0 M parameters; trains on a 2-core CPU.
* ``skyfm-unet-tiny``: attention U-Net of the same budget, 2.2 M parameters.
* ``skyfm-base``: ViT, D=768, 12 blocks (ViT-B), 100 M parameters; for GPUs.
* ``skyfm-unet-base``: attention U-Net, 103 M parameters; for GPUs.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable

from skyfm.errors import SkyfmError
from skyfm.foundation.config import FoundationConfig, TokenizerConfig, UNetConfig, ViTConfig

_REGISTRY: dict[str, Callable[[], FoundationConfig]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register ``fn() -> FoundationConfig`` under ``name``."""

    def wrap(fn: Callable[[], FoundationConfig]) -> Callable[[], FoundationConfig]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; optionally filtered by a shell pattern (``"*unet*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_config(name: str, **overrides) -> FoundationConfig:
    """The config of a registered model with ``overrides`` applied (see :meth:`FoundationConfig.replace`)."""
    if name not in _REGISTRY:
        raise SkyfmError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    config = _REGISTRY[name]()
    config.name = name
    return config.replace(**overrides) if overrides else config


def create_model(name: str, pretrained_dir: str | Path | None = None, map_location="cpu", **overrides):
    """Build a registered model, randomly initialised or loaded from ``pretrained_dir``.

    With ``pretrained_dir``, the folder's ``config.json`` defines the architecture; it must have been made from
    ``name`` (else SkyfmError), and ``overrides`` may only change fields that keep the weights' shapes.
    """
    from skyfm.foundation.model import FoundationModel

    if pretrained_dir is None:
        return FoundationModel(model_config(name, **overrides))
    if name not in _REGISTRY:
        raise SkyfmError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = FoundationModel.from_pretrained(pretrained_dir, map_location=map_location, **overrides)
    if model.config.name != name:
        raise SkyfmError(f"{pretrained_dir} holds a {model.config.name!r} model, not {name!r}")
    return model


# -------------------------------------------------------------------------------------------------- models
@register_model("skyfm-tiny")
def skyfm_tiny() -> FoundationConfig:
    """ViT, 2.0 M parameters: 4-pixel latent cells, 2x2 cells per token, D=128, depth 6."""
    return FoundationConfig(
        tokenizer=TokenizerConfig(downsample=4, channels=(16, 32, 64), num_res_blocks=1, latent_dim=16,
                                  codebook_size=512),
        backbone=ViTConfig(embed_dim=128, depth=6, num_heads=4, token_patch=2, pos_frequencies=24,
                           decoder_channels=(64, 32), stem_channels=16, dense_dim=32),
    )


@register_model("skyfm-unet-tiny")
def skyfm_unet_tiny() -> FoundationConfig:
    """Attention U-Net, 2.2 M parameters: levels at strides 2-8, attention at stride 8, D=128."""
    return FoundationConfig(
        tokenizer=TokenizerConfig(downsample=4, channels=(16, 32, 64), num_res_blocks=1, latent_dim=16,
                                  codebook_size=512),
        backbone=UNetConfig(channels=(32, 64, 128), num_res_blocks=1, attention_levels=1, attention_depth=2,
                            num_heads=4, embed_dim=128, stem_channels=16, dense_dim=32),
    )


@register_model("skyfm-base")
def skyfm_base() -> FoundationConfig:
    """ViT-B over band x position tokens, 100 M parameters; for GPUs."""
    return FoundationConfig(
        tokenizer=TokenizerConfig(downsample=4, channels=(64, 128, 256), num_res_blocks=2, latent_dim=32,
                                  codebook_size=1024, ema_decay=0.99),
        backbone=ViTConfig(embed_dim=768, depth=12, num_heads=12, token_patch=2, drop_path_rate=0.1,
                           pos_frequencies=48, band_frequencies=10, decoder_channels=(256, 128),
                           stem_channels=32, dense_dim=64),
    )


@register_model("skyfm-unet-base")
def skyfm_unet_base() -> FoundationConfig:
    """Attention U-Net, 103 M parameters, attention at strides 4 and 8; for GPUs."""
    return FoundationConfig(
        tokenizer=TokenizerConfig(downsample=4, channels=(64, 128, 256), num_res_blocks=2, latent_dim=32,
                                  codebook_size=1024, ema_decay=0.99),
        backbone=UNetConfig(channels=(192, 384, 768), num_res_blocks=2, attention_levels=2, attention_depth=3,
                            num_heads=12, embed_dim=768, pos_frequencies=48, band_frequencies=10, stem_channels=32,
                            dense_dim=64, drop_path_rate=0.1),
    )


__all__ = ["create_model", "list_models", "model_config", "register_model"]
