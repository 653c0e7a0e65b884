"""Loss and AP curves of one run, read from its ``metrics.jsonl``.

``metrics.jsonl`` (written by the trainer) holds one JSON object a line: per epoch
``{'epoch', 'step', 'seconds', 'loss', 'lr', ...}``, per evaluation ``{'eval_epoch', '<class>_
<metric>_R40_<iou>[_<difficulty>]': AP in [0, 1], ...}``. The picture has the mean training
loss (and the learning rate, right axis) over epochs on the left and, when the run was
evaluated, the AP over all difficulties on the right: per class the loosest IoU threshold, BEV
solid and 3D dashed.
"""
import json
import logging
import re
from pathlib import Path

from .canvas import matplotlib_available, new_figure, save_figure

logger = logging.getLogger('pcdet_focal')

LOSS_COLOR = '#1f77b4'
LR_COLOR = '#9a9a9a'
CLASS_COLORS = ['#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#17becf']
_AP_KEY = re.compile(r'^(?P<cls>.+)_(?P<metric>bev|3d)_R40_(?P<iou>[0-9.]+)$')


def read_metrics(path):
    """``metrics.jsonl`` -> (epoch records, eval records), each sorted by epoch. Lines that are
    not JSON objects (a line cut short by a killed run) are skipped and counted in a log line."""
    epochs, evals, bad = [], [], 0
    for line in Path(path).read_text(encoding='utf-8').splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
        elif 'eval_epoch' in rec:
            evals.append(rec)
        elif 'epoch' in rec and 'loss' in rec:
            epochs.append(rec)
    if bad:
        logger.info('%s: %d line(s) that are not JSON objects skipped', path, bad)
    return (sorted(epochs, key=lambda r: r['step'] if 'step' in r else r['epoch']),
            sorted(evals, key=lambda r: r['eval_epoch']))


def ap_series(evals):
    """Eval records -> {(class, metric, iou): [(epoch, AP), ...]} for the all-difficulty keys,
    keeping per class only its loosest IoU threshold (the one every model reaches first)."""
    series = {}
    for rec in evals:
        for key, value in rec.items():
            m = _AP_KEY.match(key)
            if m:
                k = (m['cls'], m['metric'], float(m['iou']))
                series.setdefault(k, []).append((rec['eval_epoch'], float(value)))
    loosest = {}
    for cls, _, iou in series:
        loosest[cls] = min(iou, loosest.get(cls, iou))
    return {k: v for k, v in series.items() if k[2] == loosest[k[0]]}


def draw_curves(metrics_file, path, title=''):
    """Write the loss / AP picture of ``metrics_file`` to ``path``; returns the Path, or None
    (no matplotlib, no file, or no epoch record yet)."""
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return None
    epochs, evals = read_metrics(metrics_file)
    if not epochs:
        return None
    if not matplotlib_available('training curves picture'):
        return None
    aps = ap_series(evals)
    from matplotlib.ticker import MaxNLocator
    fig = new_figure(11.0 if aps else 6.0, 4.2)
    # legends below the plots, so no line or marker hides behind one
    fig.subplots_adjust(left=0.08 if aps else 0.13, right=0.95 if aps else 0.85, bottom=0.27,
                        top=0.86, wspace=0.4)
    ax = fig.add_subplot(1, 2 if aps else 1, 1)
    x = [r['epoch'] for r in epochs]
    ax.plot(x, [r['loss'] for r in epochs], color=LOSS_COLOR, marker='o', markersize=4,
            linewidth=1.8, label='mean training loss')
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel('loss')
    ax.grid(True, color='#e0e0e0')
    if all('lr' in r for r in epochs):
        ax_lr = ax.twinx()
        ax_lr.plot(x, [r['lr'] for r in epochs], color=LR_COLOR, linewidth=1.0,
                   linestyle=':', label='learning rate (end of epoch)')
        ax_lr.set_ylabel('learning rate', color=LR_COLOR)
        ax_lr.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
        handles = ax.get_legend_handles_labels()
        extra = ax_lr.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc='upper center',
                  bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=7, frameon=False)
    ax.set_title('training loss', fontsize=10)
    if aps:
        ax2 = fig.add_subplot(1, 2, 2)
        classes = list(dict.fromkeys(k[0] for k in aps))
        for (cls, metric, iou), pts in sorted(aps.items(), key=lambda kv: (
                classes.index(kv[0][0]), kv[0][1] != 'bev')):
            color = CLASS_COLORS[classes.index(cls) % len(CLASS_COLORS)]
            ax2.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=color,
                     marker='o' if metric == 'bev' else 's', markersize=5,
                     linestyle='-' if metric == 'bev' else '--',
                     label=f'{cls} {metric.upper()} @{iou:.2f}')
        ax2.set_xlabel('epoch')
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_ylabel('AP R40 (%)')
        ax2.set_ylim(0, 100)
        ax2.set_xlim(0.5, max(max(x), max(r['eval_epoch'] for r in evals)) + 0.5)
        ax2.grid(True, color='#e0e0e0')
        ax2.legend(loc='upper center', bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=7,
                   frameon=False)
        ax2.set_title('evaluation AP', fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
