"""QGIS layers <-> files for jobs: which file a job reads, exports over an area, areas of interest,
and the styled result layers added after a job."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)

from rs_peft_qgis.backend_env import backend_root


class LayerError(ValueError):
    """A layer cannot be used for a job; the message is for the analyst."""


def styles_dir() -> Path:
    return backend_root() / "resources" / "styles"


def file_source(layer: QgsMapLayer) -> str | None:
    """The local file a job can read directly, or None when the layer must be exported first
    (web and memory layers, a filtered layer, one table of a multi-layer file)."""
    if isinstance(layer, QgsRasterLayer):
        if layer.providerType() != "gdal":
            return None
        parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
        path = parts.get("path") or ""
        return path if Path(path).is_file() and not parts.get("layerName") else None
    if isinstance(layer, QgsVectorLayer):
        if layer.providerType() != "ogr" or layer.subsetString():
            return None
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path") or ""
        if not Path(path).is_file():
            return None
        if (parts.get("layerName") or parts.get("layerId") is not None) and len(layer.dataProvider().subLayers()) > 1:
            return None  # the backend reads a file's first table: export this one
        return path
    return None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:60] or "layer"


def export_raster(
    layer: QgsRasterLayer, path: Path, extent: QgsRectangle | None = None, resolution: float | None = None
) -> str:
    """Write a raster layer (any provider) to GeoTIFF over `extent` (layer CRS; default: the whole layer).

    Layers with pixels of their own keep them (at `resolution` when given); web layers have none and
    are rendered as RGB(A) images at `resolution` map units per pixel (required for them).
    """
    provider = layer.dataProvider()
    if provider is None or not layer.isValid():
        raise LayerError(f"The layer '{layer.name()}' cannot be read.")
    full = layer.extent()
    area = full if extent is None else full.intersect(extent)
    if area.isEmpty():
        raise LayerError(f"The area of interest does not overlap the layer '{layer.name()}'.")
    native = provider.capabilities() & provider.Size and provider.xSize() > 0
    if resolution is None:
        if not native:
            raise LayerError(
                f"The layer '{layer.name()}' has no pixel size of its own; give a resolution to export it."
            )
        resolution = full.width() / provider.xSize()
    cols, rows = max(1, round(area.width() / resolution)), max(1, round(area.height() / resolution))
    if cols * rows > 40_000 * 40_000:
        raise LayerError(
            f"Exporting '{layer.name()}' over this area would make a {cols}×{rows} image; choose a smaller area."
        )
    pipe = QgsRasterPipe()
    if not pipe.set(provider.clone()):
        raise LayerError(f"The layer '{layer.name()}' cannot be exported.")
    writer = QgsRasterFileWriter(str(path))
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    if not native or provider.dataType(1) in (Qgis.DataType.ARGB32, Qgis.DataType.ARGB32_Premultiplied):
        # A web map is colours: with the renderer in the pipe the writer stores what QGIS draws (RGBA).
        pipe.set(layer.renderer().clone())
    error = writer.writeRaster(pipe, cols, rows, area, layer.crs(), QgsProject.instance().transformContext())
    if error != QgsRasterFileWriter.NoError or not path.is_file():
        raise LayerError(f"Exporting the layer '{layer.name()}' failed (error {int(error)}).")
    return str(path)


def export_vector(
    layer: QgsVectorLayer, path: Path, selected_only: bool = False, crs: QgsCoordinateReferenceSystem | None = None
) -> str:
    """Write a vector layer (or its selected features) to a GeoPackage, optionally reprojected."""
    if selected_only and layer.selectedFeatureCount() == 0:
        raise LayerError(f"No feature of '{layer.name()}' is selected.")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = safe_name(layer.name())
    options.onlySelectedFeatures = selected_only
    # A GeoPackage's own fid would clash with the new file's (unsaved features carry "Autogenerate").
    keep = [i for i, f in enumerate(layer.fields()) if f.name().lower() != "fid"]
    if len(keep) < layer.fields().count():
        options.attributes = keep
        options.skipAttributeCreation = not keep
    if crs is not None and crs.isValid() and crs != layer.crs():
        options.ct = QgsCoordinateTransform(layer.crs(), crs, QgsProject.instance())
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, str(path), QgsProject.instance().transformContext(), options
    )
    if error != QgsVectorFileWriter.NoError:
        raise LayerError(f"Exporting the layer '{layer.name()}' failed: {message}")
    return str(path)


def job_input(layer: QgsMapLayer, work_dir: Path, extent: QgsRectangle | None = None, **kw: Any) -> str:
    """A file path a job can read for `layer`: its own file, or an export (over `extent`, layer CRS)."""
    path = file_source(layer)
    if path is not None:
        return path
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = work_dir / f"{safe_name(layer.name())}_{time.strftime('%Y%m%d_%H%M%S')}"
    if isinstance(layer, QgsRasterLayer):
        return export_raster(layer, stem.with_suffix(".tif"), extent, kw.get("resolution"))
    if isinstance(layer, QgsVectorLayer):
        return export_vector(layer, stem.with_suffix(".gpkg"))
    raise LayerError(f"The layer '{layer.name()}' is neither a raster nor a vector layer.")


def polygon_file(geometries: list[QgsGeometry], crs: QgsCoordinateReferenceSystem, path: Path, name: str) -> str:
    """A GeoPackage of polygons (an area of interest) in `crs`."""
    layer = QgsVectorLayer(f"Polygon?crs={crs.authid() or crs.toWkt()}", name, "memory")
    feats = []
    for geom in geometries:
        f = QgsFeature(layer.fields())
        f.setGeometry(geom)
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    return export_vector(layer, path)


def aoi_from_extent(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, work_dir: Path) -> str:
    """The map canvas extent (or any rectangle) as an area-of-interest file."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"aoi_extent_{time.strftime('%Y%m%d_%H%M%S')}.gpkg"
    return polygon_file([QgsGeometry.fromRect(extent)], crs, path, "area of interest")


