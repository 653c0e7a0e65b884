"""Scale-out: W processes must train like one process holding the whole global batch.

- 2 simulated nodes x 2 processes (tools/scripts/dist_train.sh = torchrun, c10d rendezvous on
  127.0.0.1, gloo, CPU) train the demo detector with SyncBatchNorm and are compared with one
  process of the same global batch: loss curve, weights, rank-0-only outputs, a resume that
  continues bit for bit, and evaluation sharded over the ranks;
- ``--launcher slurm`` from simulated SLURM_* variables (toy model), and their errors;
- the pieces, each against an independent reference: the slurm host-list expansion, the
  global batch sampler, per-frame augmentation seeds, the global loss normaliser, the CPU
  SyncBatchNorm and the gathering of evaluation shards (3 gloo processes).

Ports are picked free on 127.0.0.1 by the OS; every process group lives on 127.0.0.1.
"""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from easydict import EasyDict

import engine_toys  # noqa: F401  (registers ToyDataset / ToyDetector)
from conftest import cuda_only
from pcdet_focal.config import load_config
from pcdet_focal.engine import dist as dist_utils
from pcdet_focal.engine.checkpoint import load_checkpoint
from pcdet_focal.engine.dataloader import GlobalBatchSampler, build_train_loader, sample_seed
from pcdet_focal.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEMO = REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml'
_DIST_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
              'MASTER_PORT', 'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def clean_env(**extra):
    """This environment without distributed / slurm variables, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in _DIST_VARS and not k.startswith('SLURM_')}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]), OMP_NUM_THREADS='1',
               PCDET_FOCAL_PLUGINS='engine_toys')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def state(path):
    return load_checkpoint(path)['model_state']


def epoch_losses(run_dir):
    lines = (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(x)['loss'] for x in lines if '"loss"' in x]


# ------------------------------------------------------------------ 2 nodes x 2 processes

# The demo detector on 4 training frames (one global batch of 4 = one step per epoch, so every
# epoch's checkpoint holds the weights after that step) and 7 evaluation frames (2+2+2+1 over
# 4 ranks). SGD instead of the demo's AdamW: Adam's first steps turn gradients that are float
# noise around zero into +-lr updates (between two single-process runs with 1 and 2 threads
# too), which would hide what this test is about, the gradients.
DEMO_FLAGS = ['--cfg_file', str(DEMO), '--batch_size', '4', '--epochs', '3', '--workers', '0',
              '--fix_random_seed', '--skip_mem_check', '--no_progress', '--bev_frames', '0']
DEMO_SET = ['--set', 'DATA_CONFIG.NUM_FRAMES.train', '4', 'DATA_CONFIG.NUM_FRAMES.test', '7',
            'OPTIMIZATION.OPTIMIZER', 'sgd']


def _two_nodes(out, extra=(), timeout=400):
    """dist_train.sh on 2 'nodes' of 2 processes each (c10d rendezvous on 127.0.0.1)."""
    env = clean_env(NNODES=2, MASTER_ADDR='127.0.0.1', PORT=free_port(), LOCAL_ADDR='127.0.0.1',
                    RDZV_ID=f'test{os.getpid()}', PYTHON=sys.executable)
    args = [*DEMO_FLAGS, '--sync_bn', '--output_dir', str(out), *extra, *DEMO_SET]
    nodes = [subprocess.Popen(['bash', str(REPO / 'tools/scripts/dist_train.sh'), '2', *args],
                              cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for _ in range(2)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=timeout)[0])
    finally:
        for node in nodes:  # a failed test leaves no worker behind (its own session)
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    return logs


def test_two_nodes_of_two_processes_train_like_one_process(tmp_path):
    from pcdet_focal.engine.cli_args import load_cfg
    from pcdet_focal.engine.trainer import TrainOptions, train

    run = 'focalsst_dsvt_demo/default'
    # one process, this one, with the flags tools/train.py gets below
    cfg = load_cfg(argparse.Namespace(cfg_file=str(DEMO), set_cfgs=DEMO_SET[1:]))
    train(cfg, TrainOptions(cfg_file=str(DEMO), batch_size=4, epochs=3, workers=0,
                            fix_random_seed=True, skip_mem_check=True, progress=False,
                            bev_frames=0, no_eval=True, output_dir=str(tmp_path / 'single')))
    logs = _two_nodes(tmp_path / 'ddp')
    ddp_dir, single_dir = tmp_path / 'ddp' / run, tmp_path / 'single' / run

    # the loss curve (mean over ranks of the globally normalised loss) follows one process
    assert epoch_losses(ddp_dir) == pytest.approx(epoch_losses(single_dir), rel=1e-5)
    # weights after the first step: the averaged DDP gradient is the single-process gradient
    w_single, w_ddp = state(single_dir / 'ckpt/checkpoint_epoch_1.pth'), \
        state(ddp_dir / 'ckpt/checkpoint_epoch_1.pth')
    for key in w_single:
        torch.testing.assert_close(w_ddp[key], w_single[key], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, k=key: f'{k} after step 1: {m}')
    # final weights: the gap then grows by the model's own sensitivity, not by DDP: max
    # reductions (DSVT input layer) switch winners under float noise, and a 1-thread and a
    # 2-thread single-process run drift apart the same way (1.4e-5 vs 6.9e-5 here at step 3)
    w_single, w_ddp = state(single_dir / 'ckpt/checkpoint_epoch_3.pth'), \
        state(ddp_dir / 'ckpt/checkpoint_epoch_3.pth')
    for key in w_single:
        torch.testing.assert_close(w_ddp[key], w_single[key], rtol=1e-3, atol=1e-3,
                                   msg=lambda m, k=key: f'{k} after step 3: {m}')

    # only rank 0 writes: one log, one metrics line per epoch + the evaluation, 3 checkpoints
    text = '\n'.join(logs)
    assert '4 processes (gloo)' in text and 'DDP: weights identical on all 4 ranks' in text
    train_logs = sorted(ddp_dir.glob('log_train_*.txt'))
    assert len(train_logs) == 1
    log = train_logs[0].read_text()
    assert log.count('saved ') >= 3 and log.count('checkpoint_epoch_1.pth') == 1
    metrics = [json.loads(x) for x in (ddp_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [m.get('epoch', m.get('eval_epoch')) for m in metrics] == [1, 2, 3, 3]
    assert sorted(p.name for p in (ddp_dir / 'ckpt').iterdir()) == \
        [f'checkpoint_epoch_{e}.pth' for e in (1, 2, 3)]
    # evaluation: 7 frames sharded 2+2+2+1, each predicted once, AP table written by rank 0
    assert 'predicted 7 frames' in log and 'evaluation on 7 frames' in log
    assert (ddp_dir / 'eval/epoch_3/result.txt').is_file()

    # resume under DDP: the same command in a run folder holding checkpoint 1 continues bit
    # for bit (sampler order, per-frame augmentation, SyncBN running stats, optimizer)
    resumed_dir = tmp_path / 'resumed' / run
    (resumed_dir / 'ckpt').mkdir(parents=True)
    shutil.copy(ddp_dir / 'ckpt/checkpoint_epoch_1.pth', resumed_dir / 'ckpt')
    logs = _two_nodes(tmp_path / 'resumed', extra=['--no_eval'])
    assert 'resumed from' in '\n'.join(logs)
    straight, resumed = state(ddp_dir / 'ckpt/checkpoint_epoch_3.pth'), \
        state(resumed_dir / 'ckpt/checkpoint_epoch_3.pth')
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert epoch_losses(resumed_dir) == epoch_losses(ddp_dir)[1:]


# ------------------------------------------------------------------ --launcher slurm

TOY = {'CLASS_NAMES': ['Car'],
       'DATA_CONFIG': {'DATASET': 'ToyDataset', 'NUM_FRAMES': {'train': 16, 'test': 8},
                       'SEED': {'train': 1, 'test': 2}, 'NOISE': 0.01},
       'MODEL': {'NAME': 'ToyDetector'},
       'OPTIMIZATION': {'BATCH_SIZE_PER_GPU': 4, 'NUM_EPOCHS': 2, 'OPTIMIZER': 'adam_onecycle',
                        'LR': 0.05, 'WEIGHT_DECAY': 0.0, 'MOMS': [0.95, 0.85],
                        'PCT_START': 0.4, 'DIV_FACTOR': 10, 'GRAD_NORM_CLIP': 10}}


def _toy_cfg(tmp_path):
    import yaml
    path = tmp_path / 'toy.yaml'
    path.write_text(yaml.safe_dump(TOY))
    return path


def _slurm_vars(procid, ntasks=2, localid=0, nodelist='127.0.0.[1-2]', nnodes=2):
    """Default: one task per simulated node, 127.0.0.1 and 127.0.0.2 (both loopback)."""
    return {'SLURM_PROCID': procid, 'SLURM_NTASKS': ntasks, 'SLURM_LOCALID': localid,
            'SLURM_NODELIST': nodelist, 'SLURM_NNODES': nnodes}


# Stands in for slurm's srun: starts the command once per task, with the variables slurm
# gives each task (block distribution; node k is 127.0.0.<k+1>, all loopback addresses).
FAKE_SRUN = r"""#!/usr/bin/env bash
ntasks=1; per_node=1
while [[ $1 == -* ]]; do
    case $1 in
        --ntasks=*) ntasks=${1#*=} ;;
        --ntasks-per-node=*) per_node=${1#*=} ;;
        -p) shift ;;
    esac
    shift
