"""Text table and JSON of an estimate / verdict (what tools/estimate_mem.py prints)."""
from .verdict import ALLOCATOR_SLACK, CUDA_CONTEXT, GIB, NCCL_BUFFERS, margin_text, needed

MIB = 2 ** 20


def fmt_bytes(n):
    if n is None:
        return '-'
    if n >= GIB:
        return f'{n / GIB:.2f} GiB'
    if n >= MIB:
        return f'{n / MIB:.1f} MiB'
    if n > 0:
        return f'{n / 1024:.1f} KiB'
    return '0'


def fmt_params(n):
    if not n:
        return '-'
    if n >= 1e6:
        return f'{n / 1e6:.2f} M'
    return f'{n / 1e3:.1f} k'


def _shorten(text, width):
    return text if len(text) <= width else text[:width - 3] + '...'


def estimate_lines(e):
    kernels = f'CUDA ({e.stack})' if e.target == 'cuda' else 'CPU'
    lines = [f'memory estimate: {e.cfg_file}',
             f'batch size {e.batch_size} per device'
             + (f' x {e.world_size} processes (DDP)' if e.world_size > 1 else '')
             + f', {"AMP (fp16 autocast)" if e.amp else "fp32"}, modules built by the '
             f'{e.host} host, kernels modelled for {kernels}',
             f'counts: {e.voxels.describe()}']
    if e.peak_bytes is None:
        lines.append('not modelled (no memory rule, so no estimate): ' + '; '.join(e.not_modelled))
        return lines
    lines.append('geometry:')
    lines += [f'  {g}' for g in e.geometry]
    if e.flattened_bev_channels is not None:
        lines.append(f'  flattened BEV channels: {e.flattened_bev_channels}')
    lines.append(
        f'persistent: parameters {fmt_params(e.params)} ({fmt_bytes(e.param_bytes)}), '
        f'buffers {fmt_bytes(e.buffer_bytes)}, {e.optimizer} state '
        f'{fmt_bytes(e.optimizer_bytes)}, gradients {fmt_bytes(e.grad_bytes)}'
        + (f' (kept across {e.accumulation_steps} accumulation steps)'
           if e.accumulation_steps > 1 else '')
        + (f', module state carried between steps {fmt_bytes(e.state_bytes)}'
           if e.state_bytes else '')
        + (f', DDP gradient buckets {fmt_bytes(e.ddp_bytes)}' if e.ddp_bytes else ''))
    head = f'{"module":34s} {"params":>9s} {"activations":>12s} {"largest transient":>18s} ' \
           f'{"running peak":>13s}'
    lines += ['', head, '-' * len(head)]
    for r in e.rows:
        name = r.name + ('' if r.modelled else ' [not modelled]')
        lines.append(f'{_shorten(name, 34):34s} {fmt_params(r.params):>9s} '
                     f'{fmt_bytes(r.activations):>12s} {fmt_bytes(r.transient):>18s} '
                     f'{fmt_bytes(r.running_peak):>13s}')
    lines.append('-' * len(head))
    for phase in ('forward', 'backward', 'optimizer step'):
        if phase in e.phase_peaks:
            lines.append(f'{phase + " peak":34s} {"":9s} {"":12s} {"":18s} '
                         f'{fmt_bytes(e.phase_peaks[phase]):>13s}')
    lines.append('')
    lines.append(f'PEAK: {fmt_bytes(e.peak_bytes)} in the {e.peak_phase} of {e.peak_module}'
                 + (f' ({e.peak_label})' if e.peak_label else '')
                 + (f'; allocator reserved (simulated) {fmt_bytes(e.reserved_bytes)}'
                    if e.reserved_bytes else ''))
    if e.transient_bytes:
        lines.append(f'largest transient: {fmt_bytes(e.transient_bytes)} = {e.transient_label} '
                     f'in {e.transient_module}')
    for r in e.rows:
        for n in r.notes:
            lines.append(f'note [{r.name}]: {n}')
    for n in e.notes:
        lines.append(f'note: {n}')
    for key, why in e.unbounded:
        lines.append(f'no bound: {key}: {why}')
    return lines


