"""timm backbones (``--backbone timm:NAME``) and their pretrained weights, from local files only.

A timm model is built as its feature extractor (``num_classes=0``: pooled features, no
classifier) with random weights; ``load_pretrained`` then reads a ``.safetensors`` file, or a
``.pth`` read with ``weights_only=True``. Nothing is ever downloaded. timm is imported only when
a timm backbone is asked for (it costs the CLI ~2 s).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

PREFIX = "timm:"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/", "http://", "https://")
# Keys a training script wraps a state_dict in (timm's own checkpoints, DDP's "module." prefix).
WRAPPERS = ("state_dict_ema", "state_dict", "model_ema", "model")


def _timm():
    try:
        import timm
    except ModuleNotFoundError:
        raise UserError("timm backbones need timm: pip install timm (scripts/setup.sh installs it)") from None
    return timm


def model_name(backbone: str) -> str:
    """``timm:NAME`` -> NAME, checked against timm's registry; else a UserError."""
    name = backbone[len(PREFIX) :]
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise UserError(f"timm has no model {name!r}{hint}: list them with python -c \"import timm; print(timm.list_models('mobilenet*'))\"")
    return name


def pretrained_config(backbone: str) -> dict:
    """The preprocessing a timm model's pretrained weights expect: ``input_size`` (H, W), ``mean``, ``std``."""
    cfg = _timm().create_model(model_name(backbone), pretrained=False).pretrained_cfg
    return {"input_size": tuple(cfg["input_size"][1:]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def features(backbone: str, in_channels: int, input_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """The timm model without its classifier, ``(B, C, H, W) -> (B, width)``, and its width."""
    model = _timm().create_model(model_name(backbone), pretrained=False, num_classes=0, in_chans=in_channels)
    model.eval()
    try:
        with torch.no_grad():
            width = model(torch.zeros(1, in_channels, *input_size)).shape[1]
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{backbone} cannot take {input_size[0]}x{input_size[1]} inputs ({first}): use a larger --input-size") from None
    return model.train(), width


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file of tensors only (never unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path} is not a readable safetensors file ({str(exc).strip().splitlines()[0]}): download it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError for objects, others for damage
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(
                f"{path} holds pickled Python objects, which edge-siamese never unpickles: save the model's "
                "state_dict with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors') and pass that file"
            ) from None
        raise UserError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__}): download it again") from None
    for key in WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state_dict (a mapping of names to tensors): save model.state_dict() and pass that file")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_pretrained(value: str) -> Path:
    """The path ``--pretrained`` names, when it is a local weights file; else a UserError that says what to pass."""
    if value.startswith(HUB_PREFIXES) or value in ("true", "default", "imagenet", "hub"):
        raise UserError(
            f"--pretrained {value} would be downloaded, and edge-siamese never downloads: fetch the model's "
            "model.safetensors on a machine with network access (huggingface.co/timm/NAME) and pass --pretrained FILE"
        )
    path = Path(value)
    if not path.is_file():
        raise UserError(f"--pretrained {value}: no such file; pass a local .safetensors or .pth weights file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"--pretrained {value} is not a weights file: pass a {' or '.join(WEIGHT_SUFFIXES)} file")
    return path


def load_pretrained(model: nn.Module, backbone: str, value: str) -> None:
    """Load the weights file ``value`` into the timm feature extractor ``model`` (built by
    ``features``): the classifier's tensors are dropped, and the first convolution is adapted
    (timm's ``adapt_input_conv``: summed for grey) when the data has other channels than the weights."""
    from timm.models import adapt_input_conv

    path = check_pretrained(value)
    state = _read_state_dict(path)
    name = model_name(backbone)
    cfg = model.pretrained_cfg
    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    first = f"{cfg.get('first_conv')}.weight"
    own = model.state_dict()
    if first in state and first in own and state[first].ndim == 4 and state[first].shape[1] != own[first].shape[1]:
        try:
            state[first] = adapt_input_conv(own[first].shape[1], state[first])
        except (NotImplementedError, AssertionError):
            pass  # reported below as a shape mismatch
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        if wrong:
            detail = f"{wrong[0]} is {tuple(state[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} in {name}"
        else:
            detail = f"{len(missing)} of {name}'s {len(own)} tensors missing" + (f", e.g. {missing[0]}" if missing else "")
            detail += f"; {len(unexpected)} unknown, e.g. {unexpected[0]}" if unexpected else ""
        raise UserError(f"{path} does not hold {name} weights ({detail}): pass the weights of {name}, or the --backbone they belong to")
    model.load_state_dict(state)
