"""landcover.adapt -> landcover.finetune -> landcover.map -> landcover.evaluate on real ukis-csmask tiles (Sentinel-2
and Landsat-7 reflectance with their clear/water/cloud/shadow masks), band wavelengths, and the jobs' refusals.

The encoder is the miniature Scale-MAE ViT with random frozen weights (the Scale-MAE checkpoint cannot be
downloaded here); the same code runs the ViT-L when `models fetch scalemae_vit_l` has installed it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from conftest import DATA, ROOT
from rasterio.features import shapes
from rasterio.warp import transform_geom
from test_cluster import assert_same_outputs

from backend import adapters
from backend.context import JobContext
from backend.io.wavelengths import SENSORS, parse_wavelengths, read_wavelengths, resampling_matrix
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.protocol import JobError

UKIS = DATA / "ukis"
S2, S2_CLASSES = UKIS / "sentinel2.tif", UKIS / "sentinel2_classes.tif"
L7, L7_CLASSES = UKIS / "landsat7.tif", UKIS / "landsat7_classes.tif"
NAMES = ("clear", "water", "cloud", "shadow")
FAST = {"backbone": "scalemae_tiny", "allow_random_backbone": True, "epochs": 2, "steps_per_epoch": 3}
FAST |= {"batch_size": 2, "overwrite": True}


def run(job: str, **params: object) -> object:
    spec = JOBS[job]
    return run_job(spec, spec.validate(params), JobContext())


def class_polygons(path: Path, raster: Path = S2_CLASSES, only: set[int] | None = None) -> Path:
    """The reference class raster as polygons in EPSG:4326 (not the raster's UTM) with a text field `cover`."""
    with rasterio.open(raster) as src:
        classes, crs, transform = src.read(1), src.crs, src.transform
    schema = {"geometry": "Polygon", "properties": {"cover": "str"}}
    with fiona.open(path, "w", driver="GPKG", crs="EPSG:4326", schema=schema) as out:
        for geom, value in shapes(classes, mask=classes > 0, transform=transform):
            if only is None or int(value) in only:
                geom = transform_geom(crs, "EPSG:4326", geom)
                out.write({"geometry": geom, "properties": {"cover": NAMES[int(value) - 1]}})
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spectralx")
    mp = pytest.MonkeyPatch()
    mp.setenv("RS_PEFT_QGIS_ADAPTER_DIR", str(root / "adapters"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def trained(library: Path) -> object:
    """Stage 1 on the Sentinel-2 tile, then stage 2 from it on class polygons in another CRS."""
    adapted = run("landcover.adapt", image=str(S2), adapter_name="s2-stage1", **FAST)
    assert adapted.metrics["val_reconstruction_loss"] > 0
    labels = class_polygons(library / "cover_4326.gpkg")
    return run(
        "landcover.finetune",
        image=str(S2),
        labels=str(labels),
        label_field="cover",
        init_adapter="s2-stage1",
        adapter_name="s2",
        **FAST,
    )


def test_adapt_then_finetune_keeps_the_wavelengths_classes_and_stage(trained: object) -> None:
    m = trained.metrics
    assert 0 < m["trainable_parameters"] < m["total_parameters"] and 0 <= m["val_miou"] <= 1
    _, first = adapters.load("s2-stage1")
    assert first.config["stage"] == "adapt" and first.classes == []
    assert first.config["wavelength_source"] == "raster metadata"
    _, meta = adapters.load("s2")
    assert meta.config["stage"] == "segment" and meta.config["init_adapter"] == "s2-stage1"
    assert meta.classes == ["unlabelled", *sorted(NAMES)] and meta.config["num_classes"] == 5
    assert meta.config["wavelengths"] == pytest.approx(SENSORS["sentinel2_6"][1], abs=0.01)


def test_map_on_a_local_ray_cluster_equals_the_map_of_one_machine(trained: object, library: Path) -> None:
    """`cluster landcover.map`: 4 parts on a Ray cluster started for the run. The scene normalization (a read of
    the whole image) is computed once, by the driver, and handed to the actors (`Application.scene`)."""
    single = run("landcover.map", image=str(S2), adapter="s2", out_dir=str(library / "map_one"))
    cmd = [sys.executable, "-m", "backend", "cluster", "landcover.map", "--address", "local", "--block-size", "96"]
    cmd += ["--image", str(S2), "--adapter", "s2", "--out-dir", str(library / "map_cluster"), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clustered = json.loads(proc.stdout)
    assert clustered["metrics"]["parts_computed"] == 4
    assert_same_outputs(single.to_dict(), clustered)  # classes exactly, confidence within 1e-5, same polygons


def test_map_writes_a_paletted_class_raster_confidence_and_named_polygons(trained: object, library: Path) -> None:
    out = library / "map"
    result = run("landcover.map", image=str(S2), adapter="s2", out_dir=str(out))
    paths = {o.key: Path(o.path) for o in result.outputs}
    assert set(paths) == {"classes", "confidence", "polygons"} and "class" in paths["classes"].name
    with rasterio.open(S2) as src, rasterio.open(paths["classes"]) as cls, rasterio.open(paths["confidence"]) as conf:
        assert (cls.crs, cls.transform, cls.shape) == (src.crs, src.transform, src.shape)
        c, p = cls.read(1), conf.read(1)
        colours = cls.colormap(1)
    assert set(np.unique(c)) <= {1, 2, 3, 4} and np.all((p > 0) & (p <= 1))
    assert all(colours[k][3] == 255 for k in range(1, 5)) and colours[0][3] == 0
    style = paths["classes"].with_suffix(".qml").read_text()
    assert all(f'label="{name}"' in style for name in NAMES)
    assert paths["polygons"].with_suffix(".qml").exists()
    with fiona.open(paths["polygons"]) as polys:
        rows = list(polys)
    assert rows and {r.properties["class_name"] for r in rows} <= set(NAMES)
    assert sum(result.metrics["class_fractions"].values()) == pytest.approx(1.0)

    # The adapter numbers its classes by name (sorted); the reference raster, renumbered so, is scored pixel by pixel.
    _, meta = adapters.load("s2")
    with rasterio.open(S2_CLASSES) as src:
        ref, profile = src.read(1), src.profile
    ref = np.array([0, *(meta.classes.index(n) for n in NAMES)], np.uint8)[ref]
    renumbered = library / "ref_adapter_numbers.tif"
    with rasterio.open(renumbered, "w", **profile) as dst:
        dst.write(ref[None])
    scored = run("landcover.evaluate", prediction=str(paths["classes"]), reference=str(renumbered)).metrics
    assert scored["scored_pixels"] == 256 * 256 and scored["oa"] == pytest.approx(np.mean(c == ref))
    # The reference as named polygons, numbered by the adapter's classes, gives the same scores.
    named = run(
        "landcover.evaluate",
        prediction=str(paths["classes"]),
        reference=str(class_polygons(library / "ref.gpkg")),
        reference_field="cover",
        adapter="s2",
    ).metrics
    assert named["oa"] == pytest.approx(scored["oa"], abs=0.02)  # polygon edges are burnt, not pixel-exact
    # With the adapter, a raster reference is told how its numbers are read, and numbers it cannot know are named.
    ref[:8] = 7
    with rasterio.open(renumbered, "w", **profile) as dst:
        dst.write(ref[None])
    told = run("landcover.evaluate", prediction=str(paths["classes"]), reference=str(renumbered), adapter="s2")
    assert any("1 = clear, 2 = cloud, 3 = shadow, 4 = water" in w for w in told.warnings)
    assert any("does not know (7)" in w for w in told.warnings)


def test_the_sentinel_2_adapter_maps_landsat_7_through_its_wavelengths(trained: object, library: Path) -> None:
    result = run("landcover.map", image=str(L7), sensor="landsat7", adapter="s2", out_dir=str(library / "l7"))
    assert any("resampled onto the adapter's 6 wavelengths" in w for w in result.warnings)
    classes = next(Path(o.path) for o in result.outputs if o.key == "classes")
    assert run("landcover.evaluate", prediction=str(classes), reference=str(L7_CLASSES)).metrics["oa"] > 0


def test_any_data_type_maps_alike_since_each_scene_is_standardised(trained: object, library: Path) -> None:
    """The Sentinel-2 tile as scaled integers (reflectance × 10,000 in uint16, as many products ship it) maps to
    the same classes as its float32 reflectance."""
    with rasterio.open(S2) as src:
        profile, data = src.profile, src.read()
        tags = [src.tags(b, ns="IMAGERY") for b in range(1, 7)]
    scaled = library / "s2_uint16.tif"
    with rasterio.open(scaled, "w", **(profile | {"dtype": "uint16", "predictor": 2})) as dst:
        dst.write(np.round(data * 10_000).astype(np.uint16))
        for b, t in enumerate(tags, 1):
            dst.update_tags(b, ns="IMAGERY", **t)
    maps = []
    for image, out in ((S2, "float"), (scaled, "uint16")):
        result = run("landcover.map", image=str(image), adapter="s2", out_dir=str(library / out))
        with rasterio.open(next(o.path for o in result.outputs if o.key == "classes")) as ds:
            maps.append(ds.read(1))
    assert np.mean(maps[0] == maps[1]) > 0.99  # the integers' rounding aside


def test_refusals_are_plain(trained: object, library: Path, tmp_path: Path) -> None:
    labels = class_polygons(tmp_path / "l7.gpkg", L7_CLASSES)
    with pytest.raises(JobError, match="does not say which wavelength"):
        run("landcover.finetune", image=str(L7), labels=str(labels), label_field="cover", adapter_name="x", **FAST)
    water = class_polygons(tmp_path / "water.gpkg", only={2})
    with pytest.raises(JobError, match="one land-cover class only"):
        run("landcover.finetune", image=str(S2), labels=str(water), label_field="cover", adapter_name="x", **FAST)
    with pytest.raises(JobError, match="5 wavelengths"):
        run("landcover.adapt", image=str(S2), wavelengths="490,560,665,842,1610", adapter_name="x", **FAST)
    with pytest.raises(JobError, match="stage-1"):
        run("landcover.map", image=str(S2), adapter="s2-stage1", out_dir=str(tmp_path / "o"))
    # Three bands of unknown wavelengths cannot stand in for the adapter's six …
    with pytest.raises(JobError, match="does not say which wavelength"):
        run("landcover.map", image=str(L7), bands=[1, 2, 3], adapter="s2", out_dir=str(tmp_path / "o"))
    # … nor can visible bands alone, whose wavelengths are known, give its infrared ones.
    with pytest.raises(JobError, match="outside what this raster measures"):
        run("landcover.map", image=str(S2), bands=[1, 2, 3], adapter="s2", out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_wavelengths_come_from_gdal_imagery_envi_tags_or_band_descriptions(tmp_path: Path) -> None:
    profile = dict(driver="GTiff", width=8, height=8, count=3, dtype="uint16")
    path = tmp_path / "w.tif"
    with rasterio.open(path, "w", **profile) as ds:
        ds.update_tags(1, ns="IMAGERY", CENTRAL_WAVELENGTH_UM="0.665")
        ds.update_tags(2, wavelength="0.842", wavelength_units="Micrometers")
        ds.set_band_description(3, "B11 (1610 nm)")
    assert read_wavelengths(str(path), [1, 2, 3]) == pytest.approx([665.0, 842.0, 1610.0])
    assert read_wavelengths(str(S2), [4]) == pytest.approx([832.8])
    assert read_wavelengths(str(L7), [1]) is None
    assert parse_wavelengths("0.49, 0.56 um") == pytest.approx([490.0, 560.0])
    assert parse_wavelengths("490;560") == [490.0, 560.0] and parse_wavelengths("0.49,0.56") == [490.0, 560.0]
    with pytest.raises(JobError, match="not a list of numbers"):
        parse_wavelengths("blue, green")


def test_spectral_resampling_interpolates_in_wavelength() -> None:
    same, notes = resampling_matrix([490, 560, 665], [490, 560, 665])
    assert np.array_equal(same, np.eye(3)) and not notes
    m, _ = resampling_matrix([665, 490], [490, 600, 640])  # unsorted source bands
    assert m[1] == pytest.approx([(600 - 490) / 175, 1 - (600 - 490) / 175])
    assert m[0] == pytest.approx([0, 1]) and np.allclose(m.sum(1), 1)
    _, notes = resampling_matrix(SENSORS["landsat7"][1], SENSORS["sentinel2_l1c"][1])
    assert any("1374" in n for n in notes)  # cirrus, between SWIR bands 835 and 1650 nm
    with pytest.raises(JobError, match="outside what this raster measures"):
        resampling_matrix([490, 560, 665], [842])


def test_a_class_raster_with_an_aoi_is_read_on_the_aoi_part_only(tmp_path: Path) -> None:
    from backend.training.image_data import load_labelled_image

    with rasterio.open(S2) as src:
        left, bottom, _, top = src.bounds
    aoi = tmp_path / "left.gpkg"
    ring = [(left, top), (left + 100 * 30, top), (left + 100 * 30, bottom), (left, bottom), (left, top)]
    with fiona.open(aoi, "w", driver="GPKG", crs="EPSG:32633", schema={"geometry": "Polygon", "properties": {}}) as f:
        f.write({"geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}})
    area, names = load_labelled_image(str(S2), str(S2_CLASSES), str(aoi), unlabelled="ignore")
    assert area.shape == (256, 100) and area.grid.bounds[2] == pytest.approx(left + 3000)
    with rasterio.open(S2_CLASSES) as src:
        assert np.array_equal(area.label, src.read(1)[:, :100])  # every pixel labelled: none IGNORE
    assert names == ["class 1", "class 2", "class 3", "class 4"]


def test_sparse_labels_leave_labels_on_both_sides_of_the_validation_cut() -> None:
    from backend.training.areas import split_by_area

    known = np.zeros((100, 400), bool)
    known[:, 20:60] = known[:, 200:220] = True  # two polygons in the left half of a wide area
    split = split_by_area(known.shape, 16, 0.25, known)
    assert known[split.train].sum() and known[split.val].sum()
    assert known[split.val].sum() / known.sum() == pytest.approx(0.25, abs=0.05)
    dense = split_by_area(known.shape, 16, 0.25, np.ones_like(known))
    assert dense == split_by_area(known.shape, 16, 0.25)  # labels that fill the area: the cut by extent


MUUFL = DATA / "muufl"


def test_a_hyperspectral_chip_smaller_than_a_patch_adapts_trains_and_maps(library: Path) -> None:
    """MUUFL Gulfport CASI, 72 bands: adapt to an 88 x 51 scene, fine-tune on 33 named pixels of a 20 x 31 chip
    (both smaller than the 64-pixel patch) with the compact decoder, map the chip; the wavelengths come from the
    rasters."""
    adapted = run("landcover.adapt", image=str(MUUFL / "scene.tif"), adapter_name="muufl-stage1", **FAST)
    assert any("too small to hold a part back" in w for w in adapted.warnings)
    tuned = run(
        "landcover.finetune",
        image=str(MUUFL / "class_demo.tif"),
        labels=str(MUUFL / "class_demo_labels.gpkg"),
        label_field="class",
        init_adapter="muufl-stage1",
        adapter_name="muufl",
        compact_decoder=True,  # map must rebuild the narrow decoder from the adapter's config
        **FAST,
    )
    assert any("held back instead" in w for w in tuned.warnings)
    _, meta = adapters.load("muufl")
    assert len(meta.config["wavelengths"]) == 72 and meta.config["wavelengths"][0] == pytest.approx(367.7)
    assert meta.config["compact_decoder"] is True
    assert meta.classes[1:] == sorted(meta.classes[1:]) and "Trees" in meta.classes
    result = run("landcover.map", image=str(MUUFL / "class_demo.tif"), adapter="muufl", out_dir=str(library / "m"))
    with rasterio.open(next(o.path for o in result.outputs if o.key == "classes")) as ds:
        classes = ds.read(1)
    assert classes.shape == (31, 20) and set(np.unique(classes)) <= set(range(1, 6))


def test_an_area_too_small_to_cut_is_split_by_labelled_pixels_of_each_class() -> None:
    from backend.io.raster import Grid
    from backend.io.rasterize import IGNORE
    from backend.training.areas import TrainingArea, can_split_by_area, split_by_pixels, train_val_parts, val_patches

    label = np.full((31, 20), IGNORE, np.uint8)
    label[1, :7], label[5, :8], label[9, :2], label[20, 0] = 1, 2, 3, 4  # class 4: one pixel, kept for training
    image = np.random.default_rng(0).random((3, 31, 20), dtype=np.float32)
    area = TrainingArea((image,), label, Grid("EPSG:32616", rasterio.Affine.identity(), 20, 31))
    assert not can_split_by_area(area.shape, 16, 0.25)
    with pytest.raises(JobError, match="too small"):
        train_val_parts([area], 16, 0.25)
    [(train, _)], [(val, _)] = train_val_parts([area], 16, 0.25, small="pixels")
    assert train.shape == val.shape == (32, 32)  # grown to whole patches, the growth unlabelled
    assert np.array_equal(train.images[0][:, :31, :20], image) and np.all(train.label[31:] == IGNORE)
    assert np.all((train.label == IGNORE) | (val.label == IGNORE))  # no pixel on both sides
    held = {k: int(np.sum(val.label == k)) for k in (1, 2, 3, 4)}
    assert held == {1: 2, 2: 2, 3: 1, 4: 0}
    kept = np.where(val.label != IGNORE, val.label, train.label)[:31, :20]
    assert np.array_equal(kept, label)  # together they hold every label once
    patches = val_patches((val, (slice(0, 32), slice(0, 32))), 16)
    assert sum(int(np.sum(p[1] != IGNORE)) for p in patches) == 5  # tiled without overlap: counted once
    train, val = split_by_pixels(area, 0.9)
    assert np.sum(train.label == 3) == 1 and np.sum(val.label == 3) == 1  # a class keeps a pixel to train on