done
nodes=$(( (ntasks + per_node - 1) / per_node ))
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_NTASKS=$ntasks SLURM_LOCALID=$((i % per_node)) SLURM_NNODES=$nodes \
        SLURM_NODELIST="127.0.0.[1-$nodes]" "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def test_slurm_launcher_trains_like_one_process_and_names_a_missing_variable(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    from pcdet_focal.engine.trainer import TrainOptions, train

    cfg = _toy_cfg(tmp_path)
    flags = ['--workers', '0', '--fix_random_seed', '--skip_mem_check', '--no_progress',
             '--no_eval', '--bev_frames', '0']
    train(load_config(cfg), TrainOptions(
        cfg_file=str(cfg), batch_size=8, workers=0, fix_random_seed=True, skip_mem_check=True,
        progress=False, no_eval=True, backend='standalone', output_dir=str(tmp_path / 'single')))
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(FAKE_SRUN)
    (bin_dir / 'srun').chmod(0o755)
    # 2 tasks, one per "node": global batch 8 = 4 per task (the total, as in OpenPCDet)
    res = subprocess.run(['bash', 'tools/scripts/slurm_train.sh', 'part', 'job', '2',
                          '--cfg_file', str(cfg), '--batch_size', '8', *flags,
                          '--output_dir', str(tmp_path / 'slurm')],
                         cwd=REPO, capture_output=True, text=True, timeout=180,
                         env=clean_env(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                                       GPUS_PER_NODE=1, PORT=free_port(),
                                       PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr[-3000:]
    assert '--launcher slurm --tcp_port' in res.stderr  # the script's command line (set -x)
    assert '2 processes (gloo)' in res.stderr
    w_single = state(tmp_path / 'single/toy/default/ckpt/checkpoint_epoch_2.pth')
    w_slurm = state(tmp_path / 'slurm/toy/default/ckpt/checkpoint_epoch_2.pth')
    for key in w_single:  # linear regression: no tie or kink, so float noise stays float noise
        torch.testing.assert_close(w_slurm[key], w_single[key], rtol=1e-5, atol=1e-6)

    # a missing variable: tools/train.py ends with one line naming it, exit 1
    for key, value in _slurm_vars(0).items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv('SLURM_NTASKS')
    spec = importlib.util.spec_from_file_location('train_cli', REPO / 'tools' / 'train.py')
    monkeypatch.syspath_prepend(str(REPO / 'tools'))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(['--cfg', str(cfg), *flags, '--launcher', 'slurm',
                  '--output_dir', str(tmp_path / 'bad')])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith('error: SLURM_NTASKS is not set: start with srun')
    assert not dist_utils.is_distributed()


@cuda_only
def test_slurm_launcher_uses_nccl_on_cuda(tmp_path):
    res = subprocess.run([sys.executable, 'tools/train.py', '--cfg', str(_toy_cfg(tmp_path)),
                          '--workers', '0', '--skip_mem_check', '--no_progress', '--no_eval',
                          '--device', 'cuda', '--launcher', 'slurm', '--tcp_port',
                          str(free_port()), '--output_dir', str(tmp_path / 'o')],
                         cwd=REPO, env=clean_env(**_slurm_vars(0, 1, 0, '127.0.0.1', 1)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '1 processes (nccl)' in res.stderr


def test_slurm_nodelist_expands_like_scontrol():
    expand = dist_utils.expand_nodelist
    assert expand('node[01-04,07]') == ['node01', 'node02', 'node03', 'node04', 'node07']
    assert expand('gpu-a[8-10]x,login,cn[1,3]') == ['gpu-a8x', 'gpu-a9x', 'gpu-a10x', 'login',
                                                    'cn1', 'cn3']
    assert expand('r[1-2]n[09-10]') == ['r1n09', 'r1n10', 'r2n09', 'r2n10']
    assert expand('127.0.0.1') == ['127.0.0.1']
    for bad in ('node[01-', 'node]1[', 'a,,b', 'n[3-1]', 'n[a-b]', 'n[[1]]'):
        with pytest.raises(ConfigError, match=r"SLURM_NODELIST='.*': .*expected a slurm host"):
            expand(bad)


def test_slurm_environment_maps_variables_and_names_the_bad_one():
    env = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1',
           'SLURM_NODELIST': 'node[01-04,07]', 'SLURM_NNODES': '5'}
    assert dist_utils.slurm_environment(env, tcp_port=23456) == {
        'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'node01',
        'MASTER_PORT': '23456'}
    # port: --tcp_port, else MASTER_PORT, else OpenPCDet's 18888
    assert dist_utils.slurm_environment(dict(env, MASTER_PORT='2222'))['MASTER_PORT'] == '2222'
    assert dist_utils.slurm_environment(dict(env, MASTER_PORT='2222'), 3333)['MASTER_PORT'] \
        == '3333'
    assert dist_utils.slurm_environment(env)['MASTER_PORT'] == '18888'
    job_nodelist = {k: v for k, v in env.items() if k != 'SLURM_NODELIST'}
    job_nodelist['SLURM_JOB_NODELIST'] = 'a[7-11]'
    assert dist_utils.slurm_environment(job_nodelist)['MASTER_ADDR'] == 'a7'
    cases = [
        ({k: v for k, v in env.items() if k != 'SLURM_PROCID'}, 'SLURM_PROCID is not set'),
        ({k: v for k, v in env.items() if k != 'SLURM_LOCALID'}, 'SLURM_LOCALID is not set'),
        ({k: v for k, v in env.items() if k != 'SLURM_NODELIST'}, 'SLURM_NODELIST is not set'),
        (dict(env, SLURM_NTASKS='eight'), "SLURM_NTASKS='eight' is not an integer"),
        (dict(env, SLURM_PROCID='8'), 'SLURM_PROCID=8 must be smaller than SLURM_NTASKS=8'),
        (dict(env, SLURM_LOCALID='6'), 'SLURM_LOCALID=6 is larger than SLURM_PROCID=5'),
        (dict(env, SLURM_NNODES='4'), "names 5 host.* but SLURM_NNODES=4"),
        (dict(env, MASTER_PORT='http'), "MASTER_PORT='http' is not a port number"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            dist_utils.slurm_environment(bad)
        assert '\n' not in str(err.value)
    with pytest.raises(ConfigError, match='--tcp_port=70000 is not a port'):
        dist_utils.slurm_environment(env, 70000)
    assert dist_utils.backend_for('cuda') == 'nccl' and dist_utils.backend_for('cpu') == 'gloo'
    with pytest.raises(ConfigError, match="--launcher 'mpi'"):
        dist_utils.init_distributed('mpi', 'cpu')


def test_batch_size_is_the_total_over_processes_as_in_openpcdet():
    assert dist_utils.per_process_batch(None, 4, 3) == 3   # BATCH_SIZE_PER_GPU per process
    assert dist_utils.per_process_batch(16, 4, 3) == 4
    with pytest.raises(ConfigError, match='--batch_size 6 is the total over 4 processes'):
        dist_utils.per_process_batch(6, 4, 3)


# ------------------------------------------------------------------ data order and seeds

@pytest.mark.parametrize('n,batch,world', [(24, 2, 3), (16, 4, 2), (11, 2, 2), (13, 1, 4),
                                           (11, 3, 2)])
def test_ranks_take_their_slice_of_the_single_process_batch(n, batch, world):
    """Rank r's k-th batch is the r-th slice of the single process's k-th batch (batch
    world x batch): concatenated in rank order they are that batch, element for element."""
    for epoch in (0, 3):
        single = GlobalBatchSampler(n, batch * world, 0, 1, seed=7)
        single.set_epoch(epoch)
        ranks = [GlobalBatchSampler(n, batch, r, world, seed=7) for r in range(world)]
        for s in ranks:
            s.set_epoch(epoch)
        rank_batches = [list(s) for s in ranks]
        assert len({len(b) for b in rank_batches}) == 1  # every rank takes the same steps
        merged = [sum((b[k] for b in rank_batches), []) for k in range(len(rank_batches[0]))]
        expected = list(single)
        if len(expected) > len(merged):  # single keeps a last batch that W ranks cannot split
            assert len(expected[-1]) // world < min(2, batch)
            expected = expected[:-1]
        assert merged == expected
        assert min(len(b) for bs in rank_batches for b in bs) >= min(2, batch)
    # mid-epoch resume: skipping k batches (k * batch samples) yields the rest of the epoch
    s = GlobalBatchSampler(n, batch, world - 1, world, seed=7)
    s.set_epoch(2)
    full = list(s)
    s.skip = 1 * batch
    assert list(s) == full[1:]
    assert list(s) == full  # the skip applies once


def _toy_set(noise=0.05, frames=12):
    cfg = EasyDict(dict(TOY['DATA_CONFIG'], NOISE=noise, NUM_FRAMES={'train': frames,
                                                                      'test': 2}))
    return engine_toys.ToyDataset(cfg, ['Car'])


def test_augmentation_depends_on_frame_and_epoch_not_on_rank_or_worker():
    ds = _toy_set()

    def frames(rank, world, workers, epoch):
        loader, sampler = build_train_loader(ds, 2, workers, rank, world, seed=11)
        sampler.set_epoch(epoch)
        return {int(f): x for b in loader for f, x in zip(b['frame_id'], b['x'])}

    single = frames(0, 1, 0, epoch=1)
    split = {**frames(0, 2, 0, epoch=1), **frames(1, 2, 2, epoch=1)}  # rank 1: 2 workers
    assert sorted(single) == sorted(split) == list(range(12))
    for f in single:
        np.testing.assert_array_equal(single[f], split[f])
        # the draw is the frame's own: seeded by (seed, epoch, frame), reproduced here
        np.random.seed(sample_seed(11, 1, f))
        noise = np.random.normal(scale=0.05, size=ds.x[f].shape).astype(np.float32)
        np.testing.assert_array_equal(single[f], ds.x[f] + noise)
    other_epoch = frames(0, 1, 0, epoch=2)
    assert not any(np.array_equal(single[f], other_epoch[f]) for f in single)
    before = np.random.get_state()[1].copy()
    frames(0, 1, 0, epoch=1)  # loading in the main process leaves the global RNG alone
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_last_global_batch_dropped_only_when_a_rank_would_train_on_one_sample():
    assert len(GlobalBatchSampler(10, 4, 0, 2)) == 1        # 8 + 2: one sample a rank
    assert len(GlobalBatchSampler(12, 4, 0, 2)) == 2        # 8 + 4: two a rank, kept
    assert len(GlobalBatchSampler(5, 1, 0, 4)) == 1         # batch 1: 4 + 1 leaves ranks empty
    with pytest.raises(DataError, match='fewer than one batch'):
        build_train_loader(_toy_set(frames=5), 2, 0, 0, 3)


# ------------------------------------------------------------------ collectives (3 ranks)

def _gloo_worker(rank, world, port, out_dir):
    """Runs in each of 3 spawned processes; writes its results to out_dir/rank<r>.pt."""
    from torch import distributed as dist

    from pcdet_focal.engine.dataloader import build_eval_loader
    from pcdet_focal.engine.evaluator import evaluate_model
    from pcdet_focal.ops.centernet import reg_l1_loss
    from pcdet_focal.ops.distributed import global_normaliser
    from pcdet_focal.ops.losses import gaussian_focal_loss, sigmoid_focal_loss

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        data = torch.load(Path(out_dir) / 'inputs.pt', weights_only=True)
        parts = data['parts']
        lo, hi = parts[rank], parts[rank + 1]
        result = {}
        # losses: DDP averages the ranks' gradients, so average them here
        hm = data['hm_logits'][lo:hi].clone().requires_grad_(True)
        code = data['code'][lo:hi].clone().requires_grad_(True)
        imp = data['imp_logits'][data['imp_parts'][rank]:data['imp_parts'][rank + 1]].clone()
        imp.requires_grad_(True)
        loss = (gaussian_focal_loss(hm.sigmoid(), data['heatmap'][lo:hi])
                + reg_l1_loss(code, data['target'][lo:hi], data['mask'][lo:hi]).sum()
                + sigmoid_focal_loss(imp, data['imp_targets'][data['imp_parts'][rank]:
                                                              data['imp_parts'][rank + 1]],
                                     reduction='sum') / global_normaliser(
                                         imp.new_tensor(imp.numel())))
        (loss / world).backward()
        result.update(loss=loss.detach(), hm_grad=hm.grad, code_grad=code.grad,
                      imp_grad=imp.grad)
        # SyncBatchNorm on the CPU: every rank's slice of one batch
        bn = dist_utils.convert_sync_batchnorm(torch.nn.Sequential(
            torch.nn.BatchNorm2d(3, momentum=0.3)), 'cpu')
        x = data['bn_x'][lo:hi].clone().requires_grad_(True)
        y = bn(x)
        (y * data['bn_dy'][lo:hi]).sum().backward()  # the batch's loss is the sum of these
        result.update(bn_y=y.detach(), bn_x_grad=x.grad, bn_w_grad=bn[0].weight.grad,
                      bn_b_grad=bn[0].bias.grad, bn_mean=bn[0].running_mean,
                      bn_var=bn[0].running_var)
        # evaluation: 8 frames sharded 3 + 3 + 2, gathered on every rank
        model = engine_toys.ToyDetector(None, 1, None)
        model.load_state_dict(data['toy_state'])
        test_set = engine_toys.ToyDataset(load_config(data['toy_cfg']).DATA_CONFIG, ['Car'],
                                          training=False)
        loader = build_eval_loader(test_set, 2, 0, rank, world)
        result['eval'] = evaluate_model(model, loader, 'cpu', ['Car'], progress=False)[1]
        result['shard'] = torch.tensor(list(loader.sampler))
        torch.save(result, Path(out_dir) / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_losses_syncbn_and_evaluation_over_three_uneven_ranks_match_one_process(tmp_path):
    from pcdet_focal.engine.dataloader import build_eval_loader
    from pcdet_focal.engine.evaluator import evaluate_model
    from pcdet_focal.ops.centernet import reg_l1_loss
    from pcdet_focal.ops.losses import gaussian_focal_loss, sigmoid_focal_loss

    g = torch.Generator().manual_seed(3)
    n, parts = 7, [0, 1, 4, 7]                   # batch of 7 split 1 + 3 + 3
    heatmap = torch.rand(n, 2, 6, 6, generator=g) * 0.9
    heatmap[1, 0, 2, 3] = heatmap[4, 1, 0, 0] = heatmap[5, 0, 5, 5] = heatmap[6, 1, 1, 1] = 1.0
    mask = torch.zeros(n, 5, dtype=torch.bool)
    mask[0, :1], mask[2, :4], mask[6, :2] = True, True, True   # 1 + 4 + 2 objects
    imp_parts = [0, 40, 45, 130]                  # 40 + 5 + 85 voxels
    data = {'parts': parts, 'imp_parts': imp_parts, 'heatmap': heatmap, 'mask': mask,
            'hm_logits': torch.randn(n, 2, 6, 6, generator=g),
            'code': torch.randn(n, 5, 8, generator=g), 'target': torch.randn(n, 5, 8, generator=g),
            'imp_logits': torch.randn(130, generator=g),
            'imp_targets': (torch.rand(130, generator=g) > 0.8).float(),
            'bn_x': torch.randn(n, 3, 4, 4, generator=g) * 2 + 1,
            'bn_dy': torch.randn(n, 3, 4, 4, generator=g)}
    cfg_path = _toy_cfg(tmp_path)
    torch.manual_seed(5)
    toy = engine_toys.ToyDetector(None, 1, None)
    data.update(toy_state=toy.state_dict(), toy_cfg=str(cfg_path))
    torch.save(data, tmp_path / 'inputs.pt')
    torch.multiprocessing.spawn(_gloo_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(3)]

    # one process, whole batch: the reference (plain mean-normalised losses, plain BatchNorm)
    hm = data['hm_logits'].clone().requires_grad_(True)
    code = data['code'].clone().requires_grad_(True)
    imp = data['imp_logits'].clone().requires_grad_(True)
    pos = (heatmap == 1).sum()
    ref_loss = (gaussian_focal_loss(hm.sigmoid(), heatmap)
                + reg_l1_loss(code, data['target'], mask).sum()
                + sigmoid_focal_loss(imp, data['imp_targets'], reduction='mean'))
    ref_loss.backward()
    assert pos == 4 and mask.sum() == 7
    assert sum(r['loss'] for r in ranks) / 3 == pytest.approx(ref_loss.item(), rel=1e-5)
    for key, ref, cut in (('hm_grad', hm.grad, parts), ('code_grad', code.grad, parts),
                          ('imp_grad', imp.grad, imp_parts)):
        got = torch.cat([r[key] for r in ranks])
        torch.testing.assert_close(got, torch.cat([ref[cut[i]:cut[i + 1]] for i in range(3)]),
                                   rtol=1e-5, atol=1e-7, msg=key)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3)
    x = data['bn_x'].clone().requires_grad_(True)
    y = bn(x)
    (y * data['bn_dy']).sum().backward()
    torch.testing.assert_close(torch.cat([r['bn_y'] for r in ranks]), y.detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r['bn_x_grad'] for r in ranks]), x.grad,
                               rtol=1e-5, atol=1e-5)
    for key, ref in (('bn_w_grad', bn.weight.grad), ('bn_b_grad', bn.bias.grad)):
        # each rank keeps its share (DDP then averages, as every other parameter's gradient)
        torch.testing.assert_close(sum(r[key] for r in ranks), ref, rtol=1e-5, atol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r['bn_mean'], bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r['bn_var'], bn.running_var, rtol=1e-6, atol=1e-6)

    # evaluation: shards 3 + 3 + 2 cover the 8 frames once; the result is the one-process one
    assert [r['shard'].tolist() for r in ranks] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    test_set = engine_toys.ToyDataset(load_config(cfg_path).DATA_CONFIG, ['Car'], training=False)
    _, single = evaluate_model(toy, build_eval_loader(test_set, 2), 'cpu', ['Car'],
                               progress=False)
    assert single['frames'] == ranks[0]['eval']['frames'] == 8
    assert ranks[0]['eval']['mse'] == pytest.approx(single['mse'], rel=1e-6)
    assert ranks[1]['eval'] is None and ranks[2]['eval'] is None


def test_gathered_evaluation_refuses_duplicate_or_missing_frames():
    from pcdet_focal.engine.dataloader import ShardSampler
    from pcdet_focal.engine.evaluator import _check_each_frame_once

    _check_each_frame_once([0, 1, 2, 3], 4, ShardSampler(4))
    with pytest.raises(DataError, match=r'frame\(s\) \[2\] more than once and missed \[3\]'):
        _check_each_frame_once([0, 1, 2, 2], 4, ShardSampler(4))
