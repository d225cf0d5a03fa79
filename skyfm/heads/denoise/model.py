"""The conditional diffusion denoiser: a small diffusers ``UNet2DModel`` that samples source-only images.

One band at a time. The network input, per pixel, is

* the noisy target ``x_t`` (the source-only image in the variance-stabilised space of
  :mod:`skyfm.heads.denoise.transforms`, diffused to step ``t``),
* the observation in the same space, multiplied by ``present``,
* ``present``: 1 where the observation is given, 0 where a pixel is masked or padded, and 0 everywhere for
  unconditional generation (training drops the observation of a fraction ``p_uncond`` of the images,
  classifier-free style),
* the band's features (:func:`~skyfm.heads.denoise.transforms.band_features`) as constant planes.

With ``bypass`` a 1x1 convolution of the same input is added to the output: the U-Net ends in a GroupNorm, which
makes absolute intensities over a 10^4 dynamic range hard to reproduce, and the linear path carries them.

The image is folded 2 x 2 into channels (pixel unshuffle) before the U-Net and unfolded after: every pixel is
still seen, and the U-Net runs at half resolution, four times faster. The U-Net has attention blocks at its lowest
resolution. It predicts the clean image directly (``prediction_type="sample"``) under a zero-terminal-SNR cosine
schedule, so that DDIM with "trailing" timesteps gives good images in 4-10 steps.

Saved as a directory: ``config.json`` (architecture, scheduler, transforms, how it was trained) and
``model.safetensors``. Nothing is pickled; a truncated or foreign checkpoint gives a one-line SkyfmError.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skyfm.errors import SkyfmError
from skyfm.heads.denoise.transforms import N_BAND_FEATURES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "skyfm-denoiser"


@dataclass
class DenoiserConfig:
    """Everything needed to rebuild a denoiser (architecture, diffusion, transforms) and how it was trained."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: int = 1  # the lowest `attention_levels` resolutions get attention blocks
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    fold: int = 2  # pixel-unshuffle factor
    crop: int = 64  # training crop (pixels)
    # diffusion (diffusers scheduler arguments)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "sample"
    rescale_betas_zero_snr: bool = True
    p_uncond: float = 0.1
    bypass: bool = False  # a 1x1 convolution of the raw input added to the U-Net's output (keeps absolute scale)
    # transforms
    ccd_softening: float = 1.0
    counts_compress: float = 0.0  # > 0: c asinh(anscombe / c) (transforms module docstring)
    # sampling defaults
    default_steps: int = 4
    default_samples: int = 4
    eta: float = 0.0
    tile: int = 256
    tile_overlap: int = 32
    # calibrated uncertainty: {flux_correction: {instrument: {scale, clean_floor, noise_floor[, bands]}},
    # "provenance": {...}} chosen on validation seeds (skyfm.heads.denoise.calibrate); empty: the raw spread
    uncertainty_calibration: dict = field(default_factory=dict)
    # provenance (filled by training)
    training: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return (3 + N_BAND_FEATURES) * self.fold**2

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (fold x 2^(levels - 1)); images are padded to it."""
        return self.fold * 2 ** (len(self.block_out_channels) - 1)

    def scheduler_config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "prediction_type": self.prediction_type, "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
                "clip_sample": False, "timestep_spacing": "trailing"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "DenoiserConfig":
        if not isinstance(d, dict) or d.get("model_type") != MODEL_TYPE:
            raise SkyfmError(f"{where} is not a skyfm denoiser config (model_type should be '{MODEL_TYPE}')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise SkyfmError(f"{where}: unknown denoiser config keys {', '.join(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
        if kwargs.get("uncertainty_calibration"):
            from skyfm.heads.denoise.calibrate import check_calibration

            check_calibration(kwargs["uncertainty_calibration"], where=f"{where}: uncertainty_calibration")
        return cls(**kwargs)


class Denoiser(nn.Module):
    """x0-predicting conditional U-Net over one-band images (see the module docstring)."""

    def __init__(self, config: DenoiserConfig | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config = config or DenoiserConfig()
        n = len(config.block_out_channels)
        attn = [i >= n - config.attention_levels for i in range(n)]
        self.unet = UNet2DModel(
            sample_size=config.crop // config.fold,
            in_channels=config.in_channels,
            out_channels=config.fold**2,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            norm_num_groups=config.norm_num_groups,
            attention_head_dim=config.attention_head_dim,
        )
        if config.bypass:
            # The U-Net ends in a GroupNorm, which makes absolute intensities over a 10^4 dynamic range hard to
            # reproduce; a linear path from the input (zero at the start) carries them.
            self.bypass = nn.Conv2d(3 + N_BAND_FEATURES, 1, kernel_size=1)
            nn.init.zeros_(self.bypass.weight)
            nn.init.zeros_(self.bypass.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, obs: torch.Tensor, present: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        """Predicted clean image (B, 1, H, W) from x_t, obs, present (B, 1, H, W), features (B, F), t (B,)."""
        b, _, h, w = x_t.shape
        feats = features[:, :, None, None].expand(b, features.shape[1], h, w)
        inp = torch.cat([x_t, obs * present, present, feats], dim=1)
        f = self.config.fold
        out = F.pixel_shuffle(self.unet(F.pixel_unshuffle(inp, f), t).sample, f)
        if self.config.bypass:
            out = out + self.bypass(inp)
        return out

    # --- save / load -------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into directory ``path`` (atomically, file by file)."""
        from safetensors.torch import save_file

        from skyfm.utils import atomic_path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp),
                      metadata={"format": "pt", "model_type": MODEL_TYPE})
        with atomic_path(path / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Denoiser":
        """Load a denoiser saved by :meth:`save_pretrained`; a one-line SkyfmError for anything wrong with it."""
        from skyfm.foundation.model import read_safetensors

        path = Path(path)
        if not path.is_dir():
            raise SkyfmError(f"denoiser model directory not found: {path}")
        cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise SkyfmError(f"{path} is not a denoiser model directory: {p.name} is missing")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkyfmError(f"{cfg_path}: not valid JSON ({e})") from None
        try:
            config = DenoiserConfig.from_dict(raw, where=str(cfg_path))
            model = cls(config)
        except (TypeError, ValueError) as e:
            raise SkyfmError(f"{cfg_path}: invalid denoiser config ({e})") from None
        state = read_safetensors(w_path)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise SkyfmError(f"{w_path}: weights do not fit config.json ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]})")
        bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if bad:
            raise SkyfmError(f"{w_path}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, config.json "
                             f"implies {tuple(own[bad[0]].shape)}")
        model.load_state_dict(state)
        model.eval()
        return model

    # --- diffusion ---------------------------------------------------------------------------------------------
    def train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.config.scheduler_config())

    def sample_scheduler(self):
        from diffusers import DDIMScheduler

        cfg = dict(self.config.scheduler_config())
        return DDIMScheduler(**cfg, set_alpha_to_one=True)

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, present: torch.Tensor, features: torch.Tensor, steps: int | None = None,
               generator: torch.Generator | None = None, eta: float | None = None, callback=None,
               bf16: bool = False) -> torch.Tensor:
        """Sample clean images (B, 1, H, W) in network space given obs/present (B, 1, H, W), features (B, F).

        H and W must be multiples of ``config.multiple`` (pad first; see :func:`pad_to_multiple`).
        DDIM with ``steps`` steps (default ``config.default_steps``) from pure noise drawn with ``generator``.
        ``bf16``: run the network under bfloat16 autocast (the scheduler's arithmetic stays float32).
        The inputs move to the model's device and the samples come back on it. ``generator`` is a CPU generator
        whatever the device, so that a seed draws the same noise on a CPU and on a GPU.
        """
        steps = int(steps or self.config.default_steps)
        if steps < 1 or steps > self.config.num_train_timesteps:
            raise SkyfmError(f"--steps must be between 1 and {self.config.num_train_timesteps}, got {steps}")
        eta = self.config.eta if eta is None else float(eta)
        device = next(self.parameters()).device
        obs, present, features = obs.to(device), present.to(device), features.to(device)
        sched = self.sample_scheduler()
        sched.set_timesteps(steps)
        x = torch.randn(obs.shape, generator=generator, dtype=obs.dtype).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        for t in sched.timesteps:
            tt = torch.full((obs.shape[0],), int(t), dtype=torch.long, device=device)
            with autocast:
                x0 = self(x, tt, obs, present, features)
            x0 = x0.float()
            x = sched.step(x0, t, x, eta=eta, generator=generator).prev_sample
            if callback is not None:
                callback()
        return x


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad the last two axes of ``x`` up to multiples of ``multiple``; returns (padded, (H, W) original)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)])
    return x, (h, w)
