"""Environment doctor: ``pcdet-focal doctor`` / ``python tools/check_env.py``.

Prints one line per finding (``OK`` / ``INFO`` / ``WARN`` / ``ERROR``, what, and the fix) and
exits 0 when all is good, 1 with warnings, 2 with a blocking problem. Checks:

- versions of Python, torch (+ its CUDA and cuDNN), spconv, cumm, numpy, numba, and the devices;
- known-bad combinations: numpy >= 2 with cumm < 0.7 (the spconv 2.3.6 / cumm 0.4.x wheels:
  SIGFPE in ``tv.from_numpy``; spconv 2.3.8 + cumm 0.7.11 run with numpy 2.4.6), several
  spconv/cumm builds installed side by side, torch's CUDA major vs spconv's wheel CUDA major
  (fixes name published spconv builds only: none exists for CUDA 13, see SPCONV_BUILDS);
- cuDNN libraries on ``LD_LIBRARY_PATH`` whose version differs from the cuDNN torch loaded
  (read from ``/proc/self/maps`` of the GPU smoke test) - the "unable to find an engine" trap;
- temp / torch-extension build folders whose path is not ASCII (CUDA JIT compiles fail there);
- a smoke test on every device (CPU, each CUDA GPU): conv2d + BatchNorm + pooling and a spconv
  ``SubMConv3d``, forward + backward, each compared with an independent dense computation. It
  runs in a child process so a crash (SIGFPE, segfault) becomes a finding, not the doctor's end;
- OpenPCDet, when ``pcdet`` is importable (in a child process): its version, which compiled
  ops are built, the CUDA runtime they link and whether they load with this torch, and whether
  our registration into its tables works (problems there are warnings: the standalone tools
  do not need OpenPCDet);
- ``--scan PATH``: uses of numpy aliases removed in numpy 1.24 / 2.0 (``np.float``, ``np.int``,
  ``np.bool``, ``np.object``, ``np.float_``, ``np.NaN`` ...) as ``file:line``, found on the
  syntax tree (never in strings or comments; ``np.float32`` is fine).
"""
import argparse
import ast
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, cli_main

LEVELS = {'OK': 0, 'INFO': 0, 'WARN': 1, 'ERROR': 2}
_PKG_PARENT = str(Path(__file__).resolve().parents[1])


@dataclass
class Finding:
    level: str   # OK | INFO | WARN | ERROR
    topic: str   # short subject, e.g. 'numpy', 'smoke cpu'
    message: str
    fix: str = ''

    def line(self):
        fix = f' | fix: {self.fix}' if self.fix else ''
        return f'{self.level:<5} {self.topic}: {self.message}{fix}'


def exit_code(findings):
    """0 all good, 1 warnings, 2 a blocking problem."""
    return max((LEVELS[f.level] for f in findings), default=0)


# ----------------------------------------------------------------------------- versions

def vtuple(text):
    """'2.3.8' -> (2, 3, 8); '2.0.0rc1' -> (2, 0, 0); '2.13.0+cpu' -> (2, 13, 0); None -> None."""
    if not text:
        return None
    nums = re.match(r'\d+(?:\.\d+)*', str(text))
    return tuple(int(p) for p in nums.group(0).split('.')) if nums else None


def cuda_of_wheel(dist_name):
    """'spconv-cu121' -> (12, 1); 'cumm-cu118' -> (11, 8); 'spconv' (CPU build) -> None."""
    m = re.search(r'-cu(\d+)$', dist_name)
    return (int(m.group(1)[:-1]), int(m.group(1)[-1])) if m else None


# spconv's published CUDA builds (PyPI, checked for this release): there is none for CUDA 13,
# and PyPI's Linux torch wheels are CUDA 12 builds from 2.5 to 2.10 (12.4 / 12.6 / 12.8), CUDA 13
# from 2.11 on. A build runs with a torch of the same CUDA major and a CUDA version not below it.
SPCONV_BUILDS = ((10, 2), (11, 1), (11, 3), (11, 4), (11, 6), (11, 7), (11, 8), (12, 0), (12, 1),
                 (12, 4), (12, 6))
CUDA12_TORCH = '"torch>=2.1,<2.11"'  # PyPI's CUDA 12 builds (a CUDA 13 one has no spconv)


def spconv_build_for(torch_cuda):
    """The published spconv build for torch's CUDA version ('12.8' -> 'spconv-cu126'), or None
    when there is none (CUDA 13: no spconv build exists)."""
    want = vtuple(torch_cuda)
    fits = [b for b in SPCONV_BUILDS if want and b[0] == want[0] and b <= tuple(want[:2])]
    return f'spconv-cu{fits[-1][0]}{fits[-1][1]}' if fits else None


def spconv_fix(torch_cuda, installed=()):
    """What to run so spconv matches torch's CUDA (``installed``: spconv dists to remove)."""
    # a CPU torch: the CUDA 12.1 build, which runs on the CPU too (as setup.py installs it)
    build = spconv_build_for(torch_cuda) if torch_cuda else 'spconv-cu121'
    if build is None:
        return (f'no spconv build exists for CUDA {torch_cuda} (the published ones stop at '
                f'spconv-cu126): install a CUDA 12 torch, pip install {CUDA12_TORCH} (or '
                'pip install -e ".[cu12]" in the pcdet-focal checkout), with spconv-cu121')
    remove = f'pip uninstall {" ".join(installed)} && ' if installed else ''
    return f'{remove}pip install {build}'


