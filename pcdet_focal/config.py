"""OpenPCDet-style YAML configs: ``_BASE_CONFIG_`` inheritance, ``--set`` overrides, paths.

- :func:`load_config` reads YAML with ``yaml.safe_load`` only (python tags are refused, never
  executed) into an EasyDict. ``_BASE_CONFIG_: path`` may appear in any mapping; the base is
  loaded first and the including mapping's keys are merged on top (recursively). A base path is
  resolved relative to the including file's folder, then that folder's parents, then the repo
  root, then the current directory; a base may have its own base; cycles are an error.
- :func:`apply_set` applies ``--set KEY.SUB VALUE ...`` pairs, parsing values with
  ``ast.literal_eval`` (anything that does not parse stays a string). A key must exist in the
  config, or be declared (``declared``: a callable the schema layer passes, see
  :mod:`pcdet_focal.config_schema`).
- :func:`resolve_path` finds a data path relative to the config files, the repo root or cwd.
- :class:`Provenance` records where every key came from: file and line, the ``_BASE_CONFIG_``
  it was inherited through, ``--set``, or a declared default (``pcdet-focal config`` prints it).

Every error is a :class:`ConfigError` naming the file (and line, for YAML errors) or the key.
"""
import ast
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from easydict import EasyDict

from .errors import ConfigError

BASE_KEY = '_BASE_CONFIG_'
_PKG_ROOT = Path(__file__).resolve().parents[1]
# The repository root when running from a checkout (editable install); None for a wheel install.
REPO_ROOT = _PKG_ROOT if (_PKG_ROOT / 'cfgs').is_dir() else None


@dataclass
class Origin:
    """Where one config value came from."""

    kind: str            # 'file' | 'base' | 'set' | 'default'
    file: str = ''
    line: int = None
    via: str = ''        # 'base': the file whose _BASE_CONFIG_ pulled it in; 'default': who

    def describe(self):
        where = f'{self.file}:{self.line}' if self.line else self.file
        if self.kind == 'file':
            return where
        if self.kind == 'base':
            return f'{where} (inherited through _BASE_CONFIG_ in {self.via})'
        if self.kind == 'set':
            return '--set on the command line'
        return f'default declared by {self.via}'


class Provenance(dict):
    """dotted key path (``DATA_CONFIG.DATA_PROCESSOR[2].VOXEL_SIZE``) -> :class:`Origin`."""

    def record(self, path, origin):
        self[path] = origin

    def replace(self, path, origin):
        """``path`` set anew: what was recorded below it (keys, list items) no longer holds."""
        for sub in [p for p in self if p.startswith(path + '.') or p.startswith(path + '[')]:
            del self[sub]
        self[path] = origin

    def origin(self, path):
        """The origin of ``path`` or of its nearest recorded parent (a key inside a list)."""
        while path:
            if path in self:
                return self[path]
            cut = max(path.rfind('.'), path.rfind('['))
            path = path[:cut] if cut > 0 else ''
        return None


