"""Checkpoints: atomic save, safe load (weights_only), newest-valid lookup, strict key checks.

File layout follows OpenPCDet: ``<run dir>/ckpt/checkpoint_epoch_N.pth``. A checkpoint holds
``model_state``, ``optimizer_state``, ``scheduler_state``, ``scaler_state``, ``epoch`` (epochs
completed), ``it`` (optimizer steps taken), ``epoch_it`` (batches done inside an interrupted
epoch; 0 at an epoch boundary), ``rng_state``, ``model_name``, ``version``.
"""
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..errors import CheckpointError

logger = logging.getLogger('pcdet_focal')
_EPOCH_RE = re.compile(r'checkpoint_epoch_(\d+)\.pth$')


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


def load_checkpoint(path):
    """Read a checkpoint with ``weights_only=True``; CheckpointError on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint not found')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f'{path}: not a readable checkpoint ({msg[:200]})') from None
    if isinstance(ckpt, dict) and 'model_state' not in ckpt and all(
            torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {'model_state': ckpt}  # a bare state_dict
    if not isinstance(ckpt, dict) or 'model_state' not in ckpt:
        raise CheckpointError(f'{path}: no model_state in this file; is it a pcdet-focal or '
                              'OpenPCDet checkpoint?')
    return ckpt


def checkpoint_epoch(path):
    match = _EPOCH_RE.search(str(path))
    return int(match.group(1)) if match else -1


def find_latest_checkpoint(ckpt_dir):
    """Newest loadable ``checkpoint_epoch_N.pth`` in ``ckpt_dir`` (or the interrupt
    checkpoint when it is newer), skipping unreadable files with a warning.

    Returns ``(path, ckpt)`` or ``(None, None)``.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, None
    cands = []
    for p in ckpt_dir.glob('*.pth'):
        cands.append((p.stat().st_mtime, checkpoint_epoch(p), p))
    for _, _, path in sorted(cands, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            logger.warning('skipping checkpoint: %s', err)
    return None, None


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
