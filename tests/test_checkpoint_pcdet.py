"""OpenPCDet drop-in, end to end: its checkpoints, its scripts, its batch types (issue 13).

Normal suite (no OpenPCDet needed):

- a checkpoint built the way OpenPCDet's ``checkpoint_state`` + ``save_checkpoint``
  (tools/train_utils/train_utils.py) build it: ``{epoch, it, model_state, optimizer_state,
  version}`` with ``version = 'pcdet+0.6.0+8caccce'``, legacy (non-zip) serialization, and the
  optimizer of its ``adam_onecycle``: torch Adam over the parameters of the leaf modules, split
  into a non-norm and a norm group, lr and betas[0] set by its numpy one-cycle schedule
  (``np.float64``). It loads with weights_only, is evaluated by tools/test.py and resumed by
  tools/train.py --ckpt from its epoch;
- a checkpoint that cannot be loaded stops the run with its whole cause: in our trainer, and
  through the detector's ``load_params_with_optimizer``, which OpenPCDet's train.py calls inside
  a bare ``except:`` (the loop is written out here);
- ``load_data_to_device`` against OpenPCDet's ``load_data_to_gpu``, written out key by key.

PCDET_ROOT suite: the README's "Inside an existing OpenPCDet checkout" flow on the CPU, in a tmp
copy of the checkout at PCDET_ROOT (its code untouched; tests/pcdet_cpu_ops stands in for the
compiled ops that are not built): kitti_mini prepared by its ``create_kitti_infos`` (blank
KITTI-size PNGs give it the image_2 sizes), ``pcdet-focal run train.py``, the checkpoint evaluated
by its test.py and by our tools/test.py --backend pcdet, resumed automatically and with --ckpt,
a corrupt newest checkpoint stopping its train.py; ``load_data_to_device`` against its
``load_data_to_gpu`` on a real KittiDataset batch. Skips with the reason when OpenPCDet cannot
be imported.
"""
import glob
import hashlib
import json
import logging
import os
import runpy
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import engine_toys  # noqa: F401  (registers ToyDataset / ToyDetector)
from conftest import KITTI_MINI
from pcdet_focal.config import apply_set, load_config
from pcdet_focal.engine.checkpoint import (build_checkpoint, find_latest_checkpoint,
                                           load_checkpoint, load_optimizer_state,
                                           refuse_training, save_checkpoint, training_refused)
from pcdet_focal.engine.optim import build_optimizer, build_scheduler
from pcdet_focal.engine.trainer import TrainOptions, _resume
from pcdet_focal.engine.utils import load_data_to_device
from pcdet_focal.errors import CheckpointError, InputError
from test_engine import run_train, toy_cfg

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / 'tests'
CPU_OPS = TESTS / 'pcdet_cpu_ops'
OPENPCDET_VERSION = 'pcdet+0.6.0+8caccce'
DEMO_CFG = REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml'
SMALL_FRAMES = ['DATA_CONFIG.NUM_FRAMES', "{'train': 4, 'test': 2}"]
log = logging.getLogger('test_checkpoint_pcdet')


# ----------------------------------------------------------------------------- OpenPCDet's shape

def openpcdet_optimizer(model):
    """torch Adam laid out like OpenPCDet's adam_onecycle (fastai OptimWrapper): the trainable
    parameters of the leaf modules, norm layers' in a second group."""
    other, norm = [], []
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(module, nn.modules.batchnorm._BatchNorm) else other).extend(params)
    return torch.optim.Adam([{'params': other, 'lr': 0.0}, {'params': norm, 'lr': 0.0}],
                            betas=(0.9, 0.99))


def onecycle_step(optimizer, lr=0.0012, mom=0.93):
    """One optimizer step with the hyper-parameters OpenPCDet's OneCycle writes: np.float64 lr
    and betas[0] (its schedule computes them with numpy), betas[1] a float."""
    for group in optimizer.param_groups:
        group['lr'] = np.float64(lr)
        group['betas'] = (np.float64(mom), 0.99)
        for p in group['params']:
            p.grad = torch.randn_like(p) * 1e-2
    optimizer.step()


def write_openpcdet_checkpoint(path, model, optimizer, epoch, it, with_optimizer=True):
    """``checkpoint_state`` + ``save_checkpoint`` of OpenPCDet's train_utils, for ``model``."""
    state = {'epoch': epoch, 'it': it, 'model_state': model.state_dict(),
             'optimizer_state': optimizer.state_dict() if optimizer is not None else None,
             'version': OPENPCDET_VERSION}
    if not with_optimizer:
        del state['optimizer_state']
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return Path(path)


