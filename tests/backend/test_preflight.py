"""The pre-flight estimate: shown before every apply job, and absurd requests refused before any work."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
from conftest import levir

from backend import preflight
from backend.context import JobContext
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.protocol import JobError

HUGE_VRT = """<VRTDataset rasterXSize="1000000" rasterYSize="1000000">
  <SRS>EPSG:32614</SRS><GeoTransform>600000,0.5,0,3400000,0,-0.5</GeoTransform>
  <VRTRasterBand dataType="Byte" band="1"/>
</VRTDataset>"""


def cva(out: Path, ctx: JobContext, **params: str) -> object:
    before, after, _ = levir("test_2_0000_0000")
    spec = JOBS["change.cva"]
    values = {"before": str(before), "after": str(after), "out_dir": str(out), **params}
    return run_job(spec, spec.validate(values), ctx)


def test_a_trillion_pixel_pair_is_refused_before_any_work(tmp_path: Path) -> None:
    vrt = tmp_path / "huge.vrt"
    vrt.write_text(HUGE_VRT, encoding="utf-8")
    ctx = JobContext()
    with pytest.raises(JobError) as exc:
        cva(tmp_path / "out", ctx, before=str(vrt), after=str(vrt))
    assert exc.value.code == "INVALID_INPUT" and "1,000 gigapixels" in exc.value.message
    assert "area of interest" in exc.value.hint
    assert not (tmp_path / "out").exists()  # the folder it would have written to is gone again


def test_the_estimate_is_logged_before_the_work(tmp_path: Path) -> None:
    records: list[tuple[str, str, dict | None]] = []
    ctx = JobContext(on_log=lambda level, message, data=None: records.append((level, message, data)))
    ctx.on_progress = lambda f, stage, message: records.append(("progress", stage, None))
    cva(tmp_path, ctx)
    kinds = [r[0] for r in records]
    assert "estimate" in kinds and kinds.index("estimate") < kinds.index("progress")
    _, message, data = records[kinds.index("estimate")]
    est = data["estimate"]
    assert est["pixels"] == 256 * 256 and est["blocks"] == 1 and est["device"] == "cpu"
    assert 0 < est["output_bytes"] < est["free_bytes"] and est["seconds"] > 0
    assert message.startswith("Job size: 0.1 megapixels in 1 tile, about")


def test_outputs_larger_than_the_free_disk_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk cannot be made safely on a test machine: the free space is what is mocked here.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(JobError) as exc:
        cva(tmp_path / "out", JobContext())
    assert exc.value.code == "OUTPUT_ERROR" and "has 1,000 bytes free" in exc.value.message
    assert not (tmp_path / "out").exists()


def test_a_week_of_cpu_time_is_refused(tmp_path: Path) -> None:
    rate = 0.0034  # PanAdapter's measured CPU throughput (MP/s): 60,000² pixels would take about 12 days
    with pytest.raises(JobError, match=r"would take about 12\.3 days on the CPU"):
        preflight.preflight(JobContext(), 60_000, 60_000, 448, tmp_path, 4.0, "cpu", rate)
    est = preflight.preflight(JobContext(), 60_000, 60_000, 448, tmp_path, 4.0, "cuda", rate)
    assert est.seconds is None  # no measured GPU throughput: no time is promised, nothing refused
