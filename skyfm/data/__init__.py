"""The data layer: patches, simulators with truth, readers of real formats, and sharded training sets.

Nothing here imports torch at module level: the data layer knows nothing of models.
"""

from skyfm.data.fits_io import read_patch, write_patch
from skyfm.data.patch import CONTAMINANT_BITS, Patch

__all__ = ["CONTAMINANT_BITS", "Patch", "read_patch", "write_patch"]
