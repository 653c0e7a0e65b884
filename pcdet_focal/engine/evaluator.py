"""Evaluation loop: predictions for a dataset split, gathered across ranks, then AP."""
import json
import logging
import time
from pathlib import Path

import torch
import tqdm

from . import dist as dist_utils
from .checkpoint import unwrap
from .utils import load_data_to_device

logger = logging.getLogger('pcdet_focal')


@torch.no_grad()
def predict(model, loader, device, class_names, output_dir=None, progress=True):
    """Run the model on every batch of ``loader``; returns det annos ordered by frame index.

    With torch.distributed each rank predicts its shard and rank 0 receives all of them.
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
    gathered = dist_utils.all_gather_object(list(zip(indices, annos)))
    merged = sorted((pair for part in gathered for pair in part), key=lambda p: p[0])
    frames = len(merged)
    logger.info('predicted %d frames in %.1f s (%.1f ms/frame on this process)', frames, seconds,
                1000 * seconds / max(1, len(annos)))
    return [anno for _, anno in merged]


def evaluate_model(model, loader, device, class_names, result_dir=None, save_to_file=False,
                   progress=True):
    """Predict + ``dataset.evaluation``; rank 0 prints and saves the AP table.

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
    return result_str, result_dict
