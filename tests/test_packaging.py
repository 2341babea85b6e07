"""What the application reads at run time ships with the package: a wheel built from this tree
holds the demo's page and the arm64 target's plugin source and guest driver, and an installed
copy serves its own page."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    "edge_siamese/app/web/index.html",
    "edge_siamese/app/web/app.mjs",
    "edge_siamese/app/web/style.css",
    "edge_siamese/app/web/bundle.mjs",
    "edge_siamese/app/web/package.json",
    "edge_siamese/app/targets/insn_count.c",
    "edge_siamese/app/targets/count_driver.py",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("edge_siamese-*.whl")
    return path


def test_the_wheel_holds_every_file_the_application_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sorted(set(SHIPPED) - names) == []
    assert not any("node_modules" in n for n in names)  # the page's npm packages are installed apart


def test_an_installed_copy_finds_its_page_and_names_the_npm_packages(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # a wheel is installed by unpacking it
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from edge_siamese.app import demo\n"
        "from edge_siamese.app.targets import instructions\n"
        "assert demo.PAGE.is_relative_to(sys.argv[1]) and (demo.PAGE / 'index.html').is_file()\n"
        "assert 'qemu_plugin_install' in instructions.PLUGIN_SOURCE and 'open_runtime' in instructions.COUNT_DRIVER\n"
        "try:\n    demo.node_modules(None)\nexcept Exception as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime-web@1.30.0" in proc.stdout and "--clients DIR" in proc.stdout
