"""FILF (LoRA) against full fine-tuning: step time and peak memory, and change.detect throughput.

Training: the same FILF model and input trained two ways, each in a fresh process so its peak memory is its
own: PEFT (as built: only LoRA and the decoder train) and full fine-tuning (every parameter trains). A step
is the recipe's forward + loss + backward + Adam step (change.finetune defaults: lr 2.8e-4, class-balanced loss).
Detection: the real change.detect job on a georeferenced pair (default: the bundled 1024² LEVIR-CD test_1)
with an adapter saved first into a temporary library. The encoder has random weights (cost depends on the
architecture, not on the checkpoint).
--dtype sets the training autocast; change.detect uses its own (bf16 autocast on CUDA, fp32 on CPU).
Peak memory and the figures that explain it: bench/training_cost.py.
Goal: PEFT needs at most 50% of full fine-tuning's peak memory.

    python -m bench.change [--backbone mobile_sam] [--patch 256] [--batch 8] [--device auto|cpu|cuda]
                           [--dtype fp32|bf16] [--steps 2] [--seconds 0] [--detect-batch 4] [--detect-tile N]
                           [--before A.tif --after B.tif]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from backend import adapters, weights
from backend.adapters import AdapterMeta
from backend.jobs import JOBS
from backend.methods.filf import SPEC as FILF
from backend.methods.filf import build_filf
from backend.methods.filf.training import change_loss
from backend.methods.spec import RANDOM_BACKBONE_SEED
from bench import training_cost
from bench.machine import machine_record
from bench.training_cost import MB, host_memory_mb, measure_steps, print_training_table, sync

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LEVIR = ROOT / "tests" / "data" / "levir_cd"
ADAPTER = "bench_change"
GOAL = 0.5  # PEFT peak memory / full fine-tuning peak memory
DETECT_GOAL = 0.5  # change.detect throughput / two bare encoder forwards' throughput at its tile size


def measure_training(
    backbone: str,
    full: bool,
    patch: int,
    batch: int,
    device: str,
    dtype: str,
    steps: int,
    seconds: float,
    rank: int,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """One training configuration: s/step, peak and baseline memory, parameter counts, saved activations."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    model = build_filf(backbone, rank=rank).to(device).train()
    if full:
        model.requires_grad_(True)
    if checkpointing:
        model.enable_activation_checkpointing()
    finetune = JOBS["change.finetune"]
    lr, balance = finetune.param("lr").default, finetune.param("balance_classes").default
    x1, x2 = (torch.randn(batch, 3, patch, patch, device=device) for _ in range(2))
    label = torch.randint(0, 2, (batch, patch, patch), dtype=torch.uint8, device=device)
    mode = "full" if full else "peft+ckpt" if checkpointing else "peft"
    return measure_steps(
        model, lambda: change_loss(model(x1, x2).float(), label, balance), mode, lr, device, dtype, steps, seconds
    )


def measure_detection(before: str, after: str, tile: int, batch: int, device: str, out_dir: str) -> dict[str, Any]:
    """The change.detect job with the library adapter ADAPTER: wall time, megapixels per second, peak memory."""
    import rasterio

    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.base import run_job

    spec = JOBS["change.detect"]
    params = {"before": before, "after": after, "adapter": ADAPTER, "out_dir": out_dir}
    params |= {"tile_size": tile, "batch_size": batch, "device": device}
    t0 = time.perf_counter()
    result = run_job(spec, spec.validate(params), JobContext())
    wall = time.perf_counter() - t0
    with rasterio.open(result.outputs[0].path) as prob:
        megapixels = prob.width * prob.height / 1e6
    return {
        "tile": result.metrics["tile"],
        "overlap": result.metrics["overlap"],
        "wall_s": wall,
        "megapixels": megapixels,
        "mp_per_s": megapixels / wall,
        "polygons": result.metrics.get("polygons"),
        "peak_mb": torch.cuda.max_memory_allocated() / MB if device == "cuda" else host_memory_mb("VmHWM"),
        "host_peak_mb": host_memory_mb("VmHWM"),
    }


