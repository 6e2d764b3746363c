"""SpectralX (Zhang et al.): parameter-efficient domain generalisation of a frozen spectral remote-sensing
foundation model for land-cover mapping from any band set (landcover.adapt, landcover.finetune, landcover.map)."""

from .aomoa import AoMoAdapter, AoMoALinear, MoE
from .are import AttributeRefinedAdapter
from .decoder import MultiLevelNeck, UPerHead, UPerNet
from .hypert import HyperTokenizer
from .model import SpectralX, adapted_blocks
from .reconstruction import MaskedReconstruction
from .spec import SPEC  # registers the method

__all__ = [
    "SPEC",
    "AoMoALinear",
    "AoMoAdapter",
    "AttributeRefinedAdapter",
    "HyperTokenizer",
    "MaskedReconstruction",
    "MoE",
    "MultiLevelNeck",
    "SpectralX",
    "UPerHead",
    "UPerNet",
    "adapted_blocks",
]