def small_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize('written_by', ['numpy 2', 'numpy 1'])
def test_openpcdet_checkpoint_loads_with_weights_only(tmp_path, written_by):
    """numpy float64 lr / betas in optimizer_state, legacy serialization, its version string."""
    model = small_model()
    opt = openpcdet_optimizer(model)
    onecycle_step(opt)
    path = write_openpcdet_checkpoint(tmp_path / 'checkpoint_epoch_3.pth', model, opt, 3, 120)
    data = path.read_bytes()
    assert data[:2] != b'PK'  # legacy format, not a zip archive
    assert b'numpy._core.multiarray\nscalar' in data  # what makes weights_only refuse it
    if written_by == 'numpy 1':  # numpy < 2 names the same function numpy.core.multiarray.scalar
        if tuple(int(p) for p in torch.__version__.split('.')[:2]) < (2, 6):
            pytest.skip('torch < 2.6 cannot allow a global under a second name')
        path.write_bytes(data.replace(b'numpy._core.multiarray\nscalar',
                                      b'numpy.core.multiarray\nscalar'))
    ckpt = load_checkpoint(path)
    assert ckpt['version'] == OPENPCDET_VERSION and ckpt['epoch'] == 3 and ckpt['it'] == 120
    group = ckpt['optimizer_state']['param_groups'][0]
    assert type(group['lr']) is np.float64 and group['lr'] == np.float64(0.0012)
    assert type(group['betas'][0]) is np.float64 and group['betas'] == (0.93, 0.99)
    assert same_tensors(ckpt['model_state'], model.state_dict())


def test_openpcdet_checkpoint_without_optimizer_state(tmp_path):
    model = small_model()
    path = write_openpcdet_checkpoint(tmp_path / 'a.pth', model, None, 1, 5, with_optimizer=False)
    ckpt = load_checkpoint(path)
    assert ckpt.get('optimizer_state') is None and same_tensors(ckpt['model_state'],
                                                                model.state_dict())
    # optimizer_state None, the state in <name>_optim.pth beside it (OpenPCDet's other layout)
    opt = openpcdet_optimizer(model)
    onecycle_step(opt)
    path = write_openpcdet_checkpoint(tmp_path / 'b.pth', model, None, 1, 5)
    torch.save({'optimizer_state': opt.state_dict()}, tmp_path / 'b_optim.pth',
               _use_new_zipfile_serialization=False)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt['optimizer_state']['state'][0]['exp_avg'],
                       opt.state_dict()['state'][0]['exp_avg'])


def _one_line_error(path):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert '\n' not in msg and str(path) in msg
    return msg


def test_load_errors_give_the_whole_cause_in_one_line(tmp_path):
    evil = tmp_path / 'evil.pth'
    torch.save({'model_state': {}, 'payload': os.system}, evil)  # weights_only refuses code
    msg = _one_line_error(evil)
    # torch's cause comes after its advice; the first line alone never said what was wrong
    assert f'GLOBAL {os.system.__module__}.system' in msg and 'Weights only' not in msg
    assert 'weights_only=True' in msg and 'weights_only=False' not in msg
    good = save_checkpoint(build_checkpoint(small_model()), tmp_path / 'good.pth')
    (tmp_path / 'cut.pth').write_bytes(good.read_bytes()[:200])
    assert 'PytorchStreamReader failed reading zip archive' in _one_line_error(
        tmp_path / 'cut.pth')
    legacy = write_openpcdet_checkpoint(tmp_path / 'legacy.pth', small_model(), None, 1, 1)
    (tmp_path / 'legacy_cut.pth').write_bytes(legacy.read_bytes()[:300])
    assert 'not a readable checkpoint: ' in _one_line_error(tmp_path / 'legacy_cut.pth')
    torch.save({'epoch': 1}, tmp_path / 'no_model.pth')
    assert 'no model_state' in _one_line_error(tmp_path / 'no_model.pth')


# ----------------------------------------------------------------------------- our trainer

def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()}


def test_unreadable_newest_checkpoint_stops_the_run(tmp_path):
    """Never a silent fresh start (nor a fall back to an older checkpoint)."""
    cfg = toy_cfg(tmp_path, frames=8, epochs=1)
    run_train(cfg, tmp_path / 'out', no_eval=True)
    ckpt_dir = tmp_path / 'out' / 'toy' / 'default' / 'ckpt'
    first = ckpt_dir / 'checkpoint_epoch_1.pth'
    good = first.read_bytes()
    newer = ckpt_dir / 'checkpoint_epoch_2.pth'
    newer.write_bytes(good[:150])  # an interrupted copy, say
    os.utime(newer, (first.stat().st_mtime + 5,) * 2)
    before = digests(ckpt_dir)
    with pytest.raises(CheckpointError) as err:
        find_latest_checkpoint(ckpt_dir)
    assert 'checkpoint_epoch_2.pth' in str(err.value)
    with pytest.raises(CheckpointError) as err:
        run_train(cfg, tmp_path / 'out', epochs=3, no_eval=True)
    msg = str(err.value)
    assert '\n' not in msg and 'checkpoint_epoch_2.pth: not a readable checkpoint' in msg
    assert 'PytorchStreamReader failed reading zip archive' in msg
    assert 'stops instead of starting over' in msg and 'move checkpoint_epoch_2.pth' in msg
    assert digests(ckpt_dir) == before  # nothing trained, nothing written


