"""objects.finetune -> adapter -> objects.segment on a real SpaceNet-4 scene (Atlanta, 0.5 m panchromatic) with its
real building footprints, and the jobs' refusals.

The encoder is the miniature ViT with random frozen weights (the Uni-Perceiver checkpoint cannot be downloaded
here); the same code runs the ViT-L when `models fetch uniperceiver_vit_l` has installed it.
"""

from __future__ import annotations

import json
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from conftest import DATA
from rasterio.features import rasterize
from rasterio.warp import transform_geom

from backend import adapters
from backend.context import JobContext
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.protocol import JobError
from backend.training.image_data import load_labelled_image

SN4 = DATA / "spacenet4"
PAN, FOOTPRINTS = SN4 / "pan.tif", SN4 / "geotiff_labels.geojson"
FAST = {
    "backbone": "vit_tiny",
    "allow_random_backbone": True,
    "epochs": 2,
    "steps_per_epoch": 3,
    "batch_size": 2,
    "patch_size": 128,
    "overwrite": True,
}


def run(job: str, **params: object) -> object:
    spec = JOBS[job]
    return run_job(spec, spec.validate(params), JobContext())


def footprints_in_4326(path: Path, kinds: bool = False) -> Path:
    """The footprints reprojected to EPSG:4326 (another CRS than the image's UTM); with `kinds`, a text class
    field: footprints alternate between 'house' and 'shed'."""
    with fiona.open(FOOTPRINTS) as src:
        crs = src.crs
        feats = [f for f in src if f.geometry and f.geometry.type in ("Polygon", "MultiPolygon")]
    schema = {"geometry": "Polygon", "properties": {"kind": "str"}}
    with fiona.open(path, "w", driver="GPKG", crs="EPSG:4326", schema=schema) as out:
        for i, f in enumerate(feats):
            geom = transform_geom(crs, "EPSG:4326", dict(f.geometry.__geo_interface__))
            if geom["type"] != "Polygon":
                continue
            out.write({"geometry": geom, "properties": {"kind": ("house", "shed")[i % 2] if kinds else "x"}})
    return path


