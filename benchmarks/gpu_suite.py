#!/usr/bin/env python
"""GPU verification in one command: every GPU figure the README needs, in one report.

    python benchmarks/gpu_suite.py --out DIR             # one CUDA GPU, at most ~8 minutes
    python benchmarks/gpu_suite.py --dry-run --out DIR   # the same steps on the CPU, tiny sizes
    python benchmarks/gpu_suite.py --out DIR --steps 7 8 # rerun some steps

Writes ``DIR/report.json`` (every figure, each step's status, time, one-line error and
traceback) and ``DIR/report.md`` (the same as tables), rewritten after every step so a run
cut short still leaves a report. Steps (each isolated: one that fails is recorded with its
one-line error and the suite goes on; a part that cannot run here, such as AMP on the CPU,
OpenPCDet without PCDET_ROOT or a dense row without the memory, is recorded with the reason):

1. environment: the doctor's findings (pcdet_focal.doctor; smoke tests on every device except
   in the dry run), GPU name / memory / driver, torch / CUDA / cuDNN / spconv versions;
2. CUDA tests: ``pytest tests -m cuda`` (tests/conftest.py marks every test that skips
   without a GPU), passed / failed / skipped counts from its JUnit XML;
3. SparseHeightCompression at the users' shape (B=1, C=128, D=175, H=200, W=500, 120k voxels)
   against OpenPCDet's ``.dense()`` + view and the cheapest dense equivalent of each mode,
   forward and forward + backward (benchmarks/height_compression.py), the copy bandwidth
   measured in the same run and the bandwidth bound, bit-exactness of max / mean;
4. DSVT (benchmarks/dsvt.py model) at 10k / 50k / 100k voxels: forward, input layer and its
   share, forward + backward; OpenPCDet's DSVT with the same weights when ``PCDET_ROOT``
   points to a checkout whose CUDA ops are built;
5. FocalSST encoder (benchmarks/focal_sst.py) and full training steps of
   cfgs/focalsst_dsvt.yaml at batch 1 and 2, fp32 and AMP: step time, allocated and reserved
   peaks;
6. estimator truth: ``tools/estimate_mem.py --measure --json`` for every config in cfgs/ at
   batch 1 and 2 (1,500 voxels per sample, as benchmarks/estimator.py on the CPU), beside the
   reserved peak; configs above 24 GiB are also measured with the BEV cropped as there; an
   error outside benchmarks/estimator.py's limits fails the step (not in the dry run, whose
   tiny cropped sizes the limits do not cover);
7. the cliff: one forward + backward of Conv2d(22400 -> 128, 3x3) on OpenPCDet's dense
   HeightCompression output [1, 22400, 200, 500] (8.96 GB), against the estimator's figure
   for cfgs/focalsst_dsvt_dense_hc.yaml; an out-of-memory error is caught and the size
   PyTorch asked for recorded;
8. the demo config end to end (``tools/train.py --cfg cfgs/focalsst_dsvt_demo.yaml``): wall
   time, epochs, AP table.

Times on CUDA: CUDA events after warm-up, median (benchmarks/common.py). Memory on CUDA:
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (peak counters reset, cache
emptied first); on the CPU the allocator tracker (pcdet_focal.memory.tracker).

``--dry-run`` hides any GPU and runs every step on the CPU at tiny sizes (step 5 on the demo
config; the demo: one epoch of 4 frames, 2 val frames) so CI keeps the suite working
(tests/test_gpu_suite.py); its figures test the suite, not a GPU. Exit code: 0 when no step
failed, 1 when one did or the arguments are bad (one line), 130 when interrupted.
"""
import argparse
import dataclasses
import gc
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import dsvt as dsvt_bench  # noqa: E402
from benchmarks import estimator as est_bench  # noqa: E402
from benchmarks import focal_sst as focal_bench  # noqa: E402
from benchmarks import height_compression as hc_bench  # noqa: E402
from benchmarks.common import (bench, copy_bandwidth, crop_bev, describe_machine,  # noqa: E402
                               fmt_bytes, fmt_time, is_oom, print_table, requested_bytes,
                               timed)
from pcdet_focal.config import cfg_get, dump_config, load_config  # noqa: E402
from pcdet_focal.errors import ConfigError, cli_main  # noqa: E402
from pcdet_focal.memory.tracker import PeakMemory  # noqa: E402

GIB = 2 ** 30
DENSE_HC_CFG = 'cfgs/focalsst_dsvt_dense_hc.yaml'   # the users' failing config (step 7)
DEMO_CFG = 'cfgs/focalsst_dsvt_demo.yaml'
CROP_ABOVE = 24 * GIB   # step 6: configs whose estimate exceeds a 24 GiB card (and the CPU
#                         benchmark's RAM) are also measured BEV-cropped, as benchmarks/estimator.py


@dataclasses.dataclass
class Plan:
    """Sizes of one suite run (:data:`FULL` on a GPU, :data:`DRY` on the CPU)."""
    dry: bool
    device: str
    budget_s: float              # the whole suite; subprocess steps get what is left
    shc_shape: dict              # B, C, D, H, W, N voxels, F learned output channels
    shc_repeats: int
    warmup: int                  # untimed runs before the timed ones (the first is the
    #                              memory-tracked run, benchmarks.common.bench)
    bandwidth_bytes: int         # size of the copy that measures the bandwidth
    dsvt_sizes: list
    dsvt_repeats: int
    focal_voxels: int
    train_cfg: str
    train_batches: tuple
    train_repeats: int
    est_voxels: int
    est_batches: tuple
    est_crop: tuple              # None: full size (+ cropped above CROP_ABOVE); else all
    cliff: dict                  # C, D, H, W, N voxels, F conv output channels
    demo_args: list
    pytest_timeout: int


FULL = Plan(dry=False, device='cuda', budget_s=480, shc_shape=hc_bench.SHAPES['users'],
            shc_repeats=10, warmup=2, bandwidth_bytes=2 * GIB,
            dsvt_sizes=[10_000, 50_000, 100_000], dsvt_repeats=10, focal_voxels=25_000,
            train_cfg='cfgs/focalsst_dsvt.yaml',
            train_batches=(1, 2), train_repeats=5, est_voxels=1500, est_batches=(1, 2),
            est_crop=None, cliff=dict(hc_bench.SHAPES['users']),
            demo_args=['--workers', str(min(8, os.cpu_count() or 2))], pytest_timeout=240)
