"""The training job behind ``tools/train.py``.

One run lives in ``<output_dir>/<cfg stem>/<extra_tag>/``: ``ckpt/checkpoint_epoch_N.pth``
(atomic writes), ``log_train_<time>.txt``, ``metrics.jsonl`` (one JSON line per epoch and per
evaluation), a copy of the merged config, ``eval/epoch_N/result.{txt,json}`` and
``tensorboard/`` when the tensorboard package is installed; with matplotlib also
``curves.png`` (loss and AP) and ``eval/epoch_N/bev_<frame_id>.png`` (``bev_frames`` frames).

Resume: ``--ckpt`` or, without it, the newest readable checkpoint of the run folder. Model,
optimizer, LR schedule, AMP scaler, epoch, step and RNG states are restored; a run stopped at
an epoch boundary continues bit-for-bit as if never stopped (CPU, fixed seed). Ctrl-C and
SIGTERM finish the current step, save a checkpoint and exit.
"""
import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import tqdm

from .. import backend as backends
from ..config import REPO_ROOT, dump_config
from ..errors import ConfigError, PcdetFocalError
from ..viz import DEFAULT_BEV_FRAMES, best_effort
from ..viz.curves import draw_curves
from . import dist as dist_utils
from .checkpoint import (build_checkpoint, find_latest_checkpoint, load_checkpoint,
                         load_model_state, load_optimizer_state, prune_checkpoints,
                         restore_scheduler, save_checkpoint, unwrap)
from .dataloader import build_eval_loader, build_train_loader
from .evaluator import evaluate_model
from .optim import build_optimizer, build_scheduler, optimizer_step
from .utils import (create_logger, describe_device, get_rng_state, load_data_to_device,
                    set_random_seed, set_rng_state)

DEFAULT_SEED = 666  # OpenPCDet's --fix_random_seed value


class TrainingInterrupted(PcdetFocalError):
    exit_code = 130


@dataclass
class TrainOptions:
    """What tools/train.py passes in (OpenPCDet's flag names)."""
    cfg_file: str
    batch_size: int = None
    epochs: int = None
    workers: int = 2
    extra_tag: str = 'default'
    ckpt: str = None
    pretrained_model: str = None
    launcher: str = 'none'
    tcp_port: int = None
    sync_bn: bool = False
    fix_random_seed: bool = False
    seed: int = DEFAULT_SEED
    ckpt_save_interval: int = 1
    max_ckpt_save_num: int = 30
    use_amp: bool = False
    output_dir: str = None
    device: str = None
    backend: str = 'auto'
    skip_mem_check: bool = False
    max_steps: int = None
    no_eval: bool = False
    eval_batch_size: int = None
    logger_iter_interval: int = 50
    progress: bool = True
    bev_frames: int = DEFAULT_BEV_FRAMES


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_dir_for(cfg, opts):
    root = Path(opts.output_dir) if opts.output_dir else (REPO_ROOT or Path.cwd()) / 'output'
    return root / Path(cfg.CFG_FILE).stem / opts.extra_tag


def pick_device(requested=None):
    if requested:
        device = torch.device(requested)
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ConfigError(f'--device {requested}: no CUDA device is available here')
        return device
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _memory_check(cfg, batch_size, amp, device, backend, world_size, logger):
    """Refuse configs the estimator does not pass (exit 2), before anything is allocated: a
    REJECT, a count without a bound, or a model it has no memory rule for. Only on CUDA:
    the CPU has no fixed budget to check against."""
    if device.type != 'cuda':
        logger.info('memory check: skipped on the CPU (no VRAM budget; tools/estimate_mem.py '
                    'estimates for a GPU)')
        return
    from ..memory import check_fits
    vram = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    verdict = check_fits(cfg, batch_size=batch_size, vram_gib=vram, amp=amp, host=backend,
                         world_size=world_size)
    logger.info('memory estimate: %s', verdict.summary())
    if not verdict.fits:
        raise MemoryCheckFailed(verdict.summary())


class MemoryCheckFailed(PcdetFocalError):
    exit_code = 2

    def __init__(self, summary):
        super().__init__(f'{summary} (tools/estimate_mem.py --cfg ... explains it; '
                         '--skip_mem_check starts anyway)')


def _log_jsonl(path, record):
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def _make_tensorboard(run_dir, logger):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        logger.info('tensorboard not installed: metrics go to metrics.jsonl only')
        return None
    return SummaryWriter(log_dir=str(run_dir / 'tensorboard'))


