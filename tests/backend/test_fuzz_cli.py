"""Bad and hostile input through the CLI: every case is a plain error with exit code 2 and changes nothing.

Each case runs `python -m backend …` (in this process, through `backend.cli.main`, so the suite stays fast)
on copies of real data in a sandbox folder, and asserts: exit code 2, the expected plain-language message,
no traceback and no "this is a bug", the sandbox byte-identical afterwards (inputs unchanged, no output
folder left behind, nothing written next to it), nothing outside the sandbox (traversal names), and no job
journal entry left. The cases are issue 15's defects plus the ones that already behaved.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import DATA, levir
from rasterio.transform import Affine
from safetensors.numpy import save_file

from backend import cli
from backend.context import journal_dir

PAN = DATA / "pansharpening" / "spacenet6" / "pan.tif"
MS = DATA / "pansharpening" / "spacenet6" / "ms.tif"


class Evil:
    """A pickle that would run a command if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def raster_like(src_path: Path, dst: Path, **changes: object) -> Path:
    """A copy of `src_path` with profile changes; `data=` replaces the pixels."""
    with rasterio.open(src_path) as src:
        data = changes.pop("data", src.read())
        profile = src.profile | {"count": data.shape[0]} | changes
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return dst


def adapter(library: Path, name: str, meta: dict | str | None = None, tensors: bytes | None = None) -> str:
    """An adapter folder written by hand: valid FILF metadata unless `meta` says otherwise."""
    folder = library / name
    folder.mkdir(parents=True)
    good = {
        "method": "filf",
        "backbone": "tiny_vit_tiny",
        "checkpoint_sha256": None,
        "bands": [1, 2, 3],
        "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "config": {"random_backbone_seed": 0},
    }
    text = meta if isinstance(meta, str) else json.dumps(good | (meta or {}))
    (folder / "adapter.json").write_text(text, encoding="utf-8")
    if tensors is None:
        save_file({"decoder.w": np.zeros(3, np.float32)}, str(folder / "adapter.safetensors"))
    else:
        (folder / "adapter.safetensors").write_bytes(tensors)
    return name


def vector(path: Path, geometry: dict | None, properties: dict | None = None) -> Path:
    features = [] if geometry is None else [{"type": "Feature", "properties": properties or {}, "geometry": geometry}]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return path


