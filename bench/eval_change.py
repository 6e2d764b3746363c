"""Held-out evaluation of FILF against change-vector analysis on real change pairs.

For each dataset group, FILF is fine-tuned on the training pairs (whole pairs held out for
validation inside the training set), then `change.detect` and `change.cva` run on the held-out
pairs; precision/recall/F1/IoU come from one confusion matrix summed over the held-out pairs.

The frozen encoder uses the official checkpoint when it is installed (`python -m backend models
fetch mobile_sam`); otherwise it is randomly initialised and the output says so.

    python -m bench.eval_change [--data ../shared/data] [--groups levir256 levir1024 dsifn]
                                [--epochs 10 --steps 8 --batch 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from rasterio.errors import NotGeoreferencedWarning

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

CD = "change_detection"
# group -> (folder, image suffix, training pairs, held-out pairs)
GROUPS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "levir256": (
        f"{CD}/levir_cd_bitcd",
        ".png",
        [
            "train_36_0512_0512",
            "train_386_0512_0768",
            "train_412_0512_0768",
            "val_27_0000_0256",
            "test_2_0000_0000",
            "test_2_0000_0512",
            "test_7_0256_0512",
        ],
        ["test_55_0256_0000", "test_77_0512_0256", "test_102_0512_0000", "test_121_0768_0256"],
    ),
    "levir1024": (f"{CD}/levir_cd_1024_ttp", ".png", ["test_1", "test_2", "test_3"], ["test_4", "test_5"]),
    "dsifn": (f"{CD}/dsifn_changeformer", ".png", [], []),  # pairs listed from the folder below
}


def pairs(data: Path, group: str) -> tuple[Path, str, list[str], list[str]]:
    folder, suffix, train, held = GROUPS[group]
    root = data / folder
    if not train:  # DSIFN: the first 7 pairs train, the last 3 are held out
        names = sorted(p.stem for p in (root / "A").glob(f"*{suffix}"))
        train, held = names[:7], names[7:]
    return root, suffix, train, held


def scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    from backend.metrics.change import BinaryConfusion

    return BinaryConfusion(tp, fp, fn, tn).metrics()


def run_group(data: Path, group: str, args: argparse.Namespace, work: Path) -> dict:
    from backend.context import JobContext
    from backend.io.raster import RasterSource
    from backend.jobs import JOBS
    from backend.jobs.base import run_job
    from backend.jobs.finetune import train_and_save
    from backend.methods.filf import SPEC as FILF
    from backend.methods.filf.spec import training_on
    from backend.training.change_data import load_training_area

    root, suffix, train, held = pairs(data, group)

    def files(name: str) -> tuple[str, str, str]:
        return tuple(str(root / part / f"{name}{suffix}") for part in ("A", "B", "label"))  # type: ignore[return-value]

    ctx = JobContext(on_log=lambda level, msg, data=None: print(f"  [{group}] {msg}", file=sys.stderr))
    areas = [load_training_area(*files(n), warnings=ctx.warnings, require_change=False) for n in train]
    with RasterSource(files(train[0])[0]) as src:
        dtype, bands = src.dtype, src.bands
    spec = JOBS["change.finetune"]
    before, after, labels = files(train[0])
    p = spec.validate(
        {
            "before": before,
            "after": after,
            "labels": labels,
            "adapter_name": f"eval-{group}",
            "backbone": args.backbone,
            "allow_random_backbone": True,
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "batch_size": args.batch,
            "patch_size": args.patch,
            "patience": args.epochs,
            "encoder_scale": args.encoder_scale,
            "lr": args.lr,
            "balance_classes": args.balance == "on",
            "schedule": args.schedule,
            "fourier_init": args.fourier_init,
            "choose_threshold": args.threshold == "choose",
            "overwrite": True,
        }
    )
    # The job takes one pair; several labelled pairs go through the same training core.
    result = train_and_save(FILF, ctx, p, training_on(areas, dtype, bands, p))
    random_backbone = any("randomly initialised" in w for w in ctx.warnings)
    runs = []
    for i, tiling in enumerate(args.detect_tilings):  # "auto": the job's default tile or overlap
        tile, overlap = (None if v == "auto" else int(v) for v in tiling.split(":"))
        extra = {"adapter": f"eval-{group}", "tile_size": tile, "overlap": overlap}
        runs.append(("filf" if i == 0 else f"filf@{tiling}", "change.detect", extra))
    runs.append(("cva", "change.cva", {}))
    totals = {method: np.zeros(4, np.int64) for method, _, _ in runs}
    seconds = dict.fromkeys(totals, 0.0)
    for name in held:
        before, after, label = files(name)
        for method, job, extra in runs:
            jspec = JOBS[job]
            params = jspec.validate(
                {
                    "before": before,
                    "after": after,
                    "reference": label,
                    "out_dir": str(work / group / method / name),
                    **extra,
                }
            )
            started = time.monotonic()
            m = run_job(jspec, params, JobContext()).metrics
            seconds[method] += time.monotonic() - started
            totals[method] += np.array([m["tp"], m["fp"], m["fn"], m["tn"]])
    rows = {}
    for method, (tp, fp, fn, tn) in totals.items():
        rows[method] = scores(int(tp), int(fp), int(fn), int(tn)) | {"seconds": seconds[method]}
    return {
        "group": group,
        "train_pairs": train,
        "held_out_pairs": held,
        "backbone": args.backbone,
        "random_backbone": random_backbone,
        "best_epoch": result.metrics["best_epoch"],
        "val_f1": result.metrics["val_f1"],
        "threshold": result.metrics["val_threshold"],
        "finetune_seconds": result.metrics["finetune_seconds"],
        "trainable_parameters": result.metrics["trainable_parameters"],
        **rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--backbone", default="mobile_sam")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--encoder-scale", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--balance", choices=("on", "off"), default="on")
    parser.add_argument("--schedule", choices=("cosine", "official"), default="cosine")
    parser.add_argument("--fourier-init", choices=("kaiming", "official"), default="kaiming")
    parser.add_argument("--threshold", choices=("choose", "fixed"), default="choose")
    parser.add_argument(
        "--detect-tilings",
        nargs="+",
        default=["auto:auto", "256:64"],
        help="change.detect tile:overlap settings to score (auto: the job's default)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("backend").addHandler(logging.NullHandler())  # messages arrive via the job context
    logging.getLogger("backend").propagate = False
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)  # the dataset PNGs have no CRS
    with tempfile.TemporaryDirectory(prefix="rs-peft-eval-") as tmp:
        os.environ.setdefault("RS_PEFT_QGIS_DATA_DIR", str(Path(tmp) / "library"))
        records = [run_group(args.data, g, args, Path(tmp)) for g in args.groups]
    print(f"{'group':<10} {'method':<12} {'precision':>9} {'recall':>7} {'F1':>6} {'IoU':>6}  encoder")
    for r in records:
        enc = f"{r['backbone']} ({'random frozen weights' if r['random_backbone'] else 'official weights'})"
        for method in [k for k in r if k.startswith("filf")] + ["cva"]:
            m = r[method]
            print(
                f"{r['group']:<10} {method:<12} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} {m['iou']:6.3f}"
                f"  {enc if method == 'filf' else ''}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "eval_change",
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "settings": vars(args) | {"data": str(args.data)},
        "records": records,
    }
    (RESULTS / "eval_change.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