def train(cfg, opts):
    """Train (and evaluate) per ``cfg`` and ``opts``; returns the final AP dict (rank 0).

    Under torch.distributed (``opts.launcher`` pytorch or slurm) every process runs this; the
    process group it creates is destroyed on the way out, error or not.
    """
    device = pick_device(opts.device)
    owns_group = not dist_utils.is_distributed()
    rank, world_size, _ = dist_utils.init_distributed(opts.launcher, device.type, opts.tcp_port)
    try:
        return _train(cfg, opts, device, rank, world_size)
    finally:
        if owns_group:
            dist_utils.cleanup()


def _train(cfg, opts, device, rank, world_size):
    if device.type == 'cuda' and world_size > 1:
        device = torch.device('cuda', torch.cuda.current_device())
    opt_cfg = cfg.OPTIMIZATION
    batch_size = dist_utils.per_process_batch(opts.batch_size, world_size,
                                              opt_cfg.BATCH_SIZE_PER_GPU)
    epochs = opts.epochs if opts.epochs is not None else opt_cfg.NUM_EPOCHS
    if int(batch_size) < 1:
        raise ConfigError(f'--batch_size must be >= 1, got {batch_size}')
    if int(epochs) < 1:
        raise ConfigError(f'--epochs must be >= 1, got {epochs}')
    accum = int(opt_cfg.get('ACCUMULATION_STEPS', 1))
    if accum < 1:
        raise ConfigError(f'OPTIMIZATION.ACCUMULATION_STEPS must be >= 1, got {accum}')
    amp = bool(opts.use_amp or opt_cfg.get('USE_AMP', False))
    if amp and device.type != 'cuda':
        amp = False  # fp16 autocast is a CUDA feature here; CPU trains in fp32

    run_dir = run_dir_for(cfg, opts)
    ckpt_dir = run_dir / 'ckpt'
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    logger = create_logger(run_dir / f'log_train_{time.strftime("%Y%m%d-%H%M%S")}.txt', rank)
    iter_log = logging.getLogger('pcdet_focal.iter')  # file only: keeps the bar in place
    iter_log.propagate = False
    iter_log.handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    iter_log.setLevel(logging.INFO)

    logger.info('device: %s%s', describe_device(device),
                f', {world_size} processes ({torch.distributed.get_backend()})'
                if dist_utils.is_distributed() else '')
    logger.info('run folder: %s', run_dir)
    if rank == 0:
        dump_config(cfg, run_dir / Path(cfg.CFG_FILE).name)
    seed = opts.seed if opts.fix_random_seed else int(torch.randint(0, 2 ** 31 - 1, ()).item())
    seed = dist_utils.broadcast_object(seed)  # one data order and augmentation for all ranks
    set_random_seed(seed + rank)

    backend = backends.resolve_backend(opts.backend)
    if not opts.skip_mem_check and rank == 0:
        _memory_check(cfg, int(batch_size), amp, device, backend, world_size, logger)
    logger.info('backend: %s', backend)
    train_set = backends.build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, True, backend, logger)
    loader, sampler = build_train_loader(train_set, int(batch_size), opts.workers, rank,
                                         world_size, seed)
    model = backends.build_network(cfg.MODEL, len(cfg.CLASS_NAMES), train_set, backend)
    if opts.sync_bn and world_size > 1:
        model = dist_utils.convert_sync_batchnorm(model, device.type)  # CPU (gloo) too
    model.to(device)
    optimizer = build_optimizer(model, opt_cfg)
    steps_per_epoch = math.ceil(len(loader) / accum)
    total_steps = steps_per_epoch * int(epochs)
    scheduler = build_scheduler(optimizer, opt_cfg, total_steps)
    scaler = torch.amp.GradScaler('cuda', enabled=amp)

    start_epoch, step, epoch_it = _resume(opts, ckpt_dir, model, optimizer, scheduler, scaler,
                                          logger)
    if start_epoch >= int(epochs):
        logger.info('this run already finished %d of %d epochs (%s): nothing to train',
                    start_epoch, epochs, ckpt_dir)
        return None
    if world_size > 1:
        model = dist_utils.wrap_ddp(model, device,
                                    bool(opt_cfg.get('FIND_UNUSED_PARAMETERS', False)))

    n_params = sum(p.numel() for p in model.parameters())
    logger.info('model %s: %.2f M parameters; %d frames, batch %d x %d process(es), '
                'accumulation %d, %d epochs, %d optimizer steps%s', cfg.MODEL.NAME, n_params / 1e6,
                len(train_set), int(batch_size), world_size, accum, epochs, total_steps,
                ', AMP' if amp else '')
    writer = _make_tensorboard(run_dir, logger) if rank == 0 else None
    metrics_file = run_dir / 'metrics.jsonl'

    with _StopFlag() as stop:
        for epoch in range(start_epoch, int(epochs)):
            sampler.set_epoch(epoch)
            sampler.skip = epoch_it * int(batch_size)
            t0 = time.time()
            step, stats, done_it = _train_one_epoch(
                model, loader, optimizer, scheduler, scaler, device, amp, accum, epoch,
                int(epochs), step, epoch_it, opt_cfg, stop, opts, writer, iter_log, rank)
            epoch_it = 0
            signum = dist_utils.sync_step(0.0, stop.signum)[1]  # the same answer on all ranks
            interrupted = signum is not None
            limit_hit = opts.max_steps is not None and step >= opts.max_steps
            finished = done_it >= len(loader)
            dropped = getattr(train_set, 'num_dropped_points', 0)
            record = {'epoch': epoch + 1 if finished else epoch, 'step': step,
                      'seconds': round(time.time() - t0, 2), **stats}
            if dropped:
                record['dropped_nonfinite_points'] = int(dropped)
            if rank == 0:
                _log_jsonl(metrics_file, record)
            logger.info('epoch %d/%d: loss %.4f, lr %.2e, %.1f s%s', epoch + 1, epochs,
                        stats.get('loss', float('nan')), stats.get('lr', 0.0),
                        time.time() - t0,
                        f', {dropped} non-finite points dropped so far' if dropped else '')
            if rank == 0 and (not finished or (epoch + 1) % opts.ckpt_save_interval == 0
                              or epoch + 1 == int(epochs)):
                name = (f'checkpoint_epoch_{epoch + 1}.pth' if finished
                        else f'checkpoint_epoch_{epoch}_it_{done_it}.pth')
                state = build_checkpoint(model, optimizer, scheduler, scaler,
                                         epoch=epoch + 1 if finished else epoch, it=step,
                                         epoch_it=0 if finished else done_it,
                                         rng_state=get_rng_state())
                path = save_checkpoint(state, ckpt_dir / name)
                if finished:
                    prune_checkpoints(ckpt_dir, opts.max_ckpt_save_num)
                logger.info('saved %s', path)
            dist_utils.barrier()
            if interrupted:
                raise TrainingInterrupted(f'stopped by signal {signum}; the checkpoint in '
                                          f'{ckpt_dir} resumes this run (same command)')
            if limit_hit:
                logger.info('--max_steps %d reached', opts.max_steps)
                break

    if writer is not None:
        writer.close()
    if world_size > 1:
        _check_ranks_in_sync(model, logger)
    if opts.no_eval or (opts.max_steps is not None and step >= opts.max_steps
                        and step < total_steps):
        logger.info('skipping the final evaluation (%s)',
                    '--no_eval' if opts.no_eval else 'stopped by --max_steps')
        _draw_curves(run_dir, rank, logger)
        return None
    result = final_evaluation(cfg, unwrap(model), device, run_dir, backend, logger,
                              batch_size=opts.eval_batch_size or int(batch_size),
                              workers=opts.workers, epoch=epoch + 1, progress=opts.progress,
                              bev_frames=opts.bev_frames)
    _draw_curves(run_dir, rank, logger)
    return result


