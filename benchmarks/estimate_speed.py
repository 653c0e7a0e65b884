"""How long one memory estimate takes, without frames (the caps) and with them (K frames read
through the data pipeline), for every config in cfgs/ (issue target: under 2 s / under 30 s on
2 CPU cores).

    python benchmarks/estimate_speed.py [--frames 8] [--repeat 3]

Each row is one config in a fresh process: "first" includes the imports (torch, spconv) and
building the model once, as a CLI run does; "estimate" is prepare() + estimate() once the
process is warm (median of --repeat runs; the synthetic scan that lays out the caps is cached
per process), wall clock and process CPU time side by side, so a busy machine shows as
wall >> CPU.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ['focalsst_dsvt_demo.yaml', 'focalsst_dsvt.yaml', 'focalsst_dsvt_dense_hc.yaml']

_CHILD = r'''
import json, statistics, sys, time
t0, c0 = time.perf_counter(), time.process_time()
from pcdet_focal.config import load_config
from pcdet_focal.memory import estimate, prepare
cfg = load_config(sys.argv[1])
frames, repeat = int(sys.argv[2]), int(sys.argv[3])
estimate(cfg, prepared=prepare(cfg, frames=frames))
first = (time.perf_counter() - t0, time.process_time() - c0)
runs = []
for _ in range(repeat):
    t, c = time.perf_counter(), time.process_time()
    e = estimate(cfg, prepared=prepare(cfg, frames=frames))
    runs.append((time.perf_counter() - t, time.process_time() - c))
print(json.dumps({'first': first, 'wall': statistics.median(r[0] for r in runs),
                  'cpu': statistics.median(r[1] for r in runs), 'peak': e.peak_bytes,
                  'counts': e.voxels.describe()}))
'''


def measure(cfg, frames, repeat):
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get('OMP_WAIT_POLICY', 'PASSIVE'))
    out = subprocess.run([sys.executable, '-c', _CHILD, str(ROOT / 'cfgs' / cfg), str(frames),
                          str(repeat)], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise SystemExit(f'{cfg}: {out.stderr.strip().splitlines()[-1]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=8)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f'cores: {os.cpu_count()}, load average {load:.1f}; median of {args.repeat}')
    print('| config | counts | first run (imports + build), wall / CPU | estimate, wall / CPU | '
          'target |')
    print('|---|---|---|---|---|')
    for cfg in CONFIGS:
        for frames, target in ((0, 2.0), (args.frames, 30.0)):
            r = measure(cfg, frames, args.repeat)
            what = 'caps (--frames 0)' if frames == 0 else f'{frames} frames'
            print(f"| `{cfg}` | {what} | {r['first'][0]:.1f} s / {r['first'][1]:.1f} s | "
                  f"{r['wall']:.2f} s / {r['cpu']:.2f} s | < {target:g} s: "
                  f"{'holds' if r['wall'] < target else 'NOT met'} |", flush=True)


if __name__ == '__main__':
    main()
