"""skyfm: a foundation model for finding astrophysical sources in sky images across wavelengths."""

__version__ = "0.1.0"

# The model API is imported on first use, so that `import skyfm` (and the command line) stays fast and does not
# import torch.
_LAZY = {
    "create_model": "skyfm.foundation.registry",
    "list_models": "skyfm.foundation.registry",
    "FoundationModel": "skyfm.foundation.model",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skyfm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
