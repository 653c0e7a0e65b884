"""Peak training memory of one optimizer step, module by module, from a config alone.

The step is replayed twice on a symbolic graph (no tensors, no torch import):
1. a first pass finds the parameters and the state modules keep between steps;
2. the steady-state pass starts with parameters, optimizer state (Adam/AdamW: 2 copies; SGD
   with momentum: 1), accumulated gradients (ACCUMULATION_STEPS > 1) and last step's module
   state allocated, then replays forward, backward and the optimizer step.
The peak is the highest live byte count of pass 2, with the phase and module where it happens.
"""
from dataclasses import dataclass, field

from ..config import cfg_get
from ..errors import ConfigError
from .context import Context
from .geometry import geometry_from_config
from .graph import Graph
from .voxels import resolve_counts
from .walker import replay

OPTIMIZER_STATES = {'adam_onecycle': 2, 'adam': 2, 'adamw': 2, 'sgd': 1}


@dataclass
class Estimate:
    """The result of :func:`estimate` (bytes unless said otherwise)."""

    cfg_file: str
    batch_size: int
    amp: bool
    target: str
    rows: list                       # graph.ModuleStats in forward order
    peak_bytes: int
    peak_phase: str
    peak_module: str
    peak_label: str
    phase_peaks: dict                # phase -> bytes
    params: int                      # trainable parameter count
    param_bytes: int
    buffer_bytes: int
    optimizer: str
    optimizer_bytes: int
    grad_bytes: int
    accumulation_steps: int
    state_bytes: int                 # module state carried between steps
    geometry: list                   # report lines: grid, stage shapes, BEV
    flattened_bev_channels: object
    map_to_bev_input: object         # (C, D, H, W) reaching MAP_TO_BEV, if any
    voxels: object                   # voxels.VoxelCounts
    not_modelled: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    transient_bytes: int = 0         # the largest single transient anywhere
    transient_label: str = ''
    transient_module: str = ''
    # with estimate(..., timeline=True): (live bytes, phase, module, label) per event of the
    # steady-state step (graph.Graph.timeline)
    timeline: list = None

    @property
    def lower_bound(self):
        """True when some module was not modelled (its memory is missing from the total)."""
        return bool(self.not_modelled)

    @property
    def peak_gib(self):
        return self.peak_bytes / 2 ** 30


def _batch_size(cfg, batch_size):
    if batch_size is None:
        batch_size = cfg_get(cfg, 'OPTIMIZATION.BATCH_SIZE_PER_GPU', 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f'batch size must be a positive integer, got {batch_size!r} '
                          '(--batch_size or OPTIMIZATION.BATCH_SIZE_PER_GPU)')
    return batch_size


