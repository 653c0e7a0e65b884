"""``--measure``: build the model, run real training steps, report the peak beside the estimate.

The batch: the densest counted frame of the configured data (real scenes, clustered as LiDAR
returns are), batch_size times, through the real data pipeline. Without frames (no data on
disk, or ``--voxels``) a batch of distinct uniformly random voxels of the estimate's count.
Two training steps run (forward, backward, gradient clipping, optimizer step,
zero_grad(set_to_none=True)), so the peak covers the steady state the estimate models (the
second step runs with the optimizer state allocated by the first).

Peak: CUDA ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``); CPU: the peak of
live tensor bytes seen by :mod:`pcdet_focal.memory.tracker` (parameters, buffers and the batch
included). The estimate is then redone at the counts the step produced (focal new voxels and
spawns, DSVT voxels and sets, BEV columns): that error measures the memory model itself.
Measuring is refused when the estimate exceeds the memory this machine has available, and
under AMP on the CPU (tools/estimate_mem.py says so).
"""
import time
from dataclasses import dataclass

from ..config import cfg_get
from ..data.processor import voxel_geometry
from ..errors import ConfigError
from .counts import seeded_item
from .verdict import GIB, required_bytes

GT_BOXES_PER_SAMPLE = 8      # boxes of a uniform random batch
RAM_FRACTION = 0.8    # CPU: measure only when the estimate is below this share of free RAM


def measure_device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


@dataclass
class Measurement:
    """A measured step beside the estimate.

    ``estimate_bytes``: the estimate as configured (assumed focal growth, 100 gt boxes);
    ``matched_bytes``: the estimate redone with what the measured step really had (the new
    voxels each focal block produced, the synthetic batch's box count): the memory model's
    accuracy, which ``error`` reports."""

    device: str
    method: str
    estimate_bytes: int
    peak_bytes: object = None      # None when refused
    reserved_bytes: object = None  # CUDA: max_memory_reserved
    batch_source: str = ''
    matched_bytes: object = None
    refused: str = ''
    seconds: float = 0.0
    batch_size: int = 0
    voxels: int = 0
    focal_new_voxels: object = None
    observed: object = None        # data-dependent counts of the measured step (hooks)

    @property
    def error(self):
        """(matched estimate - measured) / measured, or None."""
        if not self.peak_bytes or self.matched_bytes is None:
            return None
        return (self.matched_bytes - self.peak_bytes) / self.peak_bytes

    def lines(self):
        if self.refused:
            return [f'measure: refused: {self.refused}']
        mib = 2 ** 20
        out = [f'measure ({self.device}, {self.method}; batch {self.batch_size}: '
               f'{self.batch_source}; 2 training steps, {self.seconds:.1f} s):',
               f'  measured peak {self.peak_bytes / mib:,.1f} MiB; estimate at the measured '
               f'counts {self.matched_bytes / mib:,.1f} MiB (error {self.error:+.1%})']
        seen = [f'{k}={v}' for k, v in (self.observed or {}).items()]
        if self.reserved_bytes:
            out.append(f'  measured reserved {self.reserved_bytes / mib:,.1f} MiB')
        if seen:
            out.append('  measured counts used: ' + ', '.join(seen))
        out.append(f'  the estimate as configured (expected / assumed counts): '
                   f'{self.estimate_bytes / mib:,.1f} MiB')
        return out

    def as_dict(self):
        return {'device': self.device, 'method': self.method, 'refused': self.refused or None,
                'batch': self.batch_source, 'reserved_bytes': self.reserved_bytes,
                'estimate_bytes': self.estimate_bytes, 'measured_bytes': self.peak_bytes,
                'estimate_at_measured_counts_bytes': self.matched_bytes,
                'relative_error': self.error, 'seconds': round(self.seconds, 2),
                'batch_size': self.batch_size, 'voxels_per_sample': self.voxels,
                'focal_new_voxels': self.focal_new_voxels, 'observed_counts': self.observed}