def verdict_lines(v):
    lines = estimate_lines(v.estimate)
    lines.append('')
    if v.word == 'NOT_MODELLED':
        lines.append(v.summary())
        return lines
    if not v.has_budget:
        lines.append(f'no budget: {v.budget_source}; pass --vram GiB to get FITS / REJECT '
                     '(estimate printed only)')
        if not v.estimate.bounded:
            lines.append(f'UNBOUNDED: {v.reason}')
        return lines
    lines.append(f'budget: {fmt_bytes(v.budget_bytes)} ({v.budget_source}); {margin_text(v.estimate.world_size)}; '
                 f'needed: {fmt_bytes(v.required_bytes)}')
    lines.append(v.summary())
    if v.suggestions:
        lines.append('suggestions (each re-estimated; each fits):')
        for i, s in enumerate(v.suggestions, 1):
            lines.append(f'  {i}. {s.line()}')
    elif not v.fits:
        lines.append('no suggested change fits this budget')
    return lines


def _row_json(r):
    return {'module': r.name, 'slot': r.kind, 'modelled': r.modelled, 'params': r.params,
            'param_bytes': r.param_bytes, 'activation_bytes': r.activations,
            'transient_bytes': r.transient, 'transient': r.transient_label,
            'forward_peak_bytes': r.fwd_peak, 'running_peak_bytes': r.running_peak,
            'backward_peak_bytes': r.bwd_peak, 'notes': list(r.notes)}


def estimate_json(e):
    vc = e.voxels
    counts = {'per_sample': vc.per_sample, 'source': vc.source,
              'points_per_sample': vc.points_per_sample,
              'frames': ({'count': len(vc.frames), 'ids': vc.frame_ids, 'median': vc.median,
                          'max': vc.per_sample} if vc.frames else None),
              'cap': vc.cap}
    if e.peak_bytes is None:
        return None
    return {
        'config': e.cfg_file, 'batch_size': e.batch_size, 'amp': e.amp, 'target': e.target,
        'host': e.host, 'stack': e.stack, 'world_size': e.world_size,
        'bounded': e.bounded, 'unbounded': [{'key': k, 'why': w} for k, w in e.unbounded],
        'voxels': counts,
        'geometry': list(e.geometry), 'flattened_bev_channels': e.flattened_bev_channels,
        'params': e.params, 'param_bytes': e.param_bytes, 'buffer_bytes': e.buffer_bytes,
        'optimizer': e.optimizer, 'optimizer_bytes': e.optimizer_bytes,
        'grad_bytes': e.grad_bytes, 'accumulation_steps': e.accumulation_steps,
        'state_bytes': e.state_bytes,
        'modules': [_row_json(r) for r in e.rows],
        'phase_peak_bytes': dict(e.phase_peaks),
        'peak_bytes': e.peak_bytes, 'peak_gib': round(e.peak_bytes / GIB, 4),
        'peak_phase': e.peak_phase, 'peak_module': e.peak_module,
        'largest_transient': {'bytes': e.transient_bytes, 'what': e.transient_label,
                              'module': e.transient_module},
        'allocated_bytes': e.peak_bytes, 'reserved_bytes': e.reserved_bytes,
        'ddp_bytes': e.ddp_bytes, 'notes': list(e.notes),
    }


def verdict_json(v):
    out = {'estimate': estimate_json(v.estimate), 'not_modelled': list(v.estimate.not_modelled)}
    if not v.has_budget or v.word == 'NOT_MODELLED':
        out['verdict'] = 'ESTIMATE_ONLY' if v.word == 'ESTIMATE' else v.word
        out['budget'] = None
        out['budget_source'] = v.budget_source
    else:
        out['verdict'] = v.word
        out['budget'] = {'bytes': v.budget_bytes, 'source': v.budget_source,
                         'required_bytes': v.required_bytes,
                         'margin': {'allocator_slack': ALLOCATOR_SLACK,
                                    'cuda_context_bytes': CUDA_CONTEXT,
                                    'nccl_buffers_bytes': NCCL_BUFFERS
                                    if v.estimate.world_size > 1 else 0}}
        out['max_batch_size'] = v.max_batch_size
    out['reason'] = v.reason
    out['summary'] = v.summary()
    out['suggestions'] = [{'kind': s.kind, 'title': s.title, 'peak_bytes': s.peak_bytes,
                           'required_bytes': s.required_bytes, 'fits': True,
                           'batch_size': s.batch_size, 'amp': s.amp,
                           'changes': _plain(s.changes)} for s in v.suggestions]
    return out


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