def _optimizer(cfg):
    name = str(cfg_get(cfg, 'OPTIMIZATION.OPTIMIZER', 'adam_onecycle')).lower()
    accum = cfg_get(cfg, 'OPTIMIZATION.ACCUMULATION_STEPS', 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(f'OPTIMIZATION.ACCUMULATION_STEPS must be an integer >= 1, got {accum!r}')
    return name, OPTIMIZER_STATES.get(name), accum


def _context(cfg, geom, batch_size, counts, target, amp, assume):
    return Context(cfg=cfg, geom=geom, batch_size=batch_size, voxels=counts.per_sample,
                   points=counts.points_per_sample, target=target, amp=amp,
                   class_names=list(cfg.get('CLASS_NAMES') or []), **assume)


def estimate(cfg, batch_size=None, voxels=None, amp=False, target='cuda', data_counts=None,
             focal_growth=None, focal_new_voxels=None, gt_boxes=None, observed=None,
             timeline=False):
    """Estimate the peak memory of one training step of ``cfg`` (a loaded config).

    batch_size: per device (default OPTIMIZATION.BATCH_SIZE_PER_GPU); voxels: voxels per sample
    (default MAX_NUMBER_OF_VOXELS['train']); amp: fp16 autocast; target: 'cuda' or 'cpu' (which
    kernels' workspaces to model); data_counts: stats from voxels.count_dataset_voxels;
    focal_growth: assumed new voxels per input voxel per focal block (default 1.0);
    focal_new_voxels: observed new voxels per focal block (overrides focal_growth);
    gt_boxes: ground-truth boxes per sample (default 100); observed: counts a real step
    produced (measure.py), replacing the expected ones: {'dsvt_voxels': [per stage],
    'dsvt_sets': [[shift 0, shift 1] per stage], 'bev_columns': n}, each over the batch.
    """
    if target not in ('cuda', 'cpu'):
        raise ConfigError(f'target must be cuda or cpu, got {target!r}')
    geom = geometry_from_config(cfg)
    batch_size = _batch_size(cfg, batch_size)
    counts = resolve_counts(geom, voxels, data_counts)
    opt_name, n_states, accum = _optimizer(cfg)
    assume = {}
    if focal_growth is not None:
        if isinstance(focal_growth, bool) or not isinstance(focal_growth, (int, float)) \
                or focal_growth < 0:
            raise ConfigError(f'--focal-growth must be a number >= 0, got {focal_growth!r}')
        assume['focal_growth'] = float(focal_growth)
    if focal_new_voxels is not None:
        assume['focal_new_voxels'] = [int(v) for v in focal_new_voxels]
    if gt_boxes is not None:
        assume['gt_boxes'] = int(gt_boxes)
    if observed:
        assume['observed'] = dict(observed)

    # pass 1: parameters and the module state carried between steps
    g1 = Graph(amp=amp, target=target)
    replay(g1, _context(cfg, geom, batch_size, counts, target, amp, assume))
    param_bytes, buffer_bytes = g1.param_bytes, g1.buffer_bytes
    state = g1.state_bytes()
    max_param = max((p.nbytes for p in g1.param_tensors), default=0)

    # pass 2: steady state
    notes = []
    if n_states is None:
        n_states = 2
        notes.append(f'OPTIMIZATION.OPTIMIZER {opt_name!r} unknown to the estimator: assumed '
                     'two state copies per parameter (as Adam)')
    g = Graph(amp=amp, params_preloaded=True, target=target)
    g.timeline = [] if timeline else None
    g.preload(param_bytes + buffer_bytes, 'parameters and buffers')
    opt_bytes = n_states * param_bytes
    g.preload(opt_bytes, f'{opt_name} state ({n_states} x parameters)')
    if accum > 1:
        g.preload(param_bytes, 'gradients kept across accumulation steps')
    g.preload_state(state)
    ctx = _context(cfg, geom, batch_size, counts, target, amp, assume)
    loss = replay(g, ctx)
    for p in g.param_tensors:
        p.has_grad = accum > 1
    g.backward(loss)
    # AdamW/Adam step: on CUDA the foreach implementation allocates sqrt(exp_avg_sq) for every
    # parameter at once; on CPU the per-tensor loop needs two temporaries of the largest one
    if target == 'cuda':
        step_temp, step_label = param_bytes, 'optimizer foreach temporaries (1 x parameters)'
    else:
        step_temp, step_label = 2 * max_param, 'optimizer per-tensor temporaries'
    g.step(step_temp, step_label)
    if amp:
        notes.append('AMP: conv/linear activations in fp16; LayerNorm/softmax/losses and the '
                     'master weights, gradients and optimizer state in fp32')
    rows = [st for st in g.modules.values()]
    big = max(rows, key=lambda r: r.transient, default=None)
    return Estimate(
        cfg_file=str(cfg.get('CFG_FILE', '')), batch_size=batch_size, amp=bool(amp),
        target=target, rows=rows, peak_bytes=g.peak.bytes, peak_phase=g.peak.phase,
        peak_module=g.peak.module, peak_label=g.peak.label,
        phase_peaks={k: v.bytes for k, v in g.phase_peaks.items()},
        params=sum(r.params for r in rows), param_bytes=param_bytes, buffer_bytes=buffer_bytes,
        optimizer=opt_name, optimizer_bytes=opt_bytes, grad_bytes=param_bytes,
        accumulation_steps=accum, state_bytes=sum(state.values()), geometry=list(ctx.shapes),
        flattened_bev_channels=ctx.flattened_bev_channels,
        map_to_bev_input=ctx.map_to_bev_input, voxels=counts,
        not_modelled=list(ctx.not_modelled), notes=notes + list(ctx.notes),
        transient_bytes=big.transient if big else 0,
        transient_label=big.transient_label if big else '',
        transient_module=big.name if big else '', timeline=g.timeline)
