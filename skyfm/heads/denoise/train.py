"""Train the denoiser on simulated patches drawn on the fly: seeded, checkpointed, resumable exactly.

    python -m skyfm.heads.denoise.train --out runs/denoiser --steps 4000 --seed 0

Step ``k`` of a run with seed ``s`` trains on :func:`skyfm.heads.denoise.data.draw_batch` ``(s * 1_000_003 + k)``
with diffusion noise and timesteps from a torch generator seeded by the same number, so a run stopped at any point
and started again with the same command continues bit for bit (on the same machine and thread count). Every
``checkpoint_every`` steps ``OUT/checkpoint/`` holds the weights, their EMA, the AdamW moments (all safetensors)
and ``state.json``; ``OUT/metrics.csv`` logs the loss and the held-out validation loss; ``OUT/model/`` gets the
final EMA weights with ``config.json`` recording how they were trained.

Training seeds are below 2**31, validation seeds 2**31 + i (:mod:`skyfm.heads.denoise.data`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from skyfm.errors import SkyfmError
from skyfm.heads.denoise.data import DEFAULT_MIX, HELD_OUT_SEED_BASE, draw_batch, stack
from skyfm.heads.denoise.model import Denoiser, DenoiserConfig

VALIDATION_STEP_SEED = HELD_OUT_SEED_BASE  # draw_batch seed of the validation set (patch seeds 2**31 + j)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 200
    min_lr_fraction: float = 0.05
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    max_bands_per_patch: int = 3
    fermi_plane_fraction: float = 0.4
    checkpoint_every: int = 250
    eval_every: int = 250
    n_val: int = 64
    threads: int = 1


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    frac = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_fraction + (1 - tc.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def masked_mse(pred, target, present):
    w = present
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def training_loss(model: Denoiser, batch, generator: torch.Generator, scheduler=None):
    """The x0-prediction loss of one batch (obs, target, present, features), with classifier-free dropout."""
    obs, target, present, feats = batch
    scheduler = scheduler or model.train_scheduler()
    b = obs.shape[0]
    t = torch.randint(0, model.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(target.shape, generator=generator)
    x_t = scheduler.add_noise(target, noise, t)
    keep = (torch.rand(b, generator=generator) >= model.config.p_uncond).float()[:, None, None, None]
    pred = model(x_t, t, obs, present * keep, feats)
    return masked_mse(pred, target, present)


# --- checkpoints: safetensors + JSON, never pickle ---------------------------------------------------------------
def _save_checkpoint(out: Path, step: int, model, ema: dict, opt, tc: TrainConfig, extra: dict):
    from safetensors.torch import save_file

    tmp = out / "checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                moments[f"exp_avg.{n}"] = st["exp_avg"].contiguous()
                moments[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].contiguous()
                moments[f"step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "train": asdict(tc),
                                                "model": model.config.to_dict(), **extra}, indent=2))
    final, old = out / "checkpoint", out / "checkpoint.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(out: Path, model, opt):
    from safetensors.torch import load_file

    ck = out / "checkpoint"
    if not ck.is_dir() and (out / "checkpoint.old").is_dir():
        ck = out / "checkpoint.old"
    if not (ck / "state.json").is_file():
        return None
    try:
        state = json.loads((ck / "state.json").read_text())
        model.load_state_dict(load_file(str(ck / "model.safetensors")))
        ema = load_file(str(ck / "ema.safetensors"))
        moments = load_file(str(ck / "optimizer.safetensors"))
    except Exception as e:  # noqa: BLE001 - any damage to a checkpoint is the same problem for the user
        raise SkyfmError(f"{ck}: cannot resume from this checkpoint ({str(e).splitlines()[0]}); "
                         "remove it or pass --no-resume") from None
    params = dict(model.named_parameters())
    for n, p in params.items():
        if f"exp_avg.{n}" in moments:
            opt.state[p] = {"step": torch.tensor(float(moments[f"step.{n}"][0])),
                            "exp_avg": moments[f"exp_avg.{n}"].clone(), "exp_avg_sq": moments[f"exp_avg_sq.{n}"].clone()}
    return state, ema


def validation_set(tc: TrainConfig, crop: int, softening: float, compress: float = 0.0):
    samples = draw_batch(VALIDATION_STEP_SEED, tc.n_val, crop, tc.mix, tc.max_bands_per_patch, softening,
                         tc.fermi_plane_fraction, seed_of=lambda j: HELD_OUT_SEED_BASE + j, compress=compress)
    return stack(samples)


@torch.no_grad()
def validate(model: Denoiser, val, steps: int = 4) -> dict:
    """Held-out losses: x0 error at three noise levels, and of a ``steps``-step DDIM sample."""
    obs, target, present, feats = val
    sched = model.train_scheduler()
    g = torch.Generator().manual_seed(12345)
    out = {}
    for t in (999, 500, 100):
        tt = torch.full((obs.shape[0],), t, dtype=torch.long)
        x_t = sched.add_noise(target, torch.randn(target.shape, generator=g), tt)
        out[f"val_x0_t{t}"] = float(masked_mse(model(x_t, tt, obs, present, feats), target, present))
    x = model.sample(obs, present, feats, steps=steps, generator=g)
    out[f"val_ddim{steps}"] = float(masked_mse(x, target, present))
    return out


def train_denoiser(out_dir: str | Path, tc: TrainConfig | None = None, model_config: DenoiserConfig | None = None,
                   max_steps: int | None = None, resume: bool = True, command: str | None = None,
                   log=print) -> Path:
    """Train (or resume) a denoiser into ``out_dir``; returns ``out_dir/model`` once ``tc.steps`` are done.

    ``max_steps`` stops earlier (for tests, or to split a run); the schedule still follows ``tc.steps``.
    """
    tc = tc or TrainConfig()
    torch.set_num_threads(tc.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    model = Denoiser(model_config or DenoiserConfig())
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    start, wall_before = 0, 0.0
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loaded = _load_checkpoint(out, model, opt) if resume else None
    history = []
    if loaded is not None:
        state, ema = loaded
        start, wall_before = int(state["step"]), float(state.get("wall_s", 0.0))
        history = list(state.get("history", []))
        log(f"resuming from step {start}")
    history.append({"command": command, "from_step": start, "steps": tc.steps})
    sched = model.train_scheduler()
    val = validation_set(tc, cfg.crop, cfg.ccd_softening, cfg.counts_compress)
    metrics_path = out / "metrics.csv"
    if start == 0 or not metrics_path.exists():
        metrics_path.write_text("step,loss,lr,data_s,step_s,wall_s,val_x0_t999,val_x0_t500,val_x0_t100,val_ddim4\n")
    stop = tc.steps if max_steps is None else min(tc.steps, max_steps)
    t_start = time.time()
    losses, data_s, step_s = [], 0.0, 0.0
    last_val = {}
    step = start
    for step in range(start, stop):
        model.train()
        t0 = time.time()
        step_seed = tc.seed * 1_000_003 + step
        batch = stack(draw_batch(step_seed, tc.batch_size, cfg.crop, tc.mix, tc.max_bands_per_patch,
                                 cfg.ccd_softening, tc.fermi_plane_fraction, compress=cfg.counts_compress))
        t1 = time.time()
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(step_seed)
        loss = training_loss(model, batch, gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(tc.ema_decay, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        losses.append(float(loss.detach()))
        data_s += t1 - t0
        step_s += time.time() - t1
        done = step + 1
        if done % tc.eval_every == 0 or done == stop:
            ema_model = Denoiser(cfg)
            ema_model.load_state_dict(ema)
            ema_model.eval()
            last_val = validate(ema_model, val)
            n = len(losses)
            wall = wall_before + time.time() - t_start
            with open(metrics_path, "a") as f:
                f.write(f"{done},{np.mean(losses):.5f},{lr:.3g},{data_s / n:.3f},{step_s / n:.3f},{wall:.0f},"
                        + ",".join(f"{last_val[k]:.5f}" for k in ("val_x0_t999", "val_x0_t500", "val_x0_t100", "val_ddim4"))
                        + "\n")
            log(f"step {done}/{tc.steps} loss {np.mean(losses):.4f} lr {lr:.2e} data {data_s / n:.3f}s "
                f"step {step_s / n:.3f}s wall {wall:.0f}s " + " ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
            losses, data_s, step_s = [], 0.0, 0.0
        if done % tc.checkpoint_every == 0 or done == stop:
            _save_checkpoint(out, done, model, ema, opt, tc, {"wall_s": wall_before + time.time() - t_start,
                                                              "val": last_val, "history": history})
    wall = wall_before + time.time() - t_start
    final_step = max(stop, start)
    if final_step >= tc.steps:
        cfg.training = {"command": command, "history": history, "steps": tc.steps, "batch_size": tc.batch_size, "crop": cfg.crop,
                        "train_config": asdict(tc), "wall_s": round(wall), "threads": tc.threads,
                        "train_seeds": f"draw_batch(seed * 1000003 + step), patch seeds patch_seed(.,j) & 0x7fffffff "
                                       f"(< 2**31), run seed {tc.seed}",
                        "validation_seeds": "patch seeds 2**31 + j (disjoint from training)",
                        "final_validation": last_val, "weights": "EMA"}
        ema_model = Denoiser(cfg)
        ema_model.load_state_dict(ema)
        ema_model.save_pretrained(out / "model")
        log(f"model: {out / 'model'} ({wall:.0f} s of training)")
    return out / "model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m skyfm.heads.denoise.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", default="32,64,64", help="U-Net block_out_channels")
    p.add_argument("--bypass", action="store_true", help="add the linear input-to-output path (model docstring)")
    p.add_argument("--counts-compress", type=float, default=0.0, help="c of c*asinh(anscombe/c) for counts (0: off)")
    p.add_argument("--no-resume", action="store_true")
    a = p.parse_args(argv)
    tc = TrainConfig(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, threads=a.threads)
    mc = DenoiserConfig(block_out_channels=tuple(int(c) for c in a.channels.split(",")),
                        counts_compress=a.counts_compress, bypass=a.bypass)
    command = "python -m skyfm.heads.denoise.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        train_denoiser(a.out, tc, mc, max_steps=a.max_steps, resume=not a.no_resume, command=command)
    except SkyfmError as e:
        print(f"skyfm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
