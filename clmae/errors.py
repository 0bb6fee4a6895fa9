"""The one error type users see as a message instead of a traceback."""


class ClmaeError(Exception):
    """Bad input or state that the user can fix (a config key, a path, a checkpoint that does not fit).

    The console scripts print it as one `error: ...` line and exit with code 2; everything else is a bug
    or a crash and keeps its traceback.
    """

    # Raised alike on every rank after a collective decision (e.g. the run directory's lock): rank 0 alone
    # prints it, so that a refusal is one line, not one per rank interleaved on the terminal.
    every_rank = False