DRY = Plan(dry=True, device='cpu', budget_s=600,
           shc_shape=dict(B=1, C=16, D=8, H=20, W=30, N=600, F=16), shc_repeats=1,
           warmup=1, bandwidth_bytes=64 * 2**20, dsvt_sizes=[200, 400, 800], dsvt_repeats=1,
           focal_voxels=1000, train_cfg=DEMO_CFG, train_batches=(1, 2), train_repeats=1,
           est_voxels=100, est_batches=(1, 2), est_crop=(12, 12),
           cliff=dict(B=1, C=8, D=4, H=12, W=16, N=100, F=8),
           demo_args=['--device', 'cpu', '--workers', '0', '--epochs', '1', '--batch_size', '2',
                      '--set', 'DATA_CONFIG.NUM_FRAMES.train', '4',
                      'DATA_CONFIG.NUM_FRAMES.test', '2'],
           pytest_timeout=300)


class Failed(Exception):
    """The step ran but a check failed; the message says which (its figures are kept)."""


@dataclasses.dataclass
class Context:
    plan: Plan
    device: torch.device
    out: Path
    start: float

    def remaining(self, reserve=10):
        """Seconds left of the suite's budget (at least 30)."""
        return max(30.0, self.plan.budget_s - (time.perf_counter() - self.start) - reserve)


def one_line(err):
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(err).strip().splitlines()
    line = f'{type(err).__name__}: {text[0] if text else ""}'.strip()
    return line if len(line) <= 300 else line[:297] + '...'


def log(*args, **kwargs):
    print(*args, **{'flush': True, **kwargs})


