"""The pretraining recipe: one YAML file (`configs/pretrain/*.yaml`) read into a validated dataclass.

A recipe says which model to build, which data to stream (an existing shard set, or instruments to simulate into
one), and how to train: batch size, steps, the two stages, learning rate, checkpoints and logging. Everything
that changes the result is in the recipe, so a run is reproduced by its recipe, its seed and the number of
processes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from skyfm.errors import SkyfmError
from skyfm.utils import read_yaml


@dataclass
class DataConfig:
    """Where training patches come from.

    ``shards``: a folder (or list of folders) holding a shard set with its ``manifest.json``. When empty, the run
    simulates ``simulate`` (instrument name -> number of patches) at ``size`` pixels into ``OUT/shards`` once, on
    the main process, and streams that. ``weights`` mixes instruments (relative, any scale); by default each
    instrument is drawn in proportion to its number of patches.
    """

    shards: list[str] = field(default_factory=list)
    simulate: dict[str, int] = field(default_factory=dict)
    size: int = 64
    per_shard: int = 500
    weights: dict[str, float] = field(default_factory=dict)
    shuffle_buffer: int = 256
    num_workers: int = 0


@dataclass
class TrainConfig:
    """How to optimise.

    Stage 1 (the first ``tokenizer_steps`` optimizer steps) trains the VQ-VAE tokenizer alone; stage 2 freezes it
    and trains the backbone to predict the codes of masked tokens. Each stage has its own linear warm-up and
    cosine decay. ``batch_size`` is per process; the effective batch is batch_size x processes x grad_accum.
    """

    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 2000
    tokenizer_steps: int = 500
    lr: float = 1e-3
    tokenizer_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    mask_ratio: float = 0.5
    grad_clip: float = 1.0
    mixed_precision: str = "no"


@dataclass
class CheckpointConfig:
    every: int = 200
    keep: int = 2


@dataclass
class LogConfig:
    every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])


@dataclass
class PretrainConfig:
    model: str = "skyfm-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "checkpoint": CheckpointConfig, "log": LogConfig}


def _build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and coercing scalars to the field's type."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SkyfmError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SkyfmError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    values = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        where_key = f"{where}.{key}"
        if key in _SECTIONS and cls is PretrainConfig:
            values[key] = _build(_SECTIONS[key], value, where_key)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise SkyfmError(f"{where_key}: expected true or false, got {value!r}")
            values[key] = value
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise SkyfmError(f"{where_key}: expected a number, got {value!r}") from None
            if isinstance(default, int) and number != int(number):
                raise SkyfmError(f"{where_key}: expected a whole number, got {value!r}")
            values[key] = int(number) if isinstance(default, int) else number
        elif isinstance(default, list):
            values[key] = [str(v) for v in ([value] if isinstance(value, str) else (value or []))]
        elif isinstance(default, dict):
            if not isinstance(value or {}, dict):
                raise SkyfmError(f"{where_key}: expected a mapping, got {value!r}")
            values[key] = dict(value or {})
        else:
            values[key] = value
    return cls(**values)


def validate(config: PretrainConfig, where: str) -> PretrainConfig:
    t, d = config.train, config.data
    if t.batch_size < 1 or t.grad_accum < 1 or t.max_steps < 1:
        raise SkyfmError(f"{where}: train.batch_size, train.grad_accum and train.max_steps must be >= 1")
    if not 0 <= t.tokenizer_steps <= t.max_steps:
        raise SkyfmError(f"{where}: train.tokenizer_steps must be between 0 and train.max_steps ({t.max_steps})")
    if not 0.0 < t.mask_ratio < 1.0:
        raise SkyfmError(f"{where}: train.mask_ratio must be between 0 and 1, got {t.mask_ratio}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise SkyfmError(f"{where}: train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    if not d.shards and not d.simulate:
        raise SkyfmError(f"{where}: data needs 'shards' (a shard folder) or 'simulate' (instrument: count)")
    if d.size < 16 or d.size % 8:
        raise SkyfmError(f"{where}: data.size must be a multiple of 8 and >= 16, got {d.size}")
    unknown_trackers = set(config.log.trackers) - {"csv", "tensorboard"}
    if unknown_trackers:
        raise SkyfmError(f"{where}: log.trackers may hold csv and tensorboard, not {sorted(unknown_trackers)}")
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise SkyfmError(f"{where}: checkpoint.every and checkpoint.keep must be >= 1")
    return config


def builtin_pretrain_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "pretrain"


def load_pretrain_config(path_or_name: str | Path) -> PretrainConfig:
    """Read a recipe from a YAML path, or by name from the built-in recipes (``tiny``, ``base``)."""
    path = Path(path_or_name)
    if not path.exists() and not path.suffix:
        path = builtin_pretrain_dir() / f"{path_or_name}.yaml"
    raw = read_yaml(path, "pretraining recipe")
    return validate(_build(PretrainConfig, raw, str(path)), str(path))


def config_from_dict(raw: dict, where: str = "<config>") -> PretrainConfig:
    return validate(_build(PretrainConfig, raw, where), where)