def toy_parts(tmp_path, total_steps=20):
    cfg = load_config(toy_cfg(tmp_path))
    model = engine_toys.ToyDetector(cfg.MODEL, 1, None)
    opt = build_optimizer(model, cfg.OPTIMIZATION)
    return cfg, model, opt, build_scheduler(opt, cfg.OPTIMIZATION, total_steps)


def test_resume_from_openpcdet_checkpoint_in_our_optimizer_layout(tmp_path):
    """numpy values in the groups, no scheduler state: moments restored, numbers made plain,
    the one-cycle LR continues at the saved step (checked against a schedule stepped there)."""
    cfg, model, opt, _ = toy_parts(tmp_path)
    onecycle_step(opt)
    path = write_openpcdet_checkpoint(tmp_path / 'checkpoint_epoch_2.pth', model, opt, 2, 6)
    torch.manual_seed(5)
    _, model2, opt2, sched2 = toy_parts(tmp_path)
    epoch, step, epoch_it = _resume(TrainOptions(cfg_file='x', ckpt=str(path)), tmp_path,
                                    model2, opt2, sched2, torch.amp.GradScaler('cuda',
                                                                               enabled=False), log)
    assert (epoch, step, epoch_it) == (2, 6, 0)
    assert same_tensors(model2.state_dict(), model.state_dict())
    assert torch.equal(opt2.state_dict()['state'][0]['exp_avg'],
                       opt.state_dict()['state'][0]['exp_avg'])
    _, _, ref_opt, ref_sched = toy_parts(tmp_path)
    for _ in range(6):
        ref_opt.step()
        ref_sched.step()
    for group, ref in zip(opt2.param_groups, ref_opt.param_groups):
        assert type(group['lr']) is float and group['lr'] == pytest.approx(ref['lr'], rel=1e-12)
        assert group['betas'][0] == pytest.approx(ref['betas'][0], rel=1e-12)
        assert 'max_lr' in group and 'initial_lr' in group  # the scheduler's own keys kept


def test_optimizer_state_for_other_groups_is_not_applied(tmp_path, caplog):
    """OpenPCDet's optimizer groups parameters differently: a clear warning, a fresh state."""
    model = small_model()
    theirs = openpcdet_optimizer(model)
    onecycle_step(theirs)
    ours = build_optimizer(model, load_config(toy_cfg(tmp_path)).OPTIMIZATION)
    with caplog.at_level(logging.WARNING, logger='pcdet_focal'):
        assert not load_optimizer_state(ours, theirs.state_dict(), 'x.pth')
    assert 'x.pth: optimizer state not restored' in caplog.text
    assert ours.state_dict()['state'] == {}
    twin = openpcdet_optimizer(small_model())
    assert load_optimizer_state(twin, theirs.state_dict(), 'x.pth')
    assert torch.equal(twin.state_dict()['state'][1]['exp_avg_sq'],
                       theirs.state_dict()['state'][1]['exp_avg_sq'])


# ----------------------------------------------------------------------------- the detector

@pytest.fixture(scope='module')
def demo():
    """The demo config (FocalCenterPoint at 128 x 128 x 16) with 4 + 2 synthetic frames, its
    dataset and a builder of fresh models."""
    from pcdet_focal.builder import build_network
    from pcdet_focal.data.dataset import build_dataset
    cfg = load_config(DEMO_CFG)
    apply_set(cfg, SMALL_FRAMES)
    dataset = build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, True)

    def build(seed):
        torch.manual_seed(seed)
        return build_network(cfg.MODEL, len(cfg.CLASS_NAMES), dataset)

    return SimpleNamespace(cfg=cfg, dataset=dataset, build=build)


def test_detector_resumes_openpcdet_checkpoint(tmp_path, demo):
    """What OpenPCDet's train.py --ckpt and test.py call on our detector."""
    saved = demo.build(1)
    opt = openpcdet_optimizer(saved)
    onecycle_step(opt)
    path = write_openpcdet_checkpoint(tmp_path / 'checkpoint_epoch_3.pth', saved, opt, 3, 12)
    model = demo.build(2)
    assert not same_tensors(model.state_dict(), saved.state_dict())
    opt2 = openpcdet_optimizer(model)
    assert model.load_params_with_optimizer(str(path), optimizer=opt2, logger=log) == (12, 3)
    assert same_tensors(model.state_dict(), saved.state_dict())
    for (_, a), (_, b) in zip(sorted(opt.state_dict()['state'].items()),
                              sorted(opt2.state_dict()['state'].items())):
        assert torch.equal(a['exp_avg'], b['exp_avg'])
    assert type(opt2.param_groups[0]['lr']) is float
    fresh = demo.build(3)
    fresh.load_params_from_file(str(path), logger=log)
    assert same_tensors(fresh.state_dict(), saved.state_dict())


