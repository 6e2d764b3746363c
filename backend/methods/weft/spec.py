"""WEFT as the product's object-segmentation method: objects.finetune on the analyst's object outlines (or a
mask), objects.segment over whole scenes (probability + mask + object polygons, and a class raster when the
adapter knows several classes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backend import adapters, weights
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.io.maps import MapOutputs, stack_reader
from backend.io.raster import RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.methods.spec import RANDOM_BACKBONE_SEED, Application, MethodSpec, Training, register
from backend.models.backbones import tiny_vit, vit
from backend.models.backbones.loading import read_checkpoint
from backend.params import (
    AOI,
    BANDS,
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
from backend.training.image_data import load_labelled_image
from backend.training.normalize import normalizer

from .head import HEADS
from .model import WEFT
from .outputs import CLASSES_OUTPUT, OBJECTS, ObjectClassesOutputs, object_style
from .training import normalization, recipe

METHOD = "weft"
FAMILIES = {"vit": vit, "tiny_vit": tiny_vit}
SEGMENT_TILE, SEGMENT_OVERLAP = 512, 64  # the paper slides 512² windows by 426 (an overlap of 86)

IMAGE = Param("image", str, "Raster to segment: three bands (or one, used as grey).", required=True, kind="raster")
THREE_BANDS = BANDS.but(help="The three bands to use, e.g. 3,2,1 (default: the first three; one band = grey).")

FINETUNE_PARAMS = (
    IMAGE,
    Param(
        "labels",
        str,
        "Object outlines (polygons; a class field for several kinds of object) or a mask / class raster.",
        required=True,
        kind="layer",
    ),
    AOI.but(help="Polygon layer of the labelled area (inside it, everything not outlined is background)."),
    Param(
        "label_field",
        str,
        "Field of the outlines naming their class ('tank', 'ship' … or 1, 2 …); default: all are one class.",
        kind="field",
        parent="labels",
    ),
    THREE_BANDS,
    Param(
        "drop_path",
        float,
        "Stochastic depth of the frozen ViT blocks and the adapter's extractors (the paper's 0.4; MobileSAM's "
        "blocks have none).",
        default=0.4,
        minimum=0.0,
        maximum=0.9,
        step=0.1,
        group="finetune",
    ),
    Param(
        "head",
        str,
        "Segmentation head: the paper's Mask2Former (100 queries, 9 decoder layers, Hungarian matching) or a "
        "light FPN head (fewer parameters, faster steps on a CPU).",
        default="mask2former",
        choices=HEADS,
        group="finetune",
    ),
    EPOCHS.but(default=10),
    STEPS_PER_EPOCH.but(default=20),
    TRAIN_BATCH_SIZE.but(
        default=4,
        minimum=2,
        help="Patches per step (at least 2: the adapter normalises over the batch).",
        why="WEFT's extractor and head normalise over the batch",
    ),
    PATCH_SIZE.but(default=256, minimum=64, step=32, help="Training patch size in pixels (a multiple of 32)."),
    LR.but(default=2e-4, help="Learning rate (Adam; the paper: AdamW at 5e-5 with layer decay over 80k steps)."),
    VAL_FRACTION.but(default=0.25),
    PATIENCE.but(default=5, help="Stop after this many epochs without a better validation mIoU."),
    CHECKPOINTING,
    Param(
        "balance_classes",
        bool,
        "Weigh background and every object class equally in the loss (objects are rare in a scene).",
        default=True,
        group="finetune",
    ),
    Param(
        "choose_threshold",
        bool,
        "Choose the object threshold with the best mIoU on the validation patches and keep it in the adapter "
        "(off = 0.5).",
        default=True,
        group="finetune",
    ),
)

SEGMENT_PARAMS = (
    IMAGE,
    AOI,
    Param("backbone", str, "Expected backbone (refused if the adapter was trained on another).", group="method"),
    REFERENCE.but(help="Optional reference object mask to score against."),
    THRESHOLD.but(
        default=None, help="Object probability threshold (default: the adapter's, chosen on its validation)."
    ),
    MIN_AREA_M2.but(help="Drop object polygons smaller than this (square metres)."),
    SIMPLIFY,
    NAME.but(default="weft"),
)


def choose_bands(image: str, bands: list[int] | None, ctx: JobContext) -> tuple[list[int], np.dtype]:
    """Three bands of the raster (the chosen ones, one band repeated as grey, or the first three of more), and
    their data type."""
    with RasterSource(image, bands, what="image") as src:
        chosen, total, dtype = list(src.bands), src.ds.count, src.dtype
    if len(chosen) == 1:
        return chosen * 3, dtype
    if len(chosen) == 3:
        return chosen, dtype
    if bands or len(chosen) == 2:
        raise JobError(
            INVALID_INPUT,
            f"WEFT's encoder takes three bands (an RGB image), but {len(chosen)} were chosen.",
            "Choose three bands (e.g. 3,2,1 for true colour) or one band to use as grey.",
        )
    ctx.warn(
        f"The image has {total} bands; WEFT uses bands {', '.join(map(str, chosen[:3]))} (choose others with bands)."
    )
    return chosen[:3], dtype


def build(backbone: str, config: dict[str, Any], bands: int, checkpoints: dict[str, str | None]) -> nn.Module:
    """WEFT on the named backbone (a plain ViT, or MobileSAM's TinyViT): official weights when its checkpoint
    path is known, else a seeded random init."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    info = weights.backbone_info(backbone)
    if info.family == "vit":  # the frozen ViT blocks keep the paper's stochastic depth
        encoder: nn.Module = vit.build(info.variant, drop_path_rate=config["drop_path"])
    else:
        encoder = tiny_vit.build(info.variant)
    path = checkpoints.get(backbone)
    if path:
        FAMILIES[info.family].load_official(encoder, read_checkpoint(path))
    # Adapters saved before the head became a choice carry the FPN head.
    head = config.get("head", "fpn")
    return WEFT(encoder, num_classes=config["num_classes"], drop_path_rate=config["drop_path"], head=head)


def prepare(ctx: JobContext, p: dict[str, Any]) -> Training:
    if p["patch_size"] % 32:
        raise JobError(INVALID_INPUT, "The patch size must be a multiple of 32 pixels.")
    ctx.progress(0.0, "reading labelled area", force=True)
    bands, dtype = choose_bands(p["image"], p["bands"], ctx)
    area, names = load_labelled_image(p["image"], p["labels"], p["aoi"], bands, p["label_field"], ctx.warnings)
    return training_on([area], names, dtype, bands, p)


def training_on(
    areas: list[TrainingArea], names: list[str], dtype: np.dtype, bands: list[int], p: dict[str, Any]
) -> Training:
    """Fine-tuning on one or more labelled areas of object classes `names` (several areas: whole areas are held
    out for validation, as the held-out benchmark does with several images)."""
    norm = normalization(areas, p["backbone"], dtype)
    classes = ["background", *names]
    config = {
        "num_classes": len(classes),
        "patch_size": p["patch_size"],
        "drop_path": p["drop_path"],
        "head": p["head"],
    }
    return Training(
        bands=bands,
        dtype=dtype,
        normalization=norm,
        grid=areas[0].grid,
        config=config,
        recipe=lambda model, device: recipe(model, areas, norm, p, device, len(classes)),
        classes=classes,
        areas=len(areas),
    )


def open_segment(ctx: JobContext, p: dict[str, Any], meta: AdapterMeta) -> Application:
    with RasterSource(p["image"], meta.bands, what="image") as probe:
        adapters.check_compatible(meta, METHOD, p["backbone"] or meta.backbone, probe.count)
        grid = probe.native
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    src = RasterSource(p["image"], meta.bands, grid=grid, what="image")
    names = meta.classes[1:] or ["object"]
    several = len(names) > 1
    norms: dict[torch.device, Any] = {}

    def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        norm = norms.setdefault(x.device, normalizer(meta.normalization, x.device))
        probs = model(norm(x)).float().softmax(1)
        objects = 1 - probs[:, :1]  # the probability of any object class
        return torch.cat([objects, probs[:, 1:]], 1) if several else objects

    threshold = p["threshold"] if p["threshold"] is not None else meta.metrics.get("val_threshold", 0.5)

    def sink(block: int) -> MapOutputs:
        args = (ctx, Path(p["out_dir"]), p["name"], grid, block, object_style(names), p["reference"], threshold)
        extra = {"threshold": threshold}
        if several:
            return ObjectClassesOutputs(*args, p["simplify"], p["min_area_m2"], extra, class_names=names)
        return MapOutputs(*args, p["simplify"], p["min_area_m2"], extra)

    return Application(
        grid,
        stack_reader((src,), grid, aoi),
        predict,
        1 + len(names) if several else 1,
        sink,
        SEGMENT_TILE,
        "segmenting objects",
        close=src.close,
        overlap=SEGMENT_OVERLAP,
        output_bytes_per_pixel=5.0 + (1 if several else 0),
    )


SPEC = register(
    MethodSpec(
        name=METHOD,
        task="objects",
        title="WEFT",
        # The paper's Uni-Perceiver ViT-L; MobileSAM's TinyViT, which set-up installs, is the default so that an
        # analyst without downloads gets real pretrained features; the miniatures are for tests.
        backbones={name: (name,) for name in ("mobile_sam", "uniperceiver_vit_l", "vit_tiny", "tiny_vit_tiny")},
        default_backbone="mobile_sam",
        build=build,
        finetune_summary="Fine-tune a WEFT object-segmentation adapter on your object outlines.",
        finetune_params=FINETUNE_PARAMS,
        prepare=prepare,
        apply_summary="Segment objects in a raster with a WEFT adapter.",
        apply_params=SEGMENT_PARAMS,
        build_config=("num_classes", "drop_path", "head"),
        open=open_segment,
        outputs=(*OBJECTS.declared(), CLASSES_OUTPUT),
        apply_verb="segment",
        finetune_title="Fine-tune a WEFT adapter",
        apply_title="Segment (WEFT adapter)",
        cpu_mp_per_s=0.10,  # mobile_sam, 512² tiles, SpaceNet-4 900², 2-core dev VM (docs/BENCHMARKS.md)
    )
)
