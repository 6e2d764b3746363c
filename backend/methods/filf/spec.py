"""FILF as the product's change-detection method: change.finetune on the analyst's labels, change.detect over
whole scenes (probability + mask + change polygons)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.enums import Resampling
from torch import nn

from backend import adapters
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.io.maps import CHANGE, MapOutputs, stack_reader
from backend.io.raster import RasterSource, overlap_grid, require_same_band_count
from backend.io.rasterize import restrict_to_aoi
from backend.methods.spec import RANDOM_BACKBONE_SEED, Application, MethodSpec, Training, register
from backend.models.backbones.loading import read_checkpoint
from backend.params import (
    AFTER,
    AOI,
    BANDS,
    BEFORE,
    CHECKPOINTING,
    EPOCHS,
    LR,
    MIN_AREA_M2,
    NAME,
    PATCH_SIZE,
    PATIENCE,
    REFERENCE,
    SIMPLIFY,
    STEPS_PER_EPOCH,
    THRESHOLD,
    TRAIN_BATCH_SIZE,
    VAL_FRACTION,
    Param,
)
from backend.protocol import INVALID_INPUT, JobError
from backend.training.areas import TrainingArea
from backend.training.change_data import SemanticLabels, load_training_area
from backend.training.normalize import normalizer

from .model import build_filf
from .outputs import CLASSES_OUTPUT, SemanticChangeOutputs
from .training import normalization, recipe

METHOD = "filf"
# change.detect's default tiling: tiles of up to 512 overlapping by 64, fitted to the scene (fitted_tile), read
# about 1.3x the scene's pixels where the training patch's 256 with a quarter overlap read 1.78x (speed and
# held-out F1 of both in docs/BENCHMARKS.md).
DETECT_TILE, DETECT_OVERLAP = 512, 64
ENCODER_SCALE = 1  # the paper's; 2 measured in docs/BENCHMARKS.md (FILF on the real encoder)

FINETUNE_PARAMS = (
    BEFORE,
    AFTER,
    Param(
        "labels",
        str,
        "Change polygons (vector) or a change-mask raster (non-zero = change).",
        required=True,
        kind="layer",
    ),
    AOI.but(help="Polygon layer of the labelled area (inside it, unlabelled = unchanged)."),
    Param(
        "label_field",
        str,
        "Field of the label polygons holding 1 (change) / 0 (no change).",
        kind="field",
        parent="labels",
    ),
    BANDS,
    Param(
        "mode",
        str,
        "bcd: change / no change; scd: semantic change, with the class before and after (from/to fields, or "
        "two class rasters).",
        default="bcd",
        choices=("bcd", "scd"),
        group="method",
    ),
    Param(
        "from_field",
        str,
        "Semantic change: field of the label polygons holding the class number before the change (0 = unchanged).",
        kind="field",
        parent="labels",
    ),
    Param(
        "to_field",
        str,
        "Semantic change: field of the label polygons holding the class number after the change.",
        kind="field",
        parent="labels",
    ),
    Param(
        "labels_after",
        str,
        "Semantic change from rasters: the date-2 class raster (the labels raster then holds the date-1 classes; "
        "0 = unchanged).",
        kind="raster",
    ),
    Param("rank", int, "LoRA rank.", default=8, minimum=1, maximum=1024, step=1),
    Param(
        "encoder_scale",
        int,
        "Enlarge the images this many times before the encoder (1 = the paper): MobileSAM was pretrained on "
        "1024-pixel images, and its 16-pixel tokens are coarse for small changes.",
        default=ENCODER_SCALE,
        minimum=1,
        maximum=4,
        step=1,
        group="method",
        why="4 already feeds a 256-pixel patch to the encoder at its pretraining size",
    ),
    EPOCHS.but(default=20),
    STEPS_PER_EPOCH.but(default=20),
    TRAIN_BATCH_SIZE.but(
        default=8,
        minimum=2,
        help="Patches per step (at least 2: the decoder normalises over the batch).",
        why="FILF's decoder normalises over the batch",
    ),
    PATCH_SIZE.but(default=256, minimum=64, step=32, help="Training patch size in pixels (a multiple of 32)."),
    LR.but(default=1e-3, help="Learning rate (the paper's is 2.8e-4 over 100 epochs; see docs/BENCHMARKS.md)."),
    Param(
        "schedule",
        str,
        "official: the paper's cosine restarted every 2·(epochs // 3) steps; cosine: one cosine decay over the "
        "whole run.",
        default="cosine",
        choices=("cosine", "official"),
        group="finetune",
    ),
    Param(
        "fourier_init",
        str,
        "Start of the decoder's Fourier-unit spectral convolutions: official (every weight 1, the authors' code) or "
        "kaiming (PyTorch's default), which learns faster on few steps.",
        default="kaiming",
        choices=("kaiming", "official"),
        group="finetune",
    ),
    VAL_FRACTION.but(default=0.25),
    PATIENCE.but(default=5, help="Stop after this many epochs without a better validation IoU."),
    Param(
        "balance_classes",
        bool,
        "Weigh changed and unchanged pixels equally in the loss (off = the paper's plain BCE).",
        default=True,
        group="finetune",
    ),
    Param(
        "choose_threshold",
        bool,
        "Choose the change threshold with the best F1 on the validation patches and keep it in the adapter "
        "(off = 0.5, the paper's).",
        default=True,
        group="finetune",
    ),
    CHECKPOINTING,
)

DETECT_PARAMS = (
    BEFORE,
    AFTER,
    AOI,
    Param("backbone", str, "Expected backbone (refused if the adapter was trained on another).", group="method"),
    REFERENCE.but(help="Optional reference change mask to score against."),
    THRESHOLD.but(
        default=None, help="Change probability threshold (default: the adapter's, chosen on its validation patches)."
    ),
    MIN_AREA_M2.but(help="Drop change polygons smaller than this (square metres)."),
    SIMPLIFY,
    NAME.but(default="filf"),
)


def fitted_tile(size: int, largest: int, overlap: int = DETECT_OVERLAP) -> int:
    """The tile (a multiple of 32 px, at most `largest`) with which the fewest tiles cover `size` pixels with
    the least run-over: a 1024-pixel scene takes 3 tiles of 384, not 3 of 512 reaching 1408 pixels."""
    if size <= largest:
        return max(-(-size // 32) * 32, 64)
    n = -(-(size - overlap) // (largest - overlap))  # the fewest tiles of `largest` that cover the scene
    tile = -(-(size - overlap) // n) + overlap  # the smallest tile with which n tiles still cover it
    return min(-(-tile // 32) * 32, largest)


def build(backbone: str, config: dict[str, Any], bands: int, checkpoints: dict[str, str | None]) -> nn.Module:
    """FILF on `backbone`: official weights when its checkpoint path is known, else a seeded random init."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    path = checkpoints.get(backbone)
    state = read_checkpoint(path) if path else None
    # Adapters saved before semantic change and the encoder scale were offered are binary, at scale 1.
    options = {"mode": config.get("mode", "bcd"), "num_seg": config.get("num_seg", 7)}
    return build_filf(
        backbone, rank=config["rank"], backbone_state=state, encoder_scale=config.get("encoder_scale", 1), **options
    )


