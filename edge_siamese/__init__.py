"""edge-siamese: low-dimensional Siamese/triplet embeddings (Shadow Loss and its baselines) for edge devices."""

__version__ = "0.1.0"
