"""The application: the ``edge-siamese`` command, the compare job and its report, the bench
targets and the demo server. The only layer that sees the library, ``export`` and ``device_bench``."""
