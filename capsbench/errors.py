"""The root of every error a user can act on, in a layer-neutral module: the results contract (capsbench.results)
and the reports raise it without importing the suite, and the CLI turns any of it into one line and exit 2."""


class CapsbenchError(Exception):
    """Base class for errors a user can act on."""

    exit_code = 2
