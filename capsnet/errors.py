"""The library's typed errors. Each is a problem the user can fix, said in
one line; ``status`` is the exit status a tool gives it. The library raises
them; the tools' ``cli.run_main`` prints ``error: <message>`` and exits with
``status`` (2 for usage errors, as argparse's), never a traceback."""


class CapsNetError(Exception):
    """A problem the user can fix, in one line (white space folded)."""
    status = 1

    def __init__(self, message, status=None):
        super().__init__(' '.join(str(message).split()))
        if status is not None:
            self.status = status


class UsageError(CapsNetError):
    """A flag or argument that cannot be used (exit status 2)."""
    status = 2
