"""The FoundationModel: the VQ-VAE tokenizer and a backbone, with masked token modeling and save / load.

Usage::

    model = skyfm.create_model("skyfm-tiny")
    out = model(batch["scaled"], batch["band_valid"], batch["band_coord"], batch["instrument_id"],
                batch["pixel_scale_deg"])
    out.dense_features   # (B, Df, H, W) for the heads
    out.token_features   # (B, C, L, D) per band and token;  out.pooled  (B, D) per patch
    losses = model.pretraining_loss(batch, mask_ratio=0.5, generator=g)   # dict; losses["loss"].backward()
    model.save_pretrained("runs/tiny/model")          # config.json + model.safetensors
    model = FoundationModel.from_pretrained("runs/tiny/model", map_location="cuda")

Two training stages (see :mod:`skyfm.pretrain`): first the tokenizer alone (``model.tokenizer(scaled, band_valid)``
returns its loss), then, with the tokenizer frozen, the backbone learns to predict the codes of masked
(band, cell) tokens from the visible ones, as BEiT, 4M and AION-1 do (the ViT reads the tokenizer's latents of
the visible tokens; their convolutional receptive fields reach a few pixels into masked neighbours, which is why
part of the mask comes in blocks across all bands). The tokenizer is frozen exactly when none of
its parameters requires a gradient (:meth:`FoundationModel.set_tokenizer_trainable`); a frozen tokenizer stays in
eval mode through ``model.train()`` so its EMA codebook does not drift, and runs without autograd.

Checkpoints are the Hugging Face layout: ``config.json`` (:class:`~skyfm.foundation.config.FoundationConfig`)
and ``model.safetensors`` (every parameter and persistent buffer, including the codebook), each written
atomically. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from skyfm.errors import SkyfmError
from skyfm.foundation.config import FoundationConfig, ViTConfig
from skyfm.foundation.embeddings import BackboneInputs
from skyfm.foundation.unet import UNetBackbone
from skyfm.foundation.vit import ViTBackbone
from skyfm.tokenizers.vqvae import VQVAETokenizer, code_histogram, codebook_perplexity
from skyfm.utils import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BATCH_KEYS = ("scaled", "band_valid", "band_coord", "instrument_id", "pixel_scale_deg")


@dataclass
class FoundationOutput:
    """What :meth:`FoundationModel.forward` returns.

    Attributes:
        token_features: (B, C, L, D) features per (band, token), L = h' * w' (row-major), zeros on padding bands.
        dense_features: (B, Df, H, W) full-resolution features for the heads (None with ``dense=False``).
        pooled: (B, D) one embedding per patch.
        codes: (B, C, h, w) tokenizer codes of the latent grid (h = H / tokenizer.downsample), -1 on padding
            bands; None when not computed (the U-Net does not need them unless ``codes=True``).
        feature_map: (B, D, h', w') token features averaged over the valid bands.
        grid: (h', w') the token grid; a token covers ``model.token_stride`` pixels per side.
    """

    token_features: torch.Tensor
    dense_features: torch.Tensor | None
    pooled: torch.Tensor
    codes: torch.Tensor | None
    feature_map: torch.Tensor
    grid: tuple[int, int]


# -------------------------------------------------------------------------------------------- token masks
def numpy_rng(generator: torch.Generator | None = None) -> np.random.Generator:
    """A NumPy generator seeded from ``generator`` (or torch's global RNG): one draw, on any device.

    Mask sampling is many tiny operations; doing them in NumPy on the host and moving one tensor costs far less
    than hundreds of kernel launches, and stays a pure function of the torch generator's state.
    """
    device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    return np.random.default_rng(seed)


def sample_token_mask(band_valid: np.ndarray, grid: tuple[int, int], mask_ratio: float,
                      block_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Choose which (band, cell) tokens to mask: (B, C, h, w) bool, True = masked.

    Per patch, ``round(mask_ratio * n)`` of its ``n`` valid tokens are masked (at least one, and at least one
    left visible). About ``block_fraction`` of them come from rectangular blocks (BEiT's block-wise masking:
    area 5-30 % of the grid, aspect 0.3-3.3) on either all valid bands at once (so the other bands cannot
    give the answer away) or one band; the rest are drawn uniformly. Padding bands are never masked.
    """
    band_valid = np.asarray(band_valid, dtype=bool)
    B, C = band_valid.shape
    h, w = grid
    mask = np.zeros((B, C, h, w), dtype=bool)
    for b in range(B):
        bands = np.flatnonzero(band_valid[b])
        n_tokens = bands.size * h * w
        if n_tokens == 0:
            continue
        n_mask = int(round(mask_ratio * n_tokens))
        n_mask = max(1, min(n_mask, n_tokens - 1)) if n_tokens > 1 else 1
        n_block = int(round(block_fraction * n_mask))
        m = mask[b]
        for _ in range(64):  # bounded: small grids may not fit the target exactly
            if m.sum() >= n_block:
                break
            area = rng.uniform(0.05, 0.3) * h * w
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            bh = int(np.clip(round(math.sqrt(area * aspect)), 1, h))
            bw = int(np.clip(round(math.sqrt(area / aspect)), 1, w))
            top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            chosen = bands if rng.random() < 0.5 else bands[rng.integers(bands.size)][None]
            m[chosen, top : top + bh, left : left + bw] = True
        # then exactly n_mask: unmask a random excess or mask random extra tokens
        flat = m[bands].reshape(-1)  # (n_tokens,) a copy
        masked, visible = np.flatnonzero(flat), np.flatnonzero(~flat)
        if masked.size > n_mask:
            flat[rng.choice(masked, masked.size - n_mask, replace=False)] = False
        elif masked.size < n_mask:
            flat[rng.choice(visible, n_mask - masked.size, replace=False)] = True
        m[bands] = flat.reshape(bands.size, h, w)
    return mask


# ------------------------------------------------------------------------------------------------- model
class FoundationModel(nn.Module):
    """Tokenizer + backbone (+ the masked-token prediction head). See the module docstring."""

    def __init__(self, config: FoundationConfig):
        super().__init__()
        self.config = config
        self.tokenizer = VQVAETokenizer(config.tokenizer)
        backbone_cls = ViTBackbone if isinstance(config.backbone, ViTConfig) else UNetBackbone
        self.backbone = backbone_cls(config.backbone, config.tokenizer, len(config.instruments))
        p = config.token_patch
        self.mtm_head = nn.Linear(self.embed_dim, p * p * self.tokenizer.num_codes)
        wants_pixels = config.pixel_loss_weight > 0 or config.denoise_loss_weight > 0
        self.pixel_head = nn.Linear(self.embed_dim, config.token_stride**2) if wants_pixels else None
        if config.freeze_tokenizer:
            self.set_tokenizer_trainable(False)

    # ---------------------------------------------------------------------------------------- properties
    @property
    def embed_dim(self) -> int:
        """Width D of token features and of the pooled embedding."""
        return self.backbone.embed_dim

    @property
    def dense_dim(self) -> int:
        """Channels Df of the dense features."""
        return self.backbone.dense_dim

    @property
    def token_stride(self) -> int:
        """Pixels per token side; patch heights and widths must be multiples of it."""
        return self.config.token_stride

    @property
    def unknown_instrument_id(self) -> int:
        """The instrument index that means "not one the model was trained on"."""
        return len(self.config.instruments)

    @property
    def device(self) -> torch.device:
        return self.mtm_head.weight.device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------------------------ tokenizer state
    @property
    def tokenizer_frozen(self) -> bool:
        """True when no tokenizer parameter requires a gradient (then it runs in eval mode, without autograd)."""
        return not any(p.requires_grad for p in self.tokenizer.parameters())

    def set_tokenizer_trainable(self, trainable: bool) -> None:
        """Unfreeze (``True``: stage 1) or freeze (``False``: stage 2) the tokenizer."""
        self.tokenizer.requires_grad_(trainable)
        self.tokenizer.train(self.training and trainable)

    def train(self, mode: bool = True) -> "FoundationModel":
        super().train(mode)
        if self.tokenizer_frozen:
            self.tokenizer.eval()  # a frozen codebook must not move with EMA updates or dead-code restarts
        return self

    # -------------------------------------------------------------------------------------------- inputs
    def prepare_inputs(self, scaled, band_valid, band_coord, instrument_id, pixel_scale_deg) -> BackboneInputs:
        """Check shapes and values, move to the model's device, zero padding bands and non-finite pixels."""
        device = self.device
        scaled = torch.as_tensor(scaled, device=device)
        if scaled.ndim != 4:
            raise SkyfmError(f"scaled must be a (batch, bands, height, width) tensor, got shape {tuple(scaled.shape)}")
        B, C, H, W = scaled.shape
        band_valid = torch.as_tensor(band_valid, device=device).bool()
        band_coord = torch.as_tensor(band_coord, device=device, dtype=torch.float32)
        instrument_id = torch.as_tensor(instrument_id, device=device).long().reshape(-1)
        pixel_scale_deg = torch.as_tensor(pixel_scale_deg, device=device, dtype=torch.float32).reshape(-1)
        if pixel_scale_deg.numel() == 1 and B > 1:
            pixel_scale_deg = pixel_scale_deg.expand(B)
        for name, t, shape in (("band_valid", band_valid, (B, C)), ("band_coord", band_coord, (B, C)),
                               ("instrument_id", instrument_id, (B,)), ("pixel_scale_deg", pixel_scale_deg, (B,))):
            if tuple(t.shape) != shape:
                raise SkyfmError(f"{name} has shape {tuple(t.shape)}; for scaled of shape {(B, C, H, W)} "
                                 f"it must be {shape}")
        stride = self.token_stride
        if H % stride or W % stride:
            raise SkyfmError(f"patch size {H}x{W} is not a multiple of {stride} pixels, the token size of "
                             f"{self.config.name}; crop or pad the patch")
        no_band = ~band_valid.any(dim=1)
        if bool(no_band.any()):
            raise SkyfmError(f"patch {int(no_band.nonzero()[0])} of the batch has no valid band (band_valid all False)")
        if not bool(torch.isfinite(pixel_scale_deg).all() & (pixel_scale_deg > 0).all()):
            raise SkyfmError(f"pixel_scale_deg must be positive and finite, got {pixel_scale_deg.tolist()}")
        scaled = torch.nan_to_num(scaled.float(), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = scaled * band_valid[:, :, None, None].to(scaled.dtype)
        return BackboneInputs(scaled, band_valid, band_coord, instrument_id, pixel_scale_deg)

    def _batch_inputs(self, batch: dict) -> BackboneInputs:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise SkyfmError(f"the batch has no {missing[0]!r} (a batch needs {', '.join(BATCH_KEYS)})")
        return self.prepare_inputs(*(batch[k] for k in BATCH_KEYS))

    def tokenize(self, inputs: BackboneInputs, need_codes: bool) -> None:
        """Fill ``inputs.latents`` (what the backbone reads) and ``inputs.codes`` (when needed) from the tokenizer."""
        kind = self.backbone.latent_kind
        if kind is None and not need_codes:
            return
        grad = contextlib.nullcontext() if not self.tokenizer_frozen else torch.no_grad()
        with grad:
            z = self.tokenizer.encode_latents(inputs.scaled, inputs.band_valid)  # (B, C, Dz, h, w)
            if kind == "continuous" and not need_codes:  # the nearest-code search is not needed: skip it
                inputs.codes, inputs.latents = None, z
                return
            codes, quantized, _ = self.tokenizer.quantize(z, inputs.band_valid)
        inputs.codes = codes
        inputs.latents = {"continuous": z, "quantized": quantized}.get(kind)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, scaled: torch.Tensor, band_valid: torch.Tensor, band_coord: torch.Tensor,
                instrument_id: torch.Tensor, pixel_scale_deg: torch.Tensor, token_mask: torch.Tensor | None = None,
                dense: bool = True, codes: bool | None = None) -> FoundationOutput:
        """Features of a batch (the tensors of the batch contract).

        Args:
            scaled: (B, C, H, W) scaled data; H and W multiples of :attr:`token_stride`.
            band_valid: (B, C) bool; band_coord: (B, C) log10 wavelength [m]; instrument_id: (B,) int
                (``len(config.instruments)`` or any unknown index = "unknown"); pixel_scale_deg: (B,).
            token_mask: optional (B, C, h', w') bool, True = hide that band's token (masked modeling).
            dense: also compute the full-resolution dense features (the heads need them; pretraining does not).
            codes: also return the tokenizer codes; default: when the backbone reads the tokenizer anyway (ViT).
        """
        inputs = self.prepare_inputs(scaled, band_valid, band_coord, instrument_id, pixel_scale_deg)
        return self._forward(inputs, token_mask, dense, codes)

    def _forward(self, inputs: BackboneInputs, token_mask: torch.Tensor | None, dense: bool,
                 codes: bool | None) -> FoundationOutput:
        need_codes = (self.backbone.latent_kind is not None) if codes is None else codes
        self.tokenize(inputs, need_codes or self.backbone.latent_kind == "code")
        if token_mask is not None:
            B, C, H, W = inputs.scaled.shape
            expected = (B, C, H // self.token_stride, W // self.token_stride)
            if tuple(token_mask.shape) != expected:
                raise SkyfmError(f"token_mask has shape {tuple(token_mask.shape)}, expected {expected}")
            token_mask = token_mask.to(self.device, torch.bool) & inputs.band_valid[:, :, None, None]
        out = self.backbone(inputs, token_mask=token_mask, dense=dense)
        return FoundationOutput(
            token_features=out.token_features,
            dense_features=out.dense_features,
            pooled=out.pooled,
            codes=inputs.codes if need_codes else None,
            feature_map=out.feature_map,
            grid=out.grid,
        )

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """One (B, D) embedding per patch of a batch dict (for FAISS / UMAP); no gradients."""
        return self._forward(self._batch_inputs(batch), None, dense=False, codes=False).pooled

    # ---------------------------------------------------------------------------------------- pretraining
    def pretraining_loss(self, batch: dict, mask_ratio: float | None = None,
                         generator: torch.Generator | None = None,
                         denoise_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked token modeling on a batch dict: predict the tokenizer codes of masked (band, cell) tokens.

        The codes come from the (frozen) tokenizer on the unmasked data; the token mask is drawn by
        :func:`sample_token_mask` from ``generator`` (same generator state, same mask); with probability
        ``config.instrument_dropout`` a patch's instrument is replaced by "unknown". Each masked token predicts
        its ``token_patch**2`` codes with a cross-entropy loss. With ``config.pixel_loss_weight > 0`` a linear
        head also regresses the masked token's scaled pixels (MSE), added with that weight. With
        ``config.denoise_loss_weight > 0`` and a ``denoise_target`` (B, C, H, W), an independent noisy copy of
        the image ``batch["scaled"]`` holds (:func:`skyfm.pretrain.noise_split.noise_split`), every valid token,
        masked or not, regresses its cell of that copy (MSE, ``denoise_loss``): its conditional mean is the
        noise-free sky, so the features learn where the sources are without any truth.

        Returns a dict of scalar tensors: ``loss`` (to backpropagate), ``mtm_loss``, ``accuracy`` (top-1 on the
        masked codes), ``mask_fraction``, ``code_perplexity`` (of the target codes: ~1 means the tokenizer has
        collapsed and the accuracy means nothing) and, when enabled, ``pixel_loss``.
        """
        mask_ratio = self.config.mask_ratio if mask_ratio is None else float(mask_ratio)
        inputs = self._batch_inputs(batch)
        B, C, H, W = inputs.scaled.shape
        s, p = self.token_stride, self.config.token_patch
        grid = (H // s, W // s)
        rng = numpy_rng(generator)
        mask_np = sample_token_mask(inputs.band_valid.cpu().numpy(), grid, mask_ratio,
                                    self.config.mask_block_fraction, rng)
        token_mask = torch.from_numpy(mask_np).to(self.device)
        if self.config.instrument_dropout > 0:
            drop = torch.from_numpy(rng.random(B) < self.config.instrument_dropout).to(self.device)
            inputs.instrument_id = torch.where(drop, torch.full_like(inputs.instrument_id, self.unknown_instrument_id),
                                               inputs.instrument_id)
        out = self._forward(inputs, token_mask, dense=False, codes=True)

        selected = token_mask.flatten(2)  # (B, C, L)
        features = out.token_features[selected]  # (N, D)
        targets = rearrange(out.codes, "b c (h p1) (w p2) -> b c (h w) (p1 p2)", p1=p, p2=p)[selected]  # (N, p*p)
        K = self.tokenizer.num_codes
        logits = self.mtm_head(features).reshape(-1, p * p, K).float()  # (N, p*p, K)
        mtm_loss = F.cross_entropy(logits.reshape(-1, K), targets.reshape(-1))
        loss = mtm_loss
        result = {
            "mtm_loss": mtm_loss.detach(),
            "accuracy": (logits.argmax(-1) == targets).float().mean().detach(),
            "mask_fraction": selected.sum().float().detach() / (inputs.band_valid.sum() * grid[0] * grid[1]),
            "code_perplexity": codebook_perplexity(code_histogram(out.codes.detach(), K)).to(self.device),
        }
        if self.config.pixel_loss_weight > 0:
            pixels = rearrange(inputs.scaled, "b c (h s1) (w s2) -> b c (h w) (s1 s2)", s1=s, s2=s)[selected]
            pixel_loss = F.mse_loss(self.pixel_head(features).float(), pixels)
            loss = loss + self.config.pixel_loss_weight * pixel_loss
            result["pixel_loss"] = pixel_loss.detach()
        if denoise_target is not None and self.config.denoise_loss_weight > 0:
            valid = inputs.band_valid  # (B, C): every cell of a valid band
            cells = rearrange(denoise_target.to(out.token_features.device), "b c (h s1) (w s2) -> b c (h w) (s1 s2)",
                              s1=s, s2=s)[valid]  # (N, L, s*s)
            denoise_loss = F.mse_loss(self.pixel_head(out.token_features[valid]).float(), cells.float())
            loss = loss + self.config.denoise_loss_weight * denoise_loss
            result["denoise_loss"] = denoise_loss.detach()
        return {"loss": loss, **result}

    # ------------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Each file is written to a temporary name and renamed into place, weights first, so an interrupted save
        never leaves a half-written file behind.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "skyfm": self.config.name})
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(self.config.to_json() + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        **config_overrides) -> "FoundationModel":
        """Load a model saved by :meth:`save_pretrained`, in eval mode, on ``map_location``.

        ``config_overrides`` replace config fields that do not change the weights' shapes (e.g.
        ``instrument_dropout``). Raises :class:`SkyfmError` for a missing folder or file, an unreadable config,
        a corrupt or truncated weights file, or weights that do not fit the config (naming the first keys).
        """
        directory = Path(directory)
        if not directory.exists():
            raise SkyfmError(f"model directory {directory} does not exist")
        if not directory.is_dir():
            raise SkyfmError(f"{directory} is not a model directory "
                             f"(expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise SkyfmError(f"{directory} is not a saved skyfm model: {path.name} is missing")
        config = FoundationConfig.from_json(config_path)
        if config_overrides:
            config = config.replace(**config_overrides)
        state = read_safetensors(weights_path)
        model = cls(config)
        check_state_dict(model.state_dict(), state, weights_path, config_path)
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


# ------------------------------------------------------------------------------------------ checkpoint I/O
def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; a corrupt or truncated file raises SkyfmError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise SkyfmError(f"{path}: cannot read the weights, the file is corrupt or truncated ({err})") from None


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], weights_path: Path,
                     config_path: Path) -> None:
    """Raise SkyfmError naming the first missing, unexpected or wrongly shaped tensors."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in found and tuple(found[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (checkpoint vs config: {'; '.join(mismatched[:3])})")
    if problems:
        raise SkyfmError(f"{weights_path} does not match {config_path}: {'; '.join(problems)}")


__all__ = ["FoundationConfig", "FoundationModel", "FoundationOutput", "numpy_rng", "sample_token_mask"]
