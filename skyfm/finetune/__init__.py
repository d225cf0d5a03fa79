"""Fine-tuning the detector heads per instrument (frozen, partly unfrozen, fully trained or LoRA backbone), on
simulated patches of any instrument (a new telescope is a YAML file) or on the user's FITS + reference-catalog pairs.

    from skyfm.finetune import finetune, load_finetune_config
    cfg = load_finetune_config("default", **{"train.steps": 100})
    model_dir = finetune(cfg, "runs/detector")

Command line: ``skyfm finetune --instrument NAME|telescope.yaml --init DIR --out DIR``.
"""

from skyfm.finetune.config import TRAIN_SEED_BASE, VAL_SEED_BASE, FinetuneConfig, load_finetune_config
from skyfm.finetune.train import build_detector, finetune

__all__ = ["FinetuneConfig", "TRAIN_SEED_BASE", "VAL_SEED_BASE", "build_detector", "finetune",
           "load_finetune_config"]
