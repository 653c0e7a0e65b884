"""VFE memory model: MeanVFE (mean of each voxel's points; no parameters, no grad)."""
from ..context import Sparse
from ..graph import FP32


def mean_vfe(g, mcfg, ctx):
    n = ctx.batch_size * ctx.voxels
    c = ctx.geom.num_point_features
    # voxels.sum(dim=1) -> (N, C), a (N, 1) normaliser, then the division
    total = g.tensor(n * c, 'MeanVFE points sum', FP32)
    norm = g.tensor(n, 'MeanVFE normaliser', FP32)
    mean = g.tensor(n * c, 'voxel_features (N, C)', FP32)
    g.drop(total, norm)
    g.set_batch('voxel_features', mean)
    coords = g.get_batch('voxel_coords')
    ctx.sparse = Sparse(mean, n, c, ctx.geom.spatial, (1, 1, 1), coords)
    ctx.point_features = c
    g.drop(mean)


MODELS = {'MeanVFE': mean_vfe}
