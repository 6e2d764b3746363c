"""The import graph of backend/ and rs_peft_qgis/ points one way only (read from the source, nothing imported).

Rules: the backend never imports the plugin, the plugin never imports the backend (it loads
backend/protocol.py and backend/client.py by file path, which is no import statement), no import cycles,
and within each side a module imports only from its own layer or a lower one. Every module has a layer, so
a new module is placed deliberately. Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("backend", "rs_peft_qgis")

# Lowest first; a module may import from its own layer or lower. A name covers its submodules (longest
# prefix wins), except the package itself, which is matched exactly.
LAYERS: dict[str, list[list[str]]] = {
    "backend": [
        # The package itself only sets up the process (GDAL cache, malloc, warnings) and holds __version__ and
        # the name of the variable that registers more methods.
        ["backend.protocol", "backend.client", "backend"],
        [
            "backend.params",
            "backend.context",
            "backend.preflight",
            "backend.runtime",
            "backend.weights",
            "backend.adapters",
            "backend.io",
            "backend.metrics",
            "backend.models",
        ],
        ["backend.training"],
        # The pansharpening indices filter with the sensors' MTF, which the classical methods define.
        ["backend.methods", "backend.metrics.pansharpening"],
        # The catalog file stands in for the jobs (fast start); with other methods registered it asks them.
        ["backend.jobs", "backend.distributed", "backend.declared"],
        ["backend.worker", "backend.cli"],
        ["backend.demo", "backend.__main__"],
    ],
    "rs_peft_qgis": [
        [
            "rs_peft_qgis.backend_env",
            "rs_peft_qgis.settings",
            "rs_peft_qgis.catalog",
            "rs_peft_qgis.worker_client",
            "rs_peft_qgis.installer",
        ],
        ["rs_peft_qgis.session", "rs_peft_qgis.job_task", "rs_peft_qgis.layers", "rs_peft_qgis.tasks"],
        [
            "rs_peft_qgis.forms",
            "rs_peft_qgis.form_hooks",
            "rs_peft_qgis.annotation",
            "rs_peft_qgis.inspection",
            "rs_peft_qgis.compare",
        ],
        ["rs_peft_qgis.dock", "rs_peft_qgis.dialogs", "rs_peft_qgis.processing"],
        ["rs_peft_qgis.plugin", "rs_peft_qgis"],
    ],
}


@dataclass(frozen=True)
class Edge:
    """`src` imports `dst` (the deepest module of the imported name that exists) at `where`."""

    src: str
    dst: str
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.where}: {self.src} -> {self.dst}"


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (pkg/__init__.py is module pkg)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[str, str, int]]:
    """Every name the file imports, anywhere in it: (absolute dotted name, the module that must exist, line)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(here):
                    continue  # beyond the top package: Python refuses it anyway
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a import b` imports a.b when b is a module, else a name from a.
            found += [
                (f"{base}.{alias.name}" if alias.name != "*" else base, base, node.lineno) for alias in node.names
            ]
    return found


def deepest(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest existing module that importing `name` runs (its parent packages only re-export)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(root: Path) -> tuple[dict[str, Path], list[Edge], list[str]]:
    """The modules, the import edges between them, and the imports of modules that do not exist."""
    modules = find_modules(root)
    edges: dict[Edge, None] = {}  # one per statement and target, in order
    missing: dict[str, None] = {}
    for module, path in modules.items():
        for name, required, line in imported_names(module, path):
            if name.split(".")[0] not in PACKAGES:
                continue
            where = f"{path.relative_to(root)}:{line}"
            if required in modules:
                dst = deepest(name, modules) or name
            else:
                # Not an edge to its package (that would show a false cycle), but still one for the side rules.
                missing[f"{where}: {module} imports {required}, which does not exist"] = None
                dst = required
            if dst != module:
                edges[Edge(module, dst, where)] = None
    return modules, list(edges), list(missing)


def layer_of(module: str) -> tuple[str, int] | None:
    """(side, layer index) by the longest matching name in LAYERS, or None when no layer covers it."""
    side = module.split(".")[0]
    best: tuple[int, int] | None = None  # (length of the match, layer)
    for index, names in enumerate(LAYERS.get(side, [])):
        for name in names:
            covers = module == name or (name != side and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[0]):
                best = (len(name), index)
    return None if best is None else (side, best[1])


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def check(root: Path) -> dict[str, list[str]]:
    """Every violation under root, by rule; an empty list per rule when there is none."""
    modules, edges, missing = import_edges(root)
    found: dict[str, list[str]] = {
        "backend->plugin": [],
        "plugin->backend": [],
        "cycle": [],
        "layer": [],
        "missing": missing,
    }
    for edge in edges:
        src_side, dst_side = edge.src.split(".")[0], edge.dst.split(".")[0]
        if src_side == "backend" and dst_side == "rs_peft_qgis":
            found["backend->plugin"].append(str(edge))
        elif src_side == "rs_peft_qgis" and dst_side == "backend":
            found["plugin->backend"].append(str(edge))
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.dst in modules:
            graph.setdefault(edge.src, set()).add(edge.dst)
    for component in strongly_connected(sorted(modules), graph):
        if len(component) > 1:
            members = set(component)
            inside = sorted({str(e) for e in edges if e.src in members and e.dst in members})
            found["cycle"].append(f"cycle {' <-> '.join(component)}:\n    " + "\n    ".join(inside))
    for module in modules:
        if layer_of(module) is None:
            found["layer"].append(f"{modules[module].relative_to(root)}: {module} has no layer (add it to LAYERS)")
    for edge in edges:
        src, dst = layer_of(edge.src), layer_of(edge.dst)
        if src and dst and src[0] == dst[0] and dst[1] > src[1]:
            found["layer"].append(f"{edge}: upward, layer {src[1]} imports layer {dst[1]}")
    return found


def _report(problems: list[str]) -> str:
    return f"{len(problems)} violation(s):\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def repo() -> dict[str, list[str]]:
    return check(ROOT)


def test_backend_never_imports_the_plugin(repo: dict[str, list[str]]) -> None:
    assert not repo["backend->plugin"], _report(repo["backend->plugin"])


def test_plugin_never_imports_the_backend(repo: dict[str, list[str]]) -> None:
    assert not repo["plugin->backend"], _report(repo["plugin->backend"])


def test_no_import_cycles(repo: dict[str, list[str]]) -> None:
    assert not repo["cycle"], _report(repo["cycle"])


def test_every_module_has_a_layer_and_imports_only_downward(repo: dict[str, list[str]]) -> None:
    assert not repo["layer"], _report(repo["layer"])


def test_every_imported_module_exists(repo: dict[str, list[str]]) -> None:
    assert not repo["missing"], _report(repo["missing"])


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


CLEAN_TREE = {
    "backend/__init__.py": "",
    "backend/protocol.py": "import json\n",
    "backend/client.py": "import importlib.util\n",
    # A package that re-exports its submodule, and a sibling that imports that submodule while the
    # package imports the sibling: no cycle, since importing backend.io.raster counts as an edge to it only.
    "backend/io/__init__.py": "from .raster import read\nfrom backend import runtime\n",
    "backend/io/raster.py": "from .. import protocol\n\ndef read():\n    pass\n",
    "backend/runtime.py": "from backend.io.raster import read\n",
    "backend/jobs/__init__.py": "from backend.jobs.base import Spec\n",
    "backend/jobs/base.py": "from ..training import loop\nimport backend.io\n",
    "backend/training/__init__.py": "",
    "backend/training/loop.py": "from backend.models import tiny\n",
    "backend/models/__init__.py": "",
    "backend/models/tiny.py": "import torch\n",
    "backend/worker.py": "def main():\n    from backend.jobs import base\n",
    "rs_peft_qgis/__init__.py": "from .plugin import Plugin\n",
    "rs_peft_qgis/plugin.py": "from rs_peft_qgis.dock.panel import Panel\n",
    "rs_peft_qgis/dock/__init__.py": "from .panel import Panel\n",
    "rs_peft_qgis/dock/panel.py": "from rs_peft_qgis import session\nfrom rs_peft_qgis.worker_client import RpcError\n",
    "rs_peft_qgis/session.py": "from .worker_client import WorkerClient\n",
    "rs_peft_qgis/worker_client.py": "import importlib.util\n",
}


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    _write(tmp_path, CLEAN_TREE)
    assert check(tmp_path) == {"backend->plugin": [], "plugin->backend": [], "cycle": [], "layer": [], "missing": []}


def test_the_checker_reports_each_kind_of_violation(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            **CLEAN_TREE,
            # backend -> plugin, inside a function
            "backend/protocol.py": "def f():\n    from rs_peft_qgis import settings\n",
            "rs_peft_qgis/settings.py": "from rs_peft_qgis.dock import panel\n",  # upward: layer 0 -> 3
            # plugin -> backend
            "rs_peft_qgis/session.py": "from backend.client import WorkerClient\n",
            # a cycle through a relative import
            "backend/io/raster.py": "from ..metrics import score\n",
            "backend/metrics.py": "from backend.io.raster import read\n",
            "backend/training/loop.py": "import backend.jobs.checkpoints\n",  # upward: layer 2 -> 4
            "backend/jobs/checkpoints.py": "",
            "backend/newthing.py": "",  # no layer
            # a module that is gone: no edge to its package (no false cycle with backend/jobs/__init__.py)
            "backend/jobs/base.py": "from backend.jobs.moved import Spec\n",
        },
    )
    found = check(tmp_path)
    assert found["backend->plugin"] == [
        "backend/protocol.py:2: backend.protocol -> rs_peft_qgis.settings",
    ]
    assert found["plugin->backend"] == [
        "rs_peft_qgis/session.py:1: rs_peft_qgis.session -> backend.client",
    ]
    assert found["cycle"] == [
        "cycle backend.io.raster <-> backend.metrics:\n"
        "    backend/io/raster.py:1: backend.io.raster -> backend.metrics\n"
        "    backend/metrics.py:1: backend.metrics -> backend.io.raster"
    ]
    assert sorted(found["layer"]) == [
        "backend/newthing.py: backend.newthing has no layer (add it to LAYERS)",
        "backend/training/loop.py:1: backend.training.loop -> backend.jobs.checkpoints: upward, layer 2 imports"
        " layer 4",
        "rs_peft_qgis/settings.py:1: rs_peft_qgis.settings -> rs_peft_qgis.dock.panel: upward, layer 0 imports layer 3",
    ]
    assert found["missing"] == [
        "backend/jobs/base.py:1: backend.jobs.base imports backend.jobs.moved, which does not exist"
    ]