def prepare(ctx: JobContext, p: dict[str, Any]) -> Training:
    ctx.progress(0.0, "reading labelled area", force=True)
    semantic = SemanticLabels(p["from_field"], p["to_field"], p["labels_after"]) if p["mode"] == "scd" else None
    area = load_training_area(
        p["before"], p["after"], p["labels"], p["aoi"], p["bands"], p["label_field"], ctx.warnings, semantic=semantic
    )
    with RasterSource(p["before"], p["bands"]) as src:
        dtype, bands = src.dtype, src.bands
    return training_on([area], dtype, bands, p)


def training_on(areas: list[TrainingArea], dtype: np.dtype, bands: list[int], p: dict[str, Any]) -> Training:
    """Fine-tuning on one or more labelled areas (several: whole areas are held out for validation)."""
    if p["patch_size"] % 32:
        raise JobError(INVALID_INPUT, "The patch size must be a multiple of 32 pixels.")
    norm = normalization(areas, p["backbone"], dtype)
    config = {"rank": p["rank"], "patch_size": p["patch_size"], "mode": p["mode"], "encoder_scale": p["encoder_scale"]}
    classes = ["no change", "change"]
    semantic = p["mode"] == "scd"
    if semantic:
        top = max(int(a.classes.max()) for a in areas if a.classes is not None)
        if top < 1:
            raise JobError(
                INVALID_INPUT,
                "The semantic change labels give no class (from/to class numbers are 1 or more).",
                "Fill in the from and to classes of the change polygons.",
            )
        config["num_seg"] = top + 1
        classes = ["no change", *(f"class {k}" for k in range(1, top + 1))]
    return Training(
        bands=bands,
        dtype=dtype,
        normalization=norm,
        grid=areas[0].grid,
        config=config,
        recipe=lambda model, device: recipe(model, areas, norm, p, device, len(classes) - 1 if semantic else 0),
        classes=classes,
        areas=len(areas),
    )


