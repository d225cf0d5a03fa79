"""Copy a trained detector into the package as the default one (float16 weights, so the wheel stays small).

    python -m skyfm.finetune.ship runs/detector-default/model --thresholds runs/detector-default/sweep.json

Writes ``skyfm/resources/models/detector-default/{config.json, model.safetensors, README.md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from skyfm.heads.detector import DEFAULT_MODEL_DIR, SourceDetector


def ship(model_dir: str | Path, target: str | Path = DEFAULT_MODEL_DIR, notes: str | Path | None = None,
         thresholds: str | Path | None = None) -> Path:
    """Copy ``model_dir`` to ``target`` in float16; ``thresholds``: a validation JSON (``evaluate --sweep``)
    whose ``best_threshold`` per instrument becomes that head's ``min_score``."""
    det = SourceDetector.from_pretrained(model_dir)
    if thresholds is not None:
        chosen = json.loads(Path(thresholds).read_text())
        for name, res in chosen.items():
            if name in det.config.heads and res.get("best_threshold") is not None:
                det.config.heads[name].min_score = float(res["best_threshold"])
    target = Path(target)
    det.save_pretrained(target, dtype=torch.float16)
    training = det.config.training or {}
    lines = [
        "# detector-default",
        "",
        "The detector `skyfm detect` uses when no `--model` is given: the pretrained skyfm-tiny backbone with light",
        "heads for every built-in instrument (heatmap, offset + position sigma, flux mean/variance, class, extension).",
        "Weights are stored as float16 and loaded as float32.",
        "",
        "Trained by:",
        "",
        "```bash",
        str(training.get("command") or "skyfm finetune --config configs/finetune/default.yaml --out runs/detector-default"),
        f"python -m skyfm.finetune.evaluate {model_dir} --config default --n 12 --size 128 --sweep --seed-offset 0 --out sweep.json",
        f"python -m skyfm.finetune.ship {model_dir} --thresholds sweep.json --notes validation.txt",
        "```",
        "",
        "Recipe (as run):",
        "",
        "```json",
        json.dumps(training.get("recipe", {}), indent=1),
        "```",
    ]
    if notes is not None and Path(notes).is_file():
        lines += ["", "Validation (fresh seeds 900000000 + i):", "", "```", Path(notes).read_text().strip(), "```"]
    (target / "README.md").write_text("\n".join(lines) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--notes", default=None)
    parser.add_argument("--target", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--thresholds", default=None, help="validation JSON of evaluate --sweep")
    args = parser.parse_args()
    print(ship(args.model_dir, args.target, args.notes, args.thresholds))


if __name__ == "__main__":
    main()