def _draw_curves(run_dir, rank, logger):
    """``curves.png``: loss and AP of the run's metrics.jsonl (rank 0, never fatal)."""
    if rank == 0:
        path = best_effort('training curves picture', draw_curves, run_dir / 'metrics.jsonl',
                           run_dir / 'curves.png', title=str(run_dir))
        if path is not None:
            logger.info('saved %s', path)


def final_evaluation(cfg, model, device, run_dir, backend, logger, batch_size, workers, epoch,
                     progress=True, save_to_file=False, bev_frames=DEFAULT_BEV_FRAMES):
    test_set = backends.build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, False, backend, logger)
    loader = build_eval_loader(test_set, batch_size, workers, dist_utils.get_rank(),
                               dist_utils.get_world_size())
    result_dir = Path(run_dir) / 'eval' / f'epoch_{epoch}'
    result_str, result_dict = evaluate_model(model, loader, device, cfg.CLASS_NAMES, result_dir,
                                             save_to_file=save_to_file, progress=progress,
                                             bev_frames=bev_frames)
    if result_str is not None:
        logger.info('evaluation on %d frames (%s split), epoch %d:\n%s', len(test_set),
                    getattr(test_set, 'mode', 'test'), epoch, result_str)
        _log_jsonl(Path(run_dir) / 'metrics.jsonl',
                   {'eval_epoch': epoch, **{k: float(v) for k, v in result_dict.items()}})
        logger.info('saved %s', result_dir / 'result.txt')
    return result_dict


