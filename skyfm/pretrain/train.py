"""Self-supervised pretraining across instruments, with accelerate.

One training function, as in accelerate's examples: build the model and the data stream, ``prepare``, then loop
``forward -> backward -> step`` with gradient accumulation, save the full state every N steps and resume from the
last one. The same code runs on this CPU in one process, on two CPU processes (gloo), and on many GPUs and
machines (NCCL) under ``accelerate launch``.

Two stages, told apart by the step number alone (so a resumed run knows where it is):

1. steps [0, tokenizer_steps): the VQ-VAE tokenizer learns to reconstruct every band of every instrument;
2. steps [tokenizer_steps, max_steps): the tokenizer is frozen and the backbone predicts the codes of masked
   (band, cell) tokens from the visible ones (masked token modeling, as BEiT / 4M / AION-1); with the model's
   ``denoise_loss_weight > 0`` it sees one of two independent noisy copies of each image and every token also
   regresses its pixels of the other (:mod:`skyfm.pretrain.noise_split`).

Exact resume: the data order is a pure function of (seed, rank, world size, samples consumed), the token masks of
step s come from a generator seeded by (seed, s, rank), and accelerate's ``save_state`` keeps the model, optimizer,
scheduler and RNG states. A run killed with SIGKILL and restarted continues from its last complete checkpoint with
the same batches and the same losses.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skyfm.errors import SkyfmError
from skyfm.pretrain.config import PretrainConfig

TRAINER_STATE = "trainer_state.json"


def stage_of(step: int, config: PretrainConfig) -> int:
    """1 while the tokenizer trains, 2 once the backbone does."""
    return 1 if step < config.train.tokenizer_steps else 2


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up then cosine decay, restarted per stage."""
    t = config.train
    start, end = (0, t.tokenizer_steps) if stage_of(step, config) == 1 else (t.tokenizer_steps, t.max_steps)
    base = t.tokenizer_lr / t.lr if stage_of(step, config) == 1 else 1.0
    local, length = step - start, max(end - start, 1)
    warmup = min(t.warmup_steps, max(length // 10, 1))
    if local < warmup:
        return base * (local + 1) / warmup
    progress = (local - warmup) / max(length - warmup, 1)
    return base * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def mask_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The token-mask generator of one step on one rank: a pure function of its arguments (so resume is exact)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


class PretrainObjective(nn.Module):
    """The model under the objective of its stage; the one module accelerate wraps (DDP needs one forward).

    Returns a dict of scalar tensors with at least ``loss``.
    """

    def __init__(self, model: nn.Module, mask_ratio: float):
        super().__init__()
        self.model = model
        self.mask_ratio = mask_ratio

    def forward(self, batch: dict, stage: int, generator: torch.Generator | None = None) -> dict:
        if stage == 1:
            weights = None
            if "source" in batch:  # simulated shards: weight the pixels where true sources are, so faint ones survive
                from skyfm.tokenizers.vqvae import source_weights

                weights = source_weights(batch["image"], batch["source"], batch["band_valid"])
            out = self.model.tokenizer(batch["scaled"], batch["band_valid"], weights=weights)
            return {"loss": out.loss, "recon_loss": out.recon_loss, "source_loss": out.source_loss,
                    "commit_loss": out.commit_loss,
                    "perplexity": out.perplexity.detach(), "codebook_usage": torch.as_tensor(out.usage)}
        denoise_target = None
        if self.model.config.denoise_loss_weight > 0:  # the backbone sees one noisy copy and regresses the other
            from skyfm.pretrain.noise_split import noise_split

            scaled, denoise_target = noise_split(batch, generator)
            batch = {**batch, "scaled": scaled}
        return self.model.pretraining_loss(batch, mask_ratio=self.mask_ratio, generator=generator,
                                           denoise_target=denoise_target)


def set_stage(model: nn.Module, stage: int) -> None:
    """Stage 1 trains the tokenizer (the backbone gets no gradients); stage 2 freezes it, codebook included."""
    model.set_tokenizer_trainable(stage == 1)
    model.train()


def param_checksum(model: nn.Module) -> torch.Tensor:
    """(2,) float64: the sum and the sum of squares of every parameter; equal on all ranks when they are in sync."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    return torch.stack([flat.sum(), (flat * flat).sum()])


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its trainer_state.json exists)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file() and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, out_dir: Path, step: int, state: dict, keep: int) -> Path:
    """accelerate's save_state into a temporary folder, then an atomic rename; old checkpoints pruned."""
    final = out_dir / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------- metrics


class CsvLog:
    """metrics.csv on the main process; on resume, rows after the resumed checkpoint are dropped first."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled, self.columns = path, enabled, None
        if not enabled:
            return
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if rows:
                self.columns = list(rows[0])
            with open(path, "w", newline="") as f:
                if rows:
                    writer = csv.DictWriter(f, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows(rows)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        new = [k for k in row if k not in (self.columns or [])]
        if new:  # a new stage logs new quantities: rewrite the file with the wider header
            rows = []
            if self.columns is not None:
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.columns = (self.columns or []) + new
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.csv as dicts of floats (step as int)."""
    with open(Path(out_dir) / "metrics.csv", newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------------ data


def prepare_shards(config: PretrainConfig, out_dir: Path, accelerator) -> list[str]:
    """The shard folders to stream: the recipe's, or simulated once into OUT/shards by the main process."""
    from skyfm.data.shards import write_simulated_shards

    if config.data.shards:
        missing = [s for s in config.data.shards if not (Path(s) / "manifest.json").is_file()]
        if missing:
            raise SkyfmError(f"no shard set (manifest.json) in {missing[0]}")
        return list(config.data.shards)
    target = out_dir / "shards"
    if accelerator.is_main_process and not (target / "manifest.json").is_file():
        write_simulated_shards(target, dict(config.data.simulate), seed=config.seed, size=config.data.size,
                               patches_per_shard=config.data.per_shard, progress=True)
    accelerator.wait_for_everyone()
    return [str(target)]


def make_loader(config: PretrainConfig, shard_dirs: list[str], rank: int, world_size: int, batches_done: int,
                with_targets: bool = False):
    """An endless, deterministic stream of collated batches for this rank, positioned after ``batches_done``.

    DataLoader workers hand out batches in turn, each from its own part of the stream, so the position after n
    batches is known without reading them: worker w has made n // W (+1 for the first n % W) batches.
    ``with_targets`` also reads the source-only images (for the tokenizer's source-weighted loss).
    """
    from skyfm.data.shards import ShardDataset, collate_patches

    dataset = ShardDataset(shard_dirs, instrument_weights=config.data.weights or None,
                           shuffle_buffer=config.data.shuffle_buffer, seed=config.seed, rank=rank,
                           world_size=world_size, resample=True, with_truth=False, with_targets=with_targets)
    if batches_done:
        workers, size = max(config.data.num_workers, 1), config.train.batch_size
        consumed = [size * (batches_done // workers + (w < batches_done % workers)) for w in range(workers)]
        state = dataset.state_dict()
        state.update(num_workers=workers, consumed=consumed, samples_consumed=sum(consumed),
                     next_worker=batches_done % workers)
        dataset.load_state_dict(state)
    return torch.utils.data.DataLoader(dataset, batch_size=config.train.batch_size, collate_fn=collate_patches,
                                       num_workers=config.data.num_workers)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# -------------------------------------------------------------------------------------------------- training


def pretrain(config: PretrainConfig, out_dir: str | Path, *, max_steps: int | None = None, resume: bool = True,
             progress: bool = True) -> Path:
    """Pretrain ``config.model`` on ``config.data``; returns the folder of the saved FoundationModel.

    Writes into ``out_dir``: ``config.json`` (the recipe), ``checkpoints/step_N/`` (accelerate state),
    ``metrics.csv`` and TensorBoard logs, and ``model/`` (``config.json`` + ``model.safetensors``) at the end.
    ``max_steps`` stops early (the schedule still follows the recipe's max_steps, so a run may be continued).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from skyfm.foundation import create_model

    # oneDNN keeps compiled convolutions for every input shape it meets, and the band count of a mixed-instrument
    # batch changes from batch to batch: unbounded, its cache grew a 600-step CPU run to 6.9 GB.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    out = Path(out_dir)
    t = config.train
    stop_at = min(max_steps or t.max_steps, t.max_steps)
    trackers = ["tensorboard"] if "tensorboard" in config.log.trackers else None
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=t.grad_accum,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # stage 1 leaves the backbone unused, stage 2 the tokenizer
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        previous = out / "config.json"
        if previous.exists() and resume and json.loads(previous.read_text()) != config.to_dict():
            raise SkyfmError(f"{out} holds a run with a different recipe; use a new --out or --no-resume")
        (out / "config.json").write_text(config.to_json())
    accelerator.wait_for_everyone()
    set_seed(config.seed)  # same initial weights on every rank

    # The last complete checkpoint, read once: its step decides the stage the model is wrapped in.
    checkpoints = checkpoint_dirs(out) if resume else []
    saved = json.loads((checkpoints[-1] / TRAINER_STATE).read_text()) if checkpoints else None
    step = saved["step"] if saved else 0

    model = create_model(config.model, **config.model_overrides)
    # Before prepare: DDP only synchronises the parameters that require gradients when it wraps the model.
    # Stage 1 wraps everything (the backbone just gets no gradients); a run resumed in stage 2 never needs the
    # tokenizer's.
    set_stage(model, stage_of(step, config))
    objective = PretrainObjective(model, t.mask_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per
    # process, making the schedule depend on the number of processes.
    objective, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    if saved:
        if saved["world_size"] != accelerator.num_processes:
            raise SkyfmError(f"{checkpoints[-1]} was saved by {saved['world_size']} process(es); resume it with as "
                             f"many (this run has {accelerator.num_processes}) or start a new --out")
        accelerator.load_state(str(checkpoints[-1]))
        accelerator.print(f"resumed from {checkpoints[-1]} (step {step})")
    shard_dirs = prepare_shards(config, out, accelerator)
    def loader_from(step: int):
        return iter(make_loader(config, shard_dirs, accelerator.process_index, accelerator.num_processes,
                                batches_done=step * t.grad_accum, with_targets=stage_of(step, config) == 1))

    batches = loader_from(step)

    if trackers:
        accelerator.init_trackers("pretrain", config={"model": config.model, "seed": config.seed,
                                                      "batch_size": t.batch_size, "lr": t.lr})
    log = CsvLog(out / "metrics.csv", step, enabled=accelerator.is_main_process and "csv" in config.log.trackers)
    bar = tqdm(total=stop_at, initial=step, desc="pretraining", unit="step",
               disable=not (progress and accelerator.is_main_process))
    started, n_patches = time.perf_counter(), 0
    while step < stop_at:
        stage = stage_of(step, config)
        if step == t.tokenizer_steps and stage == 2:
            set_stage(accelerator.unwrap_model(objective).model, 2)
            batches = loader_from(step)  # stage 2 needs no source images: a lighter stream, same order
        totals: dict[str, float] = {}
        for micro in range(t.grad_accum):
            batch = to_device(next(batches), accelerator.device)
            gen = mask_generator(config.seed, step * t.grad_accum + micro, accelerator.process_index,
                                 accelerator.device)
            with accelerator.accumulate(objective):
                losses = objective(batch, stage, gen)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(objective.parameters(), t.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / t.grad_accum
            n_patches += batch["scaled"].shape[0]
        step += 1
        bar.update(1)
        if step % config.log.every == 0 or step == stop_at:
            reduced = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                       for k, v in totals.items()}
            elapsed = time.perf_counter() - started
            row = {"step": step, "stage": stage, "lr": scheduler.get_last_lr()[0], **reduced,
                   "patches_per_s": n_patches * accelerator.num_processes / max(elapsed, 1e-9)}
            log.write(row)
            if trackers:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(stage=stage, loss=f"{reduced['loss']:.4f}")
        if step % config.checkpoint.every == 0 or step == stop_at:
            save_checkpoint(accelerator, out, step, {"step": step, "batches_per_rank": step * t.grad_accum,
                                                     "world_size": accelerator.num_processes},
                            config.checkpoint.keep)
    bar.close()

    model = accelerator.unwrap_model(objective).model
    checksums = accelerator.gather(param_checksum(model).to(accelerator.device)).reshape(-1, 2).tolist()
    model_dir = out / "model"
    if accelerator.is_main_process:
        model.save_pretrained(model_dir)
        final = {"step": step, "world_size": accelerator.num_processes, "param_checksums": checksums,
                 "ranks_in_sync": all(c == checksums[0] for c in checksums)}
        (out / "final_state.json").write_text(json.dumps(final, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model_dir
