"""Pictures (pcdet_focal.viz): written, PNG, and their content where it belongs.

Content is checked by reading the PNG back and looking at pixel colours at positions computed
here from the picture's own frame: the BEV plot area is the black frame whose inside spans
exactly POINT_CLOUD_RANGE, so a metre maps to pixels linearly between the frame's edges.
"""
import importlib.util
import io
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

mpl_image = pytest.importorskip('matplotlib.image', reason="needs matplotlib (pip install -e "
                                                        "'.[plot]')")
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from pcdet_focal.viz import INSTALL_HINT, bev, curves  # noqa: E402
from pcdet_focal.viz import memory as memviz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PCR = [0.0, -20.0, -3.0, 40.0, 20.0, 1.0]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------- helpers

def read_rgb(path):
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC, f'{path} is not a PNG'
    return mpl_image.imread(str(path))[..., :3]


def frame_of(img):
    """(top, bottom, left, right) pixel rows / columns of the black plot-area frame."""
    dark = img.max(axis=2) < 0.2
    rows = np.where(dark.mean(axis=1) > 0.5)[0]
    cols = np.where(dark.mean(axis=0) > 0.5)[0]
    assert len(rows) >= 2 and len(cols) >= 2, 'no plot frame found'
    return rows.min(), rows.max(), cols.min(), cols.max()


def to_pixel(frame, x, y, pcr=PCR):
    top, bottom, left, right = frame
    col = left + (x - pcr[0]) / (pcr[3] - pcr[0]) * (right - left)
    row = bottom - (y - pcr[1]) / (pcr[4] - pcr[1]) * (bottom - top)
    return int(round(row)), int(round(col))


def has_color(img, frame, x, y, color, tol=0.2, radius=3, pcr=PCR):
    r, c = to_pixel(frame, x, y, pcr)
    win = img[max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1]
    return bool((np.abs(win - np.asarray(to_rgb(color))).max(axis=2) < tol).any())


@pytest.fixture
def viz_log():
    """Records of the 'pcdet_focal' logger (the engine's create_logger stops propagation, so
    caplog's root handler would miss them)."""
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Keep(level=logging.DEBUG)
    log = logging.getLogger('pcdet_focal')
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


# ----------------------------------------------------------------------------- BEV

GT_BOX = [10.0, 5.0, -1.0, 8.0, 4.0, 1.5, 0.0]            # x 6..14, y 3..7, heading +x
PRED_BOX = [25.0, -8.0, -1.0, 4.0, 2.0, 1.5, math.pi / 2]  # x 24..26, y -10..-6, heading +y
WEAK_BOX = [30.0, 12.0, -1.0, 4.0, 2.0, 1.5, 0.0]          # score below min_score


def test_bev_draws_known_boxes_where_they_are(tmp_path):
    path = bev.draw_bev(tmp_path / 'f.png', np.array([[35.0, -18.0, -1.0, 0.5]]), PCR,
                        gt_boxes=np.array([GT_BOX + [1.0]]),  # (M, 8): class id column
                        pred_boxes=np.array([PRED_BOX, WEAK_BOX]),
                        pred_scores=np.array([0.9, 0.1]), pred_names=['Car', 'Car'],
                        title='one known box')
    img = read_rgb(path)
    fr = frame_of(img)
    top, bottom, left, right = fr
    # the plot area has the range's aspect (40 m x 40 m: square within a pixel or two)
    assert abs((bottom - top) - (right - left)) <= 2
    green, red = bev.GT_COLOR, bev.PRED_COLOR
    for x, y in [(14, 5), (6, 5), (10, 7), (10, 3)]:          # the four edges' midpoints
        assert has_color(img, fr, x, y, green), (x, y)
        assert not has_color(img, fr, x, y, red), (x, y)
    assert has_color(img, fr, 12, 5, green)       # heading line: centre -> front (+x) ...
    assert not has_color(img, fr, 8, 5, green)    # ... not towards the back
    assert not has_color(img, fr, 10, 6.2, green)  # inside the box: empty
    for x, y in [(25, -6), (25, -10), (24, -8), (26, -8)]:
        assert has_color(img, fr, x, y, red), (x, y)
    assert has_color(img, fr, 25, -7, red)        # heading pi/2: the line points to +y
    assert not has_color(img, fr, 25, -9, red)
    for x, y in [(32, 12), (28, 12), (30, 13), (30, 11)]:      # score 0.1 < 0.3: not drawn
        assert not has_color(img, fr, x, y, red), (x, y)
    assert not has_color(img, fr, 35, 0, green) and not has_color(img, fr, 35, 0, red)