def free_device(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def result_figures(res):
    """A benchmarks.common.Result as report fields."""
    return {'time_s': res.time_s, 'times_s': list(res.times), 'peak_above_start_bytes':
            res.peak_bytes, 'max_allocated_bytes': res.max_allocated,
            'max_reserved_bytes': res.max_reserved}


# --------------------------------------------------------------------------- 1 environment

def nvidia_smi():
    """Driver version and name of each GPU as nvidia-smi reports them, or None."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def step_environment(ctx, data):
    from pcdet_focal import doctor
    argv = ['--skip-smoke'] if ctx.plan.dry else ['--timeout', '120']
    findings = doctor.run_checks(doctor.add_arguments(argparse.ArgumentParser())
                                 .parse_args(argv))
    code = doctor.exit_code(findings)
    data['doctor'] = {'exit_code': code, 'smoke_tests': not ctx.plan.dry,
                      'findings': [dataclasses.asdict(f) for f in findings]}
    info = doctor.collect_versions()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    data['versions'] = {
        'python': platform.python_version(), 'torch': torch.__version__,
        'torch_cuda': torch.version.cuda, 'cudnn': cudnn,
        'spconv': [' '.join(d) for d in info.get('spconv') or []],
        'cumm': [' '.join(d) for d in info.get('cumm') or []],
        'numpy': info.get('numpy'), 'numba': info.get('numba')}
    data['machine'] = describe_machine(ctx.device)
    data['cpu'] = describe_machine('cpu')
    if ctx.device.type == 'cuda':
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        data['gpu'] = {'name': props.name, 'total_memory_bytes': total, 'free_bytes': free,
                       'capability': f'{props.major}.{props.minor}',
                       'multiprocessors': props.multi_processor_count,
                       'nvidia_smi': nvidia_smi(),
                       'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
                       'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32}
    else:
        data['gpu'] = None
    if code >= doctor.LEVELS['ERROR']:
        raise Failed('the doctor found blocking problems: ' + '; '.join(
            f'{f["topic"]}: {f["message"]}' for f in data['doctor']['findings']
            if f['level'] == 'ERROR'))


# --------------------------------------------------------------------------- 2 CUDA tests

def junit_counts(path):
    """passed / failed / errors / skipped counts and the failing tests of a JUnit XML file."""
    counts = {'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0}
    failures, skip_reasons = [], {}
    for case in ET.parse(path).getroot().iter('testcase'):
        name = f'{case.get("classname")}::{case.get("name")}'
        outcome = 'passed'
        for child in case:
            if child.tag in ('failure', 'error', 'skipped'):
                outcome = {'failure': 'failed', 'error': 'errors'}.get(child.tag, 'skipped')
                message = (child.get('message') or child.text or '').strip().splitlines()
                message = message[0] if message else ''
                if outcome == 'skipped':
                    skip_reasons[message] = skip_reasons.get(message, 0) + 1
                else:
                    failures.append({'test': name, 'outcome': outcome, 'message': message})
                break
        counts[outcome] += 1
    return {**counts, 'total': sum(counts.values()), 'failures': failures,
            'skip_reasons': skip_reasons}


def step_cuda_tests(ctx, data):
    xml = ctx.out / 'cuda_tests.xml'
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, '-m', 'pytest', 'tests', '-m', 'cuda', '-q', '-rs',
           '-p', 'no:cacheprovider', f'--junitxml={xml}']
    data['command'] = ' '.join(cmd[2:])
    timeout = min(ctx.plan.pytest_timeout, ctx.remaining())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise Failed(f'pytest -m cuda did not finish in {timeout:.0f} s') from err
    (ctx.out / 'cuda_tests.log').write_text(proc.stdout + proc.stderr, encoding='utf-8')
    data['exit_code'] = proc.returncode
    data['log'] = 'cuda_tests.log'
    if proc.returncode == 5:
        raise Failed('pytest selected no test with the cuda marker (tests/conftest.py)')
    if not xml.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        raise Failed(f'pytest wrote no report (exit {proc.returncode}): '
                     f'{tail[-1] if tail else "no output"}')
    data.update(junit_counts(xml))
    if data['failed'] or data['errors']:
        raise Failed(f'{data["failed"]} failed, {data["errors"]} errors: ' +
                     ', '.join(f['test'] for f in data['failures'][:5]))
    if proc.returncode != 0:
        raise Failed(f'pytest exited {proc.returncode}')


# --------------------------------------------------------------------------- 3 SHC

def step_height_compression(ctx, data):
    s = ctx.plan.shc_shape
    B, C, D, H, W, N = (s[k] for k in 'BCDHWN')
    data['shape'] = dict(s)
    data['dense_volume_bytes'] = B * C * D * H * W * 4
    bw = copy_bandwidth(ctx.device, nbytes=ctx.plan.bandwidth_bytes)
    data['copy_bandwidth_bytes_per_s'] = bw
    data['bandwidth_copy_bytes'] = ctx.plan.bandwidth_bytes
    features, coords = hc_bench.random_voxels(B, C, D, H, W, N, ctx.device)
    for key, backward in (('forward', False), ('forward_backward', True)):
        log(f'  SparseHeightCompression, {key.replace("_", " + ")}:')
        results, skipped = hc_bench.measure_cases(s, features, coords, ctx.device,
                                                  ctx.plan.shc_repeats, backward=backward,
                                                  log=log)
        data[key] = hc_bench.summary_rows(results, bw if not backward else None)
        data[f'{key}_not_measured'] = skipped
        free_device(ctx.device)
    broken = [f'{key} {case}: {why}' for key in ('forward', 'forward_backward')
              for case, why in data[f'{key}_not_measured'].items() if why.startswith('failed')]
    try:
        data['exact'] = hc_bench.check_exact(s, features, coords)
    except Exception as err:  # noqa: BLE001 - only an allocation failure is a result
        if not is_oom(err):
            raise
        data['exact'] = {'not_checked': f'out of memory for the dense reference: '
                                        f'{one_line(err)}'}
    bad = [m for m in ('max', 'mean') if data['exact'].get(m) is False]
    if bad:
        broken.append(f'SparseHeightCompression {" and ".join(bad)} differ from the dense '
                      f'reference on {ctx.device.type}')
    if broken:
        raise Failed('; '.join(broken))


# --------------------------------------------------------------------------- 4 DSVT

def _by_coords(feats, coords, shape_xyz):
    """Rows sorted by voxel [b, z, y, x] (the two DSVTs may order their outputs differently)."""
    x, y, z = shape_xyz
    c = coords.long()
    order = torch.argsort(((c[:, 0] * z + c[:, 1]) * y + c[:, 2]) * x + c[:, 3])
    return feats[order], c[order]


def openpcdet_dsvt(ctx, sizes):
    """OpenPCDet's DSVT with our weights: forward time ratio and max |difference| per size."""
    root = os.environ.get('PCDET_ROOT')
    if not root:
        return {'skipped': 'PCDET_ROOT is not set'}
    if ctx.device.type != 'cuda':
        return {'skipped': "needs CUDA: OpenPCDet's DSVT partitions with its CUDA op "
                           'ingroup_inds'}
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from pcdet.models.backbones_3d.dsvt import DSVT
    except Exception as err:  # noqa: BLE001 - any import failure means: not usable here
        return {'skipped': f'OpenPCDet at {root} does not import with built ops: '
                           f'{one_line(err)}'}
    from pcdet_focal.models.dsvt import DSVTDownsample
    cfg = dsvt_bench.dsvt_cfg()
    torch.manual_seed(0)
    theirs = DSVT(cfg).to(ctx.device).eval()
    ours = DSVTDownsample(cfg, input_channels=dsvt_bench.WIDTH).to(ctx.device).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    rows = []
    for n in sizes:
        feats, coords = dsvt_bench.make_voxels(n, 1, ctx.device)
        t_ours = bench(dsvt_bench.forward_fn(ours, feats, coords), ctx.device,
                       ctx.plan.dsvt_repeats, ctx.plan.warmup)
        t_theirs = bench(dsvt_bench.forward_fn(theirs, feats, coords), ctx.device,
                         ctx.plan.dsvt_repeats, ctx.plan.warmup)
        with torch.no_grad():
            out_o = ours(dsvt_bench.batch_of(feats, coords, 1))
            out_t = theirs(dsvt_bench.batch_of(feats, coords, 1))
        po, co = _by_coords(out_o['pillar_features'], out_o['voxel_coords'], dsvt_bench.SHAPE)
        pt, ct = _by_coords(out_t['pillar_features'], out_t['voxel_coords'], dsvt_bench.SHAPE)
        same = bool(torch.equal(co, ct))
        rows.append({'voxels': n, 'ours_forward_s': t_ours.time_s,
                     'openpcdet_forward_s': t_theirs.time_s,
                     'openpcdet_over_ours': t_theirs.time_s / t_ours.time_s,
                     'same_coords': same,
                     'max_abs_diff': (po - pt).abs().max().item() if same else None})
    return {'root': root, 'rows': rows}


def step_dsvt(ctx, data):
    from pcdet_focal.models.dsvt import DSVTDownsample
    cfg = dsvt_bench.dsvt_cfg()
    data['model'] = {'sparse_shape': cfg.INPUT_LAYER.sparse_shape, 'd_model': cfg.d_model,
                     'set_info': cfg.set_info, 'nhead': cfg.nhead,
                     'window_shape': cfg.INPUT_LAYER.window_shape, 'batch_size': 1}
    torch.manual_seed(0)
    model = DSVTDownsample(cfg, input_channels=dsvt_bench.WIDTH).to(ctx.device)
    rows = data['rows'] = []
    for n in ctx.plan.dsvt_sizes:
        feats, coords = dsvt_bench.make_voxels(n, 1, ctx.device)
        model.eval()
        fwd = bench(dsvt_bench.forward_fn(model, feats, coords), ctx.device,
                    ctx.plan.dsvt_repeats, ctx.plan.warmup)
        inp = bench(dsvt_bench.input_layer_fn(model, feats, coords), ctx.device,
                    ctx.plan.dsvt_repeats, ctx.plan.warmup)
        model.train()
        step = bench(dsvt_bench.train_fn(model, feats, coords), ctx.device,
                     ctx.plan.dsvt_repeats, ctx.plan.warmup)
        rows.append({'voxels': int(coords.shape[0]), 'forward': result_figures(fwd),
                     'input_layer': result_figures(inp),
                     'input_share': inp.time_s / fwd.time_s,
                     'forward_backward': result_figures(step)})
        log(f'  DSVT N={n:,}: forward {fmt_time(fwd.time_s)}, input layer '
            f'{fmt_time(inp.time_s)}, fwd+bwd {fmt_time(step.time_s)}')
        del feats, coords
        free_device(ctx.device)
    del model
    free_device(ctx.device)
    data['openpcdet'] = openpcdet_dsvt(ctx, ctx.plan.dsvt_sizes)


# --------------------------------------------------------------------------- 5 training

def training_step_figures(ctx, cfg, dataset, samples, amp):
    """Build the model and optimizer, run two warm-up steps, then time ``train_repeats``
    steps (engine.trainer's step: autocast forward, scaled backward, unscale, gradient
    clipping, optimizer step, zero_grad) on one collated batch of ``samples``."""
    from pcdet_focal.backend import build_network
    from pcdet_focal.engine.optim import build_optimizer, optimizer_step
    from pcdet_focal.engine.utils import load_data_to_device
    device = ctx.device
    batch = load_data_to_device(dataset.collate_batch(samples), device)
    torch.manual_seed(0)
    model = build_network(cfg.MODEL, len(cfg.CLASS_NAMES), dataset, 'standalone').to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.OPTIMIZATION)
    scaler = torch.amp.GradScaler('cuda', enabled=amp)
    clip = float(cfg_get(cfg, 'OPTIMIZATION.GRAD_NORM_CLIP', 10))

    def step():
        with torch.autocast('cuda', dtype=torch.float16) if amp else nullcontext():
            ret, _, _ = model(dict(batch))
            loss = ret['loss'].mean()
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, clip)

    step()
    step()   # the optimizer state exists from here on: the steady state
    res = bench(step, device, repeats=ctx.plan.train_repeats, warmup=1)
    voxels = torch.bincount(batch['voxel_coords'][:, 0].long().cpu(),
                            minlength=len(samples)).tolist()
    params = sum(p.numel() for p in model.parameters())
    return {'batch_size': len(samples), 'amp': amp, 'voxels_per_sample': voxels,
            'parameters': params, **result_figures(res)}


