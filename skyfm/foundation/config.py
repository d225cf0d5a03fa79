"""Configuration of a foundation model: tokenizer + backbone, as dataclasses that round-trip through JSON.

A saved model's ``config.json`` is :meth:`FoundationConfig.to_dict`; :meth:`FoundationConfig.from_dict` checks
every key and type and raises :class:`~skyfm.errors.SkyfmError` naming the first bad one, so a hand-edited or
foreign ``config.json`` fails with one clear line instead of a traceback deep inside a constructor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from skyfm.errors import SkyfmError
from skyfm.tokenizers.vqvae import TokenizerConfig

CONFIG_FORMAT = "skyfm-foundation"
CONFIG_VERSION = 1
TOKEN_INPUTS = ("continuous", "quantized", "code")


def default_instruments() -> tuple[str, ...]:
    """The built-in instrument names, sorted: the rows of the instrument-embedding table (plus one 'unknown')."""
    from skyfm.instruments import list_instruments

    return tuple(list_instruments())


@dataclass
class ViTConfig:
    """A ViT over (band, position) tokens; see :mod:`skyfm.foundation.vit`.

    Attributes:
        embed_dim: token width D. depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate: as in timm's ViT.
        token_patch: latent cells per token side; a token covers ``tokenizer.downsample * token_patch`` pixels.
        token_input: what a token is made of: ``continuous`` (the tokenizer's latents before quantization),
            ``quantized`` (after), or ``code`` (a learned embedding of the code index).
        pos_frequencies: sin-cos frequencies per axis of the sky-offset position embedding.
        band_frequencies: Fourier frequencies of the band (wavelength) embedding.
        decoder_channels: widths of the x2 upsampling stages from the token grid down to 2x2-pixel cells
            (``log2(tokenizer.downsample * token_patch) - 1`` values); a pixel shuffle then reaches full resolution.
        stem_channels: width of the pixel stem (on 2x2-pixel cells) fused into the dense features.
        dense_dim: channels Df of the full-resolution dense features the heads read.
        pixel_tokens: also embed each (band, cell) token's scaled pixels (a linear patch embedding, as a plain
            ViT's) and add them to its tokenizer latents, so that what the tokenizer drops (isolated high-energy
            photons of a counts cube) still reaches the transformer.
    """

    kind: str = "vit"
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    token_patch: int = 2
    token_input: str = "continuous"
    pos_frequencies: int = 24
    band_frequencies: int = 8
    decoder_channels: tuple[int, ...] = (64, 32)
    stem_channels: int = 16
    dense_dim: int = 32
    pixel_tokens: bool = False

    def __post_init__(self):
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)


@dataclass
class UNetConfig:
    """An attention U-Net; see :mod:`skyfm.foundation.unet`.

    Attributes:
        channels: widths of the levels, from 2x2-pixel cells (stride 2, the pixel stem's grid) down to the token
            grid (stride ``2 ** len(channels)``, a multiple of ``tokenizer.downsample``); a pixel shuffle takes the
            dense output back to full resolution.
        num_res_blocks: ResNet blocks per level (encoder and decoder).
        attention_levels: how many of the lowest-resolution levels get self-attention (1 or 2).
        attention_depth: transformer blocks per attention level.
        num_heads: attention heads.
        embed_dim: width D of the per-band token features (the masked-token readout).
        pos_frequencies, band_frequencies: as for the ViT.
        stem_channels: width of the per-band pixel stem (its band-pooled output is the U-Net's input).
        dense_dim: channels Df of the full-resolution dense features.
        drop_path_rate: stochastic depth in the attention blocks.
    """

    kind: str = "unet"
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 1
    attention_levels: int = 1
    attention_depth: int = 2
    num_heads: int = 4
    embed_dim: int = 128
    pos_frequencies: int = 24
    band_frequencies: int = 8
    stem_channels: int = 16
    dense_dim: int = 32
    drop_path_rate: float = 0.0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)


BackboneConfig = Union[ViTConfig, UNetConfig]
BACKBONES = {"vit": ViTConfig, "unet": UNetConfig}


@dataclass
class FoundationConfig:
    """Everything that defines a :class:`~skyfm.foundation.model.FoundationModel`.

    Attributes:
        name: the registry name it was made from (informational).
        tokenizer: the VQ-VAE tokenizer.
        backbone: a :class:`ViTConfig` or a :class:`UNetConfig`.
        instruments: names of the instrument-embedding rows, in the order of ``instrument_id`` (the sorted
            built-in names when the model was made); one more row, ``len(instruments)``, is "unknown".
        instrument_dropout: share of patches whose instrument is replaced by "unknown" during pretraining, so
            that a new telescope (a YAML file) starts from a trained embedding.
        mask_ratio: default share of (band, cell) tokens masked by :meth:`pretraining_loss`.
        mask_block_fraction: share of the masked tokens drawn as rectangular blocks (the rest uniformly).
        pixel_loss_weight: weight of the optional masked pixel reconstruction term (0 disables it).
        denoise_loss_weight: weight of the optional denoising term (0 disables it): the backbone sees one of two
            independent noisy copies of the image and every token regresses its cell of the other
            (:mod:`skyfm.pretrain.noise_split`), so token features learn the noise-free sky.
        freeze_tokenizer: the tokenizer starts frozen (no gradients, eval mode) in a new model.
    """

    name: str = "custom"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    backbone: BackboneConfig = field(default_factory=ViTConfig)
    instruments: tuple[str, ...] = field(default_factory=default_instruments)
    instrument_dropout: float = 0.1
    mask_ratio: float = 0.5
    mask_block_fraction: float = 0.5
    pixel_loss_weight: float = 0.0
    denoise_loss_weight: float = 0.0
    freeze_tokenizer: bool = True

    def __post_init__(self):
        self.instruments = tuple(self.instruments)
        self.validate()

    # ------------------------------------------------------------------------------------ derived values
    @property
    def token_stride(self) -> int:
        """Pixels per token side: patch heights and widths must be multiples of it."""
        if isinstance(self.backbone, ViTConfig):
            return self.tokenizer.downsample * self.backbone.token_patch
        return 2 ** len(self.backbone.channels)

    @property
    def token_patch(self) -> int:
        """Latent cells per token side (the masked-token target is token_patch^2 codes per token)."""
        return self.token_stride // self.tokenizer.downsample

    def validate(self) -> None:
        """Raise :class:`SkyfmError` naming the first inconsistent field."""
        b = self.backbone
        if not isinstance(b, (ViTConfig, UNetConfig)):
            raise SkyfmError(f"backbone must be a ViTConfig or UNetConfig, got {type(b).__name__}")
        if BACKBONES.get(b.kind) is not type(b):
            raise SkyfmError(f"backbone.kind {b.kind!r} does not match a {type(b).__name__}")
        if b.embed_dim % b.num_heads:
            raise SkyfmError(f"backbone.embed_dim ({b.embed_dim}) must be divisible by num_heads ({b.num_heads})")
        if isinstance(b, ViTConfig):
            if b.token_input not in TOKEN_INPUTS:
                raise SkyfmError(f"backbone.token_input must be one of {', '.join(TOKEN_INPUTS)}, got {b.token_input!r}")
            if b.token_patch < 1 or b.depth < 1:
                raise SkyfmError("backbone.token_patch and backbone.depth must be >= 1")
            ups = int(round(math.log2(self.token_stride))) - 1
            if len(b.decoder_channels) != ups:
                raise SkyfmError(f"backbone.decoder_channels needs log2(token stride {self.token_stride}) - 1 = {ups} "
                                 f"widths, got {list(b.decoder_channels)}")
        else:
            stride = self.token_stride
            if len(b.channels) < 1 or stride % self.tokenizer.downsample:
                raise SkyfmError(f"backbone.channels gives a token stride of {stride} pixels, which must be a "
                                 f"multiple of tokenizer.downsample ({self.tokenizer.downsample})")
            if not 1 <= b.attention_levels <= len(b.channels):
                raise SkyfmError(f"backbone.attention_levels must be in 1..{len(b.channels)}, got {b.attention_levels}")
            for width in b.channels[-b.attention_levels:]:
                if width % b.num_heads:
                    raise SkyfmError(f"backbone.channels {width} at an attention level must be divisible by "
                                     f"num_heads ({b.num_heads})")
        if not 0 < self.mask_ratio < 1 or not 0 <= self.mask_block_fraction <= 1:
            raise SkyfmError("mask_ratio must be in (0, 1) and mask_block_fraction in [0, 1]")
        if not 0 <= self.instrument_dropout < 1 or self.pixel_loss_weight < 0 or self.denoise_loss_weight < 0:
            raise SkyfmError("instrument_dropout must be in [0, 1), pixel_loss_weight and denoise_loss_weight >= 0")

    # ---------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples as lists), with a format tag and version."""
        d = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION}
        d.update(_to_plain(dataclasses.asdict(self)))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "FoundationConfig":
        """Build from :meth:`to_dict` output; unknown keys, wrong types and bad values raise SkyfmError."""
        if not isinstance(data, dict):
            raise SkyfmError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", CONFIG_FORMAT)
        version = data.pop("version", CONFIG_VERSION)
        if fmt != CONFIG_FORMAT:
            raise SkyfmError(f"{source}: 'format' is {fmt!r}, not a skyfm foundation model config ({CONFIG_FORMAT!r})")
        if version != CONFIG_VERSION:
            raise SkyfmError(f"{source}: config version {version!r} is not supported (this skyfm reads {CONFIG_VERSION})")
        backbone = data.get("backbone", {})
        if not isinstance(backbone, dict):
            raise SkyfmError(f"{source}: 'backbone' should be an object")
        kind = backbone.get("kind", "vit")
        if kind not in BACKBONES:
            raise SkyfmError(f"{source}: 'backbone.kind' must be one of {', '.join(BACKBONES)}, got {kind!r}")
        kwargs = _fields_from_dict(cls, data, source, "", overrides={"backbone": BACKBONES[kind]})
        try:
            return cls(**kwargs)
        except SkyfmError as err:
            raise SkyfmError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "FoundationConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise SkyfmError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SkyfmError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def replace(self, **overrides) -> "FoundationConfig":
        """A copy with fields replaced. Nested fields by dict (``tokenizer={"codebook_size": 256}``) or by dotted
        name passed as ``**{"backbone.depth": 4}``; a ``backbone`` dict with another ``kind`` starts from that
        kind's defaults."""
        data = self.to_dict()
        for key, value in overrides.items():
            _merge(data, key.split("."), value)
        return FoundationConfig.from_dict(data, source="overrides")


# ---------------------------------------------------------------------------------------------- helpers
def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _merge(data: dict, path: list[str], value: Any, done: tuple[str, ...] = ()) -> None:
    """Set ``data[path]`` to ``value``; dicts merge into nested configs key by key."""
    head, *rest = path
    if rest:
        if not isinstance(data.get(head), dict):
            raise SkyfmError(f"overrides: {'.'.join((*done, *path))!r}: {'.'.join((*done, head))!r} is not a nested config")
        _merge(data[head], rest, value, (*done, head))
    elif isinstance(value, dict) and isinstance(data.get(head), dict):
        if head == "backbone" and value.get("kind", data[head].get("kind")) != data[head].get("kind"):
            data[head] = dict(value)  # a different backbone kind: its own defaults
        else:
            for k, v in value.items():
                _merge(data[head], [k], v, (*done, head))
    elif dataclasses.is_dataclass(value):
        data[head] = _to_plain(dataclasses.asdict(value))
    else:
        data[head] = value


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a JSON value to a field annotation (int, float, str, bool, tuple[int|float|str, ...])."""
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SkyfmError(f"{where} should be a list, got {value!r}")
        (item, *_rest) = typing.get_args(annotation) or (Any,)
        return tuple(_check_value(v, item, where) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SkyfmError(f"{where} should be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SkyfmError(f"{where} should be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SkyfmError(f"{where} should be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SkyfmError(f"{where} should be a string, got {value!r}")
        return value
    return value


def _fields_from_dict(cls, data: dict, source: str, prefix: str, overrides: dict | None = None) -> dict:
    """Keyword arguments for dataclass ``cls`` from ``data``, checking names and types recursively."""
    overrides = overrides or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise SkyfmError(f"{source}: unknown key {prefix + unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        where = f"{source}: {prefix + name!r}"
        hint = overrides.get(name, hints[name])
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise SkyfmError(f"{where} should be an object")
            sub = _fields_from_dict(hint, value, source, prefix + name + ".")
            try:
                kwargs[name] = hint(**sub)
            except SkyfmError as err:
                raise SkyfmError(f"{source}: {err}") from None
        else:
            kwargs[name] = _check_value(value, hint, where)
    return kwargs


__all__ = ["BACKBONES", "FoundationConfig", "TokenizerConfig", "UNetConfig", "ViTConfig", "default_instruments"]