def installed_dists(prefixes=('spconv', 'cumm')):
    """{prefix: [(dist name, version), ...]} of installed distributions named prefix[-cuXYZ]."""
    from importlib import metadata
    out = {p: [] for p in prefixes}
    seen = set()
    for dist in metadata.distributions():
        name = (dist.metadata['Name'] or '').lower().replace('_', '-')
        for p in prefixes:
            if re.fullmatch(rf'{p}(-cu\d+)?', name) and name not in seen:
                seen.add(name)
                out[p].append((name, dist.version))
    return {p: sorted(v) for p, v in out.items()}


def dist_version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cudnn_tuple(code):
    """torch.backends.cudnn.version() int -> (major, minor, patch): 8902 -> (8, 9, 2),
    90100 -> (9, 1, 0) (cuDNN 9 changed the encoding to major*10000)."""
    if not code:
        return None
    code = int(code)
    if code >= 90000:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 100, code % 100


def collect_versions():
    """Versions without importing spconv/cumm (their import is what crashes in bad envs)."""
    info = {'python': '.'.join(map(str, sys.version_info[:3])), 'torch': None,
            'torch_cuda': None, 'cudnn': None, 'numpy': dist_version('numpy'),
            'numba': dist_version('numba'), 'devices': ['cpu']}
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        info['torch_error'] = f'{type(err).__name__}: {err}'
        return info
    info['torch'] = torch.__version__
    info['torch_cuda'] = torch.version.cuda
    try:
        info['cudnn'] = cudnn_tuple(torch.backends.cudnn.version())
    except Exception as err:  # noqa: BLE001 - torch raises on a cuDNN version mismatch
        info['cudnn_error'] = f'{type(err).__name__}: {err}'
    if torch.cuda.is_available():
        info['devices'] += [f'cuda:{i}' for i in range(torch.cuda.device_count())]
        info['gpus'] = [f'{torch.cuda.get_device_name(i)} (sm_'
                        f'{"".join(map(str, torch.cuda.get_device_capability(i)))}, '
                        f'{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)'
                        for i in range(torch.cuda.device_count())]
    info.update({p: d for p, d in installed_dists().items()})
    return info


def version_findings(info):
    """Version lines + missing packages."""
    out = [Finding('INFO', 'python', info['python'])]
    if info.get('torch') is None:
        out.append(Finding('ERROR', 'torch', f'not importable ({info.get("torch_error")})',
                           f'pip install {CUDA12_TORCH} (a CUDA 12 build on Linux, pairs '
                           'with spconv-cu121)'))
        return out
    cudnn = info.get('cudnn')
    cuda = info['torch_cuda'] or 'none (CPU build)'
    cudnn_text = '.'.join(map(str, cudnn)) if cudnn else 'none'
    out.append(Finding('INFO', 'torch', f'{info["torch"]}, CUDA {cuda}, cuDNN {cudnn_text}'))
    if info.get('cudnn_error'):
        out.append(Finding('ERROR', 'cudnn', f'torch cannot use its cuDNN: {info["cudnn_error"]}',
                           'put the cuDNN that torch was built with first on the library path '
                           f'(pip install nvidia-cudnn-cu{(vtuple(info["torch_cuda"]) or (12,))[0]}'
                           ' at the version torch requires) and remove other cuDNN folders from '
                           'LD_LIBRARY_PATH'))
    spconv = spconv_fix(info['torch_cuda'])
    for prefix, fix in (('spconv', spconv), ('cumm', f'{spconv} (brings its cumm)')):
        dists = info.get(prefix, [])
        if not dists:
            out.append(Finding('ERROR', prefix, 'not installed (pcdet_focal\'s sparse modules '
                               'need it)', fix))
        elif len(dists) > 1:
            names = ', '.join(f'{n} {v}' for n, v in dists)
            every = ' '.join(n for n, _ in dists)
            out.append(Finding('WARN', prefix, f'several builds installed ({names}); they '
                               'overwrite each other\'s files',
                               f'pip uninstall {every} then install one ({fix})'))
        else:
            out.append(Finding('INFO', prefix, f'{dists[0][0]} {dists[0][1]}'))
    if info.get('numpy') is None:
        out.append(Finding('ERROR', 'numpy', 'not installed', 'pip install numpy'))
    else:
        out.append(Finding('INFO', 'numpy', info['numpy']))
    if info.get('numba') is None:
        out.append(Finding('WARN', 'numba', 'not installed (box IoU for evaluation needs it)',
                           'pip install numba'))
    else:
        out.append(Finding('INFO', 'numba', info['numba']))
    gpus = info.get('gpus', [])
    out.append(Finding('INFO', 'devices', ', '.join(
        ['cpu'] + [f'cuda:{i} {g}' for i, g in enumerate(gpus)])))
    return out


# ----------------------------------------------------------------------------- known-bad combos

