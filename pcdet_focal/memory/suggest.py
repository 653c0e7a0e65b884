"""Fixes for a rejected config, each re-estimated: batch size, sparse height compression,
DSVT input z stride, AMP. :func:`write_fixed` writes the first one that fits as a full config.
"""
import copy
import math
from dataclasses import dataclass, field

from easydict import EasyDict

from ..config import cfg_get, dump_config, resolve_path, to_plain
from ..errors import ConfigError, PcdetFocalError
from .dsvt_geometry import dsvt_stages
from .verdict import gib, required_bytes
from .estimator import estimate

DSVT_NAMES = ('DSVT', 'DSVTDownsample')


@dataclass
class Suggestion:
    kind: str                 # 'batch_size' | 'map_to_bev' | 'dsvt_z_stride' | 'amp'
    title: str
    changes: dict             # dotted config key -> new value (what --write-fixed writes)
    cfg: object               # the modified config (EasyDict)
    batch_size: int
    amp: bool
    peak_bytes: int
    fits: bool
    notes: list = field(default_factory=list)

    @property
    def required_bytes(self):
        return required_bytes(self.peak_bytes)

    def line(self):
        verdict = 'fits' if self.fits else 'does not fit'
        return (f'{self.title}: peak {gib(self.peak_bytes)} (needs {gib(self.required_bytes)}) '
                f'-> {verdict}')


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
        if value is None:
            parts = key.split('.')
            node = cfg_get(new, '.'.join(parts[:-1]), None)
            if isinstance(node, dict):
                node.pop(parts[-1], None)
        else:
            _set(new, key, copy.deepcopy(value))
    return new


def _try(kind, title, cfg, changes, batch_size, budget, amp, kw, notes=()):
    new = _apply(cfg, changes)
    try:
        e = estimate(new, batch_size=batch_size, amp=amp, **kw)
    except PcdetFocalError as err:   # a change the config cannot take: skip it, say why
        return None, str(err)
    return Suggestion(kind, title, changes, new, batch_size, amp, e.peak_bytes,
                      required_bytes(e.peak_bytes) <= budget, list(notes)), None


# ---------------------------------------------------------------------------- batch size
def _batch(cfg, e, budget, max_batch, kw):
    if e.batch_size <= 1:
        return []
    accum = e.accumulation_steps
    effective = e.batch_size * accum
    if max_batch and max_batch >= 1:
        b = max_batch
        steps = math.ceil(effective / b)
        changes = {'OPTIMIZATION.BATCH_SIZE_PER_GPU': b, 'OPTIMIZATION.ACCUMULATION_STEPS': steps}
        title = (f'batch size {b} (largest that fits) with OPTIMIZATION.ACCUMULATION_STEPS: '
                 f'{steps} to keep the effective batch {effective}'
                 + (f' (-> {b * steps})' if b * steps != effective else ''))
        s, _ = _try('batch_size', title, cfg, changes, b, budget, e.amp, kw)
        return [s] if s else []
    s, _ = _try('batch_size', f'batch size 1 (the smallest) with OPTIMIZATION.'
                f'ACCUMULATION_STEPS: {effective}', cfg,
                {'OPTIMIZATION.BATCH_SIZE_PER_GPU': 1,
                 'OPTIMIZATION.ACCUMULATION_STEPS': effective}, 1, budget, e.amp, kw)
    return [s] if s else []


# ---------------------------------------------------------------------------- map to BEV
def _shc(cfg, e, budget, kw):
    m2b = cfg_get(cfg, 'MODEL.MAP_TO_BEV', {}) or {}
    name = m2b.get('NAME')
    inp = e.map_to_bev_input
    if name not in ('HeightCompression', 'PointPillarScatter3d') or inp is None:
        return []
    c, d, h, w = inp
    if name == 'HeightCompression' and d == 1:
        return []
    out = []
    learned_out = cfg_get(cfg, 'MODEL.BACKBONE_2D.NUM_FILTERS', None)
    learned_out = int(learned_out[0]) if isinstance(learned_out, (list, tuple)) and \
        learned_out else c
    for mode in ('learned', 'max', 'mean'):
        new = {'NAME': 'SparseHeightCompression', 'MODE': mode}
        if mode == 'learned':
            new.update({'INPUT_FEATURES': c, 'NUM_HEIGHT_BINS': d,
                        'NUM_BEV_FEATURES': learned_out, 'USE_NORM': True})
        else:
            new['NUM_BEV_FEATURES'] = c
        if name == 'PointPillarScatter3d' and m2b.get('INPUT_SHAPE') is not None:
            new['INPUT_SHAPE'] = list(m2b['INPUT_SHAPE'])
        title = (f'MAP_TO_BEV: SparseHeightCompression MODE {mode} instead of {name} '
                 f'({new["NUM_BEV_FEATURES"]} BEV channels instead of {c * d})')
        s, _ = _try('map_to_bev', title, cfg, {'MODEL.MAP_TO_BEV': new}, e.batch_size,
                    budget, e.amp, kw)
        if s:
            out.append(s)
    return out


# ---------------------------------------------------------------------------- DSVT z stride
def _dsvt_cfg(cfg):
    b3 = cfg_get(cfg, 'MODEL.BACKBONE_3D', {}) or {}
    if b3.get('NAME') in DSVT_NAMES:
        return 'MODEL.BACKBONE_3D', b3
    if b3.get('NAME') == 'FocalSSTDSVT' and isinstance(b3.get('DSVT'), dict):
        return 'MODEL.BACKBONE_3D.DSVT', b3['DSVT']
    return None, None


