"""Optimizer and LR schedule from OpenPCDet's OPTIMIZATION block.

OPTIMIZER: ``adam_onecycle`` (OpenPCDet's default: AdamW + one-cycle LR and momentum),
``adam_cosineanneal`` (AdamW, linear warm-up then cosine LR, OpenPCDet's BEVFusion schedule),
``adamw``, ``adam`` or ``sgd``. Schedules are stepped once per optimizer step.
"""
import math

import torch

from ..errors import ConfigError
from ..schema import REQUIRED, AnyValue, Bool, Choice, Float, Int, Key, ListOf, Schema

OPTIMIZERS = ('adam_onecycle', 'adam_cosineanneal', 'adamw', 'adam', 'sgd')
_ADAMW = ('adam_onecycle', 'adam_cosineanneal', 'adamw')
_UNUSED = "OpenPCDet's key (unused here: its step-decay / warm-up schedules)"

OPTIMIZATION_CONFIG = Schema('OPTIMIZATION', [
    Key('BATCH_SIZE_PER_GPU', Int(lo=1), REQUIRED, 'samples per process and step'),
    Key('NUM_EPOCHS', Int(lo=1), REQUIRED, 'passes over the training split'),
    Key('OPTIMIZER', Choice(*OPTIMIZERS, lower=True), 'adam_onecycle',
        'adam_onecycle = AdamW with one-cycle LR and momentum'),
    Key('LR', Float(lo=0, lo_open=True), REQUIRED, 'peak learning rate'),
    Key('WEIGHT_DECAY', Float(lo=0), 0.01, 'AdamW / Adam / SGD weight decay (not on biases '
        'and norms)'),
    Key('MOMENTUM', Float(lo=0, hi=1), 0.9, 'sgd momentum'),
    Key('MOMS', ListOf(Float(lo=0, hi=1), length=2), [0.95, 0.85],
        'adam_onecycle / adam_cosineanneal: [max, base] beta1 of the cycle'),
    Key('PCT_START', Float(lo=0, hi=1, lo_open=True, hi_open=True), 0.4,
        'adam_onecycle: share of steps rising to LR (adam_cosineanneal: beta1 falling)'),
    Key('WARMUP_ITER', Int(lo=0), 0, 'adam_cosineanneal: linear warm-up steps from LR / 3'),
    Key('DIV_FACTOR', Float(lo=0, lo_open=True), 10, 'adam_onecycle: start LR = LR / this'),
    Key('FINAL_DIV_FACTOR', Float(lo=0, lo_open=True), 1e4,
        'adam_onecycle: final LR = start LR / this'),
    Key('GRAD_NORM_CLIP', Float(lo=0, lo_open=True), 10, 'gradient norm clipping'),
    Key('ACCUMULATION_STEPS', Int(lo=1), 1, "batches per optimizer step (pcdet-focal's "
        "trainer; OpenPCDet's train.py ignores it)"),
    Key('USE_AMP', Bool(), False, 'mixed precision on CUDA (as --use_amp)'),
    Key('FIND_UNUSED_PARAMETERS', Bool(), False, 'DDP find_unused_parameters'),
    *(Key(name, AnyValue(), None, _UNUSED) for name in (
        'DECAY_STEP_LIST', 'LR_DECAY', 'LR_CLIP', 'LR_WARMUP', 'WARMUP_EPOCH', 'BETAS',
        'LOSS_SCALE_FP16')),
])


def _param_groups(model, weight_decay):
    """No weight decay on biases and norm weights (1-d parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def optimization(opt_cfg):
    """OPTIMIZATION checked against its declaration (defaults filled in)."""
    if opt_cfg is None:
        raise ConfigError('OPTIMIZATION is missing; training needs BATCH_SIZE_PER_GPU, '
                          'NUM_EPOCHS and LR (README: "OPTIMIZATION")')
    return OPTIMIZATION_CONFIG.parse(opt_cfg, 'OPTIMIZATION')


def build_optimizer(model, opt_cfg):
    cfg = optimization(opt_cfg)
    groups = _param_groups(model, cfg.WEIGHT_DECAY)
    if cfg.OPTIMIZER in _ADAMW:
        return torch.optim.AdamW(groups, lr=cfg.LR, betas=(cfg.MOMS[0], 0.99))
    if cfg.OPTIMIZER == 'adam':
        return torch.optim.Adam(groups, lr=cfg.LR)
    return torch.optim.SGD(groups, lr=cfg.LR, momentum=cfg.MOMENTUM)


def optimizer_step(model, optimizer, scaler, clip):
    """The end of a training step as the trainer runs it: unscale the gradients (AMP), clip
    their norm to ``clip``, step, update the scaler, drop the gradients. Returns the norm."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def build_scheduler(optimizer, opt_cfg, total_steps):
    """One-cycle LR (and momentum) for adam_onecycle; a constant LR otherwise."""
    cfg = optimization(opt_cfg)
    total_steps = max(1, int(total_steps))
    if cfg.OPTIMIZER == 'adam_onecycle':
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.LR, total_steps=total_steps, pct_start=cfg.PCT_START,
            div_factor=cfg.DIV_FACTOR, final_div_factor=cfg.FINAL_DIV_FACTOR,
            base_momentum=cfg.MOMS[1], max_momentum=cfg.MOMS[0], cycle_momentum=True,
            anneal_strategy='cos')
    if cfg.OPTIMIZER == 'adam_cosineanneal':
        return CosineAnnealing(optimizer, total_steps, cfg.LR, cfg.MOMS, cfg.PCT_START,
                               cfg.WARMUP_ITER)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _cos(start, end, pct):
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


class CosineAnnealing(torch.optim.lr_scheduler.LRScheduler):
    """OpenPCDet's adam_cosineanneal schedule, per step: LR rises linearly from LR / 3 over
    ``warmup`` steps, then falls along a cosine to LR / 1000 at the last step (OpenPCDet moves
    it once per epoch); beta1 falls along a cosine from moms[0] to moms[1] over ``pct_start``
    of the steps and rises back after."""

    def __init__(self, optimizer, total_steps, lr, moms, pct_start, warmup):
        self.total, self.lr_max, self.warmup = int(total_steps), float(lr), int(warmup)
        self.moms, self.pct_start = [float(m) for m in moms], float(pct_start)
        super().__init__(optimizer)

    def get_lr(self):
        step = self.last_epoch
        if step < self.warmup:
            lr = self.lr_max * (1 - (1 - step / self.warmup) * (2 / 3))
        else:
            lr = _cos(self.lr_max, self.lr_max * 1e-3, min(1.0, step / self.total))
        turn = max(1, int(self.pct_start * self.total))
        beta1 = (_cos(self.moms[0], self.moms[1], step / turn) if step < turn else
                 _cos(self.moms[1], self.moms[0], min(1.0, (step - turn) /
                                                      max(1, self.total - turn))))
        for group in self.optimizer.param_groups:
            group['betas'] = (beta1, group['betas'][1])
        return [lr for _ in self.optimizer.param_groups]