def step_training(ctx, data):
    from pcdet_focal.backend import build_dataset
    device = ctx.device
    coords, feats, boxes = focal_bench.lidar_like_voxels(ctx.plan.focal_voxels)
    torch.manual_seed(0)
    enc = focal_bench.build_encoder(device)
    train, infer = focal_bench.encoder_fns(enc, coords.to(device), feats.to(device),
                                           boxes.to(device))
    res_train = bench(train, device, ctx.plan.train_repeats, ctx.plan.warmup)
    res_eval = bench(infer, device, ctx.plan.train_repeats, ctx.plan.warmup)
    data['encoder'] = {'grid_xyz': focal_bench.GRID.tolist(), 'voxels': int(coords.shape[0]),
                       'num_filters': [32, 64, 128], 'train': result_figures(res_train),
                       'eval': result_figures(res_eval),
                       'last_stats': {k: int(v) for k, v in enc.last_stats.items()
                                      if isinstance(v, int)}}
    del enc, train, infer
    free_device(device)

    cfg = load_config(ROOT / ctx.plan.train_cfg)
    data['config'] = ctx.plan.train_cfg
    dataset = build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, True, 'standalone')
    samples = [dataset[i] for i in range(max(ctx.plan.train_batches))]
    runs = [(b, False) for b in ctx.plan.train_batches]
    if device.type == 'cuda':
        runs += [(b, True) for b in ctx.plan.train_batches]
    else:
        data['amp_not_measured'] = 'AMP (fp16 autocast) runs on CUDA only'
    steps = data['steps'] = []
    for b, amp in runs:
        steps.append(training_step_figures(ctx, cfg, dataset, samples[:b], amp))
        log(f'  training step batch {b}{" AMP" if amp else ""}: '
            f'{fmt_time(steps[-1]["time_s"])}, allocated peak '
            f'{fmt_bytes(steps[-1]["max_allocated_bytes"])}')
        free_device(device)


# --------------------------------------------------------------------------- 6 estimator

_TOOLS = {}