def footprint_mask(path: Path) -> Path:
    """The footprints burnt on the image's grid: a reference mask (1 = building)."""
    with fiona.open(FOOTPRINTS) as src, rasterio.open(PAN) as img:
        mask = rasterize(((f.geometry, 1) for f in src), out_shape=img.shape, transform=img.transform, dtype="uint8")
        profile = img.profile | {"dtype": "uint8", "nodata": None}
    with rasterio.open(path, "w", **profile) as out:
        out.write(mask[None])
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weft")
    mp = pytest.MonkeyPatch()
    mp.setenv("RS_PEFT_QGIS_ADAPTER_DIR", str(root / "adapters"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def buildings(library: Path) -> tuple[object, Path]:
    labels = footprints_in_4326(library / "footprints_4326.gpkg")
    trained = run("objects.finetune", image=str(PAN), labels=str(labels), adapter_name="buildings", **FAST)
    return trained, labels


def test_finetune_on_labels_in_another_crs_then_segment_the_scene(buildings: tuple, library: Path) -> None:
    trained, _ = buildings
    assert any("randomly initialised" in w or "miniature" in w for w in trained.warnings)
    m = trained.metrics
    assert m["adapter"] == "buildings" and 0 < m["trainable_parameters"] < m["total_parameters"]
    assert 0 <= m["val_miou"] <= 1 and 1 <= m["best_epoch"] <= 2
    state, meta = adapters.load("buildings")
    assert meta.method == "weft" and meta.backbone == "vit_tiny" and meta.bands == [1, 1, 1]  # grey as RGB
    assert meta.classes == ["background", "object"] and meta.training_area["crs"] == "EPSG:32616"
    assert all(k.startswith(("extractor.", "interactions.", "fusion_norms.", "head.")) for k in state)

    out = library / "out"
    result = run(
        "objects.segment",
        image=str(PAN),
        adapter="buildings",
        out_dir=str(out),
        reference=str(footprint_mask(library / "footprints.tif")),
        tile_size=256,
    )
    paths = {o.key: Path(o.path) for o in result.outputs}
    assert set(paths) == {"probability", "mask", "polygons"}
    with rasterio.open(PAN) as src, rasterio.open(paths["probability"]) as prob, rasterio.open(paths["mask"]) as mask:
        assert (prob.crs, prob.transform, prob.shape) == (src.crs, src.transform, src.shape)
        p = prob.read(1)
        assert np.all((p >= 0) & (p <= 1))
        # The threshold is the adapter's, chosen on its validation patches.
        assert result.metrics["threshold"] == meta.metrics["val_threshold"]
        assert np.array_equal(mask.read(1), (p > result.metrics["threshold"]).astype(np.uint8))
    assert {"precision", "recall", "f1", "iou"} <= set(result.metrics)
    # A low threshold, so that this briefly trained miniature surely marks objects.
    low = run("objects.segment", image=str(PAN), adapter="buildings", out_dir=str(library / "low"), threshold=0.05)
    polygons = next(Path(o.path) for o in low.outputs if o.key == "polygons")
    with fiona.open(polygons) as polys:
        assert {"class", "class_name", "area_m2", "confidence"} <= set(polys.schema["properties"])
        rows = list(polys)
    assert rows and all(r.properties["class_name"] == "object" and r.properties["area_m2"] > 0 for r in rows)
    assert low.metrics["object_pixels"] > 0 and low.metrics["threshold"] == 0.05


def test_a_class_field_of_names_gives_a_multi_class_adapter_and_class_raster(library: Path) -> None:
    labels = footprints_in_4326(library / "kinds.gpkg", kinds=True)
    run("objects.finetune", image=str(PAN), labels=str(labels), label_field="kind", adapter_name="kinds", **FAST)
    _, meta = adapters.load("kinds")
    assert meta.classes == ["background", "house", "shed"] and meta.config["num_classes"] == 3
    result = run("objects.segment", image=str(PAN), adapter="kinds", out_dir=str(library / "kinds"), threshold=0.3)
    paths = {o.key: Path(o.path) for o in result.outputs}
    assert paths["classes"].name == "weft_object_classes.tif"
    with rasterio.open(paths["classes"]) as classes, rasterio.open(paths["mask"]) as mask:
        c, mk = classes.read(1), mask.read(1)
    assert set(np.unique(c)) <= {0, 1, 2} and np.array_equal(c > 0, mk == 1)
    with fiona.open(paths["polygons"]) as polys:
        assert {r.properties["class_name"] for r in polys} <= {"house", "shed"}
    assert result.metrics["classes"] == ["house", "shed"]


def test_refusals_are_plain(buildings: tuple, library: Path, tmp_path: Path) -> None:
    _, labels = buildings
    elsewhere = tmp_path / "elsewhere.geojson"
    elsewhere.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
                    }
                ],
            }
        )
    )
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(JobError, match="cannot be placed in the raster's coordinate system"):
        run("objects.finetune", image=str(PAN), labels=str(labels), aoi=str(elsewhere), adapter_name="x", **FAST)
    # Labels 10 km away from an AOI that covers the scene.
    with rasterio.open(PAN) as src:
        left, bottom, right, top = src.bounds
    box = [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]
    far = [[x + 10_000, y] for x, y in box]
    aoi, away = (tmp_path / "aoi.gpkg", tmp_path / "away.gpkg")
    for path, ring in ((aoi, box), (away, far)):
        schema = {"geometry": "Polygon", "properties": {}}
        with fiona.open(path, "w", driver="GPKG", crs="EPSG:32616", schema=schema) as out:
            out.write({"geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}})
    with pytest.raises(JobError, match="None of the label polygons lies inside the area of interest"):
        run("objects.finetune", image=str(PAN), labels=str(away), aoi=str(aoi), adapter_name="x", **FAST)
    with pytest.raises(JobError, match="contains no polygons"):
        run("objects.finetune", image=str(PAN), labels=str(empty), adapter_name="x", **FAST)
    with pytest.raises(JobError, match="takes three bands"):
        run("objects.finetune", image=str(PAN), labels=str(labels), bands=[1, 1], adapter_name="x", **FAST)
    # An RGB-trained adapter on a one-band raster: its bands 2 and 3 do not exist there.
    rgb = tmp_path / "rgb.tif"
    with rasterio.open(PAN) as src:
        profile = src.profile | {"count": 3}
        data = np.repeat(src.read(), 3, axis=0)
    with rasterio.open(rgb, "w", **profile) as dst:
        dst.write(data)
    run("objects.finetune", image=str(rgb), labels=str(labels), adapter_name="rgb", **FAST)
    with pytest.raises(JobError, match="do not exist"):
        run("objects.segment", image=str(PAN), adapter="rgb", out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(JobError, match="trained on the vit_tiny backbone"):
        run("objects.segment", image=str(PAN), adapter="buildings", out_dir=str(tmp_path / "o"), backbone="x")


def test_class_names_become_classes_and_background_is_class_0(tmp_path: Path) -> None:
    """Exported review labels: accepted objects keep their class name, rejected ones are 'background'."""
    with rasterio.open(PAN) as src:
        left, top = src.bounds.left, src.bounds.top

    def square(x: float, y: float) -> dict:
        ring = [[left + x, top - y], [left + x + 20, top - y], [left + x + 20, top - y - 20], [left + x, top - y - 20]]
        return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}

    path = tmp_path / "reviewed.gpkg"
    schema = {"geometry": "Polygon", "properties": {"class": "str"}}
    with fiona.open(path, "w", driver="GPKG", crs="EPSG:32616", schema=schema) as out:
        for i, name in enumerate(("tank", "background", "ship", "tank", "Background")):
            out.write({"geometry": square(40 * i, 40), "properties": {"class": name}})
    area, names = load_labelled_image(str(PAN), str(path), bands=[1, 1, 1], label_field="class")
    assert names == ["ship", "tank"]
    # Pixel (row, col) inside each square: 40 m down, 40·i + 10 m right, 0.5 m pixels.
    values = [int(area.label[100, (40 * i + 10) * 2]) for i in range(5)]
    assert values == [2, 0, 1, 2, 0]
