"""Config declarations: each module declares its keys once, beside its code; one layer checks them.

A module (or dataset, or the OPTIMIZATION block) declares its section::

    CONFIG = Schema('SparseHeightCompression', [
        Key('MODE', Choice('max', 'mean', 'learned'), 'max', 'how a BEV column is reduced'),
        Key('NUM_BEV_FEATURES', Int(lo=1), None, 'output channels F'),
    ])

and reads it once, at construction::

    cfg = self.CONFIG.parse(model_cfg, 'MODEL.MAP_TO_BEV')   # EasyDict, defaults filled in
    cfg.MODE, cfg.NUM_BEV_FEATURES

``parse`` checks every declared key (type, range, allowed values; ``REQUIRED`` ones present)
and refuses keys the declaration does not know (``MODEL.MAP_TO_BEV.MODEE: unknown key; did you
mean MODE?``). The same declarations serve ``--set`` (a declared key may be set even when the
file does not hold it), ``pcdet-focal config`` (defaults shown with their origin) and the
README's key tables (``pcdet-focal config --keys``).

Unknown keys are errors unless :func:`allow_unknown_keys` (the CLIs' ``--allow-unknown-keys``, or
the environment variable ``PCDET_FOCAL_ALLOW_UNKNOWN_KEYS=1`` for OpenPCDet's own scripts) turns
them into one warning each. Every error is a :class:`~pcdet_focal.errors.ConfigError` naming the
key path, the value and the fix.
"""
import difflib
import logging
import math
import os
from dataclasses import dataclass

from easydict import EasyDict

from .config import BOOL_WORDS, INTERNAL_KEYS, parse_set_value
from .errors import ConfigError

logger = logging.getLogger('pcdet_focal')


class _Required:
    def __repr__(self):
        return 'required'


REQUIRED = _Required()
_unknown_policy = {'warn': os.environ.get('PCDET_FOCAL_ALLOW_UNKNOWN_KEYS', '') not in ('', '0')}
_warned = set()


def allow_unknown_keys(allow=True):
    """Unknown keys warn (``True``) or raise (``False``, the default); returns the old setting."""
    old = _unknown_policy['warn']
    _unknown_policy['warn'] = bool(allow)
    return old


def nearest(name, known):
    """The declared key ``name`` most likely meant (case first, then spelling), or None."""
    known = list(known)
    for k in known:
        if k.lower() == str(name).lower():
            return k
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(str(name).upper(), [k.upper() for k in known], n=1,
                                          cutoff=0.6)
        close = [k for k in known if close and k.upper() == close[0]]
    return close[0] if close else None


def unknown_key_message(path, name, known):
    guess = nearest(name, known)
    hint = f'did you mean {guess}?' if guess else f'known keys: {", ".join(sorted(known))}'
    return f'{path}.{name}: unknown key; {hint}'


def report_unknown(message):
    """Raise, or warn once, per the unknown-keys policy."""
    if not _unknown_policy['warn']:
        raise ConfigError(message + ' (--allow-unknown-keys turns this into a warning)')
    if message not in _warned:
        _warned.add(message)
        logger.warning('%s (ignored: --allow-unknown-keys)', message)


# ----------------------------------------------------------------------------- value specs
class Spec:
    """How one value is checked. ``check`` returns the value to use (e.g. an int for 2.0)."""

    def check(self, value, path):
        return value

    def describe(self):
        return 'any'

    def fail(self, value, path, what=None):
        raise ConfigError(f'{path}={value!r} must be {what or self.describe()}')


class AnyValue(Spec):
    """Accepted as written (e.g. OpenPCDet keys our implementation does not use)."""


class Int(Spec):
    def __init__(self, lo=None, hi=None, odd=False):
        self.lo, self.hi, self.odd = lo, hi, odd

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            self.fail(value, path)
        value = int(value)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi) \
                or (self.odd and value % 2 == 0):
            self.fail(value, path)
        return value

    def describe(self):
        kind = 'an odd integer' if self.odd else 'an integer'
        if self.lo is not None and self.hi is not None:
            return f'{kind} in [{self.lo}, {self.hi}]'
        if self.lo is not None:
            return f'{kind} >= {self.lo}'
        if self.hi is not None:
            return f'{kind} <= {self.hi}'
        return kind


