"""Held-out evaluation of SpectralX against what analysts use today, on real multispectral data.

Data (../shared/data/ms_segmentation/ukis_csmask_cloud): a Sentinel-2 scene (256×512) and a Landsat-7 scene
(512×512), six reflectance bands each (blue, green, red, NIR, SWIR 1, SWIR 2) with reference masks, read as
classes 1 clear land, 2 water, 3 cloud, 4 cloud shadow. They are written as GeoTIFFs (a made-up 30 m UTM grid;
the Sentinel-2 bands carry their wavelengths in GDAL's IMAGERY metadata, the Landsat-7 scene none: the jobs are
told its sensor).

Settings: in-domain (Sentinel-2: train on the left half, map the right half; Landsat-7: top half / bottom half)
and across the sensor gap (train on all of one sensor's scene, map all of the other's, with its own wavelengths).
`muufl` is hyperspectral: the MUUFL Gulfport CASI chip in tests/data/muufl (72 bands, 368-1043 nm, 20 x 31
pixels, smaller than one patch) with 33 labelled pixels of 5 classes (blue, green and black calibration panels,
trees, grass); half of each class is held out, over three random splits (few pixels: the spread is large).

Methods, each on the same labels:
* `rf` — a per-pixel random forest on the bands (scikit-learn), what SCP does; across sensors it is applied to
  the other sensor's bands as they come (same band kinds); on MUUFL, on the 72 bands of the training pixels;
* `ukis` — the published ukis-csmask 6-band L1C U-Net (ONNX, run with onnxruntime), trained by its authors for
  cloud and shadow on many scenes: no training here, the bar for those two classes (it has no water class);
  not run on MUUFL, whose CASI bands stop short of the SWIR bands it needs;
* `spectralx` — SpectralX through the product's jobs: stage 1 (landcover.adapt) on the unlabelled target
  imagery, stage 2 (landcover.finetune) from it on the training labels, landcover.map on the target;
  `spectralx_stage2` — the same without stage 1, so the table shows what stage 1 buys.
  The Scale-MAE ViT-L checkpoint cannot be downloaded here, so its frozen weights are random (say so); the same
  command runs on the real weights after `models fetch scalemae_vit_l`. `--backbone scalemae_tiny` runs the
  miniature for a quick check.

Scores on the target (one confusion matrix each, methods.md §2.4): OA and mIoU over the four classes, and a
three-class view (clear and water merged, as ukis-csmask sees them) with cloud and shadow IoU; on MUUFL, OA,
mIoU and mean F1 over the five classes at the held-out pixels.

    python -m bench.eval_landcover [--data ../shared/data] [--settings s2 l7 s2_to_l7 l7_to_s2 muufl]
                                   [--methods rf ukis spectralx spectralx_stage2] [--steps 60] [--batch 4]
                                   [--backbone scalemae_vit_l] [--compact-decoder]
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
    bands = len(train.pixels)
    x = train.pixels[:, rows_cols[0], rows_cols[1]].reshape(bands, -1).T
    y = train.label[rows_cols].ravel()
    take = rng.choice(np.flatnonzero(y > 0), size=min(20_000, int((y > 0).sum())), replace=False)
    forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=-1, random_state=SEED)
    forest.fit(x[take], y[take])
    return forest.predict(target.reshape(bands, -1).T).reshape(target.shape[1:]).astype(np.uint8)


def ukis(target: np.ndarray) -> np.ndarray:
    from ukis_csmask.mask import CSmask

    bands = ["blue", "green", "red", "nir", "swir16", "swir22"]
    csm = CSmask(np.ascontiguousarray(target.transpose(1, 2, 0)), bands, product_level="l1c", batch_size=4).csm
    return np.array([1, 3, 4], np.uint8)[csm[..., 0]]  # ukis: 0 background (clear), 1 cloud, 2 shadow


def spectralx(
    setting: str, scenes: dict[str, Scene], stage1: bool, args: argparse.Namespace, work: Path, log: dict
) -> np.ndarray:
    train_name, train_part, target_name, target_part = SETTINGS[setting]
    train, target = scenes[train_name], scenes[target_name]

    def sensor_of(name: str) -> dict:
        return {} if name == "sentinel2" else {"sensor": SENSOR[name]}

    return spectralx_run(
        f"bench-{setting}-{'full' if stage1 else 'stage2'}",
        (train.image, train.classes, aoi_file(train, train_part, work), sensor_of(train_name)),
        (target.image, aoi_file(target, target_part, work), sensor_of(target_name)),
        stage1,
        args,
        work,
        log,
    )


Source = tuple[Path, Path | None, dict]  # image, AOI (None: all of it), sensor parameters


def spectralx_run(
    name: str,
    train: tuple[Path, Path, Path | None, dict],  # image, class raster, AOI, sensor parameters
    target: Source,
    stage1: bool,
    args: argparse.Namespace,
    work: Path,
    log: dict,
) -> np.ndarray:
    """Stage 1 (when asked) on the unlabelled target, stage 2 on the training labels, map the target."""
    import rasterio

    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.base import run_job

    common = {"backbone": args.backbone, "allow_random_backbone": True, "overwrite": True}
    common |= {"epochs": max(args.steps // 10, 1), "steps_per_epoch": min(args.steps, 10), "batch_size": args.batch}
    common |= {"patience": args.steps}
    tuning = {"compact_decoder": True} if args.compact_decoder else {}

    def run(job: str, **params: object) -> dict:
        spec = JOBS[job]
        ctx = JobContext(on_log=lambda level, msg, data=None: print(f"    {msg}") if level == "epoch" else None)
        return run_job(spec, spec.validate(params), ctx)

    image, aoi, sensor = target
    where = {"aoi": str(aoi) if aoi else None, **sensor}
    init = None
    started = time.monotonic()
    if stage1:  # on the target imagery, unlabelled (the part to be mapped)
        run("landcover.adapt", image=str(image), adapter_name=f"{name}-1", **where, **common)
        init = f"{name}-1"
    t_image, t_classes, t_aoi, t_sensor = train
    trained = run(
        "landcover.finetune",
        image=str(t_image),
        labels=str(t_classes),
        aoi=str(t_aoi) if t_aoi else None,
        adapter_name=name,
        init_adapter=init,
        **t_sensor,
        **tuning,
        **common,
    ).metrics
    log["trainable_parameters"] = trained["trainable_parameters"]
    log["train_seconds"] = time.monotonic() - started
    mapped = run("landcover.map", image=str(image), adapter=name, out_dir=str(work / name), **where)
    path = next(o.path for o in mapped.outputs if o.key == "classes")
    with rasterio.open(path) as ds:
        return ds.read(1)


MUUFL = ROOT / "tests" / "data" / "muufl"  # tests/data/make_test_data.py muufl(), from ../shared/data
MUUFL_SPLITS = (0, 1, 2)


def held_out_pixels(label: np.ndarray, seed: int) -> np.ndarray:
    """Half of each class's labelled pixels (rounded down: a class of one pixel only trains), drawn with the
    seed: the test pixels."""
    rng = np.random.default_rng(seed)
    test = np.zeros(label.shape, bool)
    for k in np.unique(label[label > 0]):
        at = np.flatnonzero(label == k)
        test.flat[rng.permutation(at)[: len(at) // 2]] = True
    return test


def run_muufl(args: argparse.Namespace, work: Path) -> dict:
    """MUUFL Gulfport CASI (72 bands): the 20 x 31 chip's 33 labelled pixels of 5 classes, half of each class
    held out, three random splits; SpectralX adapts to the chip itself (stage 1)."""
    import rasterio

    with rasterio.open(MUUFL / "class_demo.tif") as ds:
        pixels = ds.read().astype(np.float32)
    with rasterio.open(MUUFL / "class_demo_classes.tif") as ds:
        label, profile = ds.read(1), ds.profile
    print(f"muufl: {int((label > 0).sum())} labelled pixels of {label.max()} classes, half held out, 3 splits")
    rows: dict[str, dict] = {}
    for method in args.methods:
        if method == "ukis":  # its U-Nets need SWIR 1.6/2.2 µm bands; CASI stops at 1.04 µm
            continue
        runs = []
        for seed in MUUFL_SPLITS:
            test = held_out_pixels(label, seed)
            train_label = np.where(test, 0, label).astype(np.uint8)
            started, extra = time.monotonic(), {}
            if method == "rf":
                scene = Scene(MUUFL / "class_demo.tif", Path(), pixels, train_label)
                pred = random_forest(scene, part(label.shape, "all"), pixels)
            else:
                classes = work / f"muufl_train_{seed}.tif"
                with rasterio.open(classes, "w", **profile) as ds:
                    ds.write(train_label[None])
                pred = spectralx_run(
                    f"bench-muufl-{seed}-{'full' if method == 'spectralx' else 'stage2'}",
                    (MUUFL / "class_demo.tif", classes, None, {}),
                    (MUUFL / "class_demo.tif", None, {}),
                    method == "spectralx",
                    args,
                    work,
                    extra,
                )
            runs.append({**class_scores(pred[test], label[test], int(label.max())), **extra})
            runs[-1]["seconds"] = time.monotonic() - started
        mean = {k: float(np.mean([r[k] for r in runs])) for k in ("oa", "miou", "mf1", "seconds")}
        rows[method] = {**mean, "splits": runs}
        print(f"  {method:<17} OA {mean['oa']:.3f}  mIoU {mean['miou']:.3f}  mean F1 {mean['mf1']:.3f} (3 splits)")
    return {"train": "muufl class_demo, half of each class", "target": "the other half", "methods": rows}


def class_scores(pred: np.ndarray, ref: np.ndarray, k: int) -> dict[str, float]:
    from backend.metrics.landcover import landcover_scores
    from backend.metrics.segmentation import ConfusionMatrix

    confusion = ConfusionMatrix(k + 1)
    confusion.update(pred, ref)
    s = landcover_scores(confusion.matrix)
    return {"oa": s["oa"], "miou": s["miou"], "mf1": s["mf1"], "scored_pixels": int(ref.size)}


def run_setting(setting: str, scenes: dict[str, Scene], args: argparse.Namespace, work: Path) -> dict:
    if setting == "muufl":
        return run_muufl(args, work)
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
    settings = [*SETTINGS, "muufl"]
    parser.add_argument("--settings", nargs="+", default=settings, choices=settings)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["rf", "ukis", "spectralx", "spectralx_stage2"],
        choices=["rf", "ukis", "spectralx", "spectralx_stage2"],
    )
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps of each SpectralX stage")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backbone", default="scalemae_vit_l", choices=["scalemae_vit_l", "scalemae_tiny"])
    parser.add_argument("--compact-decoder", action="store_true", help="fine-tune with the compact UPerNet")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.getLogger("backend").propagate = False
    from bench.machine import machine_record

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["RS_PEFT_QGIS_ADAPTER_DIR"] = str(work / "adapters")  # not the user's library
        ukis_settings = [s for s in args.settings if s in SETTINGS]  # muufl reads tests/data itself
        scenes = write_scenes(args.data, work) if ukis_settings else {}
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
