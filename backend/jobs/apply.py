"""`<task>.<apply_verb>`, built from a method spec: load an adapter, rebuild its model on the frozen backbone
it was trained on, and stream the scene through the one tiled predictor (blended tiles, autocast on CUDA,
batch halving on CUDA out-of-memory) into the method's outputs."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import numpy as np
import torch

from backend import adapters
from backend.context import JobContext
from backend.io.tiling import TiledPass, TileSpec
from backend.jobs.base import JobSpec
from backend.jobs.checkpoints import loaded_model, training_checkpoint
from backend.methods.spec import Application, MethodSpec, discover
from backend.models.backbones.loading import CheckpointMismatch
from backend.params import (
    ADAPTER,
    BATCH_SIZE,
    CLUSTER,
    DEVICE,
    OUT_DIR,
    OVERLAP,
    TILE_SIZE,
    Param,
    in_group_order,
    input_paths,
)
from backend.preflight import preflight
from backend.protocol import INVALID_INPUT, JobError, JobResult
from backend.runtime import halve_batch_on_oom, resolve_device


def params(method: MethodSpec) -> tuple[Param, ...]:
    adapter = ADAPTER.but(help=f"Name of a {method.title} adapter in the library.")
    tiling = (
        TILE_SIZE.but(
            help="Tile size in pixels (auto: the method's, or the adapter's training patch).",
            default=method.default_tile,
        ),
        OVERLAP.but(
            help="Tile overlap in pixels, blended (default: the method's, or a quarter of the tile).", default=None
        ),
        BATCH_SIZE.but(default=method.apply_batch_size),
    )
    return in_group_order((adapter, *method.apply_params, OUT_DIR, *tiling, DEVICE, CLUSTER))


def trained_checkpoints(meta: adapters.AdapterMeta, parts: tuple[str, ...]) -> dict[str, str | None]:
    """The SHA-256 of every frozen part the adapter was trained on (None: a seeded random init)."""
    shas = meta.config.get("checkpoints")
    if not isinstance(shas, dict):
        # Adapters saved before `config.checkpoints` (v0.1) kept the main part's hash in `checkpoint_sha256`
        # and PanAdapter's EDSR hash in `config.edsr_sha256`.
        shas = {parts[0]: meta.checkpoint_sha256}
        if len(parts) > 1:
            shas[parts[1]] = meta.config.get("edsr_sha256")
    unknown = [part for part in parts if shas.get(part) is None]
    if unknown and meta.config.get("random_backbone_seed") is None:
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' does not say which {', '.join(unknown)} checkpoint it was trained with.",
            "Fine-tune the adapter again.",
        )
    return shas


def load_model(method: MethodSpec, meta: adapters.AdapterMeta, state: dict[str, torch.Tensor], ctx: JobContext) -> Any:
    """The adapter's model on the frozen checkpoints it was trained with (refused if they changed)."""
    parts = method.backbones.get(meta.backbone)
    if parts is None:
        raise JobError(INVALID_INPUT, f"The adapter '{meta.name}' names an unknown backbone '{meta.backbone}'.")
    shas = trained_checkpoints(meta, parts)
    paths = {part: training_checkpoint(part, shas.get(part), meta.name) for part in parts}
    if meta.config.get("random_backbone_seed") is not None:
        ctx.warn(f"The adapter '{meta.name}' was trained on a randomly initialised {meta.backbone} backbone.")
    built_from = json.dumps([meta.config.get(k) for k in method.build_config])  # hashable, lists included
    key = (method.name, meta.backbone, len(meta.bands), built_from, tuple(sorted(shas.items())), tuple(paths.items()))
    model, reused = loaded_model(key, lambda: method.build(meta.backbone, meta.config, len(meta.bands), paths))
    if reused:
        ctx.log(f"The {meta.backbone} backbone is already loaded: only the adapter's weights are swapped in.")
    try:
        model.load_adapter_state(state)
    except CheckpointMismatch as exc:
        raise JobError(INVALID_INPUT, f"The adapter '{meta.name}' is damaged or from another version: {exc}") from None
    return model


def opened_adapter(method: MethodSpec, name: str) -> tuple[dict[str, torch.Tensor], adapters.AdapterMeta]:
    state, meta = adapters.load(name)
    if meta.method != method.name:
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' was trained for {meta.method}, not for {method.title}.",
            f"Choose a {method.title} adapter.",
        )
    return state, meta