def available_ram():
    """Bytes of RAM the kernel reports as available (MemAvailable; None off Linux)."""
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _unique_voxels(rng, volume, n):
    import numpy as np
    picked = np.unique(rng.integers(0, volume, size=int(n * 1.2) + 16))
    while picked.size < n:
        picked = np.unique(np.concatenate([picked, rng.integers(0, volume, size=n)]))
    return rng.permutation(picked)[:n]


def synthetic_batch(cfg, batch_size, voxels, seed=0):
    """A collated numpy batch_dict (as DatasetTemplate.collate_batch makes it).

    voxel_coords (N, 4) [b, z, y, x]; voxels (N, max_points, C) with the points of each voxel
    inside it (padding rows zero); points (P, 1 + C); gt_boxes (B, M, 8) on occupied voxels."""
    import numpy as np
    geom = voxel_geometry(cfg.DATA_CONFIG)
    rng = np.random.default_rng(seed)
    nx, ny, nz = geom.grid_size
    lo = np.array(geom.point_cloud_range[:3], dtype=np.float32)
    vs = np.array(geom.voxel_size, dtype=np.float32)
    c, maxp = geom.num_point_features, geom.max_points_per_voxel
    n_cls = max(1, len(cfg.get('CLASS_NAMES') or []))
    coords, vox, nums, points, boxes = [], [], [], [], []
    for b in range(batch_size):
        flat = _unique_voxels(rng, nx * ny * nz, voxels)
        z, rem = np.divmod(flat, ny * nx)
        y, x = np.divmod(rem, nx)
        num = rng.integers(1, maxp + 1, size=voxels)
        xyz = (np.stack([x, y, z], 1)[:, None, :] + rng.random((voxels, maxp, 3))) * vs + lo
        feats = np.concatenate([xyz, rng.random((voxels, maxp, c - 3))], axis=2) \
            .astype(np.float32)
        feats[np.arange(maxp)[None, :] >= num[:, None]] = 0
        coords.append(np.stack([np.full(voxels, b), z, y, x], 1))
        vox.append(feats)
        nums.append(num)
        real = feats[np.arange(maxp)[None, :] < num[:, None]]
        points.append(np.concatenate([np.full((len(real), 1), b, np.float32), real], 1))
        centre_idx = rng.choice(voxels, size=min(GT_BOXES_PER_SAMPLE, voxels), replace=False)
        centres = xyz[centre_idx, 0]
        size = np.array([[3.9, 1.6, 1.56], [0.8, 0.6, 1.73], [1.76, 0.6, 1.73]], np.float32)
        cls = rng.integers(1, n_cls + 1, size=len(centres))
        dims = size[(cls - 1) % 3]
        heading = rng.uniform(-np.pi, np.pi, size=(len(centres), 1)).astype(np.float32)
        boxes.append(np.concatenate([centres, dims, heading, cls[:, None].astype(np.float32)],
                                    1))
    m = max(len(bx) for bx in boxes)
    gt = np.zeros((batch_size, m, 8), np.float32)
    for b, bx in enumerate(boxes):
        gt[b, :len(bx)] = bx
    return {'voxels': np.concatenate(vox), 'voxel_num_points': np.concatenate(nums)
            .astype(np.int32), 'voxel_coords': np.concatenate(coords).astype(np.int32),
            'points': np.concatenate(points).astype(np.float32), 'gt_boxes': gt,
            'batch_size': batch_size, 'frame_id': np.array([f'synthetic_{b}'
                                                            for b in range(batch_size)])}


def _to_device(batch, device):
    """load_data_to_device, plus a copy on the CPU: there it would wrap the numpy arrays
    without allocating, while the estimate (and a CUDA run) counts the batch's tensors."""
    import torch
    from ..engine.utils import load_data_to_device
    load_data_to_device(batch, device)
    if device.type == 'cpu':
        for key, val in batch.items():
            if torch.is_tensor(val):
                batch[key] = val.clone()
    return batch


