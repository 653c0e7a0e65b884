#!/usr/bin/env python
"""DSVTDownsample benchmark: time, peak memory, input-layer share, input_downsample, growth in N.

``python benchmarks/dsvt.py [--sizes 10000 50000 100000] [--repeats 2] [--threads 1]
[--device cpu|cuda|all] [--chain-voxels 25000] [--chain-batch 1] [--skip-chain]``

Model (one stage, the users' full-resolution DSVT): sparse_shape [500, 200, 175] (x, y, z),
d_model 128, set_size 36, 2 blocks (both window shifts), nhead 8, dim_feedforward 256,
window [12, 12, 175] (hybrid [2, 2, 1]). Voxels: synthetic LiDAR-like scans (see make_voxels),
batch 1, shuffled. Printed, all side by side:

1. per N: forward (eval, no grad), input layer alone (partition + position embeddings) and its
   share of the forward, forward + backward (train), peak live tensor bytes of forward + backward;
   growth ratios vs N and vs N log N (10k as the base).
2. input_downsample [1, 1, 4] (window z 44) vs [1, 1, 1] at the middle N: time, memory, voxels
   entering stage 0, output height bins.
3. the chain DSVTDownsample (input_downsample [1, 1, 4]) -> SparseHeightCompression (learned, as
   cfgs/focalsst_dsvt.yaml) on the users' geometry: forward + backward peak memory vs 24 GiB,
   on real KITTI frames (../shared/data/kitti_mini, voxelised at that grid) when present and on
   --chain-voxels synthetic voxels per sample.

Timing notes for this machine (a 2-core VM shared with other jobs): the default runs one
intra-op thread (with 2 threads and the other core busy, torch's parallel sort stalls ~190 ms per
call); glibc is told to keep freed memory (mallopt) because first-touch page faults in this VM
otherwise cost more than the arithmetic on large tensors. ``--threads 2 --no-malloc-tune``
measures without either. Times are the fastest of ``--repeats`` runs after a warm-up, as
process CPU time (see measure(); robust to the other jobs), with the forward's wall time
beside it; peak memory (live tensor bytes) is measured once per case by benchmarks.common
(pcdet_focal.memory.tracker).
"""
import argparse
import ctypes
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from easydict import EasyDict  # noqa: E402

from benchmarks.common import (bench, describe_machine, fmt_bytes, fmt_time,  # noqa: E402
                               peak_memory, print_table, sync)
from pcdet_focal.models.dsvt import DSVTDownsample  # noqa: E402

SHAPE = [500, 200, 175]  # x, y, z: the users' grid
KITTI_MINI = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'kitti_mini'
WIDTH = 128


def dsvt_cfg(input_downsample=(1, 1, 1)):
    z = math.ceil(SHAPE[2] / input_downsample[2])
    return EasyDict(dict(
        INPUT_LAYER=dict(sparse_shape=list(SHAPE), input_downsample=list(input_downsample),
                         input_reduction='max', downsample_stride=[], d_model=[WIDTH],
                         set_info=[[36, 2]], window_shape=[[12, 12, z]], hybrid_factor=[2, 2, 1],
                         shifts_list=[[[0, 0, 0], [6, 6, 0]]], normalize_pos=False),
        block_name=['DSVTBlock'], set_info=[[36, 2]], d_model=[WIDTH], nhead=[8],
        dim_feedforward=[256], dropout=0.0, activation='gelu', reduction_type='attention',
        output_shape=[SHAPE[1], SHAPE[0]], conv_out_channel=WIDTH))


def make_voxels(n, batch_size, device, seed=0):
    """(n * batch_size, WIDTH) features and unique [b, z, y, x] int32 coords, shuffled.

    LiDAR-like: columns hit at range r ~ U(2, 100) m over a +-45 degree field of view (denser
    near the sensor), each column a run of 1 + Geometric(0.4) consecutive z bins (surfaces
    span several 4 cm bins) starting 30 + |N(0, 20)| bins up. Real KITTI frames at this grid
    have 13k-19k voxels and 2-4 voxels per occupied column, which this roughly mimics.
    """
    gen = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch_size):
        cols = int(n / 2.2) + 100
        chunks = []
        while sum(c.shape[0] for c in chunks) < n:
            r = torch.rand(cols, generator=gen) * 490 + 10            # voxel units (0.2 m)
            theta = (torch.rand(cols, generator=gen) - 0.5) * (math.pi / 2)
            x = (r * torch.cos(theta)).long()
            y = (SHAPE[1] / 2 + r * torch.sin(theta)).long()
            keep = (x >= 0) & (x < SHAPE[0]) & (y >= 0) & (y < SHAPE[1])
            x, y = x[keep], y[keep]
            u = torch.rand(x.shape, generator=gen).clamp_min(1e-12)
            run = 1 + (torch.log(u) / math.log(0.6)).long()           # 1 + Geometric(0.4)
            z0 = (30 + torch.randn(x.shape, generator=gen).abs() * 20).long()
            k = torch.arange(int(run.max()))
            z = z0[:, None] + k[None]
            ok = (k[None] < run[:, None]) & (z < SHAPE[2])
            cz = z[ok]
            cy = y[:, None].expand_as(z)[ok]
            cx = x[:, None].expand_as(z)[ok]
            chunks.append(torch.stack((torch.full_like(cz, b), cz, cy, cx), 1))
            merged = torch.unique(torch.cat(chunks), dim=0)
            chunks = [merged]
        c = chunks[0]
        coords.append(c[torch.randperm(c.shape[0], generator=gen)[:n]])
    coords = torch.cat(coords)
    coords = coords[torch.randperm(coords.shape[0], generator=gen)].int()
    feats = torch.randn(coords.shape[0], WIDTH, generator=gen)
    return feats.to(device), coords.to(device)


