"""Evaluation loop: predictions for a dataset split, gathered across ranks, then AP."""
import json
import logging
import time
from pathlib import Path

import torch
import tqdm

from ..errors import DataError
from ..viz import DEFAULT_BEV_FRAMES, best_effort
from ..viz.bev import write_eval_bev
from . import dist as dist_utils
from .checkpoint import unwrap
from .dataloader import ShardSampler
from .utils import load_data_to_device

logger = logging.getLogger('pcdet_focal')


@torch.no_grad()
def predict(model, loader, device, class_names, output_dir=None, progress=True):
    """Run the model on every batch of ``loader``; returns det annos ordered by frame index.

    With torch.distributed each rank predicts its shard (an uneven count is fine) and every
    rank receives all of them; a frame predicted twice or never is an error, not a silently
    wrong AP.
    """
    dataset = loader.dataset
    model.eval()
    annos = []
    indices = list(iter(loader.sampler))
    bar = tqdm.tqdm(total=len(loader), desc='eval', leave=False, dynamic_ncols=True,
                    disable=not progress or dist_utils.get_rank() != 0, mininterval=1.0)
    start = time.time()
    for batch in loader:
        load_data_to_device(batch, device)
        pred_dicts, _ = model(batch)
        annos += dataset.generate_prediction_dicts(batch, pred_dicts, class_names,
                                                   output_path=output_dir)
        bar.update()
    bar.close()
    seconds = time.time() - start
    if len(annos) != len(indices):
        raise DataError(f'{type(dataset).__name__}.generate_prediction_dicts returned '
                        f'{len(annos)} annos for {len(indices)} frames: it must return one per '
                        'sample of the batch')
    gathered = dist_utils.all_gather_object(list(zip(indices, annos)))
    merged = sorted((pair for part in gathered for pair in part), key=lambda p: p[0])
    _check_each_frame_once([i for i, _ in merged], len(dataset), loader.sampler)
    frames = len(merged)
    logger.info('predicted %d frames in %.1f s (%.1f ms/frame on this process)', frames, seconds,
                1000 * seconds / max(1, len(annos)))
    return [anno for _, anno in merged]


def _check_each_frame_once(order, dataset_len, sampler):
    """order: sorted frame indices gathered from all ranks; DataError on a duplicate or, for
    the ShardSampler (which covers the whole split), on a missing frame."""
    dup = sorted({a for a, b in zip(order, order[1:]) if a == b})
    missing = sorted(set(range(dataset_len)) - set(order)) if isinstance(sampler, ShardSampler) \
        else []
    if dup or missing:
        raise DataError(f'evaluation gathered frame(s) {dup[:5]} more than once and missed '
                        f'{missing[:5]} (of {dataset_len}): every rank must build the same '
                        'evaluation split')


def evaluate_model(model, loader, device, class_names, result_dir=None, save_to_file=False,
                   progress=True, bev_frames=DEFAULT_BEV_FRAMES):
    """Predict + ``dataset.evaluation``; rank 0 prints and saves the AP table and draws
    ``bev_<frame_id>.png`` of the first ``bev_frames`` frames beside it (0: none).

    Returns ``(result_str, result_dict)`` on rank 0, ``(None, None)`` elsewhere.
    """
    result_dir = Path(result_dir) if result_dir is not None else None
    pred_dir = None
    if save_to_file and result_dir is not None:
        pred_dir = result_dir / 'final_result' / 'data'
        pred_dir.mkdir(parents=True, exist_ok=True)
    det_annos = predict(unwrap(model), loader, device, class_names, output_dir=pred_dir,
                        progress=progress)
    if dist_utils.get_rank() != 0:
        return None, None
    result_str, result_dict = loader.dataset.evaluation(det_annos, class_names)
    if result_dir is not None:
        result_dir.mkdir(parents=True, exist_ok=True)
        (result_dir / 'result.txt').write_text(result_str + '\n', encoding='utf-8')
        (result_dir / 'result.json').write_text(
            json.dumps({k: float(v) for k, v in result_dict.items()}, indent=1) + '\n')
        best_effort('BEV pictures', write_eval_bev, loader.dataset, det_annos, result_dir,
                    bev_frames)
    return result_str, result_dict
