"""The fine-tuning recipe: a YAML file (``configs/finetune/*.yaml``) or keyword overrides.

Example (``configs/finetune/default.yaml`` trains the shipped default detector)::

    init: runs/pretrain-tiny/model   # a FoundationModel folder, a detector folder, or null (random backbone)
    model: skyfm-tiny                # the registry name used when init is null
    seed: 0
    backbone: partial                # frozen | partial | full | lora
    partial_blocks: 2                # partial: how many of the last transformer blocks train
    lora: {rank: 8, alpha: 16, dropout: 0.0, targets: [qkv, proj]}   # lora: adapters on the blocks' Linears
    data:
      size: 64                       # training patch side (pixels)
      batch_size: 12
      train_pool: null               # a finite number of distinct training patches per instrument (label-fraction runs)
      reuse: 2                       # each simulated batch serves this many steps, under random rotations / flips
      pairs: null                    # a folder of FITS images + reference catalogs instead of simulations
      instruments:                   # name or YAML path: weight (share of steps) and simulate_patch scenes
        fermi-lat: {weight: 0.3, scenes: [{weight: 0.6}, {weight: 0.4, population: real, glat: [-8, 8]}]}
        meerlicht: {weight: 0.3, scenes: [{scene: crowded, weight: 0.5}, {scene: field, weight: 0.5}]}
    train: {steps: 1500, lr: 2.0e-3, backbone_lr: 3.0e-4, weight_decay: 0.01, warmup_steps: 50, grad_clip: 1.0}
    checkpoint: {every: 250, keep: 2}
    log: {every: 10}

A scene is a dict of :func:`skyfm.data.simulate.simulate_patch` options plus ``weight`` and, for counts
instruments, ``glat`` / ``glon`` ranges (deg) from which the patch centre is drawn (e.g. the Galactic plane);
a CCD scene's ``seeing`` (arcsec) and ``psf_beta`` may be ranges ``[lo, hi]``, drawn per patch
(``skyfm.finetune.data.RANGE_OPTIONS``), e.g. ``{scene: crowded, seeing: [1.6, 4.5], psf_beta: [2.5, 5.0]}``.
Each step simulates one batch of one instrument (drawn by weight): patches of one instrument share a band layout,
so no compute is spent on padding bands.

Seeds: training patch ``j`` of batch ``s`` (steps ``s * reuse`` ..) uses simulator seed
``TRAIN_SEED_BASE + SEED_STRIDE * seed + s * batch_size + j`` (with ``train_pool``: ``... + k`` for k < train_pool);
validation uses ``VAL_SEED_BASE + i``. The ranges never meet for recipe seeds below 80.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from skyfm.errors import SkyfmError
from skyfm.utils import read_yaml

TRAIN_SEED_BASE = 100_000_000
SEED_STRIDE = 10_000_000  # runs with different `seed` draw disjoint simulator seeds
VAL_SEED_BASE = 900_000_000
BUILTIN_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"
# frozen / partial / full: SourceDetector.set_backbone_mode; lora: skyfm.finetune.lora.apply_lora
FINETUNE_BACKBONE_MODES = ("frozen", "partial", "full", "lora")


@dataclass
class TrainSection:
    steps: int = 300
    lr: float = 2.0e-3
    backbone_lr: float = 3.0e-4
    weight_decay: float = 0.01
    warmup_steps: int = 30
    grad_clip: float = 1.0
    threads: int | None = None


@dataclass
class DataSection:
    size: int = 64
    batch_size: int = 8
    train_pool: int | None = None
    reuse: int = 1
    pairs: str | None = None
    instruments: dict = field(default_factory=dict)


@dataclass
class LoraSection:
    """``backbone: lora`` (:mod:`skyfm.finetune.lora`): rank r, scale alpha / r, adapter dropout and which Linear
    layers of each transformer block get adapters (``qkv``, ``proj``: attention; ``fc1``, ``fc2``: MLP). The
    adapters train at ``train.backbone_lr``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["qkv", "proj"])

    def validate(self, source: str) -> None:
        from skyfm.finetune.lora import LORA_TARGETS

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SkyfmError(f"{source}: lora.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise SkyfmError(f"{source}: lora.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SkyfmError(f"{source}: lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = [self.targets] if isinstance(self.targets, str) else self.targets
        if (not isinstance(targets, (list, tuple)) or not targets
                or any(t not in LORA_TARGETS for t in targets) or len(set(targets)) != len(targets)):
            raise SkyfmError(f"{source}: lora.targets must be a list of distinct names from "
                             f"{', '.join(LORA_TARGETS)}, got {self.targets!r}")
        self.targets = list(targets)
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)


@dataclass
class FinetuneConfig:
    init: str | None = None
    model: str = "skyfm-tiny"
    seed: int = 0
    backbone: str = "partial"
    partial_blocks: int = 2
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: dict = field(default_factory=lambda: {"every": 250, "keep": 2})
    log: dict = field(default_factory=lambda: {"every": 10})
    detector: dict = field(default_factory=dict)  # DetectorConfig overrides (trunk_channels, loss_weights, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "recipe") -> "FinetuneConfig":
        raw = copy.deepcopy(raw or {})
        if not isinstance(raw, dict):
            raise SkyfmError(f"{source}: a fine-tuning recipe is a mapping of keys")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SkyfmError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            data = DataSection(**(raw.pop("data", None) or {}))
            train = TrainSection(**(raw.pop("train", None) or {}))
            lora = raw.pop("lora", None) or {}
            if not isinstance(lora, dict):
                raise SkyfmError(f"{source}: lora is a mapping (rank, alpha, dropout, targets), got {lora!r}")
            config = cls(data=data, train=train, lora=LoraSection(**lora), **raw)
        except TypeError as e:
            raise SkyfmError(f"{source}: {e}") from None
        if isinstance(config.init, str) and config.init.strip().lower() in ("", "none", "null", "scratch", "random"):
            config.init = None  # a randomly initialised backbone (the from-scratch baseline)
        config.validate(source)
        return config

    def validate(self, source: str = "recipe") -> None:
        if self.backbone not in FINETUNE_BACKBONE_MODES:
            raise SkyfmError(f"{source}: backbone must be one of {', '.join(FINETUNE_BACKBONE_MODES)}, "
                             f"got {self.backbone!r}")
        self.lora.validate(source)
        if self.data.size % 8 or self.data.size < 16:
            raise SkyfmError(f"{source}: data.size must be a multiple of 8 pixels (>= 16), got {self.data.size}")
        if not self.data.instruments and not self.data.pairs:
            raise SkyfmError(f"{source}: name at least one instrument (data.instruments or --instrument)")
        if self.train.steps < 1 or self.data.batch_size < 1:
            raise SkyfmError(f"{source}: train.steps and data.batch_size must be >= 1")

    def instrument_specs(self) -> dict[str, dict]:
        """{instrument: {"weight": w, "scenes": [options...]}} with defaults filled in."""
        out = {}
        for name, spec in self.data.instruments.items():
            spec = dict(spec or {})
            scenes = spec.get("scenes") or [{}]
            out[name] = {"weight": float(spec.get("weight", 1.0)), "scenes": [dict(s) for s in scenes]}
        return out


def load_finetune_config(path_or_name: str | Path | None = None, instruments: list[str] | None = None,
                         **overrides) -> FinetuneConfig:
    """A recipe from a YAML path or a built-in name (``default``), with top-level or dotted overrides applied.

    ``instruments`` restricts training to these (names or YAML paths); each keeps its scenes from the recipe when
    the recipe has it, else it gets the simulator's defaults.
    """
    raw: dict = {}
    source = "recipe"
    if path_or_name is not None:
        path = Path(path_or_name)
        if not path.suffix and not path.exists():
            path = BUILTIN_DIR / f"{path_or_name}.yaml"
        raw = read_yaml(path, "fine-tuning recipe") or {}
        source = str(path)
    if instruments:
        known = (raw.get("data") or {}).get("instruments") or {}
        raw.setdefault("data", {})["instruments"] = {n: dict(known.get(n) or {"weight": 1.0}) for n in instruments}
    for key, value in overrides.items():
        if value is None:
            continue
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section in the YAML (`lora:`)
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return FinetuneConfig.from_dict(raw, source)


__all__ = ["FINETUNE_BACKBONE_MODES", "FinetuneConfig", "LoraSection", "TRAIN_SEED_BASE", "VAL_SEED_BASE",
           "load_finetune_config"]
