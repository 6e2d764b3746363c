"""`make demo`: change detection on the bundled georeferenced LEVIR-CD pair, through the real worker.

Writes the change probability and mask GeoTIFFs, the change polygons (GPKG) and a preview PNG
(before | after | detected change in red with the reference outline in cyan) to --out-dir and
prints F1 against the pair's reference mask.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "levir_cd"
PANEL = 512


def read_rgb(path: Path, size: int = PANEL) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(list(range(1, min(3, ds.count) + 1)), out_shape=(3, size, size), resampling=Resampling.average)


def read_mask(path: Path, size: int = PANEL) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1, out_shape=(size, size), resampling=Resampling.nearest)


def write_preview(before: Path, after: Path, mask: Path, reference: Path | None, out: Path) -> None:
    a, b = read_rgb(before), read_rgb(after)
    overlay = (b.astype(np.float32) * 0.6).astype(np.uint8)
    detected = read_mask(mask) == 1
    overlay[:, detected] = (0.45 * overlay[:, detected] + 0.55 * np.array([[255], [30], [30]])).astype(np.uint8)
    if reference is not None:
        ref = read_mask(reference) > 0
        edge = ref & ~ndimage.binary_erosion(ref, iterations=2)
        overlay[:, edge] = np.array([[0], [255], [255]])
    gap = np.full((3, PANEL, 8), 255, np.uint8)
    canvas = np.concatenate([a, gap, b, gap, overlay], axis=2)
    with (
        warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"),
        rasterio.open(out, "w", driver="PNG", width=canvas.shape[2], height=PANEL, count=3, dtype="uint8") as ds,
    ):
        ds.write(canvas)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="test_1", help="LEVIR-CD pair name in tests/data/levir_cd")
    parser.add_argument("--out-dir", default="demo_out")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rs_peft_qgis.worker_client import WorkerClient

    before, after, reference = (DATA / f"{args.pair}_{p}.tif" for p in ("A", "B", "label"))
    out_dir = Path(args.out_dir).resolve()
    print(f"Change detection (change-vector analysis) on LEVIR-CD {args.pair}: {before.name} -> {after.name}")
    client = WorkerClient(sys.executable, ROOT)
    info = client.start()
    print(f"backend worker {info['backend_version']} on {', '.join(d['name'] for d in info['devices'])}")

    def show(fraction: float, stage: str, message: str) -> None:
        print(f"\r  {fraction:4.0%} {stage:<18}", end="", file=sys.stderr, flush=True)

    try:
        handle = client.run_job(
            "change.cva",
            {"before": str(before), "after": str(after), "reference": str(reference), "out_dir": str(out_dir)},
            on_progress=show,
        )
    finally:
        client.shutdown()
    print(file=sys.stderr)
    if not handle.succeeded:
        print(f"Error: {handle.outcome['message']}\nHint: {handle.outcome.get('hint', '')}", file=sys.stderr)
        return 1
    outputs = handle.outcome["outputs"]
    preview = out_dir / "preview.png"
    write_preview(before, after, Path(outputs[1]["path"]), reference, preview)
    print("Outputs:")
    for o in outputs:
        print(f"  {o['layer_name']:<24} {o['path']}")
    print(f"  {'preview':<24} {preview}")
    m = handle.outcome["metrics"]
    print(
        f"Against the reference mask: F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
        f"IoU {m['iou']:.3f}  ({m['polygons']} change polygons, Otsu threshold {m['threshold']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
