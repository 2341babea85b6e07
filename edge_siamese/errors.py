"""The one exception type for user mistakes."""


class UserError(ValueError):
    """A mistake the user can fix; the message says how. The CLI prints it as one line."""


def last_line(proc) -> str:
    """The last line a failed subprocess printed (stderr first), without its 'error: ' prefix: the
    one line to pass on in a UserError."""
    lines = proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [f"exit status {proc.returncode}, no message"]
    return lines[-1].removeprefix("error: ")
