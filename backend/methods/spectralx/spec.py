"""SpectralX as the product's land-cover method: landcover.adapt (stage 1, masked reconstruction on the analyst's
unlabelled imagery), landcover.finetune (stage 2, on class polygons or a class raster, from a stage-1 adapter
when given), landcover.map (class raster with a colour table, confidence and class polygons), on any band set
whose wavelengths are known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backend import adapters, weights
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.io.maps import stack_reader
from backend.io.raster import RasterSource
from backend.io.rasterize import IGNORE, restrict_to_aoi
from backend.io.wavelengths import SENSORS
from backend.methods.spec import RANDOM_BACKBONE_SEED, Application, MethodSpec, Pretraining, Training, register
from backend.models.backbones import vit
from backend.models.backbones.loading import read_checkpoint
from backend.params import (
    AOI,
    BANDS,
    CHECKPOINTING,
    EPOCHS,
    LR,
    MIN_AREA_M2,
    NAME,
    PATIENCE,
    SIMPLIFY,
    STEPS_PER_EPOCH,
    TRAIN_BATCH_SIZE,
    VAL_FRACTION,
    Param,
)
from backend.protocol import INVALID_INPUT, JobError
from backend.training.areas import TrainingArea, can_split_by_area
from backend.training.image_data import load_labelled_image
from backend.training.normalize import normalizer

from .data import BandSetup, apply_matrix, band_setup, fill_invalid, read_unlabelled, scene_normalization, to_model
from .model import SpectralX
from .outputs import OUTPUTS, LandCoverOutputs
from .reconstruction import MASK_RATIO
from .training import adapt_recipe, segment_recipe

METHOD = "spectralx"

IMAGE = Param(
    "image",
    str,
    "Multispectral or hyperspectral raster (3 bands or more, any data type).",
    required=True,
    kind="raster",
)
SPECTRAL_BANDS = BANDS.but(help="Bands to use, e.g. 2,3,4,8 (default: all).")
WAVELENGTHS = Param(
    "wavelengths",
    str,
    "Centre wavelength of each band used, in nm (e.g. 490,560,665,842) or µm with the unit ('0.49,0.56 um'); "
    "default: from the raster's metadata or the sensor.",
    prominent=True,
)
SENSOR = Param(
    "sensor",
    str,
    "Sensor whose band wavelengths to use when the raster does not carry them (Sentinel-2 L1C/L2A or its 6 "
    "common bands, Landsat 5/7/8/9, WorldView-2/3, PlanetScope 4/8 bands), in the product's band order.",
    choices=tuple(SENSORS),
    prominent=True,
)
HYPERT_TRAINABLE = Param(
    "hypert_trainable",
    bool,
    "Train HyperT's core too, as the paper's figure shows (about 20M more parameters); off = as released, "
    "only its low-rank branch and scale train.",
    default=False,
    group="finetune",
)
LOG_SPACE = Param(
    "log_space",
    bool,
    "Combine AoMoA's experts in log space, as the released code does (off: a plain weighted sum).",
    default=True,
    group="finetune",
)
COMPACT_DECODER = Param(
    "compact_decoder",
    bool,
    "Narrow the UPerNet decoder to a quarter of the encoder's width (on the ViT-L 11.0M parameters instead of "
    "the paper's 76M): less memory in fine-tuning (docs/BENCHMARKS.md); off = as the paper.",
    default=False,
    group="finetune",
)
TRAINING = (
    EPOCHS.but(default=8),
    STEPS_PER_EPOCH.but(default=20),
    TRAIN_BATCH_SIZE.but(default=4, minimum=2, why="the Are-adapter and the decoder normalise over the batch"),
    LR.but(default=2e-4, help="Learning rate (AdamW, betas 0.9/0.95, weight decay 1e-4; the paper: 1e-4)."),
    VAL_FRACTION.but(default=0.25),
    PATIENCE.but(default=4),
    CHECKPOINTING,
)
ADAPT_PARAMS = (
    IMAGE,
    AOI.but(help="Polygon layer of the area to adapt to (default: the whole raster, when small enough)."),
    SPECTRAL_BANDS,
    WAVELENGTHS,
    SENSOR,
    Param(
        "mask_ratio",
        float,
        "Share of the patches hidden from the encoder and reconstructed.",
        default=MASK_RATIO,
        minimum=0.1,
        maximum=0.95,
        step=0.05,
        group="finetune",
    ),
    HYPERT_TRAINABLE,
    LOG_SPACE,
    *TRAINING,
)
FINETUNE_PARAMS = (
    IMAGE,
    Param(
        "labels",
        str,
        "Land-cover polygons with a class field, or a class raster (0 = unlabelled, 1, 2 … = classes).",
        required=True,
        kind="layer",
    ),
    AOI.but(help="Polygon layer of the labelled area (inside it, pixels not covered by a polygon are unlabelled)."),
    Param(
        "label_field",
        str,
        "Field of the polygons naming their class ('water', 'forest' … or 1, 2 …).",
        kind="field",
        parent="labels",
    ),
    SPECTRAL_BANDS,
    WAVELENGTHS,
    SENSOR,
    Param(
        "init_adapter",
        str,
        "Stage-1 adapter (from landcover.adapt) to start from; its wavelengths are kept.",
        kind="adapter",
        prominent=True,
    ),
    HYPERT_TRAINABLE,
    LOG_SPACE,
    COMPACT_DECODER,
    *TRAINING,
)
MAP_PARAMS = (
    IMAGE,
    AOI,
    SPECTRAL_BANDS,
    WAVELENGTHS,
    SENSOR,
    MIN_AREA_M2.but(help="Drop land-cover polygons smaller than this (square metres)."),
    SIMPLIFY,
    NAME.but(default="spectralx"),
)


def build(backbone: str, config: dict[str, Any], bands: int, checkpoints: dict[str, str | None]) -> nn.Module:
    """SpectralX of the config's stage on the named Scale-MAE ViT (official weights when known, else seeded)."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    encoder = vit.build(weights.backbone_info(backbone).variant)
    path = checkpoints.get(backbone)
    if path:
        vit.load_official(encoder, read_checkpoint(path))
    return SpectralX(
        encoder,
        config["wavelengths"],
        config["stage"],
        config.get("num_classes", 2),
        config["hypert_trainable"],
        config["log_space"],
        config.get("mask_ratio", MASK_RATIO),
        config.get("compact_decoder", False),
    )


