"""The one exception type of the device side."""


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says what is wrong and what to do."""
