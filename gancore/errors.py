"""User-facing errors: each carries a one-line message that says what to do.

The jobs/ CLIs catch `GancoreError`, print its message on one line and exit with `exit_code`.
"""


class GancoreError(Exception):
    """An error the user can fix; str(err) is the one line the CLI prints."""

    exit_code = 2


class ConfigError(GancoreError):
    """Unknown key, bad value or unreadable config file."""


class RegistryError(GancoreError, KeyError):
    """Unknown model / loss / dataset / metric / family name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DataError(GancoreError):
    """A dataset that cannot be found or read."""


class CheckpointError(GancoreError):
    """A missing, corrupt or incompatible checkpoint."""


class NonFiniteLossError(GancoreError):
    """A NaN/inf loss; the run stops and keeps its last good checkpoint."""

    exit_code = 3


class TrackingError(GancoreError):
    """The tracking server or store cannot be reached."""


class MetricsError(GancoreError):
    """Missing feature-extractor weights, a bad sampler output or an unusable metrics setting."""
