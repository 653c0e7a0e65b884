"""Dense height compression vs SparseHeightCompression (max / mean / learned), side by side.

    python benchmarks/height_compression.py            # users' shape + small shape
    python benchmarks/height_compression.py --quick    # small shape only
    python benchmarks/height_compression.py --backward # forward + backward instead

Users' shape (docs/problem.md): B=1, C=128, D=175, H=200, W=500, 120,000 occupied voxels at
random (unique) positions. The dense volume is 8.96 GB, and spconv's ``.dense()`` holds two of
them at its peak (a zero channels-last volume, then its channel-first copy). Rows run one at a
time, each freed before the next; a dense row is skipped (with a note) when the machine has not
enough free memory for it, and this process volunteers to be the one the kernel's OOM killer
picks (oom_score_adj), so a shared machine's other work is not the victim.

Rows (forward under ``torch.no_grad``; with ``--backward``: forward + backward of the output's
sum, gradients w.r.t. the voxel features and the projection weights):
- sparse max / mean / learned (and learned + BN/ReLU): SparseHeightCompression on an
  ``encoded_spconv_tensor``
- ``spconv .dense() + view``: OpenPCDet's HeightCompression, (B, C*D, H, W)
- ``spconv .dense().max(2)``: the dense max users would write
- ``scatter ...``: the best dense equivalent of each mode: one (B, C*D, H, W) volume written
  channel-first by a single scatter (half spconv's peak), then ``.max(2)``,
  ``.sum(2) / count`` (count = occupied voxels per column), or flatten + 1x1 conv run as the
  matmul ``W (F, C*D) @ volume.view(C*D, H*W)`` (what a 1x1 conv computes; on the CPU F.conv2d
  also copies its input into oneDNN's layout, shown at the small shape)

Columns: median time after warm-up; peak live tensor bytes (pcdet_focal.memory.tracker); speed
and memory ratios of each sparse mode against its dense equivalent and against HeightCompression;
the memory-bandwidth bound = bytes that must be read and written (voxel features + coords +
weights in, BEV map out) / the copy bandwidth measured in the same run; "x bound" = time / bound.
A row that runs out of memory is reported with the size the allocator was asked for.
"""
import argparse
import gc
import sys
from pathlib import Path

import torch

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    available_memory, bench, copy_bandwidth, describe_machine, fmt_bytes, fmt_time, is_oom,
    matmul_throughput, print_table, requested_bytes)
from pcdet_focal.models.map_to_bev import SparseHeightCompression  # noqa: E402
from pcdet_focal.ops.bev_scatter import scatter_height_to_channels  # noqa: E402
from pcdet_focal.ops.sparse import sparse_tensor  # noqa: E402

SHAPES = {
    'users': dict(B=1, C=128, D=175, H=200, W=500, N=120_000, F=128),
    'small': dict(B=2, C=64, D=32, H=100, W=100, N=20_000, F=64),
}


