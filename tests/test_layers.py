"""The layers, read from the source: imports only point down (app -> export -> library -> device_bench),
every third-party import is a declared dependency, there is one version string, and device_bench
imports with torch, edge_siamese and export unavailable.

The import rules are checked with ``ast`` on every ``.py`` file of the three packages: every
``import`` / ``from ... import`` anywhere in a module, function bodies included, with relative
imports resolved against the file's package. Modules named only as strings
(``importlib.import_module("onnxruntime")``) are not seen, by design.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import edge_siamese

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("device_bench", "edge_siamese", "export")  # pyproject's [tool.setuptools.packages.find]
RUNTIMES = ("onnxruntime", "ai_edge_litert", "tflite_runtime")
# The device-side runtime users install themselves (``pip install tflite-runtime`` on a Pi); see
# test_every_third_party_import_is_a_declared_dependency.
USER_INSTALLED = ("tflite_runtime",)


@dataclass(frozen=True)
class Layer:
    """What one layer may import. ``forbidden``: modules (with their submodules) it never imports.
    ``only``: if set, the top-level modules it may import besides the standard library; ``lazy``:
    top-level modules it may import only inside a function."""

    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    lazy: tuple[str, ...] = ()


LAYERS = {
    # Pillow only to decode or resize: a device fed images at the input size needs numpy and a runtime.
    "device_bench": Layer(forbidden=("torch", "edge_siamese", "export", "click"), only=("numpy", "device_bench"), lazy=(*RUNTIMES, "PIL")),
    "library": Layer(forbidden=("export", "edge_siamese.app", "click")),
    "export": Layer(forbidden=("edge_siamese.app", "click")),
    "app": Layer(),
}


@dataclass(frozen=True)
class Import:
    """One imported module (``from M import a, b`` -> module M, names (a, b): either may be a submodule)."""

    module: str
    line: int
    lazy: bool  # inside a function body, so it runs only when the function is called
    names: tuple[str, ...] = ()

    @property
    def targets(self) -> list[str]:
        return [self.module, *(f"{self.module}.{name}" for name in self.names if name != "*")]


@dataclass(frozen=True)
class Violation:
    line: int
    module: str
    why: str


def module_name(path: Path) -> tuple[str, bool]:
    """``edge_siamese/app/cli.py`` -> ("edge_siamese.app.cli", False); a package's ``__init__.py`` -> (package, True)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def layer_of(name: str) -> str:
    if name == "edge_siamese.app" or name.startswith("edge_siamese.app."):
        return "app"
    return {"edge_siamese": "library", "export": "export", "device_bench": "device_bench"}[name.partition(".")[0]]


def absolute(name: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module that ``from <level dots><module> import ...`` names inside module ``name``."""
    if not level:
        return module
    package = name.split(".") if is_package else name.split(".")[:-1]
    if level - 1 >= len(package):
        raise ValueError(f"{name}: relative import {'.' * level}{module or ''} goes beyond the top-level package")
    return ".".join([*package[: len(package) - (level - 1)], *([module] if module else [])])


def imports_of(source: str, name: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (the text of module ``name``), at any depth."""
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute(name, is_package, node.level, node.module)
            found.append(Import(module, node.lineno, lazy, tuple(alias.name for alias in node.names)))
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(source), False)
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(layer: str, imports: list[Import]) -> list[Violation]:
    rule, found = LAYERS[layer], []
    for imp in imports:
        hit = next(((t, f) for t in imp.targets for f in rule.forbidden if within(t, f)), None)
        top = imp.module.partition(".")[0]
        if hit:
            found.append(Violation(imp.line, hit[0], f"{layer} never imports {hit[1]}"))
        elif rule.only is None or top in sys.stdlib_module_names or top in rule.only:
            continue
        elif top in rule.lazy:
            if not imp.lazy:
                found.append(Violation(imp.line, imp.module, f"{layer} imports the runtime {top} only inside a function"))
        else:
            found.append(Violation(
                imp.line, imp.module,
                f"{layer} imports only the standard library, {', '.join(rule.only)} and, inside functions, {', '.join(rule.lazy)}",
            ))
    return found


PY_FILES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@functools.cache
def package_imports() -> dict[Path, list[Import]]:
    return {path: imports_of(path.read_text(), *module_name(path)) for path in PY_FILES}


# --- the checker itself, on source strings --------------------------------------------------------