def build_cases(d: Path, marker: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments, a fragment of the expected message). Inputs are written into `d`."""
    a, b, label = (shutil.copy(p, d / p.name) for p in levir("test_2_0000_0000"))
    pan, ms = shutil.copy(PAN, d / "pan.tif"), shutil.copy(MS, d / "ms.tif")
    out = str(d / "out")
    with rasterio.open(a) as src:
        tf, (lon, lat) = src.transform, src.xy(128, 128)
    far = raster_like(Path(b), d / "far.tif", transform=Affine.translation(5.0, 0) * tf)
    one_band = raster_like(Path(b), d / "one_band.tif", data=rasterio.open(b).read([1]))
    ms_band = raster_like(Path(ms), d / "ms_band.tif", data=rasterio.open(ms).read([1]))
    blank = raster_like(Path(b), d / "blank.tif", nodata=0, data=np.zeros((3, 256, 256), np.uint8))
    tiny_ref = raster_like(
        Path(label), d / "tiny_ref.tif", width=1, height=1, data=rasterio.open(label).read()[:, :1, :1]
    )
    empty = d / "empty.tif"
    empty.write_bytes(b"")
    text = d / "notes.tif"
    text.write_text("not a raster", encoding="utf-8")
    truncated = d / "truncated.tif"
    truncated.write_bytes(Path(a).read_bytes()[:2000])
    (d / "folder.tif").mkdir()
    square = {"type": "Polygon", "coordinates": [[[lon, lat], [lon + 1e-4, lat], [lon + 1e-4, lat - 1e-4], [lon, lat]]]}
    point = vector(d / "point.geojson", {"type": "Point", "coordinates": [lon, lat]})
    no_polygons = vector(d / "empty.geojson", None)
    one_vertex = vector(d / "one_vertex.geojson", {"type": "Polygon", "coordinates": [[[lon, lat]]]})
    elsewhere = vector(d / "elsewhere.geojson", {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]})
    labelled = vector(d / "labels.geojson", square, {"change": "yes"})
    garbage = d / "garbage.gpkg"
    garbage.write_text("garbage", encoding="utf-8")
    evil = d / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    library = d / "library"
    adapters = {
        "truncated": adapter(library, "truncated", '{"method": "filf", "backbone": "tiny'),
        "typed": adapter(library, "typed", {"bands": "1,2,3"}),
        "pickled": adapter(library, "pickled", tensors=pickle.dumps(Evil(marker))),
        "zero_std": adapter(library, "zero_std", {"normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}),
        "not_json": adapter(library, "not_json", "[1, 2"),
    }
    pair = ["--before", a, "--after", b]
    cva = ["change.cva", *pair, "--out-dir", out]
    detect = ["change.detect", *pair, "--out-dir", out, "--adapter"]
    finetune = [
        "change.finetune",
        *pair,
        "--adapter-name",
        "x",
        "--backbone",
        "tiny_vit_tiny",
        "--allow-random-backbone",
    ]
    evaluate = ["change.evaluate", "--prediction", label, "--reference"]
    sharpen = ["pansharpen.classic", "--pan", pan, "--ms", ms, "--out-dir", out]
    return {
        # Issue 15's defects.
        "traversal name": ([*cva, "--name", "../../escaped"], "cannot contain '/'"),
        "absolute name": ([*cva, "--name", str(d.parent / "escaped")], "cannot contain '/'"),
        "dot-dot name": ([*cva, "--name", ".."], "cannot start with a dot"),
        "pansharpen traversal": ([*sharpen, "--name", "../pwn"], "cannot contain '/'"),
        "threshold nan": ([*cva, "--threshold", "nan"], "finite number"),
        "threshold inf": ([*detect, "a", "--threshold", "inf"], "finite number"),
        "truncated adapter.json": ([*detect, adapters["truncated"]], "adapter.json is damaged"),
        "wrong-typed adapter metadata": ([*detect, adapters["typed"]], "bands must be a list"),
        "pickle as adapter tensors": ([*detect, adapters["pickled"]], "adapter.safetensors is damaged"),
        "zero std normalisation": ([*detect, adapters["zero_std"]], "std or scale is zero"),
        "adapter.json not an object": ([*detect, adapters["not_json"]], "not readable JSON"),
        "one-vertex reference polygon": ([*evaluate, str(one_vertex)], "damaged polygon"),
        "1x1 reference": ([*evaluate, str(tiny_ref)], "Only 1 of the result's"),
        "RGB image as prediction": (["change.evaluate", "--prediction", a, "--reference", label], "has 3 bands"),
        "tile size far too big": ([*cva, "--tile-size", "100000000"], "at most 16384"),
        "out-dir is a file": (["change.cva", *pair, "--out-dir", a], "is a file"),
        "over-long name": ([*cva, "--name", "n" * 300], "at most 100 bytes"),
        # Inputs that already behaved (kept, so they stay that way).
        "missing raster": (
            ["change.cva", "--before", str(d / "nope.tif"), "--after", b, "--out-dir", out],
            "does not exist",
        ),
        "empty file": (["change.cva", "--before", str(empty), "--after", b, "--out-dir", out], "not a raster"),
        "text as raster": (["change.cva", "--before", str(text), "--after", b, "--out-dir", out], "not a raster"),
        "truncated GeoTIFF": (["change.cva", "--before", str(truncated), "--after", b, "--out-dir", out], "raster"),
        "folder as raster": (
            ["change.cva", "--before", str(d / "folder.tif"), "--after", b, "--out-dir", out],
            "folder",
        ),
        "no overlap": (["change.cva", "--before", a, "--after", str(far), "--out-dir", out], "do not overlap"),
        "band mismatch": (
            ["change.cva", "--before", a, "--after", str(one_band), "--out-dir", out],
            "band(s) to compare",
        ),
        "all nodata": (["change.cva", "--before", a, "--after", str(blank), "--out-dir", out], "no pixel where both"),
        "broken AOI file": ([*cva, "--aoi", str(garbage)], "not a vector layer"),
        "AOI without polygons": ([*cva, "--aoi", str(no_polygons)], "contains no polygons"),
        "point AOI": ([*cva, "--aoi", str(point)], "contains no polygons"),
        "AOI elsewhere": ([*cva, "--aoi", str(elsewhere)], "area of interest"),
        "tile size zero": ([*cva, "--tile-size", "0"], "at least 32"),
        "tile size text": ([*cva, "--tile-size", "big"], "whole number"),
        "negative overlap": ([*cva, "--overlap", "-1"], "at least 0"),
        "overlap over tile": ([*cva, "--tile-size", "64", "--overlap", "64"], "overlap"),
        "batch size zero": ([*cva, "--batch-size", "0"], "at least 1"),
        "band 0": ([*cva, "--bands", "0"], "do not exist"),
        "band 5 of 3": ([*cva, "--bands", "1,5"], "do not exist"),
        "bands text": ([*cva, "--bands", "red"], "list of whole numbers"),
        "unknown device": ([*detect, "typed", "--device", "tpu"], "Unknown device"),
        "missing adapter": ([*detect, "no_such_adapter"], "no adapter named"),
        "empty labels": ([*finetune, "--labels", str(no_polygons)], "contains no polygons"),
        "point labels": ([*finetune, "--labels", str(point)], "contains no polygons"),
        "labels with text classes": ([*finetune, "--labels", str(labelled), "--label-field", "change"], "not a class"),
        "labels missing field": ([*finetune, "--labels", str(labelled), "--label-field", "kind"], "no field named"),
        "labels elsewhere": ([*finetune, "--labels", str(elsewhere)], "label"),
        "broken labels file": ([*finetune, "--labels", str(garbage)], "neither a raster nor a vector layer"),
        "MS finer than PAN": (["pansharpen.classic", "--pan", ms_band, "--ms", pan, "--out-dir", out], "coarser"),
        "3-band PAN": (["pansharpen.classic", "--pan", a, "--ms", ms, "--out-dir", out], "single-band"),
        "malicious pickle in models import": (["models", "import", "mobile_sam", str(evil)], "SHA-256"),
        "output would replace an input": (
            [
                "change.cva",
                "--before",
                str(raster_like(Path(a), d / "cva_change_mask.tif")),
                "--after",
                b,
                "--out-dir",
                str(d),
            ],
            "overwrite one of the inputs",
        ),
    }


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its SHA-256 (folders: '')."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Callable[[], dict[str, str]]]:
    d = tmp_path_factory.mktemp("fuzz") / "sandbox"
    d.mkdir()
    cases = build_cases(d, d.parent / "pwned")
    return d, cases, lambda: snapshot(d)


CASE_NAMES = [
    "traversal name", "absolute name", "dot-dot name", "pansharpen traversal", "threshold nan", "threshold inf",
    "truncated adapter.json", "wrong-typed adapter metadata", "pickle as adapter tensors", "zero std normalisation",
    "adapter.json not an object", "one-vertex reference polygon", "1x1 reference", "RGB image as prediction",
    "tile size far too big", "out-dir is a file", "over-long name", "missing raster", "empty file", "text as raster",
    "truncated GeoTIFF", "folder as raster", "no overlap", "band mismatch", "all nodata", "broken AOI file",
    "AOI without polygons", "point AOI", "AOI elsewhere", "tile size zero", "tile size text", "negative overlap",
    "overlap over tile", "batch size zero", "band 0", "band 5 of 3", "bands text", "unknown device",
    "missing adapter", "empty labels", "point labels", "labels with text classes", "labels missing field",
    "labels elsewhere", "broken labels file", "MS finer than PAN", "3-band PAN",
    "malicious pickle in models import", "output would replace an input",
]  # fmt: skip


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_refused_plainly_and_changes_nothing(
    case: str, sandbox: tuple, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, cases, snap = sandbox
    monkeypatch.setenv("RS_PEFT_QGIS_ADAPTER_DIR", str(d / "library"))
    monkeypatch.setenv("RS_PEFT_QGIS_CACHE_DIR", str(d.parent / "cache"))  # models import: an empty cache
    argv, expected = cases[case]
    before = snap()
    argv = [str(x) for x in argv]
    code = cli.main(argv if argv[0] == "models" else [*argv, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err and "This is a bug" not in err, err
    assert snap() == before  # inputs byte-identical, no output folder or partial file left
    assert not list(d.parent.glob("*escaped*")) and not list(d.parent.parent.glob("*escaped*"))
    assert not (d.parent / "pwned").exists()
    assert not list(journal_dir().glob("*.json"))


def test_every_case_is_run(sandbox: tuple) -> None:
    """The parametrised list and the built cases agree (a case added to one is not forgotten in the other)."""
    assert len(CASE_NAMES) == len(set(CASE_NAMES)) >= 45
    assert set(CASE_NAMES) == set(sandbox[1])