def test_bev_points_coloured_by_height_and_range_grid(tmp_path):
    rng = np.random.RandomState(0)
    low = np.c_[30 + rng.rand(600) * 0.6, -15 + rng.rand(600) * 0.6, np.full(600, -2.8)]
    high = np.c_[10 + rng.rand(600) * 0.6, -15 + rng.rand(600) * 0.6, np.full(600, 0.8)]
    img = read_rgb(bev.draw_bev(tmp_path / 'p.png', np.vstack([low, high]), PCR))
    fr = frame_of(img)
    cmap = colormaps[bev.POINT_CMAP]
    for x, z in [(30.3, -2.8), (10.3, 0.8)]:
        expected = np.asarray(cmap((z - PCR[2]) / (PCR[5] - PCR[2]))[:3])
        r, c = to_pixel(fr, x, -14.7)
        assert np.abs(img[r, c] - expected).max() < 0.1, (x, img[r, c], expected)
    # gridlines every 10 m (x = 20 here), nothing between them
    assert has_color(img, fr, 20, 17, '#dcdcdc', tol=0.06, radius=1)
    assert np.all(img[to_pixel(fr, 24.5, 17)] > 0.98)
    # the 20 m range ring around the sensor (dashed: about half of its length is ink)
    angles = np.radians(np.arange(-80, 81, 4))
    on_ring = [has_color(img, fr, 20 * np.cos(a), 20 * np.sin(a), '#9a9a9a', tol=0.12,
                         radius=1) for a in angles]
    assert np.mean(on_ring) > 0.25


class FakeDataset(list):
    """OpenPCDet's dataset contract, as far as write_eval_bev reads it."""
    point_cloud_range = np.array(PCR, dtype=np.float32)


def _sample(frame_id):
    return {'frame_id': frame_id, 'points': np.array([[35.0, -18.0, -1.0, 0.5]], np.float32),
            'gt_boxes': np.array([GT_BOX + [1.0]], np.float32)}


def test_write_eval_bev_matches_predictions_by_frame_id(tmp_path):
    data = FakeDataset([_sample('a'), _sample('b'), _sample('c')])
    annos = [{'frame_id': 'b', 'boxes_lidar': np.array([PRED_BOX]), 'score': np.array([0.8]),
              'name': np.array(['Car'])},
             {'frame_id': 'a', 'boxes_lidar': np.zeros((0, 7)), 'score': np.zeros(0),
              'name': np.zeros(0, '<U1')}]
    paths = bev.write_eval_bev(data, annos, tmp_path, num_frames=2)
    assert [p.name for p in paths] == ['bev_a.png', 'bev_b.png']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bev_a.png', 'bev_b.png']
    img_a, img_b = read_rgb(paths[0]), read_rgb(paths[1])
    fr_a, fr_b = frame_of(img_a), frame_of(img_b)
    assert has_color(img_b, fr_b, 25, -6, bev.PRED_COLOR)
    assert not has_color(img_a, fr_a, 25, -6, bev.PRED_COLOR)
    assert has_color(img_a, fr_a, 14, 5, bev.GT_COLOR)
    assert bev.write_eval_bev(data, annos, tmp_path / 'none', num_frames=0) == []
    assert not (tmp_path / 'none').exists()


def test_write_eval_bev_without_points_says_so_once(tmp_path, viz_log):
    data = FakeDataset([{'frame_id': 0, 'x': 1.0}, {'frame_id': 1, 'x': 2.0}])
    assert bev.write_eval_bev(data, [], tmp_path, num_frames=2) == []
    lines = [r.getMessage() for r in viz_log]
    assert len(lines) == 1 and 'have no points' in lines[0]


# ----------------------------------------------------------------------------- curves

