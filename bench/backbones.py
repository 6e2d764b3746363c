"""Forward throughput and peak memory of every backbone at its native input size.

Random weights (the architecture, not the checkpoint, sets the cost). Each model runs in a fresh
process: peak memory is its VmHWM on CPU, or torch.cuda.max_memory_allocated on a GPU.

    python -m bench.backbones [--models sam_vit_b ...] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                              [--math-attention] [--batch 1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from backend import weights
from bench.machine import machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# registry name -> input shape without the batch dimension (family and variant come from the weights registry)
MODELS: dict[str, tuple[int, ...]] = {
    "mobile_sam": (3, 1024, 1024),
    "sam_vit_b": (3, 1024, 1024),
    "sam_vit_l": (3, 1024, 1024),
    "sam_vit_h": (3, 1024, 1024),
    "uniperceiver_vit_l": (3, 224, 224),
    "scalemae_vit_l": (3, 224, 224),
    "ipt": (576, 16, 16),  # the body's fixed 16x16 grid of 576-d features (PanAdapter)
    "edsr_baseline_x2": (3, 64, 64),  # PanAdapter's 64x64 training patches
}

CHILD = """
import importlib, json, sys, time
import torch
family, variant, shape, device, dtype, batch, seconds, math_attn = json.loads(sys.argv[1])
mod = importlib.import_module(f"backend.models.backbones.{family}")
model = mod.build(variant).eval().to(device)
x = torch.randn(batch, *shape).to(device)
dt = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
params = sum(p.numel() for p in model.parameters())

def step():
    with torch.no_grad(), torch.autocast(device, dtype=dt, enabled=dt is not None):
        if math_attn:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                return model(x)
        return model(x)

def sync():
    if device == "cuda":
        torch.cuda.synchronize()

step(); sync()  # warm-up
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
runs, t0 = 0, time.perf_counter()
while runs < 2 or time.perf_counter() - t0 < seconds:
    step(); sync(); runs += 1
    if runs >= 50:
        break
wall = time.perf_counter() - t0
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**20
else:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"params_m": params / 1e6, "images_per_s": runs * batch / wall, "s_per_batch": wall / runs,
                  "peak_mb": peak, "runs": runs}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--math-attention", action="store_true", help="force the plain (math) SDPA kernel")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum timed duration per model")
    args = parser.parse_args(argv)
    records = []
    print(f"{'model':<20} {'input':<16} {'params M':>9} {'img/s':>8} {'s/batch':>8} {'peak MB':>9}")
    for name in args.models:
        info, shape = weights.backbone_info(name), MODELS[name]
        family, variant = info.family, info.variant
        payload = [family, variant, list(shape), args.device, args.dtype, args.batch, args.seconds, args.math_attention]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(payload)], cwd=ROOT, capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(f"{name:<20} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1]) | {"model": name, "input": "x".join(map(str, shape))}
        records.append(rec)
        print(
            f"{name:<20} {rec['input']:<16} {rec['params_m']:9.1f} {rec['images_per_s']:8.3f} "
            f"{rec['s_per_batch']:8.2f} {rec['peak_mb']:9.0f}"
        )
    out = {
        "benchmark": "backbones",
        **machine_record(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "math_attention": args.math_attention,
        "batch": args.batch,
        "records": records,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"{args.device}_{args.dtype}{'_math' if args.math_attention else ''}"
    (RESULTS / f"backbones_{tag}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