# numpy 2 with cumm built for numpy 1 (the cumm 0.4.x line, e.g. spconv-cu120 2.3.6 + cumm-cu120
# 0.4.11) crashes with SIGFPE inside tv.from_numpy (OpenPCDet issues 1642 / 1728, spconv 725).
# cumm 0.7.11 (spconv 2.3.8) runs forward + backward with numpy 2.4.6 here. 0.5 / 0.6 unverified.
CUMM_NUMPY2_BAD_BELOW = (0, 5)
CUMM_NUMPY2_GOOD_FROM = (0, 7)


def combo_findings(info):
    out = []
    numpy_v = vtuple(info.get('numpy'))
    cumms = info.get('cumm', [])
    if numpy_v and numpy_v >= (2,) and cumms:
        for name, ver in cumms:
            v = vtuple(ver)
            if v is None:
                continue
            if v < CUMM_NUMPY2_BAD_BELOW:
                out.append(Finding(
                    'ERROR', 'numpy+cumm', f'numpy {info["numpy"]} with {name} {ver}: known to '
                    'crash (SIGFPE in cumm tv.from_numpy, e.g. numpy 2.0.x with cumm 0.4.x)',
                    'pip install "numpy<2" (1.26.4), or upgrade to spconv-cu121>=2.3.8 '
                    '(cumm 0.7.11, verified with numpy 2.4.6)'))
            elif v < CUMM_NUMPY2_GOOD_FROM:
                out.append(Finding(
                    'WARN', 'numpy+cumm', f'numpy {info["numpy"]} with {name} {ver}: not '
                    'verified (cumm 0.4.x crashes with numpy 2, cumm 0.7.11 works)',
                    'upgrade to spconv-cu121>=2.3.8 (cumm 0.7.11) or pip install "numpy<2"; the '
                    'smoke test below tells whether this combination runs'))
    torch_cuda = vtuple(info.get('torch_cuda'))
    for name, ver in info.get('spconv', []):
        wheel = cuda_of_wheel(name)
        if torch_cuda and wheel is None:
            out.append(Finding('WARN', 'spconv', f'{name} {ver} is the CPU-only build but torch '
                               f'uses CUDA {info["torch_cuda"]}: sparse convs cannot run on the '
                               'GPU',
                               spconv_fix(info['torch_cuda'], [name])))
        elif torch_cuda and wheel and wheel[0] != torch_cuda[0]:
            out.append(Finding('WARN', 'spconv', f'{name} {ver} is built for CUDA '
                               f'{wheel[0]}.{wheel[1]} but torch for CUDA {info["torch_cuda"]} '
                               '(different major versions: untested, needs a driver for both)',
                               spconv_fix(info['torch_cuda'], [name])))
        elif torch_cuda is None and wheel is not None:
            out.append(Finding('INFO', 'spconv', f'{name} with a CPU build of torch: sparse convs '
                               'run on the CPU with ConvAlgo.Native'))
    return out


# ----------------------------------------------------------------------------- cuDNN paths

_SO_VERSION = re.compile(r'\.so\.(\d+(?:\.\d+)*)$')


def mapped_libraries(maps_text, prefix='libcudnn'):
    """Paths of the shared libraries named ``prefix*`` in a /proc/<pid>/maps text."""
    paths = set()
    for row in maps_text.splitlines():
        parts = row.split(None, 5)
        if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith(prefix):
            paths.add(parts[5].strip())
    return sorted(paths)


def so_version(filename):
    """'libcudnn_cnn_train.so.8.9.2' -> (8, 9, 2); 'libcudnn.so.9' -> (9,); no suffix -> None."""
    m = _SO_VERSION.search(filename)
    return tuple(int(p) for p in m.group(1).split('.')) if m else None


def cudnn_findings(torch_cudnn, loaded, ld_library_path):
    """cuDNN files reachable through LD_LIBRARY_PATH that disagree with what torch uses.

    torch_cudnn: (major, minor, patch) torch reports, or None (no cuDNN: CPU build);
    loaded: paths of libcudnn* mapped in a process that ran a GPU conv; ld_library_path: str.
    cuDNN loads parts of itself lazily by file name (libcudnn_cnn_train.so.8, the engine
    libraries of cuDNN 9), and LD_LIBRARY_PATH is searched before torch's own folder, so a
    different cuDNN there is picked up half-way and fails with "unable to find an engine".
    """
    by_dir = {}
    for d in [p for p in ld_library_path.split(os.pathsep) if p]:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        libs = [n for n in names if n.startswith('libcudnn') and '.so' in n]
        if libs:
            by_dir[d] = libs
    if torch_cudnn is None:
        if by_dir:
            return [Finding('INFO', 'cudnn', 'torch has no cuDNN (CPU build); cuDNN files on '
                            f'LD_LIBRARY_PATH ({", ".join(by_dir)}) are unused')]
        return [Finding('INFO', 'cudnn', 'torch has no cuDNN (CPU build); nothing to check')]
    loaded_real = {os.path.realpath(p) for p in loaded}
    torch_dirs = sorted({os.path.dirname(p) for p in loaded})
    out = []
    for d, libs in by_dir.items():
        foreign = []
        for name in libs:
            path = os.path.join(d, name)
            ver = so_version(name)
            if os.path.realpath(path) in loaded_real or ver is None:
                continue
            if ver[0] != torch_cudnn[0] or (len(ver) > 1 and ver[1] != torch_cudnn[1]):
                foreign.append(f'{name}')
        if foreign:
            where = f' (torch loads {", ".join(torch_dirs)})' if torch_dirs else ''
            fix = ('remove it from LD_LIBRARY_PATH' + (
                f', or put torch\'s first: export LD_LIBRARY_PATH={torch_dirs[0]}:$LD_LIBRARY_PATH'
                if torch_dirs else ''))
            out.append(Finding('WARN', 'cudnn', f'LD_LIBRARY_PATH folder {d} holds another '
                               f'cuDNN ({", ".join(foreign[:4])}) than torch\'s '
                               f'{".".join(map(str, torch_cudnn))}{where}', fix))
    if not out:
        out.append(Finding('OK', 'cudnn', f'cuDNN {".".join(map(str, torch_cudnn))}; no other '
                           'cuDNN on LD_LIBRARY_PATH'))
    return out