def test_openpcdet_auto_resume_cannot_start_over(tmp_path, demo):
    """OpenPCDet's train.py, written out: newest checkpoint first, a bare ``except:`` moving to
    the older one, epoch 0 when none loads. Our detector refuses the older one too and its first
    training forward raises the cause: nothing is trained or saved."""
    model = demo.build(1)
    opt = openpcdet_optimizer(model)
    write_openpcdet_checkpoint(tmp_path / 'checkpoint_epoch_1.pth', model, opt, 1, 4)
    bad = tmp_path / 'checkpoint_epoch_2.pth'
    bad.write_bytes((tmp_path / 'checkpoint_epoch_1.pth').read_bytes()[:500])
    os.utime(bad, ((tmp_path / 'checkpoint_epoch_1.pth').stat().st_mtime + 5,) * 2)
    model = demo.build(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = openpcdet_optimizer(model)

    start_epoch = it = 0
    ckpt_list = glob.glob(str(tmp_path / '*.pth'))
    ckpt_list.sort(key=os.path.getmtime)
    while len(ckpt_list) > 0:
        try:
            it, start_epoch = model.load_params_with_optimizer(ckpt_list[-1], optimizer=opt,
                                                               logger=log)
            break
        except:  # noqa: E722  (OpenPCDet's train.py)
            ckpt_list = ckpt_list[:-1]

    assert (start_epoch, it) == (0, 0)  # OpenPCDet would now train from epoch 0 ...
    assert same_tensors(model.state_dict(), before)  # ... the older checkpoint was refused
    model.train()
    with pytest.raises(CheckpointError) as err:  # ... and cannot: the first step stops it
        model({'batch_size': 1})
    msg = str(err.value)
    assert 'checkpoint_epoch_2.pth: not a readable checkpoint' in msg and 'training refused' in msg
    assert '\n' not in msg and training_refused(model) == msg
    model.eval()  # evaluation is not refused (it fails here only on the empty batch)
    with pytest.raises(InputError, match='batch_size'):
        model({})


def test_refuse_training_keeps_the_first_reason():
    model = nn.Linear(2, 1)
    refuse_training(model, 'first')
    refuse_training(model, 'second')
    assert training_refused(model) == 'first'
    with pytest.raises(CheckpointError, match='^first$'):
        model(torch.zeros(1, 2))
    model.eval()
    assert model(torch.zeros(1, 2)).shape == (1, 1)


# OpenPCDet's adam_onecycle (OptimWrapper.create over flatten_model) hands the optimizer the
# parameters of leaf modules only: a parameter on a module that also has children would never be
# trained by its train.py (models/leaf.py keeps ours on leaves).
def test_openpcdets_adam_onecycle_reaches_every_parameter(demo):
    model = demo.build(1)
    reached = {id(p) for g in openpcdet_optimizer(model).param_groups for p in g['params']}
    missed = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]
    assert missed == []


# ----------------------------------------------------------------------------- our tools

def run_tool(name, args, monkeypatch, capfd):
    """``python tools/<name> ARGS`` in this process (the CLI's own code path, without another
    interpreter start-up); returns (exit code, stderr)."""
    monkeypatch.syspath_prepend(str(REPO / 'tools'))  # its `import _init_path`
    monkeypatch.setattr(sys, 'argv', [name, *map(str, args)])
    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / 'tools' / name), run_name='__main__')
    finally:  # other tests import another checkout's tools/_init_path
        sys.modules.pop('_init_path', None)
    return done.value.code, capfd.readouterr().err


def test_openpcdet_shaped_checkpoint_evaluated_and_resumed_by_our_tools(tmp_path, demo,
                                                                      monkeypatch, capfd):
    """Acceptance: numpy float64 lr / betas in optimizer_state; tools/test.py evaluates it,
    tools/train.py --ckpt continues from its epoch (epoch 2 only; 2 steps of 2 frames)."""
    saved = demo.build(1)
    opt = openpcdet_optimizer(saved)
    onecycle_step(opt)
    path = write_openpcdet_checkpoint(tmp_path / 'from_openpcdet.pth', saved, opt, 1, 2)
    code, err = run_tool('test.py', ['--cfg', DEMO_CFG, '--ckpt', path, '--workers', 0,
                                     '--output_dir', tmp_path / 'eval', '--no_progress',
                                     '--set', *SMALL_FRAMES], monkeypatch, capfd)
    assert code == 0, err[-3000:]
    result = tmp_path / 'eval' / 'focalsst_dsvt_demo' / 'default' / 'eval' / path.stem
    aps = json.loads((result / 'result.json').read_text())
    assert aps and all(0.0 <= v <= 100.0 for v in aps.values())
    assert f'checkpoint {path} (epoch 1) on 2 frames' in err

    code, err = run_tool('train.py', ['--cfg', DEMO_CFG, '--ckpt', path, '--epochs', 2,
                                      '--batch_size', 2, '--workers', 0, '--skip_mem_check',
                                      '--no_eval', '--no_progress', '--output_dir',
                                      tmp_path / 'train', '--set', *SMALL_FRAMES],
                         monkeypatch, capfd)
    assert code == 0, err[-3000:]
    assert f'resumed from {path} (epoch 1, step 2)' in err
    assert 'optimizer state not restored' in err  # OpenPCDet's groups are not ours
    ckpts = tmp_path / 'train' / 'focalsst_dsvt_demo' / 'default' / 'ckpt'
    assert sorted(p.name for p in ckpts.iterdir()) == ['checkpoint_epoch_2.pth']
    final = load_checkpoint(ckpts / 'checkpoint_epoch_2.pth')
    assert (final['epoch'], final['it']) == (2, 4)  # 2 saved steps + 2 of epoch 2


