"""A toy method that lives outside backend/: a frozen random 1x1 "encoder" and a trainable 1x1 head that maps an
image to a foreground probability. It is registered only where RS_PEFT_QGIS_METHODS names this module, and shows
that a method package plus its registry entries and styles is all it takes: the worker, the CLI, the catalog,
the dock and Processing then offer `toy.finetune` and `toy.apply` with no other code changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window
from torch import nn

from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.io.maps import MapOutputs, MapStyle, stack_reader
from backend.io.raster import RasterSource
from backend.methods.spec import Application, MethodSpec, Training, register
from backend.metrics.change import BinaryConfusion
from backend.models.peft.state import AdapterState
from backend.params import EPOCHS, NAME, STEPS_PER_EPOCH, TRAIN_BATCH_SIZE, Param
from backend.training.loop import Recipe, Stage
from backend.training.samplers import GridPatchSampler

STYLE = MapStyle("toy", "toys", {1: "toy"}, "toy")
IMAGE = Param("image", str, "Image to map.", required=True, kind="raster")


class Toy(AdapterState, nn.Module):
    def __init__(self, bands: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv2d(bands, 4, 1).requires_grad_(False)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))

    def adapter_keys(self):
        return lambda k: k.startswith("head.")


def build(backbone: str, config: dict[str, Any], bands: int, checkpoints: dict[str, str | None]) -> nn.Module:
    return Toy(bands)


def prepare(ctx: JobContext, p: dict[str, Any]) -> Training:
    with RasterSource(p["image"]) as src, RasterSource(p["labels"], [1], grid=src.native,
                                                       resampling=Resampling.nearest) as lab:  # fmt: skip
        full = Window(0, 0, src.native.width, src.native.height)
        image, _ = src.read(full)
        label, _ = lab.read(full)
        grid, dtype, bands = src.native, src.dtype, src.bands
    scale = float(np.abs(image).max()) or 1.0
    x, y = (image / scale).astype(np.float32), (label > 0).astype(np.float32)

    def recipe(model: nn.Module, device: str) -> Recipe:
        sampler = GridPatchSampler((x, y), 32, 1, seed=0)

        def validate(m: nn.Module) -> dict[str, float]:
            with torch.no_grad():
                prob = torch.sigmoid(m(torch.from_numpy(x)[None].to(device)))[0, 0].cpu().numpy()
            confusion = BinaryConfusion()
            confusion.update(prob > 0.5, y[0] > 0)
            return {k: float(v) for k, v in confusion.metrics().items() if k in ("f1", "iou")}

        return Recipe(
            [Stage("head", "", p["epochs"], 0.05)],
            sample=sampler.sample,
            loss=lambda m, b: nn.functional.binary_cross_entropy_with_logits(m(b[0]), b[1]),
            validate=validate,
            metric="iou",
            describe=lambda m: f"IoU {m['iou']:.3f}",
            steps_per_epoch=p["steps_per_epoch"],
            batch_size=p["batch_size"],
            patience=p["epochs"],
            device=device,
        )

    return Training(bands, dtype, {"scale": [scale]}, grid, {}, recipe, classes=["background", "toy"])


def open_apply(ctx: JobContext, p: dict[str, Any], meta: AdapterMeta) -> Application:
    src = RasterSource(p["image"], meta.bands, what="image")
    scale = meta.normalization["scale"][0]

    def sink(block: int) -> MapOutputs:
        return MapOutputs(ctx, Path(p["out_dir"]), p["name"], src.native, block, STYLE)

    return Application(
        src.native,
        stack_reader((src,), src.native, None),
        lambda model, x: torch.sigmoid(model(x / scale)),
        1,
        sink,
        tile=64,
        activity="mapping toys",
        close=src.close,
    )


SPEC = register(
    MethodSpec(
        name="toy",
        task="toy",
        title="Toy",
        backbones={"toy": ("tiny_vit_tiny",)},
        default_backbone="toy",
        build=build,
        finetune_summary="Fine-tune the toy head on a mask.",
        finetune_params=(
            IMAGE,
            Param("labels", str, "Mask raster (non-zero = toy).", required=True, kind="raster"),
            EPOCHS.but(default=2),
            STEPS_PER_EPOCH.but(default=3),
            TRAIN_BATCH_SIZE.but(default=2),
        ),
        prepare=prepare,
        apply_summary="Map toys with a toy adapter.",
        apply_params=(IMAGE, NAME.but(default="toy")),
        open=open_apply,
        outputs=STYLE.declared(),
        task_title="Toy mapping",
    )
)
