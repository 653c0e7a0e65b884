"""pcdet_focal.doctor (``pcdet-focal doctor`` / ``tools/check_env.py``).

Known-bad combinations, cuDNN shadowing and non-ASCII temp dirs are simulated with made-up
versions and files; the numpy-alias scan runs on source trees written here, with the expected
file:line list written out by the test; one full doctor run (smoke tests included) on this
machine.
"""
import importlib.machinery
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fake_pcdet import REPO_ROOT, broken_pcdet, fake_pcdet, no_pcdet, subprocess_env  # noqa: F401
from pcdet_focal import doctor
from pcdet_focal.doctor import (REMOVED, Finding, combo_findings, cudnn_findings, cudnn_tuple,
                                exit_code, mapped_libraries, scan_findings,
                                scan_tree, smoke_test, so_version, temp_dir_findings,
                                version_findings, vtuple)


def levels(findings, topic=None):
    return [f.level for f in findings if topic is None or f.topic == topic]


def test_finding_line_and_exit_code():
    f = Finding('WARN', 'numpy', 'something odd', 'pip install x')
    assert f.line() == 'WARN  numpy: something odd | fix: pip install x'
    assert Finding('OK', 't', 'fine').line() == 'OK    t: fine'
    assert exit_code([]) == 0
    assert exit_code([Finding('OK', 'a', ''), Finding('INFO', 'b', '')]) == 0
    assert exit_code([Finding('INFO', 'a', ''), Finding('WARN', 'b', '')]) == 1
    assert exit_code([Finding('ERROR', 'a', ''), Finding('WARN', 'b', '')]) == 2


@pytest.mark.parametrize('text, expected', [
    ('2.3.8', (2, 3, 8)), ('2.0.0rc1', (2, 0, 0)), ('2.13.0+cpu', (2, 13, 0)), ('12.1', (12, 1)),
    ('1.26.4', (1, 26, 4)), (None, None), ('', None), ('dev', None)])
def test_vtuple(text, expected):
    assert vtuple(text) == expected


@pytest.mark.parametrize('code, expected', [(8902, (8, 9, 2)), (8700, (8, 7, 0)),
                                            (90100, (9, 1, 0)), (90501, (9, 5, 1)),
                                            (None, None)])
def test_cudnn_tuple(code, expected):
    assert cudnn_tuple(code) == expected


# ----------------------------------------------------------------------------- known-bad combos

def info(numpy='2.4.6', cumm=('cumm-cu121', '0.7.11'), spconv=('spconv-cu121', '2.3.8'),
         torch_cuda=None):
    return {'python': '3.11.0', 'torch': '2.5.1', 'torch_cuda': torch_cuda, 'cudnn': None,
            'numpy': numpy, 'numba': '0.60.0', 'devices': ['cpu'],
            'cumm': [cumm] if cumm else [], 'spconv': [spconv] if spconv else []}


@pytest.mark.parametrize('numpy, cumm, expected', [
    ('2.0.2', '0.4.11', ['ERROR']),   # the users' crash: numpy 2.0.x + cumm 0.4.x
    ('2.0.1', '0.4.9', ['ERROR']),
    ('2.1.0', '0.5.3', ['WARN']),     # unverified middle versions
    ('2.1.0', '0.6.1', ['WARN']),
    ('2.4.6', '0.7.11', []),          # measured good here
    ('1.26.4', '0.4.11', []),         # numpy 1.x is what cumm 0.4 was built for
])
def test_numpy2_with_old_cumm_is_flagged(numpy, cumm, expected):
    found = combo_findings(info(numpy=numpy, cumm=('cumm-cu120', cumm)))
    assert levels(found, 'numpy+cumm') == expected
    if expected == ['ERROR']:
        line = found[0].line()
        assert f'numpy {numpy}' in line and f'cumm-cu120 {cumm}' in line
        assert 'numpy<2' in line and 'spconv-cu121>=2.3.8' in line