# ----------------------------------------------------------------------------- device transfer

def _batch():
    """A collated batch with every kind of key OpenPCDet's load_data_to_gpu treats apart."""
    return {
        'points': np.arange(10, dtype=np.float64).reshape(2, 5),
        'voxels': np.ones((3, 2, 4), np.float32),
        'voxel_coords': np.array([[0, 1, 2, 3], [1, 0, 0, 0], [1, 2, 2, 2]], np.int32),
        'voxel_num_points': np.array([1, 2, 2], np.int32),
        'gt_boxes': np.zeros((2, 1, 8), np.float32),
        'image_shape': np.array([[375, 1242], [370, 1224]], np.int64),
        'use_lead_xyz': np.array([True, True]),
        'road_plane': np.array([[0.0, 0.0, 1.0, 1.7]] * 2),
        'images': np.zeros((2, 4, 6, 3), np.uint8),
        'camera_imgs': torch.zeros(2, 1, 3, 4, 6),
        'frame_id': np.array(['000001', '000002']),
        'calib': np.array([object(), object()], dtype=object),
        'metadata': [{'a': 1}, {'a': 2}],
        'ori_shape': np.array([[375, 1242]]),
        'image_paths': ['a.png', 'b.png'],
        'img_process_infos': np.array([[1.0, 2.0]]),
        'batch_size': 2,
    }


# OpenPCDet's load_data_to_gpu (pcdet/models/__init__.py, 8caccce), written out key by key:
# (tensor or not, dtype, shape).
EXPECTED_TRANSFER = {
    'points': (True, torch.float32, (2, 5)),
    'voxels': (True, torch.float32, (3, 2, 4)),
    'voxel_coords': (True, torch.float32, (3, 4)),
    'voxel_num_points': (True, torch.float32, (3,)),
    'gt_boxes': (True, torch.float32, (2, 1, 8)),
    'image_shape': (True, torch.int32, (2, 2)),
    'use_lead_xyz': (True, torch.float32, (2,)),
    'road_plane': (True, torch.float32, (2, 4)),
    'images': (True, torch.float32, (2, 3, 4, 6)),  # kornia.image_to_tensor: B, C, H, W
    'camera_imgs': (True, torch.float32, (2, 1, 3, 4, 6)),
    'frame_id': (False, None, (2,)),
    'calib': (False, None, (2,)),
    'metadata': (False, None, None),
    'ori_shape': (False, None, (1, 2)),
    'image_paths': (False, None, None),
    'img_process_infos': (False, None, (1, 2)),
    'batch_size': (False, None, None),
}


def describe(batch):
    return {k: (torch.is_tensor(v), v.dtype if torch.is_tensor(v) else None,
                tuple(v.shape) if hasattr(v, 'shape') else None) for k, v in batch.items()}


def test_load_data_to_device_matches_openpcdets_load_data_to_gpu():
    batch = _batch()
    moved = load_data_to_device(_batch(), 'cpu')
    assert describe(moved) == EXPECTED_TRANSFER
    for key in ('points', 'voxel_coords', 'image_shape', 'road_plane'):
        np.testing.assert_array_equal(moved[key].numpy(),
                                      batch[key].astype(moved[key].numpy().dtype))
    assert moved['frame_id'] is not batch['frame_id'] and moved['batch_size'] == 2
    assert moved['images'].is_contiguous()


# ============================================================================= PCDET_ROOT suite

PCDET_ROOT = os.environ.get('PCDET_ROOT')
PROBE = 'import pcdet, pcdet.models, pcdet.datasets; print(pcdet.__version__)'
FLOW_CFG = 'cfgs/kitti_models/focalsst_dsvt_mini.yaml'
FLOW_OUT = ('output', 'kitti_models', 'focalsst_dsvt_mini')
KITTI_IMAGE = (1242, 375)  # width, height of a KITTI image_2 frame