def _check_ranks_in_sync(model, logger):
    """DDP keeps replicas identical; verify it once (cheap checksum) instead of assuming."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
        checksum = (float(flat.sum()), float((flat * flat).sum()))
    sums = dist_utils.all_gather_object(checksum)
    if all(s == sums[0] for s in sums):
        logger.info('DDP: weights identical on all %d ranks (checksum %.10g)', len(sums),
                    sums[0][0])
    else:
        logger.warning('DDP: rank weights differ after training: %s', sums)


def _resume(opts, ckpt_dir, model, optimizer, scheduler, scaler, logger):
    """Restore from --ckpt or the run folder's newest checkpoint; returns (epoch, step, it).

    A checkpoint that cannot be loaded stops the run (CheckpointError): never a fresh start
    over the run's own checkpoints. OpenPCDet's checkpoints resume too (no schedule or RNG
    states in them: the schedule is moved to the saved step).
    """
    if opts.ckpt:
        path, ckpt = Path(opts.ckpt), load_checkpoint(opts.ckpt)
    else:
        path, ckpt = find_latest_checkpoint(ckpt_dir)
    if ckpt is None:
        if opts.pretrained_model:
            load_model_state(model, load_checkpoint(opts.pretrained_model)['model_state'],
                             path=opts.pretrained_model, strict=False)
        return 0, 0, 0
    load_model_state(model, ckpt['model_state'], path=str(path), strict=True)
    epoch, step, epoch_it = (int(ckpt.get(key) or 0) for key in ('epoch', 'it', 'epoch_it'))
    load_optimizer_state(optimizer, ckpt.get('optimizer_state'), path)
    restore_scheduler(scheduler, ckpt.get('scheduler_state'), step)
    if ckpt.get('scaler_state'):
        scaler.load_state_dict(ckpt['scaler_state'])
    set_rng_state(ckpt.get('rng_state'))
    logger.info('resumed from %s (epoch %d%s, step %d)', path, epoch,
                f' + {epoch_it} batches' if epoch_it else '', step)
    return epoch, step, epoch_it


def _train_one_epoch(model, loader, optimizer, scheduler, scaler, device, amp, accum, epoch,
                     epochs, step, start_it, opt_cfg, stop, opts, writer, iter_log, rank):
    """One pass over ``loader``; returns (global step, epoch stats, batches done)."""
    model.train()
    clip = float(opt_cfg.get('GRAD_NORM_CLIP', 10))
    n = len(loader)
    bar = tqdm.tqdm(total=n, initial=start_it, desc=f'epoch {epoch + 1}/{epochs}',
                    dynamic_ncols=True, leave=True, mininterval=0.5,
                    disable=not opts.progress or rank != 0)
    loss_sum, loss_count, skipped = 0.0, 0, 0
    done = start_it
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast('cuda', dtype=torch.float16) if amp else nullcontext()
    for batch in loader:
        load_data_to_device(batch, device)
        with autocast:
            ret_dict, tb_dict, disp_dict = model(batch)
            loss = ret_dict['loss'].mean()
        done += 1
        last_of_group = (done - start_it) % accum == 0 or done == n
        # under DDP: the global loss for the logs; skip and stop at the same step on all ranks
        step_loss, signum = dist_utils.sync_step(loss.item(), stop.signum)
        if not math.isfinite(step_loss):
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            iter_log.warning('epoch %d it %d: non-finite loss %s, step skipped', epoch + 1,
                             done, step_loss)
            if skipped >= 20:
                raise PcdetFocalError('20 non-finite losses in one epoch: lower '
                                      'OPTIMIZATION.LR or check the data for NaN/inf values')
        else:
            scaler.scale(loss / accum).backward()
            loss_sum += loss.item()
            loss_count += 1
        if last_of_group:
            grad_norm = optimizer_step(model, optimizer, scaler, clip)
            if step + 1 < getattr(scheduler, 'total_steps', float('inf')):
                scheduler.step()  # OneCycleLR refuses to step past its last step
            step += 1
            lr = optimizer.param_groups[0]['lr']
            if writer is not None:
                writer.add_scalar('train/loss', step_loss, step)
                writer.add_scalar('meta_data/learning_rate', lr, step)
                for key, val in tb_dict.items():
                    writer.add_scalar(f'train/{key}', float(val), step)
            if step % opts.logger_iter_interval == 0:
                iter_log.info('epoch %d it %d/%d step %d: loss %.4f lr %.2e grad_norm %.2f %s',
                              epoch + 1, done, n, step, step_loss, lr, float(grad_norm),
                              ' '.join(f'{k} {float(v):.4f}' for k, v in tb_dict.items()))
            bar.set_postfix(loss=f'{step_loss:.3f}', lr=f'{lr:.1e}', refresh=False)
            if opts.max_steps is not None and step >= opts.max_steps:
                bar.update()
                break
        bar.update()
        if signum is not None and last_of_group:
            break
    bar.close()
    mean_loss = dist_utils.all_reduce_mean(loss_sum / max(1, loss_count))
    stats = {'loss': mean_loss, 'lr': optimizer.param_groups[0]['lr']}
    if skipped:
        stats['skipped_steps'] = skipped
    return step, stats, done
