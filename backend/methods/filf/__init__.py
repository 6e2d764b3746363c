"""FILF (Huang et al., TGRS 2026): frequency-domain interactive LoRA on a frozen SAM / MobileSAM encoder for
binary change detection."""

from .decoder import (
    MSFFN,
    BCDDecoder,
    CoarseDifferenceExtraction,
    FourierUnit,
    FrequencyFeatureEnhancement,
    PredictionHead,
)
from .interaction import BiTemporalInteractionLoRA, FrequencyFeatureInteraction, inject_bitemporal_lora
from .model import FAMILIES, FILF, build_backbone, build_filf
from .spec import SPEC  # registers the method

__all__ = [
    "FAMILIES",
    "FILF",
    "MSFFN",
    "SPEC",
    "BCDDecoder",
    "BiTemporalInteractionLoRA",
    "CoarseDifferenceExtraction",
    "FourierUnit",
    "FrequencyFeatureEnhancement",
    "FrequencyFeatureInteraction",
    "PredictionHead",
    "build_backbone",
    "build_filf",
    "inject_bitemporal_lora",
]
