"""The training configuration: one dataclass, saved as JSON beside every result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from device_bench.preprocessing import RESIZE_MODES

from .augment import AUGMENTS
from .errors import UserError
from .losses import LOSSES
from .miners import MINERS
from .models import HEADS, MAX_DIM, MIN_DIM, MIN_INPUT, check_backbone
from .timm_models import PREFIX as TIMM_PREFIX


# The JSON types each annotation of TrainConfig accepts (an int is a float in JSON).
JSON_TYPES = {
    "str": (str,), "str | None": (str, type(None)), "int": (int,), "int | None": (int, type(None)), "bool": (bool,),
    "float": (int, float), "float | None": (int, float, type(None)), "list[int] | None": (list, type(None)),
}


# Keys added after toolkit 0.1.0: a config.json without them gets their defaults, which are what it did.
LATER_KEYS = (
    "input_size", "resize_mode", "augment", "skip_bad", "workers", "cache_mb", "pretrained", "freeze_backbone_epochs", "backbone_lr_mult",
    "world_size", "sync_bn", "precision",
)  # fmt: skip
# --precision -> the dtype the model's forward pass runs in under torch.autocast (None: no autocast);
# the loss is always computed in float32 and the weights stay float32.
TRAIN_PRECISIONS = {"fp32": None, "bf16": "bfloat16"}


@dataclass
class TrainConfig:
    dataset: str = "digits"
    split: str = "samples"  # "samples" (closed set) or "classes" (open set)
    test_fraction: float | None = None  # None: 0.2 of each class, or 0.5 of the classes
    val_fraction: float = 0.1
    split_seed: int = 0  # fixed across training seeds, so that seeds share one split
    input_size: list[int] | None = None  # [H, W]; None: the images' own size, when they all share one
    resize_mode: str = "crop"  # a key of device_bench.preprocessing.RESIZE_MODES
    augment: str = "none"  # a key of augment.AUGMENTS; training batches only
    skip_bad: bool = False  # leave unreadable image files out (counted in index.json) instead of stopping
    workers: int | None = None  # loader processes; None: loader.default_workers
    cache_mb: float = 0  # decode a file set once into memory when it fits this many MB (0: never)
    backbone: str = "convnet"  # a key of models.BACKBONES, or timm:NAME
    pretrained: str | None = None  # a local weights file for a timm backbone (read when a run starts)
    freeze_backbone_epochs: int = 0  # train only the embedding layer (and the loss) for this many epochs
    backbone_lr_mult: float = 1.0  # the backbone's learning rate is lr times this
    embedding_dim: int = 8
    head: str | None = None  # None: the head the loss is meant for
    loss: str = "shadow"
    margin: float | None = None  # None: the loss's default
    miner: str = "batch-all"
    epochs: int = 20
    batch_size: int = 128
    samples_per_class: int = 8  # K of the P x K batches; P = batch_size // K, at most the class count
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    world_size: int = 1  # training processes (--nproc or torchrun); each embeds batch_size / world_size images of a batch
    sync_bn: bool = False  # with several processes, BatchNorm statistics over the global batch instead of each process's part
    precision: str = "fp32"  # a key of TRAIN_PRECISIONS: the forward pass's autocast dtype

    @property
    def resolved_head(self) -> str:
        return self.head or LOSSES[self.loss].head

    def validate(self) -> "TrainConfig":
        """Raise a ``UserError`` naming the first bad field; return self."""
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        check_backbone(self.backbone)
        if self.pretrained is not None and not self.backbone.startswith(TIMM_PREFIX):
            raise UserError(f"--pretrained loads timm weights: use --backbone timm:NAME (not {self.backbone}), or drop --pretrained")
        if not 0 <= self.freeze_backbone_epochs <= self.epochs:
            raise UserError(f"--freeze-backbone-epochs {self.freeze_backbone_epochs} must lie between 0 and --epochs ({self.epochs})")
        if not (math.isfinite(self.backbone_lr_mult) and self.backbone_lr_mult >= 0):
            raise UserError(f"--backbone-lr-mult {self.backbone_lr_mult} must be a number >= 0, e.g. 0.1 to fine-tune gently")
        if self.head is not None and self.head not in HEADS:
            raise UserError(f"unknown head {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.miner not in MINERS:
            raise UserError(f"unknown miner {self.miner!r}: choose one of {', '.join(MINERS)}")
        if not MIN_DIM <= self.embedding_dim <= MAX_DIM:
            raise UserError(f"--dim {self.embedding_dim} is out of range: use {MIN_DIM} to {MAX_DIM}")
        if self.loss == "lossless" and self.resolved_head != "sigmoid":
            raise UserError("the lossless loss needs embeddings in [0, 1]: use --head sigmoid (its default)")
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 4), ("samples_per_class", self.samples_per_class, 2)):
            if value < low:
                raise UserError(f"--{name.replace('_', '-')} {value} is too small: use at least {low}")
        if self.samples_per_class > self.batch_size // 2:
            raise UserError(f"--samples-per-class {self.samples_per_class} leaves fewer than 2 classes in a batch of {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr {self.lr} must be a positive number, e.g. 1e-3")
        if self.margin is not None and LOSSES[self.loss].margin is None:
            raise UserError(f"the {self.loss} loss has no margin: drop --margin")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin >= 0):
            raise UserError(f"--margin {self.margin} must be a number >= 0 (the loss's default is {LOSSES[self.loss].margin})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight_decay {self.weight_decay} must be a number >= 0")
        for name in ("seed", "split_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range: use 0 to {2**32 - 1}")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise UserError(f"test_fraction {self.test_fraction} must lie between 0 and 1")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction {self.val_fraction} must lie between 0 and 1")
        if self.input_size is not None and not (
            len(self.input_size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= MIN_INPUT for v in self.input_size)
        ):
            raise UserError(f"--input-size {self.input_size} must be H or HxW, each at least {MIN_INPUT}, e.g. --input-size 112")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"unknown resize mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.augment not in AUGMENTS:
            raise UserError(f"unknown augmentation {self.augment!r}: choose one of {', '.join(AUGMENTS)}")
        if self.workers is not None and not 0 <= self.workers <= 64:
            raise UserError(f"--workers {self.workers} is out of range: use 0 (load in this process) to 64")
        if not (math.isfinite(self.cache_mb) and self.cache_mb >= 0):
            raise UserError(f"--cache-mb {self.cache_mb} must be a number of MB >= 0 (0: no cache)")
        check_device(self.device)
        if self.precision not in TRAIN_PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r}: choose one of {', '.join(TRAIN_PRECISIONS)}")
        if not 1 <= self.world_size <= 1024:
            raise UserError(f"--nproc {self.world_size} is out of range: use 1 to 1024 processes")
        if self.batch_size % self.world_size:
            raise UserError(f"--batch-size {self.batch_size} does not split over {self.world_size} processes: choose a multiple of {self.world_size}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from its JSON form, each value of its field's type; else a ValueError naming the key."""
        if not isinstance(d, dict):
            raise ValueError("the train settings are not an object")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.name not in LATER_KEYS)
        if missing:
            raise ValueError(f"missing config keys {missing}")
        values = {}
        for f in fields(cls):
            if f.name not in d:
                continue  # a key added later: its default is what older runs did
            value = d[f.name]
            if not isinstance(value, JSON_TYPES[f.type]) or (isinstance(value, bool) and f.type != "bool"):
                raise ValueError(f"{f.name} is {value!r}, not {f.type}")
            values[f.name] = float(value) if f.type.startswith("float") and value is not None else value
        return cls(**values)


def check_device(name: str) -> str:
    """``name`` if it is a device this toolkit runs on (auto, cpu, cuda, cuda:N), else a UserError."""
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
    return name
