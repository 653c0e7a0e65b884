"""BACKBONE_2D ``BaseBEVBackbone``: conv blocks per stride, each upsampled back and concatenated.

Config keys: ``CONFIG`` below (OpenPCDet's). Upsampling per block, back to a common
resolution: u >= 1 -> ConvTranspose2d(kernel = stride = u); u < 1 -> Conv2d with kernel =
stride = 1/u (an integer); u == 1 with USE_CONV_FOR_NO_STRIDE -> a 1x1 Conv2d.
num_bev_features = sum(NUM_UPSAMPLE_FILTERS); without UPSAMPLE_STRIDES the output is the last
block's map (NUM_FILTERS[-1] channels); with no blocks at all the input passes through.
Reads ``spatial_features`` (B, C, H, W), writes ``spatial_features_2d``.
Inside OpenPCDet its own BaseBEVBackbone (same name) is used instead.
"""
import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..registry import BACKBONE_2D
from ..schema import AnyValue, Bool, Float, Int, Key, ListOf, Schema


def _bn_relu(channels):
    # eps / momentum as OpenPCDet's BEV backbone, so checkpoints behave the same
    return [nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01), nn.ReLU()]


@BACKBONE_2D.register()
class BaseBEVBackbone(nn.Module):
    CONFIG = Schema('BaseBEVBackbone', [
        Key('LAYER_NUMS', ListOf(Int(lo=0)), [], 'extra 3x3 conv layers of each block'),
        Key('LAYER_STRIDES', ListOf(Int(lo=1)), [],
            "stride of each block's first conv (strides compound block to block)"),
        Key('NUM_FILTERS', ListOf(Int(lo=1)), [], 'channels of each block'),
        Key('UPSAMPLE_STRIDES', ListOf(Float(lo=0, lo_open=True)), [],
            'per block, back to a common resolution (u >= 1: transposed conv; 1/k: conv)'),
        Key('NUM_UPSAMPLE_FILTERS', ListOf(Int(lo=1)), [], 'channels of each upsampled output'),
        Key('USE_CONV_FOR_NO_STRIDE', Bool(), False, 'upsample stride 1 as a 1x1 conv'),
        Key('NUM_FRAME', AnyValue(), None, "OpenPCDet's MPPNet key (unused)"),
    ])

    def __init__(self, model_cfg, input_channels, **kwargs):
        super().__init__()
        self.model_cfg = model_cfg
        p = 'MODEL.BACKBONE_2D'
        cfg = self.cfg = self.CONFIG.parse(model_cfg, p)
        if input_channels is None:
            raise ConfigError(f'{p} (BaseBEVBackbone) needs its input channel count from '
                              'MAP_TO_BEV.NUM_BEV_FEATURES; add a MODEL.MAP_TO_BEV module')
        self.input_channels = int(input_channels)
        layer_nums, layer_strides = cfg.LAYER_NUMS, cfg.LAYER_STRIDES
        num_filters = cfg.NUM_FILTERS
        if not len(layer_nums) == len(layer_strides) == len(num_filters):
            raise ConfigError(f'{p}: LAYER_NUMS ({len(layer_nums)} entries), '
                              f'LAYER_STRIDES ({len(layer_strides)}) and NUM_FILTERS '
                              f'({len(num_filters)}) must have one entry per block')
        up_strides, up_filters = cfg.UPSAMPLE_STRIDES, cfg.NUM_UPSAMPLE_FILTERS
        if len(up_strides) != len(up_filters):
            raise ConfigError(f'{p}: UPSAMPLE_STRIDES ({len(up_strides)} entries) and '
                              f'NUM_UPSAMPLE_FILTERS ({len(up_filters)}) must have the same '
                              'length')
        if up_strides and len(up_strides) != len(layer_nums):
            raise ConfigError(f'{p}: UPSAMPLE_STRIDES has {len(up_strides)} entries but '
                              f'there are {len(layer_nums)} blocks (LAYER_NUMS); give one '
                              'upsample stride per block (an extra final deblock is not '
                              'supported)')
        use_conv = cfg.USE_CONV_FOR_NO_STRIDE

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

    def memory(self, tape, flow):
        """The memory rule: :func:`bev_backbone_memory`."""
        bev_backbone_memory(self, tape, flow)

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


def bev_backbone_memory(module, tape, flow, keep_levels=False):
    """Memory rule of a BaseBEVBackbone-shaped module (``blocks`` / ``deblocks`` Sequentials,
    outputs concatenated): ours, and OpenPCDet's (``keep_levels``: its forward keeps every
    level's output in a dict until it returns)."""
    x0 = flow.bev
    x, outs, levels = x0, [], []
    for i, block in enumerate(module.blocks):
        y = tape.run(x, block, f'blocks.{i}')
        if x is not x0 and not keep_levels:
            tape.drop(x.t)          # the local ``x`` moves on to the new level
        x = y
        levels.append(y)
        outs.append(tape.run(y, module.deblocks[i], f'deblocks.{i}') if len(module.deblocks)
                    else None)
    outs = [o for o in outs if o is not None]
    if len(outs) > 1:
        out = tape.cat_channels(outs, 'cat')
        tape.drop(*(o.t for o in outs))
    elif outs:
        out = outs[0]
    else:
        out = x
        out.t.py += 1
    tape.set_batch('spatial_features_2d', out.t)
    tape.drop(out.t)
    if x is not x0:
        tape.drop(x.t)
    if keep_levels:
        tape.drop(*(lv.t for lv in levels[:-1]))
    stride = 1
    for block in module.blocks:
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                stride *= m.stride[0]
    if len(module.deblocks):
        deblock = next(m for m in module.deblocks[-1].modules()
                       if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
        up = deblock.stride[0]
        stride = stride // up if isinstance(deblock, nn.ConvTranspose2d) else stride * up
    flow.bev = out
    flow.bev_stride = flow.bev_stride * stride
    flow.shape_line(f'BACKBONE_2D output: {out.c} x {out.h} x {out.w} (C, H, W)')
