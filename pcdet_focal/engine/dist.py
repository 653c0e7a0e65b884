"""torch.distributed setup and helpers: ``--launcher none | pytorch | slurm``.

- ``pytorch``: started by torchrun (one node or many), which sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
- ``slurm``: started by ``srun`` (one task per GPU), as OpenPCDet's ``--launcher slurm``: rank,
  world size and local rank come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, the
  master address is the first host of SLURM_NODELIST (expanded here, no ``scontrol`` needed),
  the port is ``--tcp_port``, else MASTER_PORT, else OpenPCDet's 18888.

NCCL on CUDA, gloo on CPU. A missing or inconsistent variable is a ConfigError naming it.
"""
import os
import re

import torch
import torch.distributed as dist

from ..errors import ConfigError

LAUNCHERS = ('none', 'pytorch', 'slurm')
DEFAULT_SLURM_PORT = 18888  # OpenPCDet's --tcp_port default
_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def backend_for(device_type):
    """Process-group backend for a device type: 'nccl' for 'cuda', 'gloo' otherwise."""
    return 'nccl' if device_type == 'cuda' else 'gloo'


def init_distributed(launcher, device_type, tcp_port=None):
    """Initialise the process group for ``launcher``; returns ``(rank, world_size, local_rank)``.

    ``(0, 1, 0)`` for launcher 'none'. On CUDA the process's device becomes ``cuda:local_rank``.
    tcp_port: the rendezvous port for 'slurm' (None: MASTER_PORT, else 18888).
    """
    if launcher == 'none':
        return 0, 1, 0
    if launcher == 'pytorch':
        env = _torchrun_environment(os.environ)
    elif launcher == 'slurm':
        env = slurm_environment(os.environ, tcp_port)
        os.environ.update(env)  # init_process_group's env:// reads them
    else:
        raise ConfigError(f'--launcher {launcher!r}: use one of {", ".join(LAUNCHERS)}')
    local_rank = int(env['LOCAL_RANK'])
    if device_type == 'cuda':
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            name = 'SLURM_LOCALID' if launcher == 'slurm' else 'LOCAL_RANK'
            raise ConfigError(f'{name}={local_rank} but this node has {n_gpus} GPU(s): start at '
                              'most one process per GPU (torchrun --nproc_per_node, srun '
                              '--ntasks-per-node)')
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device_type))
    return dist.get_rank(), dist.get_world_size(), local_rank


def per_process_batch(batch_size, world_size, default):
    """Batch of one process. ``--batch_size`` is the total over all processes (OpenPCDet's
    convention) and must divide among them; without it (None) every process takes ``default``
    (OPTIMIZATION.BATCH_SIZE_PER_GPU)."""
    if batch_size is None:
        return default
    if world_size > 1 and int(batch_size) % world_size:
        raise ConfigError(f'--batch_size {batch_size} is the total over {world_size} processes '
                          f'(as in OpenPCDet) and must be a multiple of {world_size}')
    return int(batch_size) // world_size


def _int_var(environ, name, launcher_hint):
    text = environ.get(name)
    if text is None or not str(text).strip():
        raise ConfigError(f'{name} is not set: {launcher_hint}')
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f'{name}={text!r} is not an integer') from None
    if value < 0:
        raise ConfigError(f'{name}={value} must be >= 0')
    return value


def _torchrun_environment(environ):
    missing = [k for k in _TORCHRUN_VARS if not environ.get(k)]
    if missing:
        raise ConfigError(f'--launcher pytorch needs torchrun\'s environment ({", ".join(missing)} '
                          'unset); start with: torchrun --nproc_per_node=N tools/train.py ... '
                          '(or tools/scripts/dist_train.sh N ...)')
    hint = 'start with torchrun'
    rank, world = _int_var(environ, 'RANK', hint), _int_var(environ, 'WORLD_SIZE', hint)
    if rank >= world:
        raise ConfigError(f'RANK={rank} must be smaller than WORLD_SIZE={world}')
    return {k: environ[k] for k in _TORCHRUN_VARS}


def slurm_environment(environ, tcp_port=None):
    """SLURM_* variables -> torch.distributed's env:// variables (pure; nothing is changed).

    environ: a mapping like ``os.environ``. Returns ``{'RANK', 'WORLD_SIZE', 'LOCAL_RANK',
    'MASTER_ADDR', 'MASTER_PORT'}`` as strings. ConfigError naming the variable when one is
    missing, not an integer, or inconsistent with the others.
    """
    hint = 'start with srun (tools/scripts/slurm_train.sh), one task per GPU'
    rank = _int_var(environ, 'SLURM_PROCID', hint)
    world = _int_var(environ, 'SLURM_NTASKS', hint)
    local_rank = _int_var(environ, 'SLURM_LOCALID', hint)
    if world < 1:
        raise ConfigError(f'SLURM_NTASKS={world} must be >= 1')
    if rank >= world:
        raise ConfigError(f'SLURM_PROCID={rank} must be smaller than SLURM_NTASKS={world}')
    if local_rank > rank:  # tasks are numbered node by node: a node's k-th task has rank >= k
        raise ConfigError(f'SLURM_LOCALID={local_rank} is larger than SLURM_PROCID={rank}: '
                          'the variables come from different tasks')
    nodelist_var = 'SLURM_NODELIST' if environ.get('SLURM_NODELIST') else 'SLURM_JOB_NODELIST'
    if not environ.get(nodelist_var):
        raise ConfigError(f'SLURM_NODELIST is not set: {hint}')
    hosts = expand_nodelist(environ[nodelist_var], nodelist_var)
    n_nodes = environ.get('SLURM_NNODES') or environ.get('SLURM_JOB_NUM_NODES')
    if n_nodes is not None and str(n_nodes).strip().isdigit() and int(n_nodes) != len(hosts):
        raise ConfigError(f'{nodelist_var}={environ[nodelist_var]!r} names {len(hosts)} host(s) '
                          f'but SLURM_NNODES={n_nodes}')
    if tcp_port is not None:
        port, source = tcp_port, '--tcp_port'
    elif environ.get('MASTER_PORT'):
        port, source = environ['MASTER_PORT'], 'MASTER_PORT'
    else:
        port, source = DEFAULT_SLURM_PORT, 'default'
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f'{source}={port!r} is not a port number') from None
    if not 0 < port < 65536:
        raise ConfigError(f'{source}={port} is not a port number (1..65535)')
    return {'RANK': str(rank), 'WORLD_SIZE': str(world), 'LOCAL_RANK': str(local_rank),
            'MASTER_ADDR': hosts[0], 'MASTER_PORT': str(port)}


_RANGE_RE = re.compile(r'^(\d+)(?:-(\d+))?$')


def expand_nodelist(text, name='SLURM_NODELIST'):
    """Slurm host list -> host names, as ``scontrol show hostnames`` prints them.

    ``'node[01-04,07]'`` -> node01, node02, node03, node04, node07; ``'a[1-2]b,c'`` -> a1b,
    a2b, c; several bracket groups in one name expand as a product (``r[1-2]n[1-2]``). Ranges
    keep the zero padding of their first number. ConfigError naming ``name`` when malformed.
    """
    def fail(why):
        raise ConfigError(f'{name}={text!r}: {why}; expected a slurm host list such as '
                          "'node[01-04,07]' or 'host1,host2'")

    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == '[':
            depth += 1
            if depth > 1:
                fail('nested brackets')
        elif ch == ']':
            depth -= 1
            if depth < 0:
                fail("']' without '['")
        elif ch == ',' and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        fail("'[' without ']'")
    items.append(text[start:])
    hosts = []
    for item in items:
        item = item.strip()
        if not item:
            fail('empty host name')
        hosts += _expand_item(item, fail)
    return hosts


def _expand_item(item, fail):
    """One comma-free host pattern -> its names (recursion over bracket groups)."""
    open_at = item.find('[')
    if open_at < 0:
        if ']' in item:
            fail("']' without '['")
        return [item]
    close_at = item.index(']', open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    tails = _expand_item(rest, fail) if rest else ['']
    names = []
    for part in body.split(','):
        m = _RANGE_RE.match(part.strip())
        if not m:
            fail(f'{part!r} is not a number or a range lo-hi')
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            fail(f'range {part!r} runs backwards')
        width = len(lo)
        names += [f'{prefix}{n:0{width}d}{tail}' for n in range(int(lo), int(hi) + 1)
                  for tail in tails]
    return names


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_object(obj):
    """List of ``obj`` from every rank (a one-element list without distribution)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without distribution)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_step(loss, signum):
    """What all ranks agree on after a forward: ``(mean loss over ranks, signal or None)``.

    loss: this rank's loss (python float); signum: the signal this rank received or None.
    Returns the mean of the losses (non-finite if any rank's is, so every rank skips the same
    step) and the largest signal number received by any rank (so every rank stops at the same
    step: a rank that leaves alone leaves the others waiting in DDP's all-reduce). One
    all-gather of two numbers; ``(loss, signum)`` itself without distribution.
    """
    if not is_distributed():
        return loss, signum
    mine = torch.tensor([float(loss), float(signum or 0)], dtype=torch.float64)
    if dist.get_backend() == 'nccl':
        mine = mine.cuda()
    parts = [torch.empty_like(mine) for _ in range(get_world_size())]
    dist.all_gather(parts, mine)
    table = torch.stack(parts).cpu()
    return float(table[:, 0].mean()), (int(table[:, 1].max()) or None)


def all_reduce_mean(value):
    """Mean of a python float over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == 'nccl':
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() / get_world_size()


def cleanup():
    """Destroy the process group (if any). Every process that initialised one must call this
    before exiting: gloo's threads still running at interpreter exit abort the process
    ("terminate called without an active exception")."""
    if is_distributed():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- DDP

def wrap_ddp(model, device, find_unused_parameters=False):
    """``model`` in DistributedDataParallel (one device per process).

    With gloo (CPU) the gradients are summed in rank order, whatever DDP's bucket layout (see
    :func:`_rank_ordered_allreduce`), so a resumed run adds exactly as the uninterrupted one.
    """
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        find_unused_parameters=bool(find_unused_parameters))
    if dist.get_backend() == 'gloo':
        ddp.register_comm_hook(None, _rank_ordered_allreduce)
    return ddp


def _rank_ordered_allreduce(group, bucket):
    """DDP communication hook: the mean of the ranks' gradients, added rank 0, 1, 2, ...

    gloo's ring all-reduce adds an element's W values in an order set by the element's offset
    in the bucket, and DDP re-packs its buckets after the first step; a run resumed from a
    checkpoint (first step again) would then round differently from the uninterrupted run.
    All-gather + a fixed order costs W x the bucket in memory, fine for CPU training.
    """
    grads = bucket.buffer()
    world = dist.get_world_size(group)
    parts = [torch.empty_like(grads) for _ in range(world)]
    gathered = dist.all_gather(parts, grads, group=group, async_op=True).get_future()

    def add_in_rank_order(_):
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.div_(world)
    return gathered.then(add_in_rank_order)


# ----------------------------------------------------------------------------- SyncBatchNorm

class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches, for CPU tensors (gloo).

    torch's SyncBatchNorm refuses CPU inputs (its kernels are GPU-only). Same maths: forward
    all-reduces per-channel (sum, sum of squares, count) in float64; backward all-reduces
    (sum dy, sum dy * (x - mean)) for the input gradient and keeps this rank's share for the
    weight and bias gradients, which DDP then averages, as torch's version does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        x64 = x.detach().double()
        count = x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count])
        dist.all_reduce(stats)
        n_ch = x.shape[1]
        total = stats[-1].clamp(min=1)
        mean = stats[:n_ch] / total
        var = (stats[n_ch:2 * n_ch] / total - mean * mean).clamp(min=0)
        invstd = torch.rsqrt(var + eps)
        x_hat = ((x64 - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        ctx.save_for_backward(x_hat, weight, invstd.to(x.dtype), stats[-1])
        ctx.dims, ctx.shape = dims, shape
        y = x_hat
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        mean, var, count = mean.to(x.dtype), var.to(x.dtype), stats[-1].clone()
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gc):
        x_hat, weight, invstd, total = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        grad_y = grad_y.contiguous()
        sum_dy = grad_y.sum(dims)
        sum_dy_xhat = (grad_y * x_hat).sum(dims)
        grad_w = grad_b = None
        if weight is not None:
            grad_w, grad_b = sum_dy_xhat.clone(), sum_dy.clone()
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums)
            n_ch = x_hat.shape[1]
            n = total.clamp(min=1).to(grad_y.dtype)
            mean_dy = (sums[:n_ch] / n).view(shape)
            mean_dy_xhat = (sums[n_ch:] / n).view(shape)
            scale = invstd if weight is None else invstd * weight
            grad_x = (grad_y - mean_dy - x_hat * mean_dy_xhat) * scale.view(shape)
        return grad_x, grad_w, grad_b, None


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks, for CPU models (gloo).

    DDP refuses torch.nn.SyncBatchNorm in a CPU model, and torch's kernels for it are
    GPU-only; this is the same layer for CPU. In evaluation, or without torch.distributed, it
    is plain BatchNorm. State (weight, bias, running stats) is BatchNorm's, so checkpoints load
    into the unconverted model.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {input.dim()}D input)')

    def forward(self, input):
        if not self.training or not is_distributed() or get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        y, mean, var, count = _SyncBatchNormFunction.apply(input, self.weight, self.bias,
                                                           self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                n = float(count)
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        return y


_PLAIN_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def convert_sync_batchnorm(model, device_type):
    """BatchNorm*d layers of ``model`` -> synchronised ones: torch.nn.SyncBatchNorm on GPUs,
    :class:`CpuSyncBatchNorm` on the CPU (converted in place there). Returns the model."""
    if device_type != 'cpu':
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) in _PLAIN_BATCHNORMS:
            module.__class__ = CpuSyncBatchNorm  # same attributes and state; our forward
    return model
