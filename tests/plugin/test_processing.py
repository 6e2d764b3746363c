"""The "RS PEFT" Processing provider in a real QGIS with the real worker: processing.run, a model,
styled loading, cancel, and qgis_process in a subprocess with the plugin installed like a user has it."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import BACKEND_PYTHON, ROOT, levir
from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsFeature,
    QgsGeometry,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingModelAlgorithm,
    QgsProcessingModelChildAlgorithm,
    QgsProcessingModelChildParameterSource,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
    QgsVectorLayer,
)

from rs_peft_qgis import catalog
from rs_peft_qgis.processing.algorithm import ADAPTER, METRICS, OUTPUT_FOLDER
from rs_peft_qgis.processing.provider import PROVIDER_ID, RsPeftProvider
from rs_peft_qgis.session import SESSION

if "/usr/share/qgis/python/plugins" not in sys.path:
    sys.path.append("/usr/share/qgis/python/plugins")

BEFORE, AFTER, LABEL = levir("test_2_0000_0512")
PROCESSING_TYPE = {
    "raster": "raster",
    "vector": "vector",
    "polygons": "source",
    "layer": "layer",
    "folder": "folderDestination",
    "adapter": "string",
    "field": "field",
    "bands": "string",
    "ints": "string",
    "string": "string",
    "int": "number",
    "float": "number",
    "bool": "boolean",
}


class RecordingFeedback(QgsProcessingFeedback):
    """Keeps what an algorithm reported (progress, texts, logs, warnings)."""

    def __init__(self) -> None:
        super().__init__()
        self.progress_values: list[float] = []
        self.texts: list[str] = []
        self.infos: list[str] = []
        self.warnings: list[str] = []
        self.progressChanged.connect(self.progress_values.append)

    def setProgressText(self, text: str) -> None:
        self.texts.append(text)
        super().setProgressText(text)

    def pushInfo(self, info: str) -> None:
        self.infos.append(info)

    def pushWarning(self, warning: str) -> None:
        self.warnings.append(warning)


@pytest.fixture(scope="module")
def provider(qgis_processing):
    """The provider registered in QGIS's Processing registry (as the plugin registers it)."""
    registry = QgsApplication.processingRegistry()
    own = registry.providerById(PROVIDER_ID) is None
    if own:
        assert registry.addProvider(RsPeftProvider())  # no reference kept: the provider keeps itself alive
        gc.collect()
    yield registry.providerById(PROVIDER_ID)
    if own:
        registry.removeProvider(PROVIDER_ID)
    SESSION.shutdown()


