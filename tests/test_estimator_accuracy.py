"""Estimator vs a real training step on the CPU, on the paths the memory contract
(test_memory_contract.py) does not take: a measurement on uniformly random voxels when no
frames were counted, the refusal of a step the machine cannot hold, and the held-out sweep's
pieces (benchmarks/estimator.py): its random configs build, and it reads the
``tools/estimate_mem.py --measure --json`` keys it reports.
"""
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from easydict import EasyDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import estimator as bench  # noqa: E402
from pcdet_focal.config import to_plain  # noqa: E402
from pcdet_focal.memory import estimate, prepare  # noqa: E402
from pcdet_focal.memory.measure import measure_config  # noqa: E402

from test_memory_contract import TOLERANCE, contract_config  # noqa: E402

pytest.importorskip('spconv')


def test_estimate_matches_a_step_on_uniform_random_voxels():
    """``--voxels``: no frames, so the step runs on distinct uniformly random voxels and the
    DSVT sets / BEV columns come from the expectation for them; at the step's counts the
    model still holds."""
    cfg = contract_config('dsvt_input_max')
    torch.manual_seed(0)
    prep = prepare(cfg, voxels=900)
    est = estimate(cfg, batch_size=2, target='cpu', prepared=prep)
    m = measure_config(cfg, est, prep, device='cpu')
    assert 'uniformly random' in m.batch_source
    assert abs(m.error) <= TOLERANCE, m.lines()


def test_measure_refuses_what_the_machine_cannot_hold():
    cfg = contract_config('vfe_focal_shc_max_b2')
    prep = prepare(cfg, voxels=100)
    est = estimate(cfg, batch_size=1, target='cpu', prepared=prep)
    est.peak_bytes = 10 ** 15                       # a petabyte: more than any machine's RAM
    m = measure_config(cfg, est, prep, device='cpu')
    assert m.refused and 'exceeds' in m.refused and m.peak_bytes is None


def test_sweep_configs_are_valid_members_of_the_family():
    rng = random.Random(0)
    for _ in range(4):
        cfg, batch, summary = bench.draw_config(rng)
        prep = prepare(EasyDict(cfg), frames=0)
        assert not estimate(EasyDict(cfg), batch_size=batch, target='cpu',
                            prepared=prep).not_modelled, summary


def test_sweep_reads_the_measure_json_keys(tmp_path):
    """The keys the sweep (and users' scripts) read from ``--measure --json``."""
    cfg = contract_config('shc_learned_norm')
    plain = {k: v for k, v in to_plain(cfg).items() if k != 'CFG_FILE'}
    path = tmp_path / 'contract.yaml'
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    torch.manual_seed(0)
    doc = bench.measure_via_cli(path, 1)
    json.dumps(doc)
    plain_bytes = doc['estimate']['peak_bytes']
    measured = doc['measure']['measured_bytes']
    at_counts = doc['measure']['estimate_at_measured_counts_bytes']
    assert plain_bytes > 0 and measured > 0
    assert doc['measure']['relative_error'] == pytest.approx(at_counts / measured - 1)
    assert abs(at_counts / measured - 1) <= TOLERANCE