def aoi_from_selection(layer: QgsVectorLayer, work_dir: Path) -> str:
    """The selected polygons of a layer as an area-of-interest file (clear error when none)."""
    if layer.geometryType() != QgsWkbTypes.PolygonGeometry:
        raise LayerError(f"'{layer.name()}' is not a polygon layer; an area of interest must be polygons.")
    work_dir.mkdir(parents=True, exist_ok=True)
    return export_vector(layer, work_dir / f"aoi_selection_{time.strftime('%Y%m%d_%H%M%S')}.gpkg", True)


def result_group(name: str, project: QgsProject | None = None) -> QgsLayerTreeGroup:
    """A new group at the top of the layer tree for one job's results."""
    root = (project or QgsProject.instance()).layerTreeRoot()
    return root.insertGroup(0, name)


def add_outputs(outputs: list[dict[str, Any]], group_name: str, project: QgsProject | None = None) -> list[QgsMapLayer]:
    """Open a job's outputs as layers, styled from resources/styles, in a group named after the job."""
    project = project or QgsProject.instance()
    layers: list[QgsMapLayer] = []
    for out in outputs:
        if out["kind"] == "raster":
            layer: QgsMapLayer = QgsRasterLayer(out["path"], out["layer_name"], "gdal")
        elif out["kind"] == "vector":
            layer = QgsVectorLayer(out["path"], out["layer_name"], "ogr")
        else:
            continue
        if not layer.isValid():
            raise LayerError(f"The result file {out['path']} could not be opened.")
        if out.get("style"):
            layer.loadNamedStyle(str(styles_dir() / out["style"]))
        layers.append(layer)
    if layers:
        group = result_group(group_name, project)
        # Vectors above rasters so outlines stay visible.
        for layer in sorted(layers, key=lambda x: not isinstance(x, QgsVectorLayer)):
            project.addMapLayer(layer, False)
            group.addLayer(layer)
    return layers
