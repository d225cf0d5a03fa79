"""One process of the training-step throughput benchmark (``benchmarks/pretrain.py`` runs it; not for direct use).

Runs alone (``python benchmarks/pretrain_worker.py ...``) or as each rank of
``accelerate launch --multi_gpu --num_processes N ... benchmarks/pretrain_worker.py ...``. It builds the model as
``skyfm.pretrain.train.pretrain`` does (same Accelerator settings, ``PretrainObjective``, AdamW, stage switch),
loads one batch written by the parent (``--batch``, a safetensors file of the model's input tensors; every rank
trains on that same batch, so each process does the same work), and times ``forward -> backward -> clip -> step``
for stage 1 (tokenizer) and stage 2 (masked token modeling), after warm-up steps. Rank 0 writes ``--out`` (JSON):
seconds per step of each stage, patches/s and tokens/s over all processes, and each rank's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", required=True, help="safetensors file with the batch (written by pretrain.py)")
    parser.add_argument("--out", required=True, help="JSON file for the results (rank 0 writes it)")
    parser.add_argument("--model", default="skyfm-tiny")
    parser.add_argument("--overrides", default="{}", help="model overrides, JSON (the recipe's model_overrides)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per stage")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                        help="accelerate's mixed precision (GPU: the base recipe trains in bf16)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from safetensors.torch import load_file

    from skyfm.foundation import create_model
    from skyfm.pretrain.train import PretrainObjective, mask_generator, set_stage

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(args.seed)
    model = create_model(args.model, **json.loads(args.overrides))
    set_stage(model, 1)
    objective = PretrainObjective(model, args.mask_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    batch = {k: v.to(accelerator.device) for k, v in load_file(args.batch).items()}
    B, C, H, W = batch["scaled"].shape
    stride = model.token_stride
    tokens = int(batch["band_valid"].sum()) * (H // stride) * (W // stride)  # valid (band, token cell) pairs

    def train_step(stage: int, step: int) -> None:
        gen = mask_generator(args.seed, step, accelerator.process_index, accelerator.device)
        losses = objective(batch, stage, gen)
        accelerator.backward(losses["loss"])
        accelerator.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronise() -> None:
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()

    results = {}
    step = 0
    for stage in (1, 2):
        if stage == 2:
            set_stage(accelerator.unwrap_model(objective).model, 2)
        for _ in range(args.warmup):  # the first stage-1 step also runs the codebook's k-means initialisation
            train_step(stage, step)
            step += 1
        synchronise()
        started = time.perf_counter()
        for _ in range(args.steps):
            train_step(stage, step)
            step += 1
        synchronise()
        elapsed = time.perf_counter() - started
        world = accelerator.num_processes
        results[f"stage{stage}"] = {"s_per_step": elapsed / args.steps,
                                    "patches_per_s": args.steps * B * world / elapsed,
                                    "tokens_per_s": args.steps * tokens * world / elapsed}

    peak_kib = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)], device=accelerator.device)
    peaks = accelerator.gather(peak_kib).cpu().tolist()  # Linux: KiB
    if accelerator.is_main_process:
        results.update(processes=accelerator.num_processes, threads=args.threads, batch_per_process=B,
                       tokens_per_batch=tokens, device=str(accelerator.device),
                       mixed_precision=args.mixed_precision, peak_rss_mib=[p / 1024 for p in peaks],
                       parameters=sum(p.numel() for p in model.parameters()))
        if accelerator.device.type == "cuda":
            results["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # gloo may abort while tearing down at interpreter exit (as in `skyfm pretrain`): results are written.
        os._exit(0)


if __name__ == "__main__":
    main()
