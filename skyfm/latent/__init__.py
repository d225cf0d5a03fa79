"""The latent space: embeddings of patches and sources, FAISS search, UMAP maps and a browser explorer.

* :mod:`skyfm.latent.embed`: a vector per patch (tile) and per source, with metadata and thumbnails -> Parquet
  (``skyfm embed``).
* :mod:`skyfm.latent.index`: FAISS indexes, exact or approximate by size, saved as a folder (``skyfm index``).
* :mod:`skyfm.latent.search`: nearest neighbours of a row, a vector or an image, and a thumbnail grid
  (``skyfm search``).
* :mod:`skyfm.latent.explore`: UMAP maps as PNG and a self-contained HTML explorer (``skyfm umap``).

Nothing here is imported by ``import skyfm``; torch, faiss and umap load on first use.
"""

from skyfm.latent.embed import embed_command, embed_tiles, load_embedding_model, read_embeddings, write_embeddings
from skyfm.latent.explore import umap_command
from skyfm.latent.index import build_index_dir, load_index_dir
from skyfm.latent.search import search_command

__all__ = ["build_index_dir", "embed_command", "embed_tiles", "load_embedding_model", "load_index_dir",
           "read_embeddings", "search_command", "umap_command", "write_embeddings"]