def kitti_voxels(root, batch_size, device):
    """Occupied voxels of the first KITTI velodyne frames at the users' geometry, or None.

    Range [0, -20, -3, 100, 20, 4] m, voxel [0.2, 0.2, 0.04] m (cfgs/focalsst_dsvt.yaml).
    """
    files = sorted(Path(root).glob('training/velodyne/*.bin'))[:batch_size]
    if len(files) < batch_size:
        return None
    import numpy as np
    coords = []
    for b, f in enumerate(files):
        pts = np.fromfile(f, dtype=np.float32).reshape(-1, 4)[:, :3]
        idx = np.floor((pts - np.array([0, -20, -3])) / np.array([0.2, 0.2, 0.04])).astype(int)
        idx = np.unique(idx[((idx >= 0) & (idx < np.array(SHAPE))).all(1)], axis=0)
        coords.append(np.concatenate([np.full((len(idx), 1), b), idx[:, ::-1]], 1))
    coords = torch.from_numpy(np.concatenate(coords)).int()
    feats = torch.randn(coords.shape[0], WIDTH, generator=torch.Generator().manual_seed(0))
    return feats.to(device), coords.to(device)


def batch_of(feats, coords, batch_size):
    return {'voxel_features': feats, 'voxel_coords': coords, 'batch_size': batch_size}


def forward_fn(model, feats, coords):
    def run():
        with torch.no_grad():
            return model(batch_of(feats, coords, 1))['pillar_features']
    return run


def input_layer_fn(model, feats, coords):
    def run():
        with torch.no_grad():
            return model.input_layer(feats, coords.long())
    return run


def train_fn(model, feats, coords, batch_size=1, tail=None):
    """forward + backward of sum(output * fixed weights); grads cleared first."""
    def run():
        for p in model.parameters():
            p.grad = None
        out = model(batch_of(feats, coords, batch_size))
        if tail is not None:
            out = tail(out)
            loss = out['spatial_features'].float().square().mean()
        else:
            loss = out['pillar_features'].square().mean()
        loss.backward()
        return None
    return run


def measure(fn, device, repeats):
    """Fastest of ``repeats`` runs after one warm-up, as ``(seconds, wall seconds)``.

    On the CPU the first value is the process's CPU time: with one intra-op thread it equals
    the wall time of an idle core and, unlike wall time, hardly moves when other jobs share
    the cores (the wall minimum is printed beside it). On CUDA both are wall time.
    """
    fn()
    sync(device)
    cpu_times, wall_times = [], []
    for _ in range(repeats):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        wall_times.append(time.perf_counter() - w0)
        cpu_times.append(time.process_time() - c0)
        del out
    wall = min(wall_times)
    return (min(cpu_times) if torch.device(device).type == 'cpu' else wall), wall


def scaling_section(sizes, device, repeats):
    torch.manual_seed(0)
    model = DSVTDownsample(dsvt_cfg(), input_channels=WIDTH).to(device)
    rows, base = [], None
    for n in sizes:
        feats, coords = make_voxels(n, 1, device)
        model.eval()
        fwd, fwd_wall = measure(forward_fn(model, feats, coords), device, repeats)
        inp, _ = measure(input_layer_fn(model, feats, coords), device, repeats)
        model.train()
        step, _ = measure(train_fn(model, feats, coords), device, repeats)
        peak = peak_memory(train_fn(model, feats, coords), device)
        nlogn = n * math.log(n)
        if base is None:
            base = (n, nlogn, fwd, step, peak)
        rows.append([f'{n:,}', fmt_time(fwd), fmt_time(fwd_wall), fmt_time(inp),
                     f'{100 * inp / fwd:.1f}%', fmt_time(step), fmt_bytes(peak),
                     f'{n / base[0]:.1f}', f'{nlogn / base[1]:.2f}', f'{fwd / base[2]:.2f}',
                     f'{step / base[3]:.2f}', f'{peak / base[4]:.2f}'])
        print(f'  N={n:,}: forward {fmt_time(fwd)} (wall {fmt_time(fwd_wall)}), input layer '
              f'{fmt_time(inp)}, fwd+bwd {fmt_time(step)}, peak {fmt_bytes(peak)}', flush=True)
    print_table(['voxels N', 'forward', 'forward wall', 'input layer', 'input share',
                 'fwd+bwd', 'peak fwd+bwd', 'N ratio', 'N log N ratio', 'forward ratio',
                 'fwd+bwd ratio', 'peak ratio'], rows)


