"""Everything that needs a GPU, measured in one run: detection, denoising and pretraining on a CUDA device.

Run on a machine with a CUDA GPU (from the repository root):

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --out runs/bench-gpu [--sections detect,network,denoise,pretrain,tests]

``--device cpu --quick`` runs every section small on a CPU: a check of the script, not a measurement.

Sections (each is timed and written to ``OUT/gpu.json`` as soon as it ends, so a run cut short keeps what it did;
one that fails is recorded with its error and the others still run):

* ``detect``: :func:`benchmarks.detect_speed.speed_cases` with the network on the GPU (``precision="auto"``:
  bfloat16 there) - the three images of ``detect_speed.py`` (MeerLICHT 2048^2 one band, 1024^2 six bands, a
  Fermi-LAT plane cube), skyfm's default (PSF / likelihood fits on the CPU), ``--no-refine`` and the previous
  network settings, with sep, photutils and the TS map beside them on the CPU, and F1 against the truth.
* ``network``: the detector network alone, forward passes of batches of 512^2 one-band MeerLICHT tiles (cut from
  the 2048^2 image) and of 128^2 Fermi-LAT cubes, float32 and bfloat16, after warm-up, synchronised: Mpix/s of
  the network, the ceiling for ``skyfm detect`` when the fits are left out.
* ``denoise``: ``benchmarks/denoise.py``'s speed runs (256^2 patches, 4 / 10 / 20 DDIM steps, one sample) on the
  GPU, and the CLI default (4 samples x 10 steps).
* ``pretrain``: ``benchmarks/pretrain_worker.py`` on the GPU (one process; forward + backward + clip + AdamW step,
  stage 1 tokenizer and stage 2 masked tokens): the tiny recipe's batch (32 x 64^2) in float32 and bf16 mixed
  precision, and the base recipe's model (``skyfm-base``, ~100 M parameters) on its batch of 64 x 256^2 in bf16:
  s/step, patches/s, tokens/s and the peak GPU memory.
* ``tests``: ``pytest -m gpu tests/test_gpu.py`` (the CUDA path against the CPU).
* ``profile`` (not in the default list): cProfile of ``detect_patch(refine=False)`` on the 2048^2 MeerLICHT image
  with the network on the GPU: where the time goes that the network does not take.

Writes ``OUT/gpu.json`` and ``OUT/gpu.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SECTIONS = ("detect", "network", "denoise", "pretrain", "tests", "profile")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "gpu": gpu.name if gpu else None, "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None,
            "cuda": torch.version.cuda}


# ---------------------------------------------------------------------------------------------------- sections
def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gpu_mib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.device(device).type == "cuda" else None


@lru_cache(maxsize=1)
def meerlicht_image(side: int):
    """The one-band MeerLICHT image of detect_speed.py's first case (seed 1.7e9), simulated once per run."""
    from skyfm.data.simulate import simulate_patch

    return simulate_patch("meerlicht", 1_700_000_000, size=side, bands=["q"])


def section_detect(args) -> dict:
    from detect_speed import speed_cases

    return {"rows": speed_cases(args.threads, log, device=args.device, baselines=True)}