def _key_lines(text):
    """{dotted path: 1-based line} of every mapping key in a YAML text (safe: compose only)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                path = f'{prefix}.{knode.value}' if prefix else str(knode.value)
                lines[path] = knode.start_mark.line + 1
                walk(vnode, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f'{prefix}[{i}]')

    if root is not None:
        walk(root, '')
    return lines


def _read_yaml(path, lines=None):
    """The mapping in ``path``; ``lines`` (a dict), when given, receives :func:`_key_lines`."""
    try:
        text = Path(path).read_text(encoding='utf-8')
    except FileNotFoundError:
        raise ConfigError(f'{path}: config file not found') from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError(f'{path}: cannot read config file ({err.__class__.__name__})') from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        line = f':{mark.line + 1}' if mark is not None else ''
        raise ConfigError(f'{path}{line}: refused YAML tag ({err.problem}); configs may only '
                          'hold plain YAML (mappings, lists, numbers, strings)') from None
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        line = f':{mark.line + 1}' if mark is not None else ''
        problem = getattr(err, 'problem', None) or str(err).splitlines()[0]
        raise ConfigError(f'{path}{line}: YAML syntax error: {problem}') from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: a config must be a YAML mapping (KEY: value), '
                          f'got a {type(data).__name__}')
    if lines is not None:
        lines.update(_key_lines(text))
    return data


def _base_candidates(base, including_file):
    base = Path(os.path.expanduser(str(base)))
    if base.is_absolute():
        return [base]
    here = Path(including_file).resolve().parent
    dirs = [here, *here.parents]
    if REPO_ROOT is not None:
        dirs.append(REPO_ROOT)
    dirs.append(Path.cwd())
    return [d / base for d in dirs]


def _resolve_base(base, including_file, key_path):
    if not isinstance(base, str):
        raise ConfigError(f'{including_file}: {key_path}{BASE_KEY} must be a file path, '
                          f'got {base!r}')
    for cand in _base_candidates(base, including_file):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f'{including_file}: {key_path}{BASE_KEY}: base config {base!r} not found '
                      'relative to this file, its parent folders, the repo root or the '
                      'current directory')


def _merge(dst, src):
    """Deep-merge mapping ``src`` into ``dst`` (src wins); returns dst."""
    for key, val in src.items():
        if isinstance(val, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], val)
        else:
            dst[key] = copy.deepcopy(val)
    return dst


class _Reading:
    """One file being expanded: its key lines, where its root sits in the merged config and
    the provenance table to fill (None: not recorded)."""

    def __init__(self, file, lines, root, prov, via=''):
        self.file, self.lines, self.root, self.prov, self.via = file, lines, root, prov, via

    def origin(self, path):
        line = self.lines.get(path[len(self.root):])
        if self.via:
            return Origin('base', str(self.file), line, self.via)
        return Origin('file', str(self.file), line)

    def record(self, path, value):
        """``path`` was written in this file: it (and the list items under it) come from here;
        a mapping only marks its own line (its keys are recorded one by one)."""
        if self.prov is None:
            return
        if isinstance(value, dict):
            self.prov.setdefault(path, self.origin(path))
            return
        self.prov.replace(path, self.origin(path))  # replaces what a base said below it
        if isinstance(value, list):
            for i, item in enumerate(value):
                for k, v in (item.items() if isinstance(item, dict) else ()):
                    self.record(f'{path}[{i}].{k}', v)


def _expand(node, file, stack, files, key_path='', reading=None):
    """Resolve every ``_BASE_CONFIG_`` inside ``node`` (a mapping read from ``file``)."""
    out = {}
    if BASE_KEY in node:
        base_file = _resolve_base(node[BASE_KEY], file, key_path)
        if base_file in stack:
            chain = ' -> '.join(str(p) for p in [*stack, base_file])
            raise ConfigError(f'{file}: {key_path}{BASE_KEY} forms a cycle: {chain}')
        files.append(base_file)
        lines = {}
        base_data = _read_yaml(base_file, lines)
        via = f'{file}:{reading.lines.get(key_path[len(reading.root):] + BASE_KEY, "?")}' \
            if reading is not None else str(file)
        base_reading = _Reading(base_file, lines, key_path,
                                reading.prov if reading is not None else None, via)
        base = _expand(base_data, base_file, [*stack, base_file], files, key_path, base_reading)
        _merge(out, base)
    for key, val in node.items():
        if key == BASE_KEY:
            continue
        if not isinstance(key, str):
            raise ConfigError(f'{file}: key {key!r} under {key_path or "the top level"} '
                              'must be a string')
        path = f'{key_path}{key}'
        if reading is not None:
            reading.record(path, val)
        if isinstance(val, dict):
            val = _expand(val, file, stack, files, f'{path}.', reading)
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            _merge(out[key], val)
        else:
            out[key] = val
    return out


INTERNAL_KEYS = ('CFG_FILE', 'CFG_SEARCH_DIRS')


def load_config(path, provenance=None):
    """Load a YAML config (with its bases) into an EasyDict.

    Adds ``CFG_FILE`` (absolute path) and ``CFG_SEARCH_DIRS`` (folders of every file read,
    the including file first, then the repo root and the current directory; copied into
    ``DATA_CONFIG``) used by :func:`resolve_path`. ``provenance`` (a :class:`Provenance`),
    when given, receives the file and line of every key.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f'{path}: config file not found')
    path = path.resolve()
    files = [path]
    lines = {}
    data = _read_yaml(path, lines)
    merged = _expand(data, path, [path], files, '', _Reading(path, lines, '', provenance))
    cfg = EasyDict(merged)
    dirs = []
    for d in [*(f.parent for f in files), REPO_ROOT, Path.cwd()]:
        if d is not None and str(d) not in dirs:
            dirs.append(str(d))
    cfg.CFG_FILE = str(path)
    cfg.CFG_SEARCH_DIRS = dirs
    if isinstance(cfg.get('DATA_CONFIG'), dict):
        # datasets only see DATA_CONFIG: give it the folders its relative DATA_PATH resolves in
        cfg.DATA_CONFIG.CFG_SEARCH_DIRS = list(dirs)
    return cfg


