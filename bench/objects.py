"""WEFT's costs: objects.segment throughput, and fine-tuning step time and peak memory against full fine-tuning.

Segment: the real objects.segment job (tiles of 512 overlapping by 64, the job's defaults) on the SpaceNet-4
panchromatic scene bundled with the tests (900², grey as RGB), with an adapter saved first into a temporary
library, per backbone; for the Uni-Perceiver ViT-L also one bare 512² tile through the model when the whole
scene would take too long on a CPU (--vitl-scene to run the job anyway). Training: the same WEFT model and input
trained three ways, each in a fresh process so its peak memory is its own — PEFT as built (the backbone frozen),
PEFT with activation checkpointing of the frozen blocks, and full fine-tuning (every parameter trains) — with the
head's own loss (Mask2Former's set loss by default) and objects.finetune's default learning rate.
Backbones have random weights: cost depends on the architecture, not on the checkpoint.
Peak memory and the figures that explain it: bench/training_cost.py.
Goal: PEFT needs at most 35% of full fine-tuning's peak memory.

    python -m bench.objects [--train-backbone uniperceiver_vit_l] [--segment-backbones vit_tiny mobile_sam …]
                            [--head mask2former|fpn] [--patch 256] [--batch 2] [--device auto|cpu|cuda]
                            [--dtype fp32|bf16] [--steps 1] [--seconds 0] [--segment-batch 4] [--vitl-scene]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from backend import adapters
from backend.adapters import AdapterMeta
from backend.jobs import JOBS
from backend.methods.spec import RANDOM_BACKBONE_SEED
from backend.methods.weft import SPEC as WEFT_SPEC
from bench import training_cost
from bench.machine import machine_record
from bench.training_cost import measure_apply_job, measure_forward, measure_steps, print_training_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCENE = ROOT / "tests" / "data" / "spacenet4" / "pan.tif"
GOAL = 0.35  # PEFT peak memory / full fine-tuning peak memory (the goal)
VITL = "uniperceiver_vit_l"


def config(head: str, patch: int) -> dict[str, Any]:
    return {"num_classes": 2, "drop_path": 0.0, "head": head, "patch_size": patch}


def measure_training(
    backbone: str, mode: str, head: str, patch: int, batch: int, device: str, dtype: str, steps: int, seconds: float
) -> dict[str, Any]:
    """One training configuration (`mode` peft, peft+ckpt or full) of WEFT on `backbone`."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    model = WEFT_SPEC.build(backbone, config(head, patch), 3, {}).to(device).train()
    if mode == "full":
        model.requires_grad_(True)
    if mode == "peft+ckpt":
        model.enable_activation_checkpointing()
    x = torch.randn(batch, 3, patch, patch, device=device)
    label = torch.zeros(batch, patch, patch, dtype=torch.uint8, device=device)
    label[:, patch // 4 : patch // 2, patch // 4 : 3 * patch // 4] = 1  # an object in every patch
    lr = JOBS["objects.finetune"].param("lr").default
    return measure_steps(model, lambda: model.loss(x, label), mode, lr, device, dtype, steps, seconds)


def save_adapter(backbone: str, head: str, patch: int, name: str) -> dict[str, Any]:
    """An adapter as objects.finetune saves it for a random backbone (segment rebuilds it from the same seed)."""
    meta = AdapterMeta(
        method=WEFT_SPEC.name,
        backbone=backbone,
        checkpoint_sha256=None,
        bands=[1, 1, 1],  # the panchromatic band as grey RGB
        normalization={"mean": [300.0] * 3, "std": [150.0] * 3},
        classes=["background", "building"],
        config=config(head, patch) | {"random_backbone_seed": RANDOM_BACKBONE_SEED},
    )
    model = WEFT_SPEC.build(backbone, meta.config, 3, {})
    adapters.save(name, model.adapter_state_dict(), meta, overwrite=True)
    return {"adapter": name}


def measure_segment(image: str, adapter: str, batch: int, device: str, out_dir: str) -> dict[str, Any]:
    """The objects.segment job: wall time, megapixels per second, peak memory."""
    params = {"adapter": adapter, "out_dir": out_dir, "batch_size": batch}
    return measure_apply_job("objects.segment", params, image, device)


def measure_tile(backbone: str, head: str, tile: int, batch: int, device: str) -> dict[str, Any]:
    """Bare forwards of `batch` tiles through WEFT."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    model = WEFT_SPEC.build(backbone, config(head, tile), 3, {})
    return measure_forward(model, torch.randn(batch, 3, tile, tile, device=device), device)


def child(payload: str) -> None:
    """Entry point of a child process: runs one measurement and prints its record as JSON."""
    kind, kwargs = json.loads(payload)
    measure = {"train": measure_training, "adapter": save_adapter, "segment": measure_segment, "tile": measure_tile}
    print(json.dumps(measure[kind](**kwargs)))


def run_child(kind: str, kwargs: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    return training_cost.run_child("bench.objects", kind, kwargs, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-backbone", default=VITL, choices=list(WEFT_SPEC.backbones))
    parser.add_argument("--segment-backbones", nargs="*", default=["vit_tiny", "mobile_sam", VITL])
    parser.add_argument("--head", default="mask2former", choices=["mask2former", "fpn"])
    parser.add_argument("--patch", type=int, default=256, help="training patch size")
    parser.add_argument("--batch", type=int, default=2, help="training patches per step")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, else fp32")
    parser.add_argument("--steps", type=int, default=1, help="minimum timed steps (after one warm-up step)")
    parser.add_argument("--seconds", type=float, default=0.0, help="minimum timed duration per training mode")
    parser.add_argument("--segment-batch", type=int, default=4, help="tiles per forward pass in objects.segment")
    parser.add_argument("--vitl-scene", action="store_true", help="run objects.segment on the ViT-L on a CPU too")
    parser.add_argument("--image", type=Path, default=SCENE)
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")

    train_args = {"backbone": args.train_backbone, "head": args.head, "patch": args.patch, "batch": args.batch}
    train_args |= {"device": device, "dtype": dtype, "steps": args.steps, "seconds": args.seconds}
    peft, peft_ckpt, full = (run_child("train", train_args | {"mode": m}) for m in ("peft", "peft+ckpt", "full"))
    where = "GPU max allocated" if device == "cuda" else "process VmHWM"
    print(
        f"WEFT ({args.head} head) on {args.train_backbone} (random weights), {args.batch} patches of {args.patch}², "
        f"{device} {dtype}; peak memory = {where}"
    )
    ratios = print_training_table([peft, peft_ckpt], full)
    best = min(r["peak_mb"] for r in ratios.values())
    print(f"goal (PEFT peak memory <= {GOAL:.0%} of full fine-tuning's): {'met' if best <= GOAL else 'NOT met'}")

    work = Path(tempfile.mkdtemp(prefix="rs-peft-bench-"))
    env = os.environ | {"RS_PEFT_QGIS_DATA_DIR": str(work / "data")}  # a temporary adapter library
    segment: dict[str, Any] = {}
    try:
        for backbone in args.segment_backbones:
            if backbone == VITL and device == "cpu" and not args.vitl_scene:
                segment[backbone] = {
                    "one_tile": run_child(
                        "tile", {"backbone": backbone, "head": args.head, "tile": 512, "batch": 1, "device": device}
                    )
                }
                r = segment[backbone]["one_tile"]
                print(f"{backbone}: one 512² tile {r['s_per_batch']:.1f} s, {r['mp_per_s']:.4f} MP/s (bare model)")
                continue
            name = f"bench-objects-{backbone}"
            run_child("adapter", {"backbone": backbone, "head": args.head, "patch": args.patch, "name": name}, env)
            seg_args = {"image": str(args.image.resolve()), "adapter": name, "batch": args.segment_batch}
            r = run_child("segment", seg_args | {"device": device, "out_dir": str(work / name)}, env)
            segment[backbone] = r
            print(
                f"objects.segment {backbone} on {args.image.name} ({r['megapixels']:.2f} MP, batch "
                f"{args.segment_batch}, {'bf16' if device == 'cuda' else 'fp32'}): {r['wall_s']:.1f} s, "
                f"{r['mp_per_s']:.3f} MP/s, peak {r['peak_mb']:.0f} MB"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "benchmark": "objects (WEFT PEFT vs full fine-tuning, objects.segment)",
        **machine_record(device, load_at_start),
        "weights": "random",
        "settings": vars(args) | {"image": str(args.image), "device": device, "dtype": dtype, "peak_memory": where},
        "peft": peft,
        "peft_checkpointing": peft_ckpt,
        "full": full,
        "ratios_over_full": ratios,
        "goal": f"PEFT peak memory <= {GOAL:.0%} of full fine-tuning's",
        "goal_met": best <= GOAL,
        "segment": segment,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"objects_{device}_{dtype}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
