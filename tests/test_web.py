"""The web page (edge_siamese/app/web) in Debian's headless Chromium, served by ``edge-siamese demo``:
the golden self-check with onnxruntime-web and LiteRT.js agrees with device_bench, the verdicts on
two picked images equal the Python Embedder's, and bad input gets a clear message in the page."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_bench.embedder import Embedder
from device_bench.manifest import read_bundle
from device_bench.metrics import embedding_agreement, pairwise_distances
from device_bench.preprocessing import read_image
from device_bench.runtimes import open_runtime
from edge_siamese.app.demo import PAGE

from conftest import BAD_MANIFESTS, copy_bundle, demo_server

CHROMIUM = shutil.which("chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

NO_BROWSER = (  # why the page cannot be tested here, or None
    "playwright is not installed: pip install -e '.[test]'" if sync_playwright is None
    else "chromium is not installed: apt-get install chromium" if CHROMIUM is None
    else "the page's node_modules is absent: run npm ci --prefix edge_siamese/app/web" if not (PAGE / "node_modules" / "onnxruntime-web").is_dir()
    else None
)
NEEDS_BROWSER = pytest.mark.skipif(NO_BROWSER is not None, reason=str(NO_BROWSER))  # tests/test_image_inputs.py's browser test too
pytestmark = NEEDS_BROWSER

# Headless, as root, on a machine with no network: no sandbox, no GPU, no background connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000  # WASM compilation on a busy 2-core CI machine
SCREENSHOTS = os.environ.get("EDGE_SIAMESE_SCREENSHOTS")  # e.g. docs/img: where test_page_verdicts_equal_python saves the page


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()


def self_check(page, url: str) -> dict:
    page.goto(url + "?selfcheck=1")
    page.wait_for_selector("#self-check[data-state=done]")
    return json.loads(page.text_content("#self-check"))


def test_page_self_check_passes_with_both_runtimes(page, served, client_bundle):
    report = self_check(page, served)
    assert report["ok"] is True, report.get("error")
    assert report["skipped"] == []
    bundle = read_bundle(client_bundle)
    golden = bundle.golden()
    assert set(report["files"]) == {entry["path"] for entry in bundle.files}
    for entry in bundle.files:
        row = report["files"][entry["path"]]
        assert row["ok"] is True
        assert row["runtime"].startswith("onnxruntime-web " if entry["format"] == "onnx" else "LiteRT.js")
        python = embedding_agreement(open_runtime(client_bundle / entry["path"], entry["format"]).run(golden["inputs"]), golden["embeddings"])
        assert row["min_cosine"] == pytest.approx(python["min_cosine"], abs=1e-5), entry["path"]
        assert row["max_abs_diff"] == pytest.approx(python["max_abs_diff"], abs=1e-4), entry["path"]
    assert report["files"]["model_fp32.onnx"]["min_cosine"] > 0.99999
    assert report["preprocessing"] == {"max_abs_diff": pytest.approx(0, abs=1e-5), "ok": True}


def test_page_shows_the_self_check_without_the_flag(page, served):
    page.goto(served)
    page.wait_for_selector("#status.ok")
    assert page.text_content("#status").startswith("passed: 4 file(s) agree with PyTorch")
    assert page.locator("#files tbody tr").count() == 4
    assert page.locator("#files td.ok").count() == 4
    assert page.text_content("#self-check") == ""
    assert page.is_hidden("#error")


def raw_range(bundle: Path) -> tuple[float, float]:
    return tuple(json.loads((bundle / "manifest.json").read_text())["preprocessing"]["raw_range"])


def to_pixels(raw: np.ndarray, bundle: Path) -> np.ndarray:
    """Raw images as an 8-bit file holds them: the raw range stretched to 0..255, rounded."""
    lo, hi = raw_range(bundle)
    return np.round((raw.astype(np.float32) - lo) * 255 / (hi - lo)).astype(np.uint8)


def to_raw(pixels: np.ndarray, bundle: Path) -> np.ndarray:
    """The raw values 8-bit pixels stand for: what the page computes on."""
    lo, hi = raw_range(bundle)
    return lo + pixels.astype(np.float32) * np.float32((hi - lo) / 255)


def save_png(pixels: np.ndarray, path: Path) -> Path:
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
    return path


def pick_pairs(bundle: Path, file: str, images: np.ndarray) -> dict[str, tuple[int, int, float, bool]]:
    """A same-class pair of ``images`` (eval.npz's) the Python Embedder accepts and a different-class
    pair it rejects, each at least 0.02 from the threshold so that float differences cannot flip them."""
    embedder = Embedder(bundle, file=file)
    embeddings, labels = embedder.embed(images), np.load(bundle / "eval.npz", allow_pickle=False)["labels"]
    threshold = embedder.bundle.manifest["thresholds"]["far_1e-3"]
    d = pairwise_distances(embeddings, embeddings, embedder.distance_name, embedder.weights)
    i, j = np.triu_indices(len(labels), 1)
    same, d = labels[i] == labels[j], d[i, j]
    pairs = {}
    for kind, wanted in (("same", same & (d < threshold - 0.02)), ("different", ~same & (d > threshold + 0.02))):
        k = int(np.flatnonzero(wanted)[0])
        pairs[kind] = (int(i[k]), int(j[k]), float(d[k]), kind == "same")
    return pairs


def page_verdict(page, url: str, file: str, image_a: Path, image_b: Path):
    """Load the page, choose ``file``, pick the two images; the verdict element once it is done."""
    page.goto(url)
    page.wait_for_selector("#status.ok")
    page.select_option("#model", file)
    page.set_input_files("#image-a", image_a)
    page.set_input_files("#image-b", image_b)
    return page.wait_for_selector("#verdict[data-state=done]")


@pytest.mark.parametrize("file", ["model_fp32.onnx", "model_int8.tflite"])
def test_page_verdicts_equal_python(page, served, client_bundle, tmp_path, file):
    pixels = to_pixels(np.load(client_bundle / "eval.npz", allow_pickle=False)["images"], client_bundle)
    for kind, (i, j, distance, accept) in pick_pairs(client_bundle, file, to_raw(pixels, client_bundle)).items():
        verdict = page_verdict(page, served, file, save_png(pixels[i], tmp_path / f"{kind}-a.png"), save_png(pixels[j], tmp_path / f"{kind}-b.png"))
        assert verdict.get_attribute("data-accept") == str(accept).lower(), (kind, page.text_content("#verdict"))
        assert float(verdict.get_attribute("data-distance")) == pytest.approx(distance, abs=1e-4)
        assert page.text_content("#verdict").startswith("Same" if accept else "Different")
    if SCREENSHOTS and file == "model_fp32.onnx":
        page.screenshot(path=Path(SCREENSHOTS) / "web-demo.png", full_page=True)


def test_page_converts_colour_and_resizes_as_python(page, served, client_bundle, tmp_path):
    """A colour image is made grey by Pillow's integer luma and a 2x image shrunk by Pillow's
    bilinear filter: the page's distance equals Python's on the same two files (read_image and
    Preprocessing.resized, the 8-bit result mapped onto the raw range as the page maps it)."""
    pixels = to_pixels(np.load(client_bundle / "eval.npz", allow_pickle=False)["images"][:2], client_bundle)
    grey_a, grey_b = pixels[0, ..., 0], pixels[1, ..., 0]
    colour = np.stack([grey_a, grey_a // 2, 255 - grey_a], axis=-1)
    twice = grey_b.repeat(2, axis=0).repeat(2, axis=1)[..., None]
    files = [save_png(colour, tmp_path / "colour.png"), save_png(twice, tmp_path / "twice.png")]
    embedder = Embedder(client_bundle, file="model_fp32.onnx")
    pre = embedder.preprocessing
    a, b = (embedder.embed(to_raw(pre.resized(read_image(path, pre.channels)), client_bundle)[None]) for path in files)
    verdict = page_verdict(page, served, "model_fp32.onnx", *files)
    assert float(verdict.get_attribute("data-distance")) == pytest.approx(embedder.distance(a, b)[0], abs=1e-4)


def test_page_says_when_an_image_cannot_be_decoded(page, served, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    page.goto(served)
    page.wait_for_selector("#status.ok")
    page.set_input_files("#image-a", bad)
    page.set_input_files("#image-b", bad)
    page.wait_for_selector("#verdict[data-state=error]")
    assert page.text_content("#verdict") == "photo.png could not be decoded as an image: pick a PNG, JPEG, WebP, GIF or BMP file"
    assert page.get_attribute("#verdict", "data-accept") == ""


@pytest.mark.parametrize("edit, fragments", BAD_MANIFESTS, ids=lambda v: getattr(v, "__name__", ""))
def test_page_explains_an_inconsistent_bundle(page, client_bundle, tmp_path, edit, fragments):
    """The bundle changes under a running demo (the server reads it per request): the page says what is wrong."""
    bundle = copy_bundle(client_bundle, tmp_path / "bundle")
    with demo_server(bundle) as (_, url):
        copy_bundle(bundle, tmp_path / "edited", edit)
        shutil.copy(tmp_path / "edited" / "manifest.json", bundle / "manifest.json")
        report = self_check(page, url)
        assert report["ok"] is False
        for fragment in fragments:
            assert fragment in report["error"], report["error"]
        shown = page.text_content("#status") if page.is_hidden("#error") else page.text_content("#error")
        assert fragments[0] in shown


def test_page_offers_no_file_that_failed_its_self_check(page, client_bundle, tmp_path):
    def impossible_bar(manifest):
        for entry in manifest["files"]:
            entry["fidelity"]["min_cosine"] = 1.5

    with demo_server(copy_bundle(client_bundle, tmp_path / "bundle", impossible_bar)) as (_, url):
        report = self_check(page, url)
    assert report["ok"] is False and all(not row["ok"] for row in report["files"].values())
    assert page.get_attribute("#verdict", "data-state") == "error"
    assert page.text_content("#verdict").startswith("No model file passed the self-check")
    assert page.is_disabled("#image-a") and page.locator("#model option").count() == 0
