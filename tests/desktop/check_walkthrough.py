"""Checks of the desktop walkthrough's record (build/desktop/walkthrough.json); exit 1 on any failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHOTS = (
    "01_detect",
    "02_inspect",
    "03_swipe",
    "04_annotate",
    "05_finetune",
    "06_detect_again",
    "07_objects",
    "08_landcover",
)


def problems(out: Path) -> list[str]:
    r = json.loads((out / "walkthrough.json").read_text())
    found = [e.strip().splitlines()[-1] for e in r["errors"]]
    if not r.get("completed"):
        found.append(f"the walkthrough stopped after {r['steps']}")
        return found
    if not r.get("dock_visible"):
        found.append("the RS PEFT panel was not visible")
    if "RS PEFT" not in " ".join(r["menu"]):
        found.append(f"no RS PEFT menu in the Raster menu: {r['menu']}")
    for step in ("detect", "detect_again"):
        layers = r[step]
        if len(layers) != 3:
            found.append(f"{step}: expected 3 result layers, got {layers}")
        for layer in layers:
            if layer["crs"] != r["before"]["crs"]:
                found.append(f"{step}: {layer['name']} is in {layer['crs']}")
            if layer["name"].endswith("probability") and layer["extent"] != r["before"]["extent"]:
                found.append(f"{step}: {layer['name']} extent {layer['extent']} != {r['before']['extent']}")
    if r["reviewed"] != 8 or r["exported_labels"] != 8:
        found.append(f"reviewed {r['reviewed']}, exported {r['exported_labels']} (expected 8 and 8)")
    ann = r["annotation"]
    if "change" not in ann["fields"] or not ann["editing"]:
        found.append(f"annotation layer: {ann}")
    if r["epochs"] < 1 or r["adapter"] != "walkthrough":
        found.append(f"fine-tune: {r['epochs']} epochs, adapter {r['adapter']}")
    objects = r["objects"]
    if len(objects) != 3 or any(layer["crs"] != r["objects_image"]["crs"] for layer in objects):
        found.append(f"objects: expected 3 result layers in the image's CRS, got {objects}")
    landcover = r["landcover"]
    if len(landcover) != 3 or any(layer["crs"] != r["landcover_image"]["crs"] for layer in landcover):
        found.append(f"land cover: expected 3 result layers in the image's CRS, got {landcover}")
    if r["landcover_renderer"] != "paletted":
        found.append(f"land cover: the class raster is drawn by a {r['landcover_renderer']} renderer, not paletted")
    found += [f"missing screenshot {s}.png" for s in SHOTS if not (out / f"{s}.png").is_file()]
    return found


if __name__ == "__main__":
    out = Path(sys.argv[1])
    bad = problems(out)
    print("desktop walkthrough:", "ok" if not bad else "FAILED", *bad, sep="\n  ")
    sys.exit(1 if bad else 0)