class Float(Spec):
    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            self.fail(value, path)
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if low or high:
            self.fail(value, path)
        return float(value)

    def describe(self):
        if self.lo is None and self.hi is None:
            return 'a number'
        left = '(' if self.lo_open else '['
        right = ')' if self.hi_open else ']'
        lo = '-inf' if self.lo is None else f'{self.lo:g}'
        hi = 'inf' if self.hi is None else f'{self.hi:g}'
        if self.hi is None:
            return f'a number {">" if self.lo_open else ">="} {lo}'
        return f'a number in {left}{lo}, {hi}{right}'


class Bool(Spec):
    def check(self, value, path):
        if not isinstance(value, bool):
            self.fail(value, path)
        return value

    def describe(self):
        return 'true or false'


class Str(Spec):
    def check(self, value, path):
        if not isinstance(value, str) or not value:
            self.fail(value, path)
        return value

    def describe(self):
        return 'a non-empty string'


class Choice(Spec):
    """One of ``values``; ``lower``: compared and returned in lower case."""

    def __init__(self, *values, lower=False):
        self.values, self.lower = tuple(values), lower

    def check(self, value, path):
        probe = value.lower() if self.lower and isinstance(value, str) else value
        if probe not in self.values:
            raise ConfigError(f'{path}={value!r} is not one of {", ".join(map(str, self.values))}')
        return probe

    def describe(self):
        return 'one of ' + ', '.join(f'`{v}`' for v in self.values)


class ListOf(Spec):
    """A list of ``item`` values; ``length`` exact, or ``min_len``."""

    def __init__(self, item, length=None, min_len=None, what=None):
        self.item, self.length, self.min_len, self.what = item, length, min_len, what

    def check(self, value, path):
        if not isinstance(value, (list, tuple)):
            self.fail(value, path)
        if self.length is not None and len(value) != self.length:
            self.fail(value, path)
        if self.min_len is not None and len(value) < self.min_len:
            self.fail(value, path)
        return [self.item.check(v, f'{path}[{i}]') for i, v in enumerate(value)]

    def describe(self):
        if self.what:
            return self.what
        n = f'{self.length} ' if self.length is not None else (
            'a non-empty list of ' if self.min_len == 1 else 'a list of ')
        inner = self.item.describe()
        if self.length is not None:
            return f'a list of {n}values, each {inner}'
        return f'{n}values, each {inner}'


class Range(Spec):
    """[min, max] numbers with min <= max (``lo``: both above it); ``symmetric_scalar``: a
    single number a means [-|a|, |a|] (OpenPCDet's rotation ranges)."""

    def __init__(self, lo=None, symmetric_scalar=False):
        self.lo, self.symmetric_scalar = lo, symmetric_scalar

    def check(self, value, path):
        if self.symmetric_scalar and isinstance(value, (int, float)) and \
                not isinstance(value, bool):
            value = [-abs(value), abs(value)]
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value)
        if not ok or value[0] > value[1] or (self.lo is not None and value[0] <= self.lo):
            self.fail(value, path)
        return [float(v) for v in value]

    def describe(self):
        low = f' above {self.lo:g}' if self.lo is not None else ''
        return f'[min, max] with min <= max{low}' + \
            (' (a number a: [-a, a])' if self.symmetric_scalar else '')


def Triple(lo=1, what='[x, y, z]'):
    """Three integers >= lo, x, y, z order."""
    return ListOf(Int(lo=lo), length=3, what=f'three integers >= {lo} {what}')