def run_tool(name, argv):
    """``tools/<name>``'s ``main(argv)`` in this process (its CLI, without a new interpreter:
    spconv's import alone takes seconds): ``(exit code, stdout, stderr)``."""
    if name not in _TOOLS:
        import importlib.util
        tools = str(ROOT / 'tools')
        if tools not in sys.path:
            sys.path.insert(0, tools)   # for the tool's own `import _init_path`
        spec = importlib.util.spec_from_file_location(f'_suite_tool_{Path(name).stem}',
                                                      ROOT / 'tools' / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[name] = module
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = _TOOLS[name].main(argv)
        except SystemExit as stop:
            code = stop.code
    code = 0 if code is None else code if isinstance(code, int) else 1
    return code, out.getvalue(), err.getvalue()


def estimator_row(ctx, name, path, batch, bev):
    """One ``estimate_mem.py --measure --json`` run as a report row."""
    argv = ['--cfg', str(path), '--batch_size', str(batch), '--voxels',
            str(ctx.plan.est_voxels), '--measure', '--json']
    free_device(ctx.device)
    row = {'config': name, 'cfg_file': str(path), 'bev': bev, 'batch_size': batch,
           'voxels_per_sample': ctx.plan.est_voxels,
           'command': 'python tools/estimate_mem.py ' + ' '.join(argv)}
    t0 = time.perf_counter()
    try:
        code, out, err = run_tool('estimate_mem.py', argv)
    except Exception as exc:  # noqa: BLE001 - e.g. the measured step ran out of memory
        row['seconds'] = time.perf_counter() - t0
        if not is_oom(exc):
            row['error'] = one_line(exc)
            return row
        # the estimate let the step start (it fitted the free memory) but the step did not
        row['oom'] = {'requested_bytes': requested_bytes(exc), 'message': one_line(exc)}
        row['refused'] = 'out of memory during the measured steps'
        del exc
        free_device(ctx.device)
        return row
    row.update(exit_code=code, seconds=time.perf_counter() - t0)
    if code not in (0, 2):
        lines = (err or out).strip().splitlines()
        row['error'] = lines[-1] if lines else f'exit code {code}'
        return row
    doc = json.loads(out)
    measure = doc.get('measure') or {}
    row.update({
        'estimate_bytes': cfg_get(doc, 'estimate.peak_bytes'),
        'largest_transient': cfg_get(doc, 'estimate.largest_transient'),
        'measure_device': measure.get('device'), 'refused': measure.get('refused'),
        'measured_bytes': measure.get('measured_bytes'),
        'estimate_at_measured_counts_bytes': measure.get('estimate_at_measured_counts_bytes'),
        'measure': measure})
    if ctx.device.type == 'cuda' and row['measured_bytes'] is not None:
        # measure_config reset CUDA's peak counters before its steps: this is their maximum
        row['reserved_bytes'] = torch.cuda.max_memory_reserved(ctx.device)
    if row['measured_bytes'] and row['estimate_at_measured_counts_bytes'] is not None:
        row['error'] = None
        row['relative_error'] = (row['estimate_at_measured_counts_bytes'] -
                                 row['measured_bytes']) / row['measured_bytes']
        row['within_limits'] = (est_bench.LIMIT_UNDER <= row['relative_error']
                                <= est_bench.LIMIT_OVER)
    return row


def step_estimator(ctx, data):
    cfg_dir = ctx.out / 'configs'
    cfg_dir.mkdir(parents=True, exist_ok=True)
    data['voxels_per_sample'] = ctx.plan.est_voxels
    data['limits'] = [est_bench.LIMIT_UNDER, est_bench.LIMIT_OVER]
    rows = data['rows'] = []

    def add(name, path, batch, bev):
        rows.append(estimator_row(ctx, name, path, batch, bev))
        log(f'  {name} batch {batch}, BEV {bev}: ' + (
            rows[-1].get('error') or rows[-1].get('refused') or
            f'measured {fmt_bytes(rows[-1].get("measured_bytes"))}'))
        return rows[-1]

    for path in est_bench.configs(None):
        name = str(path.relative_to(ROOT / 'cfgs'))
        nx, ny = ctx.plan.est_crop or est_bench.CROP
        cropped = cfg_dir / f'{path.parent.name}_{path.stem}_bev{nx}x{ny}.yaml'
        dump_config(crop_bev(load_config(path), nx, ny), cropped)
        for batch in ctx.plan.est_batches:
            if not ctx.plan.est_crop:
                full = add(name, path, batch, 'full')
                if not (full.get('refused') or (full.get('estimate_bytes') or 0) > CROP_ABOVE):
                    continue
            add(name, cropped, batch, f'{nx}x{ny}')
    errors = [f'{r["config"]} b{r["batch_size"]} {r["bev"]}: {r["error"]}' for r in rows
              if r.get('error')]
    outside = [f'{r["config"]} b{r["batch_size"]} {r["bev"]} {r["relative_error"]:+.1%}'
               for r in rows if r.get('within_limits') is False]
    if errors:
        raise Failed(f'{len(errors)} of {len(rows)} runs failed; first: {errors[0]}')
    if outside and not ctx.plan.dry:   # tiny cropped sizes are not what the limits promise
        raise Failed(f'error outside [{est_bench.LIMIT_UNDER:+.0%}, {est_bench.LIMIT_OVER:+.0%}]: '
                     + ', '.join(outside))


# --------------------------------------------------------------------------- 7 the cliff

def conv_ops(conv, x, device):
    """Names of the convolution ops / kernels one forward of ``conv(x)`` runs (profiler)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        conv(x)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    names = {evt.key for evt in prof.key_averages()}
    return sorted(n for n in names if re.search(r'conv|im2col|cudnn|gemm', n, re.IGNORECASE))


def device_maxima(device):
    if device.type != 'cuda':
        return {}
    return {'max_allocated_bytes': torch.cuda.max_memory_allocated(device),
            'max_reserved_bytes': torch.cuda.max_memory_reserved(device)}


def step_cliff(ctx, data):
    from pcdet_focal.memory import estimate, prepare
    from pcdet_focal.memory.cuda import USERS_STACK, Stack
    from pcdet_focal.ops.sparse import sparse_tensor
    device = ctx.device
    s = ctx.plan.cliff
    B, C, D, H, W, N, F = (s[k] for k in 'BCDHWNF')
    cin = C * D
    data['conv'] = f'Conv2d({cin} -> {F}, 3x3, padding 1, no bias)'
    data['input_shape'] = [B, cin, H, W]
    data['input_bytes'] = B * cin * H * W * 4
    data['input_elements_per_sample'] = cin * H * W
    data['over_int32'] = cin * H * W > 2 ** 31 - 1
    data['columns_bytes'] = cin * 9 * H * W * 4      # what an im2col of one sample holds
    users = hc_bench.SHAPES['users']
    data['users_report_bytes'] = users['C'] * users['D'] * 9 * users['H'] * users['W'] * 4
    # the installed stack (what this GPU runs, compared below) and the users' (their 75.10 GiB)
    cfg = load_config(ROOT / DENSE_HC_CFG)
    prep = prepare(cfg, frames=0)
    for key, stack in (('estimator', None), ('estimator_users_stack', Stack.parse(USERS_STACK))):
        est = estimate(cfg, batch_size=1, target='cuda', stack=stack, prepared=prep)
        data[key] = {'config': DENSE_HC_CFG, 'target': 'cuda', 'stack': est.stack,
                     'transient_bytes': est.transient_bytes,
                     'transient_label': est.transient_label,
                     'transient_module': est.transient_module, 'peak_bytes': est.peak_bytes,
                     'map_to_bev_input': list(est.map_to_bev_input or [])}
    data['comparable'] = data['estimator']['map_to_bev_input'] == [C, D, H, W]
    if device.type == 'cuda':
        data['gpu_memory_bytes'] = torch.cuda.mem_get_info(device)[1]
        data['cudnn'] = torch.backends.cudnn.version()

    free_device(device)
    stage, x = 'input', None
    try:
        features, coords = hc_bench.random_voxels(B, C, D, H, W, N, device)
        # OpenPCDet's HeightCompression: .dense() then fold the heights into channels
        x = sparse_tensor(features, coords, [D, H, W], B).dense().view(B, cin, H, W)
        x.requires_grad_(True)
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, F, 3, padding=1, bias=False).to(device)
        data['allocated_before_bytes'] = (torch.cuda.memory_allocated(device)
                                          if device.type == 'cuda' else None)
        stage = 'forward'
        with PeakMemory(device) as pm:
            seconds, y = timed(lambda: conv(x), device)
        data['forward'] = {'time_s': seconds, 'peak_above_start_bytes': pm.peak_bytes,
                           **device_maxima(device)}
        stage = 'backward'
        with PeakMemory(device) as pm:
            seconds, _ = timed(lambda: y.backward(torch.ones_like(y)), device)
        data['backward'] = {'time_s': seconds, 'peak_above_start_bytes': pm.peak_bytes,
                            **device_maxima(device)}
        data['outcome'] = 'ran'
        del y
        x.grad = None
        try:   # which kernels ran (native im2col or cuDNN): informative, never the verdict
            data['ops'] = conv_ops(conv, x, device)
        except Exception as err:  # noqa: BLE001 - profiler unavailable, or memory
            data['ops_error'] = one_line(err)
    except Exception as err:  # noqa: BLE001 - an allocation failure is the result
        if not is_oom(err):
            raise
        data['outcome'] = 'out of memory'
        data['oom'] = {'stage': stage, 'requested_bytes': requested_bytes(err),
                       'message': one_line(err)}
        if device.type == 'cuda':
            data['oom']['allocated_at_failure_bytes'] = torch.cuda.memory_allocated(device)
        del err
    finally:
        x = y = conv = features = coords = None  # noqa: F841 - release before emptying
        free_device(device)

    est_t = data['estimator']['transient_bytes']
    if data['outcome'] == 'out of memory':
        if data['oom']['stage'] not in ('forward', 'backward'):
            data['compared'] = 'not compared: out of memory before the conv ran'
            return
        seen = data['oom']['requested_bytes']
        data['compared'] = (f'size PyTorch asked for in the {data["oom"]["stage"]} / '
                            'estimator transient')
    else:
        # the forward's peak above its start holds the output and the op's own transient
        seen = data['forward']['peak_above_start_bytes'] - B * F * H * W * 4
        data['compared'] = '(forward peak - output) / estimator transient'
    data['observed_transient_bytes'] = seen
    data['observed_over_estimate'] = (seen / est_t if data['comparable'] and seen and est_t
                                      else None)


# --------------------------------------------------------------------------- 8 demo

AP_KEY = re.compile(r'^(?P<cls>[A-Za-z]+)_(?P<metric>bev|3d)_R40_(?P<iou>[0-9.]+)$')


def ap_table(result):
    """{class: {'BEV @0.70': AP, ...}} from an evaluation's result.json (difficulty-free keys)."""
    table = {}
    for key, value in result.items():
        m = AP_KEY.match(key)
        if m:
            table.setdefault(m['cls'], {})[f'{m["metric"].upper()} @{m["iou"]}'] = value
    return table


def step_demo(ctx, data):
    root = ctx.out / 'demo'
    run_dir = root / Path(DEMO_CFG).stem / 'gpu_suite'
    if run_dir.exists():   # a finished run in it would be resumed, not retrained
        shutil.rmtree(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, 'tools/train.py', '--cfg', DEMO_CFG, '--output_dir', str(root),
           '--extra_tag', 'gpu_suite', '--no_progress'] + ctx.plan.demo_args
    data['command'] = 'python ' + ' '.join(cmd[1:])
    timeout = ctx.remaining()
    t0 = time.perf_counter()
    with open(root / 'train.log', 'w', encoding='utf-8') as logf:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as err:
            data['wall_s'] = time.perf_counter() - t0
            raise Failed(f'the demo did not finish within the suite\'s budget '
                         f'({timeout:.0f} s left); see demo/train.log') from err
    data['wall_s'] = time.perf_counter() - t0
    data['exit_code'] = proc.returncode
    data['log'] = 'demo/train.log'
    metrics = run_dir / 'metrics.jsonl'
    records = [json.loads(line) for line in metrics.read_text().splitlines()
               if line.strip()] if metrics.is_file() else []
    data['epochs'] = [{k: r[k] for k in ('epoch', 'step', 'seconds', 'loss') if k in r}
                      for r in records if 'seconds' in r]
    if proc.returncode != 0:
        lines = (root / 'train.log').read_text(encoding='utf-8').strip().splitlines()
        raise Failed(f'tools/train.py exited {proc.returncode}: '
                     f'{lines[-1] if lines else "no output"}')
    results = sorted(run_dir.glob('eval/epoch_*/result.json'),
                     key=lambda p: int(p.parent.name.split('_')[1]))
    if not results:
        raise Failed('tools/train.py wrote no AP table (eval/epoch_N/result.json)')
    data['result_file'] = str(results[-1].relative_to(ctx.out))
    data['ap'] = ap_table(json.loads(results[-1].read_text()))
    data['ap_text'] = results[-1].with_suffix('.txt').read_text(encoding='utf-8').rstrip()


STEPS = [
    (1, 'environment', step_environment),
    (2, 'CUDA tests', step_cuda_tests),
    (3, 'SparseHeightCompression at the users\' shape', step_height_compression),
    (4, 'DSVT', step_dsvt),
    (5, 'FocalSST encoder and full training step', step_training),
    (6, 'estimator truth', step_estimator),
    (7, 'the im2col cliff', step_cliff),
    (8, 'demo end to end', step_demo),
]


# --------------------------------------------------------------------------- report

def _table(headers, rows):
    buf = io.StringIO()
    print_table(headers, rows, file=buf)
    return buf.getvalue().rstrip().splitlines()


def _short(text, limit=120):
    """One table cell: at most ``limit`` characters, no column separator."""
    text = text.replace('|', '/')
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _ratio(r, col):
    v = r.get(col)
    return '-' if v is None else f'{v["speed"]:.1f}x / {v["memory"]:.1f}x'


def md_environment(d):
    out = [f'Machine: {d.get("machine")}', '']
    gpu = d.get('gpu')
    if gpu:
        out += [f'GPU: {gpu["name"]}, {fmt_bytes(gpu["total_memory_bytes"])} '
                f'({gpu["total_memory_bytes"] / GIB:.1f} GiB), compute capability '
                f'{gpu["capability"]}; nvidia-smi: {gpu.get("nvidia_smi")}', '']
    v = d.get('versions', {})
    out += [f'Versions: python {v.get("python")}, torch {v.get("torch")} (CUDA '
            f'{v.get("torch_cuda")}, cuDNN {v.get("cudnn")}), spconv {v.get("spconv")}, '
            f'cumm {v.get("cumm")}, numpy {v.get("numpy")}, numba {v.get("numba")}', '']
    doc = d.get('doctor')
    if doc:
        out += [f'Doctor (exit code {doc["exit_code"]}'
                f'{"" if doc["smoke_tests"] else ", smoke tests skipped in the dry run"}):', '',
                '```'] + [f'{f["level"]:<5} {f["topic"]}: {f["message"]}'
                          for f in doc['findings']] + ['```']
    return out


def md_cuda_tests(d):
    if 'total' not in d:
        return []
    out = _table(['passed', 'failed', 'errors', 'skipped', 'total'],
                 [[d['passed'], d['failed'], d['errors'], d['skipped'], d['total']]])
    out += ['', f'`{d["command"]}`; log: {d.get("log")}']
    for reason, n in d.get('skip_reasons', {}).items():
        out.append(f'- skipped {n}: {reason}')
    for f in d.get('failures', []):
        out.append(f'- {f["outcome"]}: `{f["test"]}`: {f["message"]}')
    return out


def md_height_compression(d):
    if 'shape' not in d:
        return []
    s = d['shape']
    out = [f'B={s["B"]} C={s["C"]} D={s["D"]} H={s["H"]} W={s["W"]}, {s["N"]:,} voxels; '
           f'dense volume {fmt_bytes(d["dense_volume_bytes"])}; copy bandwidth measured in '
           f'this run {d["copy_bandwidth_bytes_per_s"] / 1e9:.1f} GB/s (read + write)', '']
    fwd = {r['case']: r for r in d.get('forward', [])}
    bwd = {r['case']: r for r in d.get('forward_backward', [])}
    rows = []
    for case in list(fwd) + [c for c in bwd if c not in fwd]:
        f, b = fwd.get(case, {}), bwd.get(case, {})
        rows.append([case, fmt_time(f.get('time_s')), fmt_bytes(f.get('peak_bytes')),
                     fmt_bytes(f.get('max_allocated_bytes')), _ratio(f, 'vs dense'),
                     _ratio(f, 'vs HeightCompression'), fmt_time(f.get('bound_s')),
                     f'{f["x_bound"]:.1f}x' if f.get('x_bound') else '-',
                     fmt_time(b.get('time_s')), fmt_bytes(b.get('peak_bytes')),
                     fmt_bytes(b.get('max_allocated_bytes'))])
    out += _table(['path', 'forward', 'peak', 'max_memory_allocated',
                   'faster / less memory than dense equivalent',
                   'faster / less memory than HeightCompression', 'bandwidth bound',
                   'x bound', 'fwd+bwd', 'fwd+bwd peak', 'fwd+bwd max_memory_allocated'], rows)
    for key in ('forward_not_measured', 'forward_backward_not_measured'):
        for case, why in d.get(key, {}).items():
            out.append(f'- {key.replace("_not_measured", "").replace("_", " + ")} '
                       f'{case}: {why}')
    ex = d.get('exact')
    if ex:
        out += ['', ex.get('not_checked') or
                (f'Bit-exact against the dense reference: max {ex["max"]}, mean {ex["mean"]}; '
                 f'learned: max relative error {ex["learned_rel_err"]:.2e}')]
    return out


def md_dsvt(d):
    out = []
    if d.get('model'):
        m = d['model']
        out += [f'Model: sparse_shape {m["sparse_shape"]}, d_model {m["d_model"]}, set_info '
                f'{m["set_info"]}, nhead {m["nhead"]}, window {m["window_shape"]}, batch 1', '']
    rows = [[f'{r["voxels"]:,}', fmt_time(r['forward']['time_s']),
             fmt_time(r['input_layer']['time_s']), f'{100 * r["input_share"]:.1f}%',
             fmt_time(r['forward_backward']['time_s']),
             fmt_bytes(r['forward_backward']['max_allocated_bytes'] or
                       r['forward_backward']['peak_above_start_bytes'])]
            for r in d.get('rows', [])]
    if rows:
        out += _table(['voxels', 'forward', 'input layer', 'input share', 'fwd+bwd',
                       'fwd+bwd peak'], rows)
    op = d.get('openpcdet')
    if op:
        out.append('')
        if op.get('skipped'):
            out.append(f'OpenPCDet DSVT: not compared ({op["skipped"]})')
        else:
            out += _table(['voxels', 'ours', 'OpenPCDet', 'OpenPCDet / ours', 'max |diff|'],
                          [[f'{r["voxels"]:,}', fmt_time(r['ours_forward_s']),
                            fmt_time(r['openpcdet_forward_s']),
                            f'{r["openpcdet_over_ours"]:.2f}',
                            'coords differ' if r['max_abs_diff'] is None
                            else f'{r["max_abs_diff"]:.2e}'] for r in op['rows']])
    return out


def md_training(d):
    out = []
    e = d.get('encoder')
    if e:
        peak = e['train']['max_allocated_bytes'] or e['train']['peak_above_start_bytes']
        out += [f'FocalSST encoder, grid {e["grid_xyz"]}, {e["voxels"]:,} voxels: train '
                f'fwd+bwd {fmt_time(e["train"]["time_s"])} (peak {fmt_bytes(peak)}), eval '
                f'forward {fmt_time(e["eval"]["time_s"])}', '']
    rows = [[r['batch_size'], 'AMP' if r['amp'] else 'fp32', str(r['voxels_per_sample']),
             fmt_time(r['time_s']), fmt_bytes(r['max_allocated_bytes']),
             fmt_bytes(r['max_reserved_bytes']), fmt_bytes(r['peak_above_start_bytes'])]
            for r in d.get('steps', [])]
    if rows:
        out += [f'Training step of `{d.get("config")}` (median, after two warm-up steps):', '']
        out += _table(['batch', 'precision', 'voxels per sample', 'step time',
                       'max_memory_allocated', 'max_memory_reserved', 'peak above start'], rows)
    if d.get('amp_not_measured'):
        out.append(f'- AMP: {d["amp_not_measured"]}')
    return out


def md_estimator(d):
    rows = []
    for r in d.get('rows', []):
        rows.append([r['config'], r['bev'], r['batch_size'], fmt_bytes(r.get('estimate_bytes')),
                     fmt_bytes(r.get('estimate_at_measured_counts_bytes')),
                     fmt_bytes(r.get('measured_bytes')), fmt_bytes(r.get('reserved_bytes')),
                     '-' if r.get('relative_error') is None else f'{r["relative_error"]:+.1%}',
                     _short(r.get('error') or r.get('refused') or '') +
                     (f' (asked for {fmt_bytes(r["oom"]["requested_bytes"])})'
                      if r.get('oom') else '')])
    if not rows:
        return []
    return [f'{d["voxels_per_sample"]:,} voxels per sample; "at measured counts" = the '
            'estimate redone with the counts the measured step produced; error = that / '
            f'measured - 1 (limits {d["limits"][0]:+.0%} / {d["limits"][1]:+.0%})', ''] + \
        _table(['config', 'BEV', 'batch', 'estimate', 'estimate at measured counts',
                'measured allocated', 'reserved', 'error', 'note'], rows)


def md_cliff(d):
    if 'conv' not in d:
        return []
    est, users = d.get('estimator', {}), d.get('estimator_users_stack', {})
    out = [f'{d["conv"]} on {d["input_shape"]} ({fmt_bytes(d["input_bytes"])}, '
           f'{d["input_elements_per_sample"]:,} elements per sample'
           f'{", over 2^31-1" if d["over_int32"] else ""}); an im2col of it holds '
           f'{fmt_bytes(d["columns_bytes"])} ({d["columns_bytes"] / GIB:.2f} GiB).', '',
           f'Estimator ({est.get("config")}, batch 1, CUDA), largest transient: '
           f'{(est.get("transient_bytes") or 0) / GIB:.2f} GiB on this stack '
           f'({est.get("stack")}: {est.get("transient_label")}); '
           f'{(users.get("transient_bytes") or 0) / GIB:.2f} GiB on the users\' stack '
           f'({users.get("stack")}); users\' report: {d["users_report_bytes"] / GIB:.2f} GiB.',
           '']
    if d.get('outcome') == 'out of memory':
        o = d['oom']
        asked = o.get('requested_bytes')
        out.append(f'Outcome: out of memory in the {o["stage"]}, PyTorch asked for '
                   f'{"-" if asked is None else f"{asked / GIB:.2f} GiB"} (`{o["message"]}`)')
    elif d.get('outcome') == 'ran':
        f, b = d['forward'], d['backward']
        out.append(f'Outcome: ran. Forward {fmt_time(f["time_s"])}, peak above start '
                   f'{fmt_bytes(f["peak_above_start_bytes"])}; backward '
                   f'{fmt_time(b["time_s"])}, peak above start '
                   f'{fmt_bytes(b["peak_above_start_bytes"])}; max_memory_allocated '
                   f'{fmt_bytes(b.get("max_allocated_bytes"))}, max_memory_reserved '
                   f'{fmt_bytes(b.get("max_reserved_bytes"))}. Ops: {", ".join(d.get("ops", []))}')
    if d.get('ops_error'):
        out.append(f'(kernel names not read: {d["ops_error"]})')
    if d.get('observed_over_estimate') is not None:
        out += ['', f'{d["compared"]}: {d["observed_over_estimate"]:.3f}']
    elif d.get('compared', '').startswith('not compared'):
        out += ['', d['compared'][0].upper() + d['compared'][1:]]
    elif 'compared' in d:
        out += ['', 'Not compared with the estimator: this run\'s shape is not the users\' '
                '(dry run)']
    return out


def md_demo(d):
    out = []
    if 'command' in d:
        out.append(f'`{d["command"]}`: {fmt_time(d.get("wall_s"))} wall clock')
    if d.get('epochs'):
        out += [''] + _table(['epoch', 'steps', 'seconds', 'mean loss'],
                             [[e.get('epoch'), e.get('step'), e.get('seconds'),
                               f'{e["loss"]:.3f}' if 'loss' in e else '-']
                              for e in d['epochs']])
    if d.get('ap'):
        cols = []
        for per in d['ap'].values():
            cols += [c for c in per if c not in cols]
        out += ['', f'AP R40 (%) ({d.get("result_file")}):', '']
        out += _table(['class'] + cols, [[cls] + [f'{per[c]:.2f}' if c in per else ''
                                                  for c in cols]
                                         for cls, per in d['ap'].items()])
    return out


MD = {1: md_environment, 2: md_cuda_tests, 3: md_height_compression, 4: md_dsvt,
      5: md_training, 6: md_estimator, 7: md_cliff, 8: md_demo}


def write_report(ctx, report):
    ctx.out.mkdir(parents=True, exist_ok=True)
    tmp = ctx.out / 'report.json.tmp'
    tmp.write_text(json.dumps(report, indent=1, default=str) + '\n', encoding='utf-8')
    tmp.replace(ctx.out / 'report.json')
    lines = ['# pcdet-focal GPU suite report', '']
    if report['dry_run']:
        lines += ['**DRY RUN on the CPU at tiny sizes: these figures test the suite, not a '
                  'GPU.**', '']
    lines += [f'Command: `{report["command"]}`  ', f'Started: {report["started"]}; '
              f'{report["seconds"]:.0f} s so far' if report['finished'] is None else
              f'Started: {report["started"]}; {report["seconds"]:.0f} s in all', '',
              f'Device: {report["machine"]}', '']
    lines += _table(['step', 'status', 'seconds', 'note'],
                    [[f'{s["step"]}. {s["name"]}', s['status'], f'{s["seconds"]:.1f}',
                      _short(s.get('error') or '')]
                     for s in report['steps']])
    for s in report['steps']:
        lines += ['', f'## {s["step"]}. {s["name"]} ({s["status"]})', '']
        if s.get('error'):
            lines += [s['error'], '']
        try:
            lines += MD[s['step']](s['data'])
        except Exception as err:  # noqa: BLE001 - a partial step's figures may be incomplete
            lines.append(f'(figures incomplete: {one_line(err)}; see report.json)')
    (ctx.out / 'report.md').write_text('\n'.join(lines) + '\n', encoding='utf-8')


def run_step(ctx, number, name, fn):
    log(f'\n== step {number}: {name}')
    record = {'step': number, 'name': name, 'status': 'passed', 'seconds': 0.0, 'error': None,
              'data': {}}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        fn(ctx, record['data'])
    except Failed as err:
        record.update(status='failed', error=str(err))
    except Exception as err:  # noqa: BLE001 - one step's failure must not end the suite
        record.update(status='failed', error=one_line(err), traceback=traceback.format_exc())
    finally:
        try:
            free_device(ctx.device)
        except Exception as err:  # noqa: BLE001 - e.g. a CUDA error that poisoned the context
            record.setdefault('cleanup_error', one_line(err))
    record['seconds'] = time.perf_counter() - t0
    log(f'== step {number}: {record["status"]} in {record["seconds"]:.1f} s'
        f'{": " + (record["error"] or "") if record["status"] == "failed" else ""}')
    return record


def parse_args(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ConfigError(f'{message} (see --help)')

    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument('--out', required=True, help='folder for report.json, report.md and logs')
    p.add_argument('--dry-run', dest='dry_run', action='store_true',
                   help='CPU only (any GPU hidden), tiny sizes: checks that the suite runs')
    p.add_argument('--steps', nargs='+', type=int, default=None, metavar='N',
                   help='run only these steps (1-8)')
    return p.parse_args(argv)


def suite_main(argv=None):
    args = parse_args(argv)
    numbers = [n for n, _, _ in STEPS]
    if args.steps and not set(args.steps) <= set(numbers):
        raise ConfigError(f'--steps {args.steps}: steps are numbered {numbers[0]}-{numbers[-1]}')
    if args.dry_run:
        # before anything asks CUDA: this process and its children see no GPU
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
        # one intra-op thread: on CI's 2 shared cores torch's parallel sort stalls whenever the
        # other core is busy (see benchmarks/dsvt.py); the subprocess steps keep the default
        torch.set_num_threads(1)
        plan = DRY
    else:
        plan = FULL
        if not torch.cuda.is_available():
            raise ConfigError('no CUDA device is visible to torch here; run on a GPU machine, '
                              'or pass --dry-run to check the suite on the CPU')
    device = torch.device(plan.device)
    ctx = Context(plan=plan, device=device, out=Path(args.out).resolve(),
                  start=time.perf_counter())
    ctx.out.mkdir(parents=True, exist_ok=True)
    report = {'suite': 'benchmarks/gpu_suite.py', 'dry_run': plan.dry,
              'command': ' '.join(['python', 'benchmarks/gpu_suite.py'] +
                                  (list(argv) if argv is not None else sys.argv[1:])),
              'started': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'finished': None,
              'device': str(device), 'machine': describe_machine(device),
              'plan': dataclasses.asdict(plan), 'seconds': 0.0, 'steps': [], 'passed': None}
    log(f'# {report["machine"]}{" (dry run)" if plan.dry else ""}')
    try:
        for number, name, fn in STEPS:
            if args.steps and number not in args.steps:
                continue
            report['steps'].append(run_step(ctx, number, name, fn))
            report['seconds'] = time.perf_counter() - ctx.start
            write_report(ctx, report)
    except KeyboardInterrupt:
        report['interrupted'] = True
    report['seconds'] = time.perf_counter() - ctx.start
    report['finished'] = time.strftime('%Y-%m-%d %H:%M:%S %z')
    report['passed'] = (not report.get('interrupted') and
                        all(s['status'] != 'failed' for s in report['steps']))
    write_report(ctx, report)
    failed = [f'{s["step"]}' for s in report['steps'] if s['status'] == 'failed']
    log(f'\n{len(report["steps"])} steps in {report["seconds"]:.0f} s; '
        f'{"failed: " + ", ".join(failed) if failed else "none failed"}; '
        f'report: {ctx.out / "report.md"}')
    if report.get('interrupted'):
        return 130
    return 0 if report['passed'] else 1


main = cli_main(suite_main)

if __name__ == '__main__':
    main()