def blank_png(path, size=KITTI_IMAGE):
    """A black RGB PNG of ``size`` (width, height): all create_kitti_infos reads is its size."""
    width, height = size
    rows = b''.join(b'\x00' + bytes(3 * width) for _ in range(height))

    def chunk(tag, data):
        return (struct.pack('>I', len(data)) + tag + data
                + struct.pack('>I', zlib.crc32(tag + data)))

    path.write_bytes(b'\x89PNG\r\n\x1a\n'
                     + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def flow_config():
    """The demo model (FocalCenterPoint: FocalSST -> DSVT -> SparseHeightCompression, with
    OpenPCDet's own MeanVFE / BaseBEVBackbone / CenterHead) on OpenPCDet's kitti_dataset.yaml:
    gt_sampling without road planes (kitti_mini has none), 2 epochs of batch 2."""
    demo_cfg = yaml.safe_load(DEMO_CFG.read_text())
    optimization = yaml.safe_load((REPO / 'cfgs' / 'openpcdet' / 'focalsst_dsvt.yaml')
                                  .read_text())['OPTIMIZATION']
    optimization.update(BATCH_SIZE_PER_GPU=2, NUM_EPOCHS=2)
    voxels = [p for p in demo_cfg['DATA_CONFIG']['DATA_PROCESSOR']
              if p['NAME'] == 'transform_points_to_voxels'][0]
    return {
        'CLASS_NAMES': demo_cfg['CLASS_NAMES'],
        'DATA_CONFIG': {
            '_BASE_CONFIG_': 'cfgs/dataset_configs/kitti_dataset.yaml',
            'POINT_CLOUD_RANGE': demo_cfg['DATA_CONFIG']['POINT_CLOUD_RANGE'],
            'DATA_AUGMENTOR': {'DISABLE_AUG_LIST': ['placeholder'], 'AUG_CONFIG_LIST': [
                {'NAME': 'gt_sampling', 'USE_ROAD_PLANE': False,
                 'DB_INFO_PATH': ['kitti_dbinfos_train.pkl'],
                 'PREPARE': {'filter_by_min_points': ['Car:5', 'Pedestrian:5', 'Cyclist:5'],
                             'filter_by_difficulty': [-1]},
                 # every group needs database entries left after the filters, or its sampler
                 # stops on np.stack([]): kitti_mini's only Cyclist has difficulty -1
                 'SAMPLE_GROUPS': ['Car:5', 'Pedestrian:5'],
                 'NUM_POINT_FEATURES': 4, 'DATABASE_WITH_FAKELIDAR': False,
                 'REMOVE_EXTRA_WIDTH': [0.0, 0.0, 0.0], 'LIMIT_WHOLE_SCENE': True},
                {'NAME': 'random_world_flip', 'ALONG_AXIS_LIST': ['x']}]},
            'DATA_PROCESSOR': [
                {'NAME': 'mask_points_and_boxes_outside_range', 'REMOVE_OUTSIDE_BOXES': True},
                {'NAME': 'shuffle_points', 'SHUFFLE_ENABLED': {'train': True, 'test': False}},
                voxels],
        },
        'MODEL': demo_cfg['MODEL'],
        'OPTIMIZATION': optimization,
    }


@pytest.fixture(scope='module')
def openpcdet(tmp_path_factory):
    """A tmp copy of the checkout at PCDET_ROOT (its pcdet/ and tools/) with kitti_mini in
    data/kitti prepared by its own create_kitti_infos, and the flow's config in its tools/cfgs."""
    if not PCDET_ROOT:
        pytest.skip('set PCDET_ROOT to an OpenPCDet checkout to run the drop-in flow')
    if not (KITTI_MINI / 'training' / 'velodyne').is_dir():
        pytest.skip(f'kitti_mini not found at {KITTI_MINI}')
    exe = Path(sys.executable).parent / 'pcdet-focal'
    if not exe.exists():
        pytest.skip('the pcdet-focal console script is not installed in this environment')
    src = Path(PCDET_ROOT).resolve()
    root = tmp_path_factory.mktemp('checkout') / 'OpenPCDet'
    for sub in ('pcdet', 'tools'):
        shutil.copytree(src / sub, root / sub, ignore=shutil.ignore_patterns('__pycache__'))
    # stand-ins first (sitecustomize: only ops that were not built), then the copy, then us
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CPU_OPS), str(root), str(REPO)]))
    env.pop('PCDET_FOCAL_PLUGINS', None)
    probe = subprocess.run([sys.executable, '-c', PROBE], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        cause = (probe.stderr.strip().splitlines() or ['no output'])[-1]
        hint = (' (pcdet/version.py is written by `python setup.py develop` in the checkout)'
                if 'pcdet.version' in cause else '')
        pytest.skip(f'OpenPCDet at {src} cannot be imported: {cause}{hint}')

    data = root / 'data' / 'kitti'
    shutil.copytree(KITTI_MINI / 'ImageSets', data / 'ImageSets')
    (data / 'ImageSets' / 'test.txt').write_text('')  # create_kitti_infos also reads a test split
    for sub in ('velodyne', 'label_2', 'calib'):
        shutil.copytree(KITTI_MINI / 'training' / sub, data / 'training' / sub)
    (data / 'training' / 'image_2').mkdir()
    for label in (data / 'training' / 'label_2').iterdir():
        blank_png(data / 'training' / 'image_2' / f'{label.stem}.png')
    prep = subprocess.run([sys.executable, '-m', 'pcdet.datasets.kitti.kitti_dataset',
                           'create_kitti_infos', 'tools/cfgs/dataset_configs/kitti_dataset.yaml'],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert prep.returncode == 0, prep.stderr[-3000:]
    for name in ('kitti_infos_train.pkl', 'kitti_infos_val.pkl', 'kitti_dbinfos_train.pkl'):
        assert (data / name).is_file(), name
    (root / 'tools' / FLOW_CFG).write_text(yaml.safe_dump(flow_config(), sort_keys=False))
    return SimpleNamespace(root=root, tools=root / 'tools', env=env, exe=str(exe), data=data,
                           out=root.joinpath(*FLOW_OUT), version=probe.stdout.strip())


def run_script(openpcdet, script, *args, timeout=1800):
    """``pcdet-focal run SCRIPT ARGS`` from the checkout's tools/, as the README says."""
    return subprocess.run([openpcdet.exe, 'run', script, *map(str, args)], cwd=openpcdet.tools,
                          env=openpcdet.env, capture_output=True, text=True, timeout=timeout)


def train_args(tag, *extra):
    return ['--cfg_file', FLOW_CFG, '--workers', 0, '--extra_tag', tag, '--wo_gpu_stat',
            '--fix_random_seed', *extra]


@pytest.fixture(scope='module')
def trained(openpcdet):
    """`pcdet-focal run train.py` for 2 epochs (3 training frames, batch 2: 2 steps each)."""
    res = run_script(openpcdet, 'train.py', *train_args('flow'))
    assert res.returncode == 0, res.stderr[-5000:]
    run = openpcdet.out / 'flow'
    return SimpleNamespace(res=res, run=run, ckpt=run / 'ckpt')


def test_pcdet_train_writes_openpcdet_checkpoints(openpcdet, trained):
    """OpenPCDet's own save_checkpoint + OneCycle optimizer wrote them: numpy float64 lr."""
    assert sorted(p.name for p in trained.ckpt.iterdir()) == ['checkpoint_epoch_1.pth',
                                                               'checkpoint_epoch_2.pth']
    ckpt = load_checkpoint(trained.ckpt / 'checkpoint_epoch_2.pth')
    assert ckpt['version'] == 'pcdet+' + openpcdet.version and (ckpt['epoch'], ckpt['it']) == (2, 4)
    assert type(ckpt['optimizer_state']['param_groups'][0]['lr']) is np.float64
    assert 'scheduler_state' not in ckpt
    log_text = ''.join(p.read_text() for p in trained.run.glob('train_*.log'))
    assert 'FocalCenterPoint' in log_text
    # train.py ends with its own evaluation of the last checkpoint (test.py's repeat_eval_ckpt)
    assert 'Car AP@0.70, 0.70, 0.70' in log_text


def test_pcdet_train_updates_every_parameter_of_our_modules(trained, demo):
    """Epoch 1 -> 2 of the real train.py: every parameter of our BACKBONE_3D and MAP_TO_BEV
    changed (OpenPCDet's MeanVFE / BaseBEVBackbone / CenterHead are its own)."""
    # checkpoint keys of the parameters (keep_vars: the Parameter objects, under their saved name)
    ours = [k for k, v in demo.build(1).state_dict(keep_vars=True).items()
            if isinstance(v, nn.Parameter) and k.startswith(('backbone_3d.', 'map_to_bev_module.'))]
    first = load_checkpoint(trained.ckpt / 'checkpoint_epoch_1.pth')['model_state']
    second = load_checkpoint(trained.ckpt / 'checkpoint_epoch_2.pth')['model_state']
    assert ours and all(name in first for name in ours)
    assert [n for n in ours if torch.equal(first[n], second[n])] == []


def _predictions(folder):
    return {p.name: p.read_text() for p in sorted(Path(folder).glob('*.txt'))}


def test_pcdet_checkpoint_evaluated_by_openpcdets_test_py_and_ours(openpcdet, trained):
    ckpt = trained.ckpt / 'checkpoint_epoch_2.pth'
    res = run_script(openpcdet, 'test.py', '--cfg_file', FLOW_CFG, '--ckpt', ckpt,
                     '--extra_tag', 'flow', '--workers', 0, '--batch_size', 1, '--save_to_file')
    assert res.returncode == 0, res.stderr[-5000:]
    theirs = trained.run / 'eval' / 'epoch_2' / 'val' / 'default'
    eval_log = ''.join(p.read_text() for p in theirs.glob('log_eval_*.txt'))
    assert 'Car AP@0.70, 0.70, 0.70' in eval_log and 'Evaluation done' in eval_log
    assert '==> loaded ' in eval_log and 'checkpoint version pcdet+' in eval_log

    ours = subprocess.run([sys.executable, str(REPO / 'tools' / 'test.py'), '--cfg', FLOW_CFG,
                           '--ckpt', str(ckpt), '--backend', 'pcdet', '--workers', '0',
                           '--batch_size', '1', '--save_to_file', '--no_progress',
                           '--output_dir', str(openpcdet.root / 'ours')],
                          cwd=openpcdet.tools, env=openpcdet.env, capture_output=True, text=True,
                          timeout=1800)
    assert ours.returncode == 0, ours.stderr[-5000:]
    assert 'backend: pcdet' in ours.stderr and 'Car AP@0.70, 0.70, 0.70' in ours.stderr
    mine = (openpcdet.root / 'ours' / 'focalsst_dsvt_mini' / 'default' / 'eval'
            / 'checkpoint_epoch_2' / 'final_result' / 'data')
    # same model, same frames, same OpenPCDet dataset code: the same predictions, as text
    assert _predictions(mine) == _predictions(theirs / 'final_result' / 'data')
    assert list(_predictions(mine)) == ['000003.txt']


def _copy_run(trained, tag):
    dst = trained.run.parent / tag / 'ckpt'
    shutil.copytree(trained.ckpt, dst)
    for i, path in enumerate(sorted(dst.iterdir())):  # keep the epochs' order in time
        os.utime(path, (1_000_000 + i,) * 2)
    return dst


def test_pcdet_automatic_resume_continues_from_saved_epoch(openpcdet, trained):
    ckpt = _copy_run(trained, 'resume')
    before = digests(ckpt)
    res = run_script(openpcdet, 'train.py', *train_args('resume', '--epochs', 3))
    assert res.returncode == 0, res.stderr[-5000:]
    log_text = ''.join(p.read_text() for p in (ckpt.parent).glob('train_*.log'))
    assert f'==> resumed from {ckpt / "checkpoint_epoch_2.pth"} (epoch 2, it 4' in log_text
    after = load_checkpoint(ckpt / 'checkpoint_epoch_3.pth')
    assert (after['epoch'], after['it']) == (3, 6)  # one more epoch of 2 steps, not three
    assert {k: v for k, v in digests(ckpt).items() if k in before} == before


def test_pcdet_ckpt_flag_resume(openpcdet, trained):
    res = run_script(openpcdet, 'train.py', *train_args(
        'ckpt_flag', '--epochs', 3, '--ckpt', trained.ckpt / 'checkpoint_epoch_2.pth'))
    assert res.returncode == 0, res.stderr[-5000:]
    ckpt = trained.run.parent / 'ckpt_flag' / 'ckpt'
    assert sorted(p.name for p in ckpt.iterdir()) == ['checkpoint_epoch_3.pth']
    after = load_checkpoint(ckpt / 'checkpoint_epoch_3.pth')
    assert (after['epoch'], after['it']) == (3, 6)


def test_pcdet_unreadable_newest_checkpoint_stops_train_py(openpcdet, trained):
    """OpenPCDet's auto-resume swallows the error (bare except) and would start over from
    epoch 0, overwriting the run: our detector stops it at its first step instead."""
    ckpt = _copy_run(trained, 'broken')
    newest = ckpt / 'checkpoint_epoch_2.pth'
    newest.write_bytes(newest.read_bytes()[:4096])
    os.utime(newest, (2_000_000,) * 2)
    before = digests(ckpt)
    res = run_script(openpcdet, 'train.py', *train_args('broken', '--epochs', 3))
    assert res.returncode == 1, res.stderr[-5000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, res.stderr[-3000:]  # the last line but tqdm's clean-up
    assert 'checkpoint_epoch_2.pth: not a readable checkpoint: EOFError' in errors[0]
    assert 'training refused' in errors[0]
    assert 'Traceback' not in res.stderr
    assert digests(ckpt) == before  # nothing trained, nothing overwritten


LOAD_COMPARE = '''
import copy, json, sys
import numpy as np, torch, yaml
from easydict import EasyDict
from pcdet.datasets import build_dataloader
from pcdet.models import load_data_to_gpu
from pcdet_focal.engine.utils import load_data_to_device
from pcdet_focal.registry import register_into_pcdet
register_into_pcdet(verbose=False)
from pcdet.config import cfg, cfg_from_yaml_file
cfg_from_yaml_file(sys.argv[1], cfg)
_, loader, _ = build_dataloader(cfg.DATA_CONFIG, cfg.CLASS_NAMES, batch_size=2, dist=False,
                                workers=0, training=True)
batch = next(iter(loader))
theirs, ours = copy.deepcopy(batch), copy.deepcopy(batch)
load_data_to_gpu(theirs)  # its .cuda() calls are no-ops without CUDA (tests/pcdet_cpu_ops)
load_data_to_device(ours, 'cuda' if torch.cuda.is_available() else 'cpu')
def info(v):
    if torch.is_tensor(v):
        return ['tensor', str(v.dtype), list(v.shape), v.device.type]
    return [type(v).__name__, str(getattr(v, 'dtype', '')), list(getattr(v, 'shape', []))]
same = {k: bool(torch.equal(theirs[k], ours[k])) if torch.is_tensor(theirs[k]) else None
        for k in batch}
print(json.dumps({'theirs': {k: info(v) for k, v in theirs.items()},
                  'ours': {k: info(v) for k, v in ours.items()}, 'equal': same}))
'''


def test_pcdet_load_data_to_device_matches_load_data_to_gpu(openpcdet):
    """On a real batch of OpenPCDet's KittiDataset (gt_sampling and all), key by key."""
    res = subprocess.run([sys.executable, '-c', LOAD_COMPARE, FLOW_CFG], cwd=openpcdet.tools,
                         env=openpcdet.env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-5000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out['ours'] == out['theirs']
    assert out['theirs']['image_shape'][:2] == ['tensor', 'torch.int32']
    assert {'voxels', 'voxel_coords', 'points', 'gt_boxes', 'calib'} <= set(out['theirs'])
    assert all(v is not False for v in out['equal'].values()), out['equal']
