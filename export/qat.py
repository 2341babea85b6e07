"""``--qat EPOCHS``: a short quantization-aware fine-tune, for when post-training int8 cannot pass the gate.

Fake quantization (Jacob et al., CVPR 2018, as ``torch.ao.quantization`` does it): every Conv2d and
Linear computes with its weight on int8's grid (symmetric, per output channel, scale
``max|w_c| / 127``) and its input (and a Linear its output) on uint8's grid (per tensor, range from a moving
min/max), the
rounding passed straight through to the gradients. The run's own loss, miner and P x K batches
then train the float weights for EPOCHS epochs at ``LR_FACTOR`` times the run's learning rate,
so that they settle where rounding costs retrieval least. BatchNorm keeps its statistics: the
exported files fold it into the convolutions, and with fixed statistics a per-channel grid of
the folded weights is the same grid scaled. The loss's own parameters (Koch's distance weights)
stay as trained, so the bundle's distance is the run's.

The result is a float model like any trained one; export then quantizes it with its search. It is
no longer the run's model, so the bundle is made from it whole (its fp32 files and golden
embeddings too), and the manifest says so (``qat``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from edge_siamese.checkpoints import Run
from edge_siamese.errors import UserError
from edge_siamese.miners import create_miner
from edge_siamese.progress import progress_bar
from edge_siamese.run import PreparedData
from edge_siamese.train import pk_sampler

LR_FACTOR = 0.1  # of the run's learning rate: a fine-tune, not a new training
RANGE_MOMENTUM = 0.01  # of the moving min/max of each input's range


class _WeightOnInt8Grid(nn.Module):
    """A parametrization: the weight as int8 stores it (symmetric, per output channel)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).clamp_min(1e-8) / 127
        return torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -127, 127)


class _ActivationOnUint8Grid:
    """A forward (pre-)hook: a layer's input, or output, as a uint8 activation over the moving
    range of the values seen in training (the first batch's range to start; always including 0)."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if module.training:
            low, high = x.detach().min(), x.detach().max()
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low = self.low + RANGE_MOMENTUM * (low - self.low)
                self.high = self.high + RANGE_MOMENTUM * (high - self.high)
        low, high = torch.clamp(self.low, max=0), torch.clamp(self.high, min=0)
        scale = torch.clamp((high - low) / 255, min=1e-8).float()
        zero_point = torch.clamp(torch.round(-low / scale), 0, 255).int()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def fine_tune(run: Run, data: PreparedData, epochs: int, progress: bool = True) -> nn.Module:
    """A copy of the run's model fine-tuned for ``epochs`` epochs under fake int8 quantization;
    the run's model is left as it is."""
    config = run.config
    model, loss_fn = copy.deepcopy(run.model).cpu(), copy.deepcopy(run.loss).cpu().requires_grad_(False)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_pre_hook(lambda m, args, grid=_ActivationOnUint8Grid(): (grid(m, args[0]), *args[1:])) for m in layers]
    # the embedding layer's output too: int8 files store it before the head normalises it
    hooks += [m.register_forward_hook(lambda m, args, out, grid=_ActivationOnUint8Grid(): grid(m, out)) for m in layers if isinstance(m, nn.Linear)]
    for m in layers:
        parametrize.register_parametrization(m, "weight", _WeightOnInt8Grid())
    miner = create_miner(config.miner, getattr(loss_fn, "margin", 0.2), loss_fn.distance)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr * LR_FACTOR, weight_decay=config.weight_decay)
    sampler = pk_sampler(config, data.labels("train"))
    batches = data.train_loader(sampler, config.augment)
    bar = progress_bar(total=epochs * len(sampler), desc="quantization-aware fine-tune", enabled=progress, unit="batch")
    try:
        for epoch in range(epochs):
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            sampler.set_epoch(config.epochs + epoch)  # batches training did not see in that order
            for inputs, labels in batches:
                embeddings = model(inputs)
                loss = loss_fn(embeddings, labels, indices_tuple=miner(embeddings, labels) if miner is not None else None)
                if not torch.isfinite(loss):
                    raise UserError(f"the quantization-aware fine-tune's loss became {loss.item()} at epoch {epoch + 1}: export without --qat, or train the run longer")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    for m in layers:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)  # the float weights, which int8 calibration then quantizes
    return model.eval()
