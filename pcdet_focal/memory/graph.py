"""A symbolic autograd tape: replays one training step's allocations without any tensor.

Module memory rules (a ``memory(tape, flow)`` method beside each module, see tape.py) describe
their forward as a sequence of ops on :class:`SymTensor` s (sizes only). :class:`Graph` keeps PyTorch's lifetime rules:

- a tensor lives while a Python reference (a local variable, ``batch_dict``, a module attribute)
  or an autograd node that saved it holds it;
- backward runs the nodes in reverse creation order; a node allocates the gradient of each input
  that requires grad (unless another consumer already did), frees its outputs' gradients and
  releases what it saved; parameter gradients stay until the optimizer step;
- ``batch_dict`` entries live until the end of the step; module state (e.g. a head's
  ``forward_ret_dict``) lives until the same module's next forward replaces it.

The graph records the live byte count after every event, so the peak, where it happened, and
each module's share fall out of the replay. Bytes are exact products of shapes and dtype sizes
(rounded up to the CUDA caching allocator's 512-byte blocks with ``block_round``); nothing here
imports torch. With ``events`` a list, every allocation and release is logged with a key for
the allocator simulation (cuda.reserved_peak).
"""
from dataclasses import dataclass, field

FP32 = 4
FP16 = 2
INT32 = 4
INT64 = 8
BOOL = 1


class SymTensor:
    """Sizes and references of one (symbolic) tensor."""

    __slots__ = ('tid', 'nbytes', 'dtype_bytes', 'label', 'module', 'py', 'saved',
                 'requires_grad', 'is_param', 'freed', 'has_grad')

    def __init__(self, tid, numel, dtype_bytes, label, module, requires_grad=False,
                 is_param=False):
        self.tid = tid
        self.dtype_bytes = int(dtype_bytes)
        self.nbytes = int(numel) * self.dtype_bytes
        self.label = label
        self.module = module
        self.py = 1          # Python-side references (locals, batch_dict, module attributes)
        self.saved = 0       # autograd nodes that saved it for backward
        self.requires_grad = requires_grad
        self.is_param = is_param
        self.freed = False
        self.has_grad = False

    @property
    def numel(self):
        return self.nbytes // self.dtype_bytes

    def __repr__(self):
        return f'SymTensor({self.label!r}, {self.nbytes} B)'


@dataclass
class _Node:
    label: str
    module: str
    inputs: list          # SymTensors that require grad (non-parameters)
    params: list          # parameter SymTensors used
    outputs: list
    saved: list
    temp_bwd: int
    temp_bwd_label: str
    grad_alias: bool = False  # input grads are views of the output grad (cat, add, sum, ...)


@dataclass
class ModuleStats:
    """What one module contributed to the step (bytes unless said otherwise)."""

    name: str
    kind: str
    params: int = 0                 # parameter count
    param_bytes: int = 0
    activations: int = 0            # bytes created here still alive when its forward ends
    transient: int = 0              # largest temporary buffer (forward or backward)
    transient_label: str = ''
    fwd_peak: int = 0               # highest live bytes during its forward
    running_peak: int = 0           # highest live bytes from the step start to its forward end
    bwd_peak: int = 0               # highest live bytes during its backward
    modelled: bool = True
    notes: list = field(default_factory=list)


@dataclass
class Peak:
    bytes: int = 0
    phase: str = ''
    module: str = ''
    label: str = ''