def run(alg: str, params: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.run(f"rs_peft:{alg}", params, feedback=feedback or RecordingFeedback())


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture(scope="module")
def cva_result(provider, tmp_path_factory) -> tuple[dict, RecordingFeedback, float]:
    """change.cva through processing.run on a real LEVIR-CD pair (results, feedback, seconds)."""
    feedback = RecordingFeedback()
    start = time.monotonic()
    out_dir = tmp_path_factory.mktemp("cva") / "results"
    results = run("change_cva", {"before": str(BEFORE), "after": str(AFTER), "out_dir": str(out_dir)}, feedback)
    return results, feedback, time.monotonic() - start


def test_an_algorithm_for_every_catalog_job_with_matching_parameters(provider) -> None:
    cat = catalog.load()
    titles = {t.id: t.title for t in cat.tasks}
    assert Path(provider.svgIconPath()).is_file() and provider.name() == "RS PEFT"
    assert sorted(a.id() for a in provider.algorithms()) == sorted(
        f"rs_peft:{name.replace('.', '_')}" for name in cat.jobs
    )
    advanced = Qgis.ProcessingParameterFlag.Advanced
    for job in cat.jobs.values():
        alg = QgsApplication.processingRegistry().createAlgorithmById(f"rs_peft:{job.name.replace('.', '_')}")
        assert alg.displayName() == job.title and alg.group() == titles[job.task], job.name
        assert job.summary in alg.shortHelpString()
        for p in job.params:
            d = alg.parameterDefinition(p.name)
            assert d is not None, f"{job.name}: {p.name}"
            enum = p.choices and not p.editable  # editable choices (the device) are suggestions: free text
            assert d.type() == ("enum" if enum else PROCESSING_TYPE[p.kind]), f"{job.name}: {p.name}"
            optional = bool(d.flags() & Qgis.ProcessingParameterFlag.Optional)
            assert optional == (not p.required), f"{job.name}: {p.name}"
            assert bool(d.flags() & advanced) == (
                not p.required and not p.is_layer and p.kind not in ("folder", "field") and not p.prominent
            ), f"{job.name}: {p.name}"
            assert p.help in alg.shortHelpString() and p.help in d.help()
            if enum:
                assert d.options() == [str(c) for c in p.choices] and d.usesStaticStrings()
                assert d.defaultValue() == (str(p.default) if p.default is not None else None)
            elif p.kind == "field":
                assert d.parentLayerParameterName() == p.parent
            elif p.kind == "polygons":
                assert d.dataTypes() == [Qgis.ProcessingSourceType.VectorPolygon]
            elif p.kind in ("int", "float"):
                want = (
                    Qgis.ProcessingNumberParameterType.Integer
                    if p.kind == "int"
                    else Qgis.ProcessingNumberParameterType.Double
                )
                assert d.dataType() == want and d.defaultValue() == p.default
                # The catalog's range, as in the panel's spin boxes.
                assert p.minimum is None or d.minimum() == p.minimum, f"{job.name}: {p.name}"
                assert p.maximum is None or d.maximum() == p.maximum, f"{job.name}: {p.name}"
            elif p.kind == "adapter":
                assert "adapters list" in d.help()
        outputs = {o.name(): o.type() for o in alg.outputDefinitions()}
        for o in job.outputs:
            assert outputs[o.key] == ("outputRaster" if o.kind == "raster" else "outputVector"), o.key
        assert outputs[METRICS] == "outputString"
        assert (OUTPUT_FOLDER in outputs) == any(p.kind == "folder" for p in job.params)
        assert (ADAPTER in outputs) == job.trains
    # The sensor, method and ratio of pansharpening stay in view; tiling settings fold away.
    alg = QgsApplication.processingRegistry().createAlgorithmById("rs_peft:pansharpen_classic")
    for name in ("sensor", "method", "ratio"):
        assert not alg.parameterDefinition(name).flags() & advanced, name
    assert alg.parameterDefinition("tile_size").flags() & advanced


def test_the_device_default_follows_the_plugin_settings(provider) -> None:
    settings = QgsSettings()
    old = settings.value("rs_peft_qgis/device", "auto")
    try:
        settings.setValue("rs_peft_qgis/device", "cpu")
        jobs = [j for j in catalog.load().jobs.values() if j.param("device")]
        assert jobs, "no job has a device parameter"
        for job in jobs:
            alg = QgsApplication.processingRegistry().createAlgorithmById(f"rs_peft:{job.name.replace('.', '_')}")
            assert alg.parameterDefinition("device").defaultValue() == "cpu"
    finally:
        settings.setValue("rs_peft_qgis/device", old)


def test_processing_run_change_cva_writes_georeferenced_outputs(cva_result) -> None:
    results, feedback, seconds = cva_result
    print(f"processing.run change_cva: {seconds:.1f} s")
    before = QgsRasterLayer(str(BEFORE), "before", "gdal")
    for key in ("probability", "mask"):
        raster = QgsRasterLayer(results[key], key, "gdal")
        assert raster.isValid(), results[key]
        assert raster.crs().authid() == "EPSG:4326"
        assert raster.extent() == before.extent(), key
        assert (raster.width(), raster.height()) == (before.width(), before.height())
    polygons = QgsVectorLayer(results["polygons"], "polygons", "ogr")
    assert polygons.isValid() and polygons.crs().authid() == "EPSG:4326"
    assert polygons.featureCount() == json.loads(results[METRICS])["polygons"] > 0
    assert before.extent().buffered(1e-9).contains(polygons.extent())  # float noise of the GPKG bounds
    assert Path(results[OUTPUT_FOLDER]) == Path(results["out_dir"]) == Path(results["mask"]).parent
    # Progress and stage text reached the feedback from the worker.
    assert max(feedback.progress_values) >= 90 and feedback.texts
    del before, raster, polygons


def test_run_on_a_ray_cluster_gives_the_same_layers_as_cogs(cva_result, tmp_path) -> None:
    """The advanced "Run on a Ray cluster" setting (local: a cluster started on this machine for the run): the
    worker runs the job's parts on Ray; the layers are the same as on this machine, written as COGs."""
    here, _, _ = cva_result
    feedback = RecordingFeedback()
    params = {"before": str(BEFORE), "after": str(AFTER), "out_dir": str(tmp_path / "out"), "cluster": "local"}
    results = run("change_cva", params, feedback)
    assert any("part" in t and "MP/s" in t for t in feedback.texts), feedback.texts
    for key in ("probability", "mask"):
        mine, theirs = QgsRasterLayer(results[key], key, "gdal"), QgsRasterLayer(here[key], key, "gdal")
        assert mine.isValid() and mine.extent() == theirs.extent() and mine.crs() == theirs.crs()
        assert "LAYOUT=COG" in gdal.Info(results[key])
        stats = [layer.dataProvider().bandStatistics(1) for layer in (mine, theirs)]
        assert (stats[0].sum, stats[0].minimumValue, stats[0].maximumValue) == (
            stats[1].sum,
            stats[1].minimumValue,
            stats[1].maximumValue,
        ), key
    polygons = [QgsVectorLayer(r["polygons"], "p", "ogr").featureCount() for r in (results, here)]
    assert polygons[0] == polygons[1] > 0
    metrics = json.loads(results[METRICS])
    assert metrics["parts_computed"] == 1 and metrics["polygons"] == polygons[0]


def test_change_evaluate_scores_the_mask_against_the_label(cva_result) -> None:
    results, _, _ = cva_result
    scored = json.loads(run("change_evaluate", {"prediction": results["mask"], "reference": str(LABEL)})[METRICS])
    assert 0.05 < scored["f1"] < 1.0
    perfect = json.loads(run("change_evaluate", {"prediction": str(LABEL), "reference": str(LABEL)})[METRICS])
    assert perfect["f1"] == pytest.approx(1.0)
    # A polygon reference with a class field (the field parameter resolved against the layer parameter).
    own = run(
        "change_evaluate",
        {"prediction": results["mask"], "reference": results["polygons"], "reference_field": "class"},
    )
    assert json.loads(own[METRICS])["f1"] > 0.95


def test_change_detect_runs_a_filf_adapter(provider, filf_adapter, tmp_path) -> None:
    results = run(
        "change_detect",
        {
            "before": str(BEFORE),
            "after": str(AFTER),
            "adapter": filf_adapter,
            "device": "cpu",
            "out_dir": str(tmp_path / "detect"),
        },
    )
    for key in ("probability", "mask", "polygons"):
        assert Path(results[key]).is_file(), key
    raster = QgsRasterLayer(results["probability"], "p", "gdal")
    assert raster.crs().authid() == "EPSG:4326" and raster.width() == 256
    assert isinstance(json.loads(results[METRICS]), dict)
    del raster


def test_bad_input_raises_a_plain_message_and_leaves_no_outputs(provider, tmp_path, xyz_url) -> None:
    far_before, _, _ = levir("test_77_0512_0256")
    _, near_after, _ = levir("test_2_0000_0000")
    out_dir = tmp_path / "bad"
    with pytest.raises(QgsProcessingException) as exc:
        run("change_cva", {"before": str(far_before), "after": str(near_after), "out_dir": str(out_dir)})
    assert "do not overlap" in str(exc.value) and "Traceback" not in str(exc.value)
    assert files_in(out_dir) == []
    with pytest.raises(QgsProcessingException) as exc:
        run(
            "change_detect",
            {"before": str(BEFORE), "after": str(AFTER), "adapter": "no-such-adapter", "out_dir": str(out_dir)},
        )
    assert "no-such-adapter" in str(exc.value) and "Traceback" not in str(exc.value)
    assert files_in(out_dir) == []
    # A web map (XYZ tiles, served from a local file here) has no pixel size Processing could export it at.
    xyz = QgsRasterLayer(f"type=xyz&url={xyz_url}&zmin=0&zmax=0", "basemap", "wms")
    assert xyz.isValid()
    with pytest.raises(QgsProcessingException, match="'basemap' is a web map"):
        run("change_cva", {"before": xyz, "after": str(AFTER), "out_dir": str(out_dir)})
    assert files_in(out_dir) == []
    del xyz


def test_a_memory_layer_aoi_and_a_selection_are_honoured(provider, tmp_path, qgis_new_project) -> None:
    before = QgsRasterLayer(str(BEFORE), "before", "gdal")
    e = before.extent()
    aoi_layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "drawn area", "memory")
    quarter = QgsRectangle(e.xMinimum(), e.yMinimum(), e.center().x(), e.center().y())
    eighth = QgsRectangle(e.center().x(), e.center().y(), e.center().x() + e.width() / 8, e.yMaximum())
    feats = []
    for rect in (quarter, eighth):
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromRect(rect))
        feats.append(f)
    aoi_layer.dataProvider().addFeatures(feats)
    aoi_layer.updateExtents()
    QgsProject.instance().addMapLayer(aoi_layer)
    try:
        whole = run(
            "change_cva", {"before": str(BEFORE), "after": str(AFTER), "aoi": aoi_layer, "out_dir": str(tmp_path / "a")}
        )
        raster = QgsRasterLayer(whole["probability"], "p", "gdal")
        assert raster.width() < before.width() and e.contains(raster.extent())
        assert raster.extent().contains(quarter) and raster.extent().contains(eighth)
        aoi_layer.selectByIds([aoi_layer.getFeatures().__next__().id()])  # the quarter only
        selected = QgsProcessingFeatureSourceDefinition(aoi_layer.id(), True)
        part = run(
            "change_cva", {"before": str(BEFORE), "after": str(AFTER), "aoi": selected, "out_dir": str(tmp_path / "s")}
        )
        small = QgsRasterLayer(part["probability"], "p", "gdal")
        assert small.width() <= before.width() // 2 + 1 and small.width() < raster.width()
        assert small.extent().intersect(eighth).isEmpty() or small.extent().intersect(eighth).width() < 1e-9
        del raster, small
        aoi_layer.removeSelection()
        with pytest.raises(QgsProcessingException, match="No feature of 'drawn area' is selected"):
            run("change_cva", {"before": str(BEFORE), "after": str(AFTER), "aoi": selected, "out_dir": str(tmp_path)})
    finally:
        QgsProject.instance().removeAllMapLayers()
        del before


