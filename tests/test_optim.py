"""OPTIMIZATION schedules against OpenPCDet's formulas, written out here."""
import io
import math

import pytest
import torch
from easydict import EasyDict

from pcdet_focal.engine.optim import build_optimizer, build_scheduler


def openpcdet_cosineanneal(step, total, lr, moms, pct_start, warmup):
    """OpenPCDet's CosineAnnealing.step (learning_schedules_fastai), with the epoch fraction
    replaced by the step fraction."""
    def cos(start, end, pct):
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
    if step < warmup:
        new_lr = lr * (1 - (1 - step / warmup) * (1 - 0.33333333))
    else:
        new_lr = cos(lr, lr * 0.001, step / total)
    turn = int(pct_start * total)
    mom = cos(moms[0], moms[1], step / turn) if step < turn else \
        cos(moms[1], moms[0], (step - turn) / (total - turn))
    return new_lr, mom


def test_adam_cosineanneal_follows_openpcdet():
    cfg = EasyDict(BATCH_SIZE_PER_GPU=1, NUM_EPOCHS=1, OPTIMIZER='adam_cosineanneal', LR=0.01,
                   WARMUP_ITER=10, PCT_START=0.4, MOMS=[0.95, 0.85])
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    total = 100
    sched = build_scheduler(opt, cfg, total)
    for step in range(total):
        lr, mom = openpcdet_cosineanneal(step, total, 0.01, [0.95, 0.85], 0.4, 10)
        assert opt.param_groups[0]['lr'] == pytest.approx(lr, rel=1e-6), step
        assert opt.param_groups[0]['betas'][0] == pytest.approx(mom, rel=1e-9), step
        opt.step()
        sched.step()
    # the schedule resumes from a checkpoint read with weights_only=True
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    again = build_scheduler(build_optimizer(model, cfg), cfg, total)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.last_epoch == total