# ----------------------------------------------------------------------------- temp dirs

def temp_dir_findings(env=None):
    """Build/temp folders whose path is not ASCII: nvcc / ninja JIT builds fail there."""
    env = os.environ if env is None else env
    cands = [(var, env[var]) for var in ('TMPDIR', 'TEMP', 'TMP') if env.get(var)]
    cands.append(('tempfile.gettempdir()', tempfile.gettempdir()))
    cache = env.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    cands.append(('TORCH_EXTENSIONS_DIR', env.get('TORCH_EXTENSIONS_DIR')
                  or os.path.join(cache, 'torch_extensions')))
    out, seen = [], set()
    for what, path in cands:
        if path in seen:
            continue
        seen.add(path)
        if not path.isascii():
            var = what if what != 'tempfile.gettempdir()' else 'TMPDIR'
            out.append(Finding('WARN', 'temp dir', f'{what} = {path} has non-ASCII characters: '
                               'CUDA/C++ JIT compiles (torch cpp_extension, cumm) fail there',
                               f'export {var}=/tmp/pcdet_build (any ASCII-only path)'))
    if not out:
        out.append(Finding('OK', 'temp dir', f'{tempfile.gettempdir()} (ASCII)'))
    return out


# ----------------------------------------------------------------------------- smoke tests

def _smoke_dense(device):
    """conv2d + BatchNorm2d (training) + max/avg pooling, forward + backward.

    The conv output is checked against an unfold + matmul computation in float64 on the CPU
    (an independent path: no cuDNN / mkldnn conv kernel involved)."""
    import torch
    from torch import nn
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(4, 8, 12, 12, generator=gen)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    ref = (torch.nn.functional.unfold(x_cpu.double(), 3, padding=1).transpose(1, 2)
           @ conv.weight.detach().double().reshape(16, -1).t()).transpose(1, 2)
    ref = ref.reshape(4, 16, 12, 12) + conv.bias.detach().double()[None, :, None, None]
    conv, bn = conv.to(device), nn.BatchNorm2d(16).to(device).train()
    x = x_cpu.to(device).requires_grad_(True)
    y = conv(x)
    z = nn.functional.max_pool2d(torch.relu(bn(y)), 2) + nn.functional.avg_pool2d(bn(y), 2)
    z.square().mean().backward()
    err = (y.detach().cpu().double() - ref).abs().max().item()
    if err > 2e-2:  # TF32 convs on Ampere+ are ~1e-3 off; wrong kernels are far off
        raise RuntimeError(f'conv2d differs from the reference by {err:.3g}')
    for name, g in (('input', x.grad), ('conv weight', conv.weight.grad),
                    ('bn weight', bn.weight.grad)):
        if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0:
            raise RuntimeError(f'gradient of the {name} is missing, zero or not finite')
    return f'max |conv - reference| = {err:.1e}'


