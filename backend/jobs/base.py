"""What every job shares: its declaration (parameters, outputs), running it, and failure mapping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backend.context import JobContext
from backend.params import OutputDecl, Param
from backend.protocol import JobResult


@dataclass(frozen=True)
class JobSpec:
    name: str
    summary: str
    params: tuple[Param, ...]
    run: Callable[[JobContext, dict[str, Any]], JobResult]
    title: str = ""  # short action name shown in QGIS, e.g. "Detect (FILF adapter)"
    outputs: tuple[OutputDecl, ...] = ()
    method: str | None = None  # the adapter method the job trains or applies
    stages: dict[str, str] = field(default_factory=dict)  # training stage id -> title for the analyst
    # How the job runs on a Ray cluster (backend/distributed/cluster.py): (scenes, cluster) -> a result per scene.
    cluster: Callable[[list[Any], Any], list[JobResult]] | None = None

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # a method repeating a generic parameter would break the CLI and shadow the generic one
            raise ValueError(f"Job {self.name} declares the parameter(s) {', '.join(twice)} more than once.")

    @property
    def task(self) -> str:
        return self.name.split(".")[0]

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def validate(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Check names and types and fill defaults; raises ValueError with a plain message."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"Unknown parameter(s) for {self.name}: {', '.join(unknown)}")
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name not in raw or raw[p.name] is None:
                if p.required:
                    raise ValueError(f"Missing required parameter '{p.name}' for {self.name}")
                out[p.name] = p.default
                continue
            out[p.name] = p.coerce(raw[p.name])
        return out


def run_job(spec: JobSpec, params: dict[str, Any], ctx: JobContext) -> JobResult:
    """Run a job with outputs committed on success and removed on any failure; on the Ray cluster that the
    `cluster` parameter names, where it has one."""
    if params.get("cluster"):
        from backend.distributed import cluster  # Ray loads only here

        return finish(ctx, lambda: cluster.run(spec, ctx, [params], params["cluster"]))

    def here() -> JobResult:
        try:
            result = spec.run(ctx, params)
            ctx.check_cancelled()
            ctx.commit_outputs()
        except BaseException:
            ctx.discard_outputs()
            raise
        return result

    return finish(ctx, here)


def finish(ctx: JobContext, work: Callable[[], JobResult]) -> JobResult:
    """`work()`, then the job's journal entry goes and the warnings it logged join the result's."""
    try:
        result = work()
    finally:
        ctx.end()
    result.warnings = list(dict.fromkeys(ctx.warnings + result.warnings))
    return result