@pytest.mark.parametrize(
    "module, is_package, source, expected",
    [
        ("device_bench.bench", False, "import torch", ["torch"]),
        ("device_bench.bench", False, "import numpy as np\nimport json\nfrom . import metrics\nfrom .errors import BundleError", []),
        ("device_bench.bench", False, "def f():\n    from edge_siamese.models import HEADS", ["edge_siamese.models"]),
        ("device_bench.bench", False, "import click", ["click"]),
        ("device_bench.bench", False, "import scipy", ["scipy"]),
        ("device_bench.runtimes", False, "import onnxruntime", ["onnxruntime"]),
        ("device_bench.runtimes", False, "try:\n    import tflite_runtime\nexcept ImportError:\n    pass", ["tflite_runtime"]),
        ("device_bench.runtimes", False, "class A:\n    import ai_edge_litert", ["ai_edge_litert"]),
        ("device_bench.runtimes", False, "def f():\n    import onnxruntime\n    from ai_edge_litert.interpreter import Interpreter", []),
        ("edge_siamese.train", False, "from .app import cli", ["edge_siamese.app"]),
        ("edge_siamese.train", False, "from . import app", ["edge_siamese.app"]),
        ("edge_siamese", True, "from . import app", ["edge_siamese.app"]),
        ("edge_siamese.losses", True, "from .. import app", ["edge_siamese.app"]),
        ("edge_siamese.losses.shadow", False, "from ..app.cli import main", ["edge_siamese.app.cli"]),
        ("edge_siamese.train", False, "import edge_siamese.app.cli", ["edge_siamese.app.cli"]),
        ("edge_siamese.train", False, "class C:\n    def m(self):\n        import export", ["export"]),
        ("edge_siamese.train", False, "from export.bundle import write_bundle", ["export.bundle"]),
        ("edge_siamese.train", False, "import click", ["click"]),
        ("edge_siamese.train", False, "import torch\nimport exporter\nfrom device_bench.bench import memory_mb\nfrom . import models", []),
        ("export.exporter", False, "from edge_siamese.app import compare", ["edge_siamese.app"]),
        ("export.exporter", False, "from edge_siamese import app", ["edge_siamese.app"]),
        ("export.exporter", False, "import click", ["click"]),
        ("export.exporter", False, "from edge_siamese.models import HEADS\nfrom .job import ExportJob\nfrom device_bench import manifest", []),
        ("edge_siamese.app.cli", False, "import click\nimport export\nfrom ..errors import UserError\nfrom .targets import cpu", []),
    ],
)
def test_the_checker_catches_forbidden_imports(module, is_package, source, expected):
    found = violations(layer_of(module), imports_of(source, module, is_package))
    assert [v.module for v in found] == expected


def test_the_checker_resolves_relative_imports_and_names_the_line():
    source = "import json\n\ndef run():\n    from ..errors import UserError\n    from ..app import cli\n"
    imports = imports_of(source, "edge_siamese.losses.shadow")
    assert imports[1] == Import("edge_siamese.errors", 4, True, ("UserError",))
    assert violations("library", imports) == [Violation(5, "edge_siamese.app", "library never imports edge_siamese.app")]
    assert imports_of("from ...errors import UserError", "edge_siamese.app.targets.arm64")[0].module == "edge_siamese.errors"
    with pytest.raises(ValueError, match="beyond the top-level package"):
        imports_of("from ... import x", "edge_siamese.train")


# --- the rules, on the real files ------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_only_point_down(layer):
    files = [path for path in PY_FILES if layer_of(module_name(path)[0]) == layer]
    assert files, f"no .py files found for the {layer} layer"
    broken = [
        f"{path.relative_to(ROOT)}:{v.line}: imports {v.module} ({v.why})"
        for path in files for v in violations(layer, package_imports()[path])
    ]
    assert not broken, "\n".join(broken)


