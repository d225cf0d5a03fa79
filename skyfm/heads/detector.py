"""The SourceDetector: a FoundationModel backbone and light task heads on its dense features.

    from skyfm.heads import SourceDetector, load_detector
    det = load_detector()                          # the default detector shipped in the package
    det = load_detector("runs/my-detector")        # config.json + model.safetensors
    batch = det.make_batch([patch1, patch2])       # model inputs + flux units, from Patches of one size
    out = det(batch)                               # DetectorOutput: dense maps (B, ., H, W)
    losses = det.loss(out, targets)                # dict, losses["loss"].backward()
    det.save_pretrained("runs/my-detector")

Architecture: ``foundation.dense_features`` (B, Df, H, W) -> a shared trunk (``trunk_depth`` 3x3 convs,
GroupNorm, GELU) -> one 1x1 output convolution per instrument (its *light head*), whose channels are, in order
(:data:`CHANNELS`): heat (1), offset (2), pos_logsigma (1), flux (2), band_flux (2 per band), class (K),
extension (1). The families are documented in :mod:`~skyfm.heads.localization`, :mod:`~skyfm.heads.flux` and
:mod:`~skyfm.heads.classification`. A new telescope gets its own head (:meth:`SourceDetector.add_instrument`),
initialised from a trained head of the same kind, and the shared backbone.

Checkpoints: ``config.json`` (the :class:`~skyfm.heads.config.DetectorConfig` with the backbone's
``FoundationConfig`` under ``foundation``) and ``model.safetensors`` (every tensor, optionally float16 to ship
small). Nothing is unpickled; a corrupt, truncated or mismatched checkpoint raises a one-line SkyfmError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skyfm.errors import SkyfmError
from skyfm.foundation.config import FoundationConfig
from skyfm.foundation.model import BATCH_KEYS, FoundationModel, check_state_dict, read_safetensors
from skyfm.heads.classification import class_loss, extension_loss
from skyfm.heads.config import DetectorConfig, InstrumentHeadConfig, read_json
from skyfm.heads.flux import gaussian_nll
from skyfm.heads.localization import LOGSIGMA_RANGE, focal_loss, offset_nll
from skyfm.utils import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHANNELS = ("heat", "offset", "pos_logsigma", "flux", "band_flux", "class", "extension")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "resources" / "models" / "detector-default"
BACKBONE_MODES = ("frozen", "partial", "full")
HEAT_PRIOR = 0.01  # initial heatmap probability (CenterNet's bias trick: few pixels are centres)


@dataclass
class DetectorOutput:
    """Dense predictions of a batch (B patches, H x W pixels); padded where instruments differ.

    Attributes:
        heat: (B, 1, H, W) logits of "a source centre is here".
        offset: (B, 2, H, W) sub-pixel (dx, dy) of the centre from the pixel centre, pixels.
        pos_logsigma: (B, 1, H, W) ln of the 1-sigma offset error per axis, pixels.
        flux: (B, 2, H, W) mean and ln variance of ln(total flux / unit).
        band_flux: (B, Nb, 2, H, W) the same per band of the instrument (Nb = the batch's largest band count).
        class_logits: (B, K, H, W) class logits (K = the batch's largest class count; absent classes -1e4).
        extension: (B, 1, H, W) ln(1 + extension / native pixel).
        instruments: the instrument name of each patch.
    """

    heat: torch.Tensor
    offset: torch.Tensor
    pos_logsigma: torch.Tensor
    flux: torch.Tensor
    band_flux: torch.Tensor
    class_logits: torch.Tensor
    extension: torch.Tensor
    instruments: list[str]


def _head_key(name: str) -> str:
    return name.replace(".", "_")


class SourceDetector(nn.Module):
    """Backbone + shared trunk + per-instrument light heads (module docstring)."""

    def __init__(self, config: DetectorConfig, foundation: FoundationModel | FoundationConfig):
        super().__init__()
        self.config = config
        self.foundation = foundation if isinstance(foundation, FoundationModel) else FoundationModel(foundation)
        width, layers, c = config.trunk_channels, [], self.foundation.dense_dim
        for _ in range(config.trunk_depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.GELU()]
            c = width
        self.trunk = nn.Sequential(*layers)
        self.trunk_out = c
        self.heads = nn.ModuleDict()
        for name, head in config.heads.items():
            self.heads[_head_key(name)] = self._new_head(head)
        self.backbone_mode = "full"

    # ------------------------------------------------------------------------------------------ building
    def _new_head(self, head: InstrumentHeadConfig) -> nn.Conv2d:
        conv = nn.Conv2d(self.trunk_out, head.n_outputs, 1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.bias[0] = float(np.log(HEAT_PRIOR / (1 - HEAT_PRIOR)))
        return conv

    @classmethod
    def from_foundation(cls, foundation: FoundationModel, instruments, **config) -> "SourceDetector":
        """A detector with fresh heads for ``instruments`` (names, YAML paths or Instruments) on ``foundation``."""
        heads = {}
        for inst in instruments:
            h = InstrumentHeadConfig.for_instrument(inst)
            heads[h.name] = h
        return cls(DetectorConfig(heads=heads, **config), foundation)

    def instrument(self, name):
        """The Instrument of a head (a user's telescope is rebuilt from the YAML stored in the config)."""
        if not isinstance(name, str):
            return name
        cache = self.__dict__.setdefault("_instrument_cache", {})
        if name not in cache:
            if name in self.config.heads:
                cache[name] = self.config.heads[name].instrument()
            else:
                from skyfm.instruments import load_instrument

                cache[name] = load_instrument(name)
        return cache[name]

    def head_config(self, instrument: str) -> InstrumentHeadConfig:
        if instrument not in self.config.heads:
            raise SkyfmError(f"this detector has no head for instrument '{instrument}' (it knows "
                             f"{', '.join(self.config.heads)}); fine-tune one: skyfm finetune --instrument {instrument}")
        return self.config.heads[instrument]

    def add_instrument(self, inst) -> InstrumentHeadConfig:
        """Add a head for a new instrument, copying the shared-meaning channels from a trained head of its kind."""
        new = InstrumentHeadConfig.for_instrument(inst)
        if new.name in self.config.heads:
            return self.config.heads[new.name]
        conv = self._new_head(new).to(self.device)
        donors = [h for h in self.config.heads.values() if h.kind == new.kind]
        if donors:
            donor = donors[0]
            src = self.heads[_head_key(donor.name)]
            with torch.no_grad():
                for (s0, s1), (d0, d1) in zip(_shared_slices(donor), _shared_slices(new)):
                    n = min(s1 - s0, d1 - d0)
                    conv.weight[d0:d0 + n] = src.weight[s0:s0 + n]
                    conv.bias[d0:d0 + n] = src.bias[s0:s0 + n]
                if donor.class_names == new.class_names:
                    s0, s1 = _slice(donor, "class")
                    d0, _ = _slice(new, "class")
                    conv.weight[d0:d0 + s1 - s0] = src.weight[s0:s1]
                    conv.bias[d0:d0 + s1 - s0] = src.bias[s0:s1]
        self.config.heads[new.name] = new
        self.heads[_head_key(new.name)] = conv
        return new

    # ---------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.foundation.device

    @property
    def token_stride(self) -> int:
        return self.foundation.token_stride

    def set_backbone_mode(self, mode: str, partial_blocks: int = 2) -> None:
        """``frozen``: only the trunk and heads train; ``partial``: also the backbone's dense decoder, pixel stem,
        final norm and last ``partial_blocks`` transformer blocks (U-Net: its decoder half); ``full``: the whole
        backbone. The tokenizer (and its codebook) always stays frozen."""
        if mode not in BACKBONE_MODES:
            raise SkyfmError(f"backbone mode must be one of {', '.join(BACKBONE_MODES)}, got {mode!r}")
        fm = self.foundation
        fm.requires_grad_(False)
        if mode == "full":
            fm.backbone.requires_grad_(True)
        elif mode == "partial":
            bb = fm.backbone
            if hasattr(bb, "blocks"):
                for block in list(bb.blocks)[-partial_blocks:]:
                    block.requires_grad_(True)
                for name in ("norm", "stem", "decoder"):
                    getattr(bb, name).requires_grad_(True)
            else:
                for name, module in bb.named_children():
                    if any(k in name for k in ("up", "dec", "stem", "out", "fuse")):
                        module.requires_grad_(True)
        fm.set_tokenizer_trainable(False)
        self.backbone_mode = mode
        self.train(self.training)

    def train(self, mode: bool = True) -> "SourceDetector":
        super().train(mode)
        if getattr(self, "backbone_mode", "full") == "frozen":
            self.foundation.eval()  # no dropout / drop-path in a frozen backbone
        return self

    # -------------------------------------------------------------------------------------------- batches
    def make_batch(self, patches, keys: list[str] | None = None) -> dict:
        """Model inputs from Patches of one size (any instruments): the collated batch, plus ``flux_units``
        (list of (C,) arrays, see :mod:`skyfm.heads.flux`) and ``head_instrument`` (the head each patch uses)."""
        from skyfm.data.shards import collate_patches, sample_from_patch

        samples = []
        for i, p in enumerate(patches):
            key = keys[i] if keys else f"p{i}"
            samples.append(sample_from_patch(p, key=key, instrument=self.instrument(p.instrument)))
        batch = collate_patches(samples)
        units, heads = [], []
        for s, p in zip(samples, patches):
            head = self.head_config(s["instrument"])
            heads.append(head.name)
            sc = s["meta"]["scaling"]
            if head.kind == "ccd" and sc.get("method") == "asinh":
                units.append(np.asarray(sc["sigma"], dtype=np.float64) * float(sc.get("softening", 1.0)))
            else:
                units.append(np.ones(p.n_bands, dtype=np.float64))
        batch["flux_units"] = units
        batch["head_instrument"] = heads
        return batch

    # -------------------------------------------------------------------------------------------- forward
    def features(self, batch: dict) -> torch.Tensor:
        grad = torch.no_grad() if self.backbone_mode == "frozen" else contextlib.nullcontext()
        with grad:
            out = self.foundation(*(batch[k] for k in BATCH_KEYS), dense=True, codes=False)
        return out.dense_features

    def forward(self, batch: dict) -> DetectorOutput:
        feats = self.trunk(self.features(batch))
        names = list(batch.get("head_instrument") or batch["instrument"])
        B, _, H, W = feats.shape
        configs = [self.head_config(n) for n in names]
        nb = max(h.n_bands for h in configs)
        k = max(len(h.class_names) for h in configs)
        dev, dt = feats.device, feats.dtype
        out = {
            "heat": torch.zeros(B, 1, H, W, device=dev, dtype=dt),
            "offset": torch.zeros(B, 2, H, W, device=dev, dtype=dt),
            "pos_logsigma": torch.zeros(B, 1, H, W, device=dev, dtype=dt),
            "flux": torch.zeros(B, 2, H, W, device=dev, dtype=dt),
            "band_flux": torch.zeros(B, nb, 2, H, W, device=dev, dtype=dt),
            "class_logits": torch.full((B, k, H, W), -1e4, device=dev, dtype=dt),
            "extension": torch.zeros(B, 1, H, W, device=dev, dtype=dt),
        }
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        single = len(groups) == 1
        for name, idx in groups.items():
            head = self.config.heads[name]
            x = feats if single else feats[idx]
            y = self.heads[_head_key(name)](x)
            parts = _split(head, y)
            if single:
                out.update({k2: v for k2, v in parts.items() if k2 not in ("band_flux", "class_logits")})
                out["band_flux"] = parts["band_flux"] if head.n_bands == nb else out["band_flux"]
                if head.n_bands != nb:
                    out["band_flux"][:, :head.n_bands] = parts["band_flux"]
                if len(head.class_names) == k:
                    out["class_logits"] = parts["class_logits"]
                else:
                    out["class_logits"][:, :len(head.class_names)] = parts["class_logits"]
                continue
            index = torch.as_tensor(idx, device=dev)
            for key, value in parts.items():
                if key == "band_flux":
                    out[key][index, :head.n_bands] = value
                elif key == "class_logits":
                    out[key][index, :len(head.class_names)] = value
                else:
                    out[key][index] = value
        return DetectorOutput(instruments=names, **out)

    # ----------------------------------------------------------------------------------------------- loss
    def loss(self, out: DetectorOutput, targets: dict) -> dict[str, torch.Tensor]:
        """Weighted sum of the head losses against :func:`~skyfm.heads.targets.build_targets` maps, batched
        (``heat``, ``neg_weight``, ``dx``, ``dy``, ``flux``, ``extension`` (B, H, W); ``band_flux``
        (B, Nb, H, W); ``cls`` (B, H, W) int64; ``reg`` (B, H, W) bool)."""
        c = self.config
        w = c.loss_weights
        heat = focal_loss(out.heat[:, 0], targets["heat"], targets["neg_weight"], c.focal_alpha, c.focal_beta)
        reg = targets["reg"]
        off_pred = out.offset.permute(0, 2, 3, 1)[reg]  # (N, 2)
        off_true = torch.stack([targets["dx"][reg], targets["dy"][reg]], dim=1)
        off_nll, off_l1 = offset_nll(off_pred, out.pos_logsigma[:, 0][reg], off_true)
        flux = gaussian_nll(out.flux[:, 0][reg], out.flux[:, 1][reg], targets["flux"][reg])
        nb = min(out.band_flux.shape[1], targets["band_flux"].shape[1])
        bf_pred = out.band_flux[:, :nb].permute(0, 3, 4, 1, 2)[reg]  # (N, nb, 2)
        bf_true = targets["band_flux"][:, :nb].permute(0, 2, 3, 1)[reg]  # (N, nb)
        band = gaussian_nll(bf_pred[..., 0], bf_pred[..., 1], bf_true)
        cls = class_loss(out.class_logits.permute(0, 2, 3, 1)[reg], targets["cls"][reg])
        ext = extension_loss(out.extension[:, 0][reg], targets["extension"][reg])
        offset = 0.5 * off_nll + off_l1
        total = (w.get("heat", 1) * heat + w.get("offset", 1) * offset + w.get("flux", 1) * flux
                 + w.get("band_flux", 1) * band + w.get("class", 1) * cls + w.get("extension", 1) * ext)
        return {"loss": total, "heat_loss": heat.detach(), "offset_nll": off_nll.detach(),
                "offset_l1": off_l1.detach(), "flux_nll": flux.detach(), "band_flux_nll": band.detach(),
                "class_loss": cls.detach(), "extension_loss": ext.detach(),
                "n_targets": reg.sum().float().detach()}

    # ------------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (floats as ``dtype``) atomically, weights first."""
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu")
            state[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "skyfm": "detector"})
        config = self.config.to_dict()
        config["foundation"] = self.foundation.config.to_dict()
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "SourceDetector":
        """Load a detector saved by :meth:`save_pretrained`, in eval mode (float32)."""
        directory = Path(directory)
        if not directory.exists():
            raise SkyfmError(f"model directory {directory} does not exist")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise SkyfmError(f"{directory} is not a model directory (expected a folder with {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME})")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise SkyfmError(f"{directory} is not a saved skyfm detector: {path.name} is missing")
        raw = read_json(config_path, "detector config")
        if not isinstance(raw, dict) or "foundation" not in raw:
            raise SkyfmError(f"{config_path} is not a skyfm detector config (a backbone-only model? pass it to "
                             "skyfm finetune --init to train heads on it)")
        foundation = FoundationConfig.from_dict(raw.pop("foundation"), source=str(config_path))
        config = DetectorConfig.from_dict(raw, source=str(config_path))
        state = read_safetensors(weights_path)
        model = cls(config, foundation)
        check_state_dict(model.state_dict(), state, weights_path, config_path)
        expected = model.state_dict()
        state = {k: (v.to(expected[k].dtype) if v.is_floating_point() else v) for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return model.to(map_location).eval()


def _slice(head: InstrumentHeadConfig, family: str) -> tuple[int, int]:
    sizes = {"heat": 1, "offset": 2, "pos_logsigma": 1, "flux": 2, "band_flux": 2 * head.n_bands,
             "class": len(head.class_names), "extension": 1}
    start = 0
    for name in CHANNELS:
        if name == family:
            return start, start + sizes[name]
        start += sizes[name]
    raise KeyError(family)


def _shared_slices(head: InstrumentHeadConfig):
    """Channel ranges whose meaning does not depend on the bands or classes (copied to a new telescope's head)."""
    return [_slice(head, f) for f in ("heat", "offset", "pos_logsigma", "flux", "extension")]


def _split(head: InstrumentHeadConfig, y: torch.Tensor) -> dict[str, torch.Tensor]:
    s = {f: _slice(head, f) for f in CHANNELS}
    B, _, H, W = y.shape
    return {
        "heat": y[:, s["heat"][0]:s["heat"][1]],
        "offset": y[:, s["offset"][0]:s["offset"][1]],
        "pos_logsigma": y[:, s["pos_logsigma"][0]:s["pos_logsigma"][1]].clamp(*LOGSIGMA_RANGE),
        "flux": y[:, s["flux"][0]:s["flux"][1]],
        "band_flux": y[:, s["band_flux"][0]:s["band_flux"][1]].reshape(B, head.n_bands, 2, H, W),
        "class_logits": y[:, s["class"][0]:s["class"][1]],
        "extension": y[:, s["extension"][0]:s["extension"][1]],
    }


def load_detector(model_dir: str | Path | None = None, map_location: str | torch.device = "cpu") -> SourceDetector:
    """The detector saved in ``model_dir``, or the default one shipped inside the package (``None``)."""
    if model_dir is None:
        if not (DEFAULT_MODEL_DIR / WEIGHTS_NAME).is_file():
            raise SkyfmError(f"the default detector is missing from this installation ({DEFAULT_MODEL_DIR}); "
                             "pass --model DIR")
        model_dir = DEFAULT_MODEL_DIR
    return SourceDetector.from_pretrained(model_dir, map_location=map_location)


__all__ = ["BACKBONE_MODES", "CHANNELS", "DEFAULT_MODEL_DIR", "DetectorOutput", "SourceDetector", "load_detector"]