def _smoke_spconv(device):
    """spconv SubMConv3d forward + backward vs a dense conv3d of the same weights."""
    import spconv.pytorch as spconv
    import torch
    from .ops.sparse import match_spconv_algo, sparse_tensor
    gen = torch.Generator().manual_seed(0)
    B, D, H, W, cin, cout = 2, 5, 7, 6, 4, 8  # spatial_shape [D, H, W], coords [b, z, y, x]
    lin = torch.randperm(B * D * H * W, generator=gen)[:60]
    coords = torch.stack((lin // (D * H * W), lin // (H * W) % D, lin // W % H, lin % W), 1)
    feats = torch.randn(60, cin, generator=gen)
    conv = spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key='doctor')
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
    w = conv.weight.detach()
    # spconv >= 2.2 stores (out, kD, kH, kW, in); spconv 1.x stored (kD, kH, kW, in, out)
    w_dense = w.permute(0, 4, 1, 2, 3) if w.shape[0] == cout else w.permute(4, 3, 0, 1, 2)
    dense_in = torch.zeros(B, cin, D, H, W, dtype=torch.float64, requires_grad=False)
    b, z, y, x = coords.t()
    dense_in[b, :, z, y, x] = feats.double()
    dense_in.requires_grad_(True)
    dense_out = torch.nn.functional.conv3d(dense_in, w_dense.double(), padding=1)
    ref = dense_out[b, :, z, y, x]
    ref.square().sum().backward()
    ref_grad = dense_in.grad[b, :, z, y, x]

    conv = conv.to(device)
    match_spconv_algo(conv, torch.device(device))
    f = feats.to(device).requires_grad_(True)
    out = conv(sparse_tensor(f, coords.to(device).int(), [D, H, W], B))
    out.features.square().sum().backward()
    got = out.features.detach().cpu().double()
    if not torch.equal(out.indices.cpu().long(), coords.long()):
        raise RuntimeError('SubMConv3d changed the voxel order/indices')
    err = (got - ref.detach()).abs().max().item()
    gerr = (f.grad.cpu().double() - ref_grad).abs().max().item()
    if err > 2e-2 or gerr > 5e-2:
        raise RuntimeError(f'SubMConv3d differs from the dense conv3d: output {err:.3g}, '
                           f'input gradient {gerr:.3g}')
    return f'max |out - dense| = {err:.1e}, |grad - dense| = {gerr:.1e}'


def _smoke_voxelize(device):
    """numpy -> cumm tensorview -> spconv Point2VoxelCPU3d -> numpy: the path of OpenPCDet's
    voxel generator, where numpy 2 + cumm 0.4.x dies with SIGFPE (tv.from_numpy). Host-only,
    so it runs in the CPU child. Checked against voxel indices computed with numpy."""
    import numpy as np
    from cumm import tensorview as tv
    from spconv.utils import Point2VoxelCPU3d
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform([0, 0, 0], [4, 4, 2], (60, 3)),
                          rng.uniform(0, 1, (60, 1))], 1).astype(np.float32)
    gen = Point2VoxelCPU3d(vsize_xyz=[0.5, 0.5, 0.5], coors_range_xyz=[0, 0, 0, 4, 4, 2],
                           num_point_features=4, max_num_points_per_voxel=60,
                           max_num_voxels=1000)
    voxels, coords, counts = (t.numpy().copy() for t in gen.point_to_voxel(tv.from_numpy(pts)))
    ref = np.unique(np.floor(pts[:, [2, 1, 0]] / 0.5).astype(np.int64), axis=0)  # [z, y, x]
    got = np.unique(coords.astype(np.int64), axis=0)
    if not np.array_equal(got, ref) or int(counts.sum()) != len(pts):
        raise RuntimeError(f'Point2VoxelCPU3d gave {len(got)} voxels / {int(counts.sum())} '
                           f'points, numpy {len(ref)} / {len(pts)}')
    return f'{len(got)} voxels match numpy'


_STEPS = (('conv2d+batchnorm+pool forward+backward', _smoke_dense),
          ('spconv SubMConv3d forward+backward', _smoke_spconv),
          ('numpy->cumm->spconv voxelizer', _smoke_voxelize))


def _smoke_child(device):
    """Child process: run every step on ``device`` and report one JSON line per step."""
    import torch
    for name, fn in _STEPS:
        if fn is _smoke_voxelize and device != 'cpu':
            continue  # host-side op: once, in the CPU child
        print(f'START {name}', flush=True)
        try:
            detail, ok = fn(torch.device(device)), True
        except Exception as err:  # noqa: BLE001 - every failure is reported
            first = str(err).splitlines()[0] if str(err) else ''
            detail, ok = f'{type(err).__name__}: {first}', False
        print('RESULT ' + json.dumps({'step': name, 'ok': ok, 'detail': detail}), flush=True)
    try:
        libs = mapped_libraries(Path('/proc/self/maps').read_text())
    except OSError:
        libs = []
    print('LIBS ' + json.dumps(libs), flush=True)


SMOKE_CODE = 'from pcdet_focal.doctor import _smoke_child; _smoke_child({device!r})'


def _crash_fix(info):
    numpy_v = vtuple(info.get('numpy')) or (0,)
    old_cumm = any((vtuple(v) or (0,)) < CUMM_NUMPY2_GOOD_FROM for _, v in info.get('cumm', []))
    if numpy_v >= (2,) and old_cumm:
        return ('pip install "numpy<2" (1.26.4), or upgrade to spconv-cu121>=2.3.8 with '
                'cumm-cu121 0.7.11')
    names = [n for p in ('spconv', 'cumm') for n, _ in info.get(p, [])]
    return (f'reinstall one spconv build that matches torch\'s CUDA '
            f'({spconv_fix(info.get("torch_cuda"), names)}), then run the doctor again')


