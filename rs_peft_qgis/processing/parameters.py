"""Processing parameters for catalog parameters, named exactly as the backend names them, and the
algorithms' help text."""

from __future__ import annotations

from qgis.core import (
    Qgis,
    QgsProcessing,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
)

from rs_peft_qgis.catalog import JobInfo, ParamInfo
from rs_peft_qgis.settings import Settings

METRICS = "METRICS"
ADAPTER_HELP = (
    "The adapters in the library are listed in the RS PEFT panel's adapter picker, or in a terminal "
    "(in the plugin folder) with `<backend python> -m backend adapters list`."
)

# QGIS >= 3.36 has scoped enums; the old names disappear in QGIS 4 (Qt6), the new ones are missing in 3.34.
_SCOPED = hasattr(Qgis, "ProcessingParameterFlag")
ADVANCED = Qgis.ProcessingParameterFlag.Advanced if _SCOPED else QgsProcessingParameterDefinition.FlagAdvanced
POLYGONS = Qgis.ProcessingSourceType.VectorPolygon if _SCOPED else QgsProcessing.TypeVectorPolygon
ANY_GEOMETRY = Qgis.ProcessingSourceType.VectorAnyGeometry if _SCOPED else QgsProcessing.TypeVectorAnyGeometry
INTEGER = Qgis.ProcessingNumberParameterType.Integer if _SCOPED else QgsProcessingParameterNumber.Integer
DOUBLE = Qgis.ProcessingNumberParameterType.Double if _SCOPED else QgsProcessingParameterNumber.Double
ANY_FIELD = Qgis.ProcessingFieldParameterDataType.Any if _SCOPED else QgsProcessingParameterField.Any


def is_advanced(p: ParamInfo) -> bool:
    """Secondary settings fold under "Advanced parameters": optional plain values (layers, fields of a
    layer, the output folder and the few prominent settings such as the sensor stay in view)."""
    return not p.required and not p.is_layer and p.kind not in ("folder", "field") and not p.prominent


def make_parameter(p: ParamInfo) -> QgsProcessingParameterDefinition:
    """The Processing parameter for a catalog parameter, named exactly as the backend names it."""
    optional = not p.required
    label = p.label
    preferred = Settings.load().job_default(p.name)  # the device chosen in the plugin's settings
    if p.choices and not p.editable and not p.is_layer and p.kind not in ("folder", "field"):
        # Static strings: the value is the choice itself (mode=scd on qgis_process, not mode=1).
        options = [str(c) for c in p.choices]
        default = next((str(v) for v in (preferred, p.default) if v is not None and str(v) in options), None)
        param: QgsProcessingParameterDefinition = QgsProcessingParameterEnum(
            p.name, label, options, False, default, optional, True
        )
    elif p.kind == "raster":
        param = QgsProcessingParameterRasterLayer(p.name, label, optional=optional)
    elif p.kind == "vector":
        param = QgsProcessingParameterVectorLayer(p.name, label, [ANY_GEOMETRY], optional=optional)
    elif p.kind == "polygons":
        # A feature source, so the toolbox's "Selected features only" works for an area of interest.
        param = QgsProcessingParameterFeatureSource(p.name, label, [POLYGONS], optional=optional)
    elif p.kind == "layer":
        param = QgsProcessingParameterMapLayer(p.name, label, optional=optional)
    elif p.kind == "folder":
        param = QgsProcessingParameterFolderDestination(
            p.name, label, defaultValue=QgsProcessing.TEMPORARY_OUTPUT, optional=optional
        )
    elif p.kind == "field":
        param = QgsProcessingParameterField(
            p.name, label, parentLayerParameterName=p.parent, type=ANY_FIELD, optional=optional
        )
    elif p.kind == "bool":
        param = QgsProcessingParameterBoolean(p.name, label, bool(p.default), optional=optional)
    elif p.kind in ("int", "float"):
        number_type = INTEGER if p.kind == "int" else DOUBLE
        param = QgsProcessingParameterNumber(p.name, label, number_type, p.default, optional)
        if p.minimum is not None:  # the catalog's range, as in the panel's spin boxes
            param.setMinimum(p.minimum)
        if p.maximum is not None:
            param.setMaximum(p.maximum)
    else:  # string, editable choices, adapter, bands, ints and any kind this plugin version does not know yet
        default = preferred if preferred is not None else p.default
        if isinstance(default, list | tuple):
            default = ",".join(str(x) for x in default)
        param = QgsProcessingParameterString(p.name, label, default, optional=optional)
    param.setHelp(param_help(p))
    if is_advanced(p):
        param.setFlags(param.flags() | ADVANCED)
    return param


def param_help(p: ParamInfo) -> str:
    if p.kind == "adapter":
        return f"{p.help} {ADAPTER_HELP}"
    if p.kind in ("bands", "ints"):
        return f"{p.help} Comma-separated numbers, e.g. 1,2,3."
    if p.choices and p.editable:
        return f"{p.help} Suggested values: {', '.join(str(c) for c in p.choices)}."
    return p.help


def short_help(job: JobInfo) -> str:
    rows = []
    for p in job.params:
        need = "" if p.required else " (optional)"
        rows.append(f"<li><b>{p.label}</b> <code>{p.name}</code>{need}: {param_help(p)}</li>")
    outs = "".join(f"<li><b>{o.description}</b> <code>{o.key}</code></li>" for o in job.outputs)
    text = f"<p>{job.summary}</p><p>Parameters:</p><ul>{''.join(rows)}</ul>"
    if outs:
        text += f"<p>Outputs:</p><ul>{outs}</ul>"
    text += f"<p>Metrics: the {METRICS} output holds the job's scores as JSON.</p>"
    return text