def patch_size(backbone: str) -> int:
    return vit.VARIANTS[weights.backbone_info(backbone).variant].pretrain_size


def valid_pixels(x: np.ndarray, nodata: float | None) -> np.ndarray:
    """Where every band of x (C, H, W) is finite and not the raster's nodata value."""
    valid = np.all(np.isfinite(x), axis=0)
    return valid & np.all(x != nodata, axis=0) if nodata is not None else valid


def start_from(name: str, backbone: str) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    """The stage-1 adapter `init_adapter` names, checked."""
    state, meta = adapters.load(name)
    if meta.method != METHOD or meta.config.get("stage") != "adapt":
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{name}' is not a SpectralX stage-1 adapter.",
            "Start from an adapter made by landcover.adapt (or leave init_adapter empty).",
        )
    if meta.backbone != backbone:
        raise JobError(
            INVALID_INPUT,
            f"The stage-1 adapter '{name}' was made on the {meta.backbone} backbone, but this job uses {backbone}.",
            f"Choose the {meta.backbone} backbone.",
        )
    return state, meta


def base_config(p: dict[str, Any], stage: str, wavelengths: list[float], source: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "wavelengths": wavelengths,
        "wavelength_source": source,
        "patch_size": patch_size(p["backbone"]),
        "hypert_trainable": p["hypert_trainable"],
        "log_space": p["log_space"],
    }


