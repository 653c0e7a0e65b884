"""Synthetic street scenes scanned by a simulated spinning LiDAR (the embedded demo data).

A frame is a function of ``(seed, index)`` only (numpy Generator seeded with both), so any
process regenerates the same frame and nothing is cached on disk.

Scene (LiDAR frame, x forward, y left, z up, sensor at the origin ``SENSOR_HEIGHT`` above the
ground, like KITTI's 1.73 m): a road with a random direction (within +-17 deg of x) and offset;
a gently tilted ground plane; buildings, walls and fences along the road sides; poles, trees
(trunk + fuzzy crown), bushes (fuzzy blobs) and small boxes (bins, kiosks) as clutter;
and the labelled objects, placed without BEV overlap:
- Car: a lower body box (full length/width, 10-55 % of the height) + a narrower, shorter cabin
  (glass: dark and partly dropped); in lanes or parked along the kerb, heading along the road,
  20 % anywhere with a random heading. Size ~ KITTI's (l, w, h) = (3.9, 1.6, 1.56)
  +- (0.4, 0.1, 0.14).
- Pedestrian: a vertical cylinder inside its (0.84, 0.66, 1.76) box; sidewalks or crossing.
- Cyclist: a thin bike box + a rider cylinder inside a (1.76, 0.6, 1.73) box; along the road.

Sensor: ``NUM_BEAMS`` beams linearly spaced over ``VERTICAL_FOV`` (deg), ``NUM_AZIMUTH``
azimuth steps over 360 deg (a random start phase per frame), only the columns inside
``HORIZONTAL_FOV`` are cast. Each ray returns its nearest hit (occlusion) within ``MAX_RANGE``,
with Gaussian range noise ``RANGE_NOISE`` (m), a random ``DROPOUT`` fraction of lost returns,
and an intensity in [0, 1] from the surface reflectivity and the incidence angle.

Returned boxes follow OpenPCDet: (x, y, z, dx, dy, dz, heading) with z the box centre.
Objects that no ray reaches are not labelled (an annotator could not see them either).
"""
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..schema import Float, Int, Key, ListOf, Schema
from .raycast import ray_box, ray_plane, ray_sphere, ray_vertical_cylinder

CLASS_NAMES = ('Car', 'Pedestrian', 'Cyclist')

# (mean, std, min, max) of l, w, h per class, KITTI-like
_SIZE_STATS = {
    'Car': ((3.9, 0.42, 3.0, 5.3), (1.62, 0.10, 1.4, 1.95), (1.53, 0.14, 1.3, 2.0)),
    'Pedestrian': ((0.84, 0.20, 0.5, 1.2), (0.66, 0.12, 0.45, 0.9), (1.76, 0.11, 1.45, 2.0)),
    'Cyclist': ((1.76, 0.16, 1.4, 2.1), (0.60, 0.10, 0.45, 0.85), (1.73, 0.09, 1.5, 1.95)),
}


def _pair(item):
    return ListOf(item, length=2, what='[min, max]')


SCENE_CONFIG = Schema('SCENE', [
    Key('NUM_BEAMS', Int(lo=1), 32, 'laser beams of the spinning sensor'),
    Key('NUM_AZIMUTH', Int(lo=8), 1024, 'azimuth steps per revolution'),
    Key('VERTICAL_FOV', _pair(Float(lo=-90, hi=90)), [-24.8, 2.0],
        'beam elevations, degrees (KITTI HDL-64E span)'),
    Key('HORIZONTAL_FOV', _pair(Float()), [-180.0, 180.0], 'azimuth span, degrees'),
    Key('SENSOR_HEIGHT', Float(lo=0, lo_open=True), 1.73, 'metres above the ground'),
    Key('MAX_RANGE', Float(lo=0, lo_open=True), 80.0, 'metres'),
    Key('MIN_RANGE', Float(lo=0), 1.0, 'metres'),
    Key('RANGE_NOISE', Float(lo=0), 0.02, 'metres, Gaussian along the ray'),
    Key('DROPOUT', Float(lo=0, hi=1, hi_open=True), 0.03, 'share of lost returns'),
    Key('GROUND_TILT_DEG', Float(lo=0), 0.6, 'largest ground tilt, degrees'),
    Key('NUM_CARS', _pair(Int(lo=0)), [6, 16], 'cars attempted per frame'),
    Key('NUM_PEDESTRIANS', _pair(Int(lo=0)), [0, 8], 'pedestrians attempted per frame'),
    Key('NUM_CYCLISTS', _pair(Int(lo=0)), [0, 4], 'cyclists attempted per frame'),
    Key('CLUTTER_DENSITY', Float(lo=0), 1.0, 'poles, trees, bushes, small boxes per road length'),
])