@pytest.mark.parametrize('torch_cuda, spconv, expected', [
    ('12.1', 'spconv-cu118', ['WARN']),   # CUDA 12 torch, CUDA 11 spconv
    ('11.8', 'spconv-cu121', ['WARN']),
    ('12.1', 'spconv-cu120', []),         # same major
    ('12.4', 'spconv-cu121', []),
    ('12.8', 'spconv-cu121', []),         # pip install -e '.[cu12]': torch 2.10.0 (CUDA 12.8)
    ('12.1', 'spconv', ['WARN']),         # CPU-only spconv with a CUDA torch
    (None, 'spconv-cu121', ['INFO']),     # CPU torch: Native algo on the CPU
])
def test_torch_vs_spconv_cuda(torch_cuda, spconv, expected):
    found = combo_findings(info(torch_cuda=torch_cuda, spconv=(spconv, '2.3.6')))
    assert levels(found, 'spconv') == expected
    if 'WARN' in expected:
        assert f'spconv-cu{torch_cuda.replace(".", "")[:2]}' in found[0].fix


def test_missing_and_duplicate_packages():
    bad = info(cumm=None)
    bad['cumm'] = [('cumm', '0.5.3'), ('cumm-cu120', '0.4.11')]  # both installed
    bad['spconv'] = []
    bad['numba'] = None
    found = version_findings(bad)
    assert levels(found, 'spconv') == ['ERROR'] and 'pip install spconv-cu121' in \
        [f for f in found if f.topic == 'spconv'][0].fix
    dup = [f for f in found if f.topic == 'cumm']
    assert levels(dup) == ['WARN'] and 'cumm 0.5.3' in dup[0].message \
        and 'pip uninstall cumm cumm-cu120' in dup[0].fix
    assert levels(found, 'numba') == ['WARN']
    no_torch = version_findings({'python': '3.11', 'torch': None, 'torch_error': 'boom',
                                 'numpy': '1.26.4', 'numba': None})
    assert levels(no_torch, 'torch') == ['ERROR']


def test_simulated_bad_environment_exits_2(monkeypatch, capsys):
    """The whole command with monkeypatched versions: numpy 2.0.2 + cumm-cu120 0.4.11."""
    from pcdet_focal.cli import cli
    bad = info(numpy='2.0.2', cumm=('cumm-cu120', '0.4.11'), spconv=('spconv-cu120', '2.3.6'))
    monkeypatch.setattr(doctor, 'collect_versions', lambda: bad)
    assert cli(['doctor', '--skip-smoke']) == 2
    out = capsys.readouterr().out.splitlines()
    bad_lines = [l for l in out if l.startswith('ERROR numpy+cumm:')]
    assert len(bad_lines) == 1 and 'numpy 2.0.2 with cumm-cu120 0.4.11' in bad_lines[0]
    assert out[-1].startswith('doctor: blocking problems') and out[-1].endswith('exit code 2')


# ----------------------------------------------------------------------------- smoke isolation

def test_a_crashing_smoke_test_is_a_finding_not_the_doctors_death():
    """SIGFPE in the child (what numpy 2 + cumm 0.4.x did) is reported with the step it hit."""
    code = ('import os, signal\n'
            'print("RESULT {\\"step\\": \\"conv\\", \\"ok\\": true, \\"detail\\": \\"fine\\"}",'
            ' flush=True)\n'
            'print("START spconv SubMConv3d forward+backward", flush=True)\n'
            'os.kill(os.getpid(), signal.SIGFPE)\n').replace('{', '{{').replace('}', '}}')
    found, _ = smoke_test('cpu', info(numpy='2.0.2', cumm=('cumm-cu120', '0.4.11')), code=code)
    assert [f.level for f in found] == ['OK', 'ERROR']
    msg = found[1].line()
    assert 'killed by SIGFPE during spconv SubMConv3d forward+backward' in msg
    assert 'numpy<2' in msg


def test_smoke_step_failure_and_timeout_are_findings():
    code = ('print("START spconv", flush=True)\n'
            'print("RESULT {\\"step\\": \\"spconv\\", \\"ok\\": false, \\"detail\\": '
            '\\"RuntimeError: bad\\"}", flush=True)\n').replace('{', '{{').replace('}', '}}')
    found, _ = smoke_test('cpu', info(), code=code)
    assert levels(found) == ['ERROR'] and 'spconv failed: RuntimeError: bad' in found[0].message
    found, _ = smoke_test('cpu', info(), timeout=1, code='import time; time.sleep(30)')
    assert levels(found) == ['ERROR'] and 'no answer after 1 s' in found[0].message
    found, _ = smoke_test('cpu', info(), code='raise SystemExit("cannot import torch")')
    assert levels(found) == ['ERROR'] and 'exited with code 1 (cannot import torch)' in \
        found[0].message


