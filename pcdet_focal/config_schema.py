"""A whole config against the module declarations (:mod:`pcdet_focal.schema`).

Which declaration governs which section: ``MODEL`` -> the detector class of MODEL.NAME,
``MODEL.<SLOT>`` -> the class its NAME registers, ``DATA_CONFIG`` -> the dataset class of
DATASET, ``OPTIMIZATION`` -> :data:`pcdet_focal.engine.optim.OPTIMIZATION_CONFIG`. A NAME that
is not one of our classes (OpenPCDet's own modules, on either host) is passed through as
written: OpenPCDet checks its own keys.

- :func:`check_config`: required sections present, every declared section parsed (unknown
  keys, types, ranges), each error prefixed with the file and line the key came from.
- :func:`declared_parser`: lets ``--set`` give a declared key the file does not hold.
- :func:`load_checked`: load + ``--set`` + check, what every CLI does first.
- :func:`describe`: the merged config with defaults filled in and each value's origin
  (``pcdet-focal config``).
- :func:`key_tables` / :func:`readme_with_tables`: the README's key tables, made from the
  declarations.
"""
import copy
import re
from pathlib import Path

from .config import INTERNAL_KEYS, Origin, Provenance, apply_set, load_config, to_plain
from .data.dataset import DATA_KEYS, foreign_keys
from .engine.optim import OPTIMIZATION_CONFIG
from .errors import ConfigError
from .registry import REGISTRIES, lookup
from .schema import REQUIRED, Schema, Section, nearest, parse_literal

MODEL_SLOTS = ('VFE', 'BACKBONE_3D', 'MAP_TO_BEV', 'BACKBONE_2D', 'DENSE_HEAD')
_SECTION_NEEDS = {
    'CLASS_NAMES': "a list of class names, e.g. ['Car', 'Pedestrian', 'Cyclist']",
    'MODEL': 'NAME (e.g. FocalCenterPoint) and its module sections (VFE, BACKBONE_3D, '
             'MAP_TO_BEV, BACKBONE_2D, DENSE_HEAD)',
    'DATA_CONFIG': 'DATASET, POINT_CLOUD_RANGE and DATA_PROCESSOR (or a _BASE_CONFIG_ such '
                   'as cfgs/dataset_configs/synthetic_dataset.yaml)',
    'OPTIMIZATION': 'BATCH_SIZE_PER_GPU, NUM_EPOCHS, OPTIMIZER and LR',
}


def _declared_class(slot, name):
    """Our class registered as ``name`` for ``slot`` when it has a declaration, else None
    (unknown names and OpenPCDet's own classes, which check their own keys)."""
    if not isinstance(name, str):
        return None
    try:
        cls = lookup(slot, name)
    except ConfigError:
        return None
    return cls if getattr(cls, 'CONFIG', None) is not None and \
        cls.__module__.startswith('pcdet_focal.') else None


def sections(cfg):
    """[(dotted section, Schema)] of the sections of ``cfg`` that we declare."""
    out = []
    model = cfg.get('MODEL')
    if isinstance(model, dict):
        cls = _declared_class('DETECTOR', model.get('NAME'))
        if cls is not None:
            out.append(('MODEL', cls.CONFIG))
        for slot in MODEL_SLOTS:
            sub = model.get(slot)
            if isinstance(sub, dict):
                cls = _declared_class(slot, sub.get('NAME'))
                if cls is not None:
                    out.append((f'MODEL.{slot}', cls.CONFIG))
    data = cfg.get('DATA_CONFIG')
    if isinstance(data, dict):
        cls = _declared_class('DATASET', data.get('DATASET'))
        if cls is not None:
            out.append(('DATA_CONFIG', cls.CONFIG))
    if isinstance(cfg.get('OPTIMIZATION'), dict):
        out.append(('OPTIMIZATION', OPTIMIZATION_CONFIG))
    return out


def _node(cfg, dotted):
    node = cfg
    for part in dotted.split('.'):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _located(err, provenance):
    """``err``'s message with the file:line of the key it names in front."""
    msg = str(err)
    match = re.match(r'(?:--set )?([A-Za-z0-9_]+(?:[.\[][A-Za-z0-9_\]]+)*)', msg)
    if provenance is None or match is None or msg.startswith('--set'):
        return msg
    path = match.group(1)
    origin = provenance.origin(path)
    while origin is None and '.' in path:      # an unknown key: its section's line
        path = path.rsplit('.', 1)[0]
        origin = provenance.origin(path)
    if origin is None or origin.kind not in ('file', 'base'):
        return msg
    return f'{origin.file}:{origin.line}: {msg}' if origin.line else f'{origin.file}: {msg}'


def check_config(cfg, provenance=None, training=True, cfg_file=None):
    """Raise one ConfigError for the first problem: a missing section, or a declared section
    that its declaration refuses (named with the file and line of the key)."""
    where = cfg_file or cfg.get('CFG_FILE', 'config')
    needed = ['CLASS_NAMES', 'MODEL', 'DATA_CONFIG'] + (['OPTIMIZATION'] if training else [])
    for name in needed:
        value = cfg.get(name)
        if value is None or (name != 'CLASS_NAMES' and not isinstance(value, dict)):
            guess = nearest(name, [k for k in cfg if k not in _SECTION_NEEDS
                                   and k not in INTERNAL_KEYS])
            hint = f' (found {guess}: a typo?)' if guess else ''
            raise ConfigError(f'{where}: {name} is missing{hint}; it needs '
                              f'{_SECTION_NEEDS[name]}')
    names = cfg.CLASS_NAMES
    if not isinstance(names, (list, tuple)) or not names or \
            not all(isinstance(n, str) for n in names):
        raise ConfigError(f'{where}: CLASS_NAMES={names!r} must be {_SECTION_NEEDS["CLASS_NAMES"]}')
    for dotted, schema in sections(cfg):
        foreign = foreign_keys(schema) if dotted == 'DATA_CONFIG' else ()
        try:
            schema.parse(_node(cfg, dotted), dotted, foreign)
        except ConfigError as err:
            raise ConfigError(_located(err, provenance)) from None


