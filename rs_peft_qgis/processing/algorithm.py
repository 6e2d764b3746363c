"""One Processing algorithm per backend job, built from its catalog entry (no per-job code).

Parameter names are the backend's own snake_case names, so `qgis_process run rs_peft:change_cva --
before=a.tif after=b.tif out_dir=out` reads like `python -m backend change.cva --before a.tif ...`.
Layers are resolved to files on the main thread (prepareAlgorithm); the job itself runs on the shared
worker process, so processAlgorithm is safe in Processing's background thread.
"""

from __future__ import annotations

import json
import os
import queue
import uuid
from pathlib import Path
from typing import Any

from qgis.core import (
    Qgis,
    QgsMapLayer,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputFile,
    QgsProcessingOutputFolder,
    QgsProcessingOutputRasterLayer,
    QgsProcessingOutputString,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterEnum,
    QgsProcessingUtils,
    QgsRasterLayer,
    QgsWkbTypes,
)
from qgis.PyQt import sip
from qgis.PyQt.QtGui import QIcon

from rs_peft_qgis.backend_env import backend_root
from rs_peft_qgis.catalog import JobInfo, ParamInfo
from rs_peft_qgis.layers import LayerError, export_vector, file_source, job_input, safe_name, styles_dir
from rs_peft_qgis.processing.parameters import ANY_GEOMETRY, METRICS, make_parameter, short_help
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.worker_client import RpcError

OUTPUT_FOLDER = "OUTPUT_FOLDER"
ADAPTER = "ADAPTER"
POLL_S = 0.2
CANCELLED_TEXT = "The job was cancelled. No output was written."

_RASTER_CAPS = getattr(Qgis, "RasterInterfaceCapability", None)  # 3.38+

# Python-made post-processors must outlive the algorithm run: the context owns the C++ side and calls it
# later on the main thread, but nothing keeps the Python side alive, and a collected one crashes QGIS
# (known PyQGIS pitfall). Kept here until the context deleted its C++ object.
_POST_PROCESSORS: list[StylePostProcessor] = []


class StylePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Applies a result's QML style once Processing loaded it into the project."""

    def __init__(self, qml: Path) -> None:
        super().__init__()
        self.qml = qml

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext, feedback: QgsProcessingFeedback):
        if layer is None or not layer.isValid():
            return
        message, ok = layer.loadNamedStyle(str(self.qml))
        if not ok and feedback is not None:
            feedback.pushWarning(f"The style {self.qml.name} could not be applied: {message}")
        layer.triggerRepaint()