def parse_set_value(text):
    """A ``--set`` value: a Python literal (``ast.literal_eval``, never ``eval``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


BOOL_WORDS = {'true': True, 'yes': True, 'on': True, 'false': False, 'no': False, 'off': False}


def _coerce(key, old, new, text):
    """Check a --set value against the existing one; return the value to store."""
    def mismatch():
        return ConfigError(f'--set {key}: value {new!r} is a {type(new).__name__} but the '
                           f'config holds a {type(old).__name__} ({old!r})')

    if isinstance(old, dict):
        if not isinstance(new, dict):
            raise ConfigError(f'--set {key}: {key} is a mapping; give a dict literal such as '
                              f'"{{\'A\': 1}}" or set its sub-keys ({key}.SUB VALUE)')
        return EasyDict(new)
    if old is None or new is None:
        return new
    if isinstance(old, str):
        # a string field keeps the text as typed ('001' stays '001'); a quoted literal is unquoted
        return new if isinstance(new, str) else text
    if isinstance(old, bool):
        if isinstance(new, str) and new.lower() in BOOL_WORDS:
            return BOOL_WORDS[new.lower()]  # YAML spellings: true / yes / on ...
        if not isinstance(new, bool):
            raise mismatch()
        return new
    if isinstance(new, bool):
        raise mismatch()
    if isinstance(old, int) and isinstance(new, float):
        if not new.is_integer():
            raise ConfigError(f'--set {key}: {key} is an integer; got {new!r}')
        return int(new)
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(new)
    if type(old) is type(new):
        return new
    raise mismatch()


def apply_set(cfg, pairs, declared=None, provenance=None):
    """Apply ``[KEY, VALUE, KEY, VALUE, ...]`` overrides to ``cfg``, in order.

    A key the config holds keeps its type (:func:`_coerce`). A key it does not hold is accepted
    when ``declared(cfg, parts)`` returns a parser ``f(text, key) -> value`` for it (a key some
    module's declaration knows, given the NAMEs set so far); anything else is refused.
    """
    pairs = list(pairs or [])
    if len(pairs) % 2:
        raise ConfigError(f'--set needs KEY VALUE pairs; {pairs[-1]!r} has no value')
    for key, text in zip(pairs[0::2], pairs[1::2]):
        parts = key.split('.')
        node, missing_at = cfg, None
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or not isinstance(node.get(part), dict):
                missing_at = i
                break
            node = node[part]
        if missing_at is None and isinstance(node, dict) and parts[-1] in node:
            node[parts[-1]] = _coerce(key, node[parts[-1]], parse_set_value(text), text)
        else:
            parser = declared(cfg, parts) if declared is not None else None
            if parser is None:
                raise ConfigError(f'--set {key}: no key {key!r} in the config and no module '
                                  'declares it (check the spelling; `pcdet-focal config CFG` '
                                  'lists every key)')
            value = parser(text, key)
            node = cfg
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = EasyDict()
                node = node[part]
            node[parts[-1]] = value
        if provenance is not None:
            provenance.replace(key, Origin('set'))
    return cfg


def resolve_path(path, cfg=None, field='path', must_exist=True):
    """Resolve a (data) path from a config: absolute, else relative to the config files'
    folders, the repo root, then the current directory. Returns a Path."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        cands = [p]
    else:
        dirs = list((cfg or {}).get('CFG_SEARCH_DIRS', []))
        for d in (REPO_ROOT, Path.cwd()):
            if d is not None and str(d) not in dirs:
                dirs.append(str(d))
        cands = [Path(d) / p for d in dirs]
    for cand in cands:
        if cand.exists():
            return cand.resolve()
    if must_exist:
        tried = ', '.join(str(c) for c in cands[:4])
        raise ConfigError(f'{field}: {path!r} not found (tried {tried})')
    return cands[0]


def to_plain(obj):
    """EasyDict/tuples -> plain dicts/lists (for YAML/JSON dumps and checkpoints)."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, 'tolist'):
        return obj.tolist()
    return obj


def dump_config(cfg, path):
    """Write the merged config as YAML (readable back with load_config)."""
    Path(path).write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False), encoding='utf-8')


def cfg_get(cfg, dotted, default=None):
    """``cfg_get(cfg, 'MODEL.BACKBONE_3D.NAME')`` with a default for any missing level."""
    node = cfg
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def require(cfg, key, field):
    """``cfg[key]`` or a ConfigError naming ``field.key``."""
    if cfg is None or key not in cfg:
        raise ConfigError(f'{field}.{key} is required')
    return cfg[key]
