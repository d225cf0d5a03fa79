"""An attention U-Net with the same interface as the ViT backbone.

The input is the scaled image itself: each band goes through the shared pixel stem
(:class:`~skyfm.foundation.embeddings.PixelStem`, conditioned on the band embedding; it works on 2x2-pixel cells
with every pixel value kept as a channel) and the stems are averaged over the valid bands, so any number of
bands, in any order, of any instrument, gives one (B, S, H/2, W/2) map. The instrument embedding is added to it,
then a classic U-Net runs:

    level 0 (stride 2)       ResBlocks ─────────────────────────────────────────┐ skip
    level 1 (stride 4)       down, ResBlocks ─────────────────────────┐ skip    │
    ...                                                               │         │
    level L-1 (stride 2^L)   down, ResBlocks                                    │
                             mid ResBlock, self-attention = the token grid      │
    decoder                  up, concat skip, ResBlocks, [self-attention] ... up, concat, ResBlocks
                             -> 1x1 conv to 4 Df channels -> pixel shuffle -> dense (B, Df, H, W)

Self-attention (timm ``Block``) runs at the lowest ``attention_levels`` levels, where the grid is small; tokens
there get the same sky-position embedding as the ViT's. The bottleneck (stride ``2^L`` = tokenizer downsampling x
token_patch) is the token grid: per-band token features for masked token modeling are read out from it by adding
each band's embedding and applying a small MLP, so the U-Net predicts band c's codes exactly as the ViT does.

Masked tokens blank their band's pixels (value 0, mask indicator 1) before the stem, so the masked content is
really hidden from the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from skyfm.foundation.config import UNetConfig
from skyfm.foundation.embeddings import (
    BackboneInputs,
    BackboneOutput,
    BandEmbedding,
    InstrumentEmbedding,
    PixelStem,
    SkyPositionEmbedding,
    token_pixel_mask,
)
from skyfm.tokenizers.vqvae import ResBlock, TokenizerConfig, group_norm


class GridAttention(nn.Module):
    """Self-attention over the cells of a (B, c, h, w) map, with sky-position embeddings added first."""

    def __init__(self, channels: int, depth: int, num_heads: int, pos_frequencies: int, drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = SkyPositionEmbedding(channels, pos_frequencies)
        self.blocks = nn.ModuleList(Block(channels, num_heads, qkv_bias=True, drop_path=drop_path) for _ in range(depth))
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, stride: int, image_size: tuple[int, int],
                pixel_scale_deg: torch.Tensor) -> torch.Tensor:
        B, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, c)
        tokens = tokens + self.pos_embed((h, w), stride, image_size, pixel_scale_deg)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return x + tokens.transpose(1, 2).reshape(B, c, h, w)  # residual around the whole attention stage


class UNetBackbone(nn.Module):
    """Attention U-Net over band-pooled pixel-stem features; see the module docstring."""

    latent_kind = None  # the U-Net reads pixels, not tokenizer latents

    def __init__(self, config: UNetConfig, tokenizer: TokenizerConfig, num_instruments: int):
        super().__init__()
        self.config = config
        ch = config.channels
        n_levels = len(ch)
        D = config.embed_dim
        self.embed_dim = D
        self.dense_dim = config.dense_dim
        self.token_stride = 2**n_levels  # level i runs at stride 2^(i+1)
        self.token_patch = self.token_stride // tokenizer.downsample
        self.attention_from = n_levels - config.attention_levels  # levels >= this attend

        self.band_embed = BandEmbedding(D, config.band_frequencies)
        self.instrument_embed = InstrumentEmbedding(num_instruments, D)
        self.stem = PixelStem(config.stem_channels, D)
        self.instrument_to_stem = nn.Linear(D, config.stem_channels)
        self.conv_in = nn.Conv2d(config.stem_channels, ch[0], 3, padding=1)  # on the stem's 2x2-pixel cells

        def attention(level: int) -> nn.Module | None:
            # the bottleneck level attends in ``mid_attn``; levels above it when attention_levels > 1
            if level < self.attention_from or level == n_levels - 1:
                return None
            return GridAttention(ch[level], config.attention_depth, config.num_heads, config.pos_frequencies,
                                 config.drop_path_rate)

        nb = config.num_res_blocks
        self.down = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        self.enc_attn = nn.ModuleList()
        for level, width in enumerate(ch):
            self.down.append(nn.Conv2d(ch[level - 1], width, 3, stride=2, padding=1) if level else nn.Identity())
            self.enc_blocks.append(nn.Sequential(*(ResBlock(width, width) for _ in range(nb))))
            self.enc_attn.append(attention(level) or nn.Identity())
        self.mid = ResBlock(ch[-1], ch[-1])
        self.mid_attn = GridAttention(ch[-1], config.attention_depth, config.num_heads, config.pos_frequencies,
                                      config.drop_path_rate)
        self.up = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        self.dec_attn = nn.ModuleList()
        for level in reversed(range(n_levels - 1)):
            width = ch[level]
            self.up.append(nn.Conv2d(ch[level + 1], width, 3, padding=1))
            blocks = [ResBlock(2 * width, width)] + [ResBlock(width, width) for _ in range(max(nb - 1, 0))]
            self.dec_blocks.append(nn.Sequential(*blocks))
            self.dec_attn.append(attention(level) or nn.Identity())
        self.dense_out = nn.Sequential(group_norm(ch[0]), nn.SiLU(),
                                       nn.Conv2d(ch[0], config.dense_dim * PixelStem.factor**2, 1))

        # per-band token readout at the bottleneck
        self.token_proj = nn.Linear(ch[-1], D)
        self.token_norm = nn.LayerNorm(D)
        self.token_mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.out_norm = nn.LayerNorm(D)

    @staticmethod
    def level_stride(level: int) -> int:
        """Pixels per cell side at ``level`` (level 0 is the pixel stem's 2x2 cells)."""
        return PixelStem.factor * 2**level

    def _attend(self, module: nn.Module, x: torch.Tensor, level: int, inputs: BackboneInputs) -> torch.Tensor:
        if isinstance(module, GridAttention):
            return module(x, self.level_stride(level), inputs.image_size, inputs.pixel_scale_deg)
        return x

    def encode(self, inputs: BackboneInputs, token_mask: torch.Tensor | None):
        """The contracting path: (bottleneck (B, c_L, h', w'), skips, band embeddings (B, C, D))."""
        band = self.band_embed(inputs.band_coord)  # (B, C, D)
        pixel_mask = token_pixel_mask(token_mask, self.token_stride) if token_mask is not None else None
        x = self.stem(inputs.scaled, inputs.band_valid, band, pixel_mask)  # (B, S, H/2, W/2)
        x = x + self.instrument_to_stem(self.instrument_embed(inputs.instrument_id))[:, :, None, None]
        x = self.conv_in(x)  # (B, ch0, H/2, W/2)
        skips = []
        for level, (down, blocks, attn) in enumerate(zip(self.down, self.enc_blocks, self.enc_attn)):
            x = self._attend(attn, blocks(down(x)), level, inputs)
            skips.append(x)
        top = len(self.down) - 1
        x = self.mid_attn(self.mid(x), self.level_stride(top), inputs.image_size, inputs.pixel_scale_deg)
        # x: (B, c_L, h', w'), the token grid
        return x, skips[:-1], band

    def forward_features(self, inputs: BackboneInputs, token_mask: torch.Tensor | None = None) -> BackboneOutput:
        bottleneck, skips, band = self.encode(inputs, token_mask)
        out = self.readout(bottleneck, band, inputs.band_valid)
        out.cache = (bottleneck, skips)  # for forward_dense
        return out

    def readout(self, bottleneck: torch.Tensor, band: torch.Tensor, band_valid: torch.Tensor) -> BackboneOutput:
        """Per-band token features from the band-agnostic bottleneck: MLP(cell feature + band embedding)."""
        B, _, h, w = bottleneck.shape
        cells = self.token_norm(self.token_proj(bottleneck.flatten(2).transpose(1, 2)))  # (B, L, D)
        x = cells[:, None] + band[:, :, None]  # (B, C, L, D)
        x = self.out_norm(x + self.token_mlp(x))
        x = x * band_valid[:, :, None, None].to(x.dtype)
        feature_map = cells.transpose(1, 2).reshape(B, -1, h, w)  # (B, D, h', w')
        return BackboneOutput(token_features=x, feature_map=feature_map, pooled=cells.mean(dim=1), grid=(h, w))

    def forward_dense(self, inputs: BackboneInputs, features: BackboneOutput,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The expanding path: (B, Df, H, W)."""
        x, skips = features.cache
        n_levels = len(self.down)
        for i, (up, blocks, attn) in enumerate(zip(self.up, self.dec_blocks, self.dec_attn)):
            level = n_levels - 2 - i
            x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            x = blocks(torch.cat([x, skips[level]], dim=1))
            x = self._attend(attn, x, level, inputs)
        return F.pixel_shuffle(self.dense_out(x), PixelStem.factor)  # (B, Df, H, W)

    def forward(self, inputs: BackboneInputs, token_mask: torch.Tensor | None = None, dense: bool = True) -> BackboneOutput:
        out = self.forward_features(inputs, token_mask)
        if dense:
            out.dense_features = self.forward_dense(inputs, out, token_mask)
        return out


__all__ = ["GridAttention", "UNetBackbone"]
