"""Peak training memory of one optimizer step, module by module, from the modules the trainer
would build.

1. The model: the trainer's builder on the meta device (:mod:`.build`): ours on the standalone
   host, OpenPCDet's ``build_network`` on the pcdet host. Parameters, buffers, channel counts
   and stage shapes are the built modules'.
2. The counts: frames of the configured dataset, else the caps (:mod:`.counts`).
3. The replay, on a symbolic tape (:mod:`.graph`): the collated input batch, each module's
   memory rule in the detector's ``module_list`` order (a ``memory`` method beside our modules,
   :mod:`.pcdet_rules` for OpenPCDet's), the detector's loss, backward, the optimizer step. It
   runs twice: the first pass finds the module state carried between steps; the second starts
   with parameters, optimizer state (Adam / AdamW: 2 copies, SGD with momentum: 1), gradients
   kept across accumulation steps, DDP's gradient buckets and last step's module state
   allocated, as the steady state of training has them.

A module without a memory rule makes the estimate incomplete: ``peak_bytes`` is None and
``not_modelled`` names the modules (tools/estimate_mem.py exits 3). A count without a bound
(no focal cap, dynamic voxelisation without a cap) gives an estimate that can never FIT.
"""
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models.detector import MODULE_TOPOLOGY
from . import cuda
from .build import build_model
from .counts import DEFAULT_FRAMES, Counts, count, from_caps
from .flow import Flow, NotModelled, Sparse
from .graph import FP32, INT32, Graph
from .tape import Tape

OPTIMIZER_STATES = {'adam_onecycle': 2, 'adam_cosineanneal': 2, 'adam': 2, 'adamw': 2,
                    'sgd': 1}
SLOTS = {attr: key for attr, key, _ in MODULE_TOPOLOGY}     # module attribute -> config key
GT_BOXES_PER_SAMPLE = 100      # targets the heads are sized for when no frames are counted


@dataclass
class Estimate:
    """The result of :func:`estimate` (bytes unless said otherwise). ``peak_bytes`` is None
    when some module has no memory rule (``not_modelled``)."""

    cfg_file: str
    batch_size: int
    amp: bool
    target: str
    host: str
    stack: str                       # the CUDA stack modelled
    rows: list                       # graph.ModuleStats in forward order
    peak_bytes: object
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
    voxels: object                   # counts.Counts
    not_modelled: list = field(default_factory=list)
    unbounded: list = field(default_factory=list)   # (config key, why)
    notes: list = field(default_factory=list)
    transient_bytes: int = 0         # the largest single transient anywhere
    transient_label: str = ''
    transient_module: str = ''
    reserved_bytes: object = None    # CUDA: the caching allocator's reserved peak (simulated)
    events: list = None              # CUDA: the step's allocations, for allocator simulations
    ddp_bytes: int = 0               # DDP's gradient buckets (world size > 1)
    world_size: int = 1
    # with estimate(..., timeline=True): (live bytes, phase, module, label) per event of the
    # steady-state step (graph.Graph.timeline)
    timeline: list = None

    @property
    def complete(self):
        return not self.not_modelled

    @property
    def bounded(self):
        return not self.unbounded and self.voxels.bounded


@dataclass
class Prepared:
    """What every estimate of one config shares: the built model, its grid, the counts."""

    cfg: object
    host: str
    model: object
    geom: object
    counts: object
    optimization: object
    cache: dict = field(default_factory=dict)    # counts on frames, shared by the replays


def prepare(cfg, host='standalone', voxels=None, frames=DEFAULT_FRAMES, counts=None,
            cache=None):
    """Build the model (meta device) and count the data once for many estimates; ``counts`` /
    ``cache``: another config's, when only the model differs (suggestions)."""
    from ..engine.optim import optimization
    opt = optimization(cfg.get('OPTIMIZATION'))
    model, geom = build_model(cfg, host)
    if geom.grid_size is None:     # point-based: the estimate names the modules without rules
        counts = Counts(per_sample=0, points_per_sample=0, source='no voxelisation step')
    if counts is None:
        if voxels is not None or not frames:
            counts = from_caps(geom, voxels)
        else:
            from .. import backend

            def build_dataset(data_cfg, class_names):
                return backend.build_dataset(data_cfg, class_names, True, host)
            counts = count(cfg, geom, build_dataset, frames=frames)
    return Prepared(cfg, host, model, geom, counts, opt, cache={} if cache is None else cache)


def _batch_size(prep, batch_size):
    if batch_size is None:
        batch_size = prep.optimization.BATCH_SIZE_PER_GPU
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f'batch size must be a positive integer, got {batch_size!r} '
                          '(--batch_size or OPTIMIZATION.BATCH_SIZE_PER_GPU)')
    return batch_size


def _rule(module):
    """The memory rule of a built module: its own ``memory`` method (ours), an entry of
    pcdet_rules (OpenPCDet's classes), else None."""
    own = getattr(type(module), 'memory', None)
    if callable(own) and type(module).__module__.startswith('pcdet_focal.'):
        return lambda tape, flow: own(module, tape, flow)
    from .pcdet_rules import RULES
    rule = RULES.get(type(module).__name__)
    return (lambda tape, flow: rule(module, tape, flow)) if rule else None