def prepare_adapt(ctx: JobContext, p: dict[str, Any]) -> Training:
    ctx.progress(0.0, "reading the imagery", force=True)
    setup = band_setup(p["image"], p["bands"], p["wavelengths"], p["sensor"])
    ctx.log(f"Band wavelengths ({setup.source}): {', '.join(f'{w:.0f}' for w in setup.wavelengths)} nm")
    x, valid, grid = read_unlabelled(p["image"], setup.bands, p["aoi"], ctx.warnings)
    if not valid.any():
        raise JobError(INVALID_INPUT, "The area to adapt to holds no valid pixel.")
    identity = np.eye(len(setup.bands), dtype=np.float32)
    norm = scene_normalization(p["image"], setup.bands, identity)
    image = fill_invalid(x, valid, norm["mean"])
    if not can_split_by_area(image.shape[-2:], patch_size(p["backbone"]), p["val_fraction"]):
        ctx.warn(
            f"The imagery ({grid.width} x {grid.height} pixels) is too small to hold a part back for validation; "
            "the reconstruction is validated on fixed masks of the same imagery."
        )
    config = base_config(p, "adapt", setup.wavelengths, setup.source) | {"mask_ratio": p["mask_ratio"]}
    with RasterSource(p["image"], setup.bands, what="image") as src:
        dtype = src.dtype  # the raster's own (the pixels were read as float32)
    return Training(
        bands=setup.bands,
        dtype=dtype,
        normalization=norm,
        grid=grid,
        config=config,
        recipe=lambda model, device: adapt_recipe(model, image, norm, p, device),
    )


def prepare_finetune(ctx: JobContext, p: dict[str, Any]) -> Training:
    ctx.progress(0.0, "reading the labelled area", force=True)
    setup = band_setup(p["image"], p["bands"], p["wavelengths"], p["sensor"])
    init, config = None, base_config(p, "segment", setup.wavelengths, setup.source)
    config["compact_decoder"] = p["compact_decoder"]
    if p["init_adapter"]:
        init, meta = start_from(p["init_adapter"], p["backbone"])
        # HyperT is sized to the stage-1 bands: this imagery is taken to them.
        config |= {k: meta.config[k] for k in ("wavelengths", "hypert_trainable", "log_space")}
        config["init_adapter"] = meta.name
    matrix = to_model(setup.wavelengths, config["wavelengths"], ctx.warn)
    with RasterSource(p["image"], setup.bands, what="image") as src:
        dtype, nodata = src.dtype, src.nodata
    area, names = load_labelled_image(
        p["image"], p["labels"], p["aoi"], setup.bands, p["label_field"], ctx.warnings, "ignore", "land-cover class"
    )
    present = np.unique(area.label[(area.label > 0) & (area.label != IGNORE)])
    if len(present) < 2:
        which = names[int(present[0]) - 1] if len(present) else "none"
        raise JobError(
            INVALID_INPUT,
            f"The labels hold one land-cover class only ({which}); a land-cover map needs two or more.",
            "Label areas of at least two classes, and choose the field that names the class (label_field).",
        )
    if not can_split_by_area(area.shape, patch_size(p["backbone"]), p["val_fraction"]):
        ctx.warn(
            f"The labelled area ({area.grid.width} x {area.grid.height} pixels) is too small to hold a part of it "
            "back for validation; a share of each class's labelled pixels is held back instead, so validation "
            "scores are optimistic (the training patches show those pixels, unlabelled)."
        )
    norm = p.get("scene", {}).get("normalization") or scene_normalization(p["image"], setup.bands, matrix)
    x = area.images[0]
    image = fill_invalid(apply_matrix(x, matrix), valid_pixels(x, nodata), norm["mean"])
    train_area = TrainingArea((image,), area.label, area.grid)
    classes = ["unlabelled", *names]
    config["num_classes"] = len(classes)
    return Training(
        bands=setup.bands,
        dtype=dtype,
        normalization=norm,
        grid=area.grid,
        config=config,
        recipe=lambda model, device: segment_recipe(model, train_area, norm, p, device, len(classes)),
        classes=classes,
        init_state=init,
    )


