"""Parameters on leaf modules only, so OpenPCDet's default optimizer trains every one.

OpenPCDet's ``adam_onecycle`` (its fastai ``OptimWrapper`` over ``flatten_model``) hands the
optimizer the parameters of *leaf* modules only: a parameter held by a module that also has
children is silently never updated by its train.py. Our modules keep each parameter on a leaf:

- :class:`Parameters`: a leaf holding named parameters, for a tensor a module with children
  owns (the learned height projection, the importance bias);
- :class:`LeafMultiheadAttention`: ``nn.MultiheadAttention`` with its q/k/v projection moved
  into a leaf child (``in_proj.weight`` / ``in_proj.bias``), same forward, same attributes.

Checkpoints keep their keys (``weight``, ``imp_bias``, ``in_proj_weight``: torch's and OpenPCDet's
layout, and ours before the move): :func:`saved_as` writes each moved parameter under its old
name and reads it back from there, so old checkpoints load and OpenPCDet's DSVT weights swap with
ours both ways.
"""
from torch import nn


class Parameters(nn.Module):
    """A leaf module holding the given parameters under their names (no forward)."""

    def __init__(self, **params):
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, value)


def saved_as(module, names):
    """Keep ``module``'s checkpoint keys: ``names`` maps a key (relative to the module) to the
    parameter path now holding it; ``state_dict()`` writes the key, ``load_state_dict()`` reads
    it (the path's own key is accepted too)."""
    def on_save(_module, state_dict, prefix, _metadata):
        for key, path in names.items():
            if prefix + path in state_dict:
                state_dict[prefix + key] = state_dict.pop(prefix + path)

    def on_load(state_dict, prefix, *_args):
        for key, path in names.items():
            if prefix + key in state_dict and prefix + path not in state_dict:
                state_dict[prefix + path] = state_dict.pop(prefix + key)

    module._register_state_dict_hook(on_save)
    module._register_load_state_dict_pre_hook(on_load)


class LeafMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose parameters all sit on leaf modules.

    torch's layer holds ``in_proj_weight`` / ``in_proj_bias`` itself and ``out_proj`` as a
    child; here the two move into the leaf ``in_proj``. ``in_proj_weight`` / ``in_proj_bias``
    stay readable (torch's forward and ours use them), so the layer computes exactly what
    torch's does. Only a packed projection is supported (kdim == vdim == embed_dim).
    """

    def __init__(self, embed_dim, num_heads, **kwargs):
        super().__init__(embed_dim, num_heads, **kwargs)
        if not self._qkv_same_embed_dim:
            raise ValueError('LeafMultiheadAttention needs kdim == vdim == embed_dim')
        # torch's __init__ registered them here (the properties below could not resolve yet);
        # in_proj goes before out_proj: parameters() keeps torch's order, so optimizer states
        # saved before the move still line up
        out_proj = self._modules.pop('out_proj')
        self.in_proj = Parameters(weight=self._parameters.pop('in_proj_weight'))
        bias = self._parameters.pop('in_proj_bias')
        if bias is not None:
            self.in_proj.register_parameter('bias', bias)
        self.out_proj = out_proj
        saved_as(self, {'in_proj_weight': 'in_proj.weight', 'in_proj_bias': 'in_proj.bias'})

    @property
    def in_proj_weight(self):
        return self.in_proj.weight

    @property
    def in_proj_bias(self):
        return getattr(self.in_proj, 'bias', None)


def non_leaf_parameters(model):
    """Names of trainable parameters held by modules that also have children (those OpenPCDet's
    adam_onecycle never optimizes)."""
    return [f'{name}.{p}' if name else p
            for name, module in model.named_modules() if any(True for _ in module.children())
            for p, param in module.named_parameters(recurse=False) if param.requires_grad]