def _metrics(path, losses, aps):
    lines = [json.dumps({'epoch': i + 1, 'step': 10 * (i + 1), 'loss': v, 'lr': 1e-3})
             for i, v in enumerate(losses)]
    lines.append('{"epoch": 9, "lo')  # a line cut short by a killed run
    lines.append(json.dumps({'eval_epoch': len(losses), **aps}))
    path.write_text('\n'.join(lines) + '\n')
    return path


def _rows_of(img, color, cols=slice(None), tol=0.12):
    part = img[:, cols]
    r, c = np.where(np.abs(part - np.asarray(to_rgb(color))).max(axis=2) < tol)
    return r, c


def test_ap_series_keeps_each_class_loosest_threshold():
    evals = [{'eval_epoch': 2, 'Car_bev_R40_0.70': 0.1, 'Car_bev_R40_0.50': 0.5,
              'Car_3d_R40_0.50': 0.4, 'Car_bev_R40_0.50_easy': 0.9,
              'Pedestrian_bev_R40_0.25': 0.3, 'Pedestrian_bev_R40_0.50': 0.2, 'mse': 1.0}]
    assert curves.ap_series(evals) == {('Car', 'bev', 0.5): [(2, 0.5)],
                                       ('Car', '3d', 0.5): [(2, 0.4)],
                                       ('Pedestrian', 'bev', 0.25): [(2, 0.3)]}


@pytest.mark.parametrize('falling', [True, False])
def test_curves_draw_loss_trend_and_ap_order(tmp_path, viz_log, falling):
    losses = [4.0, 3.0, 2.0, 1.0] if falling else [1.0, 2.0, 3.0, 4.0]
    car, ped = (0.8, 0.2) if falling else (0.2, 0.8)
    aps = {'Car_bev_R40_0.50': car, 'Pedestrian_bev_R40_0.25': ped}
    path = curves.draw_curves(_metrics(tmp_path / 'metrics.jsonl', losses, aps),
                              tmp_path / 'curves.png')
    img = read_rgb(path)
    assert any('not JSON objects skipped' in r.getMessage() for r in viz_log)
    half = img.shape[1] // 2
    r, c = _rows_of(img, curves.LOSS_COLOR, slice(0, half))
    # the loss line runs from its first epoch (left) to its last (right); a falling loss
    # starts high (small row) and ends low. The legend sample below the plot (bottom 27 % of
    # the figure) is left out.
    plot = r < 0.72 * img.shape[0]
    r, c = r[plot], c[plot]
    first = r[c <= np.percentile(c, 10)].mean()
    last = r[c >= np.percentile(c, 90)].mean()
    assert (first < last) == falling
    # AP panel: the class with the higher AP has its marker higher (legends are below)
    car_top = _rows_of(img, curves.CLASS_COLORS[0], slice(half, None))[0].min()
    ped_top = _rows_of(img, curves.CLASS_COLORS[1], slice(half, None))[0].min()
    assert (car_top < ped_top) == falling


