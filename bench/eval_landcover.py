"""Held-out evaluation of SpectralX against what analysts use today, on real multispectral data.

Data (../shared/data/ms_segmentation/ukis_csmask_cloud): a Sentinel-2 scene (256×512) and a Landsat-7 scene
(512×512), six reflectance bands each (blue, green, red, NIR, SWIR 1, SWIR 2) with reference masks, read as
classes 1 clear land, 2 water, 3 cloud, 4 cloud shadow. They are written as GeoTIFFs (a made-up 30 m UTM grid;
the Sentinel-2 bands carry their wavelengths in GDAL's IMAGERY metadata, the Landsat-7 scene none: the jobs are
told its sensor).

Settings: in-domain (Sentinel-2: train on the left half, map the right half; Landsat-7: top half / bottom half)
and across the sensor gap (train on all of one sensor's scene, map all of the other's, with its own wavelengths).

Methods, each on the same labels:
* `rf` — a per-pixel random forest on the bands (scikit-learn), what SCP does; across sensors it is applied to
  the other sensor's bands as they come (same band kinds);
* `ukis` — the published ukis-csmask 6-band L1C U-Net (ONNX, run with onnxruntime), trained by its authors for
  cloud and shadow on many scenes: no training here, the bar for those two classes (it has no water class);
* `spectralx` — SpectralX through the product's jobs: stage 1 (landcover.adapt) on the unlabelled target
  imagery, stage 2 (landcover.finetune) from it on the training labels, landcover.map on the target;
  `spectralx_stage2` — the same without stage 1, so the table shows what stage 1 buys.
  The Scale-MAE ViT-L checkpoint cannot be downloaded here, so its frozen weights are random (say so); the same
  command runs on the real weights after `models fetch scalemae_vit_l`. `--backbone scalemae_tiny` runs the
  miniature for a quick check.

Scores on the target (one confusion matrix each, methods.md §2.4): OA and mIoU over the four classes, and a
three-class view (clear and water merged, as ukis-csmask sees them) with cloud and shadow IoU.

    python -m bench.eval_landcover [--data ../shared/data] [--settings s2 l7 s2_to_l7 l7_to_s2]
                                   [--methods rf ukis spectralx spectralx_stage2] [--steps 60] [--batch 4]
                                   [--backbone scalemae_vit_l]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
UKIS = "ms_segmentation/ukis_csmask_cloud"
SEED = 0
UKIS_CLASSES = {3: 1, 1: 2, 4: 3, 0: 4}  # reference mask value -> class (tests/data/make_test_data.py)
NAMES = ("clear", "water", "cloud", "shadow")
GRIDS = {"sentinel2": ("EPSG:32633", 500_000.0, 5_300_000.0), "landsat7": ("EPSG:32632", 600_000.0, 5_200_000.0)}
SENSOR = {"sentinel2": "sentinel2_6", "landsat7": "landsat7"}
# (train scene, its part, target scene, its part); parts: "all", "left"/"right" halves, "top"/"bottom" halves
SETTINGS = {
    "s2": ("sentinel2", "left", "sentinel2", "right"),
    "l7": ("landsat7", "top", "landsat7", "bottom"),
    "s2_to_l7": ("sentinel2", "all", "landsat7", "all"),
    "l7_to_s2": ("landsat7", "all", "sentinel2", "all"),
}


@dataclass
class Scene:
    image: Path  # GeoTIFF, 6 bands float32
    classes: Path  # class raster 1 … 4
    pixels: np.ndarray  # (6, H, W)
    label: np.ndarray  # (H, W)


def write_scenes(data: Path, work: Path) -> dict[str, Scene]:
    import rasterio

    from backend.io.wavelengths import SENSORS

    scenes = {}
    for sensor, (crs, west, north) in GRIDS.items():
        npz = np.load(data / UKIS / f"{sensor}.npz")
        img = npz["img"].transpose(2, 0, 1).astype(np.float32)
        label = np.zeros(img.shape[1:], np.uint8)
        for value, k in UKIS_CLASSES.items():
            label[npz["msk"][..., 0] == value] = k
        h, w = label.shape
        base = dict(driver="GTiff", width=w, height=h, crs=crs, compress="deflate")
        base["transform"] = rasterio.Affine(30.0, 0, west, 0, -30.0, north)
        image, classes = work / f"{sensor}.tif", work / f"{sensor}_classes.tif"
        with rasterio.open(image, "w", count=6, dtype="float32", **base) as ds:
            ds.write(img)
            if sensor == "sentinel2":
                for b, wl in enumerate(SENSORS["sentinel2_6"][1], 1):
                    ds.update_tags(b, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=f"{wl / 1000:.4f}")
        with rasterio.open(classes, "w", count=1, dtype="uint8", **base) as ds:
            ds.write(label[None])
        scenes[sensor] = Scene(image, classes, img, label)
    return scenes


def part(shape: tuple[int, int], which: str) -> tuple[slice, slice]:
    h, w = shape
    return {
        "all": (slice(0, h), slice(0, w)),
        "left": (slice(0, h), slice(0, w // 2)),
        "right": (slice(0, h), slice(w // 2, w)),
        "top": (slice(0, h // 2), slice(0, w)),
        "bottom": (slice(h // 2, h), slice(0, w)),
    }[which]


def aoi_file(scene: Scene, which: str, work: Path) -> Path | None:
    """The part as a polygon layer in the scene's CRS (None for the whole scene)."""
    if which == "all":
        return None
    import fiona
    import rasterio

    with rasterio.open(scene.image) as ds:
        rows, cols = part(ds.shape, which)
        t = ds.transform
        x0, y0 = t * (cols.start, rows.start)
        x1, y1 = t * (cols.stop, rows.stop)
        crs = ds.crs.to_string()
    path = work / f"aoi_{scene.image.stem}_{which}.gpkg"
    ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    with fiona.open(path, "w", driver="GPKG", crs=crs, schema={"geometry": "Polygon", "properties": {}}) as out:
        out.write({"geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}})
    return path


def scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from backend.metrics.landcover import landcover_scores
    from backend.metrics.segmentation import ConfusionMatrix

    keep = (ref > 0) & (pred > 0)
    four = ConfusionMatrix(5)
    four.update(pred[keep], ref[keep])
    merged = np.array([0, 1, 1, 2, 3], np.uint8)  # water -> clear: the three classes ukis-csmask knows
    three = ConfusionMatrix(4)
    three.update(merged[pred[keep]], merged[ref[keep]])
    s4, s3 = landcover_scores(four.matrix, ["", *NAMES]), landcover_scores(three.matrix)
    iou3 = {c["class"]: c["iou"] for c in s3["per_class"]}
    return {
        "oa": s4["oa"],
        "miou": s4["miou"],
        "miou_3": s3["miou"],
        "cloud_iou": iou3.get(2, 0.0),
        "shadow_iou": iou3.get(3, 0.0),
        "scored_pixels": int(keep.sum()),
    }


def random_forest(train: Scene, rows_cols: tuple[slice, slice], target: np.ndarray) -> np.ndarray:
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(SEED)
    x = train.pixels[:, rows_cols[0], rows_cols[1]].reshape(6, -1).T
    y = train.label[rows_cols].ravel()
    take = rng.choice(np.flatnonzero(y > 0), size=min(20_000, int((y > 0).sum())), replace=False)
    forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=-1, random_state=SEED)
    forest.fit(x[take], y[take])
    return forest.predict(target.reshape(6, -1).T).reshape(target.shape[1:]).astype(np.uint8)


def ukis(target: np.ndarray) -> np.ndarray:
    from ukis_csmask.mask import CSmask

    bands = ["blue", "green", "red", "nir", "swir16", "swir22"]
    csm = CSmask(np.ascontiguousarray(target.transpose(1, 2, 0)), bands, product_level="l1c", batch_size=4).csm
    return np.array([1, 3, 4], np.uint8)[csm[..., 0]]  # ukis: 0 background (clear), 1 cloud, 2 shadow


def spectralx(
    setting: str,
    scenes: dict[str, Scene],
    stage1: bool,
    args: argparse.Namespace,
    work: Path,
    log: dict,
) -> np.ndarray:
    import rasterio

    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.base import run_job

    train_name, train_part, target_name, target_part = SETTINGS[setting]
    train, target = scenes[train_name], scenes[target_name]
    common = {"backbone": args.backbone, "allow_random_backbone": True, "overwrite": True}
    common |= {"epochs": max(args.steps // 10, 1), "steps_per_epoch": min(args.steps, 10), "batch_size": args.batch}
    common |= {"patience": args.steps}

    def run(job: str, **params: object) -> dict:
        spec = JOBS[job]
        ctx = JobContext(on_log=lambda level, msg, data=None: print(f"    {msg}") if level == "epoch" else None)
        return run_job(spec, spec.validate(params), ctx)

    def sensor_of(name: str) -> dict:
        return {} if name == "sentinel2" else {"sensor": SENSOR[name]}

    name = f"bench-{setting}-{'full' if stage1 else 'stage2'}"
    init = None
    started = time.monotonic()
    if stage1:  # on the target imagery, unlabelled (the part to be mapped)
        aoi = aoi_file(target, target_part, work)
        run("landcover.adapt", image=str(target.image), aoi=str(aoi) if aoi else None, adapter_name=f"{name}-1",
            **sensor_of(target_name), **common)  # fmt: skip
        init = f"{name}-1"
    aoi = aoi_file(train, train_part, work)
    trained = run(
        "landcover.finetune",
        image=str(train.image),
        labels=str(train.classes),
        aoi=str(aoi) if aoi else None,
        adapter_name=name,
        init_adapter=init,
        **sensor_of(train_name),
        **common,
    ).metrics
    log["trainable_parameters"] = trained["trainable_parameters"]
    log["train_seconds"] = time.monotonic() - started
    out = work / name
    aoi = aoi_file(target, target_part, work)
    mapped = run(
        "landcover.map",
        image=str(target.image),
        adapter=name,
        aoi=str(aoi) if aoi else None,
        out_dir=str(out),
        **sensor_of(target_name),
    )
    path = next(o.path for o in mapped.outputs if o.key == "classes")
    with rasterio.open(path) as ds:
        return ds.read(1)


def run_setting(setting: str, scenes: dict[str, Scene], args: argparse.Namespace, work: Path) -> dict:
    train_name, train_part, target_name, target_part = SETTINGS[setting]
    train, target = scenes[train_name], scenes[target_name]
    tr, tg = part(train.label.shape, train_part), part(target.label.shape, target_part)
    pixels, ref = target.pixels[:, tg[0], tg[1]], target.label[tg]
    size = f"{ref.shape[1]}×{ref.shape[0]}"
    print(f"{setting}: train {train_name} ({train_part}), map {target_name} ({target_part}), {size} px")
    rows = {}
    for method in args.methods:
        started, extra = time.monotonic(), {}
        if method == "rf":
            pred = random_forest(train, tr, pixels)
        elif method == "ukis":
            pred = ukis(pixels)
        else:
            pred = spectralx(setting, scenes, method == "spectralx", args, work, extra)
        rows[method] = {**scores(pred, ref), **extra, "seconds": time.monotonic() - started}
        r = rows[method]
        print(
            f"  {method:<17} OA {r['oa']:.3f}  mIoU {r['miou']:.3f}  3-class mIoU {r['miou_3']:.3f}  "
            f"cloud IoU {r['cloud_iou']:.3f}  shadow IoU {r['shadow_iou']:.3f}  {r['seconds']:.0f} s"
        )
    return {"train": f"{train_name} {train_part}", "target": f"{target_name} {target_part}", "methods": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["rf", "ukis", "spectralx", "spectralx_stage2"],
        choices=["rf", "ukis", "spectralx", "spectralx_stage2"],
    )
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps of each SpectralX stage")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backbone", default="scalemae_vit_l", choices=["scalemae_vit_l", "scalemae_tiny"])
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.getLogger("backend").propagate = False
    from bench.machine import machine_record

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["RS_PEFT_QGIS_ADAPTER_DIR"] = str(work / "adapters")  # not the user's library
        scenes = write_scenes(args.data, work)
        settings = {s: run_setting(s, scenes, args, work) for s in args.settings}
    record = {
        **machine_record("cpu", load_at_start),
        "settings": vars(args) | {"data": str(args.data)},
        "results": settings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"eval_landcover_{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