def _modules(model):
    """[(slot, module)] in the detector's build order."""
    names = {id(m): SLOTS.get(n, n.upper()) for n, m in model.named_children()}
    return [(names.get(id(m), type(m).__name__), m) for m in model.module_list]


def missing_rules(model):
    """'SLOT Class' of every built module that has no memory rule."""
    out = [f'{slot} {type(m).__name__}' for slot, m in _modules(model) if _rule(m) is None]
    if not callable(getattr(model, 'memory_loss', None)):
        from .pcdet_rules import LOSSES
        if type(model).__name__ not in LOSSES:
            out.append(f'DETECTOR {type(model).__name__} (its loss)')
    return out


def _input_batch(tape, flow, geom, counts):
    """The collated batch on the device: voxels, num points, coords, points, boxes."""
    tape.begin('input batch', 'INPUT')
    b, n = flow.batch_size, flow.batch_size * counts.per_sample
    c = geom.num_point_features
    coords = tape.tensor(n * 4, 'voxel_coords (N, 4)', INT32)
    tensors = {'voxel_coords': coords,
               'points': tape.tensor(b * counts.points_per_sample * (c + 1), 'points'),
               'gt_boxes': tape.tensor(b * flow.gt_boxes * 8, 'gt_boxes')}
    voxels = None
    if geom.max_points_per_voxel is not None:
        voxels = tape.tensor(n * geom.max_points_per_voxel * c, 'voxels (N, max_points, C)')
        tensors['voxels'] = voxels
        tensors['voxel_num_points'] = tape.tensor(n, 'voxel_num_points', INT32)
    for key, t in tensors.items():
        tape.set_batch(key, t)
        tape.drop(t)
    nx, ny, nz = geom.grid_size
    flow.sparse = Sparse(voxels, n, c, (nz, ny, nx), (1, 1, 1), coords, {}, counts.frames)
    tape.end()


def _replay(g, prep, flow, stack):
    """One training forward on ``g``; returns the loss SymTensor."""
    tape = Tape(g, stack)
    _input_batch(tape, flow, prep.geom, prep.counts)
    for slot, module in _modules(prep.model):
        tape.begin(f'{slot} {type(module).__name__}', slot, module)
        _rule(module)(tape, flow)
        tape.end()
    tape.begin(f'loss ({type(prep.model).__name__})', 'LOSS')
    loss_rule = getattr(prep.model, 'memory_loss', None)
    if loss_rule is None:
        from .pcdet_rules import LOSSES
        loss = LOSSES[type(prep.model).__name__](prep.model, tape, flow)
    else:
        loss = loss_rule(tape, flow)
    tape.end()
    return loss


def _persistent(model, block_round):
    """(trainable bytes, buffer and frozen bytes, largest trainable tensor bytes), each tensor
    rounded to the allocator's blocks when ``block_round``."""
    size = block_round or (lambda n: n)
    trainable = [size(p.numel() * FP32) for p in model.parameters() if p.requires_grad]
    frozen = [size(p.numel() * FP32) for p in model.parameters() if not p.requires_grad]
    frozen += [size(buf.numel() * buf.element_size()) for buf in model.buffers()]
    return sum(trainable), sum(frozen), max(trainable, default=0)


def ddp_bucket_bytes(param_bytes, world_size):
    """DDP keeps a flat copy of every gradient in its communication buckets (reducer buckets of
    bucket_cap_mb, 25 MiB each, together one copy of the trainable parameters; the default
    gradient_as_bucket_view=False), allocated once before the first backward."""
    return param_bytes if world_size > 1 else 0


