"""NAME -> class tables, one per config slot, and registration into OpenPCDet.

Every model or dataset class registers itself with a decorator::

    @MAP_TO_BEV.register()
    class SparseHeightCompression(nn.Module): ...

The standalone builder resolves ``MODEL.<SLOT>.NAME`` through :func:`lookup`. Inside an
OpenPCDet checkout, :func:`register_into_pcdet` inserts our classes into OpenPCDet's module-level
``__all__`` dicts (read by its ``build_network``), never replacing a name OpenPCDet already has.
Importing this module never imports OpenPCDet.
"""
import importlib
import importlib.util
import logging
import os

from .errors import ConfigError, PcdetFocalError

logger = logging.getLogger(__name__)

# Modules whose import registers classes. Kept explicit so a typo or a broken module is an
# ImportError, not a silently missing NAME.
_CLASS_MODULES = (
    'pcdet_focal.models.vfe',
    'pcdet_focal.models.map_to_bev',
    'pcdet_focal.models.dsvt',
    'pcdet_focal.models.focal_sst',
    'pcdet_focal.models.bev_backbone',
    'pcdet_focal.models.center_head',
    'pcdet_focal.models.detector',
    'pcdet_focal.data.synthetic',
    'pcdet_focal.data.kitti',
)


class Registry:
    """A NAME -> class table for one config slot (e.g. ``MAP_TO_BEV``)."""

    def __init__(self, slot, pcdet_module):
        self.slot = slot
        self.pcdet_module = pcdet_module  # where OpenPCDet keeps this slot's `__all__`
        self._table = {}

    def register(self, cls=None, *, name=None, aliases=()):
        """Class decorator: ``@REG.register()`` or ``@REG.register(name='X', aliases=('Y',))``."""

        def add(klass):
            for key in (name or klass.__name__, *aliases):
                other = self._table.get(key)
                if other is not None and other is not klass:
                    raise RuntimeError(f'{self.slot} name {key!r} registered twice: '
                                       f'{other.__module__}.{other.__name__} and '
                                       f'{klass.__module__}.{klass.__name__}')
                self._table[key] = klass
            return klass

        return add(cls) if cls is not None else add

    def names(self):
        load_all()
        return sorted(self._table)

    def items(self):
        load_all()
        return sorted(self._table.items())

    def get(self, name, field=None):
        """Class registered under ``name``; ConfigError listing the known names otherwise."""
        load_all()
        if name not in self._table:
            where = field or f'{self.slot}.NAME'
            raise ConfigError(f'{where}: unknown module {name!r}; known {self.slot} modules: '
                              f'{", ".join(sorted(self._table)) or "(none)"}')
        return self._table[name]

    def __contains__(self, name):
        load_all()
        return name in self._table


VFE = Registry('VFE', 'pcdet.models.backbones_3d.vfe')
BACKBONE_3D = Registry('BACKBONE_3D', 'pcdet.models.backbones_3d')
MAP_TO_BEV = Registry('MAP_TO_BEV', 'pcdet.models.backbones_2d.map_to_bev')
BACKBONE_2D = Registry('BACKBONE_2D', 'pcdet.models.backbones_2d')
DENSE_HEAD = Registry('DENSE_HEAD', 'pcdet.models.dense_heads')
DETECTOR = Registry('DETECTOR', 'pcdet.models.detectors')
DATASET = Registry('DATASET', 'pcdet.datasets')

REGISTRIES = {r.slot: r for r in (VFE, BACKBONE_3D, MAP_TO_BEV, BACKBONE_2D, DENSE_HEAD,
                                  DETECTOR, DATASET)}

_loaded = False
_pcdet_host = False  # True once our classes live in OpenPCDet's tables (see lookup)


