"""The pansharpening forms in a real headless QGIS: the sensor (and method, ratio) on the main form, the
scale ratio read from the chosen PAN and MS layers, and the epoch table following a fine-tune's records.

No worker runs here: the forms and the epoch table are plugin-side only. Rasters are the bundled
SpaceNet-6 crop (PAN 0.5 m, MS 1 m, UTM 31N) and copies of its MS written with QGIS's GDAL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import ROOT
from osgeo import gdal
from qgis.core import QgsProject, QgsRasterLayer
from qgis.gui import QgsSpinBox
from qgis.PyQt.QtWidgets import QComboBox, QFormLayout, QLabel

from rs_peft_qgis import catalog
from rs_peft_qgis.dock.epochs import training_summary
from rs_peft_qgis.form_hooks.pansharpen import ratio_check, ratio_hint
from rs_peft_qgis.forms.job_form import JobForm

DATA = ROOT / "tests" / "data" / "pansharpening" / "spacenet6"
PAN, MS = DATA / "pan.tif", DATA / "ms.tif"
PAN_PIXEL = 0.499993455098410  # metres, from the file

gdal.UseExceptions()


def add(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def warp(tmp_path: Path, name: str, **options) -> Path:
    out = tmp_path / f"{name}.tif"
    gdal.Warp(str(out), str(MS), **options)
    return out


def pansharpen_jobs() -> list[catalog.JobInfo]:
    """The pansharpening jobs that take a sensor (the classical ones, and the learned ones as they land)."""
    jobs = [j for j in catalog.load().jobs.values() if j.task == "pansharpen" and j.param("sensor") is not None]
    assert {"pansharpen.classic", "pansharpen.evaluate"} <= {j.name for j in jobs}
    return jobs


def hint_text(form) -> str:
    hint = ratio_hint(form)
    assert hint is not None
    return hint.text() if not hint.isHidden() else ""


# --- the main form ------------------------------------------------------------------------------------


def test_sensor_method_and_ratio_are_on_the_main_form_of_every_pansharpening_job(dock) -> None:
    for job in pansharpen_jobs():
        dock.run_tab.set_job(job.name)
        form = dock.run_tab.form
        for name in ("sensor", "method", "ratio"):
            if job.param(name) is None:
                continue
            widget = form.widgets[name]
            assert not form.advanced.isAncestorOf(widget), (job.name, name)
            assert form.isAncestorOf(widget) and form.labels[name].text() == job.param(name).label
        sensor = form.widgets["sensor"]
        assert isinstance(sensor, QComboBox) and form.value("sensor") == "generic"
        assert {"WV2", "WV3", "QB", "IKONOS", "generic"} <= {sensor.itemData(i) for i in range(sensor.count())}
        # The rest of the optional settings still fold away.
        for name in ("ms_bands", "tile_size", "max_size", "name"):
            if job.param(name) is not None:
                assert form.advanced.isAncestorOf(form.widgets[name]), (job.name, name)
    # Other tasks keep their look: the change fine-tune's backbone stays under Advanced.
    dock.run_tab.set_job("change.finetune")
    assert dock.run_tab.form.advanced.isAncestorOf(dock.run_tab.form.widgets["backbone"])


def test_the_sensor_chosen_on_the_main_form_goes_to_the_job(dock, tmp_path: Path) -> None:
    pan, ms = add(PAN, "pan"), add(MS, "ms")
    dock.run_tab.set_job("pansharpen.classic")
    form = dock.run_tab.form
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    form.set_value("sensor", "WV3")
    form.set_value("out_dir", str(tmp_path))
    params, _context = dock.runner.prepare(dock.run_tab.job, form)
    assert params["sensor"] == "WV3" and params["pan"] == str(PAN) and params["ms"] == str(MS)
    assert "ratio" not in params  # "auto": the backend detects it


# --- the detected ratio -------------------------------------------------------------------------------


def test_the_spacenet6_pair_gives_ratio_2(dock) -> None:
    pan, ms = add(PAN, "pan"), add(MS, "ms")
    for name in ("pansharpen.classic", "pansharpen.evaluate"):
        dock.run_tab.set_job(name)
        form = dock.run_tab.form
        form.set_value("pan", pan)
        form.set_value("ms", ms)
        check = ratio_check(form)
        assert check.ratio == 2 and not check.warning and check.estimate == pytest.approx(2.0, rel=1e-3)
        assert hint_text(form) == "Detected ratio: 2 (PAN 0.50 m, MS 1.00 m)"
        assert "gray" in ratio_hint(form).styleSheet()
        # The hint sits right under the ratio field, on the main form.
        layout = next(f for f in form.findChildren(QFormLayout) if f.indexOf(ratio_hint(form)) >= 0)
        hint_row, _ = layout.getWidgetPosition(ratio_hint(form))
        ratio_row, _ = layout.getWidgetPosition(form.widgets["ratio"])
        assert hint_row == ratio_row + 1 and not form.advanced.isAncestorOf(ratio_hint(form))
        # A ratio set by hand that disagrees is named as the one used.
        form.set_value("ratio", 4)
        assert hint_text(form) == "Detected ratio: 2 (PAN 0.50 m, MS 1.00 m); the ratio you set (4) is used."
        form.set_value("ratio", None)
        assert form.value("ratio") is None and hint_text(form).endswith("1.00 m)")


def test_a_reprojected_ms_is_measured_in_the_pan_crs(dock, tmp_path: Path) -> None:
    mercator = warp(tmp_path, "ms_3857", dstSRS="EPSG:3857")
    layer = add(mercator, "ms 3857")
    assert layer.crs().authid() == "EPSG:3857"
    # In its own CRS the MS pixel is ~1.6 "metres" (Mercator at 52° N): compared as is, no whole ratio.
    naive = layer.rasterUnitsPerPixelX() / PAN_PIXEL
    assert abs(naive - round(naive)) > 0.05 * naive
    dock.run_tab.set_job("pansharpen.classic")
    form = dock.run_tab.form
    form.set_value("pan", add(PAN, "pan"))
    form.set_value("ms", layer)
    check = ratio_check(form)
    assert check.ratio == 2 and check.estimate == pytest.approx(2.0, rel=0.01)
    assert hint_text(form) == "Detected ratio: 2 (PAN 0.50 m, MS 1.00 m)"


def test_an_ms_in_degrees_is_measured_on_the_ground(dock, tmp_path: Path) -> None:
    geographic = warp(tmp_path, "ms_4326", dstSRS="EPSG:4326")
    layer = add(geographic, "ms 4326")
    dock.run_tab.set_job("pansharpen.evaluate")
    form = dock.run_tab.form
    form.set_value("pan", add(PAN, "pan"))
    form.set_value("ms", layer)
    # gdalwarp made square pixels in degrees; on the ground at this latitude they are not 1 m x 1 m.
    lat = math.radians(layer.extent().center().y())
    metres = 111_320 * math.sqrt(layer.rasterUnitsPerPixelX() * layer.rasterUnitsPerPixelY() * math.cos(lat))
    check = ratio_check(form)
    assert check.estimate == pytest.approx(metres / PAN_PIXEL, rel=0.01)
    assert check.estimate > 2.05 and check.ratio is None and check.warning  # more than 2 % off: as the backend
    assert f"MS pixel is {check.estimate:.1f} × the PAN pixel" in hint_text(form)
    assert round(check.estimate, 1) != 2  # else the text would show two decimals, not "2.0 ×"


def test_the_ratio_tolerance_is_the_catalogs_hint(dock, tmp_path: Path) -> None:
    tolerance = catalog.load().task("pansharpen").hints["ratio_tolerance"]  # the backend's rule
    geographic = add(warp(tmp_path, "ms_4326", dstSRS="EPSG:4326"), "ms 4326")
    pan = add(PAN, "pan")
    dock.run_tab.set_job("pansharpen.evaluate")
    assert dock.run_tab.form.hints["ratio_tolerance"] == tolerance
    # The same pair as above (more than 2 % off a whole ratio) passes with a looser hint.
    loose = JobForm(catalog.load().jobs["pansharpen.evaluate"], None, {"ratio_tolerance": 0.2})
    try:
        loose.set_value("pan", pan)
        loose.set_value("ms", geographic)
        assert ratio_check(loose).ratio == 2 and hint_text(loose).startswith("Detected ratio: 2 ")
    finally:
        loose.deleteLater()


def test_a_non_whole_ratio_asks_for_it_and_follows_the_pickers(dock, tmp_path: Path) -> None:
    coarse = add(warp(tmp_path, "ms_3_3", xRes=3.3 * PAN_PIXEL, yRes=3.3 * PAN_PIXEL), "ms 3.3")
    pan, ms = add(PAN, "pan"), add(MS, "ms")
    dock.run_tab.set_job("pansharpen.classic")
    form = dock.run_tab.form
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    assert ratio_check(form).ratio == 2
    form.set_value("ms", coarse)  # the hint follows the MS picker
    check = ratio_check(form)
    assert check.ratio is None and check.warning and check.estimate == pytest.approx(3.3, rel=1e-3)
    assert hint_text(form) == "MS pixel is 3.3 × the PAN pixel (PAN 0.50 m, MS 1.65 m): not a whole ratio — set it."
    assert "gray" not in ratio_hint(form).styleSheet()
    form.set_value("ratio", 3)  # what the backend then uses
    assert hint_text(form).endswith("; the ratio you set (3) is used.") and not ratio_check(form).warning
    form.set_value("ratio", None)
    form.set_value("pan", ms)  # ... and the PAN picker: a 4-band, coarser "PAN"
    text = hint_text(form)
    assert text.startswith("The PAN layer has 4 bands: choose the single-band panchromatic raster.")
    assert ratio_check(form).warning
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    assert hint_text(form) == "Detected ratio: 2 (PAN 0.50 m, MS 1.00 m)"


def test_layers_without_crs_compare_their_sizes(dock, tmp_path: Path) -> None:
    def blank(name: str, size: int, bands: int) -> Path:
        path = tmp_path / f"{name}.tif"
        gdal.GetDriverByName("GTiff").Create(str(path), size, size, bands, gdal.GDT_UInt16).FlushCache()
        return path

    pan = add(blank("pan", 256, 1), "pan no crs")
    ms = add(blank("ms", 64, 4), "ms no crs")
    assert not pan.crs().isValid() and not ms.crs().isValid()
    dock.run_tab.set_job("pansharpen.classic")
    form = dock.run_tab.form
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    assert ratio_check(form).ratio == 4
    assert hint_text(form) == "Detected ratio: 4 (no CRS: PAN 256×256 px, MS 64×64 px)"
    form.set_value("ms", add(MS, "ms"))  # one with a CRS, one without: the backend refuses the pair
    assert hint_text(form) == "The PAN layer has no CRS but the other one has: assign one to it first."


def test_no_hint_without_layers_or_without_a_pan_ms_pair(dock) -> None:
    dock.run_tab.set_job("pansharpen.classic")
    form = dock.run_tab.form
    ratio = form.widgets["ratio"]
    assert isinstance(ratio, QgsSpinBox) and ratio.minimum() == 1 and ratio.specialValueText() == "auto"
    ratio.setValue(2)
    assert form.value("ratio") == 2  # the smallest ratio that can be set; below it is "auto"
    form.set_value("ratio", None)
    assert form.value("pan") is None and ratio_hint(form).isHidden()
    assert ratio_check(form).text == ""
    dock.run_tab.set_job("change.cva")
    form = dock.run_tab.form
    assert ratio_hint(form) is None and not form.findChildren(QLabel, "ratioHint")  # no PAN/MS pair


# --- the epoch table ----------------------------------------------------------------------------------


def headers(table) -> list[str]:
    return [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]


def rows(table) -> list[list[str]]:
    return [[table.item(r, c).text() for c in range(table.columnCount())] for r in range(table.rowCount())]


def pansharpen_records() -> list[dict]:
    out = []
    for stage, epochs in (("prior", 2), ("adapter", 2)):
        for epoch in range(1, epochs + 1):
            q2n = 0.8 + 0.05 * len(out)
            out.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "loss": 0.02 / (len(out) + 1),
                    "val_q2n": q2n,
                    "val_sam": 3.5 - 0.25 * len(out),
                    "val_ergas": 4.0 - 0.5 * len(out),
                    "val_psnr": 30.0 + len(out),
                }
            )
    return out


def test_the_epoch_table_follows_a_pansharpening_finetune(dock) -> None:
    table = dock.run_tab.epoch_table
    for record in pansharpen_records():
        dock.run_tab.on_log("epoch", f"epoch {record['epoch']}", record)
    assert headers(table) == ["Epoch", "Stage", "Loss", "Val Q2n", "Val SAM", "Val ERGAS"]
    assert rows(table) == [
        ["1", "prior", "0.0200", "0.8000", "3.5000", "4.0000"],
        ["2", "prior", "0.0100", "0.8500", "3.2500", "3.5000"],
        ["1", "adapter", "0.0067", "0.9000", "3.0000", "3.0000"],
        ["2", "adapter", "0.0050", "0.9500", "2.7500", "2.5000"],
    ]
    assert "Val psnr: 33.0000" in table.item(3, 0).toolTip()  # scores without a column are in the tooltip
    assert "epoch 2" in dock.run_tab.log.toPlainText()
    # The next job starts with an empty table whose columns its own first record decides.
    dock.run_tab.epoch_table.reset()
    assert table.rowCount() == 0 and headers(table) == ["Epoch", "Loss"]
    dock.run_tab.on_log("epoch", "epoch 1", {"epoch": 1, "loss": 0.5, "val_kappa": 0.25, "val_dice_score": 0.5})
    assert headers(table) == ["Epoch", "Loss", "Val kappa", "Val dice score"]  # readable fallback labels
    assert rows(table) == [["1", "0.5000", "0.2500", "0.5000"]]


def test_the_change_finetune_table_keeps_its_look(dock) -> None:
    table = dock.run_tab.epoch_table
    for epoch in (1, 2):
        record = {"epoch": epoch, "loss": 0.5 / epoch, "val_precision": 0.7, "val_recall": 0.6, "val_f1": 0.65}
        record |= {"val_iou": 0.48, "val_oa": 0.97, "val_kappa": 0.63}  # as the FILF trainer sends them
        dock.run_tab.on_log("epoch", f"epoch {epoch}/2", record)
    assert headers(table) == ["Epoch", "Loss", "Val F1", "Val IoU"]
    assert rows(table) == [["1", "0.5000", "0.6500", "0.4800"], ["2", "0.2500", "0.6500", "0.4800"]]
    dock.run_tab.on_log("info", "not an epoch", {"epoch": 3, "loss": 0.1})
    assert table.rowCount() == 2


def test_the_finished_summary_reads_well_for_both_finetunes() -> None:
    jobs = catalog.load().jobs
    pansharpen = {"adapter": "pan", "best_stage": "adapter", "best_epoch": 3, "val_q2n": 0.9, "val_sam": 2.5}
    assert training_summary(pansharpen, jobs["pansharpen.finetune"].stages) == (
        " · best epoch 3 of stage 2 (adapters) · validation Q2n 0.900 · validation SAM 2.500"
    )
    change = {"adapter": "c", "best_epoch": 7, "val_precision": 0.5, "val_f1": 0.61, "val_iou": 0.44, "val_oa": 0.9}
    assert training_summary(change, jobs["change.finetune"].stages) == (
        " · best epoch 7 · validation F1 0.610 · validation IoU 0.440"
    )
    assert training_summary({"adapter": "x"}, {}) == ""
