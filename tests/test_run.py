"""Drop-in use inside OpenPCDet: ``pcdet_focal.run``, the ``pcdet-focal`` CLI, the backend
switch of our tools, and the OpenPCDet-layout configs in cfgs/openpcdet/.

A fake OpenPCDet checkout (tests/fake_pcdet.py) is written under tmp_path with an
OpenPCDet-style ``tools/`` folder holding a training-like script: it parses its arguments, loads
its config with OpenPCDet's cwd-relative ``cfg_from_yaml_file``, builds the dataset and the
model through OpenPCDet's tables / ``build_network``, runs forward + backward on a small random
batch and writes what it saw to a JSON file.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from easydict import EasyDict

from fake_pcdet import (REPO_ROOT, broken_pcdet, fake_pcdet, no_pcdet,  # noqa: F401
                        real_pcdet_installed, subprocess_env, write_fake_pcdet)
from pcdet_focal import backend, registry
from pcdet_focal.errors import ConfigError
from pcdet_focal.registry import REGISTRIES, PcdetNotAvailable
from pcdet_focal.run import run_script

CLASSES = ['Car', 'Pedestrian', 'Cyclist']

# OpenPCDet's dataset-config layout, minimal (written by the test, not OpenPCDet's file).
KITTI_DATASET_YAML = '''
DATASET: 'KittiDataset'
DATA_PATH: '../data/kitti'
POINT_CLOUD_RANGE: [0, -40, -3, 70.4, 40, 1]
POINT_FEATURE_ENCODING: {
    encoding_type: absolute_coordinates_encoding,
    used_feature_list: ['x', 'y', 'z', 'intensity'],
    src_feature_list: ['x', 'y', 'z', 'intensity'],
}
DATA_PROCESSOR:
    - NAME: transform_points_to_voxels
      VOXEL_SIZE: [0.05, 0.05, 0.1]
      MAX_POINTS_PER_VOXEL: 5
      MAX_NUMBER_OF_VOXELS: {'train': 16000, 'test': 40000}
'''

# A small model: grid 32 x 32 x 8 (x, y, z); our DSVTDownsample (z merged by 2) and learned
# SparseHeightCompression between OpenPCDet's MeanVFE / BaseBEVBackbone / CenterHead.
SMALL_MODEL_YAML = '''
CLASS_NAMES: ['Car', 'Pedestrian', 'Cyclist']
DATA_CONFIG:
    _BASE_CONFIG_: cfgs/dataset_configs/kitti_dataset.yaml
    POINT_CLOUD_RANGE: [0, -3.2, -2, 6.4, 3.2, 2]
    DATA_PROCESSOR:
        - NAME: transform_points_to_voxels
          VOXEL_SIZE: [0.2, 0.2, 0.5]
          MAX_POINTS_PER_VOXEL: 5
          MAX_NUMBER_OF_VOXELS: {'train': 1000, 'test': 1000}
MODEL:
    NAME: __DETECTOR__
    VFE: {NAME: MeanVFE}
    BACKBONE_3D:
        NAME: DSVTDownsample
        INPUT_LAYER:
            sparse_shape: [32, 32, 8]
            input_downsample: [1, 1, 2]
            downsample_stride: []
            d_model: [4]
            set_info: [[8, 1]]
            window_shape: [[8, 8, 4]]
            hybrid_factor: [2, 2, 1]
            shifts_list: [[[0, 0, 0], [4, 4, 0]]]
            normalize_pos: False
        block_name: ['DSVTBlock']
        set_info: [[8, 1]]
        d_model: [4]
        nhead: [2]
        dim_feedforward: [8]
        dropout: 0.0
        activation: gelu
        reduction_type: attention
        output_shape: [32, 32]
        conv_out_channel: 4
    MAP_TO_BEV: {NAME: SparseHeightCompression, MODE: learned, INPUT_FEATURES: 4,
                 NUM_BEV_FEATURES: 8, Z_STRIDE: 2}
    BACKBONE_2D: {NAME: BaseBEVBackbone, LAYER_NUMS: [1], LAYER_STRIDES: [1], NUM_FILTERS: [8],
                  UPSAMPLE_STRIDES: [1], NUM_UPSAMPLE_FILTERS: [8]}
    DENSE_HEAD: {NAME: CenterHead, CLASS_AGNOSTIC: False}
'''



def small_model_yaml(detector):
    return SMALL_MODEL_YAML.replace('__DETECTOR__', detector)


# An OpenPCDet-style script: nothing in it knows about pcdet_focal.
TRAIN_LIKE_PY = '''
import argparse
import json
import os
import sys

import _init_path  # a sibling module: importable only if the script's folder is on sys.path
import numpy as np
import torch
from pcdet.config import cfg, cfg_from_yaml_file
from pcdet.datasets import __all__ as dataset_table
from pcdet.models import build_network

parser = argparse.ArgumentParser()
parser.add_argument('--cfg_file', required=True)
parser.add_argument('--out', required=True)
parser.add_argument('--forward', action='store_true')
parser.add_argument('--exit_code', type=int, default=0)
args = parser.parse_args()
cfg_from_yaml_file(args.cfg_file, cfg)
dataset = dataset_table[cfg.DATA_CONFIG.DATASET](
    dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES, training=True, root_path=None,
    logger=None)
model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
result = {
    'name': __name__, 'argv': sys.argv, 'cwd': os.getcwd(), 'path0': sys.path[0],
    'init_path': _init_path.LOADED, 'grid_size': dataset.grid_size.tolist(),
    'detector': type(model).__module__ + '.' + type(model).__name__,
    'modules': [type(m).__module__ + '.' + type(m).__name__ for m in model.module_list],
}
if args.forward:
    # OpenPCDet hands every array to the model as float32, voxel_coords [b, z, y, x] included
    rng = np.random.default_rng(0)
    nx, ny, nz = dataset.grid_size.tolist()
    B, per = 2, 20
    coords = []
    for b in range(B):
        lin = rng.choice(nx * ny * nz, per, replace=False)
        coords.append(np.stack([np.full(per, b), lin // (nx * ny), lin // nx % ny, lin % nx], 1))
    coords = np.concatenate(coords).astype(np.float32)
    counts = rng.integers(1, 6, len(coords))
    voxels = rng.normal(size=(len(coords), 5, 4)).astype(np.float32)
    voxels[np.arange(5)[None, :] >= counts[:, None]] = 0  # zero padding, as OpenPCDet's
    batch = {'voxels': torch.from_numpy(voxels), 'voxel_coords': torch.from_numpy(coords),
             'voxel_num_points': torch.from_numpy(counts.astype(np.float32)), 'batch_size': B}
    model.train()
    ret_dict, tb_dict, disp_dict = model(batch)
    ret_dict['loss'].backward()
    result['loss'] = ret_dict['loss'].item()
    result['with_grad'] = [type(m).__name__ for m in model.module_list
                           if any(p.grad is not None and p.grad.abs().sum() > 0
                                  for p in m.parameters())]
    result['spatial_features'] = list(batch['spatial_features'].shape)
with open(args.out, 'w') as f:
    json.dump(result, f)
sys.exit(args.exit_code)
'''


def make_checkout(root, detector='FocalCenterPoint', broken_ops=False):
    """tmp OpenPCDet checkout: pcdet/ (fake), tools/train_like.py, tools/cfgs/..."""
    write_fake_pcdet(root, broken_ops=broken_ops)
    tools = root / 'tools'
    (tools / 'cfgs' / 'dataset_configs').mkdir(parents=True, exist_ok=True)
    (tools / 'cfgs' / 'kitti_models').mkdir(parents=True, exist_ok=True)
    (tools / 'cfgs' / 'dataset_configs' / 'kitti_dataset.yaml').write_text(KITTI_DATASET_YAML)
    (tools / 'cfgs' / 'kitti_models' / 'small.yaml').write_text(
        small_model_yaml(detector))
    (tools / '_init_path.py').write_text('LOADED = True\n')
    (tools / 'train_like.py').write_text(TRAIN_LIKE_PY)
    return tools


def require_modules(*pairs):
    for slot, name in pairs:
        if name not in REGISTRIES[slot]:
            pytest.skip(f'{slot} {name} is not written yet')


SMALL_OURS = (('BACKBONE_3D', 'DSVTDownsample'), ('MAP_TO_BEV', 'SparseHeightCompression'))


@pytest.fixture
def checkout(fake_pcdet):
    """The fake OpenPCDet on sys.path, laid out as a checkout; returns its tools/ folder."""
    return make_checkout(fake_pcdet)


# ----------------------------------------------------------------------------- run_script

@pytest.mark.parametrize('detector', ['FocalCenterPoint', 'CenterPoint'])
def test_run_script_trains_a_mixed_model_in_openpcdet(checkout, tmp_path, detector):
    """Our modules built by OpenPCDet's builder (CenterPoint) or by our detector inside
    OpenPCDet (FocalCenterPoint), mixed with OpenPCDet's own modules; forward + backward."""
    require_modules(*SMALL_OURS, ('DETECTOR', 'FocalCenterPoint'))
    cfg = checkout / 'cfgs' / 'kitti_models' / 'small.yaml'
    cfg.write_text(small_model_yaml(detector))
    cwd, argv, path = os.getcwd(), list(sys.argv), list(sys.path)
    with pytest.raises(SystemExit) as exit_info:
        run_script(checkout / 'train_like.py', ['--cfg_file', 'cfgs/kitti_models/small.yaml',
                                                '--out', 'result.json', '--forward'])
    assert exit_info.value.code == 0
    # the caller's state is back
    assert (os.getcwd(), sys.argv, sys.path) == (cwd, argv, path)
    res = json.loads((checkout / 'result.json').read_text())  # relative --out: script's folder
    assert res['name'] == '__main__' and res['init_path'] is True
    assert res['cwd'] == str(checkout.resolve()) and res['path0'] == str(checkout.resolve())
    assert res['argv'] == [str((checkout / 'train_like.py').resolve()), '--cfg_file',
                           'cfgs/kitti_models/small.yaml', '--out', 'result.json', '--forward']
    assert res['grid_size'] == [32, 32, 8]
    expected_detector = {'FocalCenterPoint': 'pcdet_focal.models.detector.FocalCenterPoint',
                         'CenterPoint': 'pcdet.models.detectors.CenterPoint'}[detector]
    assert res['detector'] == expected_detector
    assert res['modules'] == [
        'pcdet.models.backbones_3d.vfe.MeanVFE',                    # OpenPCDet's stays
        'pcdet_focal.models.dsvt.DSVTDownsample',
        'pcdet_focal.models.map_to_bev.SparseHeightCompression',
        'pcdet.models.backbones_2d.BaseBEVBackbone',
        'pcdet.models.dense_heads.CenterHead',
    ]
    assert math.isfinite(res['loss'])
    assert res['spatial_features'] == [2, 8, 32, 32]  # (B, NUM_BEV_FEATURES, ny, nx)
    # gradients reach our modules through OpenPCDet's head
    assert {'DSVTDownsample', 'SparseHeightCompression', 'CenterHead'} <= set(res['with_grad'])


