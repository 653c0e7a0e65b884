"""What flows between module memory models: activation records and the walk's context."""
from dataclasses import dataclass, field


@dataclass
class Dense:
    """A (B, C, H, W) activation."""

    t: object          # SymTensor
    b: int
    c: int
    h: int
    w: int

    @property
    def numel(self):
        return self.b * self.c * self.h * self.w

    @property
    def per_sample(self):
        return self.c * self.h * self.w


@dataclass
class Sparse:
    """(N, C) voxel features over the batch, coords (N, 4) [b, z, y, x] in ``spatial`` [D, H, W].

    ``stride`` is (z, y, x) relative to the voxel grid; ``indice_dict`` mimics spconv's cache of
    index pairs per ``indice_key`` (shared by every tensor derived from the input)."""

    t: object
    n: int
    c: int
    spatial: tuple
    stride: tuple = (1, 1, 1)
    coords: object = None
    indice_dict: dict = field(default_factory=dict)


@dataclass
class Context:
    cfg: object
    geom: object                 # geometry.Geometry
    batch_size: int
    voxels: int                  # input voxels per sample
    points: int                  # raw points per sample
    target: str = 'cuda'         # 'cuda' or 'cpu': which kernels' buffers to model
    amp: bool = False
    class_names: list = field(default_factory=list)
    shapes: list = field(default_factory=list)         # geometry lines for the report
    notes: list = field(default_factory=list)
    not_modelled: list = field(default_factory=list)
    flattened_bev_channels: object = None
    bev_shape: object = None                           # (C, H, W) of spatial_features
    map_to_bev_input: object = None                    # (C, D, H, W) reaching MAP_TO_BEV
    # flow between slots
    sparse: object = None        # Sparse
    bev: object = None           # Dense
    bev_stride: int = 1
    point_features: int = 4      # VFE output width
    losses: list = field(default_factory=list)
    guessing: bool = False       # an earlier module was not modelled: inputs are guesses
    gt_boxes: int = 100          # ground-truth boxes per sample (targets, IoU / inside tests)
    focal_growth: float = None   # assumed new voxels per input voxel and focal block
                                 # (None: the config's MAX_NEW_VOXELS_RATIO cap, else 1.0)
    focal_new_voxels: object = None   # observed new voxels per focal block (over the batch)
    # counts observed in a real step (--measure), each over the batch: 'dsvt_voxels' [per
    # stage], 'dsvt_sets' [[shift 0, shift 1] per stage], 'bev_columns'
    observed: dict = field(default_factory=dict)

    def shape_line(self, text):
        if text not in self.shapes:
            self.shapes.append(text)

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)