def measure_swap(before: str, after: str, tile: int, batch: int, device: str, out_dir: str) -> dict[str, Any]:
    """Two change.detect jobs in one process (as in the worker), the second with another adapter of the same
    backbone: the first builds the model (reading the checkpoint), the second only swaps the adapter in."""
    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.base import run_job

    state, meta = adapters.load(ADAPTER)
    adapters.save(ADAPTER + "_2", state, meta, overwrite=True)
    spec = JOBS["change.detect"]
    walls = []
    for i, adapter in enumerate((ADAPTER, ADAPTER + "_2")):
        params = {"before": before, "after": after, "adapter": adapter, "out_dir": f"{out_dir}/swap{i}"}
        t0 = time.perf_counter()
        run_job(spec, spec.validate(params | {"tile_size": tile, "batch_size": batch, "device": device}), JobContext())
        walls.append(time.perf_counter() - t0)
    return {"first_s": walls[0], "next_s": walls[1], "pair": [before, after]}


def measure_encoder(backbone: str, tile: int, batch: int, device: str) -> dict[str, Any]:
    """Two bare encoder forwards (both dates) per tile, batched as change.detect batches tiles: megapixels of
    scene per second if nothing but the encoder ran and no tile overlapped (change.detect's ceiling)."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    model = FILF.build(backbone, {"rank": 8}, 3, {}).to(device).eval()
    x = torch.randn(2 * batch, 3, tile, tile, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model.backbone(x)  # warm-up
        sync(device)
        t0, runs = time.perf_counter(), 0
        while runs < 3 or time.perf_counter() - t0 < 5:
            model.backbone(x)
            sync(device)
            runs += 1
    seconds = (time.perf_counter() - t0) / runs
    return {"s_per_batch": seconds, "mp_per_s": batch * tile * tile / 1e6 / seconds}


def save_adapter(backbone: str, rank: int, patch: int) -> dict[str, Any]:
    """An adapter as change.finetune saves it for a random encoder (detect rebuilds it from the same seed)."""
    entry = weights.load_registry().get(backbone)
    norm = {k: entry.input[k] for k in ("mean", "std")} if entry else {"mean": [127.5] * 3, "std": [64.0] * 3}
    meta = AdapterMeta(
        method=FILF.name,
        backbone=backbone,
        checkpoint_sha256=None,
        bands=[1, 2, 3],
        normalization=norm,
        classes=["no change", "change"],
        config={"rank": rank, "patch_size": patch, "random_backbone_seed": RANDOM_BACKBONE_SEED},
    )
    model = FILF.build(backbone, meta.config, 3, {})
    folder = adapters.save(ADAPTER, model.adapter_state_dict(), meta, overwrite=True)
    return {"adapter_path": str(folder)}


def child(payload: str) -> None:
    """Entry point of a child process: runs one measurement (or saves the adapter) and prints its record as JSON."""
    kind, kwargs = json.loads(payload)
    measure = {
        "train": measure_training,
        "adapter": save_adapter,
        "detect": measure_detection,
        "swap": measure_swap,
        "encoder": measure_encoder,
    }[kind]
    print(json.dumps(measure(**kwargs)))


def run_child(kind: str, kwargs: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    return training_cost.run_child("bench.change", kind, kwargs, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobile_sam", choices=list(FILF.backbones))
    parser.add_argument("--patch", type=int, default=256, help="training patch size")
    parser.add_argument("--batch", type=int, default=8, help="training pairs per step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, else fp32")
    parser.add_argument("--steps", type=int, default=2, help="minimum timed steps (after one warm-up step)")
    parser.add_argument("--seconds", type=float, default=0.0, help="minimum timed duration per training mode")
    parser.add_argument("--detect-batch", type=int, default=4, help="tiles per forward pass in change.detect")
    parser.add_argument("--detect-tile", type=int, default=None, help="change.detect's tile (default: the job's)")
    parser.add_argument("--before", type=Path, default=LEVIR / "test_1_A.tif")
    parser.add_argument("--after", type=Path, default=LEVIR / "test_1_B.tif")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()  # the CPU timings are only as good as the machine is quiet
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    train_args = {"backbone": args.backbone, "patch": args.patch, "batch": args.batch, "device": device}
    train_args |= {"dtype": dtype, "steps": args.steps, "seconds": args.seconds, "rank": args.rank}
    peft, peft_ckpt, full = (
        run_child("train", train_args | {"full": f, "checkpointing": c})
        for f, c in ((False, False), (False, True), (True, False))
    )

    work = Path(tempfile.mkdtemp(prefix="rs-peft-bench-"))
    env = os.environ | {"RS_PEFT_QGIS_DATA_DIR": str(work / "data")}  # a temporary adapter library
    det_args = {"before": str(args.before.resolve()), "after": str(args.after.resolve()), "tile": args.detect_tile}
    det_args |= {"batch": args.detect_batch, "device": device, "out_dir": str(work / "out")}
    try:
        run_child("adapter", {"backbone": args.backbone, "rank": args.rank, "patch": args.patch}, env)
        detect = run_child("detect", det_args, env)
        enc_args = {"backbone": args.backbone, "tile": detect["tile"], "batch": args.detect_batch, "device": device}
        encoder = run_child("encoder", enc_args)
        small = LEVIR / "test_2_0000_0000"
        swap = run_child("swap", det_args | {"before": f"{small}_A.tif", "after": f"{small}_B.tif"}, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    where = "GPU max allocated" if device == "cuda" else "process VmHWM"
    print(
        f"FILF on {args.backbone} (random weights), {args.batch} pairs of {args.patch}², {device} {dtype}, "
        f"rank {args.rank}; peak memory = {where}"
    )
    table = print_training_table([peft, peft_ckpt], full)
    ratios, ratios_ckpt = table["peft"], table["peft+ckpt"]
    goal_met = min(ratios["peak_mb"], ratios_ckpt["peak_mb"]) <= GOAL
    print(
        f"goal (PEFT peak memory <= {GOAL:.0%} of full fine-tuning's): {'met' if goal_met else 'NOT met'} "
        f"(plain LoRA {ratios['peak_mb']:.0%}, with activation checkpointing {ratios_ckpt['peak_mb']:.0%})"
    )
    detect_ratio = detect["mp_per_s"] / encoder["mp_per_s"]
    print(
        f"change.detect on {args.before.name} ({detect['megapixels']:.2f} MP, tile {detect['tile']} overlapping by "
        f"{detect['overlap']}, batch {args.detect_batch}, {'bf16' if device == 'cuda' else 'fp32'}): "
        f"{detect['wall_s']:.1f} s, {detect['mp_per_s']:.3f} MP/s, peak {detect['peak_mb']:.0f} MB, "
        f"{detect['polygons']} polygons"
    )
    print(
        f"two bare encoder forwards at tile {detect['tile']}: {encoder['mp_per_s']:.3f} MP/s; change.detect reaches "
        f"{detect_ratio:.0%} of it (goal >= {DETECT_GOAL:.0%}: {'met' if detect_ratio >= DETECT_GOAL else 'NOT met'})"
    )
    print(
        f"change.detect on a 256² pair in one process: first job {swap['first_s']:.2f} s (builds the model), "
        f"next job with another adapter {swap['next_s']:.2f} s (swaps the adapter in)"
    )
    out = {
        "benchmark": "change (FILF PEFT vs full fine-tuning, change.detect)",
        **machine_record(device, load_at_start),
        "weights": "random",
        "settings": {
            "backbone": args.backbone,
            "patch": args.patch,
            "batch": args.batch,
            "rank": args.rank,
            "device": device,
            "dtype": dtype,
            "lr": JOBS["change.finetune"].param("lr").default,
            "balance_classes": JOBS["change.finetune"].param("balance_classes").default,
            "detect_batch": args.detect_batch,
            "detect_dtype": "bf16" if device == "cuda" else "fp32",
            "detect_pair": [str(args.before), str(args.after)],
            "peak_memory": where,
        },
        "peft": peft,
        "peft_checkpointing": peft_ckpt,
        "full": full,
        "ratios_peft_over_full": ratios,
        "ratios_peft_checkpointing_over_full": ratios_ckpt,
        "goal": f"PEFT peak memory <= {GOAL:.0%} of full fine-tuning's",
        "goal_met": goal_met,
        "detect": detect,
        "encoder_two_dates": encoder,
        "detect_over_encoder": detect_ratio,
        "detect_goal": f"change.detect >= {DETECT_GOAL:.0%} of two bare encoder forwards per megapixel",
        "detect_goal_met": detect_ratio >= DETECT_GOAL,
        "adapter_swap": swap,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"change_{device}_{dtype}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
