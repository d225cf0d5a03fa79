"""Fine-tune detector heads (and some or all of the backbone, or LoRA adapters on it) with accelerate: seeded,
resumable, logged.

The loop imitates :mod:`skyfm.pretrain.train`: build the model, ``accelerator.prepare``, then
``forward -> loss -> backward -> step`` with a warm-up + cosine schedule, ``save_state`` checkpoints every N steps
(complete ones have a ``trainer_state.json``) and ``metrics.csv``. Each step's batch is a pure function of
(seed, step) (:mod:`skyfm.finetune.data`), so a run resumed from a checkpoint sees exactly the batches it would
have seen.

Writes into OUT: ``recipe.json``, ``checkpoints/step_N/``, ``metrics.csv`` and ``model/`` (the detector:
``config.json`` + ``model.safetensors``).

``backbone: lora`` (:mod:`skyfm.finetune.lora`): the checkpoints hold the LoRA adapters next to the frozen base
weights; ``model/`` holds the merged detector (``W + (alpha / r) B A``), with the ordinary keys.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from skyfm.errors import SkyfmError
from skyfm.finetune.config import FinetuneConfig
from skyfm.pretrain.train import TRAINER_STATE, CsvLog, checkpoint_dirs, save_checkpoint


def lr_factor(step: int, config: FinetuneConfig) -> float:
    t = config.train
    warm = max(1, min(t.warmup_steps, t.steps // 5 or 1))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(t.steps - warm, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_detector(config: FinetuneConfig, instruments: list):
    """The detector to train: from a detector folder (heads kept, new instruments added), from a FoundationModel
    folder (fresh heads), or from a random backbone (``init: null``)."""
    from skyfm.foundation import create_model
    from skyfm.foundation.model import FoundationModel
    from skyfm.heads import SourceDetector
    from skyfm.heads.config import DetectorConfig

    init = config.init
    if init is not None:
        path = Path(init)
        if not (path / "config.json").is_file():
            raise SkyfmError(f"--init {init}: no model there (expected config.json + model.safetensors)")
        raw = json.loads((path / "config.json").read_text())
        if isinstance(raw, dict) and "foundation" in raw:
            det = SourceDetector.from_pretrained(path)
            for inst in instruments:
                det.add_instrument(inst)
            return det
        foundation = FoundationModel.from_pretrained(path)
    else:
        foundation = create_model(config.model)
    overrides = dict(config.detector)
    det = SourceDetector.from_foundation(foundation, instruments, **overrides)
    assert isinstance(det.config, DetectorConfig)
    return det


def set_trainable(det, config: FinetuneConfig) -> dict[str, int]:
    """Apply ``config.backbone`` to ``det`` (a LoRA backbone gets its adapters here); returns the parameter counts
    of :func:`~skyfm.finetune.lora.count_parameters`."""
    from skyfm.finetune.lora import apply_lora, count_parameters

    if config.backbone == "lora":
        lo = config.lora
        apply_lora(det, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets)
    else:
        det.set_backbone_mode(config.backbone, config.partial_blocks)
    return count_parameters(det)


def collate_targets(det, patches, batch) -> dict[str, torch.Tensor]:
    """Stacked :func:`~skyfm.heads.targets.build_targets` maps of a batch of patches."""
    from skyfm.heads.targets import build_targets

    maps = []
    H, W = batch["scaled"].shape[-2:]
    for i, p in enumerate(patches):
        head = det.head_config(batch["head_instrument"][i])
        maps.append(build_targets(p.truth, (H, W), head, list(p.bands), batch["flux_units"][i], det.config,
                                  contaminant=p.contaminant_mask, pixel_mask=p.mask))
    nb = max(m["band_flux"].shape[0] for m in maps)
    out = {}
    for key in maps[0]:
        if key == "band_flux":
            arr = np.full((len(maps), nb, H, W), np.nan, np.float32)
            for i, m in enumerate(maps):
                arr[i, : m[key].shape[0]] = m[key]
        else:
            arr = np.stack([m[key] for m in maps])
        out[key] = torch.from_numpy(arr)
    return out


def finetune(config: FinetuneConfig, out_dir: str | Path, *, max_steps: int | None = None, resume: bool = True,
             progress: bool = True) -> Path:
    """Train a detector on ``config`` (see :mod:`skyfm.finetune.config`); returns OUT/model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from skyfm.finetune.data import PairCrops, augment, simulated_patches
    from skyfm.instruments import load_instrument

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    if config.train.threads:
        torch.set_num_threads(int(config.train.threads))
    out = Path(out_dir)
    t = config.train
    stop_at = min(max_steps or t.steps, t.steps)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        previous = out / "recipe.json"
        if previous.exists() and resume and _recipe(previous) != config.to_dict():
            raise SkyfmError(f"{out} holds a run with a different recipe; use a new --out or --no-resume")
        previous.write_text(config.to_json())
    set_seed(config.seed)

    pairs = PairCrops(config.data.pairs, size=config.data.size,
                      instrument=(next(iter(config.data.instruments)) if config.data.instruments else None)) \
        if config.data.pairs else None
    specs = config.instrument_specs()
    instruments = {}
    for name in specs:
        inst = load_instrument(name)
        instruments[inst.name] = inst
    specs = {load_instrument(n).name: v for n, v in specs.items()}
    names = list(instruments) if pairs is None else [pairs.instrument]
    det = build_detector(config, [instruments.get(n, n) for n in names])
    counts = set_trainable(det, config)
    accelerator.print(f"backbone: {config.backbone}; trainable parameters: {counts['trainable']:,} of "
                      f"{counts['total']:,} (trunk + heads {counts['heads']:,}, backbone {counts['backbone']:,}"
                      + (f", all in LoRA adapters of rank {config.lora.rank}" if config.backbone == "lora" else "")
                      + ")")
    det.config.training = {"recipe": config.to_dict(), "command": os.environ.get("SKYFM_COMMAND", ""),
                           "trainable_parameters": counts["trainable"]}

    head_params = [p for n, p in det.named_parameters() if not n.startswith("foundation.")]
    backbone_params = [p for n, p in det.named_parameters() if n.startswith("foundation.") and p.requires_grad]
    groups = [{"params": head_params, "lr": t.lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": t.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    det, optimizer = accelerator.prepare(det, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    checkpoints = checkpoint_dirs(out) if resume else []
    step = 0
    if checkpoints:
        saved = json.loads((checkpoints[-1] / TRAINER_STATE).read_text())
        accelerator.load_state(str(checkpoints[-1]))
        step = int(saved["step"])
        accelerator.print(f"resumed from {checkpoints[-1]} (step {step})")
    model = accelerator.unwrap_model(det)
    log = CsvLog(out / "metrics.csv", step, enabled=accelerator.is_main_process)
    bar = tqdm(total=stop_at, initial=step, desc="fine-tuning", unit="step",
               disable=not (progress and accelerator.is_main_process))
    started, n_patches, sim_s = time.perf_counter(), 0, 0.0
    model.train()
    every = int(config.log.get("every", 10))
    reuse = max(1, int(config.data.reuse))
    cached: tuple[int, list] | None = None
    while step < stop_at:
        t0 = time.perf_counter()
        if pairs is not None:
            patches = pairs.batch(config.seed, step, config.data.batch_size)
        else:
            index = step // reuse
            if cached is None or cached[0] != index:
                cached = (index, simulated_patches(config, index, instruments, specs))
            patches = cached[1]
            if step % reuse:
                ks = np.random.default_rng([config.seed, step, 5]).integers(1, 8, len(patches))
                patches = [augment(p, int(k)) for p, k in zip(patches, ks)]
        batch = model.make_batch(patches)
        targets = collate_targets(model, patches, batch)
        sim_s += time.perf_counter() - t0
        batch = {k: (v.to(accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        targets = {k: v.to(accelerator.device) for k, v in targets.items()}
        outputs = det(batch)
        losses = model.loss(outputs, targets)
        if not torch.isfinite(losses["loss"]):
            raise SkyfmError(f"the loss became {float(losses['loss'])} at step {step}; lower train.lr")
        accelerator.backward(losses["loss"])
        if t.grad_clip > 0:
            accelerator.clip_grad_norm_(det.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_patches += len(patches)
        bar.update(1)
        if step % every == 0 or step == stop_at:
            elapsed = time.perf_counter() - started
            row = {"step": step, "instrument": batch["head_instrument"][0], "lr": scheduler.get_last_lr()[0],
                   **{k: float(v.detach()) for k, v in losses.items()}, "patches_per_s": n_patches / max(elapsed, 1e-9),
                   "simulate_fraction": sim_s / max(elapsed, 1e-9)}
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", heat=f"{row['heat_loss']:.3f}")
        if step % int(config.checkpoint.get("every", 250)) == 0 or step == stop_at:
            save_checkpoint(accelerator, out, step, {"step": step, "world_size": accelerator.num_processes},
                            int(config.checkpoint.get("keep", 2)))
    bar.close()
    model.eval()
    model_dir = out / "model"
    if config.backbone == "lora":
        from skyfm.finetune.lora import merge_lora

        merge_lora(model)  # training is over: fold the adapters in, so model/ loads without peft
    if accelerator.is_main_process:
        model.save_pretrained(model_dir)
    accelerator.wait_for_everyone()
    return model_dir


def _recipe(path: Path) -> dict:
    """A saved recipe as :meth:`FinetuneConfig.to_dict` writes it today (keys added since get their defaults)."""
    return FinetuneConfig.from_dict(json.loads(path.read_text()), str(path)).to_dict()


def export_checkpoint(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """The detector of a run's last complete checkpoint, saved as a model folder (default RUN/model-step_N):
    for a run stopped before its last step."""
    from safetensors.torch import load_file

    from skyfm.instruments import load_instrument

    run = Path(run_dir)
    checkpoints = checkpoint_dirs(run)
    if not checkpoints:
        raise SkyfmError(f"{run} has no complete checkpoint")
    config = FinetuneConfig.from_dict(json.loads((run / "recipe.json").read_text()), str(run / "recipe.json"))
    names = [load_instrument(n) for n in config.instrument_specs()]
    det = build_detector(config, names)
    if config.backbone == "lora":
        set_trainable(det, config)  # the checkpoint holds the adapters
    state = load_file(str(checkpoints[-1] / "model.safetensors"))
    det.load_state_dict(state, strict=True)
    if config.backbone == "lora":
        from skyfm.finetune.lora import merge_lora

        merge_lora(det)
    step = json.loads((checkpoints[-1] / TRAINER_STATE).read_text())["step"]
    det.config.training = {"recipe": config.to_dict(), "command": os.environ.get("SKYFM_COMMAND", ""),
                           "stopped_at_step": step}
    out = Path(out_dir) if out_dir else run / f"model-step_{step}"
    det.eval().save_pretrained(out)
    return out


__all__ = ["build_detector", "collate_targets", "export_checkpoint", "finetune", "lr_factor", "set_trainable"]
