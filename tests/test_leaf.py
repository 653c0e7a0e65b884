"""Every trainable parameter sits on a leaf module (OpenPCDet's adam_onecycle trains only
those), and checkpoints written with the old parameter names still load."""
from pathlib import Path

import pytest
import torch
from easydict import EasyDict
from torch import nn

from pcdet_focal.config import load_config
from pcdet_focal.memory import prepare
from pcdet_focal.models.focal_sst import FocalBlock
from pcdet_focal.models.leaf import LeafMultiheadAttention, non_leaf_parameters
from pcdet_focal.models.map_to_bev import SparseHeightCompression

REPO = Path(__file__).resolve().parents[1]


def leaf_parameters(model):
    """What OpenPCDet's build_optimizer gives adam_onecycle, written out here: flatten the model
    to the modules without children, take their parameters."""
    def flatten(m):
        kids = list(m.children())
        return [leaf for k in kids for leaf in flatten(k)] if kids else [m]
    return {id(p) for leaf in flatten(model) for p in leaf.parameters() if p.requires_grad}


@pytest.mark.parametrize('name', ['focalsst_dsvt.yaml', 'focalsst_dsvt_demo.yaml',
                                  'focalsst_dsvt_dense_hc.yaml'])
def test_shipped_models_keep_every_parameter_on_a_leaf(name):
    model = prepare(load_config(REPO / 'cfgs' / name), frames=0).model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reached = leaf_parameters(model)
    assert [n for n, p in trainable if id(p) not in reached] == []
    assert non_leaf_parameters(model) == []


def test_the_check_sees_a_parameter_on_a_module_with_children():
    mha = nn.MultiheadAttention(8, 2)
    assert non_leaf_parameters(mha) == ['in_proj_weight', 'in_proj_bias']
    assert len(leaf_parameters(mha)) == 2  # out_proj only


def test_leaf_attention_computes_torchs_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = LeafMultiheadAttention(16, 4, batch_first=True)
    ours.load_state_dict(ref.state_dict())   # same checkpoint keys as torch's, both ways
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    # torch's parameter order (optimizer states index parameters by position)
    assert [n for n, _ in ours.named_parameters()] == ['in_proj.weight', 'in_proj.bias',
                                                       'out_proj.weight', 'out_proj.bias']
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 3:] = True
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        a = ref(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        b = ours(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(ref.in_proj_weight.grad, ours.in_proj.weight.grad)


def test_checkpoint_keys_stay_and_both_layouts_load():
    torch.manual_seed(0)
    cfg = EasyDict(NAME='SparseHeightCompression', MODE='learned', NUM_BEV_FEATURES=4,
                   INPUT_FEATURES=3, NUM_HEIGHT_BINS=5)
    src, dst = SparseHeightCompression(cfg), SparseHeightCompression(cfg)
    state = src.state_dict()
    assert 'weight' in state and 'proj.weight' not in state  # the key checkpoints always had
    dst.load_state_dict(state)
    assert torch.equal(dst.weight, src.weight)
    dst.load_state_dict({('proj.weight' if k == 'weight' else k): v for k, v in state.items()})

    src, dst = (FocalBlock(2, 4, 3, 0.5, 1.0, f'k{i}') for i in range(2))
    with torch.no_grad():
        src.imp_bias.uniform_()
    state = src.state_dict()
    assert 'imp_bias' in state and 'imp.bias' not in state
    dst.load_state_dict(state)
    assert torch.equal(dst.imp_bias, src.imp_bias)
    assert [n for n, _ in src.named_parameters()][:2] == ['imp.bias', 'conv_imp.weight']
