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
from backend.io.raster import RasterSource, overlap_grid
from backend.io.rasterize import restrict_to_aoi
from backend.methods.spec import RANDOM_BACKBONE_SEED, Application, MethodSpec, Training, register
from backend.models.backbones.loading import read_checkpoint
from backend.params import (
    AFTER,
    AOI,
    BANDS,
    BEFORE,
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
from backend.training.change_data import TrainingArea, load_training_area

from .model import build_filf
from .training import normalization, normalizer, recipe

METHOD = "filf"

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
    Param("rank", int, "LoRA rank.", default=8, minimum=1, maximum=1024, step=1),
    EPOCHS.but(default=20),
    STEPS_PER_EPOCH.but(default=20),
    TRAIN_BATCH_SIZE.but(
        default=8,
        minimum=2,
        help="Patches per step (at least 2: the decoder normalises over the batch).",
        why="FILF's decoder normalises over the batch",
    ),
    PATCH_SIZE.but(default=256, minimum=64, step=32, help="Training patch size in pixels (a multiple of 32)."),
    LR.but(default=2.8e-4),
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
        "checkpointing",
        str,
        "Recompute encoder blocks in the backward pass to save memory (auto: on for CUDA).",
        default="auto",
        choices=("auto", "on", "off"),
        group="finetune",
    ),
)

DETECT_PARAMS = (
    BEFORE,
    AFTER,
    AOI,
    Param("backbone", str, "Expected backbone (refused if the adapter was trained on another).", group="method"),
    REFERENCE.but(help="Optional reference change mask to score against."),
    THRESHOLD.but(help="Change probability threshold."),
    MIN_AREA_M2.but(help="Drop change polygons smaller than this (square metres)."),
    SIMPLIFY,
    NAME.but(default="filf"),
)


def build(backbone: str, config: dict[str, Any], bands: int, checkpoints: dict[str, str | None]) -> nn.Module:
    """FILF on `backbone`: official weights when its checkpoint path is known, else a seeded random init."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    path = checkpoints.get(backbone)
    state = read_checkpoint(path) if path else None
    return build_filf(backbone, rank=config["rank"], backbone_state=state)


def prepare(ctx: JobContext, p: dict[str, Any]) -> Training:
    ctx.progress(0.0, "reading labelled area", force=True)
    area = load_training_area(
        p["before"], p["after"], p["labels"], p["aoi"], p["bands"], p["label_field"], ctx.warnings
    )
    with RasterSource(p["before"], p["bands"]) as src:
        dtype, bands = src.dtype, src.bands
    return training_on([area], dtype, bands, p)


def training_on(areas: list[TrainingArea], dtype: np.dtype, bands: list[int], p: dict[str, Any]) -> Training:
    """Fine-tuning on one or more labelled areas (several: whole areas are held out for validation)."""
    if p["patch_size"] % 32:
        raise JobError(INVALID_INPUT, "The patch size must be a multiple of 32 pixels.")
    norm = normalization(areas, p["backbone"], dtype)
    return Training(
        bands=bands,
        dtype=dtype,
        normalization=norm,
        grid=areas[0].grid,
        config={"rank": p["rank"], "patch_size": p["patch_size"]},
        recipe=lambda model, device: recipe(model, areas, norm, p, device),
        classes=["no change", "change"],
        areas=len(areas),
    )


def open_detect(ctx: JobContext, p: dict[str, Any], meta: AdapterMeta) -> Application:
    with (
        RasterSource(p["before"], meta.bands, what="before") as b0,
        RasterSource(p["after"], meta.bands, what="after") as a0,
    ):
        adapters.check_compatible(meta, METHOD, p["backbone"] or meta.backbone, b0.count)
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

    def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        norm = norms.setdefault(x.device, normalizer(meta.normalization, x.device))
        return torch.sigmoid(model(norm(x[:, :nb]), norm(x[:, nb:]))[:, 1:2].float())

    def sink(block: int) -> MapOutputs:
        out_dir, extra = Path(p["out_dir"]), {"threshold": p["threshold"]}
        return MapOutputs(
            ctx, out_dir, p["name"], grid, block, CHANGE, p["reference"], p["threshold"], p["simplify"],
            p["min_area_m2"], extra,
        )  # fmt: skip

    tile = meta.config.get("patch_size", 256)  # detect on tiles of the training patch size
    read = stack_reader((before, after), grid, aoi)
    return Application(grid, read, predict, 1, sink, tile, "detecting changes", close=sources.close)


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
        build_config=("rank",),
        open=open_detect,
        outputs=CHANGE.declared(),
        apply_verb="detect",
        apply_title="Detect (FILF adapter)",
    )
)
