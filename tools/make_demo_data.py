#!/usr/bin/env python
"""Write synthetic LiDAR scenes in KITTI layout: ``python tools/make_demo_data.py [--out DIR]``.

Writes DIR/training/{velodyne,label_2,calib}/<id>.{bin,txt,txt} and DIR/ImageSets/{train,val}.txt,
readable by KittiDataset (``--set DATA_CONFIG.DATASET KittiDataset DATA_CONFIG.DATA_PATH DIR``).
The scenes are those SyntheticDataset generates with the config's DATA_CONFIG (default: the
demo's); train frames use --seed, val frames --seed + 1 (default: the config's SEED.train /
SEED.test), so by default the files hold exactly the demo's train and val frames.
"""
import argparse
import logging

import _init_path  # noqa: F401  (pcdet_focal from this checkout)

from pcdet_focal.errors import cli_main

# the demo's config: its DATA_CONFIG (range, SCENE knobs, seeds) makes the KITTI-layout scenes
# match what `tools/train.py --cfg cfgs/focalsst_dsvt_demo.yaml` generates on the fly
DEFAULT_CFG = 'cfgs/focalsst_dsvt_demo.yaml'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/kitti_demo',
                        help='output folder (KITTI layout; default data/kitti_demo)')
    parser.add_argument('--num_train', type=int, default=40, help='training frames (40)')
    parser.add_argument('--num_val', type=int, default=10, help='validation frames (10)')
    parser.add_argument('--seed', type=int, default=None,
                        help='train split seed (val uses seed + 1); default: the config SEED')
    parser.add_argument('--cfg', default=DEFAULT_CFG,
                        help='model config with a synthetic DATA_CONFIG, or a synthetic dataset '
                             'config: its SCENE knobs, POINT_CLOUD_RANGE (where objects go) '
                             f'and SEED are used (default {DEFAULT_CFG})')
    parser.add_argument('--overwrite', action='store_true', help='write into a non-empty --out')
    return parser.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    from pcdet_focal.config import load_config, resolve_path
    from pcdet_focal.data.demo_data import write_demo_dataset

    cfg = load_config(resolve_path(args.cfg, None, '--cfg'))
    data_cfg = cfg.get('DATA_CONFIG', cfg)
    seeds = data_cfg.get('SEED', {'train': 0, 'test': 1})
    seed_train = args.seed if args.seed is not None else int(seeds['train'])
    seed_val = args.seed + 1 if args.seed is not None else int(seeds['test'])
    summary = write_demo_dataset(args.out, args.num_train, args.num_val, seed_train, seed_val,
                                 scene_cfg=data_cfg.get('SCENE'),
                                 point_cloud_range=data_cfg.get('POINT_CLOUD_RANGE',
                                                                [0, -40, -3, 70.4, 40, 1]),
                                 overwrite=args.overwrite)
    print(f'wrote {summary["train"]} train + {summary["val"]} val scenes to {summary["out"]}; '
          f'train on them with: python tools/train.py --cfg cfgs/focalsst_dsvt_demo.yaml --set '
          f'DATA_CONFIG.DATASET KittiDataset DATA_CONFIG.DATA_PATH {summary["out"]}')
    return 0


if __name__ == '__main__':
    main()
