"""A folder of photos of mixed sizes and modes through the real command: train (streamed, augmented),
evaluate on a verification pairs list, export, and a device's Embedder on the raw files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, colour_photos, run_cli
from device_bench.embedder import Embedder
from device_bench.metrics import verification_metrics
from device_bench.preprocessing import read_image
from edge_siamese.checkpoints import load_run

MODES = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "webp")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """4 people of 15 photos, in every mode of MODES (2 of each validation images)."""
    return colour_photos(tmp_path_factory.mktemp("photos") / "people", 4, 15, 25, np.random.default_rng(0), MODES)


@pytest.fixture(scope="module")
def photo_run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("photo-run") / "run"
    run_cli("train", "--dataset", photos, "--input-size", "24x20", "--augment", "light", "--epochs", "3",
            "--batch-size", "16", "--samples-per-class", "4", "--workers", "1", "--quiet", "--out", out)
    return out


def test_training_records_the_preprocessing_and_keeps_the_file_index(photo_run, photos):
    config = json.loads((photo_run / "config.json").read_text())
    assert config["train"]["input_size"] == [24, 20] and config["train"]["augment"] == "light"
    assert config["preprocessing"]["resize"] == [24, 20] and config["preprocessing"]["resize_mode"] == "crop"
    assert config["preprocessing"]["channels"] == 3  # colour files among them
    index = json.loads((photo_run / "index.json").read_text())
    assert len(index["paths"]) == 60 and index["skipped"] == [] and index["paths"][0] == "p0/0.jpg"
    assert json.loads((photo_run / "metrics.json").read_text())["skipped_images"] == 0


def test_a_pairs_list_is_evaluated_with_roc_eer_and_thresholds(photo_run, photos, tmp_path):
    files = sorted(p.relative_to(photos.parent) for p in photos.rglob("*.*"))
    rows = [(a, b, int(a.parent == b.parent)) for a, b in zip(files[::2], files[1::2])]
    rows += [(a, b, 0) for a, b in zip(files[:10], files[-10:])]
    (photos.parent / "pairs.csv").write_text("path1,path2,same\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    out = tmp_path / "pairs.json"
    run_cli("evaluate", photo_run, "--pairs", photos.parent / "pairs.csv", "--json", out)
    result = json.loads(out.read_text())
    assert result["num_pairs"] == len(rows) and result["num_same"] == sum(s for *_, s in rows)
    assert {"roc_auc", "eer", "eer_threshold", "tar_at_far_1e-3", "threshold_at_far_1e-3"} <= set(result)
    # The same figures from the trained model by hand: each file read and resized as training does.
    run = load_run(photo_run)
    emb = {p: run.model(torch.from_numpy(run.preprocessing([read_image(photos.parent / p, 3)]))).detach().numpy()[0] for p in files}
    d = np.array([1 - emb[a] @ emb[b] / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b]) for a, b, _ in rows])
    same = np.array([s for *_, s in rows], bool)
    assert result["roc_auc"] == pytest.approx(verification_metrics(d[same], d[~same])["roc_auc"], abs=1e-6)


def test_a_moved_dataset_exports_from_the_index_and_the_device_reads_raw_photos(photo_run, photos, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved)
    bundle = tmp_path / "bundle"
    run_cli("export", photo_run, "--format", "onnx", "--calib-samples", "16", "--calib-data", moved, "--quiet", "--out", bundle)
    eval_set = np.load(bundle / "eval.npz", allow_pickle=False)
    assert eval_set["images"].shape[1:] == (24, 20, 3) and eval_set["images"].dtype == np.uint8
    embedder = Embedder(bundle)
    run = load_run(photo_run)
    raw = sorted(moved.rglob("*.*"))[:6]
    trained = run.model(torch.from_numpy(run.preprocessing([read_image(p, 3) for p in raw]))).detach().numpy()
    np.testing.assert_allclose(embedder.embed_files(raw), trained, atol=1e-4)


def test_a_file_that_went_bad_after_indexing_is_named(photo_run, photos, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(photos, broken)
    for path in (broken / "p0").iterdir():  # some are in the test split, which export reads
        path.write_bytes(b"")
    proc = run_cli("export", photo_run, "--format", "onnx", "--calib-samples", "16", "--calib-data", broken, "--quiet",
                   "--out", tmp_path / "bundle", check=False)
    assert_one_line_error(proc, "p0", "is not an image")
    assert not (tmp_path / "bundle").exists()