def _run_child(code, timeout):
    """Run ``code`` in a child Python with this package importable; the CompletedProcess, or
    None when it gave no answer within ``timeout`` s. A crash there is a finding, not ours."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([_PKG_PARENT, *filter(None, [env.get('PYTHONPATH')])])
    try:
        return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _how_it_ended(proc):
    """'was killed by SIGFPE' / 'exited with code 1 (<last stderr line>)'."""
    if proc.returncode < 0:
        try:
            return f'was killed by {signal.Signals(-proc.returncode).name}'
        except ValueError:
            return f'was killed by signal {-proc.returncode}'
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return f'exited with code {proc.returncode} ({tail})'


def smoke_test(device, info, timeout=300, code=None):
    """Run the smoke steps on ``device`` in a child process; returns (findings, loaded cuDNN)."""
    topic = f'smoke {device}'
    proc = _run_child((code or SMOKE_CODE).format(device=device), timeout)
    if proc is None:
        return [Finding('ERROR', topic, f'no answer after {timeout} s (hung)',
                        'run the doctor again; if it hangs again, check the GPU driver '
                        '(nvidia-smi)')], []
    out, started, libs = [], None, []
    for row in proc.stdout.splitlines():
        if row.startswith('START '):
            started = row[6:]
        elif row.startswith('RESULT '):
            res = json.loads(row[7:])
            started = None
            if res['ok']:
                out.append(Finding('OK', topic, f'{res["step"]} ({res["detail"]})'))
            else:
                out.append(Finding('ERROR', topic, f'{res["step"]} failed: {res["detail"]}',
                                   _crash_fix(info)))
        elif row.startswith('LIBS '):
            libs = json.loads(row[5:])
    if proc.returncode != 0:
        step = f' during {started}' if started else ''
        out.append(Finding('ERROR', topic, f'the smoke test {_how_it_ended(proc)}{step}',
                           _crash_fix(info)))
    return out, libs


# ----------------------------------------------------------------------------- OpenPCDet

# OpenPCDet's compiled extensions (its setup.py), as paths under pcdet/ops/.
OPENPCDET_OPS = ('iou3d_nms/iou3d_nms_cuda', 'roiaware_pool3d/roiaware_pool3d_cuda',
                 'roipoint_pool3d/roipoint_pool3d_cuda',
                 'pointnet2/pointnet2_stack/pointnet2_stack_cuda',
                 'pointnet2/pointnet2_batch/pointnet2_batch_cuda', 'bev_pool/bev_pool_ext',
                 'ingroup_inds/ingroup_inds_cuda')
_BUILD_OPS = 'in the OpenPCDet checkout: python setup.py develop'
_CUDART = re.compile(rb'libcudart\.so\.(\d+)')
OPENPCDET_CODE = 'from pcdet_focal.doctor import _openpcdet_child; _openpcdet_child()'


def linked_cuda_major(path):
    """CUDA runtime major a compiled extension links (its ``libcudart.so.N``), or None."""
    found = _CUDART.search(Path(path).read_bytes())
    return int(found.group(1)) if found else None


def _ops_findings(pcdet_dir, torch_version, torch_cuda):
    """Which of OpenPCDet's compiled ops are built, for which CUDA, and whether they load."""
    from importlib.machinery import EXTENSION_SUFFIXES
    out, missing, loaded, majors = [], [], [], set()
    for op in OPENPCDET_OPS:
        folder, stem = (Path(pcdet_dir) / 'ops' / op).parent, Path(op).name
        files = [f for suffix in EXTENSION_SUFFIXES for f in folder.glob(stem + suffix)]
        if not files:
            missing.append(stem)
            continue
        major = linked_cuda_major(files[0])
        majors.add(major)
        try:
            importlib.import_module('pcdet.ops.' + op.replace('/', '.'))
            loaded.append(stem)
        except Exception as err:  # noqa: BLE001 - undefined symbol, missing libcudart, ...
            out.append(Finding('WARN', 'openpcdet', f'{files[0]} is built but does not load '
                               f'with torch {torch_version} ({type(err).__name__}: {err})',
                               f'rebuild it for this torch: {_BUILD_OPS}'))
    torch_major = (vtuple(torch_cuda) or (None,))[0]
    if missing:
        out.append(Finding('WARN', 'openpcdet', f'compiled ops not built: {", ".join(missing)} '
                           '(pcdet.models and pcdet.datasets import them all)',
                           f'{_BUILD_OPS} (needs nvcc of torch\'s CUDA {torch_cuda or "-"})'))
    for major in sorted(m for m in majors if m is not None and m != torch_major):
        out.append(Finding('WARN', 'openpcdet', f'its ops link the CUDA {major} runtime, torch '
                           f'uses CUDA {torch_cuda or "none (CPU build)"}',
                           f'rebuild them for this torch: {_BUILD_OPS}'))
    if loaded:
        cuda = ', '.join(f'CUDA {m}' for m in sorted(m for m in majors if m)) or 'no CUDA runtime'
        out.append(Finding('OK', 'openpcdet', f'{len(loaded)} compiled ops load with torch '
                           f'{torch_version} ({cuda})'))
    return out


def _registration_findings():
    """Register our classes into OpenPCDet and check every name resolves there."""
    from .registry import REGISTRIES, PcdetNotAvailable, _import_pcdet_module, register_into_pcdet
    try:
        added = register_into_pcdet(verbose=False)
    except PcdetNotAvailable as err:
        return [Finding('WARN', 'openpcdet', f'pcdet-focal cannot register into it, so '
                        f'`pcdet-focal run` and --backend pcdet fail (the standalone tools work): '
                        f'{err}')]
    wrong, kept = [], []
    for slot, reg in REGISTRIES.items():
        table = _import_pcdet_module(reg.pcdet_module).__all__
        for name, cls in reg.items():
            if name not in table:
                wrong.append(f'{slot} {name}')
            elif table[name] is not cls:
                kept.append(name)
    if wrong:
        return [Finding('ERROR', 'openpcdet', f'names missing after registration: '
                        f'{", ".join(wrong)}', 'report this with the doctor\'s output')]
    names = sum(len(v) for v in added.values())
    return [Finding('OK', 'openpcdet', f'pcdet-focal registers {names} modules into it'
                    + (f'; OpenPCDet keeps its own {", ".join(sorted(set(kept)))}' if kept
                       else ''))]


