"""The CUDA path: the shipped detector, the shipped denoiser and pretraining run on a GPU and agree with the CPU.

Marked ``gpu`` (out of the default run; ``pytest -m gpu``) and skipped where torch sees no CUDA device. Both sides
run in float32 so that the comparison measures the device, not bfloat16 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skyfm.data.simulate import simulate_patch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_detector_on_gpu_matches_cpu():
    from skyfm.detect import detect_patch, get_detector

    patch = simulate_patch("meerlicht", seed=11, size=256, scene="crowded")
    cats = {}
    for device in ("cpu", "cuda"):
        det = get_detector(None, device=device)
        assert det.device.type == device
        cats[device] = detect_patch(patch, det, precision="fp32")
    cpu, gpu = cats["cpu"], cats["cuda"]
    assert len(cpu) > 20
    assert abs(len(cpu) - len(gpu)) <= max(1, len(cpu) // 50)  # a threshold crossing or two at most
    # every CPU detection has a GPU twin within 0.05 px
    d = np.hypot(np.asarray(cpu["x"])[:, None] - np.asarray(gpu["x"])[None],
                 np.asarray(cpu["y"])[:, None] - np.asarray(gpu["y"])[None]).min(axis=1)
    assert np.mean(d < 0.05) >= 0.98


def test_detect_file_device_option(tmp_path):
    from skyfm.data import write_patch
    from skyfm.detect import detect_file

    path = write_patch(simulate_patch("fermi-lat", seed=12, size=64), tmp_path / "cube.fits")
    table = detect_file(path, tmp_path / "cat.fits", device="cuda", progress=False)
    assert (tmp_path / "cat.fits").is_file() and len(table) >= 1


def test_denoiser_on_gpu_matches_cpu():
    from skyfm.heads.denoise.apply import denoise_patch, load_denoiser

    patch = simulate_patch("meerlicht", seed=13, size=64, scene="field")
    out = {}
    for device in ("cpu", "cuda"):
        model = load_denoiser(None, device=device)
        assert next(model.parameters()).device.type == device
        out[device] = denoise_patch(patch, model, samples=2, steps=4, seed=0, precision="fp32")
    (clean_cpu, std_cpu), (clean_gpu, std_gpu) = out["cpu"], out["cuda"]
    scale = np.abs(clean_cpu).max()
    assert np.abs(clean_gpu - clean_cpu).max() < 1e-3 * scale  # same seed, same noise: the same image
    assert np.nanmax(np.abs(std_gpu - std_cpu)) < 1e-2 * scale


def test_pretraining_step_on_gpu(tmp_path):
    from skyfm.data.shards import collate_patches
    from skyfm.foundation import FoundationModel, create_model
    from skyfm.pretrain.train import PretrainObjective, mask_generator, set_stage

    patches = [simulate_patch(name, seed=20 + i, size=64) for i, name in enumerate(["fermi-lat", "meerlicht", "wise"])]
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in collate_patches(patches).items()}
    torch.manual_seed(0)
    model = create_model("skyfm-tiny").cuda()
    objective = PretrainObjective(model, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for stage in (1, 2):
        set_stage(model, stage)
        for step in range(3):
            loss = objective(batch, stage, mask_generator(0, step, 0, "cuda"))["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert loss.device.type == "cuda" and np.isfinite(loss.item())
    model.save_pretrained(tmp_path / "model")
    back = FoundationModel.from_pretrained(tmp_path / "model", map_location="cuda")
    assert next(back.parameters()).device.type == "cuda"
    state, loaded = model.state_dict(), back.state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