def scene_config(cfg=None, field='DATA_CONFIG.SCENE'):
    """DATA_CONFIG.SCENE checked against SCENE_CONFIG (defaults filled in): an EasyDict."""
    out = SCENE_CONFIG.parse(cfg, field)
    for name in ('VERTICAL_FOV', 'HORIZONTAL_FOV', 'NUM_CARS', 'NUM_PEDESTRIANS', 'NUM_CYCLISTS'):
        lo, hi = out[name]
        if lo > hi:
            raise ConfigError(f'{field}.{name}={out[name]} must be [min, max] with min <= max')
    return out


@dataclass
class _Prim:
    """One ray-castable primitive. kind: box | cyl | sphere; owner: object index or -1."""
    kind: str
    params: tuple
    owner: int
    reflect: float
    drop: float = 0.0   # extra dropout (glass, foliage)
    fuzz: float = 0.0   # extra range spread in metres (foliage)


class _Layout:
    """Places objects and clutter; keeps BEV circles to reject overlaps."""

    def __init__(self, rng, region, max_range):
        self.rng = rng
        self.region = region  # (x_min, y_min, x_max, y_max) where labelled objects may go
        self.max_range = max_range
        self._circles = np.zeros((64, 3))  # (x, y, r) of everything placed, grown on demand
        self.count = 0

    def free(self, x, y, r):
        c = self._circles[:self.count]
        return bool(np.all((c[:, 0] - x) ** 2 + (c[:, 1] - y) ** 2 > (c[:, 2] + r) ** 2))

    def free_rect(self, x, y, length, width, yaw):
        """No placed circle overlaps the rectangle (centre, size, heading)."""
        c = self._circles[:self.count]
        cos, sin = math.cos(yaw), math.sin(yaw)
        du, dv = c[:, 0] - x, c[:, 1] - y
        u = np.clip(du * cos + dv * sin, -length / 2, length / 2)   # nearest rectangle point
        v = np.clip(-du * sin + dv * cos, -width / 2, width / 2)
        gap_u = du * cos + dv * sin - u
        gap_v = -du * sin + dv * cos - v
        return bool(np.all(gap_u ** 2 + gap_v ** 2 > c[:, 2] ** 2))

    def take(self, x, y, r):
        if self.count == len(self._circles):
            self._circles = np.concatenate([self._circles, np.zeros_like(self._circles)])
        self._circles[self.count] = (x, y, r)
        self.count += 1

    def in_region(self, x, y, margin=0.5):
        x0, y0, x1, y1 = self.region
        return (x0 + margin <= x <= x1 - margin and y0 + margin <= y <= y1 - margin
                and math.hypot(x, y) <= 0.92 * self.max_range)


def _sample_size(rng, name):
    return [float(np.clip(rng.normal(m, s), lo, hi)) for m, s, lo, hi in _SIZE_STATS[name]]


