"""Embedding networks behind one registry: ``create_model("convnet", ...)``, or any timm model
as ``create_model("timm:mobilenetv3_small_100", ...)``.

Every model is backbone -> global average pool -> linear -> head and exports to ONNX and
TFLite as it is: no data-dependent control flow, and the L2 head is ``x / norm.clamp_min(eps)``
(``F.normalize`` breaks ONNX Runtime quantization and TFLite conversion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import timm_models
from .errors import UserError

MIN_DIM, MAX_DIM = 2, 1024
MIN_INPUT = 8


def _num_downsamples(input_size: tuple[int, int]) -> int:
    """Stride-2 stages that bring the smaller side down to about 4 pixels (at most 4 stages)."""
    side, stages = min(input_size), 0
    while side > 4 and stages < 4:
        side, stages = (side + 1) // 2, stages + 1
    return stages


def _conv_bn(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def convnet(in_channels: int, input_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """Compact CNN for 8x8 to 32x32 inputs: a 32-channel stem, then stride-2 3x3 stages doubling the width."""
    layers, width = _conv_bn(in_channels, 32), 32
    for _ in range(_num_downsamples(input_size)):
        layers += _conv_bn(width, width * 2, stride=2) + _conv_bn(width * 2, width * 2)
        width *= 2
    return nn.Sequential(*layers), width


def mobilenet(in_channels: int, input_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """MobileNet-v1-style stack of depthwise-separable blocks (3x3 depthwise + 1x1 pointwise)."""
    layers, width = _conv_bn(in_channels, 32), 32

    def separable(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
        return _conv_bn(in_ch, in_ch, stride=stride, groups=in_ch) + _conv_bn(in_ch, out_ch, kernel=1)

    layers += separable(32, 64, 1)
    width = 64
    for _ in range(_num_downsamples(input_size)):
        layers += separable(width, width * 2, 2) + separable(width * 2, width * 2, 1)
        width *= 2
    return nn.Sequential(*layers), width


@dataclass(frozen=True)
class Backbone:
    """``build(in_channels, input_size) -> (features, width)``: a feature extractor and its output channels."""

    build: Callable[[int, tuple[int, int]], tuple[nn.Module, int]]
    summary: str


BACKBONES: dict[str, Backbone] = {
    "convnet": Backbone(convnet, "compact CNN for 8x8 to 32x32"),
    "mobilenet": Backbone(mobilenet, "depthwise-separable"),
}


class L2Normalize(nn.Module):
    """``x / ||x||``, written as ``x / norm.clamp_min(eps)`` so that it exports and quantizes."""

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(self.eps)


@dataclass(frozen=True)
class Head:
    """The output head: ``module()`` maps the embedding layer's output to the embedding."""

    module: Callable[[], nn.Module]
    l2_normalized: bool  # every embedding has norm 1 (the manifest's ``embedding.l2_normalized``)


HEADS: dict[str, Head] = {
    "l2": Head(L2Normalize, True),
    "sigmoid": Head(nn.Sigmoid, False),
    "none": Head(nn.Identity, False),
}


class EmbeddingNet(nn.Module):
    """``(B, C, H, W)`` float32 -> ``(B, embedding_dim)`` embeddings: features, global average pool, linear, head."""

    def __init__(self, features: nn.Module, width: int, embedding_dim: int, head: str):
        super().__init__()
        self.features = features
        self.embed = nn.Linear(width, embedding_dim)
        self.head = HEADS[head].module()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.ndim == 4:  # the built-in backbones end in feature maps; timm's pool their own
            x = x.mean(dim=(2, 3))
        return self.head(self.embed(x))


def check_backbone(name: str) -> str:
    """``name`` if it is a registered backbone or ``timm:NAME`` of a timm model; else a UserError."""
    if name.startswith(timm_models.PREFIX):
        timm_models.model_name(name)
    elif name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}: pass --backbone {', '.join(BACKBONES)}, or timm:NAME for a timm model")
    return name


def create_model(
    name: str, in_channels: int, input_size: tuple[int, int], embedding_dim: int, head: str = "l2"
) -> EmbeddingNet:
    """Build a registered backbone (or ``timm:NAME``) with an embedding layer and an output head
    (``l2``, ``sigmoid``, ``none``), with random weights."""
    check_backbone(name)
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    if not MIN_DIM <= embedding_dim <= MAX_DIM:
        raise UserError(f"embedding dim {embedding_dim} is out of range: use {MIN_DIM} to {MAX_DIM}")
    if min(input_size) < MIN_INPUT:
        raise UserError(f"input size {input_size[0]}x{input_size[1]} is too small: images must be at least {MIN_INPUT}x{MIN_INPUT}")
    if name.startswith(timm_models.PREFIX):
        features, width = timm_models.features(name, in_channels, input_size)
    else:
        features, width = BACKBONES[name].build(in_channels, input_size)
    return EmbeddingNet(features, width, embedding_dim, head)


@torch.no_grad()
def embed(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Embeddings of preprocessed ``inputs`` in eval mode, batch by batch, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)])
