"""WEFT (Sun et al., AAAI 2026): dynamic wavelet expert-guided fine-tuning of a frozen plain ViT for object
segmentation (objects.finetune, objects.segment)."""

from .adapter import ECTR, TEW, Extractor, Injector, Interaction
from .deform_attn import MSDeformAttn, ms_deform_attn
from .extractor import WaveletExpert, WaveletExpertExtractor, WaveletExperts
from .head import FPNHead
from .model import WEFT
from .spec import SPEC  # registers the method
from .stages import TinyViTStages, ViTStages, block_groups, stages_of
from .wavelet import WTConv2d, haar_filters

__all__ = [
    "ECTR",
    "SPEC",
    "TEW",
    "WEFT",
    "Extractor",
    "FPNHead",
    "Injector",
    "Interaction",
    "MSDeformAttn",
    "TinyViTStages",
    "ViTStages",
    "WTConv2d",
    "WaveletExpert",
    "WaveletExpertExtractor",
    "WaveletExperts",
    "block_groups",
    "haar_filters",
    "ms_deform_attn",
    "stages_of",
]