def _timed_forward(det, batch: dict, bf16: bool, window, reps: int) -> float:
    """Seconds per forward pass of ``batch`` (synchronised, after two warm-up passes)."""
    import torch

    from skyfm.detect import inference_context

    inputs = {k: (v.to(det.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with inference_context(det, bf16, window):
        for _ in range(2):
            det(inputs)
        synchronize(det.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            det(inputs)
        synchronize(det.device)
    return (time.perf_counter() - t0) / reps


def section_network(args) -> dict:
    import torch

    from skyfm.data.simulate import simulate_patch
    from skyfm.data.tiling import iter_tiles
    from skyfm.detect import default_tiling, get_detector
    from skyfm.instruments import load_instrument

    det = get_detector(None, device=args.device)
    rows = []
    side = 512 if args.quick else 2048
    image = meerlicht_image(side)
    tiles = [p for _, p in iter_tiles(image, 512)] * 4  # 16 tiles of 512^2, each 4 times
    cube = simulate_patch("fermi-lat", 1_700_000_002, size=side // 4, population="real", center=(30.0, 1.0))
    cubes = [p for _, p in iter_tiles(cube, 128)] * 4  # 16 tiles of 6 x 128^2, each 4 times
    for label, patches, inst in (("MeerLICHT q, 512^2 tiles", tiles, "meerlicht"),
                                 ("Fermi-LAT 6 bins, 128^2 tiles", cubes, "fermi-lat")):
        _, window = default_tiling(det, load_instrument(inst), patches[0].n_bands)
        for batch_size in ((1,) if args.quick else args.network_batches):
            batch = det.make_batch(patches[:batch_size])
            for precision in ("fp32", "bf16", "bf16, channels-last"):
                det.to(memory_format=torch.channels_last if "channels" in precision else torch.contiguous_format)
                seconds = _timed_forward(det, batch, precision != "fp32", window or None, args.reps)
                pix = batch_size * patches[0].height * patches[0].width
                row = {"tiles": label, "batch": batch_size, "precision": precision,
                       "ms_per_batch": round(seconds * 1e3, 2), "mpix_per_s": round(pix / seconds / 1e6, 2),
                       "peak_gpu_mib": peak_gpu_mib(det.device)}
                log(f"  network {label} batch {batch_size} {precision}: {row['ms_per_batch']} ms, "
                    f"{row['mpix_per_s']} Mpix/s")
                rows.append(row)
    det.to(memory_format=torch.channels_last if det.device.type == "cpu" else torch.contiguous_format)
    return {"rows": rows}


def section_denoise(args) -> dict:
    from denoise import run_speed
    from skyfm.data.simulate import simulate_patch
    from skyfm.heads.denoise.apply import denoise_patch, load_denoiser

    model = load_denoiser(None, device=args.device)
    out = {"one_sample": {} if args.quick else run_speed(model, log)}
    patch = simulate_patch("meerlicht", 2_000_090_000, size=256, scene="field")
    for precision in ("fp32", "bf16"):
        denoise_patch(patch, model, samples=4, steps=10, precision=precision)
        synchronize(args.device)
        t0 = time.perf_counter()
        denoise_patch(patch, model, samples=4, steps=10, precision=precision)
        synchronize(args.device)
        out[f"meerlicht 1x256x256, 4 samples x 10 steps (CLI default), {precision}"] = time.perf_counter() - t0
    for k, v in out.items():
        if not isinstance(v, dict):
            log(f"  denoise {k}: {v:.3f} s")
    return out


def _pretrain_batch(model_name: str, batch_size: int, size: int, per_instrument: int, path: Path) -> None:
    """A mixed-instrument batch of ``batch_size`` patches of ``size``^2 (a few simulated per instrument, repeated:
    speed does not depend on which patches), written as benchmarks/pretrain.py does."""
    from pretrain import write_batch

    from skyfm.pretrain.evaluate import simulate_eval_set

    made = []
    for name in ("fermi-lat", "ctao", "meerlicht", "hubble", "wise"):
        made += simulate_eval_set(name, per_instrument, size=size, seed=7)
    # one band count per batch keeps the collated shape of a real mixed batch (bands padded to the largest)
    write_batch([made[i % len(made)] for i in range(batch_size)], path)


def section_pretrain(args) -> dict:
    out = {}
    worker = REPO / "benchmarks" / "pretrain_worker.py"
    with tempfile.TemporaryDirectory(prefix="skyfm-gpu-pretrain-") as tmp:
        tmp = Path(tmp)
        cases = [(f"{model}, {b} x {size}^2", model, b, size, ("no", "bf16") if model == "skyfm-tiny" else ("bf16",))
                 for model, b, size in args.pretrain_cases]
        if args.quick:
            cases = [(f"{model}, 2 x 64^2", model, 2, 64, ("no",)) for _, model, _, _, _ in cases[:2]]
        for label, model, batch_size, size, precisions in cases:
            batch = tmp / f"{model}.safetensors"
            _pretrain_batch(model, batch_size, size, 2, batch)
            for mp in precisions:
                result = tmp / f"{model}-{mp}.json"
                cmd = [sys.executable, str(worker), "--batch", str(batch), "--out", str(result), "--model", model,
                       "--threads", str(args.threads), "--warmup", "1" if args.quick else "3", "--steps", str(args.reps),
                       "--mixed-precision", mp]
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
                if done.returncode != 0 or not result.is_file():
                    out[f"{label}, {mp}"] = {"error": done.stderr[-2000:]}
                    log(f"  pretrain {label} {mp}: failed\n{done.stderr[-2000:]}")
                    continue
                r = json.loads(result.read_text())
                out[f"{label}, {mp}"] = r
                log(f"  pretrain {label} {mp}: stage 1 {r['stage1']['patches_per_s']:.0f} patches/s, stage 2 "
                    f"{r['stage2']['patches_per_s']:.0f} patches/s, peak GPU {r.get('peak_gpu_mib', 0):.0f} MiB")
    return out


def section_profile(args) -> dict:
    import cProfile
    import io
    import pstats

    from skyfm.detect import detect_patch, get_detector

    det = get_detector(None, device=args.device)
    image = meerlicht_image(512 if args.quick else 2048)
    detect_patch(image, det, refine=False)  # warm-up
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    detect_patch(image, det, refine=False)
    synchronize(args.device)
    profiler.disable()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(25)
        out[key] = buf.getvalue()
        log(out[key])
    return out


def section_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-30:]
    log("  " + "\n  ".join(tail[-5:]))
    return {"rc": done.returncode, "tail": tail}


# ------------------------------------------------------------------------------------------------------ report
def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"GPU: {env['gpu']} ({env['gpu_memory_gib']} GiB), CUDA {env['cuda']}, torch {env['torch']}, "
             f"{env['cpu_cores']} CPU cores, Python {env['python']}; torch threads {results['threads']}.", ""]
    tables = {"detect": {"image": "image", "method": "method", "seconds": "seconds", "mpix_per_s": "Mpix/s",
                         "n_detections": "detections", "f1": "F1 (SNR >= 5)"},
              "network": {"tiles": "network alone on", "batch": "batch", "precision": "precision",
                          "ms_per_batch": "ms / batch", "mpix_per_s": "Mpix/s", "peak_gpu_mib": "peak GPU MiB"}}
    for name, columns in tables.items():
        rows = results.get(name, {}).get("rows")
        if rows:
            lines += ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(r[k]) for k in columns) + " |" for r in rows] + [""]
    sec = results.get("denoise", {})
    if sec and "error" not in sec:
        times = {**sec.get("one_sample", {}), **{k: v for k, v in sec.items() if k.startswith("meerlicht")}}
        lines += ["| denoise (1 sample unless said) | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in times.items()]
        lines.append("")
    sec = results.get("pretrain", {})
    if sec and "error" not in sec:
        lines += ["| pretraining step, one GPU | stage | s/step | patches/s | tokens/s | peak GPU MiB |",
                  "|---|---|---|---|---|---|"]
        for label, r in sec.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {label} | failed | | | | |")
                continue
            for stage, name in (("stage1", "1 tokenizer"), ("stage2", "2 masked tokens")):
                s = r[stage]
                lines.append(f"| {label} ({r['parameters'] / 1e6:.1f} M parameters) | {name} | {s['s_per_step']:.4f} | "
                             f"{s['patches_per_s']:.0f} | {s['tokens_per_s']:.0f} | {r.get('peak_gpu_mib', 0):.0f} |")
        lines.append("")
    sec = results.get("tests", {})
    if sec and "tail" in sec:
        lines += [f"`pytest -m gpu tests/test_gpu.py`: rc {sec['rc']}, {sec['tail'][-1] if sec['tail'] else ''}", ""]
    for name in SECTIONS:
        if isinstance(results.get(name), dict) and "error" in results[name]:
            lines.append(f"Section {name} failed: {results[name]['error'].strip().splitlines()[-1]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=8, help="torch threads for the CPU parts (default 8)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions of each GPU measurement (default 10)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu with --quick to check the script")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere: a check of the script")
    ap.add_argument("--network-batches", default="8,16", type=lambda v: [int(x) for x in v.split(",")],
                    help="tiles per forward pass in the network section (default 8,16)")
    ap.add_argument("--pretrain-cases", default="skyfm-tiny:32:64,skyfm-base:16:256,skyfm-base:32:128",
                    type=lambda v: [(m, int(b), int(s)) for m, b, s in (c.split(":") for c in v.split(","))],
                    help="MODEL:BATCH:SIZE list for the pretrain section (tiny in fp32 and bf16, others bf16)")
    ap.add_argument("--out", default="runs/bench-gpu")
    args = ap.parse_args(argv)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device is visible to torch (--device cpu --quick checks the script)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["benchmarks/gpu.py", *(argv or sys.argv[1:])]), "threads": args.threads,
               "device": args.device,
               "environment": environment()}
    log(json.dumps(results["environment"]))
    for name in [s for s in args.sections.split(",") if s]:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name}; choose from {', '.join(SECTIONS)}")
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            results[name] = globals()[f"section_{name}"](args)
        except Exception:  # noqa: BLE001 - record it and go on to the next section
            results[name] = {"error": traceback.format_exc()}
            log(results[name]["error"])
        results[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"   ({results[name]['section_seconds']} s)")
        (out / "gpu.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
        (out / "gpu.md").write_text(markdown(results))
    md = markdown(results)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
