"""Engine tests on a toy regression model: checkpoints, resume, signals, DDP, bad input.

The toy (tests/engine_toys.py) has no BatchNorm and trains in milliseconds, so these tests
check the engine's mechanics exactly (bitwise resume, DDP == single process) and stay fast.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import engine_toys  # noqa: F401  (registers ToyDataset / ToyDetector)
from pcdet_focal.config import load_config
from pcdet_focal.engine.checkpoint import (build_checkpoint, find_latest_checkpoint,
                                           load_checkpoint, load_model_state, save_checkpoint)
from pcdet_focal.engine.trainer import TrainOptions, train
from pcdet_focal.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def toy_cfg(tmp_path, frames=12, batch=2, epochs=2, sleep=0.0, name='toy', noise=0.01):
    cfg = {
        'CLASS_NAMES': ['Car'],
        'DATA_CONFIG': {'DATASET': 'ToyDataset', 'NUM_FRAMES': {'train': frames, 'test': 8},
                        'SEED': {'train': 1, 'test': 2}, 'SLEEP': sleep,
                        'NOISE': noise},
        'MODEL': {'NAME': 'ToyDetector'},
        'OPTIMIZATION': {'BATCH_SIZE_PER_GPU': batch, 'NUM_EPOCHS': epochs,
                         'OPTIMIZER': 'adam_onecycle', 'LR': 0.05, 'WEIGHT_DECAY': 0.0,
                         'MOMS': [0.95, 0.85], 'PCT_START': 0.4, 'DIV_FACTOR': 10,
                         'GRAD_NORM_CLIP': 10},
    }
    path = tmp_path / f'{name}.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(cfg_path, out, **kw):
    opts = TrainOptions(cfg_file=str(cfg_path), output_dir=str(out), workers=0,
                        fix_random_seed=True, skip_mem_check=True, progress=False,
                        backend='standalone', **kw)
    return train(load_config(cfg_path), opts)


def final_weights(out, stem='toy', tag='default'):
    path, ckpt = find_latest_checkpoint(Path(out) / stem / tag / 'ckpt')
    return ckpt['model_state']


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(build_checkpoint(model, opt, epoch=3, it=7), tmp_path / 'c.pth')
    assert [p.name for p in tmp_path.iterdir()] == ['c.pth']  # no temp file left behind
    ckpt = load_checkpoint(path)
    other = torch.nn.Linear(3, 2)
    load_model_state(other, ckpt['model_state'])
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(other.parameters())
    opt2.load_state_dict(ckpt['optimizer_state'])
    assert ckpt['epoch'] == 3 and ckpt['it'] == 7
    assert torch.equal(opt2.state_dict()['state'][0]['exp_avg'],
                       opt.state_dict()['state'][0]['exp_avg'])


def test_corrupt_newest_checkpoint_named_and_never_skipped(tmp_path):
    """A truncated newest checkpoint stops the resume (never a silent start from an older one,
    never a start over)."""
    model = torch.nn.Linear(3, 2)
    good = save_checkpoint(build_checkpoint(model, epoch=1), tmp_path / 'checkpoint_epoch_1.pth')
    bad = tmp_path / 'checkpoint_epoch_2.pth'
    bad.write_bytes(good.read_bytes()[:100])  # truncated
    os.utime(bad, (time.time() + 5, time.time() + 5))
    with pytest.raises(CheckpointError, match='checkpoint_epoch_2.pth'):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError,
                       match='checkpoint_epoch_2.pth.*stops instead of starting over'):
        find_latest_checkpoint(tmp_path)


def test_checkpoint_from_other_model_lists_keys(tmp_path):
    path = save_checkpoint(build_checkpoint(torch.nn.Linear(3, 2)), tmp_path / 'c.pth')
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match=r'missing: 0\.weight.*unexpected: weight'):
        load_model_state(other, load_checkpoint(path)['model_state'], path=str(path))
    with pytest.raises(CheckpointError, match='shape mismatch: weight'):
        load_model_state(torch.nn.Linear(4, 2), load_checkpoint(path)['model_state'])


def test_pickled_code_in_checkpoint_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model_state': {}, 'payload': os.system}, path)  # weights_only refuses it
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        load_checkpoint(path)


def test_resume_is_bitwise_identical(tmp_path):
    cfg = toy_cfg(tmp_path, frames=12, batch=2, epochs=2)
    run_train(cfg, tmp_path / 'straight')
    straight = final_weights(tmp_path / 'straight')
    # Same run stopped after epoch 1 (6 steps), then the same command again resumes it.
    run_train(cfg, tmp_path / 'resumed', max_steps=6)
    first = final_weights(tmp_path / 'resumed')
    assert not torch.equal(first['linear.weight'], straight['linear.weight'])
    run_train(cfg, tmp_path / 'resumed')
    resumed = final_weights(tmp_path / 'resumed')
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_into_finished_run_says_so(tmp_path):
    cfg = toy_cfg(tmp_path, epochs=1)
    assert run_train(cfg, tmp_path / 'out')['frames'] == 8  # trains and evaluates
    assert run_train(cfg, tmp_path / 'out') is None
    logs = ''.join(p.read_text() for p in (tmp_path / 'out/toy/default').glob('log_train_*'))
    assert 'already finished 1 of 1 epochs' in logs


def test_last_batch_of_one_is_dropped(tmp_path):
    from pcdet_focal.engine.dataloader import build_train_loader
    ds = engine_toys.ToyDataset(load_config(toy_cfg(tmp_path, frames=5)).DATA_CONFIG, ['Car'])
    loader, _ = build_train_loader(ds, batch_size=2)
    sizes = [b['batch_size'] for b in loader]
    assert sizes == [2, 2]
    loader, _ = build_train_loader(ds, batch_size=3)  # 3 + 2: nothing to drop
    assert [b['batch_size'] for b in loader] == [3, 2]
    with pytest.raises(DataError, match='fewer than one batch'):
        build_train_loader(ds, batch_size=6)


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, PCDET_FOCAL_PLUGINS='engine_toys',
               PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240, **kw)


def test_cli_bad_input_one_line(tmp_path):
    cfg = toy_cfg(tmp_path, frames=3, batch=2)
    res = _cli(['tools/train.py', '--cfg', str(cfg), '--batch_size', '0'])
    assert res.returncode != 0 and 'must be >= 1, got 0' in res.stderr
    res = _cli(['tools/train.py', '--cfg', str(cfg), '--batch_size', '4', '--skip_mem_check',
                '--output_dir', str(tmp_path / 'o'), '--workers', '0'])
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith('error: the training set has 3 frame')
    assert 'Traceback' not in res.stderr
    res = _cli(['tools/train.py', '--cfg', str(tmp_path / 'nope.yaml')])
    assert res.returncode == 1 and 'config file not found' in res.stderr
    res = _cli(['tools/train.py', '--cfg', str(cfg), '--set', 'OPTIMIZATION.NOPE', '1'])
    assert res.returncode == 1 and "no key 'OPTIMIZATION.NOPE'" in res.stderr


def test_sigterm_saves_checkpoint_then_resume(tmp_path):
    cfg = toy_cfg(tmp_path, frames=400, batch=2, epochs=1, sleep=0.01)
    out = tmp_path / 'out'
    env = dict(os.environ, PCDET_FOCAL_PLUGINS='engine_toys',
               PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    proc = subprocess.Popen([sys.executable, 'tools/train.py', '--cfg', str(cfg), '--workers',
                             '0', '--skip_mem_check', '--output_dir', str(out), '--no_progress',
                             '--fix_random_seed'], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            text=True)
    log_dir = out / 'toy' / 'default'
    deadline = time.time() + 60
    while time.time() < deadline:
        logs = list(log_dir.glob('log_train_*.txt'))
        if logs and 'optimizer steps' in logs[0].read_text():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert 'stopped by signal' in err
    ckpts = list((log_dir / 'ckpt').glob('*.pth'))
    assert len(ckpts) == 1 and '_it_' in ckpts[0].name
    partial = load_checkpoint(ckpts[0])
    assert 0 < partial['epoch_it'] < 200
    res = _cli(['tools/train.py', '--cfg', str(cfg), '--workers', '0', '--skip_mem_check',
                '--output_dir', str(out), '--no_progress', '--fix_random_seed'])
    assert res.returncode == 0, res.stderr
    assert f"+ {partial['epoch_it']} batches" in res.stderr
    assert (log_dir / 'ckpt' / 'checkpoint_epoch_1.pth').is_file()


DDP_SCRIPT = '''
import sys, torch
import engine_toys
from pcdet_focal.config import load_config
from pcdet_focal.engine.trainer import TrainOptions, train
cfg_path, out, launcher, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
opts = TrainOptions(cfg_file=cfg_path, output_dir=out, workers=0, fix_random_seed=True,
                    skip_mem_check=True, progress=False, backend='standalone', launcher=launcher,
                    batch_size=batch, no_eval=True)
cfg = load_config(cfg_path)
train(cfg, opts)
'''


def test_ddp_two_processes_match_single_process(tmp_path):
    # with augmentation noise: each frame's draw is seeded by (seed, epoch, frame), not by rank
    cfg = toy_cfg(tmp_path, frames=16, batch=4, epochs=2)
    script = tmp_path / 'ddp_train.py'
    script.write_text(DDP_SCRIPT)
    single = _cli([str(script), str(cfg), str(tmp_path / 'single'), 'none', '4'])
    assert single.returncode == 0, single.stderr
    with socket.socket() as sock:  # a port the OS says is free, on the loopback only
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    ddp = _cli(['-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
                f'--master_port={port}',
                str(script), str(cfg), str(tmp_path / 'ddp'), 'pytorch', '4'],  # total batch
               env_extra={'OMP_NUM_THREADS': '1'})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    w_single = final_weights(tmp_path / 'single')
    w_ddp = final_weights(tmp_path / 'ddp')
    for key in w_single:
        torch.testing.assert_close(w_ddp[key], w_single[key], rtol=1e-5, atol=1e-6)
    assert 'DDP: weights identical on all 2 ranks' in ddp.stderr
    # the epoch loss (averaged over ranks) follows the single-process run
    single_log = (tmp_path / 'single/toy/default/metrics.jsonl').read_text().splitlines()
    ddp_log = (tmp_path / 'ddp/toy/default/metrics.jsonl').read_text().splitlines()
    assert len(single_log) == len(ddp_log) == 2
    for a, b in zip(single_log, ddp_log):
        assert json.loads(a)['loss'] == pytest.approx(json.loads(b)['loss'], rel=1e-5)