def test_curves_without_epochs_draw_nothing(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('')
    assert curves.draw_curves(tmp_path / 'metrics.jsonl', tmp_path / 'c.png') is None
    assert curves.draw_curves(tmp_path / 'missing.jsonl', tmp_path / 'c.png') is None
    assert not (tmp_path / 'c.png').exists()


# ----------------------------------------------------------------------------- memory

GIB = 2 ** 30


def _synthetic_estimate():
    """100 events: 1 GiB of weights, a 9 GiB transient at event 40 (released at 41), +1 GiB
    kept from event 60; budget drawn at 4 GiB."""
    tl = [(GIB, 'forward', '(persistent)', 'parameters')]
    tl += [(GIB, 'forward', 'A', '')] * 39
    tl += [(10 * GIB, 'forward', 'BIG', 'im2col columns (a note)'), (GIB, 'forward', 'BIG', '')]
    tl += [(GIB, 'forward', 'A', '')] * 8
    tl += [(GIB, 'backward', 'A', '')] * 10
    tl += [(2 * GIB, 'backward', 'A', 'grad')] * 38
    tl += [(2 * GIB, 'optimizer step', '(optimizer)', '')] * 2
    return SimpleNamespace(timeline=tl, peak_bytes=10 * GIB, peak_phase='forward',
                           peak_module='BIG', batch_size=1, cfg_file='synthetic.yaml')


def _line_pixels(img):
    """Pixels of the live-memory line inside the plot (the legend's sample line sits in the
    figure's top 12 %, above the plot)."""
    r, c = _rows_of(img, memviz.LINE_COLOR, tol=0.1)
    inside = r > 0.12 * img.shape[0]
    return r[inside], c[inside]


def test_memory_picture_puts_spike_and_budget_where_they_are(tmp_path):
    est = _synthetic_estimate()
    assert memviz.largest_allocations(est.timeline, est.peak_bytes) == [
        (40, 9 * GIB, 'BIG', 'im2col columns (a note)'),
        (0, GIB, '(persistent)', 'parameters'), (60, GIB, 'A', 'grad')]
    img = read_rgb(memviz.draw_memory(est, tmp_path / 'm.png', budget_bytes=4 * GIB))
    r, c = _line_pixels(img)
    left, right = c.min(), c.max()
    spike_col = c[r == r.min()].mean()
    assert abs((spike_col - left) / (right - left) - 40 / 99) < 0.02
    base_row = np.median(r[c < left + 0.3 * (right - left)])
    br, bc = _rows_of(img, memviz.BUDGET_COLOR, tol=0.1)
    rows, counts = np.unique(br, return_counts=True)
    budget_row = rows[np.argmax(counts)]
    ratio = (base_row - budget_row) / (base_row - r.min())
    assert abs(ratio - (4 - 1) / (10 - 1)) < 0.03, ratio
    pr, pc = _rows_of(img, memviz.PEAK_COLOR, tol=0.15)
    assert ((np.abs(pc - spike_col) < 8) & (np.abs(pr - r.min()) < 10)).any()  # peak marker


def test_seed_config_im2col_towers_over_everything(tmp_path):
    from pcdet_focal.config import load_config
    from pcdet_focal.memory import estimate
    from pcdet_focal.memory.cuda import USERS_STACK, Stack
    # the users' torch 2.3 + cuDNN 8.9.2, which cannot run the 22400-channel conv in cuDNN
    est = estimate(load_config(REPO / 'cfgs' / 'focalsst_dsvt_dense_hc.yaml'), timeline=True,
                   stack=Stack.parse(USERS_STACK))
    top = memviz.largest_allocations(est.timeline, est.peak_bytes)[0]
    assert top[1] == 22400 * 9 * 200 * 500 * 4          # 75.10 GiB: the users' OOM message
    assert top[3].startswith('im2col') and memviz.short_label(top[3]).startswith('im2col')
    img = read_rgb(memviz.draw_memory(est, tmp_path / 'seed.png', budget_bytes=80 * GIB))
    r, c = _line_pixels(img)
    bottom = r.max()
    height = bottom - r                                   # pixels above the axis, per pixel
    assert height.max() > 3.5 * np.median(height)         # the spike towers over the step


# ----------------------------------------------------------------------------- missing matplotlib

def test_missing_matplotlib_one_line_per_picture(tmp_path, viz_log, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    calls = [
        lambda: bev.draw_bev(tmp_path / 'b.png', np.zeros((1, 4)), PCR),
        lambda: bev.write_eval_bev(FakeDataset([_sample('a'), _sample('b')]), [], tmp_path, 4),
        lambda: curves.draw_curves(_metrics(tmp_path / 'm.jsonl', [2.0, 1.0], {}),
                                   tmp_path / 'c.png'),
        lambda: memviz.draw_memory(_synthetic_estimate(), tmp_path / 'mem.png', GIB),
    ]
    for call in calls:
        before = len(viz_log)
        assert not call()
        new = [r.getMessage() for r in viz_log[before:] if 'JSON' not in r.getMessage()]
        assert len(new) == 1 and INSTALL_HINT in new[0] and 'skipped' in new[0], new
    assert not list(tmp_path.glob('*.png'))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', REPO / 'tools' / f'{name}.py')
    sys.path.insert(0, str(REPO / 'tools'))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / 'tools'))
    return module