# ----------------------------------------------------------------------------- cuDNN

def test_mapped_libraries_parses_proc_maps():
    maps = ('7f0000000000-7f0000001000 r-xp 00000000 08:01 42  /opt/venv/nvidia/cudnn/lib/'
            'libcudnn.so.9\n'
            '7f0000001000-7f0000002000 r--p 00001000 08:01 42  /opt/venv/nvidia/cudnn/lib/'
            'libcudnn.so.9\n'
            '7f0000003000-7f0000004000 r-xp 00000000 08:01 43  /usr/local/cuda/lib64/'
            'libcudnn_cnn_train.so.8.9.7\n'
            '7f0000005000-7f0000006000 rw-p 00000000 00:00 0 \n'
            '7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0  [stack]\n'
            '7f0000007000-7f0000008000 r-xp 00000000 08:01 44  /usr/lib/libc.so.6\n')
    assert mapped_libraries(maps) == ['/opt/venv/nvidia/cudnn/lib/libcudnn.so.9',
                                      '/usr/local/cuda/lib64/libcudnn_cnn_train.so.8.9.7']
    if Path('/proc/self/maps').exists():  # the real file of this process has libc
        assert any('libc' in p for p in mapped_libraries(Path('/proc/self/maps').read_text(),
                                                         prefix='libc'))


@pytest.mark.parametrize('name, expected', [('libcudnn_cnn_train.so.8.9.2', (8, 9, 2)),
                                            ('libcudnn.so.9', (9,)), ('libcudnn.so', None),
                                            ('libcudnn_ops.so.9.1.0', (9, 1, 0))])
def test_so_version(name, expected):
    assert so_version(name) == expected


def _libs(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b'')
    return folder


def test_cudnn_on_ld_library_path_that_differs_from_torchs(tmp_path):
    """The users' case: torch (cuDNN 8.9.2 from pip) + a system CUDA folder with cuDNN 9."""
    torch_dir = _libs(tmp_path / 'venv' / 'nvidia' / 'cudnn' / 'lib',
                      ['libcudnn.so.8', 'libcudnn_cnn_train.so.8'])
    system = _libs(tmp_path / 'cuda-12.8' / 'lib64',
                   ['libcudnn.so.9.7.0', 'libcudnn_cnn.so.9', 'libcublas.so.12'])
    loaded = [str(torch_dir / 'libcudnn.so.8'), str(torch_dir / 'libcudnn_cnn_train.so.8')]
    ld = os.pathsep.join([str(system), str(tmp_path / 'missing'), str(torch_dir)])
    found = cudnn_findings((8, 9, 2), loaded, ld)
    assert levels(found) == ['WARN']
    line = found[0].line()
    assert str(system) in line and 'libcudnn.so.9.7.0' in line and 'libcublas' not in line
    assert f'export LD_LIBRARY_PATH={torch_dir}:$LD_LIBRARY_PATH' in line


def test_cudnn_same_version_or_torchs_own_files_are_fine(tmp_path):
    torch_dir = _libs(tmp_path / 'torch_cudnn', ['libcudnn.so.9', 'libcudnn_cnn.so.9'])
    same = _libs(tmp_path / 'cuda' / 'lib64', ['libcudnn.so.9.1.0'])
    found = cudnn_findings((9, 1, 0), [str(torch_dir / 'libcudnn.so.9')],
                           f'{torch_dir}{os.pathsep}{same}')
    assert levels(found) == ['OK']
    other_minor = _libs(tmp_path / 'old', ['libcudnn.so.9.0.0'])
    found = cudnn_findings((9, 1, 0), [str(torch_dir / 'libcudnn.so.9')], str(other_minor))
    assert levels(found) == ['WARN']


def test_cudnn_with_a_cpu_torch(tmp_path):
    system = _libs(tmp_path / 'lib', ['libcudnn.so.8.9.7'])
    assert levels(cudnn_findings(None, [], str(system))) == ['INFO']
    assert levels(cudnn_findings(None, [], '')) == ['INFO']


# ----------------------------------------------------------------------------- temp dirs

