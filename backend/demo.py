"""`make demo`: learned vs classical change detection on bundled real LEVIR-CD data.

Fine-tunes a FILF adapter (frozen MobileSAM TinyViT + BiTemporal LoRA + decoder) on five labelled
256² LEVIR-CD pairs for about six CPU minutes, then runs `change.detect` with it and `change.cva` on the
held-out georeferenced 1024² pair through the real backend worker. Writes both sets of outputs
(probability + mask GeoTIFFs, change polygons) and a preview PNG (before | after | CVA | FILF, change
in red, reference outline in cyan) to --out-dir and prints F1 of both against the reference mask.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "levir_cd"
PANEL = 512
TRAIN_CROPS = ["test_2_0000_0000", "test_2_0000_0512", "test_7_0256_0512", "test_55_0256_0000", "test_77_0512_0256"]
ADAPTER = "demo-levir-filf"
# About six CPU minutes on 2 cores (80 steps of 4 pairs); far shorter than the paper's 100 epochs.
DEMO_TRAINING = {"epochs": 10, "steps_per_epoch": 8, "batch_size": 4, "patch_size": 256, "patience": 10}


def read_rgb(path: Path, size: int = PANEL) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(list(range(1, min(3, ds.count) + 1)), out_shape=(3, size, size), resampling=Resampling.average)


def read_mask(path: Path, size: int = PANEL) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1, out_shape=(size, size), resampling=Resampling.nearest)


def write_preview(before: Path, after: Path, masks: list[Path], reference: Path | None, out: Path) -> None:
    """before | after | one panel per detection (change in red, reference outline in cyan)."""
    a, b = read_rgb(before), read_rgb(after)
    edge = None
    if reference is not None:
        ref = read_mask(reference) > 0
        edge = ref & ~ndimage.binary_erosion(ref, iterations=2)
    gap = np.full((3, PANEL, 8), 255, np.uint8)
    panels = [a, gap, b]
    for mask in masks:
        overlay = (b.astype(np.float32) * 0.6).astype(np.uint8)
        detected = read_mask(mask) == 1
        overlay[:, detected] = (0.45 * overlay[:, detected] + 0.55 * np.array([[255], [30], [30]])).astype(np.uint8)
        if edge is not None:
            overlay[:, edge] = np.array([[0], [255], [255]])
        panels += [gap, overlay]
    canvas = np.concatenate(panels, axis=2)
    with (
        warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"),
        rasterio.open(out, "w", driver="PNG", width=canvas.shape[2], height=PANEL, count=3, dtype="uint8") as ds,
    ):
        ds.write(canvas)


def finetune_filf(out_dir: Path, minutes_hint: str) -> dict:
    """Fine-tune FILF on the bundled labelled 256² crops with the job's training core (several pairs)."""
    from backend.context import JobContext
    from backend.io.raster import RasterSource
    from backend.jobs import JOBS
    from backend.jobs.finetune import train_and_save
    from backend.methods.filf import SPEC as FILF
    from backend.methods.filf.spec import training_on
    from backend.training.change_data import load_training_area

    def files(name: str) -> tuple[str, str, str]:
        return tuple(str(DATA / f"{name}_{p}.tif") for p in ("A", "B", "label"))  # type: ignore[return-value]

    print(
        f"Fine-tuning FILF (MobileSAM TinyViT + BiTemporal LoRA) on {len(TRAIN_CROPS)} labelled pairs ({minutes_hint})"
    )
    ctx = JobContext(on_log=lambda level, msg, data=None: print(f"  {msg}"))
    areas = [load_training_area(*files(n), warnings=ctx.warnings, require_change=False) for n in TRAIN_CROPS]
    with RasterSource(files(TRAIN_CROPS[0])[0]) as src:
        dtype, bands = src.dtype, src.bands
    before, after, labels = files(TRAIN_CROPS[0])
    spec = JOBS["change.finetune"]
    p = spec.validate(
        {
            "before": before,
            "after": after,
            "labels": labels,
            "adapter_name": ADAPTER,
            "backbone": "mobile_sam",
            "allow_random_backbone": True,
            "overwrite": True,
            **DEMO_TRAINING,
        }
    )
    return train_and_save(FILF, ctx, p, training_on(areas, dtype, bands, p)).metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="test_1", help="held-out LEVIR-CD pair in tests/data/levir_cd")
    parser.add_argument("--out-dir", default="demo_out")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.getLogger("backend").addHandler(logging.NullHandler())  # messages are printed by the demo itself
    logging.getLogger("backend").propagate = False
    from backend.client import WorkerClient

    out_dir = Path(args.out_dir).resolve()
    # The demo's adapter goes to a library inside demo_out, not the user's own library.
    os.environ["RS_PEFT_QGIS_DATA_DIR"] = str(out_dir / "library")
    trained = finetune_filf(out_dir, "about six CPU minutes on 2 cores")
    before, after, reference = (DATA / f"{args.pair}_{p}.tif" for p in ("A", "B", "label"))
    print(f"Detecting changes on the held-out LEVIR-CD pair {args.pair} (1024², Austin) through the backend worker")
    client = WorkerClient(sys.executable, ROOT)
    info = client.start()
    print(f"backend worker {info['backend_version']} on {', '.join(d['name'] for d in info['devices'])}")

    def progress(label: str) -> Callable[[float, str, str], None]:  # one line per job, redrawn in place
        def show(fraction: float, stage: str, message: str) -> None:
            print(f"\r  {label:<26} {fraction:4.0%} {stage:<18}", end="", file=sys.stderr, flush=True)

        return show

    common = {"before": str(before), "after": str(after), "reference": str(reference), "out_dir": str(out_dir)}
    jobs = {
        "CVA (Otsu threshold)": ("change.cva", common),
        "FILF (fine-tuned adapter)": ("change.detect", {**common, "adapter": ADAPTER}),
    }
    handles = {}
    try:
        for label, (job, params) in jobs.items():
            handles[label] = client.run_job(job, params, on_progress=progress(label))
            print(file=sys.stderr)  # the next job's line starts below this one
    finally:
        client.shutdown()
    for h in handles.values():
        if not h.succeeded:
            print(f"Error: {h.outcome['message']}\nHint: {h.outcome.get('hint', '')}", file=sys.stderr)
            return 1
    preview = out_dir / "preview.png"
    masks = [Path(h.outcome["outputs"][1]["path"]) for h in handles.values()]
    write_preview(before, after, masks, reference, preview)
    print("Outputs:")
    for h in handles.values():
        for o in h.outcome["outputs"]:
            print(f"  {o['layer_name']:<26} {o['path']}")
    print(f"  {'preview':<26} {preview}  (before | after | CVA | FILF)")
    print(f"  {'adapter':<26} {out_dir / 'library' / 'adapters' / ADAPTER}")
    print(f"\nAgainst the reference mask of {args.pair}:")
    print(f"  {'method':<28} {'F1':>6} {'precision':>9} {'recall':>7} {'IoU':>6}")
    for label, h in handles.items():
        m = h.outcome["metrics"]
        print(f"  {label:<28} {m['f1']:6.3f} {m['precision']:9.3f} {m['recall']:7.3f} {m['iou']:6.3f}")
    if any("randomly initialised" in w for h in handles.values() for w in h.outcome["warnings"]):
        print(
            "  FILF ran on a randomly initialised frozen encoder (no MobileSAM weights installed); install them with\n"
            "  'python -m backend models fetch mobile_sam' for the real model."
        )
    print(f"  (FILF validation F1 during fine-tuning: {trained['val_f1']:.3f}, best epoch {trained['best_epoch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
