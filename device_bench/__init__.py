"""Torch-free on-device side of edge-siamese: the tables, the preprocessing, the bundle's manifest
and reader, one adapter per runtime, ``Embedder`` and ``Gallery`` for apps, the metrics, and the
benchmark (``python -m device_bench``) with its JSON document.

Imports only numpy, the standard library and (when asked for) one runtime, so that it can be
copied to a device as it is.
"""
