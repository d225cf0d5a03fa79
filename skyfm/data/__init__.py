"""The data layer: patches, simulators with truth, readers of real formats, and sharded training sets.

Nothing here imports torch at module level: the data layer knows nothing of models.
"""

from skyfm.data.fits_io import read_patch, write_patch
from skyfm.data.healpix import HealpixMap, SkyTile, healpix_tiles, healpix_to_patch, read_healpix, sky_tiles
from skyfm.data.patch import CONTAMINANT_BITS, Patch
from skyfm.data.readers import ImageFile, NoWCSWarning, inspect_file, open_image, read_image
from skyfm.data.tiling import Tile, iter_tiles, tile_grid, to_full_image, to_sky

__all__ = ["CONTAMINANT_BITS", "Patch", "read_patch", "write_patch"]
__all__ += ["HealpixMap", "ImageFile", "NoWCSWarning", "SkyTile", "Tile", "healpix_tiles", "healpix_to_patch",
            "inspect_file", "iter_tiles", "open_image", "read_healpix", "read_image", "sky_tiles", "tile_grid",
            "to_full_image", "to_sky"]

# The sharded dataset subclasses torch's IterableDataset: its names are imported on first use, so that
# `import skyfm.data` stays free of torch.
_SHARD_NAMES = ("ShardDataset", "ShardWriter", "collate_patches", "read_shard", "write_simulated_shards")
__all__ += list(_SHARD_NAMES)


def __getattr__(name):
    if name in _SHARD_NAMES:
        from skyfm.data import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'skyfm.data' has no attribute {name!r}")
