"""What a module's memory rule works with: the symbolic graph plus layer rules keyed to the real
(meta-device) nn.Modules the trainer would build.

A rule is a method ``memory(self, tape, flow)`` beside its module (or, for OpenPCDet's classes,
an entry of :mod:`pcdet_focal.memory.pcdet_rules`). It replays the module's training forward on
``tape``: layer calls take the real submodules (``tape.conv2d(x, self.shared_conv[0])``), so
channel counts, kernel sizes and parameters come from the module, never from its config.
``flow`` (:class:`~pcdet_focal.memory.flow.Flow`) carries what the previous module handed on
and the counts of the data (voxels, sets, columns).

Layer rules mirror what PyTorch / spconv allocate and what autograd saves:

- ``Conv2d``: output new, saves its input. When a sample holds >= 2**31 elements and the stack
  cannot run that conv in cuDNN (:mod:`.cuda`), PyTorch's native conv unfolds one sample into a
  columns buffer of C_in*k*k*H_out*W_out elements, forward and again in backward. On the CPU
  oneDNN's backward copies its input and the incoming gradient (measured).
- ``BatchNorm``: saves its input (+ per-channel stats); on the CPU its backward allocates one
  input-sized buffer. ``ReLU``: saves its output. ``LayerNorm``: saves its input and per-row
  mean / rstd. ``Linear``: saves its input. ``x[idx]``: saves the index; its backward scatters
  into zeros like ``x``.
- spconv: index pairs (2 x kernel volume x N int32) cached per ``indice_key`` live as long as
  the sparse tensors or the nodes that saved them; the native (CPU) algorithm gathers /
  scatters through buffers of (busiest kernel offset) x channels; CUDA's implicit GEMM adds
  masks / argsorts (4 x N int32).

Helpers never drop their inputs: the rule drops what its Python code would release.
"""
from . import cuda
from .flow import Dense, NotModelled, Sparse
from .graph import BOOL, FP16, FP32, INT32, INT64

__all__ = ['Tape', 'Dense', 'Sparse', 'FP32', 'FP16', 'INT32', 'INT64', 'BOOL']