def test_non_ascii_temp_dir_is_flagged(tmp_path, monkeypatch):
    bad = tmp_path / 'tëmp_日本'
    bad.mkdir()
    monkeypatch.setenv('TMPDIR', str(bad))
    monkeypatch.setattr(tempfile, 'tempdir', None)  # gettempdir() re-reads TMPDIR
    ascii_ext = tmp_path / 'ext'
    found = temp_dir_findings({'TMPDIR': str(bad), 'TORCH_EXTENSIONS_DIR': str(ascii_ext)})
    assert levels(found) == ['WARN']  # TMPDIR and gettempdir() are the same path: one line
    assert str(bad) in found[0].message and 'export TMPDIR=' in found[0].fix


def test_non_ascii_torch_extensions_dir_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    found = temp_dir_findings({'TORCH_EXTENSIONS_DIR': '/home/usér/ext'})
    assert levels(found) == ['WARN'] and 'export TORCH_EXTENSIONS_DIR=' in found[0].fix
    home_cache = temp_dir_findings({'XDG_CACHE_HOME': '/home/josé/.cache'})
    assert levels(home_cache) == ['WARN'] and 'torch_extensions' in home_cache[0].message


def test_ascii_temp_dir_is_ok(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    found = temp_dir_findings({'TORCH_EXTENSIONS_DIR': str(tmp_path / 'ext')})
    assert levels(found) == ['OK']


# ----------------------------------------------------------------------------- numpy alias scan

def write_tree_with_every_alias(root):
    """Writes files using every removed alias; returns the expected {(path, line, alias)}."""
    expected = set()
    lines = ['"""Docstring mentioning np.float and numpy.int: not code."""',
             'import numpy as np', 'import numpy', 'import numpy as npy', '']
    for name in sorted(REMOVED):
        lines.append(f'a_{name} = np.{name}')
        expected.add((len(lines), f'np.{name}'))
    for name in ('float', 'int', 'bool', 'object', 'complex', 'str', 'long', 'unicode'):
        lines.append(f'b_{name} = numpy.{name}(1) if False else None')
        expected.add((len(lines), f'numpy.{name}'))
        lines.append(f'c_{name} = npy.{name}  # also np.{name} in a comment')
        expected.add((len(lines), f'npy.{name}'))
    lines += ['x = np.zeros(3, dtype=np.float)', 'y = f"{np.int(3)}"']
    expected.add((len(lines) - 1, 'np.float'))
    expected.add((len(lines), 'np.int'))
    lines += ['def f(arr):', '    return arr.astype(np.object)']
    expected.add((len(lines), 'np.object'))
    text = '\n'.join(lines) + '\n'
    main = root / 'pkg' / 'uses_aliases.py'
    main.parent.mkdir(parents=True)
    main.write_text(text)
    expected = {(str(main), line, alias) for line, alias in expected}
    imp = root / 'pkg' / 'sub' / 'imports.py'
    imp.parent.mkdir()
    imp.write_text('from numpy import float, int as np_int, float32\nfrom numpy import bool\n')
    expected |= {(str(imp), 1, 'from numpy import float'), (str(imp), 1, 'from numpy import int'),
                 (str(imp), 2, 'from numpy import bool')}
    py2 = root / 'legacy_py2.py'  # not Python 3: scanned token by token
    py2.write_text('import numpy as np\nprint "np.float in a string"\n'
                   'x = np.float(3)  # np.int in a comment\ny = np.int32\n')
    expected.add((str(py2), 3, 'np.float'))
    latin = root / 'latin1.py'  # coding cookie honoured
    latin.write_bytes(b'# -*- coding: latin-1 -*-\nimport numpy as np\ns = "caf\xe9"\n'
                      b'z = np.bool\n')
    expected.add((str(latin), 4, 'np.bool'))
    return expected


def write_clean_tree(root):
    pkg = root / 'clean'
    pkg.mkdir()
    (pkg / 'ok.py').write_text(
        '"""np.float, np.int in a docstring."""\n'
        'import numpy as np\n'
        '# np.float np.int np.bool np.object in comments\n'
        'a = np.float32(1) + np.int64(2) + np.float64(3) + np.bool_(True) + np.object_\n'
        'b = np.str_("s"), np.complex128(1), np.longlong(1), np.nan, np.inf, np.round(1.5)\n'
        's = "np.float np.int"\n'
        'class Obj:\n    float = 1\n    int = 2\n'
        'o = Obj(); c = o.float + o.int\n'
        'import math\nd = math.inf\n'
        'def g(x):\n    return x.float()  # torch tensors have .float()\n')
    (pkg / 'notes.txt').write_text('np.float here is not Python\n')
    return pkg


def test_scan_finds_every_alias(tmp_path):
    expected = write_tree_with_every_alias(tmp_path)
    hits, unreadable = scan_tree(tmp_path)
    assert unreadable == []
    assert {(h.path, h.line, h.alias) for h in hits} == expected
    assert len(hits) == len(expected)  # no duplicates
    h = [h for h in hits if h.alias == 'np.float_'][0]
    assert h.text().endswith('np.float_ (removed in numpy 2.0) -> use np.float64')


def test_scan_finds_nothing_in_a_clean_tree(tmp_path):
    pkg = write_clean_tree(tmp_path)
    assert scan_tree(pkg) == ([], [])
    found = scan_findings(pkg)
    assert levels(found) == ['OK'] and exit_code(found) == 0


def test_scan_single_file_and_missing_path(tmp_path):
    f = tmp_path / 'one.py'
    f.write_text('import numpy as np\nx = np.long\n')
    assert [(h.line, h.alias) for h in scan_tree(f)[0]] == [(2, 'np.long')]
    from pcdet_focal.errors import ConfigError
    with pytest.raises(ConfigError, match='no such file'):
        scan_tree(tmp_path / 'missing')


def test_scan_levels_follow_the_installed_numpy(tmp_path):
    """An alias the installed numpy lacks will raise AttributeError when its line runs:
    blocking (ERROR); one it still has (np.bool / np.long on numpy 2) is a WARN."""
    import warnings

    import numpy as np
    f = tmp_path / 'x.py'
    f.write_text('import numpy as np\na = np.float\nb = np.bool\nc = np.NaN\n')
    found = [x for x in scan_findings(f) if x.topic == 'numpy alias']
    assert len(found) == 3
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for finding, name in zip(found, ('float', 'bool', 'NaN')):
            assert finding.level == ('WARN' if hasattr(np, name) else 'ERROR'), name
            assert f'x.py:{2 + ("float", "bool", "NaN").index(name)}: np.{name} ' in \
                finding.message


def test_scan_cli_lists_file_line(tmp_path):
    expected = write_tree_with_every_alias(tmp_path / 'tree')
    out = subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / 'check_env.py'),
                          '--skip-smoke', '--scan', str(tmp_path / 'tree')],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode in (1, 2), out.stderr  # removed aliases are at least a warning
    alias_lines = [l for l in out.stdout.splitlines() if ' numpy alias: ' in l]
    assert len(alias_lines) == len(expected)
    for path, line, alias in expected:
        assert any(f'{path}:{line}: {alias} ' in l for l in alias_lines), (path, line, alias)


