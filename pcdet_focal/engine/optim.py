"""Optimizer and LR schedule from OpenPCDet's OPTIMIZATION block.

OPTIMIZER: ``adam_onecycle`` (OpenPCDet's default: AdamW + one-cycle LR and momentum),
``adamw``, ``adam`` or ``sgd``. The one-cycle schedule is stepped once per optimizer step.
"""
import torch

from ..errors import ConfigError

OPTIMIZERS = ('adam_onecycle', 'adamw', 'adam', 'sgd')


def _param_groups(model, weight_decay):
    """No weight decay on biases and norm weights (1-d parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(model, opt_cfg):
    name = str(opt_cfg.get('OPTIMIZER', 'adam_onecycle')).lower()
    lr = float(opt_cfg.get('LR', 0.003))
    wd = float(opt_cfg.get('WEIGHT_DECAY', 0.01))
    if lr <= 0:
        raise ConfigError(f'OPTIMIZATION.LR must be > 0, got {lr}')
    groups = _param_groups(model, wd)
    if name in ('adam_onecycle', 'adamw'):
        moms = opt_cfg.get('MOMS', [0.95, 0.85])
        return torch.optim.AdamW(groups, lr=lr, betas=(float(moms[0]), 0.99))
    if name == 'adam':
        return torch.optim.Adam(groups, lr=lr)
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=float(opt_cfg.get('MOMENTUM', 0.9)))
    raise ConfigError(f'OPTIMIZATION.OPTIMIZER: unknown {name!r}; use one of {", ".join(OPTIMIZERS)}')


def build_scheduler(optimizer, opt_cfg, total_steps):
    """One-cycle LR (and momentum) for adam_onecycle; a constant LR otherwise."""
    name = str(opt_cfg.get('OPTIMIZER', 'adam_onecycle')).lower()
    total_steps = max(1, int(total_steps))
    if name == 'adam_onecycle':
        moms = opt_cfg.get('MOMS', [0.95, 0.85])
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=float(opt_cfg.LR), total_steps=total_steps,
            pct_start=float(opt_cfg.get('PCT_START', 0.4)),
            div_factor=float(opt_cfg.get('DIV_FACTOR', 10)),
            final_div_factor=float(opt_cfg.get('FINAL_DIV_FACTOR', 1e4)),
            base_momentum=float(moms[1]), max_momentum=float(moms[0]),
            cycle_momentum=True, anneal_strategy='cos')
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