class JobAlgorithm(QgsProcessingAlgorithm):
    """Runs one catalog job on the shared backend worker."""

    def __init__(self, job: JobInfo, group_title: str) -> None:
        super().__init__()
        self.job = job
        self.group_title = group_title
        self._job_params: dict[str, Any] = {}
        self._prepare_error = ""

    # --- description ----------------------------------------------------------------------------
    def name(self) -> str:
        return self.job.name.replace(".", "_")

    def displayName(self) -> str:
        return self.job.title

    def group(self) -> str:
        return self.group_title

    def groupId(self) -> str:
        return self.job.task

    def shortDescription(self) -> str:
        return self.job.summary

    def shortHelpString(self) -> str:
        return short_help(self.job)

    def tags(self) -> list[str]:
        return ["rs peft", "foundation model", self.job.task, self.group_title.lower(), self.job.name]

    def icon(self) -> QIcon:
        return QIcon(str(backend_root() / "resources" / "icons" / "rs_peft.svg"))

    def createInstance(self) -> JobAlgorithm:
        return JobAlgorithm(self.job, self.group_title)

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:
        for p in self.job.params:
            self.addParameter(make_parameter(p))
        for out in self.job.outputs:
            if out.kind == "raster":
                self.addOutput(QgsProcessingOutputRasterLayer(out.key, out.description))
            elif out.kind == "vector":
                self.addOutput(QgsProcessingOutputVectorLayer(out.key, out.description, ANY_GEOMETRY))
            else:
                self.addOutput(QgsProcessingOutputFile(out.key, out.description))
        if self._folder_param() is not None:
            self.addOutput(QgsProcessingOutputFolder(OUTPUT_FOLDER, "Output folder"))
        if self.job.trains:
            self.addOutput(QgsProcessingOutputString(ADAPTER, "Adapter name"))
        self.addOutput(QgsProcessingOutputString(METRICS, "Metrics (JSON)"))

    def _folder_param(self) -> ParamInfo | None:
        return next((p for p in self.job.params if p.kind == "folder"), None)

    # --- parameters -> job parameters (main thread) ---------------------------------------------
    def prepareAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext, feedback) -> bool:
        # Layers live on the main thread: resolve and export them here, not in processAlgorithm. A problem
        # is raised from processAlgorithm: QGIS swallows exceptions from prepare (processing.run would only
        # say "There were errors executing the algorithm").
        work_dir = Path(QgsProcessingUtils.tempFolder(context)) / f"rs_peft_{uuid.uuid4().hex[:8]}"
        params: dict[str, Any] = {}
        self._prepare_error = ""
        try:
            for p in self.job.params:
                value = self._job_value(p, parameters, context, feedback, work_dir)
                if value is not None and (p.is_layer or p.kind == "folder"):
                    # The worker runs in its own folder: a relative path (qgis_process) must not reach it.
                    value = os.path.abspath(value)
                if value is not None:
                    params[p.name] = value
        except (LayerError, QgsProcessingException) as exc:
            self._prepare_error = str(exc)
        self._job_params = params
        return True

    def _job_value(
        self, p: ParamInfo, parameters: dict[str, Any], context: QgsProcessingContext, feedback, work_dir: Path
    ) -> Any:
        definition = self.parameterDefinition(p.name)
        raw = parameters.get(p.name, definition.defaultValue())
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None
        if isinstance(definition, QgsProcessingParameterEnum):
            text = self.parameterAsEnumString(parameters, p.name, context)
            return next((c for c in p.choices or () if str(c) == text), text or None)
        kind = p.kind
        if kind == "raster":
            return self._layer_file(p, self.parameterAsRasterLayer(parameters, p.name, context), raw, work_dir)
        if kind == "vector":
            return self._layer_file(p, self.parameterAsVectorLayer(parameters, p.name, context), raw, work_dir)
        if kind == "layer":
            return self._layer_file(p, self.parameterAsLayer(parameters, p.name, context), raw, work_dir)
        if kind == "polygons":
            return self._polygons_file(p, parameters, context, feedback, raw, work_dir)
        if kind == "folder":
            return self.parameterAsFileOutput(parameters, p.name, context) or None
        if kind == "field":
            as_strings = getattr(self, "parameterAsStrings", None) or self.parameterAsFields  # 3.34 has no Strings
            names = as_strings(parameters, p.name, context)
            return names[0] if names else None
        if kind == "bool":
            return self.parameterAsBoolean(parameters, p.name, context)
        if kind == "int":
            return self.parameterAsInt(parameters, p.name, context)
        if kind == "float":
            return self.parameterAsDouble(parameters, p.name, context)
        text = self.parameterAsString(parameters, p.name, context).strip()
        return text or None

    def _layer_file(self, p: ParamInfo, layer: QgsMapLayer | None, raw: Any, work_dir: Path) -> str:
        if layer is None or not layer.isValid():
            raise QgsProcessingException(f"'{p.label}': QGIS cannot open '{raw}' as a layer.")
        if p.kind == "raster" and not isinstance(layer, QgsRasterLayer):
            raise QgsProcessingException(f"'{p.label}' must be a raster layer; '{layer.name()}' is not one.")
        if isinstance(layer, QgsRasterLayer) and file_source(layer) is None:
            provider = layer.dataProvider()
            size = _RASTER_CAPS.Size if _RASTER_CAPS is not None else provider.Size
            if not (provider.capabilities() & size and provider.xSize() > 0):
                # Web maps have no pixel size; Processing has no place to ask for one.
                raise QgsProcessingException(
                    f"'{layer.name()}' is a web map without a pixel size of its own. Save it as a GeoTIFF "
                    "first (right-click > Export > Save As…), or run the job from the RS PEFT panel, which "
                    "exports it over the area of interest."
                )
        return job_input(layer, work_dir)

    def _polygons_file(
        self, p: ParamInfo, parameters: dict[str, Any], context: QgsProcessingContext, feedback, raw, work_dir: Path
    ) -> str:
        definition = raw if isinstance(raw, QgsProcessingFeatureSourceDefinition) else None
        plain = parameters
        if definition is not None:  # "Selected features only" etc.: the layer is the definition's source
            source = definition.source.valueAsString(context.expressionContext(), "")
            plain = {**parameters, p.name: source[0] if isinstance(source, tuple) else source}
        layer = self.parameterAsVectorLayer(plain, p.name, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(f"'{p.label}': QGIS cannot open '{plain[p.name]}' as a vector layer.")
        if layer.geometryType() != QgsWkbTypes.PolygonGeometry:
            raise QgsProcessingException(f"'{p.label}' must be polygons; '{layer.name()}' is not a polygon layer.")
        if definition is not None and definition.selectedFeaturesOnly:
            work_dir.mkdir(parents=True, exist_ok=True)
            return export_vector(layer, work_dir / f"{safe_name(layer.name())}_selected.gpkg", True)
        if definition is not None and (definition.featureLimit >= 0 or definition.filterExpression):
            # Processing's own export honours the limit and the filter; an empty format list forces it.
            return self.parameterAsCompatibleSourceLayerPath(parameters, p.name, context, [], "gpkg", feedback)
        return job_input(layer, work_dir)

    # --- the job (any thread) -------------------------------------------------------------------
    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext, feedback) -> dict:
        feedback = feedback or QgsProcessingFeedback()
        if self._prepare_error:
            raise QgsProcessingException(self._prepare_error)
        params = dict(self._job_params)
        events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        try:
            client = SESSION.client()
            # The worker calls back from its reader thread; feedback is used from this thread only.
            handle = client.start_job(
                self.job.name,
                params,
                on_progress=lambda fraction, stage, message: events.put(("progress", fraction, stage, message)),
                on_log=lambda level, message, data=None: events.put(("log", level, message, data)),
            )
        except RpcError as exc:
            raise QgsProcessingException(str(exc)) from None
        warned: set[str] = set()
        cancel_sent = False
        while not handle.done.wait(POLL_S):
            self._report(events, feedback, warned)
            if feedback.isCanceled() and not cancel_sent:
                feedback.pushInfo("Cancelling the job…")
                client.cancel(handle.job_id)  # the worker stops within about a second and keeps running
                cancel_sent = True
        self._report(events, feedback, warned)
        outcome = handle.outcome or {}
        if outcome.get("status") != "finished":
            if cancel_sent or outcome.get("code") == "CANCELLED":
                raise QgsProcessingException(CANCELLED_TEXT)
            message = outcome.get("message") or "The job failed."
            hint = outcome.get("hint")
            raise QgsProcessingException(f"{message} {hint}" if hint else message)
        for warning in outcome.get("warnings") or []:
            if warning not in warned:
                feedback.pushWarning(warning)
        return self._results(outcome, params, context)

    def _report(self, events: queue.SimpleQueue, feedback: QgsProcessingFeedback, warned: set[str]) -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "progress":
                _, fraction, stage, message = event
                feedback.setProgress(100.0 * fraction)
                feedback.setProgressText(f"{stage}: {message}" if message else stage)
            else:
                _, level, message, _data = event
                if level == "warning":
                    warned.add(message)
                    feedback.pushWarning(message)
                elif level == "error":
                    feedback.reportError(message, False)
                else:  # info, and the fine-tune's per-epoch records ("epoch")
                    feedback.pushInfo(message)

    def _results(self, outcome: dict[str, Any], params: dict[str, Any], context: QgsProcessingContext) -> dict:
        results: dict[str, Any] = {}
        for out in outcome.get("outputs") or []:
            results[out["key"]] = out["path"]
            self._load_on_completion(out, context)
        folder = self._folder_param()
        if folder is not None and folder.name in params:
            results[OUTPUT_FOLDER] = results[folder.name] = params[folder.name]
        if self.job.trains:
            results[ADAPTER] = params.get("adapter_name", "")
        results[METRICS] = json.dumps(outcome.get("metrics") or {}, sort_keys=True)
        return results

    def _load_on_completion(self, out: dict[str, Any], context: QgsProcessingContext) -> None:
        """Open a result in the project when Processing finishes (toolbox, batch, modeler), styled."""
        if out.get("kind") not in ("raster", "vector"):
            return
        details = QgsProcessingContext.LayerDetails(out.get("layer_name") or out["key"], context.project(), out["key"])
        details.groupName = self.job.title
        details.layerSortKey = 1 if out["kind"] == "vector" else 0  # outlines above the rasters
        # A shipped style by name, else a style the job wrote beside the file (land cover's, naming the adapter's
        # classes), which QGIS's own layer loading would pick up but Processing's does not.
        qml = styles_dir() / out["style"] if out.get("style") else Path(out["path"]).with_suffix(".qml")
        if qml.is_file():
            processor = StylePostProcessor(qml)
            _POST_PROCESSORS[:] = [p for p in _POST_PROCESSORS if not sip.isdeleted(p)]
            _POST_PROCESSORS.append(processor)
            details.setPostProcessor(processor)
        context.addLayerToLoadOnCompletion(out["path"], details)