class Tape:
    """The graph ``g`` of one replay, with layer rules over real modules (see module doc)."""

    FP32, FP16, INT32, INT64, BOOL = FP32, FP16, INT32, INT64, BOOL

    def __init__(self, graph, stack=None):
        self.g = graph
        self.stack = stack or cuda.Stack.installed()
        self._params = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def target(self):
        return self.g.target

    @property
    def amp(self):
        return self.g.amp

    def param(self, p, label):
        """The SymTensor of a real parameter (one per parameter: shared uses share it)."""
        if p is None:
            return None
        t = self._params.get(id(p))
        if t is None:
            t = self.g.param(p.numel(), label, trainable=p.requires_grad)
            self._params[id(p)] = t
        return t

    def tensor(self, numel, label, dtype=FP32, requires_grad=False):
        return self.g.tensor(numel, label, dtype, requires_grad=requires_grad)

    def index(self, numel, label, dtype=INT64):
        """An integer / mask tensor computed without grad (indices, counts)."""
        return self.g.tensor(numel, label, dtype)

    def op(self, *args, **kwargs):
        return self.g.op(*args, **kwargs)

    def temp(self, nbytes, label):
        self.g.temp(nbytes, label)

    def drop(self, *tensors):
        self.g.drop(*tensors)

    def set_batch(self, key, t):
        self.g.set_batch(key, t)

    def get_batch(self, key, default=None):
        return self.g.get_batch(key, default)

    def set_state(self, key, t):
        self.g.set_state(key, t)

    def release_prior_state(self):
        self.g.release_prior_state()

    def note(self, text):
        self.g.note(text)

    def begin(self, name, kind, module=None):
        """Start the row ``name`` of the report; ``module``: its parameter count."""
        st = self.g.begin_module(name, kind)
        if module is not None:
            st.params = sum(p.numel() for p in module.parameters() if p.requires_grad)
            st.param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    def end(self):
        self.g.end_module()

    def checkpoint_begin(self):
        self.g.checkpoint_begin()

    def checkpoint_end(self, outputs=(), inputs=()):
        """End the region; ``inputs``: the tensors handed to torch.utils.checkpoint, which it
        keeps for the recompute until the region's backward (its last node runs first)."""
        self.g.checkpoint_end(outputs)
        node = self.g._nodes[-1] if self.g._nodes else None
        for t in inputs if node is not None else ():
            t.saved += 1
            node.saved.append(t)

    # ------------------------------------------------------------------ dense 2D
    def conv2d(self, x, m, label):
        """``m`` (nn.Conv2d) on the Dense ``x``; returns the Dense output."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        ho = (x.h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cout, groups = m.out_channels, m.groups
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        temp_f = temp_b = 0
        tlabel = ''
        dtype = FP16 if self.amp else x.t.dtype_bytes      # autocast runs the conv in fp16
        cols = self.stack.conv_columns_bytes(x.c // groups, kh * kw, ho, wo, dtype,
                                             x.per_sample, cout * ho * wo, self.target)
        if cols:
            temp_f = temp_b = cols
            tlabel = (f'im2col columns of Conv2d({x.c}->{cout}, {kh}x{kw}) ({x.c}*{kh * kw}*{ho}*'
                      f'{wo} elements; a sample of {x.per_sample:,} elements > 2^31-1 and '
                      f'{self.stack.describe()} cannot run it in cuDNN)')
            self.note(f'{label}: input holds {x.per_sample:,} elements per sample (>= 2^31): '
                      f'{self.stack.describe()} falls back to the native conv, which unfolds '
                      f'{x.c}*{kh * kw}*{ho}*{wo} elements = {cols / 2 ** 30:.2f} GiB per sample')
        elif self.target == 'cpu':
            temp_b = cpu_conv_backward_bytes(x, m, ho, wo)
            tlabel = f'{label} CPU backward copies'
        y = self.op(label, [x.t], x.b * cout * ho * wo, save=[x.t], params=[w, b], kind='mm',
                    temp_fwd=temp_f, temp_fwd_label=tlabel, temp_bwd=temp_b,
                    temp_bwd_label=tlabel)
        return Dense(y, x.b, cout, ho, wo)

    def deconv2d(self, x, m, label):
        """``m`` (nn.ConvTranspose2d, no padding) on ``x``."""
        (kh, kw), (sh, sw) = m.kernel_size, m.stride
        ph, pw = m.padding
        ho, wo = (x.h - 1) * sh - 2 * ph + kh, (x.w - 1) * sw - 2 * pw + kw
        cout = m.out_channels
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        tmp = cpu_conv_backward_bytes(x, m, ho, wo) if self.target == 'cpu' else 0
        y = self.op(label, [x.t], x.b * cout * ho * wo, save=[x.t], params=[w, b], kind='mm',
                    temp_bwd=tmp, temp_bwd_label=f'{label} CPU backward copies')
        return Dense(y, x.b, cout, ho, wo)

    def bn2d(self, x, m, label):
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        # PyTorch's CPU batch-norm backward allocates one input-sized buffer internally
        tmp = x.t.nbytes if self.target == 'cpu' else 0
        y = self.op(label, [x.t], x.numel, save=[x.t], params=[w, b], temp_bwd=tmp,
                    temp_bwd_label=f'{label} CPU backward buffer')
        return Dense(y, x.b, x.c, x.h, x.w)

    def relu2d(self, x, label):
        return Dense(self.op(label, [x.t], x.numel, save_output=True), x.b, x.c, x.h, x.w)

    def pad2d(self, x, m, label):
        left, right, top, bottom = m.padding
        h, w = x.h + top + bottom, x.w + left + right
        return Dense(self.op(label, [x.t], x.b * x.c * h * w), x.b, x.c, h, w)

    def run(self, x, seq, label):
        """An nn.Sequential of Conv2d / ConvTranspose2d / BatchNorm2d / ReLU / ZeroPad2d /
        Identity as Sequential runs it (each intermediate dropped once used)."""
        y = x
        for i, m in enumerate(seq):
            kind = type(m).__name__
            if kind == 'Identity':
                continue
            if kind == 'Sequential':
                z = self.run(y, m, f'{label}.{i}')
            elif kind == 'ReLU':
                z = self.relu2d(y, f'{label}.{i}')
            elif kind in self._DENSE:
                z = getattr(self, self._DENSE[kind])(y, m, f'{label}.{i}')
            else:
                raise NotModelled(f'{kind} inside {label}')
            if y is not x:
                self.drop(y.t)
            y = z
        if y is x:      # an empty / identity chain hands its input on (one more reference)
            x.t.py += 1
        return y

    _DENSE = {'Conv2d': 'conv2d', 'ConvTranspose2d': 'deconv2d', 'BatchNorm2d': 'bn2d',
              'ZeroPad2d': 'pad2d'}

    def cat_channels(self, parts, label):
        c = sum(p.c for p in parts)
        first = parts[0]
        y = self.op(label, [p.t for p in parts], first.b * c * first.h * first.w,
                    grad_alias=True)
        return Dense(y, first.b, c, first.h, first.w)

    # ------------------------------------------------------------------ rows (N, C)
    def linear(self, x, n, m, label):
        """``m`` (nn.Linear) on (n, in) rows; saves its input."""
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        return self.op(label, [x], n * m.out_features, save=[x], params=[w, b], kind='mm')

    def bn1d(self, x, n, m, label):
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        tmp = x.nbytes if self.target == 'cpu' else 0    # CPU backward buffer, as bn2d
        return self.op(label, [x], n * m.num_features, save=[x], params=[w, b], temp_bwd=tmp,
                       temp_bwd_label=f'{label} CPU backward buffer')

    def layernorm(self, x, n, m, label):
        c = m.normalized_shape[0]
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        stats = self.tensor(2 * n, f'{label} mean/rstd', FP32)   # saved per-row mean / rstd
        y = self.op(label, [x], n * c, save=[x, stats], params=[w, b], kind='fp32')
        self.drop(stats)
        return y

    def relu(self, x, numel, label):
        return self.op(label, [x], numel, save_output=True)

    def gelu(self, x, numel, label):
        return self.op(label, [x], numel, save=[x])

    def activation(self, name, x, numel, label):
        if str(name).lower() == 'relu':
            return self.relu(x, numel, label)
        return self.gelu(x, numel, label)

    def add(self, a, b, numel, label):
        """Out-of-place ``a + b`` (saves nothing; both inputs get the output's gradient)."""
        return self.op(label, [a, b], numel, grad_alias=True)

    def gather_rows(self, x, index, rows, c, label):
        """``x[index]`` -> (rows, c): saves the index; backward scatters into zeros like x."""
        return self.op(label, [x], rows * c, save=[index] if index is not None else ())

    # ------------------------------------------------------------------ spconv
    def spconv_pairs(self, x, key, kv, n_in, label):
        """Index pairs of a spconv conv, cached in ``x.indice_dict[key]`` (None: uncached)."""
        if key is not None and key in x.indice_dict:
            return x.indice_dict[key]
        extra = 4 * n_in if self.target == 'cuda' else 0
        pairs = self.index(2 * kv * n_in + kv + extra, f'{label} index pairs', INT32)
        if key is not None:
            x.indice_dict[key] = pairs
        return pairs

    def _spconv_buffers(self, x, n_out, cin, cout, hot):
        """Gather / scatter buffers of spconv's native algorithm (CPU): (busiest non-centre
        kernel offset's pairs) x (cin + cout); ``hot``: that pair count."""
        if self.target != 'cpu':
            return 0
        return min(n_out, hot) * (cin + cout) * x.t.dtype_bytes

    def subm(self, x, m, label, hot):
        """``m`` (spconv SubMConv3d) on the Sparse ``x``: same voxels out. ``hot``: pairs of
        the busiest non-centre kernel offset (a count of the data)."""
        kv = _volume(m.kernel_size)
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        pairs = self.spconv_pairs(x, m.indice_key, kv, x.n, label)
        buf = self._spconv_buffers(x, x.n, m.in_channels, m.out_channels, hot)
        y = self.op(label, [x.t], x.n * m.out_channels, save=[x.t, pairs], params=[w, b],
                    kind='mm', temp_fwd=buf, temp_fwd_label=f'{label} gather/scatter buffers',
                    temp_bwd=buf, temp_bwd_label=f'{label} gather/scatter buffers')
        return x.like(y, m.out_channels)

    def sparse_conv(self, x, m, n_out, label, hot):
        """``m`` (strided spconv SparseConv3d) with ``n_out`` output voxels (a data count)."""
        kv = _volume(m.kernel_size)
        w, b = self.param(m.weight, f'{label}.weight'), self.param(m.bias, f'{label}.bias')
        if self.target == 'cpu':
            # the CPU index generator allocates room for kv outputs per input voxel
            self.temp(kv * x.n * 4 * INT32, f'{label} candidate output coords')
        pairs = self.spconv_pairs(x, m.indice_key, kv, x.n, label)
        out_coords = self.index(n_out * 4, f'{label} output coords', INT32)
        buf = self._spconv_buffers(x, n_out, m.in_channels, m.out_channels, hot)
        y = self.op(label, [x.t], n_out * m.out_channels, save=[x.t, pairs], params=[w, b],
                    kind='mm', temp_fwd=buf, temp_fwd_label=f'{label} gather/scatter buffers',
                    temp_bwd=buf, temp_bwd_label=f'{label} gather/scatter buffers')
        spatial = tuple((sz + 2 * p - d * (k - 1) - 1) // s + 1 for sz, k, s, p, d in
                        zip(x.spatial, m.kernel_size, m.stride, m.padding, m.dilation))
        stride = tuple(a * b for a, b in zip(x.stride, m.stride))
        return Sparse(y, n_out, m.out_channels, spatial, stride, out_coords, x.indice_dict)

    def sparse_bn_relu(self, x, bn, label):
        """BatchNorm1d + ReLU on a Sparse's features (spconv's SparseSequential)."""
        z = self.bn1d(x.t, x.n, bn, f'{label}.bn')
        r = self.relu(z, x.n * x.c, f'{label}.relu')
        self.drop(z)
        return x.like(r, x.c)


# PyTorch's CPU convolution runs in oneDNN unless one sample is small (<= 20480 input elements
# at batch 1, kernel <= 3: then its native kernels, which unfold into im2col columns); a 1x1
# stride-1 conv is native on one thread
MKLDNN_MIN_ELEMENTS = 20480
MKLDNN_CHANNEL_BLOCK = 16


def cpu_conv_backward_bytes(x, m, ho, wo):
    """Bytes a CPU Conv2d / ConvTranspose2d backward allocates beside the input's gradient
    (measured on torch 2.13's CPU kernels: pcdet_focal.memory.tracker on a conv backward).

    oneDNN reorders the input and the output's gradient (padded to blocks of 16 channels);
    a strided conv reorders the input twice, or its gradient-sized buffers outgrow that (a
    fit: within ~10% of those buffers for 16-128 channels, 32x32-64x64 maps). The native kernels
    unfold one sample into columns (C_in x k x k x H_out x W_out; C_out x k x k x H x W for a
    transposed conv)."""
    import torch
    (kh, kw), (sh, sw) = m.kernel_size, m.stride
    transposed = type(m).__name__ == 'ConvTranspose2d'
    cout, dt = m.out_channels, x.t.dtype_bytes
    y = x.b * cout * ho * wo * dt
    pointwise = kh == kw == 1 and sh == sw == 1
    mkldnn = (x.b > 1 or x.per_sample > MKLDNN_MIN_ELEMENTS or (kh > 3 and kw > 3)) and \
        (not pointwise or torch.get_num_threads() > 1)
    if not mkldnn:
        if transposed:
            return cout * kh * kw * x.h * x.w * dt
        return 0 if pointwise else x.c * kh * kw * ho * wo * dt
    if transposed:
        return x.t.nbytes + y
    if (sh, sw) != (1, 1):
        return x.t.nbytes + max(x.t.nbytes, 3 * y // 2)
    return x.t.nbytes + max(y, x.b * max(cout, MKLDNN_CHANNEL_BLOCK) * ho * wo * dt)


def _volume(kernel):
    out = 1
    for k in (kernel if isinstance(kernel, (list, tuple)) else (kernel,) * 3):
        out *= int(k)
    return out
