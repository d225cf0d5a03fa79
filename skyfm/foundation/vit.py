"""A ViT over (band, position) tokens, with a light decoder to full-resolution dense features.

A patch of C bands on an h' x w' token grid is C * h' * w' tokens. Token (c, i, j) is made of the tokenizer's
latents of band c in the ``token_patch`` x ``token_patch`` latent cells of grid cell (i, j), projected to D
(with ``pixel_tokens``, plus a linear embedding of the cell's scaled pixels of band c), plus

* the band embedding of band c (its wavelength),
* the instrument embedding of the patch,
* the sky-position embedding of cell (i, j) (its offset from the patch centre in degrees).

Padding bands (``band_valid`` False) are removed from attention as keys, so they change nothing for the real
bands; their outputs are zeroed. Masked tokens (masked token modeling) have their content replaced by a learned
mask token but keep their band, instrument and position embeddings, so the network knows what to predict where.
The transformer is timm's ``Block``.

Outputs (``forward``): per-token features (B, C, L, D); their mean over valid bands as a map (B, D, h', w'); a
pooled vector (B, D); and, through :class:`DenseDecoder`, full-resolution dense features (B, Df, H, W) for the
heads: x2 transposed-conv stages from the token grid down to 2x2-pixel cells, fused with a pixel stem of the
scaled image (:class:`~skyfm.foundation.embeddings.PixelStem`, which keeps every pixel value as channels) and
pixel-shuffled to full resolution, so that sub-token detail (a point source's exact pixel) reaches the heads even
though tokens are 8 pixels wide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from skyfm.foundation.config import ViTConfig
from skyfm.foundation.embeddings import (
    BackboneInputs,
    BackboneOutput,
    BandEmbedding,
    InstrumentEmbedding,
    PixelStem,
    SkyPositionEmbedding,
    masked_band_mean,
    token_pixel_mask,
)
from skyfm.tokenizers.vqvae import TokenizerConfig, group_norm


class UpStage(nn.Module):
    """x2 upsampling: 2x2 stride-2 transposed conv, then a 3x3 conv; GroupNorm + GELU after each."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.norm1 = group_norm(out_channels)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.up(x)))
        return F.gelu(self.norm2(self.conv(x)))


