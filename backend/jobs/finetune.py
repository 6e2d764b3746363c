"""`<task>.finetune`, built from a method spec: read the analyst's data, build the model on the frozen backbone,
train by the method's recipe on the one training loop, and save the adapter in the library."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from backend import adapters
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.jobs.base import JobSpec
from backend.jobs.checkpoints import backbone_checkpoint, release_loaded_model
from backend.methods.spec import RANDOM_BACKBONE_SEED, MethodSpec, Training
from backend.models.peft.freeze import count_parameters
from backend.params import (
    ADAPTER_NAME,
    ALLOW_RANDOM_BACKBONE,
    DEVICE,
    OVERWRITE,
    Param,
    in_group_order,
    input_paths,
)
from backend.protocol import INVALID_INPUT, JobError, JobResult
from backend.runtime import resolve_device
from backend.training import ddp
from backend.training.loop import fit


def params(method: MethodSpec, own: tuple[Param, ...] | None = None) -> tuple[Param, ...]:
    """The job's parameters: the method's own (its fine-tuning ones by default) and the generic ones."""
    backbone = Param(
        "backbone",
        str,
        "Frozen encoder (the tiny ones are random miniatures for tests).",
        default=method.default_backbone,
        choices=tuple(method.backbones),
        group="method",
    )
    own = method.finetune_params if own is None else own
    return in_group_order((*own, ADAPTER_NAME, backbone, ALLOW_RANDOM_BACKBONE, DEVICE, OVERWRITE))


def run(
    method: MethodSpec,
    ctx: JobContext,
    p: dict[str, Any],
    declared: tuple[Param, ...],
    prepare: Callable[[JobContext, dict[str, Any]], Training] | None = None,
) -> JobResult:
    ctx.protect_inputs(*input_paths(declared, p))
    resolve_device(p["device"])  # a wrong device fails before the data is read
    name = adapters.sanitize(p["adapter_name"])
    if not p["overwrite"] and any(a["name"] == name for a in adapters.list_adapters()):
        raise JobError(
            INVALID_INPUT, f"An adapter named '{name}' already exists.", "Choose another name or allow overwriting."
        )
    checkpoints = frozen_checkpoints(method, ctx, p)  # missing weights fail before the data is read
    return train_and_save(method, ctx, p, (prepare or method.prepare)(ctx, p), checkpoints)


def frozen_checkpoints(method: MethodSpec, ctx: JobContext, p: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """(path, SHA-256) of every frozen part of the chosen backbone; (None, None) for an allowed random init."""
    parts = method.backbones[p["backbone"]]
    return {part: backbone_checkpoint(part, p["allow_random_backbone"], ctx) for part in parts}


def train_and_save(
    method: MethodSpec,
    ctx: JobContext,
    p: dict[str, Any],
    training: Training,
    checkpoints: dict[str, tuple[Any, Any]] | None = None,
) -> JobResult:
    """Build the model, train it by the method's recipe and save the adapter (`p`: the job's parameters; the
    demo and the held-out benchmark call this with several labelled areas)."""
    name = adapters.sanitize(p["adapter_name"])
    parts = method.backbones[p["backbone"]]
    checkpoints = checkpoints or frozen_checkpoints(method, ctx, p)
    paths = {part: path for part, (path, _) in checkpoints.items()}
    release_loaded_model()
    model = method.build(p["backbone"], training.config, len(training.bands), paths)
    if training.init_state is not None:
        load_shared(model, training.init_state)
    counted = count_parameters(model)
    ctx.log(f"{method.title} on {p['backbone']}: {counted}")
    recipe = training.recipe(model, resolve_device(p["device"]))
    started = time.monotonic()
    result = fit(model, recipe, ctx)
    seconds = time.monotonic() - started
    shas = {part: sha for part, (_, sha) in checkpoints.items()}
    val = {f"val_{k}": v for k, v in result.val_metrics.items()}
    g = training.grid
    area: dict[str, Any] = {"bounds": list(g.bounds), "crs": g.crs.to_string() if g.crs else None}
    if training.areas > 1:
        area["areas"] = training.areas
    meta = AdapterMeta(
        method=method.name,
        backbone=p["backbone"],
        checkpoint_sha256=shas[parts[0]],
        bands=training.bands,
        normalization=training.normalization,
        classes=training.classes,
        training_area=area,
        metrics=val,
        config={
            **training.config,
            "checkpoints": shas,
            "random_backbone_seed": RANDOM_BACKBONE_SEED if None in shas.values() else None,
            "best_stage": result.best_stage,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "dtype": np.dtype(training.dtype).name,
        },
    )
    # Under torchrun every process ends with the same adapter; rank 0 alone writes it.
    folder = adapters.save(name, result.best_state, meta, overwrite=p["overwrite"]) if ddp.world()[0] == 0 else None
    metrics: dict[str, Any] = {
        "adapter": name,
        "adapter_path": str(folder),
        "best_epoch": result.best_epoch,
        "trainable_parameters": counted.trainable,
        "total_parameters": counted.total,
    }
    if method.stages:
        metrics["best_stage"] = result.best_stage
    metrics |= training.report(model, result)
    metrics |= val
    metrics["finetune_seconds"] = seconds  # the training loop alone (data reading and model building excluded)
    return JobResult(metrics=metrics)


def load_shared(model: Any, state: dict[str, Any]) -> None:
    """Load the tensors of an earlier stage's adapter that this model's adapter also has (same name and shape)."""
    own = model.adapter_state_dict()
    shared = {k: v for k, v in state.items() if k in own}
    if not shared:
        raise JobError(INVALID_INPUT, "The adapter to start from shares no weights with this model.")
    misfit = sorted(k for k, v in shared.items() if v.shape != own[k].shape)
    if misfit:
        raise JobError(
            INVALID_INPUT,
            f"The adapter to start from does not fit this model ({', '.join(misfit[:3])} differ in shape).",
            "Start from an adapter made for the same bands and backbone.",
        )
    with torch.no_grad():
        for k, v in shared.items():
            own[k].copy_(v)


def pretraining_job(method: MethodSpec) -> JobSpec | None:
    """`<task>.<verb>` for a method with an unlabelled first stage (MethodSpec.pretraining)."""
    stage = method.pretraining
    if stage is None:
        return None
    declared = params(method, stage.params)
    return JobSpec(
        f"{method.task}.{stage.verb}",
        stage.summary,
        declared,
        lambda ctx, p: run(method, ctx, p, declared, stage.prepare),
        title=stage.title,
        method=method.name,
    )


def job(method: MethodSpec) -> JobSpec:
    declared = params(method)
    return JobSpec(
        f"{method.task}.finetune",
        method.finetune_summary,
        declared,
        lambda ctx, p: run(method, ctx, p, declared),
        title=method.finetune_title or f"Fine-tune a {method.title} adapter",
        method=method.name,
        stages=dict(method.stages),
    )
