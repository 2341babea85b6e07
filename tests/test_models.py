"""Backbones and heads: shapes, ranges, bounds, and that they export to ONNX as they are."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_siamese.errors import UserError
from edge_siamese.models import BACKBONES, create_model, embed


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("size, channels", [((8, 8), 1), ((28, 28), 1), ((32, 32), 3), ((12, 20), 3)])
def test_backbones_accept_small_inputs(name, size, channels):
    model = create_model(name, channels, size, embedding_dim=8).eval()
    out = model(torch.randn(4, channels, *size))
    assert out.shape == (4, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("dim", [2, 1024])
def test_heads(dim):
    x = torch.randn(5, 1, 8, 8)
    sig = create_model("convnet", 1, (8, 8), dim, head="sigmoid").eval()(x)
    assert sig.shape == (5, dim) and sig.min() >= 0 and sig.max() <= 1
    raw = create_model("convnet", 1, (8, 8), dim, head="none").eval()(x)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "vgg"}, "unknown backbone"),
        ({"head": "softmax"}, "unknown head"),
        ({"embedding_dim": 0}, "out of range"),
        ({"embedding_dim": 1025}, "out of range"),
        ({"input_size": (4, 4)}, "too small"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    args = {"name": "convnet", "in_channels": 1, "input_size": (8, 8), "embedding_dim": 8} | kwargs
    with pytest.raises(UserError, match=fragment):
        create_model(**args)


def test_embed_batches_match_one_pass():
    torch.manual_seed(0)
    model = create_model("mobilenet", 1, (8, 8), 16).eval()
    x = torch.randn(70, 1, 8, 8)
    assert torch.allclose(embed(model, x, batch_size=16), model(x).detach(), atol=1e-6)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_the_exporter_writes_each_backbone_to_onnx_with_a_dynamic_batch(tmp_path, name):
    """export.onnx's own fp32 writer (what ``edge-siamese export`` runs), on every registered backbone."""
    from export.job import ExportJob
    from export.onnx import EXPORTS, INPUT_NAME

    torch.manual_seed(0)
    model = create_model(name, 1, (8, 8), 8).eval()
    job = ExportJob(model, torch.randn(2, 1, 8, 8), np.zeros((0, 1, 8, 8), np.float32), {"edge_siamese.test": "1"}, tmp_path)
    EXPORTS["fp32"](job, job.fp32_path("onnx"))
    x = torch.randn(5, 1, 8, 8)
    session = ort.InferenceSession(str(job.fp32_path("onnx")), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {INPUT_NAME: x.numpy()})
    np.testing.assert_allclose(onnx_out, model(x).detach().numpy(), atol=1e-5)
    assert session.get_modelmeta().custom_metadata_map == {"edge_siamese.test": "1"}
