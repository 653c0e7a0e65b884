"""The evaluation job behind ``tools/test.py``."""
import time
from pathlib import Path

from .. import backend as backends
from . import dist as dist_utils
from .checkpoint import load_checkpoint, load_model_state
from .dataloader import build_eval_loader
from .evaluator import evaluate_model
from .trainer import pick_device, run_dir_for
from .utils import create_logger, describe_device


def test(cfg, args):
    """Evaluate ``args.ckpt`` on the test split of ``cfg``; returns the AP dict (rank 0)."""
    device = pick_device(args.device)
    rank, world_size, _ = dist_utils.init_distributed(args.launcher, device.type,
                                                      getattr(args, 'tcp_port', None))
    try:
        return _test(cfg, args, device, rank, world_size)
    finally:
        dist_utils.cleanup()


def _test(cfg, args, device, rank, world_size):
    ckpt_path = Path(args.ckpt)
    ckpt = load_checkpoint(ckpt_path)  # fail fast, before building anything
    result_dir = run_dir_for(cfg, args) / 'eval' / ckpt_path.stem
    logger = create_logger(result_dir / f'log_eval_{time.strftime("%Y%m%d-%H%M%S")}.txt', rank)
    logger.info('device: %s', describe_device(device))
    backend = backends.resolve_backend(args.backend)
    logger.info('backend: %s', backend)
    test_set = backends.build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, False, backend, logger)
    model = backends.build_network(cfg.MODEL, len(cfg.CLASS_NAMES), test_set, backend)
    load_model_state(model, ckpt['model_state'], path=str(ckpt_path), strict=True)
    model.to(device)
    batch_size = dist_utils.per_process_batch(args.batch_size, world_size,
                                              (cfg.get('OPTIMIZATION') or {}).get('BATCH_SIZE_PER_GPU', 1))
    loader = build_eval_loader(test_set, batch_size, args.workers, rank, world_size)
    result_str, result_dict = evaluate_model(model, loader, device, cfg.CLASS_NAMES, result_dir,
                                             save_to_file=args.save_to_file,
                                             progress=args.progress,
                                             bev_frames=args.bev_frames)
    if result_str is not None:
        logger.info('checkpoint %s (epoch %s) on %d frames:\n%s', ckpt_path,
                    ckpt.get('epoch', '?'), len(test_set), result_str)
        logger.info('saved %s', result_dir / 'result.txt')
    return result_dict
