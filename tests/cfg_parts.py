"""Config pieces several tests build models from."""


def separate_head_cfg():
    """CenterHead's SEPARATE_HEAD_CFG as OpenPCDet's CenterPoint configs write it (a fresh copy)."""
    return {
        'HEAD_ORDER': ['center', 'center_z', 'dim', 'rot'],
        'HEAD_DICT': {'center': {'out_channels': 2, 'num_conv': 2},
                      'center_z': {'out_channels': 1, 'num_conv': 2},
                      'dim': {'out_channels': 3, 'num_conv': 2},
                      'rot': {'out_channels': 2, 'num_conv': 2}},
    }
