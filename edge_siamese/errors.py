"""The one exception type for user mistakes."""


class UserError(ValueError):
    """A mistake the user can fix; the message says how. The CLI prints it as one line."""