def _focal_stats(model):
    """(new voxels, spawns) of each focal block in the last forward, over the batch."""
    enc = getattr(getattr(model, 'backbone_3d', None), 'focal_encoder', None)
    if enc is None:
        enc = getattr(model, 'backbone_3d', None)
    stats = getattr(enc, 'last_stats', None) or {}

    def series(prefix):
        keys = sorted((k for k in stats if k.startswith(prefix)),
                      key=lambda k: int(k.rsplit('_', 1)[1]))
        return [int(stats[k]) for k in keys]
    return series('new_voxels_'), series('spawns_')


def _merge_max(acc, new):
    """Element-wise max of nested lists / ints (counts over several steps)."""
    if acc is None:
        return new
    if isinstance(new, list):
        return [_merge_max(a, b) for a, b in zip(acc, new)]
    return max(acc, new)


def _observe(model, observed):
    """Forward hooks that record the data-dependent counts the estimate otherwise expects:
    DSVT's voxels and sets per stage, the occupied BEV columns of SparseHeightCompression,
    the focal blocks' dilation inputs (counted after the steps by :func:`_probed`).
    Returns the hook handles."""
    import torch
    handles = []
    for mod in model.modules():
        name = type(mod).__name__
        if name == 'DSVTInputLayer':
            def dsvt_hook(_m, _inp, out):
                layouts = out[1] if isinstance(out, tuple) and len(out) > 1 else []
                try:
                    vox = [int(lay.coords.shape[0]) for lay in layouts]
                    sets = [[int(st.voxel_inds.shape[1]) for st in lay.sets] for lay in layouts]
                except AttributeError:
                    return
                observed['dsvt_voxels'] = _merge_max(observed.get('dsvt_voxels'), vox)
                observed['dsvt_sets'] = _merge_max(observed.get('dsvt_sets'), sets)
            handles.append(mod.register_forward_hook(dsvt_hook))
        elif name == 'SparseHeightCompression':
            def shc_hook(_m, args):
                bd = args[0]
                sp = bd.get('encoded_spconv_tensor')
                if sp is not None and hasattr(sp, 'indices'):
                    c, (_, h, w) = sp.indices.long(), sp.spatial_shape
                elif 'voxel_coords' in bd and getattr(_m, 'input_shape', None):
                    c, (w, h, _) = bd['voxel_coords'].long(), _m.input_shape
                else:
                    return
                cols = int(torch.unique((c[:, 0] * int(h) + c[:, 2]) * int(w) + c[:, 3]).numel())
                observed['bev_columns'] = max(observed.get('bev_columns', 0), cols)
            handles.append(mod.register_forward_pre_hook(shc_hook))
        elif name == 'FocalBlock':
            # the dilation's inputs, kept outside torch; counted after the steps (_probed)
            from ..models.focal_sst_memory import probe_dilation
            handles.append(probe_dilation(mod, observed.setdefault('_focal_probe', {})))
    return handles


def _probed(observed):
    """Replace the focal blocks' probed dilation inputs by their counts (focal_dilation)."""
    probe = observed.pop('_focal_probe', None)
    if probe:
        from ..models.focal_sst_memory import probed_counts
        observed['focal_dilation'] = probed_counts(probe)


def frame_batch(dataset, index, batch_size):
    """A collated numpy batch of frame ``index`` repeated ``batch_size`` times (every sample as
    dense as the densest counted frame: what the estimate assumes)."""
    item = seeded_item(dataset, index)     # the counted frame's augmentation
    return dataset.collate_batch([dict(item) for _ in range(batch_size)])


