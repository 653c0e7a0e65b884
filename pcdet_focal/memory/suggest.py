"""Fixes for a rejected config. Every fix is applied to a copy of the config, re-estimated
(rebuilt model, the same counted frames) and offered only when it fits the budget; only keys
the host honours are used (OpenPCDet's train.py ignores ACCUMULATION_STEPS, its DSVT has no
input_downsample). :func:`write_fixed` writes the first one as a small config over the original
(a relative ``_BASE_CONFIG_``), loadable from any folder.
"""
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from easydict import EasyDict

from ..config import cfg_get, to_plain
from ..errors import ConfigError, PcdetFocalError
from .estimator import Prepared, estimate, prepare
from .verdict import fits_budget, gib, needed

@dataclass
class Suggestion:
    kind: str                 # 'batch_size' | 'map_to_bev' | 'dsvt_z_stride' | 'amp'
    title: str
    changes: dict             # dotted config key -> new value (what --write-fixed writes)
    cfg: object               # the modified config (EasyDict)
    batch_size: int
    amp: bool
    peak_bytes: int
    required_bytes: int

    def line(self):
        return (f'{self.title}: peak {gib(self.peak_bytes)} (needs {gib(self.required_bytes)}) '
                '-> fits')


def _set(cfg, dotted, value):
    node = cfg
    parts = dotted.split('.')
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], dict):
            node[p] = EasyDict()
        node = node[p]
    node[parts[-1]] = value


def _apply(cfg, changes):
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        _set(new, key, copy.deepcopy(value))
    return new


class _Trial:
    """Re-estimates changed configs with the original's counts and budget."""

    def __init__(self, cfg, e, budget, prepared, assume):
        self.cfg, self.e, self.budget, self.prepared, self.assume = cfg, e, budget, prepared, \
            assume

    def __call__(self, kind, title, changes, batch_size=None, amp=None):
        new = _apply(self.cfg, changes)
        batch = batch_size or self.e.batch_size
        amp = self.e.amp if amp is None else amp
        try:
            if changes and any(not k.startswith('OPTIMIZATION.') for k in changes):
                prep = prepare(new, self.prepared.host, counts=self.prepared.counts,
                               cache=self.prepared.cache)
            else:
                prep = Prepared(new, self.prepared.host, self.prepared.model,
                                self.prepared.geom, self.prepared.counts,
                                prepare_optimization(new), cache=self.prepared.cache)
            e = estimate(new, batch_size=batch, amp=amp, prepared=prep, **self.assume)
        except PcdetFocalError:     # a change the config cannot take: not offered
            return None
        if not e.bounded or not fits_budget(e, self.budget):
            return None
        return Suggestion(kind, title, changes, new, batch, amp, e.peak_bytes, needed(e))


def prepare_optimization(cfg):
    from ..engine.optim import optimization
    return optimization(cfg.get('OPTIMIZATION'))


# ---------------------------------------------------------------------------- batch size
def _batch(trial, e, max_batch, host):
    if e.batch_size <= 1 or not max_batch:
        return []
    b = max_batch
    if host == 'standalone':
        effective = e.batch_size * e.accumulation_steps
        steps = math.ceil(effective / b)
        changes = {'OPTIMIZATION.BATCH_SIZE_PER_GPU': b, 'OPTIMIZATION.ACCUMULATION_STEPS': steps}
        title = (f'batch size {b} (largest that fits) with OPTIMIZATION.ACCUMULATION_STEPS: '
                 f'{steps} to keep the effective batch {effective}'
                 + (f' (-> {b * steps})' if b * steps != effective else ''))
    else:  # OpenPCDet's train.py has no gradient accumulation
        changes = {'OPTIMIZATION.BATCH_SIZE_PER_GPU': b}
        title = (f'batch size {b} (largest that fits; OpenPCDet has no gradient accumulation: '
                 f'scale OPTIMIZATION.LR by {b}/{e.batch_size} to keep its per-sample rate)')
    s = trial('batch_size', title, changes, batch_size=b)
    return [s] if s else []


# ---------------------------------------------------------------------------- map to BEV
def _shc(trial, cfg, e):
    m2b = cfg_get(cfg, 'MODEL.MAP_TO_BEV', {}) or {}
    name, inp = m2b.get('NAME'), e.map_to_bev_input
    if name not in ('HeightCompression', 'PointPillarScatter3d') or inp is None:
        return []
    c, d, h, w = inp
    flat = e.flattened_bev_channels or c * d
    filters = cfg_get(cfg, 'MODEL.BACKBONE_2D.NUM_FILTERS', None)
    learned_out = int(filters[0]) if isinstance(filters, (list, tuple)) and filters else c
    out = []
    for mode in ('learned', 'max', 'mean'):
        new = {'NAME': 'SparseHeightCompression', 'MODE': mode}
        if mode == 'learned':
            new.update({'INPUT_FEATURES': c, 'NUM_HEIGHT_BINS': d,
                        'NUM_BEV_FEATURES': learned_out})
        else:
            new['NUM_BEV_FEATURES'] = c
        if new['NUM_BEV_FEATURES'] >= flat:
            continue          # no fewer BEV channels: nothing gained
        if name == 'PointPillarScatter3d' and m2b.get('INPUT_SHAPE') is not None:
            new['INPUT_SHAPE'] = list(m2b['INPUT_SHAPE'])
        title = (f'MAP_TO_BEV: SparseHeightCompression MODE {mode} instead of {name} '
                 f'({new["NUM_BEV_FEATURES"]} BEV channels instead of {flat}, no dense '
                 f'[B, {c}, {d}, {h}, {w}] volume)')
        s = trial('map_to_bev', title, {'MODEL.MAP_TO_BEV': new})
        if s:
            out.append(s)
    return out