class SceneGenerator:
    """``generate(seed, index)`` -> one frame. ``region`` (x_min, y_min, x_max, y_max) limits
    where labelled objects go (the dataset passes its POINT_CLOUD_RANGE)."""

    def __init__(self, scene_cfg=None, region=(-40.0, -40.0, 40.0, 40.0)):
        self.cfg = scene_config(scene_cfg)
        c = self.cfg
        self.region = tuple(float(v) for v in region)
        self.elevation = np.deg2rad(np.linspace(c.VERTICAL_FOV[1], c.VERTICAL_FOV[0],
                                                c.NUM_BEAMS))
        self.step = 2 * math.pi / c.NUM_AZIMUTH

    # ------------------------------------------------------------------ scene layout
    def _layout(self, rng):
        c = self.cfg
        lay = _Layout(rng, self.region, c.MAX_RANGE)
        road_yaw = rng.uniform(-0.3, 0.3)
        road_off = rng.uniform(-3.0, 3.0)           # road centre line, lateral offset (m)
        half_road = rng.uniform(5.0, 8.0)
        sidewalk = rng.uniform(2.5, 4.5)
        cy, sy = math.cos(road_yaw), math.sin(road_yaw)

        def to_world(u, v):  # road frame (u along the road, v across) -> LiDAR frame
            v = v + road_off
            return u * cy - v * sy, u * sy + v * cy

        tilt = math.radians(c.GROUND_TILT_DEG)
        slope = rng.uniform(-1, 1, size=2) * math.tan(tilt)
        ground = lambda x, y: -c.SENSOR_HEIGHT + slope[0] * x + slope[1] * y  # noqa: E731
        prims, objects = [], []
        # the ego vehicle's footprint
        lay.take(-0.6, 0.0, 2.6)
        # along-road interval that can reach the region (labelled objects only go there)
        x0, y0, x1, y1 = self.region
        corner_u = [x * cy + y * sy for x in (x0, x1) for y in (y0, y1)]
        reach = 0.92 * c.MAX_RANGE
        u_lo, u_hi = max(min(corner_u), -reach), min(max(corner_u), reach)
        if u_lo >= u_hi:
            u_lo, u_hi = -reach, reach

        def add_object(name, u, v, yaw_road):
            l, w, h = _sample_size(rng, name)
            x, y = to_world(u, v)
            r = 0.5 * math.hypot(l, w) + 0.25
            if not lay.in_region(x, y) or not lay.free(x, y, r):
                return False
            lay.take(x, y, r)
            yaw = float(((yaw_road + road_yaw) + math.pi) % (2 * math.pi) - math.pi)
            z0 = ground(x, y)
            k = len(objects)
            objects.append((name, [x, y, z0 + h / 2, l, w, h, yaw]))
            cos, sin = math.cos(yaw), math.sin(yaw)
            if name == 'Car':
                refl = rng.uniform(0.15, 0.75)
                zb0, zb1 = z0 + 0.10 * h, z0 + rng.uniform(0.5, 0.6) * h
                prims.append(_Prim('box', ((x, y, (zb0 + zb1) / 2), (l, w, zb1 - zb0), yaw),
                                   k, refl))
                cl = rng.uniform(0.45, 0.6) * l
                off = -rng.uniform(0.0, 0.1) * l
                prims.append(_Prim('box', ((x + off * cos, y + off * sin, (zb1 + z0 + h) / 2),
                                           (cl, 0.9 * w, z0 + h - zb1), yaw), k, 0.08, drop=0.25))
            elif name == 'Pedestrian':
                rad = 0.5 * min(l, w) * rng.uniform(0.7, 0.9)
                prims.append(_Prim('cyl', ((x, y), rad, z0, z0 + h), k, rng.uniform(0.1, 0.5)))
            else:  # Cyclist: bike frame + rider
                prims.append(_Prim('box', ((x, y, z0 + 0.3 * h), (0.95 * l, 0.12, 0.6 * h), yaw),
                                   k, rng.uniform(0.2, 0.7)))
                off = -0.1 * l
                prims.append(_Prim('cyl', ((x + off * cos, y + off * sin), 0.22,
                                           z0 + 0.45 * h, z0 + h), k, rng.uniform(0.1, 0.5)))
            return True

        def place(name, count, sampler, tries=25):
            for _ in range(count):
                for _ in range(tries):
                    u, v, yaw = sampler()
                    if add_object(name, u, v, yaw):
                        break

        def lane_car():
            mode = rng.uniform()
            if mode < 0.5:  # driving in a lane
                v = rng.uniform(-half_road + 1.2, half_road - 1.2)
                yaw = (0.0 if v < 0 else math.pi) + rng.normal(0, 0.05)
            elif mode < 0.8:  # parked along a kerb
                side = rng.choice([-1.0, 1.0])
                v = side * (half_road - rng.uniform(0.9, 1.2))
                yaw = rng.choice([0.0, math.pi]) + rng.normal(0, 0.03)
            else:  # anywhere, any heading (parking lots, driveways)
                v = rng.uniform(-half_road - sidewalk, half_road + sidewalk)
                yaw = rng.uniform(-math.pi, math.pi)
            return rng.uniform(u_lo, u_hi), v, yaw

        def pedestrian():
            if rng.uniform() < 0.7:
                v = rng.choice([-1.0, 1.0]) * (half_road + rng.uniform(0.4, sidewalk - 0.4))
            else:
                v = rng.uniform(-half_road, half_road)
            return rng.uniform(u_lo, u_hi), v, rng.uniform(-math.pi, math.pi)

        def cyclist():
            if rng.uniform() < 0.75:
                side = rng.choice([-1.0, 1.0])
                v = side * (half_road - rng.uniform(0.5, 2.0))
                yaw = (0.0 if side < 0 else math.pi) + rng.normal(0, 0.1)
            else:
                v = rng.uniform(-half_road - sidewalk, half_road + sidewalk)
                yaw = rng.uniform(-math.pi, math.pi)
            return rng.uniform(u_lo, u_hi), v, yaw

        place('Car', int(rng.integers(c.NUM_CARS[0], c.NUM_CARS[1] + 1)), lane_car)
        place('Pedestrian', int(rng.integers(c.NUM_PEDESTRIANS[0], c.NUM_PEDESTRIANS[1] + 1)),
              pedestrian)
        place('Cyclist', int(rng.integers(c.NUM_CYCLISTS[0], c.NUM_CYCLISTS[1] + 1)), cyclist)

        # clutter along the whole scanned stretch of road (it shapes the scan outside the
        # region too)
        self._clutter(rng, lay, prims, to_world, ground, road_yaw, half_road, sidewalk,
                      -c.MAX_RANGE, c.MAX_RANGE)
        return objects, prims, slope

    def _clutter(self, rng, lay, prims, to_world, ground, road_yaw, half_road, sidewalk,
                 u_lo, u_hi):
        c = self.cfg
        density = float(c.CLUTTER_DENSITY)
        edge = half_road + sidewalk
        # buildings / walls / fences along both road sides, with gaps
        for side in (-1.0, 1.0):
            open_side = rng.uniform() < 0.2  # an open field on this side: vegetation only
            u = u_lo
            while u < u_hi and not open_side:
                length = rng.uniform(6.0, 30.0)
                kind = rng.uniform()
                setback = rng.uniform(0.0, 6.0)
                if kind < 0.55:   # building
                    depth, height = rng.uniform(5, 15), rng.uniform(3, 14)
                elif kind < 0.8:  # wall
                    depth, height = rng.uniform(0.2, 0.5), rng.uniform(1.5, 3.0)
                else:             # low fence
                    depth, height = rng.uniform(0.05, 0.15), rng.uniform(0.8, 1.3)
                v = side * (edge + setback + depth / 2)
                x, y = to_world(u + length / 2, v)
                if lay.free_rect(x, y, length, depth, road_yaw) and \
                        self._in_view(x, y, 0.5 * math.hypot(length, depth)):
                    z0 = ground(x, y) - 0.3  # sunk slightly: the tilted ground must not gap
                    prims.append(_Prim('box', ((x, y, z0 + (height + 0.3) / 2),
                                               (length, depth, height + 0.3), road_yaw), -1,
                                       rng.uniform(0.1, 0.5)))
                u += length + rng.uniform(1.0, 10.0)
        span = u_hi - u_lo

        def scatter(count, radius, make):
            for _ in range(count):
                for _ in range(10):
                    side = rng.choice([-1.0, 1.0])
                    u = rng.uniform(u_lo, u_hi)
                    v = side * (half_road + rng.uniform(0.2, sidewalk + 3.0))
                    x, y = to_world(u, v)
                    r = radius()
                    if not self._in_view(x, y, r + 2.5):  # outside the scan: nothing to place
                        break
                    # 1.3 r: a fuzzy blob's returns spread past its radius; a box's corner
                    # (1.2 r x r) is within 0.8 r
                    if lay.free(x, y, 1.3 * r):
                        lay.take(x, y, 1.3 * r)
                        make(x, y, r)
                        break

        def pole(x, y, r):
            z0 = ground(x, y)
            prims.append(_Prim('cyl', ((x, y), r, z0, z0 + rng.uniform(2.5, 8.0)), -1,
                               rng.uniform(0.3, 0.8)))

        def tree(x, y, crown):  # the crown's radius is the footprint: it overhangs the trunk
            z0 = ground(x, y)
            trunk_h = rng.uniform(1.8, 3.5)
            prims.append(_Prim('cyl', ((x, y), rng.uniform(0.12, 0.3), z0, z0 + trunk_h + 0.5), -1,
                               rng.uniform(0.15, 0.4)))
            prims.append(_Prim('sphere', ((x, y, z0 + trunk_h + 0.7 * crown), crown), -1,
                               rng.uniform(0.05, 0.25), drop=0.35, fuzz=0.4 * crown))

        def bush(x, y, r):
            prims.append(_Prim('sphere', ((x, y, ground(x, y) + 0.3 * r), r), -1,
                               rng.uniform(0.05, 0.25), drop=0.3, fuzz=0.35 * r))

        def small_box(x, y, r):
            z0 = ground(x, y)
            h = rng.uniform(0.7, 1.8)
            prims.append(_Prim('box', ((x, y, z0 + h / 2), (1.2 * r, r, h),
                                       rng.uniform(-math.pi, math.pi)), -1,
                               rng.uniform(0.1, 0.6)))

        per_100m = span / 100.0 * density
        scatter(int(rng.poisson(10 * per_100m)), lambda: rng.uniform(0.06, 0.2), pole)
        scatter(int(rng.poisson(8 * per_100m)), lambda: rng.uniform(1.0, 2.5), tree)
        scatter(int(rng.poisson(10 * per_100m)), lambda: rng.uniform(0.4, 1.4), bush)
        scatter(int(rng.poisson(6 * per_100m)), lambda: rng.uniform(0.5, 1.2), small_box)

    # ------------------------------------------------------------------ ray casting
    def _in_view(self, x, y, reach):
        """Could a thing of BEV radius ``reach`` at (x, y) return a ray (range and FOV)?"""
        dist = math.hypot(x, y)
        if dist - reach > self.cfg.MAX_RANGE:
            return False
        lo, hi = (math.radians(a) for a in self.cfg.HORIZONTAL_FOV)
        if hi - lo >= 2 * math.pi - 1e-9 or dist <= reach:
            return True
        half = math.asin(min(1.0, reach / dist))
        rel = (math.atan2(y, x) - lo) % (2 * math.pi)
        return rel <= hi - lo + half or rel >= 2 * math.pi - half

    def _rays(self, prim, phase):
        """Flat ray ids (beam * NUM_AZIMUTH + column) that can reach a primitive: the azimuth
        columns its BEV footprint spans (within HORIZONTAL_FOV) x the beams whose elevation
        falls between its bottom and top seen from its nearest and farthest distance."""
        if prim.kind == 'box':
            (x, y, z), (dx, dy, dz), _ = prim.params
            reach, z_lo, z_hi = 0.5 * math.hypot(dx, dy), z - dz / 2, z + dz / 2
        elif prim.kind == 'cyl':
            (x, y), reach, z_lo, z_hi = prim.params
        else:
            (x, y, z), radius = prim.params
            reach = radius + prim.fuzz
            z_lo, z_hi = z - reach, z + reach
        dist = math.hypot(x, y)
        n_az = self.cfg.NUM_AZIMUTH
        if dist <= reach + 0.05:  # the sensor stands inside the footprint
            cols = self._active
            beams = np.arange(self.cfg.NUM_BEAMS)
        else:
            half = math.asin(min(1.0, reach / dist)) + self.step
            centre = math.atan2(y, x) - phase
            cols = np.arange(math.ceil((centre - half) / self.step),
                             math.floor((centre + half) / self.step) + 1) % n_az
            cols = cols[self._active_mask[cols]]
            d_near, d_far = max(dist - reach, 1e-3), dist + reach
            lo = min(math.atan2(z_lo, d_near), math.atan2(z_lo, d_far)) - 1e-9
            hi = max(math.atan2(z_hi, d_near), math.atan2(z_hi, d_far)) + 1e-9
            beams = np.flatnonzero((self.elevation >= lo) & (self.elevation <= hi))
        return (beams[:, None] * n_az + cols[None, :]).ravel()

    def _cast(self, dirs, prim):
        if prim.kind == 'box':
            return ray_box(dirs, *prim.params)
        if prim.kind == 'cyl':
            return ray_vertical_cylinder(dirs, *prim.params)
        return ray_sphere(dirs, *prim.params)

    def generate(self, seed, index):
        """Frame ``index`` of the split seeded by ``seed``.

        Returns a dict: ``points`` (P, 4) float32 x y z intensity; ``gt_boxes`` (M, 7) float32;
        ``gt_names`` (M,) str; ``num_points_in_gt`` (M,) int32 (returns that hit the object);
        ``occlusion`` (M,) float32 (fraction of the object's rays blocked by something nearer).
        """
        c = self.cfg
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
        objects, prims, slope = self._layout(rng)

        n_az, n_beams = c.NUM_AZIMUTH, c.NUM_BEAMS
        phase = -math.pi + rng.uniform(0, self.step)
        az = phase + self.step * np.arange(n_az)
        hfov = np.deg2rad(np.asarray(c.HORIZONTAL_FOV, dtype=np.float64))
        self._active_mask = (az - hfov[0]) % (2 * math.pi) <= (hfov[1] - hfov[0]) + 1e-9
        self._active = np.flatnonzero(self._active_mask)
        ce, se = np.cos(self.elevation), np.sin(self.elevation)
        dirs = np.stack([np.outer(ce, np.cos(az)), np.outer(ce, np.sin(az)),
                         np.repeat(se[:, None], n_az, axis=1)], axis=-1).reshape(-1, 3)

        # per ray (flat id = beam * n_az + column): nearest hit so far
        t_best = np.full(n_beams * n_az, np.inf)
        cos_best = np.zeros(n_beams * n_az)
        prim_best = np.full(n_beams * n_az, -1, np.int64)  # -1 ground, else index into prims

        # ground plane z = -h + a x + b y  <=>  (-a, -b, 1) . p = -h
        normal = np.array([-slope[0], -slope[1], 1.0])
        norm = np.linalg.norm(normal)
        ground_rays = (np.arange(n_beams)[:, None] * n_az + self._active[None, :]).ravel()
        t_best[ground_rays], cos_best[ground_rays] = ray_plane(
            dirs[ground_rays], normal / norm, -c.SENSOR_HEIGHT / norm)

        rays_hitting = [[] for _ in objects]  # ray ids that reach an object, occluded or not
        for p_idx, prim in enumerate(prims):
            rays = self._rays(prim, phase)
            if not len(rays):
                continue
            t, cos = self._cast(dirs[rays], prim)
            if prim.owner >= 0:
                rays_hitting[prim.owner].append(rays[t <= c.MAX_RANGE])
            nearer = t < t_best[rays]
            rays, t, cos = rays[nearer], t[nearer], cos[nearer]
            t_best[rays], cos_best[rays], prim_best[rays] = t, cos, p_idx

        # returns: range limits, dropout (more on glass and foliage), noise, intensity
        table = lambda attr, ground: np.array(  # noqa: E731
            [ground] + [getattr(p, attr) for p in prims])[prim_best + 1]
        owner = table('owner', -1)
        in_range = (t_best <= c.MAX_RANGE) & (t_best >= c.MIN_RANGE)
        keep = np.flatnonzero(in_range & (rng.uniform(size=t_best.shape)
                                          >= c.DROPOUT + table('drop', 0.0)))
        t = t_best[keep]
        t = t + rng.normal(0.0, c.RANGE_NOISE, size=t.shape) + table('fuzz', 0.0)[keep] * \
            np.abs(rng.normal(0.0, 1.0, size=t.shape))
        xyz = dirs[keep] * t[:, None]
        intensity = table('reflect', 0.2)[keep] * (0.35 + 0.65 * cos_best[keep])
        intensity = np.clip(intensity + rng.normal(0.0, 0.02, size=t.shape), 0.0, 1.0)
        points = np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32)

        visible = np.bincount(owner[keep][owner[keep] >= 0], minlength=len(objects))
        seen = visible > 0
        names = np.array([o[0] for o in objects], dtype='<U10')[seen]
        boxes = np.array([o[1] for o in objects], dtype=np.float32).reshape(-1, 7)[seen]
        # occlusion: share of the rays reaching the object that something nearer intercepted
        reach = np.array([len(np.unique(np.concatenate(r))) if r else 0 for r in rays_hitting])
        own_best = np.bincount(owner[(owner >= 0) & in_range], minlength=len(objects))
        occlusion = np.clip(1.0 - own_best / np.maximum(reach, 1), 0.0, 1.0)
        return {'points': points, 'gt_boxes': boxes, 'gt_names': names,
                'num_points_in_gt': visible[seen].astype(np.int32),
                'occlusion': occlusion[seen].astype(np.float32)}