class Graph:
    """Replays allocations of one training step. ``amp`` = fp16 autocast for matmul/conv ops."""

    def __init__(self, amp=False, target='cuda', block_round=None):
        self.amp = bool(amp)
        self.target = target              # 'cuda' or 'cpu': whose kernels' buffers to model
        self.block_round = block_round    # nbytes -> allocator block size (None: exact bytes)
        self.float_bytes = FP32
        self.live = 0
        self.peak = Peak()
        self.phase = 'forward'
        self.module = '(input)'
        self.modules = {}                 # name -> ModuleStats, in forward order
        self._next_id = 0
        self._nodes = []
        self._batch_dict = {}             # key -> SymTensor (held until the step ends)
        self._state = {}                  # (module, key) -> SymTensor (held across steps)
        self._prior_state = {}            # module -> [SymTensor] from the previous step
        self._created = {}                # module -> [SymTensor] created during its forward
        self.param_tensors = []
        self.phase_peaks = {}
        self._ckpt = None                 # open checkpoint region (first node, first id)
        # when a list: one (live bytes, phase, module, label) entry per allocation or release,
        # in replay order (what tools/estimate_mem.py --plot draws)
        self.timeline = None
        self.events = None                # ('alloc', key, bytes) / ('free', key) when a list
        self._keys = 0

    # ----------------------------------------------------------------- bookkeeping
    def _record(self, label=''):
        if self._ckpt is not None and self.live > self._ckpt_max:
            self._ckpt_max = self.live
        if self.live > self.peak.bytes:
            self.peak = Peak(self.live, self.phase, self.module, label)
        ph = self.phase_peaks.get(self.phase)
        if ph is None or self.live > ph.bytes:
            self.phase_peaks[self.phase] = Peak(self.live, self.phase, self.module, label)
        st = self.modules.get(self.module)
        if st is not None:
            if self.phase == 'forward':
                st.fwd_peak = max(st.fwd_peak, self.live)
            elif self.phase == 'backward':
                st.bwd_peak = max(st.bwd_peak, self.live)

    def _size(self, nbytes):
        return self.block_round(nbytes) if self.block_round else int(nbytes)

    def _key(self):
        self._keys += 1
        return ('k', self._keys)

    def _alloc(self, nbytes, label, key=None):
        self.live += int(nbytes)
        self._record(label)
        self._mark(label)
        if self.events is not None and nbytes:
            self.events.append(('alloc', key or self._key(), int(nbytes)))

    def _release(self, nbytes, label='', key=None):
        self.live -= int(nbytes)
        self._mark(label)
        if self.events is not None and key is not None:
            self.events.append(('free', key))

    def _mark(self, label):
        if self.timeline is not None:
            self.timeline.append((self.live, self.phase, self.module, label))

    def _maybe_free(self, t):
        if not t.freed and t.py <= 0 and t.saved <= 0:
            t.freed = True
            self._release(t.nbytes, t.label, ('t', t.tid))

    def _note_temp(self, nbytes, label, module=None):
        st = self.modules.get(module or self.module)
        if st is not None and nbytes > st.transient:
            st.transient, st.transient_label = int(nbytes), label

    # ----------------------------------------------------------------- modules
    def begin_module(self, name, kind, modelled=True):
        """Start the forward of ``name`` (a row of the report)."""
        base, i = name, 2
        while name in self.modules:
            name, i = f'{base}#{i}', i + 1
        self.module = name
        self.modules[name] = ModuleStats(name=name, kind=kind, modelled=modelled,
                                         fwd_peak=self.live)
        self._created[name] = []
        return self.modules[name]

    def rename_module(self, name):
        """Rename the current module's row (a model that splits one slot into several rows)."""
        st = self.modules.pop(self.module)
        created = self._created.pop(self.module, [])
        prior = self._prior_state.pop(self.module, None)
        st.name = name
        self.modules[name] = st
        self._created[name] = created
        if prior is not None:
            self._prior_state[name] = prior
        self.module = name

    def release_prior_state(self):
        """The current module replaces the state it kept from the previous step (e.g.
        ``self.forward_ret_dict = {...}``): that state dies now."""
        for t in self._prior_state.pop(self.module.split('#')[0], []):
            t.py -= 1
            self._maybe_free(t)

    def end_module(self):
        """Close the current module: tally its surviving activations and drop stale state."""
        name = self.module
        self.release_prior_state()
        st = self.modules[name]
        st.activations = sum(t.nbytes for t in self._created[name] if not t.freed
                             and not t.is_param)
        st.running_peak = self.phase_peaks['forward'].bytes if 'forward' in self.phase_peaks \
            else self.live
        self.module = '(detector)'

    def note(self, text):
        self.modules[self.module].notes.append(text)

    # ----------------------------------------------------------------- tensors
    def act_bytes(self, kind='keep', like=None):
        """dtype size of an op's float output. ``kind``: 'mm' (conv/linear/matmul: fp16 under
        autocast), 'fp32' (ops autocast keeps in fp32: layer_norm, softmax, losses), 'keep'
        (same as ``like``, the main input)."""
        if kind == 'mm':
            return FP16 if self.amp else FP32
        if kind == 'fp32':
            return FP32
        return like.dtype_bytes if like is not None else self.float_bytes

    def tensor(self, numel, label, dtype_bytes=FP32, requires_grad=False):
        """A new tensor held by one Python reference (drop it with :meth:`drop`)."""
        t = SymTensor(self._next_id, max(0, int(numel)), dtype_bytes, label, self.module,
                      requires_grad=requires_grad)
        t.nbytes = self._size(t.nbytes)
        self._next_id += 1
        self._created.setdefault(self.module, []).append(t)
        self._alloc(t.nbytes, label, ('t', t.tid))
        return t

    def param(self, numel, label, trainable=True):
        """The SymTensor of a parameter: its memory is preloaded (parameters exist before the
        step); a trainable one gets a gradient when the first op using it runs backward."""
        t = SymTensor(self._next_id, int(numel), FP32, label, self.module,
                      requires_grad=trainable, is_param=True)
        t.nbytes = self._size(t.nbytes)
        self._next_id += 1
        if trainable:
            self.param_tensors.append(t)
        return t

    def preload(self, nbytes, label):
        """Memory that exists before the step starts (parameters, optimizer state, ...)."""
        self.module = '(persistent)'
        self._alloc(nbytes, label)
        self.module = '(input)'

    def temp(self, nbytes, label):
        """A buffer allocated and freed inside one op (workspace, im2col columns)."""
        nbytes = self._size(nbytes)
        self._note_temp(nbytes, label)
        key = self._key()
        self._alloc(nbytes, label, key)
        self._release(nbytes, '', key)

    def drop(self, *tensors):
        """Release one Python reference of each tensor (a local going out of scope)."""
        for t in tensors:
            if t is None:
                continue
            t.py -= 1
            self._maybe_free(t)

    def _hold(self, store, key, t):
        """``store[key] = t``: ``t`` gains a Python reference, the tensor it replaces loses one."""
        old = store.get(key)
        t.py += 1
        store[key] = t
        if old is not None:
            old.py -= 1
            self._maybe_free(old)

    def set_batch(self, key, t):
        """``batch_dict[key] = t``: the dict holds ``t`` until the step ends."""
        self._hold(self._batch_dict, key, t)

    def get_batch(self, key, default=None):
        return self._batch_dict.get(key, default)

    def set_state(self, key, t):
        """``self.<key> = t`` on the current module: lives into the next step."""
        self._hold(self._state, (self.module.split('#')[0], key), t)

    def state_bytes(self):
        """{module: bytes} held in module attributes at the end of the step."""
        out = {}
        for (mod, _), t in self._state.items():
            if not t.freed:
                out[mod] = out.get(mod, 0) + t.nbytes
        return out

    def preload_state(self, state_bytes):
        """Allocate last step's module state (steady state): freed when the module runs."""
        for mod, nbytes in state_bytes.items():
            t = SymTensor(self._next_id, nbytes, 1, f'{mod} state from the previous step', mod)
            self._next_id += 1
            self._alloc(t.nbytes, t.label, ('t', t.tid))
            self._prior_state.setdefault(mod, []).append(t)

    # ----------------------------------------------------------------- ops
    def op(self, label, inputs, out_numel, save=(), params=(), kind='keep', out_dtype=None,
           temp_fwd=0, temp_fwd_label='', temp_bwd=0, temp_bwd_label='', differentiable=True,
           save_output=False, grad_alias=False):
        """One autograd op.

        inputs: SymTensors read (the first one sets the dtype for kind='keep');
        out_numel: int, or a list of ints for several outputs; save: inputs kept for backward;
        params: parameter SymTensors used (their gradients appear in this op's backward);
        temp_fwd / temp_bwd: workspace bytes alive only inside the forward / backward op;
        save_output: the op keeps its own output(s) for backward (relu, sigmoid, softmax);
        grad_alias: its backward hands views / the same tensor of the output's gradient to the
        inputs instead of allocating (cat, add, sum, expand).
        Returns the output SymTensor (or the list of them).
        """
        inputs = [t for t in inputs if t is not None]
        params = [p for p in params if p is not None]
        main = inputs[0] if inputs else None
        dtype = out_dtype or self.act_bytes(kind, main)
        cast_saved, casts = [], []
        save = list(save)
        if self.amp and kind == 'mm':
            # autocast hands fp16 copies of fp32 weights and inputs to the op; the node keeps
            # the copies it saves (a cast's backward returns an fp32 gradient)
            for p in params:
                if p.requires_grad and p.numel > 1024:
                    cast_saved.append(self.tensor(p.numel, f'{label} fp16 weight copy', FP16))
            for i, t in enumerate(inputs):
                if t.dtype_bytes == FP32:
                    c = self.op(f'{label} autocast fp16 copy', [t], t.numel, out_dtype=FP16)
                    save = [c if x is t else x for x in save]
                    inputs[i] = c
                    casts.append(c)
        many = isinstance(out_numel, (list, tuple))
        numels = list(out_numel) if many else [out_numel]
        needs_grad = differentiable and (any(t.requires_grad for t in inputs)
                                         or any(p.requires_grad for p in params))
        outs = [self.tensor(n, label, dtype, requires_grad=needs_grad) for n in numels]
        if temp_fwd:
            self.temp(temp_fwd, temp_fwd_label or f'{label} workspace')
        if needs_grad:
            saved = list(save) + cast_saved + (outs if save_output else [])
            for t in saved:
                t.saved += 1
            self._nodes.append(_Node(label, self.module,
                                     [t for t in inputs if t.requires_grad and not t.is_param],
                                     [p for p in params if p.requires_grad], outs, saved,
                                     int(temp_bwd), temp_bwd_label or f'{label} backward buffer',
                                     grad_alias))
            if temp_bwd:
                self._note_temp(temp_bwd, temp_bwd_label or f'{label} backward buffer')
        for c in cast_saved + casts:
            self.drop(c)
        return outs if many else outs[0]

    # ----------------------------------------------------------------- checkpointing
    def checkpoint_begin(self):
        """Start a torch.utils.checkpoint region (use_reentrant=False)."""
        self._ckpt = (len(self._nodes), self._next_id)
        self._ckpt_base = self._ckpt_max = self.live

    def checkpoint_end(self, outputs=()):
        """End the region: tensors it created are not kept for backward (only its inputs and
        outputs are); its backward first recomputes them, which the model charges as a
        transient of the region's last node (the first to run in backward), as large as the
        region's own forward peak."""
        first_node, first_id = self._ckpt
        self._ckpt = None
        nodes = self._nodes[first_node:]
        keep = {t.tid for t in outputs}
        recompute, seen = 0, set()
        for node in nodes:
            inner = [t for t in node.saved if t.tid >= first_id and t.tid not in keep]
            for t in inner:
                if t.tid not in seen:
                    seen.add(t.tid)
                    recompute += t.nbytes
                t.saved -= 1
                self._maybe_free(t)
            node.saved = [t for t in node.saved if not (t.tid >= first_id and t.tid not in keep)]
        recompute = max(recompute, self._ckpt_max - self._ckpt_base)
        if nodes:
            nodes[-1].temp_bwd += recompute
            nodes[-1].temp_bwd_label = 'checkpoint recompute of the region\'s activations'

    # ----------------------------------------------------------------- backward / step
    def backward(self, loss):
        """Replay ``loss.backward()``: reverse creation order, as autograd's engine does.

        ``grads`` maps a tensor to (its share of bytes, the storage holding its gradient); a
        storage (``store``: key -> views alive) is released when its last view is consumed."""
        self.phase = 'backward'
        loss.has_grad = True
        grads, store = {}, {}

        def new_grad(t, label):
            key = ('g', t.tid)
            self._alloc(t.nbytes, label, key)
            grads[t.tid], store[key] = (t.nbytes, key), 1

        def consume(tid):
            nbytes, key = grads.pop(tid, (0, None))
            if key is not None:
                store[key] -= 1
            self._release(nbytes, '', key if key is not None and not store[key] else None)

        new_grad(loss, 'loss grad')
        for node in reversed(self._nodes):
            if not any(o.tid in grads for o in node.outputs):
                continue
            self.module = node.module
            if node.grad_alias:
                # the inputs' gradients are views of the outputs' gradient: no new memory
                pool, keys = 0, []
                for o in node.outputs:
                    nbytes, key = grads.pop(o.tid, (0, None))
                    pool += nbytes
                    if key is not None:
                        keys.append(key)
                        store[key] -= 1
                for t in node.inputs:
                    if t.tid not in grads and keys:
                        share = min(pool, t.nbytes)
                        grads[t.tid] = (share, keys[0])
                        store[keys[0]] += 1
                        pool -= share
                for key in keys:
                    self._release(0, '', key if not store[key] else None)
                self._release(pool)
                self._release_saved(node)
                continue
            for t in node.inputs:
                if t.tid not in grads:
                    new_grad(t, f'grad of {t.label}')
            for p in node.params:
                if not p.has_grad:
                    p.has_grad = True
                    self._alloc(p.nbytes, f'grad of {p.label}', ('pg', p.tid))
            if node.temp_bwd:
                key, size = self._key(), self._size(node.temp_bwd)
                self._alloc(size, node.temp_bwd_label, key)
                self._release(size, '', key)
            for o in node.outputs:
                consume(o.tid)
            self._release_saved(node)
        for tid in list(grads):   # gradients of leaves that are not parameters
            consume(tid)
        for node in self._nodes:   # nodes not reached by the loss free their saved tensors
            for t in node.saved:
                t.saved -= 1
                self._maybe_free(t)
        self._nodes = []
        self.module = '(detector)'

    def _release_saved(self, node):
        for t in node.saved:
            t.saved -= 1
            self._maybe_free(t)
        node.saved = []

    def step(self, temp_bytes, label):
        """The optimizer step (gradients and states live) plus its temporaries."""
        self.phase = 'optimizer step'
        self.module = '(optimizer)'
        key = self._key()
        self._alloc(temp_bytes, label, key)
        self._release(int(temp_bytes), '', key)
        self.phase = 'done'
