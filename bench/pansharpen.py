"""PanAdapter speed: megapixels per second of pansharpen.apply and of GDAL-style Brovey on the same scene, and the
fine-tuning step time of each stage.

Apply: the real pansharpen.apply job with an untrained adapter whose best stage is "adapter" (the full model runs:
priors, stem, IPT body with adapters, tail; the cost does not depend on the weights, which are random here).
Brovey: the real pansharpen.classic job, method brovey (GDAL's weighted Brovey formula), on the same pair.
Training: one step is the recipe's forward + loss + backward + Adam step on `--batch` patches of `--patch` PAN
pixels (the code's 4 x 64²), timed after one warm-up step, per stage. On CUDA both jobs and training use bf16
autocast; --dtype fp32 times training without it.

    python -m bench.pansharpen [--backbone ipt|tiny] [--pan P.tif --ms M.tif] [--device auto|cpu|cuda]
                               [--dtype fp32|bf16] [--steps 3] [--tile 256] [--batch 4] [--patch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio
import torch

from backend import adapters
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.methods.panadapter import SPEC as PANADAPTER
from backend.methods.spec import RANDOM_BACKBONE_SEED
from bench.machine import machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data" / "pansharpening" / "spacenet6_solaris"
BUNDLED = ROOT / "tests" / "data" / "pansharpening" / "spacenet6"
ADAPTER = "bench_pansharpen"


def default_pair() -> tuple[Path, Path]:
    """A full SpaceNet-6 tile (600² PAN, ratio 2) when ../shared is there, else the bundled 256² crop."""
    if (SHARED / "pan1.tif").is_file():
        return SHARED / "pan1.tif", SHARED / "ms1.tif"
    return BUNDLED / "pan.tif", BUNDLED / "ms.tif"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(job: str, **params: Any) -> tuple[float, Any]:
    spec = JOBS[job]
    started = time.perf_counter()
    result = run_job(spec, spec.validate(params), JobContext())
    return time.perf_counter() - started, result


def time_steps(backbone: str, bands: int, ratio: int, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Seconds per training step of each stage (autocast as the trainer uses it, or as --dtype asks)."""
    model = PANADAPTER.build(backbone, {"ratio": ratio}, bands, {}).to(device)
    amp = args.dtype == "bf16"
    ms_up = torch.rand(args.batch, bands, args.patch, args.patch, device=device)
    pan = torch.rand(args.batch, 1, args.patch, args.patch, device=device)
    out: dict[str, Any] = {}
    for stage in ("prior", "adapter"):
        model.set_stage(stage)  # type: ignore[arg-type]
        model.train()
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)

        def step(opt: torch.optim.Optimizer = opt) -> None:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                pred = model(ms_up, pan)
            loss = model.loss(pred.float(), ms_up)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up: allocations, cuDNN autotuning
        sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        out[stage] = {
            "s_per_step": (time.perf_counter() - started) / args.steps,
            "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        }
        if device == "cuda":
            out[stage]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    pan_default, ms_default = default_pair()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ipt", choices=list(PANADAPTER.backbones))
    parser.add_argument("--pan", type=Path, default=pan_default)
    parser.add_argument("--ms", type=Path, default=ms_default)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="training; default bf16 on cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per stage")
    parser.add_argument("--batch", type=int, default=4, help="training patches per step")
    parser.add_argument("--patch", type=int, default=64, help="training patch side (PAN pixels)")
    parser.add_argument("--tile", type=int, default=256, help="pansharpen.apply tile size")
    parser.add_argument("--apply-batch", type=int, default=2, help="pansharpen.apply tiles per forward pass")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()  # the CPU timings are only as good as the machine is quiet
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    with rasterio.open(args.pan) as p, rasterio.open(args.ms) as m:
        megapixels, bands, ratio = p.width * p.height / 1e6, m.count, round(m.res[0] / p.res[0])

    work = Path(tempfile.mkdtemp(prefix="rs-peft-bench-"))
    os.environ["RS_PEFT_QGIS_ADAPTER_DIR"] = str(work / "adapters")
    common = {"pan": str(args.pan), "ms": str(args.ms)}
    try:
        model = PANADAPTER.build(args.backbone, {"ratio": ratio}, bands, {})
        meta = AdapterMeta(
            PANADAPTER.name,
            args.backbone,
            None,
            list(range(1, bands + 1)),
            {"pan_scale": [2047.0], "ms_scale": [2047.0]},
            config={"ratio": ratio, "best_stage": "adapter", "random_backbone_seed": RANDOM_BACKBONE_SEED},
        )
        adapters.save(ADAPTER, model.adapter_state_dict(), meta)
        del model
        brovey_s, _ = run("pansharpen.classic", **common, out_dir=str(work / "brovey"), method="brovey")
        apply_params = {"adapter": ADAPTER, "tile_size": args.tile, "batch_size": args.apply_batch}
        apply_s, _ = run("pansharpen.apply", **common, out_dir=str(work / "apply"), device=device, **apply_params)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = time_steps(args.backbone, bands, ratio, args, device)

    amp = "bf16" if device == "cuda" else "fp32"
    print(
        f"PanAdapter on {args.backbone} (random weights), {args.pan.name}: {megapixels:.2f} MP, {bands} bands,", end=" "
    )
    print(f"ratio {ratio}, {device}")
    print(f"  pansharpen.apply (tile {args.tile}, {amp}): {apply_s:.1f} s, {megapixels / apply_s:.4f} MP/s")
    print(f"  Brovey (pansharpen.classic): {brovey_s:.2f} s, {megapixels / brovey_s:.2f} MP/s")
    for stage, r in steps.items():
        size = f"{args.batch} x {args.patch}², {args.dtype}"
        print(f"  fine-tune step, stage {stage} ({size}): {r['s_per_step']:.3f} s, {r['trainable_params']:,} trainable")
    out = {
        "benchmark": "pansharpen (PanAdapter apply and fine-tune steps, Brovey)",
        **machine_record(device, load_at_start),
        "weights": "random",
        "settings": vars(args) | {"pan": str(args.pan), "ms": str(args.ms), "device": device},
        "scene": {"megapixels": megapixels, "bands": bands, "ratio": ratio},
        "apply": {
            "seconds": apply_s,
            "mp_per_s": megapixels / apply_s,
            "dtype": "bf16" if device == "cuda" else "fp32",
        },
        "brovey": {"seconds": brovey_s, "mp_per_s": megapixels / brovey_s},
        "finetune_steps": steps,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"pansharpen_{args.backbone}_{device}_{args.dtype}.json"
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
