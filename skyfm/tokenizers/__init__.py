"""Tokenizers: the VQ-VAE that turns every band of every instrument into codes from one codebook."""

from skyfm.tokenizers.vqvae import (
    CodeUsageMeter,
    TokenizerConfig,
    TokenizerOutput,
    VQVAETokenizer,
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    source_weights,
)

__all__ = [
    "CodeUsageMeter",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQVAETokenizer",
    "code_histogram",
    "codebook_perplexity",
    "codebook_usage",
    "source_weights",
]