def z_stride_changes(cfg, sz):
    """Config changes that set DSVT's input z stride to ``sz`` and keep the rest consistent:
    whole-height windows follow the new height, and the map-to-BEV step's height bins /
    flattened channels follow the last stage's new height."""
    prefix, dcfg = _dsvt_cfg(cfg)
    old = dsvt_stages(dcfg, prefix)
    il = copy.deepcopy(dict(dcfg['INPUT_LAYER']))
    down = list(old['input_downsample'])
    down[2] = int(sz)
    il['input_downsample'] = down
    new = dsvt_stages({**dcfg, 'INPUT_LAYER': il}, prefix)
    windows = il.get('window_shape')
    if isinstance(windows, (list, tuple)):
        fixed = []
        for s, win in enumerate(windows):
            win = list(win)
            if len(win) == 3 and s < len(new['shapes']):
                old_d, new_d = old['shapes'][s][2], new['shapes'][s][2]
                win[2] = new_d if win[2] >= old_d else min(win[2], new_d)
            fixed.append(win)
        il['window_shape'] = fixed
    changes = {f'{prefix}.INPUT_LAYER': il}
    last_d = new['shapes'][-1][2]
    d_model = (il.get('d_model') or dcfg.get('d_model'))[-1]
    m2b = cfg_get(cfg, 'MODEL.MAP_TO_BEV', {}) or {}
    name = m2b.get('NAME')
    if name == 'HeightCompression':
        changes['MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'] = int(d_model) * last_d
    elif name == 'PointPillarScatter3d':
        shape = list(m2b.get('INPUT_SHAPE') or [new['shapes'][-1][0], new['shapes'][-1][1], 1])
        shape[2] = last_d
        changes['MODEL.MAP_TO_BEV.INPUT_SHAPE'] = shape
        changes['MODEL.MAP_TO_BEV.NUM_BEV_FEATURES'] = int(d_model) * last_d
    elif name == 'SparseHeightCompression':
        if 'NUM_HEIGHT_BINS' in m2b:
            changes['MODEL.MAP_TO_BEV.NUM_HEIGHT_BINS'] = last_d
        if 'Z_STRIDE' in m2b or 'NUM_HEIGHT_BINS' not in m2b:
            changes['MODEL.MAP_TO_BEV.Z_STRIDE'] = int(new['strides'][-1][2])
        if m2b.get('INPUT_SHAPE') is not None:
            shape = list(m2b['INPUT_SHAPE'])
            shape[2] = last_d
            changes['MODEL.MAP_TO_BEV.INPUT_SHAPE'] = shape
    return changes, old['shapes'][0][2], new['shapes'][0][2]


def _z_stride(cfg, e, budget, kw):
    prefix, dcfg = _dsvt_cfg(cfg)
    if prefix is None:
        return []
    try:
        st = dsvt_stages(dcfg, prefix)
    except ConfigError:
        return []
    cur = st['input_downsample'][2]
    depth = st['sparse_shape'][2]
    if cur >= depth:
        return []

    def attempt(sz):
        try:
            changes, d_old, d_new = z_stride_changes(cfg, sz)
        except (ConfigError, TypeError, ValueError):
            return None
        title = (f'DSVT INPUT_LAYER.input_downsample z stride {sz} instead of {cur} '
                 f'({d_old} -> {d_new} height bins)')
        s, _ = _try('dsvt_z_stride', title, cfg, changes, e.batch_size, budget, e.amp, kw)
        return s

    # memory falls as the stride grows: bisect for the smallest stride that fits
    lo, hi = cur, depth            # lo: known not to fit; hi: candidate upper end
    best = attempt(hi)
    if best is None or not best.fits:
        return [best] if best else []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = attempt(mid)
        if s is not None and s.fits:
            hi, best = mid, s
        else:
            lo = mid
    return [best]


# ---------------------------------------------------------------------------- AMP
def _amp(cfg, e, budget, kw):
    if e.amp:
        return []
    s, _ = _try('amp', 'mixed precision (OPTIMIZATION.USE_AMP: True, or --use_amp)', cfg,
                {'OPTIMIZATION.USE_AMP': True}, e.batch_size, budget, True, kw)
    return [s] if s else []


def suggestions(cfg, e, budget, max_batch, **assume):
    """All suggestions for a rejected estimate ``e``, in the order they are offered.

    ``assume``: estimate()'s keyword arguments (voxels, target, data_counts, focal_growth)."""
    kw = dict(assume)
    out = []
    out += _batch(cfg, e, budget, max_batch, kw)
    out += _shc(cfg, e, budget, kw)
    out += _z_stride(cfg, e, budget, kw)
    out += _amp(cfg, e, budget, kw)
    return out


def write_fixed(verdict, path):
    """Write the first fitting suggestion of a REJECT verdict as a full config; returns it.

    The written YAML is the merged config (no _BASE_CONFIG_), loadable by load_config; the
    dataset path is made absolute so the file works from any folder."""
    s = verdict.top_suggestion
    if s is None:
        raise ConfigError('--write-fixed: no suggestion fits the budget, nothing written')
    cfg = copy.deepcopy(s.cfg)
    data_path = cfg_get(cfg, 'DATA_CONFIG.DATA_PATH', None)
    if isinstance(data_path, str):
        try:
            cfg.DATA_CONFIG.DATA_PATH = str(resolve_path(data_path, cfg, 'DATA_CONFIG.DATA_PATH'))
        except ConfigError:
            pass  # data not present here: keep the path as written
    if s.kind == 'amp':
        _set(cfg, 'OPTIMIZATION.USE_AMP', True)
    plain = to_plain(cfg)
    for key in ('CFG_FILE', 'CFG_SEARCH_DIRS'):
        plain.pop(key, None)
    try:
        dump_config(plain, path)
    except OSError as err:
        raise ConfigError(f'--write-fixed {path}: cannot write ({err.strerror})') from None
    return s


