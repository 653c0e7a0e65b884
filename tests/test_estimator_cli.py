"""tools/estimate_mem.py: exit codes, one-line errors for bad input, JSON, --write-fixed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_estimator import _shc_config, _write

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'estimate_mem.py'


def run(*args, cwd=None):
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith('error: '), err
    return lines[0]


@pytest.fixture
def small_cfg(tmp_path):
    return _write(tmp_path, 'small.yaml', _shc_config())


def test_missing_file(tmp_path):
    code, _, err = run('--cfg', tmp_path / 'nope.yaml')
    assert code == 1
    assert 'nope.yaml: config file not found' in one_error_line(err)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('MODEL:\n  NAME: X\n  VFE: [unclosed\nOPTIMIZATION: {}\n')
    code, _, err = run('--cfg', bad)
    assert code == 1
    line = one_error_line(err)
    assert 'bad.yaml:' in line and 'YAML syntax error' in line


def test_python_tag_is_refused_never_executed(tmp_path):
    marker = tmp_path / 'executed'
    bad = tmp_path / 'evil.yaml'
    bad.write_text(f'MODEL: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, _, err = run('--cfg', bad)
    assert code == 1
    assert 'refused YAML tag' in one_error_line(err)
    assert not marker.exists()


@pytest.mark.parametrize('edit, needle', [
    (lambda c: c['DATA_CONFIG'].pop('POINT_CLOUD_RANGE'), 'DATA_CONFIG.POINT_CLOUD_RANGE'),
    (lambda c: c['DATA_CONFIG']['DATA_PROCESSOR'][1].pop('VOXEL_SIZE'), 'VOXEL_SIZE'),
    (lambda c: c['DATA_CONFIG'].__setitem__('POINT_CLOUD_RANGE', [0, -8, -3, 20.1, 8, 4]),
     'is not a whole number'),
    (lambda c: c['MODEL']['MAP_TO_BEV'].__setitem__('NUM_BEV_FEATURES', 32),
     'NUM_BEV_FEATURES=32 but MODE=max'),
])
def test_bad_config_one_line(tmp_path, small_cfg, edit, needle):
    cfg = yaml.safe_load(small_cfg.read_text())
    edit(cfg)
    path = tmp_path / 'edited.yaml'
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run('--cfg', path, '--vram', 24, '--frames', 0)
    assert code == 1
    assert needle in one_error_line(err)


@pytest.mark.parametrize('flags, needle', [
    (['--batch_size', '0'], '--batch_size must be >= 1'),
    (['--batch_size', '-2'], '--batch_size must be >= 1'),
    (['--batch_size', 'two'], '--batch_size must be an integer'),
    (['--vram', '-4'], '--vram must be a positive'),
    (['--voxels', '0'], '--voxels must be >= 1'),
    (['--frames', '-1'], '--frames must be >= 0'),
    (['--gpus', '0'], '--gpus must be >= 1'),
    (['--target', 'tpu'], "--target 'tpu': name a stack"),
    (['--bogus'], 'unrecognized arguments'),
    (['--set', 'MODEL.NOPE', '1'], "no key 'MODEL.NOPE'"),
])
def test_bad_flags_one_line(small_cfg, flags, needle):
    code, _, err = run('--cfg', small_cfg, *flags)
    assert code == 1
    assert needle in one_error_line(err)


def test_exit_codes_and_json(small_cfg):
    code, out, _ = run('--cfg', small_cfg, '--vram', 24, '--json', '--frames', 2)
    assert code == 0
    doc = json.loads(out)
    e = doc['estimate']
    assert doc['verdict'] == 'FITS' and doc['max_batch_size'] >= 1
    assert e['peak_bytes'] > 0 and e['bounded'] is True and e['voxels']['frames']['count'] == 2
    assert [m['module'] for m in e['modules']][:2] == ['input batch', 'VFE MeanVFE']
    tiny = e['peak_bytes'] / 2 ** 30 / 4
    code, out, _ = run('--cfg', small_cfg, '--vram', f'{tiny:.6f}', '--json', '--frames', 2)
    assert code == 2 and json.loads(out)['verdict'] == 'REJECT'
    code, out, _ = run('--cfg', small_cfg, '--frames', 0)   # no budget here: estimate only
    assert code == 0 and ('no budget' in out or 'FITS' in out or 'REJECT' in out)


def test_table_and_write_fixed(tmp_path):
    cfg = _shc_config()
    cfg.MODEL.BACKBONE_3D.NUM_FILTERS = [16, 128]
    cfg.MODEL.MAP_TO_BEV = {'NAME': 'HeightCompression', 'NUM_BEV_FEATURES': 128 * 35}
    path = _write(tmp_path, 'dense.yaml', cfg)
    fixed = tmp_path / 'fixed.yaml'
    code, out, _ = run('--cfg', path, '--vram', 1.3, '--batch_size', 2, '--write-fixed', fixed,
                       '--frames', 0)
    assert code == 2, out
    assert 'REJECT' in out and 'suggestions (each re-estimated; each fits)' in out
    assert 'flattened BEV channels: 4480' in out
    assert f'wrote {fixed}' in out
    code, out, _ = run('--cfg', fixed, '--vram', 1.3, '--frames', 0)
    assert code == 0, out
