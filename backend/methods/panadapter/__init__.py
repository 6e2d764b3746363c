"""PanAdapter (Wu et al., AAAI 2025): two-stage fine-tuning of the frozen IPT body with spatial-spectral priors
from two EDSR-baseline trunks, for pansharpening (methods.md §3)."""

from .adapters import CascadeTokenFusioner, CascadeTokenInjector, CrossAttention, PanAdapterLayer
from .model import (
    STAGES,
    VARIANT_DEFAULTS,
    PanAdapter,
    PanAdapterConfig,
    PanAdapterOutput,
    SirenTail,
    Stage,
    ViTStem,
    build_panadapter,
)
from .prior import LocalPriorExtraction, PriorOutput, build_local_prior_extraction
from .spec import SPEC  # registers the method

__all__ = [
    "SPEC",
    "STAGES",
    "VARIANT_DEFAULTS",
    "CascadeTokenFusioner",
    "CascadeTokenInjector",
    "CrossAttention",
    "LocalPriorExtraction",
    "PanAdapter",
    "PanAdapterConfig",
    "PanAdapterLayer",
    "PanAdapterOutput",
    "PriorOutput",
    "SirenTail",
    "Stage",
    "ViTStem",
    "build_local_prior_extraction",
    "build_panadapter",
]