def test_estimate_mem_plot_writes_png_and_refuses_other_names(tmp_path):
    from pcdet_focal.errors import ConfigError
    from pcdet_focal.memory.cli import run
    tool = _load_tool('estimate_mem')
    out = io.StringIO()
    args = tool.parse_args(['--cfg', str(REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml'), '--plot',
                            str(tmp_path / 'sub' / 'mem.png')])
    assert run(args, out=out) == 0
    assert read_rgb(tmp_path / 'sub' / 'mem.png').shape[0] > 100
    assert f'wrote {tmp_path / "sub" / "mem.png"}' in out.getvalue()
    bad = tool.parse_args(['--cfg', str(REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml'), '--plot',
                           str(tmp_path / 'mem.jpg')])
    with pytest.raises(ConfigError, match=r'--plot .*\.png'):
        run(bad, out=io.StringIO())


def test_estimate_mem_plot_without_matplotlib_one_line_nothing_else(tmp_path):
    fake = tmp_path / 'fake'
    (fake / 'matplotlib').mkdir(parents=True)
    (fake / 'matplotlib' / '__init__.py').write_text(
        "raise ImportError(\"No module named 'matplotlib' (simulated)\")\n")
    env = {'PYTHONPATH': str(fake), 'PATH': '/usr/bin:/bin'}
    cmd = [sys.executable, str(REPO / 'tools' / 'estimate_mem.py'), '--cfg',
           str(REPO / 'cfgs' / 'focalsst_dsvt_dense_hc.yaml'), '--vram', '24']
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    plot = subprocess.run(cmd + ['--plot', str(tmp_path / 'm.png')], capture_output=True,
                          text=True, env=env, timeout=120)
    assert plain.returncode == plot.returncode == 2          # REJECT either way (24 GiB)
    assert plot.stdout == plain.stdout
    lines = [x for x in plot.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and INSTALL_HINT in lines[0], plot.stderr
    assert not (tmp_path / 'm.png').exists()


# ----------------------------------------------------------------------------- engine

def test_training_and_test_py_leave_pictures(tmp_path):
    """End-of-training evaluation and tools/test.py write BEV PNGs next to result.txt; the
    training run draws curves.png. The demo architecture on 2 + 2 synthetic frames."""
    from pcdet_focal.config import apply_set, load_config
    from pcdet_focal.engine.trainer import TrainOptions, train
    cfg_file = REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml'
    frames = "{'train': 2, 'test': 2}"
    cfg = load_config(cfg_file)
    apply_set(cfg, ['DATA_CONFIG.NUM_FRAMES', frames, 'OPTIMIZATION.BATCH_SIZE_PER_GPU', '2',
                    'OPTIMIZATION.NUM_EPOCHS', '1'])
    out = tmp_path / 'out'
    train(cfg, TrainOptions(cfg_file=str(cfg_file), output_dir=str(out), workers=0,
                            fix_random_seed=True, skip_mem_check=True, progress=False,
                            backend='standalone', bev_frames=1))
    run_dir = out / 'focalsst_dsvt_demo' / 'default'
    assert [p.name for p in (run_dir / 'eval' / 'epoch_1').glob('*.png')] == ['bev_000000.png']
    assert read_rgb(run_dir / 'curves.png').shape[1] > 300
    frame = read_rgb(run_dir / 'eval' / 'epoch_1' / 'bev_000000.png')
    top, bottom, left, right = frame_of(frame)
    assert abs((bottom - top) - (right - left)) <= 2   # 51.2 m x 51.2 m

    proc = subprocess.run(
        [sys.executable, 'tools/test.py', '--cfg', str(cfg_file), '--ckpt',
         str(run_dir / 'ckpt' / 'checkpoint_epoch_1.pth'), '--output_dir', str(out),
         '--workers', '0', '--no_progress', '--set', 'DATA_CONFIG.NUM_FRAMES', frames],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(p.name for p in (run_dir / 'eval' / 'checkpoint_epoch_1').glob('*.png'))
    assert pngs == ['bev_000000.png', 'bev_000001.png']    # default 4, capped by 2 frames


def test_bev_frames_flag_rejects_negative():
    tool = _load_tool('test')
    assert tool.parse_args(['--cfg', 'x', '--ckpt', 'y']).bev_frames == 4
    assert tool.parse_args(['--cfg', 'x', '--ckpt', 'y', '--bev_frames', '0']).bev_frames == 0
    with pytest.raises(SystemExit) as err:
        tool.parse_args(['--cfg', 'x', '--ckpt', 'y', '--bev_frames', '-1'])
    assert err.value.code == 2