def open_detect(ctx: JobContext, p: dict[str, Any], meta: AdapterMeta) -> Application:
    with (
        RasterSource(p["before"], meta.bands, what="before") as b0,
        RasterSource(p["after"], meta.bands, what="after") as a0,
    ):
        adapters.check_compatible(meta, METHOD, p["backbone"] or meta.backbone, b0.count)
        require_same_band_count(b0, a0, ctx.warnings)
        grid = overlap_grid(b0.native, a0.native, ("before", "after"))
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    with ExitStack() as opened:  # on a failure here, what is open closes; on success the job closes it
        before = opened.enter_context(RasterSource(p["before"], meta.bands, grid=grid, what="before"))
        after = opened.enter_context(
            RasterSource(p["after"], meta.bands, grid=grid, resampling=Resampling.bilinear, what="after")
        )
        sources = opened.pop_all()
    nb = len(meta.bands)
    norms: dict[torch.device, Any] = {}
    semantic = meta.config.get("mode") == "scd"

    def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        norm = norms.setdefault(x.device, normalizer(meta.normalization, x.device))
        out = model(norm(x[:, :nb]), norm(x[:, nb:]))
        if semantic:  # probabilities blend across tile overlaps; the sink takes the most likely classes
            classes = (s.float().softmax(1) for s in (out.sem1, out.sem2))
            return torch.cat([torch.sigmoid(out.change.float()), *classes], 1)
        return torch.sigmoid(out[:, 1:2].float())

    threshold = p["threshold"] if p["threshold"] is not None else meta.metrics.get("val_threshold", 0.5)

    def sink(block: int) -> MapOutputs:
        args = (ctx, Path(p["out_dir"]), p["name"], grid, block, CHANGE, p["reference"], threshold, p["simplify"])
        extra = {"threshold": threshold}
        if semantic:
            return SemanticChangeOutputs(*args, p["min_area_m2"], extra, class_names=meta.classes)
        return MapOutputs(*args, p["min_area_m2"], extra)

    read = stack_reader((before, after), grid, aoi)
    channels = 1 + 2 * meta.config["num_seg"] if semantic else 1
    tile = fitted_tile(max(grid.width, grid.height), max(DETECT_TILE, meta.config.get("patch_size", 256)))
    return Application(
        grid,
        read,
        predict,
        channels,
        sink,
        tile,
        "detecting changes",
        close=sources.close,
        overlap=DETECT_OVERLAP,
        output_bytes_per_pixel=5.0 + (2 if semantic else 0),  # + the 2-band uint8 from/to classes
    )


SPEC = register(
    MethodSpec(
        name=METHOD,
        task="change",
        title="FILF",
        backbones={
            name: (name,)
            for name in ("mobile_sam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "tiny_vit_tiny", "sam_vit_tiny")
        },
        default_backbone="mobile_sam",
        build=build,
        finetune_summary="Fine-tune a FILF change-detection adapter on your labels.",
        finetune_params=FINETUNE_PARAMS,
        prepare=prepare,
        apply_summary="Detect changes between two rasters with a FILF adapter.",
        apply_params=DETECT_PARAMS,
        build_config=("rank", "mode", "num_seg", "encoder_scale"),
        open=open_detect,
        outputs=(*CHANGE.declared(), CLASSES_OUTPUT),
        apply_verb="detect",
        apply_title="Detect (FILF adapter)",
        cpu_mp_per_s=0.14,  # mobile_sam, tiles fitted up to 512 px, 2-core dev VM (issue 14, item 5)
    )
)