def normalise(name: str) -> str:
    """PEP 503: lowercase, runs of ``-_.`` become one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared_distributions(project: dict) -> set[str]:
    requirements = [*project.get("dependencies", []), *(r for extra in project.get("optional-dependencies", {}).values() for r in extra)]
    return {normalise(re.match(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)", r).group(1)) for r in requirements}


def undeclared(imports: dict[str, list[str]], declared: set[str]) -> list[str]:
    """Third-party top-level modules in ``imports`` (top -> places) whose distribution is not in ``declared``."""
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for top, places in sorted(imports.items()):
        if top in sys.stdlib_module_names or top in PACKAGES:
            continue
        # tflite_runtime is the runtime users install on the device themselves and device_bench falls
        # back without it, so it is no dependency of ours; where it is not installed its distribution
        # cannot be looked up, so it is let through. Where it is installed the ordinary rule holds: a
        # literal import of it must then be backed by a declared extra.
        if top in USER_INSTALLED and importlib.util.find_spec(top) is None:
            continue
        names = distributions.get(top, [])
        if not any(normalise(d) in declared for d in names):
            found = f"distribution {', '.join(names)}" if names else "not installed"
            missing.append(f"{top} ({found}; imported at {', '.join(places)}) is not declared in pyproject.toml")
    return missing


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import yaml", ["yaml"]),
        ("def f():\n    import a_module_nobody_ships", ["a_module_nobody_ships"]),
        ("import numpy, json\nfrom PIL import Image\nimport sklearn.metrics\nimport matplotlib.pyplot", []),
        ("from ai_edge_litert.interpreter import Interpreter\nfrom . import manifest\nimport edge_siamese", []),
    ],
)
def test_the_dependency_check_catches_undeclared_imports(pyproject, source, expected):
    tops = {imp.module.partition(".")[0]: ["<source>"] for imp in imports_of(source, "device_bench.bench")}
    assert [line.split()[0] for line in undeclared(tops, declared_distributions(pyproject["project"]))] == expected


def test_every_third_party_import_is_a_declared_dependency(pyproject):
    tops: dict[str, list[str]] = {}
    for path, imports in package_imports().items():
        for imp in imports:
            tops.setdefault(imp.module.partition(".")[0], []).append(f"{path.relative_to(ROOT)}:{imp.line}")
    assert "numpy" in tops and "torch" in tops, "the scan found none of the known dependencies"
    missing = undeclared(tops, declared_distributions(pyproject["project"]))
    assert not missing, "\n".join(missing)


# --- one version string --------------------------------------------------------------------------------


def test_there_is_one_version_string(pyproject):
    project = pyproject["project"]
    assert "version" not in project, "pyproject.toml [project] sets a static version: use dynamic = [\"version\"]"
    assert "version" in project.get("dynamic", [])
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "edge_siamese.__version__"}
    assignments = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in PY_FILES for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
    ]
    assert [place.partition(":")[0] for place in assignments] == ["edge_siamese/__init__.py"], f"__version__ is assigned at {assignments}"
    installed = importlib.metadata.version("edge-siamese")
    assert installed == edge_siamese.__version__, (
        f"installed metadata says {installed}, edge_siamese.__version__ says {edge_siamese.__version__}: reinstall (pip install -e .)"
    )


# --- device_bench imports without torch, edge_siamese or export ---------------------------------------

BLOCKED = ("torch", "edge_siamese", "export")
IMPORT_EVERY_MODULE = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    BLOCKED = {blocked!r}
    attempts = []

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(name + " must not be imported")
            return None

    preloaded = sorted(n for n in sys.modules if n.partition(".")[0] in BLOCKED)
    sys.meta_path.insert(0, Refuse())
    refused = []
    for name in BLOCKED:  # the control: each blocked name really fails here
        try:
            importlib.import_module(name)
        except ImportError:
            refused.append(name)
    attempts.clear()

    failed = {{}}
    import device_bench
    modules = ["device_bench"]
    for info in pkgutil.walk_packages(device_bench.__path__, "device_bench.", onerror=lambda n: failed.setdefault(n, repr(sys.exc_info()[1]))):
        modules.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as e:
            failed[info.name] = type(e).__name__ + ": " + str(e)
    print(json.dumps({{"preloaded": preloaded, "refused": refused, "attempts": attempts, "failed": failed,
                      "modules": modules, "file": device_bench.__file__}}))
    """
).format(blocked=BLOCKED)


def test_every_device_bench_module_imports_without_torch_edge_siamese_or_export():
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["preloaded"] == [], f"already imported at start-up, so the guard cannot refuse them: {result['preloaded']}"
    assert result["refused"] == list(BLOCKED)
    assert Path(result["file"]).resolve() == ROOT / "device_bench" / "__init__.py"
    expected = sorted(name for name, _ in map(module_name, PY_FILES) if layer_of(name) == "device_bench")
    assert sorted(result["modules"]) == expected
    assert result["failed"] == {}, "\n".join(f"{m}: {e}" for m, e in result["failed"].items())
    assert result["attempts"] == [], f"device_bench tried to import {result['attempts']}"
