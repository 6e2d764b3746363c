"""change.finetune and change.detect: FILF fine-tuned on the analyst's labels, applied to whole scenes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rasterio.enums import Resampling

from backend import adapters, weights
from backend.adapters import AdapterMeta
from backend.io.raster import RasterSource, overlap_grid
from backend.io.rasterize import IGNORE, restrict_to_aoi
from backend.io.tiling import TileSpec, run_tiled
from backend.jobs.base import JobContext, JobSpec, Param, prepare_out_dir
from backend.jobs.change_outputs import DECLARED, MAP_INPUTS, ChangeOutputs, pair_reader
from backend.jobs.checkpoints import backbone_checkpoint, training_checkpoint
from backend.methods.filf import BACKBONES, FILF, build_filf
from backend.models.backbones.loading import CheckpointMismatch, read_checkpoint
from backend.models.peft.freeze import count_parameters
from backend.protocol import INVALID_INPUT, JobError, JobResult
from backend.runtime import halve_batch_on_oom, resolve_device
from backend.training.change_data import TrainingArea, load_training_area
from backend.training.trainer import TrainConfig, fit_change

METHOD = "filf"
RANDOM_BACKBONE_SEED = 0  # a random-init backbone is rebuilt identically at detection time


def build_model(backbone: str, rank: int, checkpoint: str | None) -> FILF:
    """FILF on `backbone`: official weights when `checkpoint` is a path, else a seeded random init."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    state = read_checkpoint(checkpoint) if checkpoint else None
    return build_filf(backbone, "bcd", rank=rank, backbone_state=state)


def normalization(areas: list[TrainingArea], backbone: str, dtype: np.dtype) -> dict[str, list[float]]:
    """The encoder's own normalisation for 8-bit RGB, else per-band statistics of the training areas."""
    entry = weights.load_registry().get(backbone)
    spec = entry.input if entry else {}
    bands = areas[0].before.shape[0]
    if dtype == np.uint8 and bands == len(spec.get("mean", ())):
        return {"mean": list(spec["mean"]), "std": list(spec["std"])}
    both = np.concatenate([x[:, a.label != IGNORE] for a in areas for x in (a.before, a.after)], axis=1)
    return {"mean": both.mean(1).tolist(), "std": np.maximum(both.std(1), 1e-6).tolist()}


