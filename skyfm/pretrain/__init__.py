"""Self-supervised pretraining of the foundation model across instruments (see :mod:`skyfm.pretrain.train`)."""

from skyfm.pretrain.config import PretrainConfig, config_from_dict, load_pretrain_config

__all__ = ["PretrainConfig", "config_from_dict", "load_pretrain_config", "pretrain"]


def __getattr__(name):
    if name == "pretrain":  # imports torch and accelerate: only when asked for
        from skyfm.pretrain.train import pretrain

        return pretrain
    raise AttributeError(name)