class DenseDecoder(nn.Module):
    """(B, D, h', w') token map + (B, S, H/2, W/2) pixel-stem features -> (B, Df, H, W) dense features.

    x2 upsampling stages from the token grid down to 2x2-pixel cells, fusion with the pixel stem there (1x1
    convs), and a final ``pixel_shuffle`` that gives each of a cell's four pixels its own Df features. Nothing
    but that shuffle runs at full resolution, so pixels cost a few kFLOP each and detection on large images is
    bound by the transformer, not by this path.
    """

    def __init__(self, in_dim: int, channels: tuple[int, ...], skip_channels: int, out_dim: int, factor: int = 2):
        super().__init__()
        widths = (in_dim, *channels)
        self.factor = factor
        self.stages = nn.ModuleList(UpStage(widths[i], widths[i + 1]) for i in range(len(channels)))
        hidden = max(out_dim, widths[-1])
        self.fuse = nn.Sequential(
            nn.Conv2d(widths[-1] + skip_channels, hidden, 1),
            group_norm(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, out_dim * factor**2, 1),
        )

    def forward(self, feature_map: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = feature_map
        for stage in self.stages:
            x = stage(x)  # doubles the resolution
        x = self.fuse(torch.cat([x, skip], dim=1))  # (B, Df * 4, H/2, W/2)
        return F.pixel_shuffle(x, self.factor)  # (B, Df, H, W)


class ViTBackbone(nn.Module):
    """ViT over band x position tokens; see the module docstring.

    Args:
        config: the ViT hyper-parameters.
        tokenizer: the tokenizer's config (latent width, downsampling, number of codes).
        num_instruments: rows of the instrument table (an extra "unknown" row is added).
    """

    def __init__(self, config: ViTConfig, tokenizer: TokenizerConfig, num_instruments: int):
        super().__init__()
        self.config = config
        D, p = config.embed_dim, config.token_patch
        self.token_patch = p
        # None: every token attends to every token of the patch. An int n (inference on large tiles): attention
        # only inside n x n token windows, each with window-local positions, so the cost is linear in the
        # image size and every window looks like an n x n-token training patch (_windowed_blocks).
        self.attention_window: int | None = None
        self.token_stride = tokenizer.downsample * p
        self.embed_dim = D
        self.dense_dim = config.dense_dim
        if config.token_input == "code":
            self.code_embed = nn.Embedding(tokenizer.num_codes, tokenizer.latent_dim)
        self.token_embed = nn.Linear(p * p * tokenizer.latent_dim, D)
        self.pixel_embed = nn.Linear(self.token_stride**2, D) if config.pixel_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, D))
        self.band_embed = BandEmbedding(D, config.band_frequencies)
        self.instrument_embed = InstrumentEmbedding(num_instruments, D)
        self.pos_embed = SkyPositionEmbedding(D, config.pos_frequencies)
        # stochastic depth rising linearly with depth, as in timm
        drop_path = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, drop_path=dp)
            for dp in drop_path
        )
        self.norm = nn.LayerNorm(D)
        self.stem = PixelStem(config.stem_channels, D)
        self.decoder = DenseDecoder(D, config.decoder_channels, config.stem_channels, config.dense_dim,
                                    factor=PixelStem.factor)
        self._init_weights()

    @property
    def latent_kind(self) -> str:
        """Which tokenizer output the tokens are made of: ``continuous``, ``quantized`` or ``code``."""
        return self.config.token_input

    def _init_weights(self) -> None:
        """timm's ViT initialisation for the transformer and the token projections."""
        trunc_normal_(self.mask_token, std=0.02)
        for module in [self.token_embed, *([self.pixel_embed] if self.pixel_embed else []), *self.blocks, self.norm]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------------------- tokens
    def embed_tokens(self, inputs: BackboneInputs, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Token embeddings (B, C, L, D) with masking and all position/band/instrument embeddings added."""
        p = self.token_patch
        if self.config.token_input == "code":
            cells = self.code_embed(inputs.codes.clamp(min=0))  # (B, C, h, w, Dz)
            cells = rearrange(cells, "b c (h p1) (w p2) d -> b c h w (p1 p2 d)", p1=p, p2=p)
        else:
            cells = rearrange(inputs.latents, "b c d (h p1) (w p2) -> b c h w (p1 p2 d)", p1=p, p2=p)
        grid = (cells.shape[2], cells.shape[3])
        x = self.token_embed(cells.flatten(2, 3))  # (B, C, L, D)
        if self.pixel_embed is not None:
            s = self.token_stride
            pixels = rearrange(inputs.scaled, "b c (h s1) (w s2) -> b c (h w) (s1 s2)", s1=s, s2=s)
            x = x + self.pixel_embed(pixels.to(x.dtype))
        if token_mask is not None:
            hidden = token_mask.flatten(2)[..., None]  # (B, C, L, 1)
            x = torch.where(hidden, self.mask_token.to(x.dtype), x)
        band = self.band_embed(inputs.band_coord)[:, :, None]  # (B, C, 1, D)
        inst = self.instrument_embed(inputs.instrument_id)[:, None, None]  # (B, 1, 1, D)
        return x + band + inst + self._position_embedding(grid, inputs)[:, None], grid

    def _position_embedding(self, grid: tuple[int, int], inputs: BackboneInputs) -> torch.Tensor:
        """(B, L, D) sky-position embeddings: offsets from the patch centre, or, when attention is windowed,
        from the centre of each token's window, so that every window looks to the transformer like a patch of
        window x window tokens (what it was trained on) wherever it sits in a large tile."""
        stride, window = self.token_stride, self.attention_window
        if not window or (grid[0] <= window and grid[1] <= window):
            return self.pos_embed(grid, stride, inputs.image_size, inputs.pixel_scale_deg)
        local = self.pos_embed((window, window), stride, (window * stride, window * stride), inputs.pixel_scale_deg)
        nh, nw = -(-grid[0] // window), -(-grid[1] // window)
        local = local.reshape(-1, 1, window, 1, window, local.shape[-1])
        tiled = local.expand(-1, nh, -1, nw, -1, -1).reshape(-1, nh * window, nw * window, local.shape[-1])
        return tiled[:, :grid[0], :grid[1]].reshape(-1, grid[0] * grid[1], local.shape[-1])

    # -------------------------------------------------------------------------------------------- stages
    def forward_features(self, inputs: BackboneInputs, token_mask: torch.Tensor | None = None) -> BackboneOutput:
        """Token features, their band-pooled map and the pooled vector (no dense features)."""
        x, grid = self.embed_tokens(inputs, token_mask)  # (B, C, L, D)
        B, C, L, D = x.shape
        valid = inputs.band_valid  # (B, C)
        window = self.attention_window
        if window and (grid[0] > window or grid[1] > window):
            x = self._windowed_blocks(x, grid, valid, window)
        else:
            key_valid = valid[:, :, None].expand(B, C, L).reshape(B, 1, 1, C * L)  # padding bands are never keys
            x = x.reshape(B, C * L, D)
            for block in self.blocks:
                x = block(x, attn_mask=key_valid)
        x = self.norm(x).reshape(B, C, L, D)
        x = x * valid[:, :, None, None].to(x.dtype)  # zero the padding bands' outputs
        feature_map = masked_band_mean(x, valid)  # (B, L, D)
        pooled = feature_map.mean(dim=1)  # (B, D): every cell has >= 1 valid band
        feature_map = feature_map.transpose(1, 2).reshape(B, D, *grid)  # (B, D, h', w')
        return BackboneOutput(token_features=x, feature_map=feature_map, pooled=pooled, grid=grid)

    def _windowed_blocks(self, x: torch.Tensor, grid: tuple[int, int], valid: torch.Tensor, window: int) -> torch.Tensor:
        """The transformer blocks with attention inside ``window`` x ``window`` cells of the token grid (every
        band of a cell together): (B, C, L, D) -> (B, C * L, D). Cost grows linearly with the image, not
        quadratically; a grid that is not a multiple of the window is padded with tokens that are never keys."""
        B, C, L, D = x.shape
        h, w = grid
        ph, pw = -h % window, -w % window
        x = x.reshape(B, C, h, w, D)
        keys = valid[:, :, None, None].expand(B, C, h, w)
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            keys = F.pad(keys, (0, pw, 0, ph), value=False)
        nh, nw = (h + ph) // window, (w + pw) // window
        to_windows = "b c (nh wh) (nw ww) d -> (b nh nw) (c wh ww) d"
        x = rearrange(x, to_windows, wh=window, ww=window)  # (B * nW, C * window^2, D)
        keys = rearrange(keys, "b c (nh wh) (nw ww) -> (b nh nw) (c wh ww)", wh=window, ww=window)
        keys = keys[:, None, None, :]  # (B * nW, 1, 1, C * window^2)
        empty = ~keys.any(dim=-1, keepdim=True)  # windows of padding only: let them attend to themselves
        keys = keys | empty
        for block in self.blocks:
            x = block(x, attn_mask=keys)
        x = rearrange(x, "(b nh nw) (c wh ww) d -> b c (nh wh) (nw ww) d", b=B, nh=nh, nw=nw, wh=window, ww=window)
        return x[:, :, :h, :w].reshape(B, C * L, D)

    def forward_dense(self, inputs: BackboneInputs, features: BackboneOutput,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-resolution dense features (B, Df, H, W) from the token map and the pixel stem."""
        pixel_mask = token_pixel_mask(token_mask, self.token_stride) if token_mask is not None else None
        band = self.band_embed(inputs.band_coord)  # (B, C, D)
        skip = self.stem(inputs.scaled, inputs.band_valid, band, pixel_mask)  # (B, S, H/2, W/2)
        return self.decoder(features.feature_map, skip)

    def forward(self, inputs: BackboneInputs, token_mask: torch.Tensor | None = None, dense: bool = True) -> BackboneOutput:
        out = self.forward_features(inputs, token_mask)
        if dense:
            out.dense_features = self.forward_dense(inputs, out, token_mask)
        return out


__all__ = ["DenseDecoder", "UpStage", "ViTBackbone"]
