"""SpectralX's costs: landcover.map throughput, and stage-1 / stage-2 step time and peak memory against full
fine-tuning.

Map: the real landcover.map job (tiles of the encoder's input size, a quarter overlap) on the Landsat-7 tile
bundled with the tests (256², 6 bands) with a Sentinel-2 adapter saved first into a temporary library (so the
bands are resampled, as across sensors), per backbone; for the Scale-MAE ViT-L on a CPU, one bare batch of 224²
tiles through the model (--vitl-scene to run the job anyway). Training: the same SpectralX model and input (6
bands) trained three ways per stage, each in a fresh process so its peak memory is its own — PEFT as built,
PEFT with activation checkpointing of the frozen blocks, and full fine-tuning (every parameter trains, HyperT's
core and the ViT included) — with the stage's own loss (masked reconstruction, or cross-entropy).
Backbones have random weights: cost depends on the architecture, not on the checkpoint.
Goal: PEFT needs at most 35% of full fine-tuning's peak memory. `--compact-decoder` measures stage 2 with the
narrow UPerNet (landcover.finetune's compact_decoder), in all three modes.

    python -m bench.landcover [--train-backbone scalemae_vit_l] [--map-backbones scalemae_tiny scalemae_vit_l]
                              [--batch 4] [--device auto|cpu|cuda] [--dtype fp32|bf16] [--steps 1] [--seconds 0]
                              [--map-batch 4] [--vitl-scene] [--stages adapt segment] [--compact-decoder]
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
from backend.io.wavelengths import SENSORS
from backend.jobs import JOBS
from backend.methods.spec import RANDOM_BACKBONE_SEED
from backend.methods.spectralx import SPEC
from backend.methods.spectralx.spec import patch_size
from bench import training_cost
from bench.machine import machine_record
from bench.training_cost import measure_apply_job, measure_forward, measure_steps, print_training_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCENE = ROOT / "tests" / "data" / "ukis" / "landsat7.tif"
GOAL = 0.35
VITL = "scalemae_vit_l"
WAVELENGTHS = list(SENSORS["sentinel2_6"][1])


def config(backbone: str, stage: str, compact_decoder: bool = False) -> dict[str, Any]:
    return {
        "compact_decoder": compact_decoder,
        "stage": stage,
        "wavelengths": WAVELENGTHS,
        "num_classes": 5,
        "hypert_trainable": False,
        "log_space": True,
        "patch_size": patch_size(backbone),
    }


def measure_training(
    backbone: str,
    stage: str,
    mode: str,
    batch: int,
    device: str,
    dtype: str,
    steps: int,
    seconds: float,
    compact_decoder: bool = False,
) -> dict[str, Any]:
    """One training configuration (`mode` peft, peft+ckpt or full) of SpectralX's `stage` on `backbone`."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    model = SPEC.build(backbone, config(backbone, stage, compact_decoder), 6, {}).to(device).train()
    if mode == "full":
        model.requires_grad_(True)
    if mode == "peft+ckpt":
        model.enable_activation_checkpointing()
    size = model.size
    x = torch.randn(batch, 6, size, size, device=device)
    label = torch.randint(1, 5, (batch, size, size), dtype=torch.uint8, device=device)
    lr = JOBS["landcover.finetune"].param("lr").default

    def loss() -> torch.Tensor:
        return model.reconstruction_loss(x) if stage == "adapt" else model.segmentation_loss(x, label)

    return measure_steps(model, loss, f"{stage} {mode}", lr, device, dtype, steps, seconds)


def save_adapter(backbone: str, name: str) -> dict[str, Any]:
    """A stage-2 adapter as landcover.finetune saves it for a random backbone (map rebuilds it from the seed)."""
    meta = AdapterMeta(
        method=SPEC.name,
        backbone=backbone,
        checkpoint_sha256=None,
        bands=[1, 2, 3, 4, 5, 6],
        normalization={"mean": [0.2] * 6, "std": [0.1] * 6},
        classes=["unlabelled", "clear", "water", "cloud", "shadow"],
        config=config(backbone, "segment") | {"random_backbone_seed": RANDOM_BACKBONE_SEED},
    )
    model = SPEC.build(backbone, meta.config, 6, {})
    adapters.save(name, model.adapter_state_dict(), meta, overwrite=True)
    return {"adapter": name}


def measure_map(image: str, adapter: str, batch: int, device: str, out_dir: str) -> dict[str, Any]:
    """The landcover.map job (the Landsat-7 tile, named by its sensor): wall time, megapixels per second, peak
    memory."""
    params = {"adapter": adapter, "out_dir": out_dir, "batch_size": batch, "sensor": "landsat7"}
    return measure_apply_job("landcover.map", params, image, device)


def measure_tile(backbone: str, batch: int, device: str) -> dict[str, Any]:
    """Bare forwards of `batch` tiles of the encoder's input size through SpectralX."""
    torch.manual_seed(RANDOM_BACKBONE_SEED)
    model = SPEC.build(backbone, config(backbone, "segment"), 6, {})
    return measure_forward(model, torch.randn(batch, 6, model.size, model.size, device=device), device)


