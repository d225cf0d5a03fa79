"""The foundation model: tokenizer + ViT or attention-U-Net backbone, the registry, save / load.

``create_model(name)`` builds a registered model (``list_models()``); ``FoundationModel.from_pretrained(dir)``
loads a saved one. See :mod:`skyfm.foundation.model` for the forward pass and the pretraining objective.
"""

from skyfm.foundation.config import FoundationConfig, TokenizerConfig, UNetConfig, ViTConfig
from skyfm.foundation.model import FoundationModel, FoundationOutput, sample_token_mask
from skyfm.foundation.registry import create_model, list_models, model_config, register_model

__all__ = [
    "FoundationConfig",
    "FoundationModel",
    "FoundationOutput",
    "TokenizerConfig",
    "UNetConfig",
    "ViTConfig",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
    "sample_token_mask",
]