def estimate(cfg, batch_size=None, amp=False, target='cuda', stack=None, voxels=None,
             frames=DEFAULT_FRAMES, gt_boxes=None, observed=None, timeline=False,
             host='standalone', world_size=1, prepared=None):
    """Estimate the peak memory of one training step of ``cfg`` (a loaded config).

    batch_size: per device (default OPTIMIZATION.BATCH_SIZE_PER_GPU); amp: fp16 autocast;
    target: 'cuda' or 'cpu' (which kernels' workspaces to model); stack: a cuda.Stack (default
    the installed one); voxels: voxels per sample instead of the counted frames; frames: how
    many frames to count (0: the caps); gt_boxes: ground-truth boxes per sample (default 100);
    observed: counts a real step produced (measure.py); timeline: keep the live bytes per
    event; host: 'standalone' or 'pcdet'; world_size: processes of a DDP run; prepared: a
    :func:`prepare` result to reuse (model, counts).
    """
    if target not in ('cuda', 'cpu'):
        raise ConfigError(f'target must be cuda or cpu, got {target!r}')
    prep = prepared or prepare(cfg, host, voxels, frames)
    batch = _batch_size(prep, batch_size)
    opt = prep.optimization
    stack = stack or cuda.Stack.installed()
    block_round = cuda.round_block if target == 'cuda' else None
    base = dict(cfg_file=str(cfg.get('CFG_FILE', '')), batch_size=batch, amp=bool(amp),
                target=target, host=prep.host, stack=stack.describe(), voxels=prep.counts,
                world_size=world_size)
    missing = missing_rules(prep.model)
    if missing:
        return _incomplete(base, missing, opt)
    if prep.geom.grid_size is None:
        from ..data.processor import voxel_geometry
        voxel_geometry(cfg.DATA_CONFIG)    # raises: the rules need the voxel grid

    def flow():
        return Flow(batch_size=batch, counts=prep.counts, target=target,
                    observed=dict(observed or {}),
                    gt_boxes=int(gt_boxes if gt_boxes is not None else GT_BOXES_PER_SAMPLE),
                    cache=prep.cache)

    try:
        # pass 1: the module state carried between steps
        g1 = Graph(amp=amp, target=target, block_round=block_round)
        _replay(g1, prep, flow(), stack)
        state = g1.state_bytes()
        # pass 2: the steady state
        g = Graph(amp=amp, target=target, block_round=block_round)
        g.timeline = [] if timeline else None
        g.events = [] if target == 'cuda' else None
        param_bytes, frozen_bytes, max_param = _persistent(prep.model, block_round)
        n_states = OPTIMIZER_STATES[opt.OPTIMIZER]
        g.preload(param_bytes + frozen_bytes, 'parameters and buffers')
        g.preload(n_states * param_bytes, f'{opt.OPTIMIZER} state ({n_states} x parameters)')
        if opt.ACCUMULATION_STEPS > 1:
            g.preload(param_bytes, 'gradients kept across accumulation steps')
        ddp = ddp_bucket_bytes(param_bytes, world_size)
        if ddp:
            g.preload(ddp, f'DDP gradient buckets ({world_size} processes)')
        g.preload_state(state)
        f = flow()
        loss = _replay(g, prep, f, stack)
    except NotModelled as err:
        return _incomplete(base, [str(err)], opt)
    for p in g.param_tensors:
        p.has_grad = opt.ACCUMULATION_STEPS > 1
    g.backward(loss)
    # AdamW/Adam step: on CUDA the foreach implementation allocates sqrt(exp_avg_sq) for every
    # parameter at once; on the CPU the per-tensor loop needs two temporaries of the largest
    if target == 'cuda':
        g.step(param_bytes, 'optimizer foreach temporaries (1 x parameters)')
    else:
        g.step(2 * max_param, 'optimizer per-tensor temporaries')
    notes = list(f.notes)
    if amp:
        notes.append('AMP: conv/linear activations in fp16; LayerNorm/softmax/losses and the '
                     'master weights, gradients and optimizer state in fp32')
    beyond = prep.counts.beyond()
    if beyond:
        notes.append(beyond)
    rows = list(g.modules.values())
    big = max(rows, key=lambda r: r.transient, default=None)
    return Estimate(
        **base, rows=rows, peak_bytes=g.peak.bytes, peak_phase=g.peak.phase,
        peak_module=g.peak.module, peak_label=g.peak.label,
        phase_peaks={k: v.bytes for k, v in g.phase_peaks.items()},
        params=sum(p.numel() for p in prep.model.parameters() if p.requires_grad),
        param_bytes=param_bytes, buffer_bytes=frozen_bytes, optimizer=opt.OPTIMIZER,
        optimizer_bytes=n_states * param_bytes, grad_bytes=param_bytes,
        accumulation_steps=opt.ACCUMULATION_STEPS, state_bytes=sum(state.values()),
        geometry=[_grid_line(prep.geom)] + list(f.shapes),
        flattened_bev_channels=f.flattened_bev_channels, map_to_bev_input=f.map_to_bev_input,
        unbounded=list(f.unbounded), notes=notes,
        transient_bytes=big.transient if big else 0,
        transient_label=big.transient_label if big else '',
        transient_module=big.name if big else '',
        reserved_bytes=cuda.reserved_peak(g.events)[0] if g.events is not None else None,
        events=g.events,
        ddp_bytes=ddp, timeline=g.timeline)


def _grid_line(geom):
    nx, ny, nz = geom.grid_size
    vs = ', '.join(f'{v:g}' for v in geom.voxel_size)
    return f'voxel grid {nx} x {ny} x {nz} (x, y, z) at voxel size [{vs}] m'


def _incomplete(base, missing, opt):
    return Estimate(**base, rows=[], peak_bytes=None, peak_phase='', peak_module='',
                    peak_label='', phase_peaks={}, params=0, param_bytes=0, buffer_bytes=0,
                    optimizer=opt.OPTIMIZER, optimizer_bytes=0, grad_bytes=0,
                    accumulation_steps=opt.ACCUMULATION_STEPS, state_bytes=0, geometry=[],
                    flattened_bev_channels=None, map_to_bev_input=None,
                    not_modelled=list(missing))