def declared_parser(cfg, parts):
    """For ``--set``: a parser ``f(text, key) -> value`` when a declaration knows the dotted key
    ``parts`` (given the NAMEs the config holds now), else None."""
    dotted = '.'.join(parts)
    for section, schema in sections(cfg):
        if dotted.startswith(section + '.'):
            key = schema.find(dotted[len(section) + 1:].split('.'))
            if key is not None and not isinstance(key.spec, Section):
                return lambda text, name, spec=key.spec: parse_literal(spec, text, name)
    return None


def load_checked(path, pairs=(), training=True, provenance=None):
    """What every CLI does first: load, apply ``--set`` (declared keys too), check."""
    prov = provenance if provenance is not None else Provenance()
    cfg = load_config(path, prov)
    apply_set(cfg, pairs or [], declared=declared_parser, provenance=prov)
    check_config(cfg, prov, training=training)
    return cfg


# ----------------------------------------------------------------------------- config view
def _fill_defaults(cfg, provenance):
    """Every declared key that the config leaves out, with its default and a 'default' origin."""
    for dotted, schema in sections(cfg):
        node = _node(cfg, dotted)
        _fill(node, schema, dotted, provenance)


def _fill(node, schema, prefix, provenance):
    for key in schema:
        path = f'{prefix}.{key.name}'
        if isinstance(key.spec, Section):
            sub = node.get(key.name)
            if sub is None:
                sub = node[key.name] = type(node)()
                provenance.record(path, Origin('default', via=schema.name))
            if isinstance(sub, dict):
                _fill(sub, key.spec.schema, path, provenance)
        elif key.name not in node and key.default not in (None, REQUIRED):
            node[key.name] = key.default
            provenance.record(path, Origin('default', via=schema.name))


def describe(cfg, provenance, root=None):
    """Lines ``KEY: value    # origin`` of the merged config, defaults filled in; ``root``: a
    folder shortened away in the file names."""
    cfg = copy.deepcopy(cfg)
    _fill_defaults(cfg, provenance)
    root = Path(root) if root is not None else None
    lines = []

    def origin_text(path):
        o = provenance.origin(path)
        if o is None:
            return ''
        text = o.describe()
        if root is not None:
            text = text.replace(str(root) + '/', '')
        return f'  # {text}'

    def walk(node, prefix, indent):
        for key, value in node.items():
            if key in INTERNAL_KEYS:
                continue
            path = f'{prefix}{key}'
            pad = '  ' * indent
            if isinstance(value, dict) and value:
                lines.append(f'{pad}{key}:{origin_text(path)}')
                walk(value, path + '.', indent + 1)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                lines.append(f'{pad}{key}:{origin_text(path)}')
                for i, item in enumerate(value):
                    lines.append(f'{pad}  - # [{i}]')
                    walk(item, f'{path}[{i}].', indent + 2)
            else:
                shown = value if isinstance(value, str) else to_plain(value)
                lines.append(f'{pad}{key}: {shown}{origin_text(path)}')
    walk(cfg, '', 0)
    return lines


# ----------------------------------------------------------------------------- README tables
def documented_classes():
    """[(title, Schema)] of every declaration the README documents, in README order; the
    DATA_CONFIG keys all datasets share once, then each dataset's own."""
    out = []
    common = {key.name for key in DATA_KEYS}
    for slot in ('VFE', 'BACKBONE_3D', 'MAP_TO_BEV', 'BACKBONE_2D', 'DENSE_HEAD', 'DETECTOR',
                 'DATASET'):
        if slot == 'DATASET':
            out.append(('`DATA_CONFIG` (every dataset)', Schema('DATA_CONFIG', DATA_KEYS)))
        seen = set()
        for name, cls in REGISTRIES[slot].items():
            if cls in seen or getattr(cls, 'CONFIG', None) is None:
                continue
            seen.add(cls)
            schema = cls.CONFIG
            if slot == 'DATASET':
                schema = Schema(schema.name, [k for k in schema if k.name not in common])
            out.append((f'{slot} `{cls.__name__}`', schema))
    out.append(('`OPTIMIZATION`', OPTIMIZATION_CONFIG))
    return out


def key_tables():
    """{title: markdown table} for the README."""
    return {title: schema.markdown() if list(schema) else '(no keys besides `NAME`)'
            for title, schema in documented_classes()}


_BEGIN = '<!-- keys: {} -->'
_END = '<!-- /keys -->'


def readme_with_tables(text):
    """``text`` with every ``<!-- keys: TITLE -->`` ... ``<!-- /keys -->`` block regenerated.
    ConfigError for a block whose TITLE no declaration has."""
    tables = key_tables()
    pattern = re.compile(r'<!-- keys: (.+?) -->\n.*?<!-- /keys -->', re.S)

    def repl(match):
        title = match.group(1)
        if title not in tables:
            raise ConfigError(f'README block "{title}" names no declared module; known: '
                              f'{", ".join(tables)}')
        return f'{_BEGIN.format(title)}\n{tables[title]}\n{_END}'
    return pattern.sub(repl, text)
