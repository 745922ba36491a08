"""User-facing errors and every exit code: each error carries a one-line message that says what to do.

The jobs/ CLIs catch `GancoreError`, print its message on one line and exit with `exit_code`. The exit codes are
named here once; slurm/common.sh names EXIT_STOPPED's value once for the batch scripts.
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a GancoreError: bad config, missing data/checkpoint/weights, unreachable server
EXIT_NON_FINITE = 3  # a NaN/inf loss stopped the run (its last good checkpoint is kept)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; requeue / run again to continue
EXIT_INTERRUPTED = 130  # Ctrl-C


class GancoreError(Exception):
    """An error the user can fix; str(err) is the one line the CLI prints."""

    exit_code = EXIT_BAD_INPUT


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

    exit_code = EXIT_NON_FINITE


class TrackingError(GancoreError):
    """The tracking server or store cannot be reached."""


class MetricsError(GancoreError):
    """Missing feature-extractor weights, a bad sampler output or an unusable metrics setting."""


class LaunchError(GancoreError):
    """No scheduler, bad resources or a bad run list."""


class SweepError(GancoreError):
    """A bad sweep file, an unusable study storage or a sweep that cannot go on."""