def downsample_section(n, device, repeats):
    feats, coords = make_voxels(n, 1, device)
    rows = []
    for ds in ((1, 1, 1), (1, 1, 4)):
        torch.manual_seed(0)
        model = DSVTDownsample(dsvt_cfg(ds), input_channels=WIDTH).to(device).eval()
        fwd, _ = measure(forward_fn(model, feats, coords), device, repeats)
        with torch.no_grad():
            x0, _ = model.input_layer.downsample_input(feats, coords.long())
            out = model(batch_of(feats, coords, 1))
        model.train()
        step, _ = measure(train_fn(model, feats, coords), device, repeats)
        peak = peak_memory(train_fn(model, feats, coords), device)
        rows.append([str(list(ds)), f'{x0.shape[0]:,}',
                     str(out['encoded_spconv_tensor'].spatial_shape), fmt_time(fwd),
                     fmt_time(step), fmt_bytes(peak)])
    print_table(['input_downsample', 'voxels into stage 0', 'output [D, H, W]', 'forward',
                 'fwd+bwd', 'peak fwd+bwd'], rows)


def chain_section(n, batch_size, device, kitti_root=None):
    try:
        from pcdet_focal.models.map_to_bev import SparseHeightCompression
    except ImportError:
        print('  SparseHeightCompression not available yet: measuring DSVTDownsample alone')
        SparseHeightCompression = None
    torch.manual_seed(0)
    model = DSVTDownsample(dsvt_cfg((1, 1, 4)), input_channels=WIDTH).to(device).train()
    tail = None
    if SparseHeightCompression is not None:
        tail = SparseHeightCompression(EasyDict(NAME='SparseHeightCompression', MODE='learned',
                                                INPUT_FEATURES=WIDTH, NUM_BEV_FEATURES=WIDTH,
                                                Z_STRIDE=4),
                                       grid_size=list(SHAPE)).to(device).train()
    real = kitti_voxels(kitti_root, batch_size, device) if kitti_root else None
    feats, coords = real if real is not None else make_voxels(n, batch_size, device)
    source = 'KITTI frames' if real is not None else 'synthetic'
    step = bench(train_fn(model, feats, coords, batch_size, tail), device, repeats=1, warmup=1)
    limit = 24 * 2**30
    what = 'DSVTDownsample [1,1,4] -> SparseHeightCompression(learned)' if tail else \
        'DSVTDownsample [1,1,4]'
    counts = torch.bincount(coords[:, 0].long().cpu(), minlength=batch_size).tolist()
    print_table(['chain', 'voxels per sample', 'fwd+bwd', 'peak fwd+bwd', 'within 24 GiB'],
                [[what, f'{counts} ({source})', fmt_time(step.time_s),
                  fmt_bytes(step.peak_bytes), 'yes' if step.peak_bytes <= limit else 'NO']])


def keep_freed_memory():
    """glibc: no mmap for big blocks and no trimming, so freed pages are reused (Linux only)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**62))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', nargs='*', type=int, default=[10000, 50000, 100000])
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--device', default='all', choices=['cpu', 'cuda', 'all'])
    ap.add_argument('--chain-voxels', type=int, default=25000, help='voxels per sample')
    ap.add_argument('--chain-batch', type=int, default=1)
    ap.add_argument('--skip-chain', action='store_true')
    ap.add_argument('--kitti', default=str(KITTI_MINI),
                    help='KITTI root for the chain (synthetic voxels when absent; "" = never)')
    ap.add_argument('--no-malloc-tune', action='store_true')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tune else keep_freed_memory()
    devices = ['cpu'] if args.device == 'cpu' else ['cuda'] if args.device == 'cuda' else \
        ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    for dev in devices:
        device = torch.device(dev)
        print(f'\n## {describe_machine(device)}; glibc keeps freed memory: {tuned}')
        print('model: one stage, sparse_shape [500, 200, 175], d_model 128, set_size 36, '
              '2 blocks, nhead 8, dim_feedforward 256, window [12, 12, z], batch 1\n')
        print('### time and memory vs N (input_downsample [1, 1, 1])')
        scaling_section(args.sizes, device, args.repeats)
        mid = args.sizes[len(args.sizes) // 2]
        print(f'\n### input_downsample at N = {mid:,}')
        downsample_section(mid, device, args.repeats)
        if not args.skip_chain:
            print('\n### users\' geometry chain, forward + backward')
            chain_section(args.chain_voxels, args.chain_batch, device, args.kitti)
            if args.kitti:
                print('\n### same chain, synthetic voxels')
                chain_section(args.chain_voxels, args.chain_batch, device)


if __name__ == '__main__':
    main()