class PerSplit(Spec):
    """``{'train': v, 'test': v}`` (OpenPCDet's per-split values); ``allow_scalar``: one value
    for both splits is accepted too."""

    SPLITS = ('train', 'test')

    def __init__(self, item, allow_scalar=False):
        self.item, self.allow_scalar = item, allow_scalar

    def check(self, value, path):
        if self.allow_scalar and not isinstance(value, dict):
            value = {s: value for s in self.SPLITS}
        if not isinstance(value, dict):
            self.fail(value, path)
        out = {}
        for key, v in value.items():
            if key not in self.SPLITS:
                report_unknown(unknown_key_message(path, key, self.SPLITS))
                continue
            out[key] = self.item.check(v, f'{path}.{key}')
        missing = [s for s in self.SPLITS if s not in out]
        if missing:
            raise ConfigError(f'{path} needs a {missing[0]!r} entry ({{train: .., test: ..}}), '
                              f'got {dict(value)}')
        return EasyDict(out)

    def describe(self):
        return f'{{train, test}}: {self.item.describe()}'


class Section(Spec):
    """A nested mapping with its own declaration (``expand``: list its keys in the parent's
    key table; False when that declaration has a table of its own)."""

    def __init__(self, schema, expand=True):
        self.schema, self.expand = schema, expand

    def check(self, value, path):
        return self.schema.parse(value, path)

    def describe(self):
        return f'a mapping ({self.schema.name} keys)'


class MapOf(Spec):
    """A mapping of free names to ``item`` values (e.g. HEAD_DICT)."""

    def __init__(self, item, what=None):
        self.item, self.what = item, what

    def check(self, value, path):
        if not isinstance(value, dict):
            self.fail(value, path, 'a mapping')
        return EasyDict({k: self.item.check(v, f'{path}.{k}') for k, v in value.items()})

    def describe(self):
        return self.what or f'a mapping of names to {self.item.describe()}'


class Steps(Spec):
    """A list of ``{NAME: step, ...}`` mappings (DATA_PROCESSOR, AUG_CONFIG_LIST); each step's
    keys come from ``schemas[NAME]``; a NAME mapped to None is accepted as written, and so is
    any other NAME when ``others_ok`` (the consumer says what it does with it)."""

    def __init__(self, schemas, what, others_ok=False):
        self.schemas, self.what, self.others_ok = dict(schemas), what, others_ok

    def check(self, value, path):
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            self.fail(value, path, f'a list of {self.what} steps (- NAME: ...)')
        out = []
        for i, step in enumerate(value):
            where = f'{path}[{i}]'
            name = step.get('NAME') if isinstance(step, dict) else None
            if not name:
                raise ConfigError(f'{where} needs a NAME (one of {", ".join(self.schemas)})')
            if name not in self.schemas and self.others_ok:
                out.append(EasyDict(step))
                continue
            if name not in self.schemas:
                raise ConfigError(f'{where}.NAME={name!r} is not a known {self.what} step; known:'
                                  f' {", ".join(self.schemas)}')
            schema = self.schemas[name]
            out.append(EasyDict(step) if schema is None else schema.parse(step, where))
        return out

    def describe(self):
        return f'a list of steps: {", ".join(self.schemas)}'


# ----------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Key:
    """One config key: ``spec`` checks a value; ``default`` is used when the key is absent
    (``REQUIRED``: it must be given; ``None``: optional, absent stays None); ``nullable``: an
    explicit ``null`` is a meaningful value (e.g. "no cap")."""

    name: str
    spec: Spec
    default: object = None
    doc: str = ''
    nullable: bool = False

    def check(self, value, path):
        if value is None and (self.nullable or self.default is None):
            return None
        return self.spec.check(value, f'{path}.{self.name}')