def _train_steps(model, optimizer, cfg, make_batch, device, amp, steps, observed):
    """Run ``steps`` training steps as engine.trainer does; the focal blocks' new voxels and
    spawns (the largest over the steps) go into ``observed``."""
    import torch
    from ..engine.optim import optimizer_step
    clip = float(cfg_get(cfg, 'OPTIMIZATION.GRAD_NORM_CLIP', 10))
    scaler = torch.amp.GradScaler('cuda', enabled=amp)
    for step in range(steps):
        batch = _to_device(make_batch(step), device)
        ctx = torch.autocast('cuda', dtype=torch.float16) if amp else _Null()
        with ctx:
            ret, _, _ = model(batch)
            loss = ret['loss'].mean()
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, clip)
        del batch, ret, loss
        new, spawns = _focal_stats(model)
        if new:
            observed['focal_new_voxels'] = _merge_max(observed.get('focal_new_voxels'), new)
            observed['focal_spawns'] = _merge_max(observed.get('focal_spawns'), spawns)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _storage_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def _batches(cfg, est, prepared):
    """(make_batch(step), description, boxes per sample) of the measured steps."""
    from .. import backend
    b, counts = est.batch_size, est.voxels
    if counts.densest is not None:
        dataset = backend.build_dataset(cfg.DATA_CONFIG, list(cfg.CLASS_NAMES), True,
                                        prepared.host)
        batch = frame_batch(dataset, counts.densest, b)
        boxes = int(batch['gt_boxes'].shape[1])
        return (lambda step: frame_batch(dataset, counts.densest, b),
                f'the densest counted frame ({counts.per_sample:,} voxels) x {b}', boxes)
    return (lambda step: synthetic_batch(cfg, b, counts.per_sample, seed=step),
            f'{counts.per_sample:,} uniformly random voxels per sample (no frames counted)',
            GT_BOXES_PER_SAMPLE)


def measure_config(cfg, est, prepared, steps=2, device=None):
    """Measure the peak of ``steps`` training steps of ``cfg`` at the estimate's batch size on
    ``device`` (default: CUDA if available, else CPU); ``prepared``: the estimate's model
    build and counts (estimator.prepare)."""
    import torch
    from .estimator import estimate
    device = torch.device(device) if device is not None else measure_device()
    b, n = est.batch_size, est.voxels.per_sample
    method = ('torch.cuda.max_memory_allocated' if device.type == 'cuda'
              else 'PyTorch CPU allocator events (pcdet_focal.memory.tracker.PeakMemory) + '
                   'parameters and buffers')
    m = Measurement(device=str(device), method=method, estimate_bytes=est.peak_bytes,
                    batch_size=b, voxels=n)
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        need = required_bytes(est.peak_bytes, est.world_size)
        if need > free:
            m.refused = (f'the estimate needs {need / GIB:.2f} GiB '
                         f'but {free / GIB:.2f} GiB are free on {device}')
            return m
    else:
        avail = available_ram()
        if avail is not None and est.peak_bytes > RAM_FRACTION * avail:
            m.refused = (f'the estimate ({est.peak_bytes / GIB:.2f} GiB) exceeds '
                         f'{RAM_FRACTION:.0%} of the {avail / GIB:.2f} GiB of RAM available on '
                         'this machine; pass --voxels / --batch_size for a smaller run')
            return m
    from .. import backend
    from ..engine.optim import build_optimizer
    from .build import dataset_stub
    make_batch, m.batch_source, boxes = _batches(cfg, est, prepared)
    t0 = time.perf_counter()
    model = backend.build_network(cfg.MODEL, len(cfg.CLASS_NAMES), dataset_stub(cfg),
                                  prepared.host).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.OPTIMIZATION)
    amp = bool(est.amp) and device.type == 'cuda'
    observed = {}
    hooks = _observe(model, observed)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _train_steps(model, optimizer, cfg, make_batch, device, amp, steps, observed)
        torch.cuda.synchronize(device)
        m.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        m.reserved_bytes = int(torch.cuda.max_memory_reserved(device))
    else:
        from .tracker import PeakMemory
        entry = _storage_bytes(list(model.parameters()) + list(model.buffers()))
        with PeakMemory('cpu') as pm:
            _train_steps(model, optimizer, cfg, make_batch, device, False, steps, observed)
        m.peak_bytes = entry + int(pm.peak_bytes)
    m.seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    _probed(observed)
    m.focal_new_voxels = observed.get('focal_new_voxels')
    m.observed = observed
    matched = estimate(cfg, batch_size=b, amp=est.amp, target=device.type,
                       gt_boxes=boxes, observed=observed, prepared=prepared,
                       world_size=est.world_size)
    m.matched_bytes = matched.peak_bytes
    return m