# ----------------------------------------------------------------------------- the real thing

def test_doctor_runs_here_and_passes_its_smoke_tests(tmp_path):
    """Full run on this machine (CPU): exit 0 or 1, every smoke step OK."""
    env = subprocess_env()
    env['TMPDIR'] = str(tmp_path)
    out = subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / 'check_env.py')], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for step in ('conv2d+batchnorm+pool forward+backward', 'spconv SubMConv3d forward+backward',
                 'numpy->cumm->spconv voxelizer'):
        assert any(l.startswith(f'OK    smoke cpu: {step}') for l in lines), (step, lines)
    for topic in ('python', 'torch', 'spconv', 'cumm', 'numpy', 'numba', 'devices'):
        assert any(l.split(':')[0].split()[-1] == topic for l in lines), topic
    assert not [l for l in lines if l.startswith('ERROR')]
    assert lines[-1].startswith('doctor: ') and lines[-1].endswith(f'exit code {out.returncode}')


def test_doctor_via_console_script(tmp_path):
    exe = Path(sys.executable).parent / 'pcdet-focal'
    if not exe.exists():
        pytest.skip('the pcdet-focal console script is not installed in this environment')
    out = subprocess.run([str(exe), 'doctor', '--skip-smoke'], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    assert 'numpy:' in out.stdout and out.stdout.splitlines()[-1].startswith('doctor: ')


# ----------------------------------------------------------------------------- CUDA pairing

# Checked on PyPI (https://pypi.org/pypi/<name>/json) for this release: spconv's builds stop at
# CUDA 12.6 (spconv-cu122, -cu125, -cu128, -cu129, -cu130 do not exist), so a CUDA 13 torch
# has no spconv to pair with.
PUBLISHED = {'spconv', 'spconv-cu102', 'spconv-cu111', 'spconv-cu113', 'spconv-cu114',
             'spconv-cu116', 'spconv-cu117', 'spconv-cu118', 'spconv-cu120', 'spconv-cu121',
             'spconv-cu124', 'spconv-cu126', 'cumm', 'cumm-cu118', 'cumm-cu121', 'cumm-cu126',
             'nvidia-cudnn-cu11', 'nvidia-cudnn-cu12', 'nvidia-cudnn-cu13'}


@pytest.mark.parametrize('torch_cuda, build', [
    ('12.8', 'spconv-cu126'), ('12.6', 'spconv-cu126'), ('12.5', 'spconv-cu124'),
    ('12.4', 'spconv-cu124'), ('12.1', 'spconv-cu121'), ('12.0', 'spconv-cu120'),
    ('11.8', 'spconv-cu118'), ('11.7', 'spconv-cu117'), ('13.0', None), ('13.2', None)])
def test_spconv_build_for_torchs_cuda(torch_cuda, build):
    assert doctor.spconv_build_for(torch_cuda) == build
    assert build is None or build in PUBLISHED


def _fixes(torch_cuda, spconv, numpy='2.4.6', cumm=('cumm-cu121', '0.7.11')):
    found = version_findings(info(torch_cuda=torch_cuda, numpy=numpy, cumm=cumm,
                                  spconv=spconv))
    found += combo_findings(info(torch_cuda=torch_cuda, numpy=numpy, cumm=cumm, spconv=spconv))
    fixes = [f.fix for f in found]
    return fixes + [doctor._crash_fix(info(torch_cuda=torch_cuda, numpy=numpy, cumm=cumm,
                                           spconv=spconv))]


@pytest.mark.parametrize('torch_cuda', [None, '11.8', '12.1', '12.8', '13.0'])
@pytest.mark.parametrize('spconv', [None, ('spconv', '2.3.8'), ('spconv-cu118', '2.3.8'),
                                    ('spconv-cu121', '2.3.8')])
def test_every_fix_names_packages_that_exist(torch_cuda, spconv):
    fixes = _fixes(torch_cuda, spconv) + _fixes(torch_cuda, spconv, '2.0.2',
                                                ('cumm-cu120', '0.4.11'))
    cudnn = version_findings({**info(torch_cuda=torch_cuda), 'cudnn_error': 'mismatch'})
    fixes += [f.fix for f in cudnn if f.topic == 'cudnn']
    named = {m.group(0) for fix in fixes
             for m in re.finditer(r'\b(?:spconv|cumm|nvidia-cudnn)(?:-cu\w+)?', fix)}
    assert named <= PUBLISHED, named - PUBLISHED
    assert not any('spconv-cu13' in fix for fix in fixes)


def test_cuda13_torch_with_spconv_cu121_says_install_a_cuda12_torch():
    """What `pip install -e .` alone gives on a fresh machine: torch 2.14.1+cu130."""
    found = combo_findings(info(torch_cuda='13.0', spconv=('spconv-cu121', '2.3.8')))
    assert levels(found, 'spconv') == ['WARN']
    fix = found[0].fix
    assert 'no spconv build exists for CUDA 13.0' in fix and '"torch>=2.1,<2.11"' in fix
    assert '.[cu12]' in fix and 'pip uninstall' not in fix


def test_two_spconv_builds_are_warned_about():
    found = version_findings(info(torch_cuda='12.1', spconv=None) | {
        'spconv': [('spconv-cu118', '2.3.8'), ('spconv-cu121', '2.3.8')]})
    dup = [f for f in found if f.topic == 'spconv']
    assert levels(dup) == ['WARN'] and 'several builds installed' in dup[0].message
    assert dup[0].fix.startswith('pip uninstall spconv-cu118 spconv-cu121 then install one')
    assert 'pip install spconv-cu121' in dup[0].fix


# ----------------------------------------------------------------------------- OpenPCDet

def test_openpcdet_not_installed_is_one_info_line(no_pcdet):
    found = doctor.openpcdet_findings()
    assert levels(found) == ['INFO'] and 'not installed' in found[0].message


def test_openpcdet_checked_in_a_checkout(fake_pcdet, monkeypatch):
    """Version, ops (none built in the fake), registration of every module of ours."""
    monkeypatch.setenv('PYTHONPATH', str(fake_pcdet))
    found = doctor.openpcdet_findings()
    assert [f.level for f in found] == ['INFO', 'WARN', 'OK'], [f.line() for f in found]
    assert found[0].message.startswith(f'0.6.0+fake at {fake_pcdet}')
    assert 'compiled ops not built: iou3d_nms_cuda, roiaware_pool3d_cuda' in found[1].message
    assert 'python setup.py develop' in found[1].fix
    from pcdet_focal.registry import REGISTRIES
    ours = sum(len(reg.names()) for reg in REGISTRIES.values())
    assert 'pcdet-focal registers' in found[2].message
    assert 'OpenPCDet keeps its own' in found[2].message and 'CenterHead' in found[2].message
    # an op built for CUDA 11 that does not load with this torch
    ext = importlib.machinery.EXTENSION_SUFFIXES[0]
    (fake_pcdet / 'pcdet' / 'ops' / 'iou3d_nms' / f'iou3d_nms_cuda{ext}').write_bytes(
        b'\x7fELF not really\x00libcudart.so.11.0\x00')
    found = doctor.openpcdet_findings()
    bad = [f for f in found if 'does not load' in f.message]
    assert levels(bad) == ['WARN'] and 'iou3d_nms_cuda' in bad[0].message
    assert 'is built but does not load with torch' in bad[0].message
    assert any('link the CUDA 11 runtime' in f.message for f in found)
    assert ours > 0


def test_openpcdet_with_unbuilt_ops_says_registration_fails(broken_pcdet, monkeypatch):
    monkeypatch.setenv('PYTHONPATH', str(broken_pcdet))
    found = doctor.openpcdet_findings()
    reg = [f for f in found if 'cannot register' in f.message]
    assert levels(reg) == ['WARN'] and 'iou3d_nms_cuda' in reg[0].message
    assert '`pcdet-focal run` and --backend pcdet fail' in reg[0].message


def test_linked_cuda_major(tmp_path):
    f = tmp_path / 'op.so'
    f.write_bytes(b'\x7fELF\x00libc10.so\x00libcudart.so.12\x00libtorch.so\x00')
    assert doctor.linked_cuda_major(f) == 12
    f.write_bytes(b'\x7fELF\x00libc10.so\x00')
    assert doctor.linked_cuda_major(f) is None


@pytest.mark.skipif(not os.environ.get('PCDET_ROOT'), reason='set PCDET_ROOT to an OpenPCDet '
                    'checkout to check the doctor against it')
@pytest.mark.parametrize('stand_ins', [False, True])
def test_doctor_on_a_real_openpcdet(stand_ins):
    """Without its ops built: their names and the cause; with tests/pcdet_cpu_ops standing in
    for them: our registration works."""
    root = Path(os.environ['PCDET_ROOT']).resolve()
    env = subprocess_env(root)
    if stand_ins:
        env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT / 'tests' / 'pcdet_cpu_ops'),
                                             env['PYTHONPATH']])
    out = subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / 'check_env.py'),
                          '--skip-smoke'], env=env, capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if ' openpcdet: ' in l]
    assert lines and lines[0].startswith('INFO  openpcdet: 0.6.0+') and str(root) in lines[0]
    built = list((root / 'pcdet' / 'ops').rglob('*_cuda*.so'))
    if not built:
        assert any(l.startswith('WARN  openpcdet: compiled ops not built: iou3d_nms_cuda')
                   for l in lines), lines
    registered = [l for l in lines if 'registers' in l or 'cannot register' in l]
    assert len(registered) == 1
    if stand_ins or built:
        assert registered[0].startswith('OK    openpcdet: pcdet-focal registers'), lines
    else:
        assert registered[0].startswith('WARN  openpcdet: pcdet-focal cannot register'), lines
