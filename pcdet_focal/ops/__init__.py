"""Pure tensor functions on sparse voxels. No nn.Module, no config.

Coordinate conventions used throughout (OpenPCDet's):
- ``coords``: (N, 4) int, ``[b, z, y, x]``;
- ``spatial_shape``: ``[D, H, W]`` = ``[nz, ny, nx]`` (spconv order);
- ``grid_size`` / ``voxel_size`` / ``sparse_shape`` in configs: ``[x, y, z]``.
"""