def _openpcdet_child():
    """Child process: one ``FINDING {json}`` line per finding about OpenPCDet."""
    def emit(findings):
        for f in findings:
            print('FINDING ' + json.dumps(f.__dict__), flush=True)

    import torch
    try:
        import pcdet
    except Exception as err:  # noqa: BLE001 - e.g. pcdet/version.py was never written
        emit([Finding('WARN', 'openpcdet', f'pcdet is installed but does not import '
                      f'({type(err).__name__}: {err})', f'{_BUILD_OPS} (it also writes '
                      'pcdet/version.py)')])
        return
    pcdet_dir = Path(pcdet.__file__).parent
    emit([Finding('INFO', 'openpcdet', f'{getattr(pcdet, "__version__", "version unknown")} at '
                  f'{pcdet_dir.parent}')])
    emit(_ops_findings(pcdet_dir, torch.__version__, torch.version.cuda))
    emit(_registration_findings())


def openpcdet_findings(timeout=300, code=None):
    """OpenPCDet's version, compiled ops and our registration, checked in a child process (a
    broken extension can crash the interpreter); one INFO line when it is not installed."""
    if importlib.util.find_spec('pcdet') is None:
        return [Finding('INFO', 'openpcdet', 'not installed (optional: pcdet-focal runs without '
                        'it; inside a checkout see the README, "Inside an existing OpenPCDet '
                        'checkout")')]
    proc = _run_child(code or OPENPCDET_CODE, timeout)
    if proc is None:
        return [Finding('ERROR', 'openpcdet', f'checking it gave no answer after {timeout} s',
                        'run the doctor again')]
    out = [Finding(**json.loads(row[8:])) for row in proc.stdout.splitlines()
           if row.startswith('FINDING ')]
    if proc.returncode != 0:
        out.append(Finding('ERROR', 'openpcdet', f'checking it {_how_it_ended(proc)}',
                           f'rebuild its ops for this torch: {_BUILD_OPS}'))
    return out


# ----------------------------------------------------------------------------- numpy alias scan

# Removed in numpy 1.24 (aliases of builtins, deprecated in 1.20). np.bool and np.long came back
# in numpy 2.0 with other meanings (np.bool_ / C long), so code using them still fails on
# 1.24-1.26. np.unicode is gone in 2.0.
REMOVED_1_24 = {'float': 'float (or np.float64)', 'int': 'int (or np.int64)',
                'bool': 'bool (or np.bool_)', 'object': 'object', 'complex': 'complex (or '
                'np.complex128)', 'str': 'str', 'long': 'int (or np.int64)', 'unicode': 'str'}
# Removed in numpy 2.0 (NEP 52), the ones old detection code uses.
REMOVED_2_0 = {'float_': 'np.float64', 'complex_': 'np.complex128', 'unicode_': 'np.str_',
               'string_': 'np.bytes_', 'NaN': 'np.nan', 'Inf': 'np.inf', 'Infinity': 'np.inf',
               'infty': 'np.inf', 'NINF': '-np.inf', 'PINF': 'np.inf', 'NZERO': '-0.0',
               'PZERO': '0.0', 'cfloat': 'np.complex128', 'longfloat': 'np.longdouble',
               'singlecomplex': 'np.complex64', 'longcomplex': 'np.clongdouble',
               'clongfloat': 'np.clongdouble', 'round_': 'np.round', 'asfarray':
               'np.asarray(x, dtype=np.float64)', 'alltrue': 'np.all', 'sometrue': 'np.any',
               'product': 'np.prod', 'cumproduct': 'np.cumprod', 'msort': 'np.sort(a, axis=0)',
               'int0': 'np.intp', 'uint0': 'np.uintp', 'bool8': 'np.bool_', 'object0':
               'np.object_', 'str0': 'np.str_', 'bytes0': 'np.bytes_', 'void0': 'np.void',
               'mat': 'np.asmatrix', 'find_common_type': 'np.result_type', 'cast':
               'np.asarray(x, dtype=...)'}
REMOVED = {**{k: ('1.24', v) for k, v in REMOVED_1_24.items()},
           **{k: ('2.0', v) for k, v in REMOVED_2_0.items()}}
_SKIP_DIRS = {'__pycache__', 'node_modules'}


@dataclass
class AliasHit:
    path: str
    line: int
    alias: str    # as written, e.g. 'np.float' or 'from numpy import float'
    name: str     # the removed attribute, e.g. 'float'

    def text(self):
        since, use = REMOVED[self.name]
        when = {'bool': 'absent in numpy 1.24-1.26, np.bool_ since 2.0',
                'long': 'absent in numpy 1.24-1.26, C long since 2.0'}.get(
                    self.name, f'removed in numpy {since}')
        return f'{self.path}:{self.line}: {self.alias} ({when}) -> use {use}'