def test_cancel_mid_job_raises_leaves_no_outputs_and_keeps_the_worker(provider, tmp_path) -> None:
    big_before, big_after, _ = levir("test_1")  # 1024²: many tiles, so the cancel lands mid-job
    out_dir = tmp_path / "cancelled"
    SESSION.client()  # a warm worker, so the job (not the start-up) is what gets cancelled
    starts = SESSION.starts
    feedback = RecordingFeedback()

    # processing.run blocks the main thread (no Qt events, so no QTimer): cancel from a thread, as the
    # toolbox's Cancel button does from the GUI thread while the algorithm runs in the background.
    def cancel_once_running() -> None:
        deadline = time.monotonic() + 60
        while feedback.progress() <= 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        feedback.cancel()

    threading.Thread(target=cancel_once_running, daemon=True).start()
    params = {
        "before": str(big_before),
        "after": str(big_after),
        "out_dir": str(out_dir),
        "tile_size": 64,
        "overlap": 8,
    }
    with pytest.raises(QgsProcessingException, match="cancelled"):
        run("change_cva", params, feedback)
    assert feedback.isCanceled()
    assert max(feedback.progress_values) < 100
    assert files_in(out_dir) == []
    assert SESSION.running is not None and SESSION.starts == starts  # same worker, still alive
    assert isinstance(SESSION.running.request("models.list"), list | dict)


