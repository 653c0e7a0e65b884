"""benchmarks/gpu_suite.py: the dry run (CPU, tiny sizes) runs every step and writes both
reports, and the report's figures are the run's own (checked against recomputation here:
byte counts from the shapes, ratios from the times, estimates from the configs the run wrote,
AP from the result file the demo wrote). Plus the pieces a GPU run relies on that can be
exercised without one: reading the size out of an out-of-memory error, a real allocation
failure caught, a failing step recorded while the suite goes on.
"""
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from pcdet_focal.config import load_config
from pcdet_focal.errors import ConfigError
from pcdet_focal.memory import estimate

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def _load_suite():
    spec = importlib.util.spec_from_file_location('gpu_suite_under_test',
                                                  ROOT / 'benchmarks' / 'gpu_suite.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def suite():
    return _load_suite()


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    """One ``--dry-run`` of the whole suite (what CI keeps alive): (exit code, out dir, report)."""
    out = tmp_path_factory.mktemp('gpu_suite')
    proc = subprocess.run([sys.executable, 'benchmarks/gpu_suite.py', '--dry-run', '--out',
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = None
    if (out / 'report.json').is_file():
        report = json.loads((out / 'report.json').read_text())
    return proc, out, report


def _step(report, number):
    return next(s for s in report['steps'] if s['step'] == number)


def test_dry_run_exits_0_and_writes_both_reports(dry_run):
    proc, out, report = dry_run
    failed = [(s['step'], s['error'], s.get('traceback')) for s in (report or {}).get('steps', [])
              if s['status'] != 'passed']
    assert proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert report['dry_run'] is True and report['passed'] is True
    assert [s['step'] for s in report['steps']] == list(range(1, 9))
    md = (out / 'report.md').read_text()
    assert 'DRY RUN' in md
    for s in report['steps']:
        assert f'## {s["step"]}. {s["name"]} (passed)' in md


def test_environment_is_this_interpreter(dry_run):
    data = _step(dry_run[2], 1)['data']
    assert data['versions']['torch'] == torch.__version__
    assert data['versions']['python'] == platform.python_version()
    assert data['gpu'] is None                      # the dry run hides any GPU
    assert data['doctor']['findings'] and data['doctor']['exit_code'] in (0, 1)
    assert {f['level'] for f in data['doctor']['findings']} <= {'OK', 'INFO', 'WARN'}


def test_cuda_test_counts_match_the_junit_file(dry_run):
    _, out, report = dry_run
    data = _step(report, 2)['data']
    cases = list(ET.parse(out / 'cuda_tests.xml').getroot().iter('testcase'))
    skipped = [c for c in cases if c.find('skipped') is not None]
    assert data['total'] == len(cases) > 0
    # without a GPU every CUDA-only test skips, for that reason
    assert data['skipped'] == len(skipped) == len(cases) and data['passed'] == 0
    assert list(data['skip_reasons']) == ['needs a CUDA device']


def test_height_compression_figures_come_from_the_run(dry_run):
    data = _step(dry_run[2], 3)['data']
    s = data['shape']
    B, C, D, H, W, N, F = (s[k] for k in 'BCDHWNF')
    assert data['dense_volume_bytes'] == B * C * D * H * W * 4
    voxels_in = N * C * 4 + N * 4 * 4                # features + int32 [b, z, y, x] coords
    expect = {'sparse max': voxels_in + B * C * H * W * 4,
              'sparse mean': voxels_in + B * C * H * W * 4,
              'sparse learned': voxels_in + F * C * D * 4 + B * F * H * W * 4,
              'spconv .dense() + view': voxels_in + B * C * D * H * W * 4}
    rows = {r['case']: r for r in data['forward']}
    assert set(expect) <= set(rows)
    bw = data['copy_bandwidth_bytes_per_s']
    for case, nbytes in expect.items():
        r = rows[case]
        assert r['bytes'] == nbytes, case
        assert r['bound_s'] == pytest.approx(nbytes / bw)
        assert r['x_bound'] == pytest.approx(r['time_s'] / r['bound_s'])
        assert r['time_s'] > 0 and r['peak_bytes'] > 0
    hc = rows['spconv .dense() + view']
    ratio = rows['sparse max']['vs HeightCompression']
    assert ratio['speed'] == pytest.approx(hc['time_s'] / rows['sparse max']['time_s'])
    assert ratio['memory'] == pytest.approx(hc['peak_bytes'] / rows['sparse max']['peak_bytes'])
    assert {r['case'] for r in data['forward_backward']} == set(rows)
    # the CPU tests show max / mean bit-exact and learned within 1e-4 (tests/test_map_to_bev)
    assert data['exact']['max'] is True and data['exact']['mean'] is True
    assert data['exact']['learned_rel_err'] < 1e-4


def test_dsvt_rows(dry_run):
    report = dry_run[2]
    data = _step(report, 4)['data']
    assert [r['voxels'] for r in data['rows']] == report['plan']['dsvt_sizes']
    for r in data['rows']:
        assert r['input_share'] == pytest.approx(r['input_layer']['time_s'] /
                                                 r['forward']['time_s'])
        assert r['forward']['time_s'] == statistics.median(r['forward']['times_s'])
    assert data['openpcdet'].get('skipped')


def test_training_steps(dry_run):
    report = dry_run[2]
    data = _step(report, 5)['data']
    assert [r['batch_size'] for r in data['steps']] == list(report['plan']['train_batches'])
    for r in data['steps']:
        assert len(r['voxels_per_sample']) == r['batch_size'] and min(r['voxels_per_sample']) > 0
        assert r['time_s'] == statistics.median(r['times_s'])
        assert r['peak_above_start_bytes'] > 0 and r['amp'] is False
    assert data['amp_not_measured']
    assert data['encoder']['voxels'] == report['plan']['focal_voxels']


def test_estimator_rows_match_the_estimate_recomputed_here(dry_run):
    report = dry_run[2]
    rows = _step(report, 6)['data']['rows']
    configs = sorted(p.relative_to(ROOT / 'cfgs').as_posix() for p in
                     list((ROOT / 'cfgs').glob('*.yaml')) +
                     list((ROOT / 'cfgs' / 'openpcdet').glob('*.yaml')))
    assert sorted({r['config'] for r in rows}) == configs
    assert len(rows) == len(configs) * len(report['plan']['est_batches'])
    for r in rows:
        est = estimate(load_config(r['cfg_file']), batch_size=r['batch_size'],
                       voxels=r['voxels_per_sample'], target='cpu')
        assert r['estimate_bytes'] == est.peak_bytes, r['config']
        assert r['measured_bytes'] > est.param_bytes
        assert r['relative_error'] == pytest.approx(
            (r['estimate_at_measured_counts_bytes'] - r['measured_bytes']) / r['measured_bytes'])


def test_cliff_against_the_users_figure(dry_run):
    report = dry_run[2]
    data = _step(report, 7)['data']
    # the users' report: "Tried to allocate 75.10 GiB" = 22400 * 9 * 200 * 500 * 4 bytes
    assert data['users_report_bytes'] == 22400 * 9 * 200 * 500 * 4
    users = data['estimator_users_stack']
    assert round(users['transient_bytes'] / GIB, 2) == 75.10 and 'im2col' in \
        users['transient_label'] and 'torch 2.3.0 + cuDNN 8.9.2' in users['stack']
    # this machine's stack: im2col exactly when it cannot give the conv to cuDNN
    from pcdet_focal.memory.cuda import Stack
    falls_back = 'im2col' in data['estimator']['transient_label']
    assert falls_back == (not Stack.installed().large_conv_in_cudnn())
    s = report['plan']['cliff']
    cin = s['C'] * s['D']
    assert data['input_shape'] == [s['B'], cin, s['H'], s['W']]
    assert data['input_bytes'] == s['B'] * cin * s['H'] * s['W'] * 4
    assert data['outcome'] == 'ran' and data['comparable'] is False
    assert any('conv' in op for op in data['ops'])


def test_demo_ap_table_is_the_result_file(dry_run):
    _, out, report = dry_run
    data = _step(report, 8)['data']
    result = json.loads((out / data['result_file']).read_text())
    seen = 0
    for cls, per in data['ap'].items():
        for col, value in per.items():
            metric, iou = col.split(' @')
            assert value == result[f'{cls}_{metric.lower()}_R40_{iou}']
            seen += 1
    assert seen > 0
    assert data['wall_s'] > sum(e['seconds'] for e in data['epochs']) > 0


def test_requested_bytes_reads_the_users_message(suite):
    msg = ('CUDA out of memory. Tried to allocate 75.10 GiB. GPU 0 has a total capacity of '
           '23.65 GiB of which 20.81 GiB is free.')
    assert abs(suite.requested_bytes(msg) - 22400 * 9 * 200 * 500 * 4) <= 0.005 * GIB
    assert suite.requested_bytes('no size here') is None


def test_a_real_allocation_failure_is_caught_with_its_size(suite):
    n = 2 ** 50                       # 4 PiB of float32: no machine has that
    try:
        torch.empty(n, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - what the suite catches
        assert suite.is_oom(err)
        assert suite.requested_bytes(err) == 4 * n
    else:
        pytest.fail('allocating 4 PiB succeeded')
    assert not suite.is_oom(ValueError('out of memory'))


def test_a_failing_step_is_recorded_and_the_suite_goes_on(suite, tmp_path, monkeypatch):
    ran = []

    def broken(ctx, data):
        data['partial'] = 1
        raise RuntimeError('boom\nsecond line')

    def checked(ctx, data):
        raise suite.Failed('a check failed')

    def fine(ctx, data):
        ran.append(ctx.device.type)

    monkeypatch.setattr(suite, 'STEPS', [(1, 'broken', broken), (2, 'checked', checked),
                                         (3, 'fine', fine)])
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    threads = torch.get_num_threads()
    try:
        code = suite.suite_main(['--dry-run', '--out', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / 'report.json').read_text())
    assert code == 1 and report['passed'] is False and ran == ['cpu']
    first, second, third = report['steps']
    assert first['status'] == 'failed' and first['error'] == 'RuntimeError: boom'
    assert 'Traceback' in first['traceback'] and first['data'] == {'partial': 1}
    assert second['status'] == 'failed' and second['error'] == 'a check failed'
    assert third['status'] == 'passed'
    assert '## 1. broken (failed)' in (tmp_path / 'report.md').read_text()


def test_bad_arguments_are_one_line_errors(suite, tmp_path):
    with pytest.raises(ConfigError, match='--steps'):
        suite.suite_main(['--out', str(tmp_path), '--steps', '9'])
    with pytest.raises(ConfigError, match='--out'):
        suite.suite_main([])


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a GPU-less machine')
def test_without_a_gpu_the_full_run_points_to_dry_run(suite, tmp_path):
    with pytest.raises(ConfigError, match='--dry-run'):
        suite.suite_main(['--out', str(tmp_path)])
    assert not (tmp_path / 'report.json').exists()
