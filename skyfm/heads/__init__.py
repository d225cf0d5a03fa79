"""Task heads on the foundation model's dense features: localization, flux +- sigma, class, extension, position
sigma (the :class:`SourceDetector`), and the diffusion denoiser (:mod:`skyfm.heads.denoise`).

    from skyfm.heads import load_detector
    det = load_detector()            # the default detector shipped in the package
    det.foundation                   # its FoundationModel (backbone), e.g. to embed patches
"""

from skyfm.heads.config import DetectorConfig, InstrumentHeadConfig
from skyfm.heads.detector import BACKBONE_MODES, DetectorOutput, SourceDetector, load_detector
from skyfm.heads.targets import build_targets

__all__ = ["BACKBONE_MODES", "DetectorConfig", "DetectorOutput", "InstrumentHeadConfig", "SourceDetector",
           "build_targets", "load_detector"]