def test_results_load_styled_in_a_group_after_the_run(provider, tmp_path, qgis_new_project) -> None:
    import processing

    processing.runAndLoadResults(
        "rs_peft:change_cva", {"before": str(BEFORE), "after": str(AFTER), "out_dir": str(tmp_path / "load")}
    )
    project = QgsProject.instance()
    try:
        group = project.layerTreeRoot().findGroup("Detect (CVA, no training)")
        assert group is not None
        loaded = {node.layer().source().split("|")[0]: node.layer() for node in group.findLayers()}
        assert len(loaded) == 3
        assert isinstance(group.findLayers()[0].layer(), QgsVectorLayer)  # outlines above the rasters
        mask = next(lyr for src, lyr in loaded.items() if src.endswith("_change_mask.tif"))
        probability = next(lyr for src, lyr in loaded.items() if src.endswith("_change_probability.tif"))
        assert mask.renderer().type() == "paletted"  # resources/styles/change_mask.qml
        assert probability.renderer().type() == "singlebandpseudocolor"
        del mask, probability, loaded, group
    finally:
        project.removeAllMapLayers()


def test_land_cover_adapt_finetune_and_map_from_the_toolbox(provider, tmp_path, qgis_new_project) -> None:
    """SpectralX through Processing on real ukis-csmask tiles: stage 1, stage 2 from it, and a map of the other
    sensor's tile loaded with the adapter's class names (the style file the job writes beside the raster)."""
    import processing

    ukis = ROOT / "tests" / "data" / "ukis"
    fast = {"backbone": "scalemae_tiny", "allow_random_backbone": True, "epochs": 2, "steps_per_epoch": 2}
    fast |= {"batch_size": 2, "overwrite": True, "device": "cpu"}
    run("landcover_adapt", {"image": str(ukis / "sentinel2.tif"), "adapter_name": "proc-lc-1", **fast})
    labels = {"labels": str(ukis / "sentinel2_labels.gpkg"), "label_field": "class", "init_adapter": "proc-lc-1"}
    tuned = run("landcover_finetune", {"image": str(ukis / "sentinel2.tif"), "adapter_name": "proc-lc"} | labels | fast)
    assert json.loads(tuned[METRICS])["adapter"] == "proc-lc"
    params = {"image": str(ukis / "landsat7.tif"), "sensor": "landsat7", "adapter": "proc-lc", "device": "cpu"}
    results = processing.runAndLoadResults("rs_peft:landcover_map", params | {"out_dir": str(tmp_path / "map")})
    assert "class" in Path(results["classes"]).name
    project = QgsProject.instance()
    try:
        classes = next(
            layer for layer in project.mapLayers().values() if layer.source().endswith("_landcover_classes.tif")
        )
        assert classes.renderer().type() == "paletted"
        assert {c.label for c in classes.renderer().classes()} == {"clear", "cloud", "shadow"}
        del classes
    finally:
        project.removeAllMapLayers()