def load_all():
    """Import every module that registers classes (once).

    Extra modules named in the environment variable ``PCDET_FOCAL_PLUGINS`` (comma-separated
    import paths) are imported too, so a project can register its own modules for our tools.
    """
    global _loaded
    if _loaded:
        return
    plugins = [m.strip() for m in os.environ.get('PCDET_FOCAL_PLUGINS', '').split(',')]
    for module in (*_CLASS_MODULES, *filter(None, plugins)):
        importlib.import_module(module)
    _loaded = True  # only once every import succeeded: a failure repeats on the next call


class PcdetNotAvailable(PcdetFocalError):
    """OpenPCDet cannot be imported (or its compiled parts are missing)."""

    exit_code = 2


def _import_pcdet_module(path):
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as err:
        missing = err.name or ''
        if missing == 'pcdet' or (missing.startswith('pcdet.') and path.startswith(missing)):
            raise PcdetNotAvailable(
                f'OpenPCDet is not importable ({path}): install it in this environment '
                '(git clone https://github.com/open-mmlab/OpenPCDet && cd OpenPCDet && '
                'pip install -e .) or run our standalone tools/train.py') from None
        if missing and not missing.startswith('pcdet'):
            raise PcdetNotAvailable(
                f'OpenPCDet found but {path} needs the missing Python package {missing!r}: '
                'pip install it (see OpenPCDet\'s requirements.txt)') from None
        raise PcdetNotAvailable(
            f'OpenPCDet found but {path} failed to import ({err}); build its CUDA ops in the '
            'checkout (python setup.py develop) or run our standalone tools') from None
    except ImportError as err:
        raise PcdetNotAvailable(
            f'OpenPCDet found but {path} failed to import ({err}); build its CUDA ops in the '
            'checkout (python setup.py develop) or run our standalone tools') from None


def pcdet_available():
    """True when ``pcdet`` (OpenPCDet) can be imported in this environment."""
    return importlib.util.find_spec('pcdet') is not None


def register_into_pcdet(verbose=True):
    """Insert our classes into OpenPCDet's registries; returns ``{slot: [names added]}``.

    Idempotent; never replaces an entry OpenPCDet already has (its own CenterHead stays its
    own). Raises :class:`PcdetNotAvailable` (exit code 2) when OpenPCDet cannot be imported.
    """
    global _pcdet_host
    load_all()
    added, kept = {}, {}
    tables = {}  # import every table first: registration is all-or-nothing
    for slot, reg in REGISTRIES.items():
        table = getattr(_import_pcdet_module(reg.pcdet_module), '__all__', None)
        if not isinstance(table, dict):
            raise PcdetNotAvailable(f'{reg.pcdet_module}.__all__ is not a dict: this OpenPCDet '
                                    'version keeps its registry elsewhere')
        tables[slot] = table
    for slot, reg in REGISTRIES.items():
        table = tables[slot]
        for name, cls in sorted(reg._table.items()):
            if name not in table:
                table[name] = cls
                added.setdefault(slot, []).append(name)
            elif table[name] is not cls:
                kept.setdefault(slot, []).append(name)
    _pcdet_host = True
    if verbose:
        for slot, names in added.items():
            logger.info('pcdet_focal: registered %s into OpenPCDet: %s', slot, ', '.join(names))
        for slot, names in kept.items():
            logger.info('pcdet_focal: OpenPCDet keeps its own %s: %s', slot, ', '.join(names))
    return added


def lookup(slot, name, field=None):
    """Resolve a config NAME for ``slot``.

    Standalone: our table. After :func:`register_into_pcdet`: OpenPCDet's table (ours were
    inserted there), so configs can mix OpenPCDet's modules with ours.
    """
    reg = REGISTRIES[slot]
    if _pcdet_host:
        table = _import_pcdet_module(reg.pcdet_module).__all__
        if name in table:
            return table[name]
        known = ', '.join(sorted(table))
        raise ConfigError(f'{field or slot + ".NAME"}: unknown module {name!r}; known {slot} '
                          f'modules (OpenPCDet + pcdet_focal): {known}')
    return reg.get(name, field)