def _numpy_names(tree):
    """Names bound to the numpy module in a file (``import numpy as X``), plus np/numpy."""
    names = {'np', 'numpy'}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == 'numpy':
                    names.add(a.asname or 'numpy')
    return names


def scan_source(text, path='<string>'):
    """Removed-alias uses in Python source ``text`` (AST; tokens if it does not parse)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return _scan_tokens(text, path)
    mods = _numpy_names(tree)
    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in REMOVED
                and isinstance(node.value, ast.Name) and node.value.id in mods):
            hits.append(AliasHit(path, node.lineno, f'{node.value.id}.{node.attr}', node.attr))
        elif isinstance(node, ast.ImportFrom) and node.module == 'numpy' and node.level == 0:
            for a in node.names:
                if a.name in REMOVED:
                    hits.append(AliasHit(path, node.lineno, f'from numpy import {a.name}',
                                         a.name))
    return sorted(hits, key=lambda h: (h.line, h.alias))


def _scan_tokens(text, path):
    """Fallback for files that are not Python 3 (old code): NAME . NAME token runs, with the
    default module names np / numpy. Strings and comments are single tokens, never matched."""
    import io
    hits = []
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return hits
    for a, dot, b in zip(toks, toks[1:], toks[2:]):
        if (a.type == tokenize.NAME and a.string in ('np', 'numpy') and dot.string == '.'
                and b.type == tokenize.NAME and b.string in REMOVED):
            hits.append(AliasHit(path, b.start[0], f'{a.string}.{b.string}', b.string))
    return hits


def iter_python_files(root):
    root = Path(root)
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith('.'))
        for name in sorted(filenames):
            if name.endswith('.py'):
                yield Path(dirpath) / name


def scan_tree(root):
    """(hits, unreadable files) for every .py file under ``root`` (a folder or a file)."""
    if not Path(root).exists():
        raise ConfigError(f'--scan {root}: no such file or folder')
    hits, unreadable = [], []
    for path in iter_python_files(root):
        try:
            with tokenize.open(path) as f:  # honours the file's coding cookie
                text = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError):
            unreadable.append(str(path))
            continue
        hits.extend(scan_source(text, str(path)))
    return hits, unreadable


def scan_findings(root):
    import numpy
    import warnings
    hits, unreadable = scan_tree(root)
    out = []
    for h in hits:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            present = hasattr(numpy, h.name)
        # absent in the installed numpy -> that line raises AttributeError when it runs
        level = 'WARN' if present else 'ERROR'
        out.append(Finding(level, 'numpy alias', h.text() + (
            '' if present else f' [fails with the installed numpy {numpy.__version__}]')))
    for path in unreadable:
        out.append(Finding('WARN', 'numpy alias', f'{path}: could not be read (encoding)'))
    if not hits and not unreadable:
        out.append(Finding('OK', 'numpy alias', f'no removed numpy aliases under {root}'))
    return out


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser):
    parser.add_argument('--scan', action='append', default=[], metavar='PATH',
                        help='list removed numpy aliases (np.float, np.int, ...) in the .py '
                             'files under PATH as file:line (repeatable)')
    parser.add_argument('--skip-smoke', action='store_true',
                        help='skip the per-device conv / spconv smoke tests')
    parser.add_argument('--timeout', type=int, default=300,
                        help='seconds allowed for each device\'s smoke test (default 300)')
    return parser


def run_checks(args):
    """Every finding, in print order."""
    info = collect_versions()
    findings = version_findings(info)
    findings += combo_findings(info)
    findings += temp_dir_findings()
    loaded = []
    if info.get('torch') is not None and not args.skip_smoke:
        for device in info['devices']:
            res, libs = smoke_test(device, info, timeout=args.timeout)
            findings += res
            if device.startswith('cuda'):
                loaded = loaded or libs
    if info.get('torch') is not None:
        if not loaded:
            try:
                loaded = mapped_libraries(Path('/proc/self/maps').read_text())
            except OSError:
                loaded = []
        findings += cudnn_findings(info.get('cudnn'), loaded,
                                   os.environ.get('LD_LIBRARY_PATH', ''))
    if info.get('torch') is not None:
        findings += openpcdet_findings(timeout=args.timeout)
    for root in args.scan:
        findings += scan_findings(root)
    return findings


def run_doctor(args):
    findings = run_checks(args)
    for f in findings:
        print(f.line(), flush=True)
    code = exit_code(findings)
    n_err = sum(f.level == 'ERROR' for f in findings)
    n_warn = sum(f.level == 'WARN' for f in findings)
    verdict = {0: 'all good', 1: 'warnings', 2: 'blocking problems'}[code]
    print(f'doctor: {verdict} ({n_err} errors, {n_warn} warnings); exit code {code}')
    return code


def doctor_main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(
        prog='check_env.py', description='pcdet-focal environment doctor: versions, known-bad '
        'combinations, smoke tests on each device, removed numpy aliases (--scan)'))
    return run_doctor(parser.parse_args(argv))


main = cli_main(doctor_main)

if __name__ == '__main__':
    main()