def test_run_script_propagates_the_scripts_exit_code(checkout):
    require_modules(*SMALL_OURS, ('DETECTOR', 'FocalCenterPoint'))
    with pytest.raises(SystemExit) as exit_info:
        run_script(checkout / 'train_like.py', ['--cfg_file', 'cfgs/kitti_models/small.yaml',
                                                '--out', 'r.json', '--exit_code', '3'])
    assert exit_info.value.code == 3


def test_run_script_missing_script(fake_pcdet, tmp_path):
    with pytest.raises(ConfigError, match='nope.py: script not found'):
        run_script(tmp_path / 'nope.py')


def test_run_script_without_openpcdet(no_pcdet, tmp_path):
    script = tmp_path / 'never.py'
    marker = tmp_path / 'ran'
    script.write_text(f'open({str(marker)!r}, "w").close()\n')
    with pytest.raises(PcdetNotAvailable) as err:
        run_script(script)
    assert err.value.exit_code == 2 and not marker.exists()


# ----------------------------------------------------------------------------- CLI processes

def _console_script():
    exe = Path(sys.executable).parent / 'pcdet-focal'
    if not exe.exists():
        pytest.skip('the pcdet-focal console script is not installed in this environment')
    return str(exe)


def test_console_run_with_fake_openpcdet(tmp_path):
    """Acceptance: `pcdet-focal run` of a script that builds a model naming our modules."""
    require_modules(*SMALL_OURS, ('DETECTOR', 'FocalCenterPoint'))
    root = tmp_path / 'OpenPCDet'
    tools = make_checkout(root)
    out = subprocess.run([_console_script(), 'run', 'train_like.py', '--cfg_file',
                          'cfgs/kitti_models/small.yaml', '--out', 'result.json'],
                         cwd=tools, env=subprocess_env(root), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads((tools / 'result.json').read_text())
    assert 'pcdet_focal.models.map_to_bev.SparseHeightCompression' in res['modules']
    assert 'registered into OpenPCDet' in out.stderr and 'SparseHeightCompression' in out.stderr


@pytest.mark.parametrize('launcher', ['module', 'console'])
def test_run_without_openpcdet_says_so_and_exits_2(tmp_path, launcher):
    if real_pcdet_installed():
        pytest.skip('a real OpenPCDet is importable here')
    script = tmp_path / 'train.py'
    marker = tmp_path / 'ran'
    script.write_text(f'open({str(marker)!r}, "w").close()\n')
    cmd = ([sys.executable, '-m', 'pcdet_focal.run'] if launcher == 'module'
           else [_console_script(), 'run'])
    out = subprocess.run(cmd + [str(script), '--cfg_file', 'x.yaml'], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith('error: OpenPCDet is not importable')
    assert 'pip install' in lines[0] and 'OpenPCDet' in lines[0]
    assert not marker.exists()


def test_run_with_unbuilt_ops_exits_2(tmp_path):
    root = tmp_path / 'OpenPCDet'
    tools = make_checkout(root, broken_ops=True)
    out = subprocess.run([sys.executable, '-m', 'pcdet_focal.run', 'train_like.py'], cwd=tools,
                         env=subprocess_env(root), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith('error: OpenPCDet found but') and 'setup.py develop' in out.stderr


def test_run_usage(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'pcdet_focal.run'], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and 'usage: pcdet-focal run SCRIPT.py' in out.stderr
    out = subprocess.run([sys.executable, '-m', 'pcdet_focal.cli', 'run', '--help'],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'usage: pcdet-focal run SCRIPT.py' in out.stdout


def test_cli_passes_script_arguments_untouched(fake_pcdet, tmp_path, capsys):
    """Everything after the script, --help and unknown flags included, belongs to it."""
    from pcdet_focal.cli import cli
    script = tmp_path / 'echo_args.py'
    script.write_text('import sys, json\nprint(json.dumps(sys.argv[1:]))\n')
    args = ['--help', '--set', 'A.B', '1', 'doctor', '-x']
    assert cli(['run', str(script), *args]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == args


def test_cli_without_command_prints_help_and_exits_2(capsys):
    from pcdet_focal.cli import cli
    assert cli([]) == 2
    err = capsys.readouterr().err
    assert 'run' in err and 'doctor' in err
    with pytest.raises(SystemExit) as exit_info:
        cli(['--version'])
    assert exit_info.value.code == 0


# ----------------------------------------------------------------------------- backend

def test_resolve_backend(fake_pcdet):
    assert backend.resolve_backend('auto') == 'pcdet'
    assert backend.resolve_backend('pcdet') == 'pcdet'
    assert backend.resolve_backend('standalone') == 'standalone'
    with pytest.raises(ConfigError, match="--backend 'gpu' is unknown"):
        backend.resolve_backend('gpu')


def test_resolve_backend_without_openpcdet(no_pcdet):
    assert backend.resolve_backend('auto') == 'standalone'
    assert backend.resolve_backend('standalone') == 'standalone'
    with pytest.raises(PcdetNotAvailable) as err:
        backend.resolve_backend('pcdet')
    assert err.value.exit_code == 2 and 'not importable' in str(err.value)


def test_resolve_backend_with_unbuilt_ops_falls_back_and_warns(broken_pcdet, caplog):
    with caplog.at_level('WARNING', logger='pcdet_focal.backend'):
        assert backend.resolve_backend('auto') == 'standalone'
    assert 'iou3d_nms_cuda' in caplog.text
    with pytest.raises(PcdetNotAvailable, match='OpenPCDet found but'):
        backend.resolve_backend('pcdet')


def small_cfg(detector='FocalCenterPoint'):
    text = small_model_yaml(detector)
    cfg = EasyDict(yaml.safe_load(text))
    base = EasyDict(yaml.safe_load(KITTI_DATASET_YAML))
    base.update(cfg.DATA_CONFIG)
    del base['_BASE_CONFIG_']
    cfg.DATA_CONFIG = base
    return cfg


def test_backend_pcdet_builds_with_openpcdet(fake_pcdet):
    import pcdet.datasets
    import pcdet.models.detectors
    require_modules(*SMALL_OURS)
    cfg = small_cfg('CenterPoint')  # a detector only OpenPCDet knows
    logger = object()
    ds = backend.build_dataset(cfg.DATA_CONFIG, CLASSES, True, 'pcdet', logger=logger)
    assert type(ds) is pcdet.datasets.KittiDataset
    assert ds.training is True and ds.logger is logger and ds.class_names == CLASSES
    assert str(ds.root_path) == '../data/kitti'  # root_path=None -> DATA_PATH, as OpenPCDet
    assert ds.grid_size.tolist() == [32, 32, 8]
    model = backend.build_network(cfg.MODEL, len(CLASSES), ds, 'pcdet')
    assert type(model) is pcdet.models.detectors.CenterPoint
    built = [(slot, name) for slot, name, _ in pcdet.models.detectors.BUILD_LOG]
    assert ('MAP_TO_BEV', 'SparseHeightCompression') in built
    assert ('BACKBONE_3D', 'DSVTDownsample') in built


def test_backend_pcdet_uses_our_dataset_classes_where_openpcdet_has_none(fake_pcdet):
    ours = [n for n in REGISTRIES['DATASET'].names() if n not in ('KittiDataset',)]
    if not ours:
        pytest.skip('no pcdet_focal dataset registered yet')
    registry.register_into_pcdet(verbose=False)
    import pcdet.datasets
    for name in ours:
        assert pcdet.datasets.__all__[name] is REGISTRIES['DATASET'].get(name)


def test_backend_errors_name_the_field(fake_pcdet):
    cfg = small_cfg()
    cfg.DATA_CONFIG.DATASET = 'NoSuchDataset'
    with pytest.raises(ConfigError, match="DATA_CONFIG.DATASET: unknown module 'NoSuchDataset'"):
        backend.build_dataset(cfg.DATA_CONFIG, CLASSES, True, 'pcdet')
    cfg.MODEL.NAME = 'NoSuchDetector'
    with pytest.raises(ConfigError, match="MODEL.NAME: unknown module 'NoSuchDetector'"):
        backend.build_network(cfg.MODEL, 3, None, 'pcdet')
    with pytest.raises(ConfigError, match='not resolved'):
        backend.build_network(cfg.MODEL, 3, None, 'auto')


def test_backend_standalone_never_touches_openpcdet(fake_pcdet):
    cfg = small_cfg('CenterPoint')
    with pytest.raises(ConfigError, match="MODEL.NAME: unknown module 'CenterPoint'"):
        backend.build_network(cfg.MODEL, 3, None, 'standalone')
    assert not any(m == 'pcdet' or m.startswith('pcdet.') for m in sys.modules)


def test_backend_standalone_dataset_uses_our_builder(fake_pcdet, monkeypatch):
    try:
        import pcdet_focal.data.dataset as data_mod
    except ImportError:
        pytest.skip('pcdet_focal.data.dataset is not written yet')
    seen = {}

    def fake_build(dataset_cfg, class_names, training, logger=None):
        seen.update(cfg=dataset_cfg, names=class_names, training=training, logger=logger)
        return 'built'

    monkeypatch.setattr(data_mod, 'build_dataset', fake_build)
    assert backend.build_dataset({'DATASET': 'X'}, CLASSES, False, 'standalone', 'L') == 'built'
    assert seen == {'cfg': {'DATASET': 'X'}, 'names': CLASSES, 'training': False, 'logger': 'L'}
    assert not any(m == 'pcdet' or m.startswith('pcdet.') for m in sys.modules)


# ----------------------------------------------------------------------------- cfgs/openpcdet

OPENPCDET_CFG = REPO_ROOT / 'cfgs' / 'openpcdet' / 'focalsst_dsvt.yaml'


def test_openpcdet_config_has_the_users_geometry_and_our_model():
    cfg = yaml.safe_load(OPENPCDET_CFG.read_text())
    ours = yaml.safe_load((REPO_ROOT / 'cfgs' / 'focalsst_dsvt.yaml').read_text())
    assert cfg['MODEL'] == ours['MODEL'], 'cfgs/openpcdet/focalsst_dsvt.yaml drifted from ' \
        'cfgs/focalsst_dsvt.yaml'
    assert cfg['CLASS_NAMES'] == ours['CLASS_NAMES']
    data = cfg['DATA_CONFIG']
    assert data['_BASE_CONFIG_'] == 'cfgs/dataset_configs/kitti_dataset.yaml'  # OpenPCDet's
    pcr = np.array(data['POINT_CLOUD_RANGE'], dtype=np.float64)
    voxel = [p for p in data['DATA_PROCESSOR'] if p['NAME'] == 'transform_points_to_voxels']
    grid = np.round((pcr[3:] - pcr[:3]) / np.array(voxel[0]['VOXEL_SIZE'])).astype(int)
    dsvt = cfg['MODEL']['BACKBONE_3D']['DSVT']
    assert grid.tolist() == [500, 200, 175] == dsvt['INPUT_LAYER']['sparse_shape']
    assert dsvt['d_model'][-1] == 128
    assert cfg['MODEL']['BACKBONE_3D']['FOCAL_ENCODER']['NUM_FILTERS'][-1] == \
        dsvt['INPUT_LAYER']['d_model'][0]
    # keys OpenPCDet's build_scheduler reads even for adam_onecycle
    for key in ('DECAY_STEP_LIST', 'LR_DECAY', 'LR_CLIP', 'LR_WARMUP', 'WARMUP_EPOCH', 'MOMS',
                'DIV_FACTOR', 'PCT_START', 'GRAD_NORM_CLIP', 'BATCH_SIZE_PER_GPU', 'NUM_EPOCHS'):
        assert key in cfg['OPTIMIZATION'], key


def test_openpcdet_config_builds_in_an_openpcdet_checkout(fake_pcdet):
    """Copied into tools/cfgs/kitti_models/ of a checkout, loaded by OpenPCDet's loader from
    tools/ and built by OpenPCDet's build_network at the users' full geometry."""
    require_modules(('BACKBONE_3D', 'FocalSSTDSVT'), ('MAP_TO_BEV', 'SparseHeightCompression'),
                    ('DETECTOR', 'FocalCenterPoint'))
    tools = make_checkout(fake_pcdet)
    (tools / 'cfgs' / 'kitti_models' / 'focalsst_dsvt.yaml').write_text(OPENPCDET_CFG.read_text())
    with pytest.raises(SystemExit) as exit_info:
        run_script(tools / 'train_like.py', ['--cfg_file', 'cfgs/kitti_models/focalsst_dsvt.yaml',
                                             '--out', 'full.json'])
    assert exit_info.value.code == 0
    res = json.loads((tools / 'full.json').read_text())
    assert res['grid_size'] == [500, 200, 175]
    assert res['detector'] == 'pcdet_focal.models.detector.FocalCenterPoint'
    assert [m.rsplit('.', 1)[1] for m in res['modules']] == [
        'MeanVFE', 'FocalSSTDSVT', 'SparseHeightCompression', 'BaseBEVBackbone', 'CenterHead']


def test_openpcdet_config_loads_with_our_loader_when_the_dataset_config_exists():
    from pcdet_focal.config import load_config
    if not (REPO_ROOT / 'cfgs' / 'dataset_configs' / 'kitti_dataset.yaml').is_file():
        pytest.skip('cfgs/dataset_configs/kitti_dataset.yaml is not written yet')
    cfg = load_config(OPENPCDET_CFG)
    assert cfg.DATA_CONFIG.DATASET == 'KittiDataset'
    assert cfg.DATA_CONFIG.POINT_CLOUD_RANGE == [0, -20, -3, 100, 20, 4]


# ----------------------------------------------------------------------------- real OpenPCDet

@pytest.mark.skipif(not os.environ.get('PCDET_ROOT'), reason='set PCDET_ROOT to an OpenPCDet '
                    'checkout with its ops built to run against the real thing')
def test_real_openpcdet_builds_and_trains_our_model(tmp_path, monkeypatch):
    """Against a real checkout: OpenPCDet's cfg_from_yaml_file + build_network build the small
    model (our DSVTDownsample + SparseHeightCompression + FocalCenterPoint with OpenPCDet's
    MeanVFE / BaseBEVBackbone / CenterHead); forward + backward on the CPU."""
    require_modules(*SMALL_OURS, ('DETECTOR', 'FocalCenterPoint'))
    root = Path(os.environ['PCDET_ROOT']).resolve()
    tools = tmp_path / 'tools'
    (tools / 'cfgs' / 'kitti_models').mkdir(parents=True)
    (tools / 'cfgs' / 'dataset_configs').mkdir(parents=True)
    # OpenPCDet's real dataset config, read from the checkout
    (tools / 'cfgs' / 'dataset_configs' / 'kitti_dataset.yaml').write_text(
        (root / 'tools' / 'cfgs' / 'dataset_configs' / 'kitti_dataset.yaml').read_text())
    small = small_model_yaml('FocalCenterPoint').replace(
        'DENSE_HEAD: {NAME: CenterHead, CLASS_AGNOSTIC: False}', textwrap.dedent('''\
        DENSE_HEAD:
            NAME: CenterHead
            CLASS_AGNOSTIC: False
            CLASS_NAMES_EACH_HEAD: [['Car', 'Pedestrian', 'Cyclist']]
            SHARED_CONV_CHANNEL: 8
            USE_BIAS_BEFORE_NORM: True
            NUM_HM_CONV: 2
            SEPARATE_HEAD_CFG:
                HEAD_ORDER: ['center', 'center_z', 'dim', 'rot']
                HEAD_DICT: {'center': {'out_channels': 2, 'num_conv': 2},
                            'center_z': {'out_channels': 1, 'num_conv': 2},
                            'dim': {'out_channels': 3, 'num_conv': 2},
                            'rot': {'out_channels': 2, 'num_conv': 2}}
            TARGET_ASSIGNER_CONFIG: {FEATURE_MAP_STRIDE: 1, NUM_MAX_OBJS: 50,
                                     GAUSSIAN_OVERLAP: 0.1, MIN_RADIUS: 2}
            LOSS_CONFIG:
                LOSS_WEIGHTS: {'cls_weight': 1.0, 'loc_weight': 0.25,
                               'code_weights': [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
            POST_PROCESSING: {SCORE_THRESH: 0.1, MAX_OBJ_PER_SAMPLE: 50,
                              POST_CENTER_LIMIT_RANGE: [-10, -10, -10, 10, 10, 10],
                              NMS_CONFIG: {NMS_TYPE: nms_gpu, NMS_THRESH: 0.2,
                                           NMS_PRE_MAXSIZE: 100, NMS_POST_MAXSIZE: 20}}
        ''').replace('\n', '\n    '))
    (tools / 'cfgs' / 'kitti_models' / 'small.yaml').write_text(small)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.chdir(tools)
    monkeypatch.setattr(registry, '_pcdet_host', False)
    try:
        import pcdet.models  # noqa: F401  (imports every compiled op of the checkout)
    except ImportError as err:
        pytest.skip(f'OpenPCDet at {root} does not import ({type(err).__name__}: {err}); build '
                    'its ops (python setup.py develop) or run with PYTHONPATH=tests/pcdet_cpu_ops '
                    '(CPU stand-ins)')
    import torch
    from pcdet.config import cfg, cfg_from_yaml_file
    from pcdet.datasets import DatasetTemplate
    from pcdet.models import build_network
    if not torch.cuda.is_available():
        # OpenPCDet's CenterHead moves a class-id table to CUDA in __init__ (.cuda()): on a
        # CPU-only machine make that call a no-op so the model runs on the CPU
        monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)
    registry.register_into_pcdet()
    cfg_from_yaml_file('cfgs/kitti_models/small.yaml', cfg)
    # training=False: the dataset only tells build_network the grid and point features; a
    # training dataset would build OpenPCDet's gt_sampling, which needs the KITTI database files
    ds = DatasetTemplate(dataset_cfg=cfg.DATA_CONFIG, class_names=cfg.CLASS_NAMES,
                         training=False, root_path=tmp_path, logger=None)
    model = build_network(model_cfg=cfg.MODEL, num_class=3, dataset=ds)
    assert type(model).__name__ == 'FocalCenterPoint'
    names = [type(m).__name__ for m in model.module_list]
    assert names == ['MeanVFE', 'DSVTDownsample', 'SparseHeightCompression', 'BaseBEVBackbone',
                     'CenterHead']
    rng = np.random.default_rng(0)
    lin = rng.choice(32 * 32 * 8, 30, replace=False)
    coords = np.stack([np.repeat([0, 1], 15), lin // 1024, lin // 32 % 32, lin % 32], 1)
    batch = {'voxels': torch.randn(30, 5, 4), 'voxel_num_points': torch.full((30,), 5.0),
             'voxel_coords': torch.from_numpy(coords.astype(np.float32)), 'batch_size': 2,
             'gt_boxes': torch.tensor([[[3.0, 0.0, 0.0, 3.9, 1.6, 1.5, 0.3, 1]],
                                       [[2.0, 1.0, 0.0, 0.8, 0.6, 1.7, 0.0, 2]]])}
    model.train()
    ret, tb, _ = model(batch)
    ret['loss'].backward()
    assert torch.isfinite(ret['loss'])
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.map_to_bev_module.parameters())
