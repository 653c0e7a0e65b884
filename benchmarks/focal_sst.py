"""FocalSSTEncoder at the users' geometry on the CPU: time and peak tensor memory.

Grid 500 x 200 x 175 (x, y, z) = DSVT sparse_shape [500, 200, 175], voxel [0.2, 0.2, 0.04],
range [0, -20, -3, 100, 20, 4], NUM_FILTERS [32, 64, 128], ~25k voxels of a LiDAR-like scene
(ground returns thinning with range, car-sized boxes seen on their faces, two walls).
Usage: python benchmarks/focal_sst.py [--voxels 25000] [--repeats 3]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import bench, describe_machine, fmt_bytes, fmt_time, print_table  # noqa
from easydict import EasyDict  # noqa: E402
from pcdet_focal.models.focal_sst import FocalSSTEncoder  # noqa: E402

PCR = np.array([0, -20, -3, 100, 20, 4], dtype=np.float32)
VOXEL = np.array([0.2, 0.2, 0.04], dtype=np.float32)
GRID = np.round((PCR[3:] - PCR[:3]) / VOXEL).astype(np.int64)        # 500, 200, 175


def lidar_like_voxels(n_voxels, seed=0):
    """(N, 4) [b=0, z, y, x] int32 unique voxels + (N, 4) features + (1, M, 8) boxes."""
    rng = np.random.default_rng(seed)
    # ground: 64 beams -> rings; point density ~ 1 / range
    r = 3 + 97 * rng.random(600_000) ** 2
    az = rng.uniform(-0.6, 0.6, r.shape)
    ground = np.stack([r * np.cos(az), r * np.sin(az), -1.73 + rng.normal(0, 0.03, r.shape)], 1)
    boxes, faces = [], []
    for _ in range(15):
        cx, cy, yaw = rng.uniform(8, 90), rng.uniform(-15, 15), rng.uniform(-np.pi, np.pi)
        box = [cx, cy, -1.73 + 0.75, 4.2, 1.8, 1.5, yaw, 1]
        boxes.append(box)
        u = rng.uniform(-0.5, 0.5, (4000, 3)) * np.array(box[3:6])
        side = rng.integers(0, 3, 4000)                  # snap one coordinate to a face
        u[np.arange(4000), side] = np.sign(u[np.arange(4000), side]) * np.array(box[3:6])[side] / 2
        c, s = np.cos(yaw), np.sin(yaw)
        faces.append(np.stack([cx + u[:, 0] * c - u[:, 1] * s, cy + u[:, 0] * s + u[:, 1] * c,
                               box[2] + u[:, 2]], 1))
    wall = np.stack([rng.uniform(10, 95, 60_000), np.full(60_000, 18.5) + rng.normal(0, .05, 60_000),
                     rng.uniform(-1.7, 2.5, 60_000)], 1)
    pts = np.concatenate([ground, *faces, wall])
    idx = np.floor((pts - PCR[:3]) / VOXEL).astype(np.int64)
    ok = ((idx >= 0) & (idx < GRID)).all(1)
    vox = np.unique(idx[ok], axis=0)
    vox = vox[rng.permutation(len(vox))[:n_voxels]]
    coords = np.concatenate([np.zeros((len(vox), 1), np.int64), vox[:, ::-1]], 1)  # b, z, y, x
    feats = np.concatenate([(vox + 0.5) * VOXEL + PCR[:3], rng.random((len(vox), 1))], 1)
    return (torch.tensor(coords, dtype=torch.int32), torch.tensor(feats, dtype=torch.float32),
            torch.tensor([boxes], dtype=torch.float32))


def build_encoder(device='cpu'):
    """The users' FocalSSTEncoder (NUM_FILTERS [32, 64, 128], 4 input features) on ``device``."""
    cfg = EasyDict(NAME='FocalSSTEncoder', NUM_FILTERS=[32, 64, 128], KERNEL_SIZE=3,
                   IMPORTANCE_THRESHOLD=0.5)
    return FocalSSTEncoder(cfg, 4, GRID, VOXEL, PCR).to(device)


def encoder_fns(enc, coords, feats, boxes):
    """``(train_step, infer)`` closures on one sample (tensors on the encoder's device):
    a training forward + focal loss + backward (grads cleared after), and an eval forward."""
    def batch():
        return {'voxel_features': feats, 'voxel_coords': coords, 'batch_size': 1,
                'gt_boxes': boxes}

    def train_step():
        enc.train()
        out = enc(batch())
        loss, _ = enc.get_loss()
        (loss + out['voxel_features'].mean()).backward()
        enc.zero_grad(set_to_none=True)
        return None

    def infer():
        enc.eval()
        with torch.no_grad():
            return enc(batch())['voxel_features']
    return train_step, infer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--voxels', type=int, default=25_000)
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    coords, feats, boxes = lidar_like_voxels(args.voxels)
    enc = build_encoder()
    print(describe_machine('cpu'))
    print(f'grid {GRID.tolist()} (x, y, z), {coords.shape[0]} voxels, NUM_FILTERS [32, 64, 128]')
    train_step, infer = encoder_fns(enc, coords, feats, boxes)

    rows = []
    for label, own_bias in (('init (own prior 0.01)', None), ('no prior (own bias 0)', 0.0)):
        if own_bias is not None:
            with torch.no_grad():
                for blk in enc.blocks:
                    blk.imp_bias[-1] = own_bias
        for mode, fn in (('train fwd+bwd', train_step), ('eval fwd', infer)):
            res = bench(fn, 'cpu', repeats=args.repeats, warmup=1)
            st = enc.last_stats
            rows.append([label, mode, st['voxels_in'], st['new_voxels_0'], st['new_voxels_1'],
                         st['voxels_out'], fmt_time(res.time_s), fmt_bytes(res.peak_bytes)])
    print_table(['importance head', 'pass', 'voxels in', 'new blk0', 'new blk1', 'voxels out',
                 'median time', 'peak tensor mem'], rows)


if __name__ == '__main__':
    main()
