"""Held-out evaluation of WEFT against what analysts use today, on real object data.

Groups (../shared/data): `spacenet4` — one SpaceNet-4 panchromatic scene (Atlanta, 0.5 m) with its building
footprints, the top two thirds labelled for training and the bottom third held out; `nwpu_<class>` — NWPU VHR-10
images holding that class (airplane, storage_tank, ground_track_field, ship), 70 % of them for training and the
rest held out, one binary adapter per class.

Methods, each on the same labels and the same CPU budget of steps × batch × patch:
* `rf` — a per-pixel random forest on colour and texture features (bands, 3×3 and 9×9 local means and standard
  deviations, gradient magnitude), as SCP / OTB offer without deep learning;
* `unet` — full fine-tuning of a U-Net (segmentation-models-pytorch, ResNet-18 encoder; its ImageNet weights
  cannot be downloaded here, so it starts from random weights);
* `weft` — WEFT with the paper's Mask2Former head on MobileSAM's real TinyViT weights (installed by set-up),
  through the product's fine-tuning code and `objects.segment`; `weft_fpn` — the same with the light FPN head;
  `weft_vitl` (with --vitl) — WEFT on the paper's Uni-Perceiver ViT-L with random frozen weights (the
  checkpoint cannot be downloaded here; the same code runs it after
  `models fetch uniperceiver_vit_l`).

Scores on the held-out part: pixel IoU/F1 of the object class and 2-class mIoU (one confusion matrix over all
held-out pixels), object precision/recall/F1 at IoU ≥ 0.5; plus trainable parameters and wall time.

    python -m bench.eval_objects [--data ../shared/data] [--groups spacenet4 nwpu_airplane …]
                                 [--steps 60 --batch 4 --patch 256] [--vitl]
                                 [--methods rf unet weft weft_fpn]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NWPU = "object_seg/nwpu_vhr10_rsprompter"
NWPU_CLASSES = ("airplane", "storage_tank", "ground_track_field", "ship")
SEED = 0


@dataclass
class Sample:
    """One labelled image: (bands, H, W) float32 pixels, a 0/1 label, where it came from."""

    image: np.ndarray
    label: np.ndarray
    path: Path
    window: tuple[slice, slice] | None = None  # the held-out or training part of a larger file


def spacenet4(data: Path) -> tuple[list[Sample], list[Sample], str]:
    import fiona

    folder = data / "building_seg" / "spacenet4_solaris"
    with rasterio.open(folder / "sample_geotiff.tif") as src:
        image = src.read().astype(np.float32)
        transform, shape = src.transform, src.shape
    with fiona.open(folder / "geotiff_labels.geojson") as feats:
        label = rasterize(((f.geometry, 1) for f in feats), out_shape=shape, transform=transform, dtype="uint8")
    cut = shape[0] * 2 // 3
    top, bottom = (slice(0, cut), slice(None)), (slice(cut, None), slice(None))
    train = Sample(image[(slice(None), *top)], label[top], folder / "sample_geotiff.tif", top)
    test = Sample(image[(slice(None), *bottom)], label[bottom], folder / "sample_geotiff.tif", bottom)
    return [train], [test], "building"


def nwpu(data: Path, name: str) -> tuple[list[Sample], list[Sample], str]:
    folder = data / NWPU
    coco = json.loads((folder / "annotations" / "NWPU_instances_val.json").read_text())
    category = next(c["id"] for c in coco["categories"] if c["name"] == name)
    images = {im["id"]: im for im in coco["images"]}
    polygons: dict[int, list] = {}
    for a in coco["annotations"]:
        if a["category_id"] == category:
            rings = [np.array(s, dtype=float).reshape(-1, 2).tolist() for s in a["segmentation"]]
            polygons.setdefault(a["image_id"], []).extend(
                {"type": "Polygon", "coordinates": [r + r[:1]]} for r in rings
            )
    samples = []
    for image_id in sorted(polygons, key=lambda i: images[i]["file_name"]):
        path = folder / "imgs" / images[image_id]["file_name"]
        with warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"), rasterio.open(path) as src:
            image = src.read().astype(np.float32)
        # COCO pixel coordinates are rasterio's pixel space of a non-georeferenced image (identity transform).
        label = rasterize(((g, 1) for g in polygons[image_id]), out_shape=image.shape[1:], dtype="uint8")
        samples.append(Sample(image, label, path))
    n_train = max(1, round(0.7 * len(samples)))
    return samples[:n_train], samples[n_train:], name


def load(data: Path, group: str) -> tuple[list[Sample], list[Sample], str]:
    return spacenet4(data) if group == "spacenet4" else nwpu(data, group.removeprefix("nwpu_"))


def score(preds: list[np.ndarray], tests: list[Sample]) -> dict:
    from backend.metrics.objects import instances, match
    from backend.metrics.segmentation import ConfusionMatrix

    cm = ConfusionMatrix(2)
    objects = {"objects_matched": 0, "objects_predicted": 0, "objects_reference": 0}
    for pred, sample in zip(preds, tests, strict=True):
        cm.update(pred, sample.label)
        m = match(instances(pred > 0), instances(sample.label > 0))
        for k in objects:
            objects[k] += m[k]
    pixel = cm.metrics()
    precision = objects["objects_matched"] / max(objects["objects_predicted"], 1)
    recall = objects["objects_matched"] / max(objects["objects_reference"], 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "iou": pixel["iou"],
        "f1": pixel["f1"],
        "miou": pixel["miou"],
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": f1,
        **objects,
    }


# --- the random forest -------------------------------------------------------------------------------------
def pixel_features(image: np.ndarray) -> np.ndarray:
    """(H*W, F): every band, its 3×3 and 9×9 local mean and standard deviation, and the gradient magnitude."""
    feats = []
    for band in image:
        feats.append(band)
        for size in (3, 9):
            mean = ndimage.uniform_filter(band, size)
            feats += [mean, np.sqrt(np.maximum(ndimage.uniform_filter(band * band, size) - mean * mean, 0))]
        feats.append(np.hypot(ndimage.sobel(band, 0), ndimage.sobel(band, 1)))
    return np.stack(feats, -1).reshape(-1, len(feats))


def random_forest(train: list[Sample], tests: list[Sample], budget: int) -> tuple[list[np.ndarray], dict]:
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(SEED)
    xs, ys = [], []
    for s in train:  # balanced pixel samples, as many as the deep methods see patches' pixels (capped)
        f, y = pixel_features(s.image), s.label.ravel()
        for cls in (0, 1):
            idx = np.flatnonzero(y == cls)
            take = rng.choice(idx, size=min(len(idx), budget // (2 * len(train))), replace=False)
            xs.append(f[take])
            ys.append(y[take])
    forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, n_jobs=-1, random_state=SEED)
    forest.fit(np.concatenate(xs), np.concatenate(ys))
    preds = [forest.predict(pixel_features(s.image)).reshape(s.label.shape).astype(np.uint8) for s in tests]
    return preds, {"trainable_parameters": None, "samples": int(sum(len(y) for y in ys))}


# --- deep methods ---------------------------------------------------------------------------------------------
def areas_of(samples: list[Sample]) -> list:
    from rasterio.transform import Affine

    from backend.io.raster import Grid
    from backend.training.areas import TrainingArea

    return [
        TrainingArea((s.image,), s.label, Grid(None, Affine.identity(), s.label.shape[1], s.label.shape[0]))
        for s in samples
    ]


def unet_unavailable() -> str:
    """Why the U-Net baseline cannot run here ("" when it can): segmentation-models-pytorch needs a torchvision
    built for this very torch, and a CPU-only torch from a local wheel has none on the package index."""
    try:
        import segmentation_models_pytorch  # noqa: F401
    except (ImportError, RuntimeError) as exc:
        return (
            f"segmentation-models-pytorch does not import ({str(exc)[:120]}); `make bench-unet` runs this baseline "
            "in its own venv"
        )
    return ""


def unet(train: list[Sample], tests: list[Sample], args: argparse.Namespace) -> tuple[list[np.ndarray], dict]:
    import segmentation_models_pytorch as smp
    import torch

    from backend.methods.weft.head import segmentation_loss
    from backend.methods.weft.training import normalization
    from backend.training.normalize import normalizer
    from backend.training.samplers import LabelledPatchSampler

    torch.manual_seed(SEED)
    bands = train[0].image.shape[0]
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=bands, classes=2)
    areas = areas_of(train)
    norm = normalization(areas, None, train[0].image.dtype)  # per-band statistics: no encoder of its own
    normalize = normalizer(norm, torch.device("cpu"))
    whole = [(a, (slice(0, a.shape[0]), slice(0, a.shape[1]))) for a in areas]
    sampler = LabelledPatchSampler(whole, args.patch, seed=SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(args.steps):
        x, y = (torch.from_numpy(a) for a in sampler.sample(args.batch))
        loss = segmentation_loss(model(normalize(x)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    preds = []
    with torch.no_grad():
        for s in tests:
            h, w = s.label.shape
            x = torch.nn.functional.pad(torch.from_numpy(s.image)[None], (0, -w % 32, 0, -h % 32), mode="replicate")
            preds.append(model(normalize(x))[0, :, :h, :w].argmax(0).numpy().astype(np.uint8))
    return preds, {"trainable_parameters": sum(p.numel() for p in model.parameters())}


def weft(
    train: list[Sample],
    tests: list[Sample],
    name: str,
    backbone: str,
    head: str,
    args: argparse.Namespace,
    work: Path,
) -> tuple[list[np.ndarray], dict]:
    from backend.client import WorkerClient
    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.finetune import train_and_save
    from backend.methods.weft import SPEC
    from backend.methods.weft.spec import training_on

    areas = areas_of(train)
    grey = train[0].image.shape[0] == 1
    if grey:  # the encoder takes RGB: a panchromatic image as three equal bands
        areas = [type(a)((np.repeat(a.images[0], 3, 0),), a.label, a.grid) for a in areas]
    adapter = f"bench-{name}-{backbone}-{head}"
    spec = JOBS["objects.finetune"]
    p = spec.validate(
        {
            "image": str(train[0].path),
            "labels": str(train[0].path),
            "adapter_name": adapter,
            "backbone": backbone,
            "head": head,
            "allow_random_backbone": backbone != "mobile_sam",
            "overwrite": True,
            "epochs": max(args.steps // 10, 1),
            "steps_per_epoch": min(args.steps, 10),
            "batch_size": args.batch,
            "patch_size": args.patch,
            "patience": args.steps,
        }
    )
    ctx = JobContext(on_log=lambda level, msg, data=None: print(f"    {msg}") if level == "epoch" else None)
    bands = [1, 1, 1] if grey else [1, 2, 3]
    trained = train_and_save(SPEC, ctx, p, training_on(areas, [name], np.dtype("float32"), bands, p)).metrics
    client = WorkerClient(sys.executable, ROOT)
    client.start()
    preds = []
    try:
        for i, s in enumerate(tests):
            params = {"image": str(s.path), "adapter": adapter, "out_dir": str(work / f"{adapter}-{i}")}
            handle = client.run_job("objects.segment", params)
            if not handle.succeeded:
                raise RuntimeError(handle.outcome)
            mask = next(o["path"] for o in handle.outcome["outputs"] if o["key"] == "mask")
            with warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"), rasterio.open(mask) as m:
                full = m.read(1)
            preds.append((full[s.window] if s.window else full).astype(np.uint8))
    finally:
        client.shutdown()
    return preds, {"trainable_parameters": trained["trainable_parameters"], "val_miou": trained["val_miou"]}


def run_group(data: Path, group: str, args: argparse.Namespace, work: Path) -> dict:
    train, tests, name = load(data, group)
    print(f"{group}: {len(train)} training image(s), {len(tests)} held out ({name})")
    rows = {}
    methods = [*args.methods, *(["weft_vitl"] if args.vitl else [])]
    budget = args.steps * args.batch * args.patch * args.patch
    for method in methods:
        if method == "unet" and (missing := unet_unavailable()):
            print(f"  {method:<10} not run: {missing}")
            rows[method] = {"skipped": missing}
            continue
        started = time.monotonic()
        if method == "rf":
            preds, extra = random_forest(train, tests, min(budget, 200_000))
        elif method == "unet":
            preds, extra = unet(train, tests, args)
        else:
            backbone = "uniperceiver_vit_l" if method == "weft_vitl" else "mobile_sam"
            head = "fpn" if method == "weft_fpn" else "mask2former"
            preds, extra = weft(train, tests, group, backbone, head, args, work)
        rows[method] = {**score(preds, tests), **extra, "seconds": time.monotonic() - started}
        r = rows[method]
        print(
            f"  {method:<10} IoU {r['iou']:.3f}  F1 {r['f1']:.3f}  mIoU {r['miou']:.3f}  object F1 {r['object_f1']:.3f}"
            f" ({r['objects_matched']}/{r['objects_reference']} found, {r['objects_predicted']} predicted)"
            f"  {r['seconds']:.0f} s"
        )
    return {"train": len(train), "held_out": len(tests), "class": name, "methods": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--groups", nargs="+", default=["spacenet4", *(f"nwpu_{c}" for c in NWPU_CLASSES[:3])])
    parser.add_argument("--steps", type=int, default=60, help="optimisation steps of the deep methods")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--vitl", action="store_true", help="also WEFT on the (random) Uni-Perceiver ViT-L")
    parser.add_argument(
        "--methods", nargs="+", default=["rf", "unet", "weft", "weft_fpn"], choices=["rf", "unet", "weft", "weft_fpn"]
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.getLogger("backend").propagate = False
    from bench.machine import machine_record

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RS_PEFT_QGIS_ADAPTER_DIR"] = str(Path(tmp) / "adapters")  # not the user's library
        groups = {g: run_group(args.data, g, args, Path(tmp)) for g in args.groups}
    record = {
        **machine_record("cpu", load_at_start),
        "settings": vars(args) | {"data": str(args.data)},
        "groups": groups,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"eval_objects_{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
