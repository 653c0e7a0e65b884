"""One memory model per module kind, keyed by config slot and NAME.

A model is ``fn(graph, module_cfg, ctx)``: it replays the module's training forward on the
graph (parameters, activations, buffers, losses) and updates ``ctx`` (the sparse features /
BEV map it hands to the next slot, geometry lines for the report).
"""
from . import bev_backbone, dsvt, focal_sst, heads, map_to_bev, spconv_backbone, vfe

MODELS = {
    'VFE': dict(vfe.MODELS),
    'BACKBONE_3D': {**spconv_backbone.MODELS, **dsvt.MODELS, **focal_sst.MODELS},
    'MAP_TO_BEV': dict(map_to_bev.MODELS),
    'BACKBONE_2D': dict(bev_backbone.MODELS),
    'DENSE_HEAD': dict(heads.MODELS),
}


def modelled_names():
    """{slot: sorted NAMEs} the estimator has a memory model for."""
    return {slot: sorted(table) for slot, table in MODELS.items()}
