"""OpenPCDet-style YAML configs: ``_BASE_CONFIG_`` inheritance, ``--set`` overrides, paths.

- :func:`load_config` reads YAML with ``yaml.safe_load`` only (python tags are refused, never
  executed) into an EasyDict. ``_BASE_CONFIG_: path`` may appear in any mapping; the base is
  loaded first and the including mapping's keys are merged on top (recursively). A base path is
  resolved relative to the including file's folder, then that folder's parents, then the repo
  root, then the current directory; a base may have its own base; cycles are an error.
- :func:`apply_set` applies ``--set KEY.SUB VALUE ...`` pairs to existing keys only, parsing
  values with ``ast.literal_eval`` (anything that does not parse stays a string).
- :func:`resolve_path` finds a data path relative to the config files, the repo root or cwd.

Every error is a :class:`ConfigError` naming the file (and line, for YAML errors) or the key.
"""
import ast
import copy
import os
from pathlib import Path

import yaml
from easydict import EasyDict

from .errors import ConfigError

BASE_KEY = '_BASE_CONFIG_'
_PKG_ROOT = Path(__file__).resolve().parents[1]
# The repository root when running from a checkout (editable install); None for a wheel install.
REPO_ROOT = _PKG_ROOT if (_PKG_ROOT / 'cfgs').is_dir() else None


def _read_yaml(path):
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


def _expand(node, file, stack, files, key_path=''):
    """Resolve every ``_BASE_CONFIG_`` inside ``node`` (a mapping read from ``file``)."""
    out = {}
    if BASE_KEY in node:
        base_file = _resolve_base(node[BASE_KEY], file, key_path)
        if base_file in stack:
            chain = ' -> '.join(str(p) for p in [*stack, base_file])
            raise ConfigError(f'{file}: {key_path}{BASE_KEY} forms a cycle: {chain}')
        files.append(base_file)
        base = _expand(_read_yaml(base_file), base_file, [*stack, base_file], files)
        _merge(out, base)
    for key, val in node.items():
        if key == BASE_KEY:
            continue
        if not isinstance(key, str):
            raise ConfigError(f'{file}: key {key!r} under {key_path or "the top level"} '
                              'must be a string')
        if isinstance(val, dict):
            val = _expand(val, file, stack, files, f'{key_path}{key}.')
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            _merge(out[key], val)
        else:
            out[key] = val
    return out


def load_config(path):
    """Load a YAML config (with its bases) into an EasyDict.

    Adds ``CFG_FILE`` (absolute path) and ``CFG_SEARCH_DIRS`` (folders of every file read,
    the including file first, then the repo root and the current directory; copied into
    ``DATA_CONFIG``) used by :func:`resolve_path`.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f'{path}: config file not found')
    path = path.resolve()
    files = [path]
    merged = _expand(_read_yaml(path), path, [path], files)
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


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


_BOOL_WORDS = {'true': True, 'false': False, 'yes': True, 'no': False}


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
        if isinstance(new, str) and new.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[new.lower()]  # YAML spellings: true / false / yes / no
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


def apply_set(cfg, pairs):
    """Apply ``[KEY, VALUE, KEY, VALUE, ...]`` overrides to existing keys of ``cfg``."""
    pairs = list(pairs or [])
    if len(pairs) % 2:
        raise ConfigError(f'--set needs KEY VALUE pairs; {pairs[-1]!r} has no value')
    for key, text in zip(pairs[0::2], pairs[1::2]):
        node = cfg
        parts = key.split('.')
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f'--set {key}: no key {".".join(parts[:i + 1])!r} in the '
                                  'config (--set changes existing keys only)')
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f'--set {key}: no key {key!r} in the config (--set changes '
                              'existing keys only)')
        node[leaf] = _coerce(key, node[leaf], _parse_value(text), text)
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