# ---------------------------------------------------------------------------- DSVT z stride
def _dsvt_prefix(model):
    """Config prefix of our DSVTDownsample in the built model (None: absent / OpenPCDet's)."""
    b3 = getattr(model, 'backbone_3d', None)
    if type(b3).__name__ == 'DSVTDownsample':
        return 'MODEL.BACKBONE_3D'
    if type(getattr(b3, 'dsvt', None)).__name__ == 'DSVTDownsample':
        return 'MODEL.BACKBONE_3D.DSVT'
    return None


def z_stride_changes(cfg, prefix, sz):
    """Config changes that set DSVT's input z stride to ``sz`` and keep the rest consistent:
    whole-height windows follow the new height, and the map-to-BEV step's height bins /
    flattened channels follow the last stage's new height."""
    from ..models.dsvt import DSVTConfig
    dcfg = cfg_get(cfg, prefix)
    old = DSVTConfig(dcfg, prefix=prefix)
    il = copy.deepcopy(dict(dcfg['INPUT_LAYER']))
    down = list(old.input_downsample)
    down[2] = int(sz)
    il['input_downsample'] = down
    new_shapes = [math.ceil(old.sparse_shape[a] / down[a]) for a in range(3)]
    fixed = []
    for s, win in enumerate(il.get('window_shape') or []):
        win = list(win)
        if s == 0:
            old_d, new_d = old.stage_shapes[0][2], new_shapes[2]
            win[2] = new_d if win[2] >= old_d else min(win[2], new_d)
        fixed.append(win)
    il['window_shape'] = fixed
    new = DSVTConfig({**dcfg, 'INPUT_LAYER': il}, prefix=prefix)
    changes = {f'{prefix}.INPUT_LAYER': il}
    last_d, d_model = new.stage_shapes[-1][2], new.d_model[-1]
    m2b = cfg_get(cfg, 'MODEL.MAP_TO_BEV', {}) or {}
    name = m2b.get('NAME')
    if name == 'HeightCompression':
        changes['MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'] = d_model * last_d
    elif name == 'PointPillarScatter3d':
        shape = list(m2b.get('INPUT_SHAPE') or new.stage_shapes[-1])
        shape[2] = last_d
        changes['MODEL.MAP_TO_BEV.INPUT_SHAPE'] = shape
        changes['MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'] = d_model * last_d
    elif name == 'SparseHeightCompression':
        for key in ('NUM_HEIGHT_BINS', 'Z_STRIDE'):
            if m2b.get(key) is not None:     # the height now comes from the backbone
                changes[f'MODEL.MAP_TO_BEV.{key}'] = None
        if m2b.get('INPUT_SHAPE') is not None:
            shape = list(m2b['INPUT_SHAPE'])
            shape[2] = last_d
            changes['MODEL.MAP_TO_BEV.INPUT_SHAPE'] = shape
    return changes, old.stage_shapes[0][2], new.stage_shapes[0][2]


def _z_stride(trial, cfg, e, model):
    prefix = _dsvt_prefix(model)
    if prefix is None:
        return []
    from ..models.dsvt import DSVTConfig
    old = DSVTConfig(cfg_get(cfg, prefix), prefix=prefix)
    cur, depth = old.input_downsample[2], old.sparse_shape[2]

    def attempt(sz):
        try:
            changes, d_old, d_new = z_stride_changes(cfg, prefix, sz)
        except ConfigError:
            return None
        return trial('dsvt_z_stride', f'DSVT INPUT_LAYER.input_downsample z stride {sz} instead '
                     f'of {cur} ({d_old} -> {d_new} height bins)', changes)

    # memory falls as the stride grows: bisect for the smallest stride that fits
    lo, hi = cur, depth
    best = attempt(hi)
    if best is None:
        return []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = attempt(mid)
        if s is not None:
            hi, best = mid, s
        else:
            lo = mid
    return [best]


# ---------------------------------------------------------------------------- AMP
def _amp(trial, e):
    if e.amp or e.target != 'cuda':
        return []
    s = trial('amp', 'mixed precision (OPTIMIZATION.USE_AMP: True, or --use_amp)',
              {'OPTIMIZATION.USE_AMP': True}, amp=True)
    return [s] if s else []


def suggestions(cfg, e, budget, max_batch, prepared, **assume):
    """Every fix that makes the rejected estimate ``e`` fit ``budget``, in the order offered.

    ``assume``: estimate()'s keyword arguments (target, stack, world_size, gt_boxes)."""
    trial = _Trial(cfg, e, budget, prepared, assume)
    return (_batch(trial, e, max_batch, prepared.host) + _shc(trial, cfg, e)
            + _z_stride(trial, cfg, e, prepared.model) + _amp(trial, e))


def _nested(changes):
    out = {}
    for key, value in changes.items():
        node = out
        parts = key.split('.')
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = to_plain(value)
    return out


def write_fixed(verdict, path):
    """Write the first suggestion of a REJECT verdict as a config over the original: a relative
    ``_BASE_CONFIG_`` and the changed keys only (a removed key is written as null)."""
    s = verdict.top_suggestion
    if s is None:
        raise ConfigError('--write-fixed: no suggestion fits the budget, nothing written')
    path = Path(path)
    src = Path(verdict.estimate.cfg_file)
    base = os.path.relpath(src.resolve(), path.resolve().parent)
    doc = {'_BASE_CONFIG_': base, **_nested(s.changes)}
    header = (f'# {s.title}\n# written by tools/estimate_mem.py --write-fixed over {src.name}: '
              f'peak {gib(s.peak_bytes)} at batch {s.batch_size}\n')
    try:
        path.write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding='utf-8')
    except OSError as err:
        raise ConfigError(f'--write-fixed {path}: cannot write ({err.strerror})') from None
    return s
