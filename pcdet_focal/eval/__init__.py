"""Rotated box IoU (numba) and KITTI-style AP."""
