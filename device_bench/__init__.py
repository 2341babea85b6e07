"""Torch-free on-device side of edge-siamese: metrics (and, later, the bundle reader and runtimes).

Imports only numpy and the standard library, so that it can be copied to a device as it is.
"""