class Schema:
    """The declared keys of one config section (``NAME`` is always accepted)."""

    def __init__(self, name, keys, doc=''):
        self.name, self.doc = name, doc
        self.keys = {k.name: k for k in keys}
        if len(self.keys) != len(keys):
            raise ValueError(f'{name}: a key is declared twice')

    def __iter__(self):
        return iter(self.keys.values())

    def __contains__(self, name):
        return name in self.keys or name == 'NAME'

    def known(self):
        return ['NAME', *self.keys]

    def parse(self, cfg, path, foreign=()):
        """Check ``cfg`` (a mapping) against the declaration; returns an EasyDict holding every
        declared key (defaults filled in) plus NAME when given. ``foreign``: keys that belong
        to a sibling declaration (another dataset's keys in a shared DATA_CONFIG): ignored."""
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise ConfigError(f'{path} must be a mapping of {self.name} keys, got '
                              f'{type(cfg).__name__} {cfg!r}')
        for name in cfg:
            if name not in self and name not in INTERNAL_KEYS and name not in foreign:
                report_unknown(unknown_key_message(path, name, self.known()))
        out = EasyDict()
        if 'NAME' in cfg:
            out.NAME = cfg['NAME']
        for key in self:
            given = cfg.get(key.name)
            if key.name in cfg and (given is not None or key.nullable or key.default is None):
                out[key.name] = key.check(given, path)
            elif key.default is REQUIRED:
                doc = f' ({key.doc})' if key.doc else ''
                raise ConfigError(f'{path}.{key.name} is required{doc}')
            elif isinstance(key.spec, Section) and key.default is None:
                out[key.name] = key.spec.check({}, f'{path}.{key.name}')  # its defaults
            else:
                out[key.name] = _copy(key.default)
        return out

    def find(self, parts):
        """The Key at the dotted path ``parts`` (list) inside this section, or None."""
        key = self.keys.get(parts[0])
        if key is None:
            return None
        if len(parts) == 1:
            return key
        if isinstance(key.spec, Section):
            return key.spec.schema.find(parts[1:])
        return None

    def rows(self, prefix=''):
        """(dotted key, type, default, doc) for every key; nested sections, the items of a
        MapOf sections and the steps of a Steps list expanded."""
        out = []
        for key in self:
            name = f'{prefix}{key.name}'
            spec = key.spec
            if isinstance(spec, Section):
                out.append((name, 'mapping', '**required**' if key.default is REQUIRED else '',
                            key.doc))
                if spec.expand:
                    out += spec.schema.rows(f'{name}.')
                continue
            if isinstance(spec, MapOf) and isinstance(spec.item, Section):
                out.append((name, spec.describe(), '', key.doc))
                out += spec.item.schema.rows(f'{name}.<name>.')
                continue
            if isinstance(spec, Steps):
                out.append((name, spec.describe(), '', key.doc))
                for step, schema in spec.schemas.items():
                    if schema is not None:
                        out += schema.rows(f'{name}[{step}].')
                continue
            default = '**required**' if key.default is REQUIRED else (
                '' if key.default is None else _fmt(key.default))
            if key.nullable and key.default is not None:
                default += ' (null: off)'
            out.append((name, key.spec.describe(), default, key.doc))
        return out

    def markdown(self, prefix=''):
        lines = ['| key | type | default | meaning |', '|---|---|---|---|']
        for row in self.rows(prefix):
            name, kind, default, doc = (str(v).replace('|', '\\|').replace('\n', ' ')
                                        for v in row)
            lines.append(f'| `{name}` | {kind} | {default} | {doc} |')
        return '\n'.join(lines)


def _copy(value):
    if isinstance(value, dict):
        return EasyDict({k: _copy(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _fmt(value):
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_fmt(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {_fmt(v)}' for k, v in value.items()) + '}'
    return str(value)


def parse_literal(spec, text, path):
    """A ``--set`` value for a declared key absent from the file: the literal, checked."""
    value = parse_set_value(text)
    if isinstance(spec, (Str, Choice)) and not isinstance(value, str):
        value = text
    if isinstance(spec, Bool) and isinstance(value, str) and value.lower() in BOOL_WORDS:
        value = BOOL_WORDS[value.lower()]    # YAML's spellings: true / yes / on ...
    if isinstance(spec, Section):
        raise ConfigError(f'--set {path}: {path} is a section; set its keys ({path}.KEY VALUE)')
    return spec.check(value, path)
