"""BACKBONE_2D ``BaseBEVBackbone``: conv blocks per stride, each upsampled back and concatenated.

Config keys (OpenPCDet's):
  LAYER_NUMS [n_0, ...]        extra 3x3 conv layers in block i (after its strided conv)
  LAYER_STRIDES [s_0, ...]     stride of block i's first conv (strides compound block to block)
  NUM_FILTERS [c_0, ...]       channels of block i
  UPSAMPLE_STRIDES [u_0, ...]  optional; per block, back to a common resolution: u >= 1 ->
                               ConvTranspose2d(kernel = stride = u); u < 1 -> Conv2d with
                               kernel = stride = 1/u (must be an integer); u == 1 with
                               USE_CONV_FOR_NO_STRIDE: True -> 1x1 Conv2d
  NUM_UPSAMPLE_FILTERS [...]   channels of each upsampled output
  USE_CONV_FOR_NO_STRIDE       default False
num_bev_features = sum(NUM_UPSAMPLE_FILTERS); without UPSAMPLE_STRIDES the output is the last
block's map (NUM_FILTERS[-1] channels); with no blocks at all the input passes through.
Reads ``spatial_features`` (B, C, H, W), writes ``spatial_features_2d``.
Inside OpenPCDet its own BaseBEVBackbone (same name) is used instead.
"""
import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..registry import BACKBONE_2D


def _num_list(cfg, key, minimum, integer=True):
    vals = cfg.get(key, None)
    if vals is None:
        return None
    kinds = int if integer else (int, float)
    if not isinstance(vals, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, kinds) for v in vals):
        what = 'integers' if integer else 'numbers'
        raise ConfigError(f'BACKBONE_2D.{key} must be a list of {what}, got {vals!r}')
    if any(v < minimum for v in vals):
        raise ConfigError(f'BACKBONE_2D.{key}={list(vals)}: every entry must be >= {minimum}')
    return list(vals)


def _bn_relu(channels):
    # eps / momentum as OpenPCDet's BEV backbone, so checkpoints behave the same
    return [nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01), nn.ReLU()]


@BACKBONE_2D.register()
class BaseBEVBackbone(nn.Module):
    def __init__(self, model_cfg, input_channels, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        if input_channels is None:
            raise ConfigError('BACKBONE_2D.BaseBEVBackbone needs its input channel count from '
                              'MAP_TO_BEV.NUM_BEV_FEATURES; add a MODEL.MAP_TO_BEV module')
        self.input_channels = int(input_channels)
        layer_nums = _num_list(model_cfg, 'LAYER_NUMS', 0) or []
        layer_strides = _num_list(model_cfg, 'LAYER_STRIDES', 1) or []
        num_filters = _num_list(model_cfg, 'NUM_FILTERS', 1) or []
        if not len(layer_nums) == len(layer_strides) == len(num_filters):
            raise ConfigError(f'BACKBONE_2D: LAYER_NUMS ({len(layer_nums)} entries), '
                              f'LAYER_STRIDES ({len(layer_strides)}) and NUM_FILTERS '
                              f'({len(num_filters)}) must have one entry per block')
        up_strides = _num_list(model_cfg, 'UPSAMPLE_STRIDES', 0, integer=False) or []
        up_filters = _num_list(model_cfg, 'NUM_UPSAMPLE_FILTERS', 1) or []
        if len(up_strides) != len(up_filters):
            raise ConfigError(f'BACKBONE_2D: UPSAMPLE_STRIDES ({len(up_strides)} entries) and '
                              f'NUM_UPSAMPLE_FILTERS ({len(up_filters)}) must have the same '
                              'length')
        if up_strides and len(up_strides) != len(layer_nums):
            raise ConfigError(f'BACKBONE_2D: UPSAMPLE_STRIDES has {len(up_strides)} entries but '
                              f'there are {len(layer_nums)} blocks (LAYER_NUMS); give one '
                              'upsample stride per block (an extra final deblock is not '
                              'supported)')
        use_conv = bool(model_cfg.get('USE_CONV_FOR_NO_STRIDE', False))

        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        c_in = self.input_channels
        for i, (n_layers, stride, c_out) in enumerate(zip(layer_nums, layer_strides,
                                                          num_filters)):
            layers = [nn.ZeroPad2d(1), nn.Conv2d(c_in, c_out, 3, stride=stride, bias=False),
                      *_bn_relu(c_out)]
            for _ in range(int(n_layers)):
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), *_bn_relu(c_out)]
            self.blocks.append(nn.Sequential(*layers))
            c_in = c_out
            if up_strides:
                self.deblocks.append(self._deblock(i, c_out, up_filters[i], up_strides[i],
                                                   use_conv))
        if up_filters:
            self.num_bev_features = sum(int(c) for c in up_filters)
        else:
            self.num_bev_features = c_in  # last block's channels (or the input, no blocks)

    @staticmethod
    def _deblock(i, c_in, c_out, stride, use_conv):
        if stride > 1 or (stride == 1 and not use_conv):
            if stride != int(stride):
                raise ConfigError(f'BACKBONE_2D.UPSAMPLE_STRIDES[{i}]={stride}: strides >= 1 '
                                  'must be integers')
            s = int(stride)
            conv = nn.ConvTranspose2d(c_in, c_out, s, stride=s, bias=False)
        else:
            if stride <= 0:
                raise ConfigError(f'BACKBONE_2D.UPSAMPLE_STRIDES[{i}]={stride} must be > 0')
            s = round(1 / stride)
            if abs(s - 1 / stride) > 1e-6:
                raise ConfigError(f'BACKBONE_2D.UPSAMPLE_STRIDES[{i}]={stride}: a stride < 1 '
                                  'must be 1/k for an integer k (downsampling by k)')
            conv = nn.Conv2d(c_in, c_out, s, stride=s, bias=False)
        return nn.Sequential(conv, *_bn_relu(c_out))

    def forward(self, data_dict):
        """Reads ``spatial_features`` (B, C_in, H, W); writes ``spatial_features_2d``
        (B, num_bev_features, H', W')."""
        if 'spatial_features' not in data_dict:
            raise InputError('BaseBEVBackbone needs batch_dict["spatial_features"] from the '
                             'MAP_TO_BEV module; it is missing')
        x = data_dict['spatial_features']
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise InputError(f'spatial_features is {tuple(x.shape)} but BACKBONE_2D was built '
                             f'for (B, {self.input_channels}, H, W) from '
                             'MAP_TO_BEV.NUM_BEV_FEATURES; set NUM_BEV_FEATURES to the real '
                             'channel count')
        x = x.contiguous()
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.deblocks):
                outs.append(self.deblocks[i](x))
        if len(outs) > 1:
            sizes = [tuple(o.shape[2:]) for o in outs]
            if len(set(sizes)) > 1:
                raise InputError(f'BACKBONE_2D: upsampled block outputs have sizes {sizes} '
                                 f'(H x W) for a {tuple(data_dict["spatial_features"].shape[2:])}'
                                 ' BEV map; make the BEV size divisible by the product of '
                                 'LAYER_STRIDES or adjust UPSAMPLE_STRIDES')
            x = torch.cat(outs, dim=1)
        elif outs:
            x = outs[0]
        data_dict['spatial_features_2d'] = x
        return data_dict