def normalizer(norm: dict[str, list[float]], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std


# --- change.finetune -----------------------------------------------------------------------------

FINETUNE_PARAMS = (
    Param("before", str, "Raster of the first date.", required=True, kind="raster"),
    Param(
        "after",
        str,
        "Raster of the second date (any CRS/resolution; aligned on the fly).",
        required=True,
        kind="raster",
    ),
    Param(
        "labels",
        str,
        "Change polygons (vector) or a change-mask raster (non-zero = change).",
        required=True,
        kind="layer",
    ),
    Param("adapter_name", str, "Name under which the adapter is saved in the library.", required=True),
    Param("aoi", str, "Polygon layer of the labelled area (inside it, unlabelled = unchanged).", kind="polygons"),
    Param(
        "label_field",
        str,
        "Field of the label polygons holding 1 (change) / 0 (no change).",
        kind="field",
        parent="labels",
    ),
    Param("bands", list, "Bands to use, e.g. 1,2,3 (default: all).", kind="bands"),
    Param("backbone", str, "Frozen encoder.", default="mobile_sam", choices=tuple(BACKBONES)),
    Param("allow_random_backbone", bool, "Use a random frozen encoder if its weights are missing.", default=False),
    Param("rank", int, "LoRA rank.", default=8),
    Param("epochs", int, "Training epochs (early stopping may end sooner).", default=20),
    Param("steps_per_epoch", int, "Optimisation steps per epoch.", default=20),
    Param("batch_size", int, "Patches per step.", default=8),
    Param("patch_size", int, "Training patch size in pixels.", default=256),
    Param("lr", float, "Learning rate (Adam).", default=2.8e-4),
    Param("val_fraction", float, "Share of the labelled area kept for validation.", default=0.25),
    Param("patience", int, "Stop after this many epochs without a better validation IoU.", default=5),
    Param(
        "balance_classes",
        bool,
        "Weigh changed and unchanged pixels equally in the loss (off = the paper's plain BCE).",
        default=True,
    ),
    Param("device", str, "auto, cpu or cuda.", default="auto"),
    Param(
        "checkpointing",
        str,
        "Recompute encoder blocks in the backward pass to save memory (auto: on for CUDA).",
        default="auto",
        choices=("auto", "on", "off"),
    ),
    Param("overwrite", bool, "Replace an adapter of the same name.", default=False),
)


def finetune(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    ctx.protect_inputs(p["before"], p["after"], p["labels"], p["aoi"])
    resolve_device(p["device"])  # a wrong device fails before the data is read
    ctx.progress(0.0, "reading labelled area", force=True)
    area = load_training_area(
        p["before"], p["after"], p["labels"], p["aoi"], p["bands"], p["label_field"], ctx.warnings
    )
    with RasterSource(p["before"], p["bands"]) as src:
        dtype, bands = src.dtype, src.bands
    return train_adapter(ctx, [area], dtype, bands, p)


def train_adapter(
    ctx: JobContext, areas: list[TrainingArea], dtype: np.dtype, bands: list[int], p: dict[str, Any]
) -> JobResult:
    """Fine-tune on one or more labelled areas and save the adapter (`p` = change.finetune parameters;
    with several areas, whole areas are held out for validation)."""
    device = resolve_device(p["device"])
    if p["patch_size"] % 32 or p["patch_size"] < 64:
        raise JobError(INVALID_INPUT, "The patch size must be a multiple of 32 and at least 64 pixels.")
    if p["epochs"] < 1 or p["steps_per_epoch"] < 1 or p["rank"] < 1:
        raise JobError(INVALID_INPUT, "Epochs, steps per epoch and rank must each be at least 1.")
    if not 0 < p["val_fraction"] < 1:
        raise JobError(INVALID_INPUT, "The validation fraction must be between 0 and 1.")
    if p["batch_size"] < 2:
        raise JobError(INVALID_INPUT, "The batch size must be at least 2 (the decoder normalises over the batch).")
    name = adapters.sanitize(p["adapter_name"])
    if not p["overwrite"] and any(a["name"] == name for a in adapters.list_adapters()):
        raise JobError(
            INVALID_INPUT, f"An adapter named '{name}' already exists.", "Choose another name or allow overwriting."
        )
    checkpoint, sha = backbone_checkpoint(p["backbone"], p["allow_random_backbone"], ctx)
    model = build_model(p["backbone"], p["rank"], checkpoint)
    if p["checkpointing"] == "on" or (p["checkpointing"] == "auto" and device.startswith("cuda")):
        model.enable_activation_checkpointing()
    norm = normalization(areas, p["backbone"], dtype)
    cfg = TrainConfig(
        epochs=p["epochs"],
        steps_per_epoch=p["steps_per_epoch"],
        batch_size=p["batch_size"],
        patch=p["patch_size"],
        lr=p["lr"],
        val_fraction=p["val_fraction"],
        patience=p["patience"],
        balance_classes=p["balance_classes"],
        device=device,
    )
    params = count_parameters(model)
    ctx.log(f"FILF on {p['backbone']}: {params}")
    result = fit_change(model, areas, normalizer(norm, torch.device(device)), cfg, ctx, model.adapter_state_dict)
    g = areas[0].grid
    meta = AdapterMeta(
        method=METHOD,
        backbone=p["backbone"],
        checkpoint_sha256=sha,
        bands=bands,
        normalization=norm,
        classes=["no change", "change"],
        training_area={"bounds": list(g.bounds), "crs": g.crs.to_string() if g.crs else None, "areas": len(areas)},
        metrics={f"val_{k}": v for k, v in result.val_metrics.items()},
        config={
            "rank": p["rank"],
            "mode": "bcd",
            "patch_size": p["patch_size"],
            "random_backbone_seed": RANDOM_BACKBONE_SEED if sha is None else None,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "dtype": np.dtype(dtype).name,
        },
    )
    folder = adapters.save(name, result.best_state, meta, overwrite=p["overwrite"])
    return JobResult(
        metrics={
            "adapter": name,
            "adapter_path": str(folder),
            "best_epoch": result.best_epoch,
            "trainable_parameters": params.trainable,
            "total_parameters": params.total,
            **{f"val_{k}": v for k, v in result.val_metrics.items()},
        }
    )


# --- change.detect -------------------------------------------------------------------------------

DETECT_PARAMS = (
    *MAP_INPUTS[:2],
    Param("adapter", str, "Name of a FILF adapter in the library.", required=True, kind="adapter"),
    *MAP_INPUTS[2:],
    Param("backbone", str, "Expected backbone (refused if the adapter was trained on another).", default=None),
    Param("reference", str, "Optional reference change mask to score against.", kind="raster"),
    Param("threshold", float, "Change probability threshold.", default=0.5),
    Param("min_area_m2", float, "Drop change polygons smaller than this (square metres).", default=0.0),
    Param("simplify", float, "Simplify polygon outlines, tolerance in pixels.", default=0.0),
    Param("name", str, "Prefix of the output file names.", default="filf"),
    Param("tile_size", int, "Tile size in pixels (default: the training patch size).", default=None),
    Param("overlap", int, "Tile overlap in pixels (default: a quarter of the tile).", default=None),
    Param("batch_size", int, "Tiles per forward pass.", default=4),
    Param("device", str, "auto, cpu or cuda.", default="auto"),
)


def detect(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    ctx.protect_inputs(p["before"], p["after"], p["reference"])
    out_dir = prepare_out_dir(p["out_dir"])
    device = torch.device(resolve_device(p["device"]))
    state, meta = adapters.load(p["adapter"])
    with (
        RasterSource(p["before"], meta.bands, what="before") as b0,
        RasterSource(p["after"], meta.bands, what="after") as a0,
    ):
        adapters.check_compatible(meta, METHOD, p["backbone"] or meta.backbone, b0.count)
        grid = overlap_grid(b0.native, a0.native, ("before", "after"))
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    checkpoint = training_checkpoint(meta.backbone, meta.checkpoint_sha256, meta.name)
    if checkpoint is None:
        ctx.warn(f"The adapter '{meta.name}' was trained on a randomly initialised {meta.backbone} encoder.")
    model = build_model(meta.backbone, meta.config["rank"], checkpoint)
    try:
        model.load_adapter_state(state)
    except CheckpointMismatch as exc:
        raise JobError(INVALID_INPUT, f"The adapter '{meta.name}' is damaged or from another version: {exc}") from None
    model.to(device).eval()
    norm = normalizer(meta.normalization, device)
    nb = len(meta.bands)
    tile = p["tile_size"] or meta.config.get("patch_size", 256)
    try:
        spec = TileSpec(tile, tile // 4 if p["overlap"] is None else p["overlap"], p["batch_size"])
    except ValueError as exc:
        raise JobError(INVALID_INPUT, str(exc)) from None
    before = RasterSource(p["before"], meta.bands, grid=grid, what="before")
    after = RasterSource(p["after"], meta.bands, grid=grid, resampling=Resampling.bilinear, what="after")

    read_pair = pair_reader(before, after, grid, aoi)

    @halve_batch_on_oom
    @torch.no_grad()
    def predict(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(norm(x[:, :nb]), norm(x[:, nb:]))
        return torch.sigmoid(logits[:, 1:2].float()).cpu().numpy()

    with (
        before,
        after,
        ChangeOutputs(ctx, out_dir, p["name"], grid, spec.stride, p["reference"], p["threshold"]) as outs,
    ):
        run_tiled(
            grid.height,
            grid.width,
            read_pair,
            predict,
            lambda win, values, valid: outs.write(win, values[0], valid),
            1,
            spec,
            on_tile=lambda d, t: ctx.progress(0.9 * d / t, "detecting changes", f"tile {d}/{t}"),
        )
    return outs.finish(p["simplify"], p["min_area_m2"], extra={"adapter": meta.name, "threshold": p["threshold"]})


FINETUNE = JobSpec(
    "change.finetune",
    "Fine-tune a FILF change-detection adapter on your labels.",
    FINETUNE_PARAMS,
    finetune,
    title="Fine-tune a FILF adapter",
)
DETECT = JobSpec(
    "change.detect",
    "Detect changes between two rasters with a FILF adapter.",
    DETECT_PARAMS,
    detect,
    title="Detect (FILF adapter)",
    outputs=DECLARED,
)
