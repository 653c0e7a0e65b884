"""The one place that imports matplotlib: availability check (one log line when missing), a
Figure factory and PNG writing."""
import logging
from pathlib import Path

from ..errors import InputError

logger = logging.getLogger('pcdet_focal')

INSTALL_HINT = "pip install -e '.[plot]'"
DPI = 100


def matplotlib_available(what):
    """True when matplotlib imports; otherwise logs ``"<what> skipped: matplotlib is not
    installed (pip install -e '.[plot]')"`` (one line per call) and returns False."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        logger.warning('%s skipped: matplotlib is not installed (%s)', what, INSTALL_HINT)
        return False
    return True


def new_figure(width_in, height_in):
    """A matplotlib ``Figure`` (object API: no pyplot, no global backend) at :data:`DPI`.
    Call :func:`matplotlib_available` first."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width_in, height_in), dpi=DPI)


def save_figure(fig, path):
    """Write ``fig`` as a PNG at ``path`` (parent folders created); returns the Path.
    An unwritable path raises InputError naming it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format='png')
    except OSError as err:
        raise InputError(f'cannot write the picture {path}: {err.strerror or err}') from None
    return path


def best_effort(what, draw, *args, **kwargs):
    """``draw(*args, **kwargs)`` for pictures that are a by-product of a long job (training,
    evaluation): any failure becomes one warning naming ``what`` and the error, never the
    end of the job. Returns draw's result, or None after a failure."""
    try:
        return draw(*args, **kwargs)
    except Exception as err:  # noqa: BLE001  (the job's real output is already saved)
        logger.warning('%s not written: %s: %s', what, type(err).__name__, err)
        return None