def tile_spec(app: Application, p: dict[str, Any]) -> TileSpec:
    """The job's tiles: the given size and overlap, else the method's (or the adapter's training patch)."""
    tile = p["tile_size"] or app.tile
    overlap = p["overlap"] if p["overlap"] is not None else app.overlap if not p["tile_size"] else None
    try:
        return TileSpec(tile, tile // 4 if overlap is None else overlap, p["batch_size"])
    except ValueError as exc:
        raise JobError(INVALID_INPUT, str(exc)) from None


def tiled_pass(
    method: MethodSpec,
    ctx: JobContext,
    p: dict[str, Any],
    app: Application,
    meta: adapters.AdapterMeta,
    state: dict[str, torch.Tensor],
) -> TiledPass:
    """The adapter's model on `app`'s tiles (blended, autocast on CUDA, batch halving on CUDA out-of-memory)."""
    device = torch.device(resolve_device(p["device"]))
    model = load_model(method, meta, state, ctx)
    if app.stage is not None:
        model.set_stage(app.stage)
    model.to(device).eval()

    @halve_batch_on_oom
    @torch.inference_mode()
    def predict(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = app.predict(model, x)
        return out.float().cpu().numpy()

    return TiledPass(app.grid.height, app.grid.width, app.read, predict, app.channels, tile_spec(app, p), app.close)


def worker_pass(method_name: str, p: dict[str, Any], meta: adapters.AdapterMeta, state: dict) -> TiledPass:
    """`tiled_pass` in a process of its own (a cluster actor): the method by name, a quiet context."""
    method = discover()[method_name]
    ctx = JobContext()
    app = method.open(ctx, p, meta)
    try:
        return tiled_pass(method, ctx, p, app, meta, state)
    except BaseException:
        app.close()
        raise


def sink_block(spec: TileSpec) -> int:
    """The output rasters' block: the tile stride where GeoTIFF allows it (a multiple of 16)."""
    return spec.stride if spec.stride % 16 == 0 else 256


def run(method: MethodSpec, ctx: JobContext, p: dict[str, Any], declared: tuple[Param, ...]) -> JobResult:
    started = time.monotonic()
    ctx.protect_inputs(*input_paths(declared, p))
    out_dir = ctx.prepare_out_dir(p["out_dir"])
    device = torch.device(resolve_device(p["device"]))
    state, meta = opened_adapter(method, p["adapter"])
    p = {**p, "out_dir": str(out_dir)}
    app = method.open(ctx, p, meta)
    try:
        spec = tile_spec(app, p)
        grid = app.grid
        preflight(
            ctx,
            grid.height,
            grid.width,
            spec.stride,
            out_dir,
            app.output_bytes_per_pixel,
            device.type,
            method.cpu_mp_per_s,
        )
        tiles = tiled_pass(method, ctx, p, app, meta, state)
        ctx.log(
            f"{method.title} adapter '{meta.name}' on {grid.width} x {grid.height} pixels: tiles of {spec.tile} px "
            f"overlapping by {spec.overlap}, {spec.batch} per pass, on {device}."
        )
        with app.sink(sink_block(spec)) as sink:
            tiles.run(
                sink.write, on_tile=lambda d, t: ctx.progress(app.tiles_share * d / t, app.activity, f"tile {d}/{t}")
            )
    finally:
        app.close()
    result = sink.finish()
    return with_metrics(result, meta, spec, grid.width * grid.height, time.monotonic() - started)


def with_metrics(
    result: JobResult, meta: adapters.AdapterMeta, spec: TileSpec, pixels: int, seconds: float
) -> JobResult:
    result.metrics = {
        "adapter": meta.name,
        **result.metrics,
        "tile": spec.tile,
        "overlap": spec.overlap,
        "megapixels_per_second": pixels / 1e6 / max(seconds, 1e-9),
    }
    return result


def run_on_cluster(method: MethodSpec, declared: tuple[Param, ...], scenes: list, cluster: Any) -> list[JobResult]:
    """The job on a Ray cluster (backend/distributed/cluster.py): every scene's tiles by parts on the actors, then
    each scene's outputs written here from its parts, as `run` writes them from its own tiles."""
    from backend.distributed.cluster import PassRef, read_blocks

    started = time.monotonic()
    state, meta = opened_adapter(method, scenes[0].params["adapter"])
    device = cluster.device(scenes[0].params["device"])
    opened: list[tuple[Application, TileSpec]] = []
    try:
        refs = []
        for scene in scenes:
            ctx, p = scene.ctx, scene.params
            ctx.protect_inputs(*input_paths(declared, p))
            p["out_dir"] = str(ctx.prepare_out_dir(p["out_dir"]))
            app = method.open(ctx, p, meta)
            opened.append((app, tile_spec(app, p)))
            actor = partial(worker_pass, method.name, {**p, "device": device, "scene": app.scene}, meta, state)
            refs.append(PassRef(actor, app.grid, opened[-1][1], app.channels))
        vrts = cluster.tiled(refs, device, 0.0, 0.8)
        results = []
        for scene, (app, spec), vrt in zip(scenes, opened, vrts, strict=True):
            block = sink_block(spec)
            with app.sink(block) as sink:
                for win, values, valid in read_blocks(vrt, app.grid, block):
                    sink.write(win, values, valid)
                    scene.ctx.progress(0.85, "writing outputs", scene.label)
            results.append(sink.finish())
    finally:
        for app, _ in opened:
            app.close()
    # The run's throughput (all scenes over the whole run, start and final passes included).
    pixels = sum(app.grid.width * app.grid.height for app, _ in opened)
    return [
        with_metrics(result, meta, spec, pixels, time.monotonic() - started)
        for result, (_, spec) in zip(results, opened, strict=True)
    ]


def job(method: MethodSpec) -> JobSpec:
    declared = params(method)
    return JobSpec(
        f"{method.task}.{method.apply_verb}",
        method.apply_summary,
        declared,
        lambda ctx, p: run(method, ctx, p, declared),
        title=method.apply_title or f"Apply a {method.title} adapter",
        outputs=method.outputs,
        method=method.name,
        cluster=lambda scenes, cluster: run_on_cluster(method, declared, scenes, cluster),
    )
