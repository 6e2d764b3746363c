"""What one fine-tuning configuration costs: seconds per step and peak memory, measured in a fresh process so the
peak is its own (shared by the PEFT-against-full-fine-tuning benchmarks, bench/change.py and bench/objects.py).

Peak memory: VmHWM on CPU, torch.cuda.max_memory_allocated on a GPU. Also reported, to explain the peaks: the memory
at the start of training (model and input), gradients + Adam states (3 × the trainable weights) and the activations
one forward saves for the backward (counted with saved_tensors_hooks after the timed steps)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.models.peft.freeze import count_parameters

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def host_memory_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (current) of this process in MB; ru_maxrss would include the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / MB if device == "cuda" else host_memory_mb("VmHWM")


def saved_activations_mb(forward: Callable[[], Any], model: torch.nn.Module, device: str, dtype: str) -> float:
    """MB of the non-parameter tensors one forward keeps for the backward pass (each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"),
    ):
        forward()
    return sum(saved.values()) / MB


def measure_steps(
    model: torch.nn.Module,
    loss: Callable[[], torch.Tensor],
    mode: str,
    lr: float,
    device: str,
    dtype: str,
    steps: int,
    seconds: float,
) -> dict[str, Any]:
    """Time the recipe's step (forward + loss + backward + Adam step) on `model`'s trainable parameters, at least
    `steps` times and `seconds` long after one warm-up step: s/step, peak and baseline memory, parameter counts."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)

    def step() -> None:  # the order of the training loop: the previous gradients live through the forward
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        sync(device)

    baseline = torch.cuda.memory_allocated() / MB if device == "cuda" else host_memory_mb("VmRSS")
    step()  # warm-up: also allocates the gradients and Adam's states
    runs, t0 = 0, time.perf_counter()
    while runs < steps or time.perf_counter() - t0 < seconds:
        step()
        runs += 1
    wall = time.perf_counter() - t0
    peak = peak_mb(device)
    count = count_parameters(model)
    return {
        "mode": mode,
        "s_per_step": wall / runs,
        "steps": runs,
        "peak_mb": peak,
        "baseline_mb": baseline,
        "trainable_params": count.trainable,
        "total_params": count.total,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
        "grads_adam_mb": 3 * sum(p.numel() * p.element_size() for p in trainable) / MB,
        "saved_activations_mb": saved_activations_mb(loss, model, device, dtype),
        "host_peak_mb": host_memory_mb("VmHWM"),
    }


def measure_apply_job(job: str, params: dict[str, Any], image: str, device: str) -> dict[str, Any]:
    """An apply job (objects.segment, landcover.map …) on `image`: wall time, megapixels per second, peak memory."""
    import rasterio

    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.base import run_job

    spec = JOBS[job]
    t0 = time.perf_counter()
    result = run_job(spec, spec.validate(params | {"image": image, "device": device}), JobContext())
    wall = time.perf_counter() - t0
    with rasterio.open(image) as src:
        megapixels = src.width * src.height / 1e6
    return {
        "wall_s": wall,
        "megapixels": megapixels,
        "mp_per_s": megapixels / wall,
        "tile": result.metrics.get("tile"),
        "peak_mb": peak_mb(device),
        "host_peak_mb": host_memory_mb("VmHWM"),
    }


def measure_forward(model: torch.nn.Module, x: torch.Tensor, device: str) -> dict[str, Any]:
    """Bare forwards of a batch of tiles x (B, C, T, T), at least 3 s after a warm-up (bf16 autocast on CUDA, as
    the tiled predictor runs)."""
    model = model.to(device).eval()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model(x)  # warm-up
        sync(device)
        t0, runs = time.perf_counter(), 0
        while runs < 1 or time.perf_counter() - t0 < 3:
            model(x)
            sync(device)
            runs += 1
    seconds = (time.perf_counter() - t0) / runs
    batch, tile = x.shape[0], x.shape[-1]
    return {"s_per_batch": seconds, "mp_per_s": batch * tile * tile / 1e6 / seconds, "tile": tile, "batch": batch}


def run_child(module: str, kind: str, kwargs: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `module`.child((kind, kwargs)) in a fresh Python process and return the JSON record it prints last."""
    code = f"import sys; from {module} import child; child(sys.argv[1])"
    payload = json.dumps([kind, kwargs])
    proc = subprocess.run([sys.executable, "-c", code, payload], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_training_table(rows: list[dict[str, Any]], full: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The rows as a table, then each PEFT row's time and peak memory over full fine-tuning's; returns the ratios."""
    print(
        f"{'mode':<10} {'trainable':>11} {'of params':>12} {'s/step':>7} {'steps':>5} {'peak MB':>8} "
        f"{'start MB':>9} {'grads+Adam MB':>13} {'saved act. MB':>13}"
    )
    for r in [*rows, full]:
        print(
            f"{r['mode']:<10} {r['trainable_params']:>11,} {r['total_params']:>12,} {r['s_per_step']:7.2f} "
            f"{r['steps']:>5} {r['peak_mb']:8.0f} {r['baseline_mb']:9.0f} {r['grads_adam_mb']:13.1f} "
            f"{r['saved_activations_mb']:13.0f}"
        )
    ratios = {}
    for r in rows:
        ratio = ratios[r["mode"]] = {k: r[k] / full[k] for k in ("s_per_step", "peak_mb")}
        print(f"{r['mode'] + '/full':<37} {ratio['s_per_step']:7.2f} {'':>5} {ratio['peak_mb']:8.2f}")
    return ratios
