"""Errors meant for users: the CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (names, values, files): one clear line, no traceback."""


class RunBusy(UserError):
    """The run is held by another live process (a second `kdlab grid` on the same runs dir)."""


def warn(message: str) -> None:
    """One line on stderr for something worth knowing that is not an error (the run goes on)."""
    from kdlab.progress import echo

    echo(f"kdlab: warning: {message}")