def test_a_model_chains_detection_into_evaluation(provider, tmp_path) -> None:
    import processing

    model = QgsProcessingModelAlgorithm("detect then score", "tests")
    cva = QgsProcessingModelChildAlgorithm("rs_peft:change_cva")
    cva.setChildId("cva")
    for name, value in (("before", BEFORE), ("after", AFTER), ("out_dir", tmp_path / "model")):
        cva.addParameterSources(name, [QgsProcessingModelChildParameterSource.fromStaticValue(str(value))])
    model.addChildAlgorithm(cva)
    evaluate = QgsProcessingModelChildAlgorithm("rs_peft:change_evaluate")
    evaluate.setChildId("evaluate")
    evaluate.addParameterSources("prediction", [QgsProcessingModelChildParameterSource.fromChildOutput("cva", "mask")])
    evaluate.addParameterSources("reference", [QgsProcessingModelChildParameterSource.fromStaticValue(str(LABEL))])
    model.addChildAlgorithm(evaluate)
    results = processing.run(model, {})
    assert 0.05 < json.loads(results["CHILD_RESULTS"]["evaluate"][METRICS])["f1"] < 1.0


def install_like_a_user(root: Path) -> tuple[dict[str, str], Path]:
    """The plugin folder as `make package` builds it, found through QGIS_PLUGINPATH, enabled and pointed at
    the backend interpreter in a fresh QGIS profile (QGIS_CUSTOM_CONFIG_PATH). Returns (env, package)."""
    package = root / "plugins" / "rs_peft_qgis"
    shutil.copytree(ROOT / "rs_peft_qgis", package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("backend", "resources"):
        shutil.copytree(ROOT / name, package / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("metadata.txt", "LICENSE"):
        shutil.copy(ROOT / name, package / name)
    ini = root / "config" / "profiles" / "default" / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True)
    # A copied plugin has no .venv above it: the backend interpreter comes from the plugin's settings.
    ini.write_text(f"[PythonPlugins]\nrs_peft_qgis=true\n\n[rs_peft_qgis]\nbackend_python={BACKEND_PYTHON}\n")
    env = {
        **os.environ,  # RS_PEFT_QGIS_* (the tests' temporary adapter library, cache, logs) pass through
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(root / "config"),
        "QGIS_PLUGINPATH": str(root / "plugins"),
    }
    return env, package


@pytest.mark.skipif(shutil.which("qgis_process") is None, reason="qgis_process is not installed")
def test_qgis_process_runs_change_cva_end_to_end(tmp_path) -> None:
    assert "def initProcessing" in (ROOT / "rs_peft_qgis" / "plugin.py").read_text(), (
        "plugin.py must register the provider in initProcessing() for qgis_process"
    )
    env, _ = install_like_a_user(tmp_path)
    out_dir = tmp_path / "out"
    cmd = ["qgis_process", "--json", "run", "rs_peft:change_cva", "--"]
    # Paths relative to the caller's folder, as typed in a terminal (the worker runs elsewhere).
    cmd += [f"before={os.path.relpath(BEFORE, tmp_path)}", f"after={AFTER}", "out_dir=out"]
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    print(f"qgis_process run change_cva: {time.monotonic() - start:.1f} s")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    answer = json.loads(done.stdout)
    results = answer["results"]
    assert answer["algorithm_details"]["id"] == "rs_peft:change_cva"
    for key in ("probability", "mask", "polygons"):
        assert Path(results[key]).parent == out_dir and Path(results[key]).is_file(), key
    assert Path(results[OUTPUT_FOLDER]) == out_dir
    assert json.loads(results[METRICS])["polygons"] > 0

    # Bad input: a non-zero exit code and the plain message, no traceback, no output files.
    far_before, _, _ = levir("test_77_0512_0256")
    _, near_after, _ = levir("test_2_0000_0000")
    bad = tmp_path / "bad"
    cmd = ["qgis_process", "run", "rs_peft:change_cva", "--"]
    cmd += [f"before={far_before}", f"after={near_after}", f"out_dir={bad}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "do not overlap" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    assert files_in(bad) == []
