"""Ray-primitive intersections for the synthetic LiDAR (vectorised numpy, rays from the origin).

Every function takes ``dirs`` (R, 3) float64 unit ray directions starting at the sensor
(0, 0, 0), and returns ``t`` (R,) float64, the distance to the first hit in front of the sensor
(``inf`` when the ray misses), and ``cos`` (R,) float64, |cos| of the angle between the ray and
the surface normal at the hit (drives the return intensity; 0 where missed).
"""
import numpy as np


def ray_plane(dirs, normal, offset):
    """Plane ``normal . p = offset`` (normal (3,) unit). Hit only from the side the sensor is on."""
    normal = np.asarray(normal, dtype=np.float64)
    denom = dirs @ normal
    with np.errstate(divide='ignore', invalid='ignore'):
        t = offset / denom
    hit = (t > 0) & np.isfinite(t)
    return np.where(hit, t, np.inf), np.where(hit, np.abs(denom), 0.0)


def ray_box(dirs, center, size, yaw):
    """Box with centre (3,), size (dx, dy, dz) along its own axes, heading ``yaw`` around +z.

    Slab method in the box frame: the ray enters where the last of the three slabs is
    entered; the normal of the hit face is that slab's axis.
    """
    c, s = np.cos(yaw), np.sin(yaw)
    cx, cy, cz = (float(v) for v in center)
    half = 0.5 * np.asarray(size, dtype=np.float64)
    # sensor origin and ray directions in the box frame (rotate by -yaw after translating)
    origin = (-(c * cx + s * cy), -(-s * cx + c * cy), -cz)
    d = (c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2])
    near, far = [], []
    with np.errstate(divide='ignore', invalid='ignore'):
        for axis in range(3):
            inv = 1.0 / d[axis]
            ta = (-half[axis] - origin[axis]) * inv
            tb = (half[axis] - origin[axis]) * inv
            # fmin/fmax skip the NaN of a ray parallel to a face it starts on
            near.append(np.fmin(ta, tb))
            far.append(np.fmax(ta, tb))
    t_near = np.fmax(np.fmax(near[0], near[1]), near[2])
    t_far = np.fmin(np.fmin(far[0], far[1]), far[2])
    hit = (t_near <= t_far) & (t_near > 0)
    cos = np.where(t_near == near[0], np.abs(d[0]),
                   np.where(t_near == near[1], np.abs(d[1]), np.abs(d[2])))
    return np.where(hit, t_near, np.inf), np.where(hit, cos, 0.0)


def ray_vertical_cylinder(dirs, center_xy, radius, z0, z1):
    """Vertical cylinder (axis parallel to +z through ``center_xy``), side surface z in [z0, z1]."""
    cx, cy = float(center_xy[0]), float(center_xy[1])
    dx, dy = dirs[:, 0], dirs[:, 1]
    a = dx * dx + dy * dy
    b = -2.0 * (dx * cx + dy * cy)
    cc = cx * cx + cy * cy - radius * radius
    disc = b * b - 4 * a * cc
    with np.errstate(divide='ignore', invalid='ignore'):
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    z = t * dirs[:, 2]
    hit = (disc > 0) & (a > 1e-12) & (t > 0) & (z >= z0) & (z <= z1)
    # radial normal at the hit point
    nx = (t * dx - cx) / radius
    ny = (t * dy - cy) / radius
    cos = np.abs(nx * dx + ny * dy)
    return np.where(hit, t, np.inf), np.where(hit, cos, 0.0)


def ray_sphere(dirs, center, radius):
    """Sphere of ``radius`` around ``center`` (3,): the near intersection."""
    center = np.asarray(center, dtype=np.float64)
    b = dirs @ center
    cc = center @ center - radius * radius
    disc = b * b - cc
    t = b - np.sqrt(np.maximum(disc, 0.0))
    hit = (disc > 0) & (t > 0)
    hit_pts = dirs * t[:, None] - center
    cos = np.abs(np.einsum('ij,ij->i', hit_pts, dirs)) / radius
    return np.where(hit, t, np.inf), np.where(hit, cos, 0.0)
