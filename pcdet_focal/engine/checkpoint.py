"""Checkpoints: atomic save, safe load (weights_only), newest-checkpoint lookup, strict key checks.

File layout follows OpenPCDet: ``<run dir>/ckpt/checkpoint_epoch_N.pth``. A checkpoint holds
``model_state``, ``optimizer_state``, ``scheduler_state``, ``scaler_state``, ``epoch`` (epochs
completed), ``it`` (optimizer steps taken), ``epoch_it`` (batches done inside an interrupted
epoch; 0 at an epoch boundary), ``rng_state``, ``model_name``, ``version``.

OpenPCDet's own checkpoints (``checkpoint_state`` + ``save_checkpoint`` in its
tools/train_utils) load too: ``{epoch, it, model_state, optimizer_state, version}`` written with
the legacy (non-zip) serialization, ``version`` like ``'pcdet+0.6.0+8caccce'``, the optimizer
state possibly absent or in a ``<name>_optim.pth`` file beside it, and numpy float64 ``lr`` /
``betas`` in ``optimizer_state`` (its ``adam_onecycle`` schedule computes them with numpy).
Loading stays ``weights_only=True``: numpy scalars and dtypes are the only globals added to
torch's allowlist (:func:`allow_numpy_scalars`).
"""
import functools
import importlib
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import CheckpointError

logger = logging.getLogger('pcdet_focal')
_EPOCH_RE = re.compile(r'checkpoint_epoch_(\d+)\.pth$')
# A numpy scalar pickles as GLOBAL <module>.scalar with the module of the numpy that wrote it.
_NUMPY_SCALAR_PATHS = ('numpy.core.multiarray.scalar', 'numpy._core.multiarray.scalar')
_WEIGHTS_ONLY_CAUSE = 'WeightsUnpickler error:'
_WEIGHTS_ONLY_FAILED = 'Weights only load failed'
# The advice torch wraps around the cause of a weights_only refusal (one paragraph per line).
_TORCH_ADVICE = re.compile(r'\s*(Weights only load failed|\(\d\) |Check the documentation of '
                           r'torch\.load)')


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, 'module') else model


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then rename.

    An interrupted save never leaves a truncated ``checkpoint_epoch_N.pth`` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _torch_version():
    return tuple(int(p) for p in re.findall(r'\d+', torch.__version__)[:2])


