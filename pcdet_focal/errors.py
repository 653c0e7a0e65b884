"""Exceptions that carry one clear, user-facing line, and the CLI wrapper that prints them.

Every error a user can cause (bad config, bad data, bad input tensors) is raised as a
subclass of :class:`PcdetFocalError` whose message names the field, file or value and the fix.
CLIs wrap their ``main`` with :func:`cli_main` so such errors print one line and exit non-zero
instead of a traceback.
"""
import functools
import sys


class PcdetFocalError(Exception):
    """Base class: the message is one line meant for the user."""

    exit_code = 1


class ConfigError(PcdetFocalError, ValueError):
    """A config value is missing, of the wrong type, or inconsistent with another field."""


class InputError(PcdetFocalError, ValueError):
    """A module received tensors it cannot work with (missing key, wrong shape, out of range)."""


class DataError(PcdetFocalError):
    """A dataset file is missing or malformed."""


class CheckpointError(PcdetFocalError):
    """A checkpoint cannot be read or does not match the model."""


def cli_main(main):
    """Decorate a CLI ``main()``: PcdetFocalError -> ``error: <message>`` on stderr + exit code.

    The wrapped function may return an int exit code (None means 0).
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            code = main(*args, **kwargs)
        except PcdetFocalError as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper
