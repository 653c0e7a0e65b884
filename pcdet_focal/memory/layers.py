"""Memory of the building blocks (dense and sparse), replayed on a :class:`graph.Graph`.

Each helper mirrors what PyTorch / spconv allocate and what autograd saves:

- ``Conv2d``: output new; saves its input. cuDNN refuses a sample with >= 2**31 elements
  (32-bit indexing) and PyTorch then runs its native conv, which unfolds one sample at a time
  into a columns buffer of C_in*k*k*H_out*W_out elements, forward and again in backward.
- ``BatchNorm``: output new; saves its input (+ per-channel stats). ``ReLU``: saves its output.
  ``LayerNorm``: saves its input (+ per-row stats). ``GELU``: saves its input.
- ``Linear``: saves its input. Indexing ``x[idx]``: saves only the index; its backward
  scatters into a zero tensor the size of ``x``.
- spconv: index pairs (2 x kernel volume x N int32) are cached per ``indice_key`` and live
  as long as the sparse tensors or the autograd nodes that saved them; the native (CPU)
  algorithm gathers / scatters through buffers of (max pairs per offset) x channels, CUDA's
  implicit GEMM adds masks / argsorts (4 x N int32).

Helpers never drop their inputs: the caller drops what its Python code would release.
"""
from .context import Dense, Sparse
from .graph import FP32, INT32, INT64

INT_MAX = 2 ** 31 - 1


# ---------------------------------------------------------------------------- dense 2D
def conv2d(g, x, cout, k, s=1, p=0, bias=False, label='conv', groups=1):
    """``Conv2d(x.c, cout, k, stride=s, padding=p)`` on a Dense; returns the Dense output."""
    ho = (x.h + 2 * p - k) // s + 1
    wo = (x.w + 2 * p - k) // s + 1
    w = g.param(cout * (x.c // groups) * k * k, f'{label}.weight')
    b = g.param(cout, f'{label}.bias') if bias else None
    temp_f = temp_b = 0
    tlabel = ''
    if x.per_sample > INT_MAX or cout * ho * wo > INT_MAX:
        # cuDNN uses 32-bit indexing per sample: PyTorch falls back to its native conv, which
        # materialises the unfolded input of one sample (and again for the input gradient)
        dtype = 2 if g.amp else x.t.dtype_bytes    # autocast runs the conv in fp16
        cols = (x.c // groups) * k * k * ho * wo * dtype
        temp_f = temp_b = cols
        tlabel = (f'im2col columns of Conv2d({x.c}->{cout}, {k}x{k}) '
                  f'({x.c}*{k * k}*{ho}*{wo} elements; a sample of {x.per_sample:,} '
                  'elements > 2^31-1, so cuDNN cannot run it)')
        g.note(f'{label}: input holds {x.per_sample:,} elements per sample (>= 2^31): no cuDNN;'
               f' native conv unfolds {x.c}*{k * k}*{ho}*{wo} elements = '
               f'{gib(cols):.2f} GiB per sample')
    elif g_target(g) == 'cpu':
        # oneDNN's CPU backward copies its input and the incoming gradient (measured)
        temp_b = x.t.nbytes + x.b * cout * ho * wo * x.t.dtype_bytes
        tlabel = f'{label} CPU backward copies'
    y = g.op(label, [x.t], x.b * cout * ho * wo, save=[x.t], params=[w, b], kind='mm',
             temp_fwd=temp_f, temp_fwd_label=tlabel, temp_bwd=temp_b, temp_bwd_label=tlabel)
    return Dense(y, x.b, cout, ho, wo)


def deconv2d(g, x, cout, k, s, label='deconv'):
    """``ConvTranspose2d(x.c, cout, k, stride=s)`` (no padding, no bias)."""
    ho, wo = (x.h - 1) * s + k, (x.w - 1) * s + k
    w = g.param(x.c * cout * k * k, f'{label}.weight')
    tmp = x.t.nbytes + x.b * cout * ho * wo * x.t.dtype_bytes if g_target(g) == 'cpu' else 0
    y = g.op(label, [x.t], x.b * cout * ho * wo, save=[x.t], params=[w], kind='mm',
             temp_bwd=tmp, temp_bwd_label=f'{label} CPU backward copies')
    return Dense(y, x.b, cout, ho, wo)


def bn2d(g, x, label='bn'):
    w = g.param(x.c, f'{label}.weight')
    b = g.param(x.c, f'{label}.bias')
    g.param(2 * x.c + 2, f'{label} running stats', trainable=False)  # + int64 counter
    # PyTorch's CPU batch-norm backward allocates one input-sized buffer internally
    tmp = x.t.nbytes if g_target(g) == 'cpu' else 0
    y = g.op(label, [x.t], x.numel, save=[x.t], params=[w, b], temp_bwd=tmp,
             temp_bwd_label=f'{label} CPU backward buffer')
    return Dense(y, x.b, x.c, x.h, x.w)


def relu2d(g, x, label='relu'):
    y = g.op(label, [x.t], x.numel, save_output=True)
    return Dense(y, x.b, x.c, x.h, x.w)


def pad2d(g, x, p, label='ZeroPad2d'):
    y = g.op(label, [x.t], x.b * x.c * (x.h + 2 * p) * (x.w + 2 * p))
    return Dense(y, x.b, x.c, x.h + 2 * p, x.w + 2 * p)


def conv_bn_relu(g, x, cout, k, s=1, p=0, bias=False, label='conv', relu=True):
    """Conv2d -> BatchNorm2d -> ReLU as an nn.Sequential runs it (intermediates dropped)."""
    y = conv2d(g, x, cout, k, s, p, bias=bias, label=label)
    z = bn2d(g, y, label=f'{label}.bn')
    g.drop(y.t)
    if not relu:
        return z
    r = relu2d(g, z, label=f'{label}.relu')
    g.drop(z.t)
    return r


def cat_channels(g, parts, label='cat'):
    c = sum(p.c for p in parts)
    first = parts[0]
    y = g.op(label, [p.t for p in parts], first.b * c * first.h * first.w, grad_alias=True)
    return Dense(y, first.b, c, first.h, first.w)


# ---------------------------------------------------------------------------- rows (N, C)
def linear(g, x, n, cin, cout, bias=True, label='linear'):
    """``Linear(cin, cout)`` on (n, cin) rows; saves its input."""
    w = g.param(cin * cout, f'{label}.weight')
    b = g.param(cout, f'{label}.bias') if bias else None
    return g.op(label, [x], n * cout, save=[x], params=[w, b], kind='mm')


def bn1d(g, x, n, c, label='bn'):
    w = g.param(c, f'{label}.weight')
    b = g.param(c, f'{label}.bias')
    g.param(2 * c + 2, f'{label} running stats', trainable=False)  # + int64 counter
    tmp = x.nbytes if g_target(g) == 'cpu' else 0    # CPU backward buffer, as bn2d
    return g.op(label, [x], n * c, save=[x], params=[w, b], temp_bwd=tmp,
                temp_bwd_label=f'{label} CPU backward buffer')


def layernorm(g, x, n, c, label='LayerNorm'):
    w = g.param(c, f'{label}.weight')
    b = g.param(c, f'{label}.bias')
    # saves its input and per-row mean / rstd (fp32)
    stats = g.tensor(2 * n, f'{label} mean/rstd', FP32)
    y = g.op(label, [x], n * c, save=[x, stats], params=[w, b], kind='fp32')
    g.drop(stats)
    return y


def relu(g, x, numel, label='relu'):
    return g.op(label, [x], numel, save_output=True)


def gelu(g, x, numel, label='gelu'):
    return g.op(label, [x], numel, save=[x])


def activation(g, name, x, numel, label):
    if str(name).lower() == 'relu':
        return relu(g, x, numel, label)
    return gelu(g, x, numel, label)


def add(g, a, b, numel, label='add'):
    """Out-of-place ``a + b`` (saves nothing; both inputs get the output's gradient)."""
    return g.op(label, [a, b], numel, grad_alias=True)


def gather_rows(g, x, index, rows, c, label='gather'):
    """``x[index]`` -> (rows, c): saves the index; backward scatters into zeros like ``x``."""
    return g.op(label, [x], rows * c, save=[index] if index is not None else ())


def index_tensor(g, numel, label, dtype=INT64):
    """An integer tensor computed without grad (indices, masks, counts)."""
    return g.tensor(numel, label, dtype)


# ---------------------------------------------------------------------------- spconv
def spconv_pairs(g, sp, key, kv, n_in, label):
    """Index pairs of a spconv conv, cached in ``sp.indice_dict[key]`` (None = not cached).

    spconv keeps (2, kv, N_in) int32 pairs (+ per-offset counts) for the forward and
    backward pass; the implicit-GEMM algorithm on CUDA keeps forward and backward pair
    tables of the same total size plus masks and argsorts (4 x N int32)."""
    if key is not None and key in sp.indice_dict:
        return sp.indice_dict[key]
    extra = 4 * n_in if g_target(g) == 'cuda' else 0
    pairs = index_tensor(g, 2 * kv * n_in + kv + extra, f'{label} index pairs', INT32)
    if key is not None:
        sp.indice_dict[key] = pairs
    return pairs


def g_target(g):
    return getattr(g, 'target', 'cuda')


def _spconv_buffers(g, x, n_out, cin, cout):
    """Gather/scatter buffers of spconv's native algorithm (CPU), sized by the busiest
    non-centre kernel offset: with voxels spread uniformly, a neighbour is occupied with
    probability N / grid volume (measured: the centre offset needs no buffer)."""
    if g_target(g) != 'cpu':
        return 0
    volume = max(1, x.spatial[0] * x.spatial[1] * x.spatial[2])
    hot = min(n_out, -(-x.n * x.n // volume))
    return hot * (cin + cout) * x.t.dtype_bytes


def subm_conv(g, x, cout, k, key, label='SubMConv3d', bias=False):
    """``SubMConv3d(x.c, cout, k)``: same voxels out; returns a new Sparse sharing the cache."""
    kv = k ** 3 if isinstance(k, int) else k[0] * k[1] * k[2]
    w = g.param(kv * x.c * cout, f'{label}.weight')
    b = g.param(cout, f'{label}.bias') if bias else None
    pairs = spconv_pairs(g, x, key, kv, x.n, label)
    buf = _spconv_buffers(g, x, x.n, x.c, cout)
    y = g.op(label, [x.t], x.n * cout, save=[x.t, pairs], params=[w, b], kind='mm',
             temp_fwd=buf, temp_fwd_label=f'{label} gather/scatter buffers',
             temp_bwd=buf, temp_bwd_label=f'{label} gather/scatter buffers')
    return Sparse(y, x.n, cout, x.spatial, x.stride, x.coords, x.indice_dict)


def sparse_conv(g, x, cout, k, s, p, n_out, key, label='SparseConv3d', bias=False):
    """Strided ``SparseConv3d``: ``n_out`` output voxels (the caller's occupancy model).

    k, s, p: per-axis (z, y, x) tuples."""
    kv = k[0] * k[1] * k[2]
    w = g.param(kv * x.c * cout, f'{label}.weight')
    b = g.param(cout, f'{label}.bias') if bias else None
    if g_target(g) == 'cpu':
        # the CPU index generator allocates room for kv outputs per input voxel
        g.temp(kv * x.n * 4 * INT32, f'{label} candidate output coords')
    pairs = spconv_pairs(g, x, key, kv, x.n, label)
    out_coords = index_tensor(g, n_out * 4, f'{label} output coords', INT32)
    buf = _spconv_buffers(g, x, n_out, x.c, cout)
    y = g.op(label, [x.t], n_out * cout, save=[x.t, pairs], params=[w, b], kind='mm',
             temp_fwd=buf, temp_fwd_label=f'{label} gather/scatter buffers',
             temp_bwd=buf, temp_bwd_label=f'{label} gather/scatter buffers')
    spatial = tuple((sz + 2 * pp - kk) // ss + 1 for sz, kk, ss, pp in zip(x.spatial, k, s, p))
    stride = tuple(a * b for a, b in zip(x.stride, s))
    return Sparse(y, n_out, cout, spatial, stride, out_coords, x.indice_dict)


def sparse_bn_relu(g, x, label):
    """BatchNorm1d + ReLU on a Sparse's features (spconv's SparseSequential)."""
    z = bn1d(g, x.t, x.n, x.c, label=f'{label}.bn')
    r = relu(g, z, x.n * x.c, label=f'{label}.relu')
    g.drop(z)
    return Sparse(r, x.n, x.c, x.spatial, x.stride, x.coords, x.indice_dict)


def gib(nbytes):
    return nbytes / 2 ** 30


__all__ = ['conv2d', 'deconv2d', 'bn2d', 'relu2d', 'pad2d', 'conv_bn_relu', 'cat_channels',
           'linear', 'bn1d', 'layernorm', 'relu', 'gelu', 'activation', 'add', 'gather_rows',
           'index_tensor', 'subm_conv', 'sparse_conv', 'sparse_bn_relu', 'spconv_pairs', 'gib',
           'INT_MAX', 'FP32', 'INT32', 'INT64']