def child(payload: str) -> None:
    """Entry point of a child process: runs one measurement and prints its record as JSON."""
    kind, kwargs = json.loads(payload)
    measure = {"train": measure_training, "adapter": save_adapter, "map": measure_map, "tile": measure_tile}
    print(json.dumps(measure[kind](**kwargs)))


def run_child(kind: str, kwargs: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    return training_cost.run_child("bench.landcover", kind, kwargs, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-backbone", default=VITL, choices=list(SPEC.backbones))
    parser.add_argument("--map-backbones", nargs="*", default=["scalemae_tiny", VITL])
    parser.add_argument("--batch", type=int, default=4, help="training patches per step")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, else fp32")
    parser.add_argument("--steps", type=int, default=1, help="minimum timed steps (after one warm-up step)")
    parser.add_argument("--seconds", type=float, default=0.0, help="minimum timed duration per training mode")
    parser.add_argument("--map-batch", type=int, default=4, help="tiles per forward pass in landcover.map")
    parser.add_argument("--vitl-scene", action="store_true", help="run landcover.map on the ViT-L on a CPU too")
    parser.add_argument("--image", type=Path, default=SCENE)
    parser.add_argument("--stages", nargs="+", default=["adapt", "segment"], choices=["adapt", "segment"])
    parser.add_argument("--compact-decoder", action="store_true", help="stage 2 with the compact UPerNet")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    where = "GPU max allocated" if device == "cuda" else "process VmHWM"

    training: dict[str, Any] = {}
    goal_met = True
    for stage in args.stages:
        train_args = {"backbone": args.train_backbone, "stage": stage, "batch": args.batch, "device": device}
        train_args |= {"dtype": dtype, "steps": args.steps, "seconds": args.seconds}
        train_args |= {"compact_decoder": args.compact_decoder and stage == "segment"}
        peft, ckpt, full = (run_child("train", train_args | {"mode": m}) for m in ("peft", "peft+ckpt", "full"))
        size = patch_size(args.train_backbone)
        decoder = ", compact decoder" if train_args["compact_decoder"] else ""
        print(
            f"SpectralX stage '{stage}' on {args.train_backbone} (random weights{decoder}), {args.batch} patches of "
            f"{size}² × 6 bands, {device} {dtype}; peak memory = {where}"
        )
        ratios = print_training_table([peft, ckpt], full)
        best = min(r["peak_mb"] for r in ratios.values())
        goal_met &= best <= GOAL
        print(f"goal (PEFT peak memory <= {GOAL:.0%} of full fine-tuning's): {'met' if best <= GOAL else 'NOT met'}")
        training[stage] = {"peft": peft, "peft_checkpointing": ckpt, "full": full, "ratios_over_full": ratios}

    work = Path(tempfile.mkdtemp(prefix="rs-peft-bench-"))
    env = os.environ | {"RS_PEFT_QGIS_DATA_DIR": str(work / "data")}  # a temporary adapter library
    mapping: dict[str, Any] = {}
    try:
        for backbone in args.map_backbones:
            if backbone == VITL and device == "cpu" and not args.vitl_scene:
                r = run_child("tile", {"backbone": backbone, "batch": args.map_batch, "device": device})
                mapping[backbone] = {"tiles": r}
                print(
                    f"{backbone}: {args.map_batch} tiles of {r['tile']}² in {r['s_per_batch']:.1f} s, "
                    f"{r['mp_per_s']:.4f} MP/s (bare model)"
                )
                continue
            name = f"bench-landcover-{backbone}"
            run_child("adapter", {"backbone": backbone, "name": name}, env)
            map_args = {"image": str(args.image.resolve()), "adapter": name, "batch": args.map_batch}
            r = run_child("map", map_args | {"device": device, "out_dir": str(work / name)}, env)
            mapping[backbone] = r
            print(
                f"landcover.map {backbone} on {args.image.name} ({r['megapixels']:.3f} MP, tiles of {r['tile']}, "
                f"batch {args.map_batch}): {r['wall_s']:.1f} s, {r['mp_per_s']:.3f} MP/s, peak {r['peak_mb']:.0f} MB"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "benchmark": "landcover (SpectralX PEFT vs full fine-tuning per stage, landcover.map)",
        **machine_record(device, load_at_start),
        "weights": "random",
        "settings": vars(args) | {"image": str(args.image), "device": device, "dtype": dtype, "peak_memory": where},
        "training": training,
        "goal": f"PEFT peak memory <= {GOAL:.0%} of full fine-tuning's",
        "goal_met": goal_met,
        "map": mapping,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_compact" if args.compact_decoder else "") + ("" if len(args.stages) == 2 else f"_{args.stages[0]}")
    (RESULTS / f"landcover_{device}_{dtype}{suffix}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