def open_map(ctx: JobContext, p: dict[str, Any], meta: AdapterMeta) -> Application:
    if meta.config.get("stage") != "segment":
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' is a stage-1 (adaptation) adapter, which reconstructs imagery but does not "
            "map classes.",
            f"Fine-tune a land-cover adapter with init_adapter={meta.name}, then map with that one.",
        )
    size = int(meta.config["patch_size"])
    if p["tile_size"] and p["tile_size"] != size:
        raise JobError(INVALID_INPUT, f"SpectralX maps tiles of {size} pixels, its encoder's input size.")
    model_wl = [float(w) for w in meta.config["wavelengths"]]
    try:
        setup = band_setup(p["image"], p["bands"], p["wavelengths"], p["sensor"])
    except JobError:
        with RasterSource(p["image"], p["bands"], what="image") as probe:
            chosen = list(probe.bands)
        if p["wavelengths"] or p["sensor"] or len(chosen) != len(model_wl):
            raise
        # Same band count and nothing said: most likely the adapter's own sensor, exported without metadata.
        ctx.warn(
            f"The raster does not say which wavelengths its bands measure; they are taken to be the adapter's "
            f"({', '.join(f'{w:.0f}' for w in model_wl)} nm)."
        )
        setup = BandSetup(chosen, model_wl, "the adapter's")
    matrix = to_model(setup.wavelengths, model_wl, ctx.warn)
    norm = p.get("scene", {}).get("normalization") or scene_normalization(p["image"], setup.bands, matrix)
    with RasterSource(p["image"], setup.bands, what="image") as probe:
        grid = probe.native
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    src = RasterSource(p["image"], setup.bands, grid=grid, what="image")
    read_stack = stack_reader((src,), grid, aoi)
    mean = norm["mean"]

    def read(win: Any) -> tuple[np.ndarray, np.ndarray]:
        x, valid = read_stack(win)
        return fill_invalid(apply_matrix(x, matrix), valid, mean), valid

    norms: dict[torch.device, Any] = {}

    def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        normalize = norms.setdefault(x.device, normalizer(norm, x.device))
        return model(normalize(x)).float()[:, 1:].softmax(1)  # class 0 (unlabelled) is never mapped

    def sink(block: int) -> LandCoverOutputs:
        return LandCoverOutputs(
            ctx, Path(p["out_dir"]), p["name"], grid, block, meta.classes, p["simplify"], p["min_area_m2"]
        )

    return Application(
        grid,
        read,
        predict,
        len(meta.classes) - 1,
        sink,
        size,
        "mapping land cover",
        close=src.close,
        overlap=size // 4,
        output_bytes_per_pixel=5.0,
        scene={"normalization": norm},
    )


SPEC = register(
    MethodSpec(
        name=METHOD,
        task="landcover",
        title="SpectralX",
        # The paper's Scale-MAE ViT-L (its checkpoint is fetched by `models fetch scalemae_vit_l`); the miniature
        # is for tests and the demo.
        backbones={name: (name,) for name in ("scalemae_vit_l", "scalemae_tiny")},
        default_backbone="scalemae_vit_l",
        build=build,
        finetune_summary="Fine-tune a SpectralX land-cover adapter on class polygons or a class raster (stage 2).",
        finetune_params=FINETUNE_PARAMS,
        prepare=prepare_finetune,
        apply_summary="Map land cover in a multispectral or hyperspectral raster with a SpectralX adapter.",
        apply_params=MAP_PARAMS,
        open=open_map,
        outputs=OUTPUTS,
        apply_verb="map",
        finetune_title="Fine-tune a SpectralX adapter",
        apply_title="Map land cover (SpectralX adapter)",
        task_title="Map land cover",
        cpu_mp_per_s=0.02,  # scalemae_vit_l, batches of 4 tiles of 224², 2-core dev VM (docs/BENCHMARKS.md)
        build_config=(
            "stage",
            "wavelengths",
            "num_classes",
            "hypert_trainable",
            "log_space",
            "mask_ratio",
            "compact_decoder",
        ),
        pretraining=Pretraining(
            "adapt",
            "Adapt SpectralX to this imagery",
            "Adapt SpectralX to unlabelled imagery by masked reconstruction (stage 1), before fine-tuning.",
            ADAPT_PARAMS,
            prepare_adapt,
        ),
    )
)