@functools.lru_cache(maxsize=None)
def allow_numpy_scalars():
    """Add numpy scalars and dtypes to torch's ``weights_only`` allowlist (once per process).

    Rebuilding a numpy scalar runs numpy's own ``scalar(dtype, bytes)``, nothing else, so this
    keeps weights_only loading safe. Returns False when torch has no allowlist (< 2.4): such a
    checkpoint is then refused with the cause named. Checkpoints written under numpy 1.x name
    ``numpy.core.multiarray.scalar``, under numpy 2 ``numpy._core...``; both names are allowed
    where torch accepts explicit names (>= 2.6).
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return False
    try:
        multiarray = importlib.import_module('numpy._core.multiarray')
    except ImportError:  # an older numpy without numpy._core
        multiarray = importlib.import_module('numpy.core.multiarray')
    dtype_classes = {type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG'}
    allowed = [multiarray.scalar, np.dtype, *sorted(dtype_classes, key=str)]
    if _torch_version() >= (2, 6):
        allowed += [(multiarray.scalar, path) for path in _NUMPY_SCALAR_PATHS]
    add(allowed)
    return True


def describe_load_error(err):
    """The whole cause of a ``torch.load`` failure as one line.

    torch words a weights_only refusal as paragraphs of advice (re-run with weights_only=False,
    allowlist the global, read the docs) around the cause ("Unsupported global: GLOBAL ...",
    "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"): keep the
    cause, drop the advice (this loader never takes it).
    """
    kept = []
    for line in str(err).splitlines():
        if _TORCH_ADVICE.match(line):
            continue
        line = line.strip().replace(_WEIGHTS_ONLY_CAUSE, '')
        kept.append(re.split(r' ?Please use `torch\.serialization', line)[0])
    text = ' '.join(' '.join(kept).split())
    if not text and isinstance(err, EOFError):
        text = 'the file ends early (truncated)'
    return f'{type(err).__name__}: {text}' if text else type(err).__name__


def _read(path):
    """torch.load(weights_only=True) -> object; CheckpointError with the whole cause."""
    allow_numpy_scalars()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, ...
        weights_only = _WEIGHTS_ONLY_FAILED in str(err)
        fix = (' (pcdet-focal loads checkpoints with weights_only=True: tensors, plain Python '
               'values and numpy scalars only; re-save the file\'s tensors with torch.save)'
               if weights_only else '')
        raise CheckpointError(f'{path}: not a readable checkpoint: '
                              f'{describe_load_error(err)}{fix}') from None


def load_checkpoint(path):
    """Read a checkpoint with ``weights_only=True``; CheckpointError on any failure.

    Accepts our checkpoints, OpenPCDet's (see the module docstring) and bare state_dicts
    (returned as ``{'model_state': ...}``). An OpenPCDet checkpoint whose optimizer state was
    written separately gets it from ``<name>_optim.pth`` when that file exists.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint not found')
    ckpt = _read(path)
    if isinstance(ckpt, dict) and 'model_state' not in ckpt and ckpt and all(
            torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {'model_state': ckpt}  # a bare state_dict
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model_state'), dict):
        raise CheckpointError(f'{path}: no model_state in this file; is it a pcdet-focal or '
                              'OpenPCDet checkpoint?')
    optim_file = path.with_name(f'{path.stem}_optim{path.suffix}')
    if ckpt.get('optimizer_state') is None and optim_file.is_file():
        ckpt['optimizer_state'] = (_read(optim_file) or {}).get('optimizer_state')
    return ckpt


def checkpoint_epoch(path):
    match = _EPOCH_RE.search(str(path))
    return int(match.group(1)) if match else -1


def find_latest_checkpoint(ckpt_dir):
    """The newest ``*.pth`` in ``ckpt_dir`` (by modification time, then epoch number) and its
    content; ``(None, None)`` when there is none.

    A newest checkpoint that cannot be loaded stops the run (CheckpointError with the cause):
    skipping it could fall back to an older state or to none, restart the run and overwrite its
    checkpoints. The user decides: move that file away to resume from the one before it.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, None
    cands = [p for p in ckpt_dir.glob('*.pth') if not p.stem.endswith('_optim')]
    if not cands:
        return None, None
    path = max(cands, key=lambda p: (p.stat().st_mtime, checkpoint_epoch(p)))
    try:
        return path, load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f'cannot resume: {str(err).rstrip(".")}; the run stops instead '
                              f'of starting over: move {path.name} out of {ckpt_dir} to resume '
                              'from the checkpoint before it, or pass --ckpt') from None


def load_model_state(model, state_dict, path='checkpoint', strict=True):
    """Load ``state_dict`` into ``model``; CheckpointError listing mismatched keys.

    strict=False (pretrained weights): load the keys whose names and shapes match, log the rest.
    """
    model = unwrap(model)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if strict and (missing or unexpected or shape):
        parts = []
        for name, keys in (('missing', missing), ('unexpected', unexpected),
                           ('shape mismatch', shape)):
            if keys:
                more = f' (+{len(keys) - 5} more)' if len(keys) > 5 else ''
                parts.append(f'{name}: {", ".join(keys[:5])}{more}')
        raise CheckpointError(f'{path} was saved from a different model; ' + '; '.join(parts)
                              + '. Check --cfg matches the checkpoint, or use --pretrained_model '
                              'to load only the matching weights')
    usable = {k: v for k, v in state_dict.items() if k in own and k not in shape}
    model.load_state_dict(usable, strict=False)
    if not strict:
        logger.info('loaded %d/%d tensors from %s (%d missing, %d unexpected, %d shape mismatch)',
                    len(usable), len(own), path, len(missing), len(unexpected), len(shape))
    return len(usable)


def _plain(value):
    """numpy scalars (OpenPCDet's float64 lr / betas) -> Python numbers, inside tuples/lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def _layout_mismatch(optimizer, state):
    """Why ``state`` (an optimizer state_dict) does not fit ``optimizer``; '' when it does.

    torch only compares group sizes; a state from another trainer (OpenPCDet groups its
    parameters differently) can pass that check and hand moments to the wrong parameters.
    """
    ours = [g['params'] for g in optimizer.param_groups]
    theirs = [g.get('params', []) for g in state.get('param_groups', [])]
    if [len(g) for g in ours] != [len(g) for g in theirs]:
        return (f'{len(theirs)} parameter groups of {[len(g) for g in theirs]} parameters, '
                f'this optimizer has {len(ours)} of {[len(g) for g in ours]}')
    for params, ids in zip(ours, theirs):
        for param, pid in zip(params, ids):
            for key, val in state.get('state', {}).get(pid, {}).items():
                if torch.is_tensor(val) and val.dim() > 0 and val.shape != param.shape:
                    return (f'state {key!r} of parameter {pid} has shape {tuple(val.shape)}, '
                            f'the parameter {tuple(param.shape)}')
    return ''


def load_optimizer_state(optimizer, state, path='checkpoint'):
    """Restore ``optimizer`` from a saved state_dict; returns True when it was applied.

    No state (``None``, as OpenPCDet allows): False. A state laid out for other parameter groups
    (e.g. OpenPCDet's optimizer read by our trainer) is not applied: a warning says so and the
    optimizer keeps its fresh state (the weights, epoch and step still resume). numpy scalars
    become Python numbers; keys of our groups the saved groups lack (a scheduler's
    ``initial_lr``, ``max_lr``, ...) are kept.
    """
    if optimizer is None or not state:
        return False
    why = _layout_mismatch(optimizer, state)
    if why:
        logger.warning('%s: optimizer state not restored, it was saved for other parameter '
                       'groups (%s); training continues with a fresh optimizer state', path, why)
        return False
    ours = [dict(g) for g in optimizer.param_groups]
    groups = [{**{k: v for k, v in own.items() if k != 'params'},
               **{k: _plain(v) for k, v in saved.items()}}
              for own, saved in zip(ours, state['param_groups'])]
    optimizer.load_state_dict({'state': state.get('state', {}), 'param_groups': groups})
    return True


def restore_scheduler(scheduler, state, step):
    """Restore the LR schedule from ``state``, or (OpenPCDet's checkpoints keep none) move it to
    optimizer step ``step`` so the learning rate continues where the saved run was."""
    if state is not None:
        scheduler.load_state_dict(state)
        return
    last = getattr(scheduler, 'total_steps', step + 1) - 1
    scheduler.last_epoch = min(int(step), last) - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter('ignore', UserWarning)
        scheduler.step()


def refuse_training(model, reason):
    """Make every training forward of ``model`` raise CheckpointError(``reason``); evaluation
    still runs. Idempotent: the first reason stays (see :func:`training_refused`).

    For OpenPCDet's train.py: its automatic resume calls ``load_params_with_optimizer`` inside a
    bare ``except:`` and starts over from epoch 0 when every checkpoint fails, so a load error
    cannot stop it there. The run then stops at its first training step instead, before it has
    trained or saved anything.
    """
    if training_refused(model):
        return

    def refuse(module, args):
        if module.training:
            raise CheckpointError(reason)

    model._pcdet_focal_refused = reason
    model.register_forward_pre_hook(refuse)


def training_refused(model):
    """The reason given to :func:`refuse_training` for ``model``, or None."""
    return getattr(model, '_pcdet_focal_refused', None)


def build_checkpoint(model, optimizer=None, scheduler=None, scaler=None, epoch=0, it=0,
                     epoch_it=0, rng_state=None, extra=None):
    model = unwrap(model)
    state = {
        'model_state': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'optimizer_state': optimizer.state_dict() if optimizer is not None else None,
        'scheduler_state': scheduler.state_dict() if scheduler is not None else None,
        'scaler_state': scaler.state_dict() if scaler is not None else None,
        'epoch': int(epoch),
        'it': int(it),
        'epoch_it': int(epoch_it),
        'rng_state': rng_state,
        'model_name': type(model).__name__,
        'version': __version__,
    }
    state.update(extra or {})
    return state


def prune_checkpoints(ckpt_dir, keep):
    """Delete the oldest ``checkpoint_epoch_N.pth`` beyond ``keep`` files."""
    ckpts = sorted(Path(ckpt_dir).glob('checkpoint_epoch_*.pth'), key=checkpoint_epoch)
    for path in ckpts[:max(0, len(ckpts) - keep)]:
        path.unlink(missing_ok=True)
