"""The runtime API a Python app on a device uses: ``Embedder`` (bundle -> embeddings, verdicts)
and ``Gallery`` (enrolled embeddings, 1:N search). numpy and one runtime; never torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_path
from .formats import FORMATS
from .manifest import Bundle, BundleError, read_bundle
from .metrics import pairwise_distances, rowwise_distances
from .preprocessing import read_image
from .runtimes import open_runtime

class Embedder:
    """Load a bundle (sha256-checked) and one of its model files; embed, compare and verify images.

    ``file`` is a file name of the bundle (default: the first ``verified`` file that an installed
    runtime can run); ``runtime`` forces one runtime (``onnxruntime``, ``litert``, ``tflite-runtime``);
    ``ort_memory="lean"`` trades some ONNX Runtime latency for less memory (``runtimes.ORT_MEMORY``).
    """

    def __init__(
        self, bundle: str | Path | Bundle, file: str | None = None, runtime: str | None = None, threads: int | None = None, ort_memory: str = "default"
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else read_bundle(Path(bundle))
        self.entry, self.runtime = self._open(file, runtime, threads, ort_memory)
        self.preprocessing = self.bundle.preprocessing
        embedding = self.bundle.manifest["embedding"]
        self.distance_name = embedding["distance"]
        weights = embedding["distance_weights"]
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)

    def _open(self, file: str | None, runtime: str | None, threads: int | None, ort_memory: str) -> tuple[dict, object]:
        """The chosen file's entry and its opened runtime (each candidate is opened once)."""
        files = self.bundle.files
        if file is not None:
            for entry in files:
                if entry["path"] == file:
                    return entry, open_runtime(self.bundle.path / file, entry["format"], runtime, threads, ort_memory)
            raise BundleError(f"{file} is not in the bundle: choose one of {', '.join(e['path'] for e in files)}")
        usable = [e for e in files if e["status"] == "verified" and (runtime is None or runtime in FORMATS[e["format"]].runtimes)]
        errors = []
        for entry in usable:
            try:
                return entry, open_runtime(self.bundle.path / entry["path"], entry["format"], runtime, threads, ort_memory)
            except BundleError as exc:
                errors.append(str(exc))
        reason = errors[-1] if errors else f"no verified file runs with {runtime}"
        raise BundleError(f"no verified model file of the bundle can run here: {reason}")

    def embed(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Raw images, an (N, H, W[, C]) array or a list of arrays of any sizes -> (N, dim) float32
        embeddings; an image of another size is resized as in training."""
        return self.runtime.run(self.preprocessing(images))

    def embed_files(self, paths: list[str | Path]) -> np.ndarray:
        """Image files (JPEG, PNG, WebP, ...) -> (N, dim) embeddings, each decoded as in training."""
        return self.embed([read_image(p, self.preprocessing.channels) for p in paths])

    def distance(self, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
        """Row-wise distance between two (N, dim) sets of embeddings, with the manifest's distance."""
        return rowwise_distances(np.atleast_2d(e1), np.atleast_2d(e2), self.distance_name, self.weights)

    def verify(self, image1: np.ndarray, image2: np.ndarray, far: str = "1e-3") -> tuple[bool, float]:
        """Same identity? ``(distance < threshold at that FAR, distance)`` for one pair of raw images."""
        thresholds = self.bundle.manifest["thresholds"]
        key = f"far_{far}"
        if key not in thresholds:
            raise BundleError(f"no threshold for FAR {far}: use one of {', '.join(k[4:] for k in thresholds if k.startswith('far_'))}")
        emb = self.embed([np.asarray(image1), np.asarray(image2)])
        d = float(self.distance(emb[:1], emb[1:])[0])
        return d < thresholds[key], d


class Gallery:
    """Enrolled labelled embeddings, fp32 or int8, searched in chunks.

    int8 codes are ``round(x / int8_scale)`` with one fixed scale, so that enrolling in pieces
    gives the same codes as enrolling at once; 1/127 fits L2-normalised and sigmoid embeddings
    (every component within [-1, 1]). Memory: N x dim bytes at int8, 4 N x dim at fp32
    (100,000 x 8 int8 = 0.8 MB).
    """

    CHUNK = 65536

    def __init__(
        self,
        dim: int,
        distance: str = "euclidean",
        precision: str = "fp32",
        weights: np.ndarray | None = None,
        int8_scale: float = 1 / 127,
    ):
        if precision not in ("fp32", "int8"):
            raise BundleError(f"gallery precision {precision!r}: use fp32 or int8")
        self.dim, self.distance, self.precision, self.weights = dim, distance, precision, weights
        self.scale = float(int8_scale)
        self._parts: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    @classmethod
    def for_embedder(cls, embedder: Embedder, precision: str = "fp32") -> "Gallery":
        """A gallery in the embedder's distance; for embeddings that are not bounded (no L2 or
        sigmoid head) the int8 scale comes from the bundle's golden embeddings, with 2x headroom."""
        manifest = embedder.bundle.manifest
        scale = 1 / 127
        if not manifest["embedding"]["l2_normalized"] and precision == "int8":
            scale = 2 * float(np.abs(embedder.bundle.golden()["embeddings"]).max()) / 127
        return cls(manifest["embedding"]["dim"], embedder.distance_name, precision, embedder.weights, scale)

    @property
    def embeddings(self) -> np.ndarray:
        if len(self._parts) != 1:
            dtype = np.int8 if self.precision == "int8" else np.float32
            self._parts = [np.concatenate(self._parts) if self._parts else np.zeros((0, self.dim), dtype)]
        return self._parts[0]

    @property
    def labels(self) -> np.ndarray:
        if len(self._labels) != 1:
            self._labels = [np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)]
        return self._labels[0]

    def enroll(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(labels) != len(emb):
            raise BundleError(f"enroll needs ({len(labels)}, {self.dim}) embeddings and as many labels, got {emb.shape}")
        if self.precision == "int8":
            emb = np.clip(np.round(emb / self.scale), -127, 127).astype(np.int8)
        self._parts.append(emb)
        self._labels.append(np.asarray(labels, np.int64))

    def _decoded(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32) * np.float32(self.scale) if self.precision == "int8" else stored

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self._parts))

    def search(self, query: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` nearest enrolled entries of each query: ``(indices, labels, distances)``, each (Q, k)."""
        q = np.atleast_2d(np.asarray(query, np.float32))
        stored, labels = self.embeddings, self.labels
        k = min(k, len(labels))
        best_d = np.full((len(q), 0), np.inf)
        best_i = np.zeros((len(q), 0), np.int64)
        for start in range(0, len(labels), self.CHUNK):
            d = pairwise_distances(q, self._decoded(stored[start : start + self.CHUNK]), self.distance, self.weights)
            cand_d = np.concatenate([best_d, d], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + d.shape[1]), d.shape)], axis=1)
            top = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
            best_d, best_i = np.take_along_axis(cand_d, top, 1), np.take_along_axis(cand_i, top, 1)
        return best_i, labels[best_i], best_d

    def save(self, path: str | Path) -> None:
        """Write the gallery to exactly ``path`` (an .npz file), whole or not at all."""
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                embeddings=self.embeddings,
                labels=self.labels,
                scale=np.float64(self.scale),
                distance=np.str_(self.distance),
                precision=np.str_(self.precision),
                weights=np.asarray([] if self.weights is None else self.weights, np.float64),
            )

    @classmethod
    def load(cls, path: str | Path) -> "Gallery":
        with np.load(path, allow_pickle=False) as f:
            weights = f["weights"] if len(f["weights"]) else None
            gallery = cls(int(f["embeddings"].shape[1]), str(f["distance"]), str(f["precision"]), weights, float(f["scale"]))
            gallery._parts, gallery._labels = [f["embeddings"]], [f["labels"]]
        return gallery