def random_voxels(B, C, D, H, W, N, device, seed=0):
    """N unique random voxels spread over B samples: features (N, C), coords (N, 4) int32."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randperm(B * D * H * W, generator=gen)[:N]
    b, rem = cells // (D * H * W), cells % (D * H * W)
    z, rem = rem // (H * W), rem % (H * W)
    coords = torch.stack([b, z, rem // W, rem % W], 1).to(torch.int32)
    features = torch.randn(N, C, generator=gen)
    return features.to(device), coords.to(device)


def forward_backward(fn, leaves):
    """``fn`` followed by the backward of its output's sum (gradients of ``leaves`` cleared
    first; a (values, indices) result counts by its values)."""
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    return run


def make_cases(s, features, coords, device, small, backward=False):
    """[(name, fn, {column: reference row}, bytes that must move)] for one shape.

    ``backward``: each fn runs forward + backward (:func:`forward_backward`); the bytes stay
    those of the forward."""
    B, C, D, H, W, N, F_out = (s[k] for k in 'BCDHWNF')
    if backward:
        features = features.detach().requires_grad_(True)
    st = sparse_tensor(features, coords, [D, H, W], B)
    batch = {'encoded_spconv_tensor': st, 'encoded_spconv_tensor_stride': 1, 'batch_size': B}
    c = coords.long()
    col = (c[:, 0] * H + c[:, 2]) * W + c[:, 3]
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(F_out, C * D, generator=gen) / (C * D) ** 0.5).to(device)
    leaves = [features, weight.requires_grad_(backward)]
    in_bytes = features.numel() * 4 + coords.numel() * 4
    bev_c = B * C * H * W * 4
    bev_f = B * F_out * H * W * 4
    w_bytes = weight.numel() * 4
    volume = B * C * D * H * W * 4

    def module(mode, norm=False):
        cfg = dict(MODE=mode, NUM_BEV_FEATURES=C if mode != 'learned' else F_out,
                   INPUT_FEATURES=C, NUM_HEIGHT_BINS=D, USE_NORM=norm)
        m = SparseHeightCompression(cfg).to(device).eval()
        if mode == 'learned':
            m.weight.data.copy_(weight.detach().view(F_out, C * D, 1, 1))
        leaves.extend(m.parameters())
        return lambda: m(dict(batch))['spatial_features']

    def scatter():  # best-case dense: one (B, C*D, H, W) volume, written channel-first
        return scatter_height_to_channels(features, coords, B, D, H, W)

    def count():
        return torch.bincount(col, minlength=B * H * W).clamp(min=1).view(B, 1, H, W)

    hc = 'spconv .dense() + view'
    refs = {'max': {'vs dense': 'scatter, max(2)', 'vs HeightCompression': hc},
            'mean': {'vs dense': 'scatter, sum(2)/count', 'vs HeightCompression': hc},
            'learned': {'vs dense': 'scatter, flatten + 1x1 conv', 'vs HeightCompression': hc}}
    cases = [
        ('sparse max', module('max'), refs['max'], in_bytes + bev_c),
        ('sparse mean', module('mean'), refs['mean'], in_bytes + bev_c),
        ('sparse learned', module('learned'), refs['learned'], in_bytes + w_bytes + bev_f),
        ('sparse learned + BN/ReLU', module('learned', True), refs['learned'],
         in_bytes + w_bytes + 2 * bev_f),
        (hc, lambda: st.dense().view(B, C * D, H, W), {}, in_bytes + volume),
        ('spconv .dense().max(2)', lambda: st.dense().max(2), {}, in_bytes + bev_c),
        ('scatter + view', scatter, {}, in_bytes + volume),
        ('scatter, max(2)', lambda: scatter().view(B, C, D, H, W).max(2), {}, in_bytes + bev_c),
        ('scatter, sum(2)/count', lambda: scatter().view(B, C, D, H, W).sum(2) / count(), {},
         in_bytes + bev_c),
        ('scatter, flatten + 1x1 conv',
         lambda: torch.matmul(weight, scatter().view(B, C * D, H * W)).view(B, F_out, H, W),
         {}, in_bytes + w_bytes + bev_f),
    ]
    if small:
        cases.append(('spconv .dense() + F.conv2d 1x1', lambda: torch.nn.functional.conv2d(
            st.dense().view(B, C * D, H, W), weight.view(F_out, C * D, 1, 1)), {},
            in_bytes + w_bytes + bev_f))
    if backward:
        cases = [(case, forward_backward(fn, leaves), refs, nbytes)
                 for case, fn, refs, nbytes in cases]
    return cases


def measure_cases(s, features, coords, device, repeats, match=None, small=False,
                  backward=False, log=print):
    """Bench every case of :func:`make_cases`, one at a time (each freed before the next).

    Returns ``{case: (Result, refs, bytes)}`` for the rows that ran and ``{case: reason}`` for
    those skipped (not enough free memory), out of memory (the reason gives the size asked
    for, :func:`benchmarks.common.requested_bytes`) or failed (``'failed: <error>'``; the other
    rows still run).
    """
    B, C, D, H, W = (s[k] for k in 'BCDHW')
    volume = B * C * D * H * W * 4
    results, skipped = {}, {}
    with torch.set_grad_enabled(backward):
        for case, fn, refs, nbytes in make_cases(s, features, coords, device, small, backward):
            if match and not any(m in case for m in match):
                continue
            sparse = case.startswith('sparse')
            # spconv's .dense() peaks at two volumes, the scatter rows at one (their backward
            # at about twice that); keep half a volume (>= 1 GiB) of headroom for the rest
            copies = (2 if case.startswith('spconv') else 1) * (2 if backward else 1)
            need = 0 if sparse else copies * volume + max(volume // 2, 2**30)
            free = available_memory(device)
            if free is not None and free < need:
                skipped[case] = f'needs ~{fmt_bytes(need)}, {fmt_bytes(free)} available'
                log(f'  skipped {case}: {skipped[case]}', flush=True)
                continue
            reps = repeats if sparse or volume < 2**30 else max(2, repeats // 2)
            try:
                res = bench(fn, device, repeats=reps, warmup=2 if sparse else 1)
            except Exception as err:  # noqa: BLE001 - one row's failure must not end the others
                if is_oom(err):
                    asked = requested_bytes(err)
                    skipped[case] = ('out of memory' + (f' (asked for {fmt_bytes(asked)})'
                                                        if asked else ''))
                else:
                    lines = str(err).strip().splitlines() or ['']
                    skipped[case] = f'failed: {type(err).__name__}: {lines[0]}'
                log(f'  {case}: {skipped[case]}', flush=True)
                del err
                gc.collect()
                if torch.device(device).type == 'cuda':
                    torch.cuda.empty_cache()
                continue
            results[case] = (res, refs, nbytes)
            log(f'  {case}: {fmt_time(res.time_s)}, peak {fmt_bytes(res.peak_bytes)} '
                f'({reps} timed runs)', flush=True)
            del fn
            gc.collect()
    return results, skipped


def summary_rows(results, bandwidth):
    """One dict per measured case: time, peak, bytes moved, bandwidth bound (bytes /
    ``bandwidth``; None without a bandwidth) and its multiple, and the (time, memory) ratios of
    each reference row over this one (``vs dense`` / ``vs HeightCompression``, None when not
    measured)."""
    rows = []
    for case, (res, refs, nbytes) in results.items():
        bound = nbytes / bandwidth if bandwidth else None
        row = {'case': case, 'time_s': res.time_s, 'peak_bytes': res.peak_bytes,
               'max_allocated_bytes': res.max_allocated, 'max_reserved_bytes': res.max_reserved,
               'bytes': nbytes, 'bound_s': bound, 'x_bound': res.time_s / bound if bound else None}
        for column in ('vs dense', 'vs HeightCompression'):
            ref = results.get(refs.get(column))
            row[column] = None if ref is None else {
                'reference': refs[column], 'speed': ref[0].time_s / res.time_s,
                'memory': ref[0].peak_bytes / max(res.peak_bytes, 1)}
        rows.append(row)
    return rows


def check_exact(s, features, coords):
    """SparseHeightCompression against OpenPCDet's dense volume (spconv ``.dense()``).

    max / mean are compared bit for bit with the same reduction done densely, height level by
    height level (z ascending, the order SparseHeightCompression sums in; an empty voxel adds
    0.0 to the sum and never wins the max); learned: the largest error of the dense flatten +
    1x1 conv (as a matmul), relative to that output's largest magnitude.
    Returns ``{'max': bool, 'mean': bool, 'learned_rel_err': float}``.
    """
    B, C, D, H, W, F_out = (s[k] for k in 'BCDHWF')
    with torch.no_grad():
        st = sparse_tensor(features, coords, [D, H, W], B)
        batch = {'encoded_spconv_tensor': st, 'encoded_spconv_tensor_stride': 1, 'batch_size': B}
        out = {}
        for mode in ('max', 'mean', 'learned'):
            cfg = dict(MODE=mode, NUM_BEV_FEATURES=C if mode != 'learned' else F_out,
                       INPUT_FEATURES=C, NUM_HEIGHT_BINS=D, USE_NORM=False)
            m = SparseHeightCompression(cfg).to(features.device).eval()
            out[mode] = (m(dict(batch))['spatial_features'], m)
        vol = st.dense()                                        # (B, C, D, H, W)
        occ = torch.zeros(B, D, H, W, dtype=torch.bool, device=features.device)
        c = coords.long()
        occ[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = True
        neg_inf = torch.tensor(float('-inf'), device=features.device)
        top = torch.full((B, C, H, W), float('-inf'), device=features.device)
        total = torch.zeros(B, C, H, W, device=features.device)
        for z in range(D):
            level = vol[:, :, z]
            top = torch.maximum(top, torch.where(occ[:, None, z], level, neg_inf))
            total = total + level
        count = occ.sum(1, keepdim=True)
        ref_max = torch.where(count > 0, top, torch.zeros_like(top))
        ref_mean = total / count.clamp(min=1).to(total.dtype)
        del top, total
        weight = out['learned'][1].weight.view(F_out, C * D)
        ref_learned = torch.stack([weight @ vol[b].view(C * D, H * W) for b in range(B)])
        learned = out['learned'][0].view(B, F_out, H * W)
        rel = ((learned - ref_learned).abs().max() /
               ref_learned.abs().max().clamp(min=1e-12)).item()
    return {'max': torch.equal(out['max'][0], ref_max),
            'mean': torch.equal(out['mean'][0], ref_mean), 'learned_rel_err': rel}


def run_shape(name, s, device, bandwidth, repeats, match=None, backward=False):
    B, C, D, H, W, N = (s[k] for k in 'BCDHWN')
    volume = B * C * D * H * W * 4
    print(f'\n## {name}: B={B} C={C} D={D} H={H} W={W}, {N:,} occupied voxels '
          f'({N / (B * D * H * W):.3%}); dense volume {fmt_bytes(volume)}'
          f'{"; forward + backward" if backward else ""}', flush=True)
    features, coords = random_voxels(B, C, D, H, W, N, device)
    results, _ = measure_cases(s, features, coords, device, repeats, match, name == 'small',
                               backward)
    rows = []
    for r in summary_rows(results, bandwidth):
        ratios = ['-' if r[col] is None else
                  f'{r[col]["speed"]:.0f}x / {r[col]["memory"]:.0f}x'
                  for col in ('vs dense', 'vs HeightCompression')]
        rows.append([r['case'], fmt_time(r['time_s']), fmt_bytes(r['peak_bytes']), *ratios,
                     fmt_bytes(r['bytes']), fmt_time(r['bound_s']), f'{r["x_bound"]:.1f}x'])
    print()
    print_table(['path', 'time (median)', 'peak memory',
                 'faster / less memory than dense equivalent',
                 'faster / less memory than HeightCompression', 'bytes r+w',
                 'bandwidth bound (forward)', 'x bound'], rows)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='small shape only')
    parser.add_argument('--shape', choices=['users', 'small', 'all'], default='all')
    parser.add_argument('--device', choices=['cpu', 'cuda', 'all'], default='all',
                        help='all = cpu, plus cuda when a GPU is present (default)')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per case')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    parser.add_argument('--match', nargs='+', default=None, metavar='TEXT',
                        help='run only the rows whose name contains one of these')
    parser.add_argument('--backward', action='store_true',
                        help='time forward + backward (of the output sum) instead of forward')
    args = parser.parse_args(argv)
    try:  # if memory runs out, the kernel should kill this benchmark, not a neighbour's job
        with open('/proc/self/oom_score_adj', 'w', encoding='ascii') as fh:
            fh.write('1000')
    except OSError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ['cpu', 'cuda'] if args.device == 'all' else [args.device]
    devices = [d for d in devices if d == 'cpu' or torch.cuda.is_available()]
    if not devices:
        print('error: --device cuda but no CUDA device is available', file=sys.stderr)
        return 2
    shapes = ['users', 'small'] if args.shape == 'all' else [args.shape]
    if args.quick:
        shapes = ['small']
    for device in devices:
        print(f'# device {describe_machine(device)}', flush=True)
        bw = copy_bandwidth(device)
        bw_fresh = copy_bandwidth(device, fresh=True)
        flops = matmul_throughput(device)
        print(f'measured copy bandwidth {bw / 1e9:.1f} GB/s (read + write; into a new tensor, '
              f'page faults included: {bw_fresh / 1e9:.1f} GB/s), float32 matmul '
              f'{flops / 1e9:.0f} GFLOP/s', flush=True)
        for name in shapes:
            s = SHAPES[name]
            learned = run_shape(name, s, device, bw, args.repeats, args.match,
                                args.backward).get('sparse learned')
            if learned is not None:
                gflop = 2 * s['N'] * s['C'] * s['F'] / 1e9
                print(f'\nsparse learned does {gflop:.1f} GFLOP: {fmt_time(gflop * 1e9 / flops)} '
                      f'at the measured matmul rate, measured {fmt_time(learned[0].time_s)}',
                      flush=True)
        print(f'# end: {describe_machine(device)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
