"""pcdet_focal.registry: our NAME tables and registration into a (fake) OpenPCDet.

The fake OpenPCDet (tests/fake_pcdet.py) is written into tmp_path and put on sys.path; every
test starts from "not registered yet" and the fake's modules are purged afterwards.
"""
import importlib
import logging
import subprocess
import sys

import pytest
from torch import nn

from fake_pcdet import (PCDET_TABLES, PREEXISTING, broken_pcdet, fake_pcdet,  # noqa: F401
                        no_pcdet, subprocess_env, write_fake_pcdet)
from pcdet_focal import registry
from pcdet_focal.errors import ConfigError, PcdetFocalError
from pcdet_focal.registry import REGISTRIES, PcdetNotAvailable, Registry, lookup

# Our modules that must reach OpenPCDet's tables once their owners have written them.
OURS = [('MAP_TO_BEV', 'SparseHeightCompression'), ('MAP_TO_BEV', 'PointPillarScatter3d'),
        ('BACKBONE_3D', 'DSVTDownsample'), ('BACKBONE_3D', 'FocalSSTDSVT'),
        ('BACKBONE_3D', 'FocalSSTEncoder'), ('DETECTOR', 'FocalCenterPoint')]


def pcdet_table(slot):
    return importlib.import_module(PCDET_TABLES[slot]).__all__


def snapshot():
    return {slot: dict(pcdet_table(slot)) for slot in PCDET_TABLES}


def run_python(code, env):
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          text=True, timeout=120)


# ----------------------------------------------------------------------------- Registry

def test_registry_decorator_names_aliases_and_errors():
    reg = Registry('TEST_SLOT', 'pcdet.nowhere')

    @reg.register()
    class Plain:
        pass

    @reg.register(name='Renamed', aliases=('Alias1', 'Alias2'))
    class Other:
        pass

    assert reg.register(Plain) is Plain           # re-registering the same class is a no-op
    assert reg.names() == ['Alias1', 'Alias2', 'Plain', 'Renamed']
    assert reg.get('Alias2') is Other and 'Renamed' in reg and 'Other' not in reg
    assert dict(reg.items()) == {'Alias1': Other, 'Alias2': Other, 'Plain': Plain,
                                 'Renamed': Other}
    with pytest.raises(RuntimeError, match="'Plain' registered twice"):
        @reg.register(name='Plain')
        class Clash:
            pass
    with pytest.raises(ConfigError) as err:
        reg.get('Nope', field='MODEL.X.NAME')
    msg = str(err.value)
    assert msg.startswith("MODEL.X.NAME: unknown module 'Nope'")
    assert 'Alias1, Alias2, Plain, Renamed' in msg


def test_slots_and_pcdet_module_paths_match_openpcdet():
    assert {s: r.pcdet_module for s, r in REGISTRIES.items()} == PCDET_TABLES
    for slot, reg in REGISTRIES.items():
        assert reg.slot == slot and getattr(registry, slot) is reg


def test_lookup_standalone_uses_our_tables(no_pcdet):
    for slot, reg in REGISTRIES.items():
        for name, cls in reg.items():
            assert lookup(slot, name) is cls
    with pytest.raises(ConfigError, match="MODEL.MAP_TO_BEV.NAME: unknown module 'Nope'"):
        lookup('MAP_TO_BEV', 'Nope', field='MODEL.MAP_TO_BEV.NAME')


@pytest.mark.parametrize('slot, name', OURS)
def test_our_modules_are_registered_once_written(slot, name):
    if name not in REGISTRIES[slot]:
        pytest.skip(f'{slot} {name} is not written yet')
    cls = REGISTRIES[slot].get(name)
    assert isinstance(cls, type) and issubclass(cls, nn.Module)
    assert cls.__module__.startswith('pcdet_focal.models.')


# ----------------------------------------------------------------------------- import hygiene

def test_importing_pcdet_focal_never_imports_pcdet(tmp_path):
    """Even with OpenPCDet importable, importing our package (and every module that registers
    classes) must leave pcdet alone: its import needs compiled CUDA ops."""
    root = write_fake_pcdet(tmp_path / 'fake')
    code = (
        'import sys\n'
        'import pcdet_focal, pcdet_focal.registry, pcdet_focal.config, pcdet_focal.builder\n'
        'import pcdet_focal.backend, pcdet_focal.run, pcdet_focal.cli, pcdet_focal.doctor\n'
        'pcdet_focal.registry.load_all()\n'
        'print(sorted(m for m in sys.modules if m == "pcdet" or m.startswith("pcdet.")))\n'
        'print(pcdet_focal.registry.pcdet_available())\n'
    )
    out = run_python(code, subprocess_env(root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split('\n')[:2] == ['[]', 'True']


def test_import_works_without_pcdet(tmp_path):
    code = ('import pcdet_focal, pcdet_focal.registry as r\n'
            'r.load_all()\n'
            'print(r.pcdet_available())\n')
    out = run_python(code, subprocess_env())
    if out.stdout.strip() == 'True':
        pytest.skip('a real OpenPCDet is installed here')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'False'


# ----------------------------------------------------------------------------- registration

def test_register_adds_ours_and_reports_exactly_what_it_added(fake_pcdet):
    before = snapshot()
    assert {s: set(t) for s, t in before.items()} == PREEXISTING
    added = registry.register_into_pcdet()
    after = snapshot()
    expected = {}
    for slot, reg in REGISTRIES.items():
        for name, cls in reg.items():
            assert name in after[slot], f'{slot} {name} missing from OpenPCDet'
            if name in before[slot]:
                assert after[slot][name] is before[slot][name]  # OpenPCDet's stays
            else:
                assert after[slot][name] is cls
                expected.setdefault(slot, []).append(name)
        # nothing else appeared or vanished
        assert set(after[slot]) == set(before[slot]) | set(reg.names())
    assert added == {slot: sorted(names) for slot, names in expected.items()}


def test_register_is_idempotent(fake_pcdet):
    first = registry.register_into_pcdet()
    tables = snapshot()
    assert registry.register_into_pcdet() == {}
    assert snapshot() == tables
    assert sum(len(v) for v in first.values()) == \
        sum(len(set(reg.names()) - PREEXISTING[s]) for s, reg in REGISTRIES.items())


def test_register_never_overwrites_openpcdet_entries(fake_pcdet):
    import pcdet.datasets
    import pcdet.models.backbones_2d
    import pcdet.models.backbones_2d.map_to_bev
    import pcdet.models.backbones_3d
    import pcdet.models.backbones_3d.vfe
    import pcdet.models.dense_heads
    import pcdet.models.detectors
    theirs = {
        ('VFE', 'MeanVFE'): pcdet.models.backbones_3d.vfe.MeanVFE,
        ('BACKBONE_3D', 'DSVT'): pcdet.models.backbones_3d.DSVT,
        ('MAP_TO_BEV', 'HeightCompression'): pcdet.models.backbones_2d.map_to_bev.HeightCompression,
        ('BACKBONE_2D', 'BaseBEVBackbone'): pcdet.models.backbones_2d.BaseBEVBackbone,
        ('DENSE_HEAD', 'CenterHead'): pcdet.models.dense_heads.CenterHead,
        ('DETECTOR', 'CenterPoint'): pcdet.models.detectors.CenterPoint,
        ('DATASET', 'KittiDataset'): pcdet.datasets.KittiDataset,
    }
    added = registry.register_into_pcdet()
    for (slot, name), cls in theirs.items():
        assert pcdet_table(slot)[name] is cls
        assert name not in added.get(slot, [])


@pytest.mark.parametrize('slot, name', OURS)
def test_named_modules_reach_openpcdet(fake_pcdet, slot, name):
    if name not in REGISTRIES[slot]:
        pytest.skip(f'{slot} {name} is not written yet')
    added = registry.register_into_pcdet()
    assert name in added[slot]
    assert pcdet_table(slot)[name] is REGISTRIES[slot].get(name)


def test_register_logs_added_and_kept(fake_pcdet, caplog):
    with caplog.at_level(logging.INFO, logger='pcdet_focal.registry'):
        added = registry.register_into_pcdet()
    text = caplog.text
    for slot, names in added.items():
        assert f'registered {slot} into OpenPCDet: {", ".join(names)}' in text
    if 'CenterHead' in REGISTRIES['DENSE_HEAD']:
        assert 'OpenPCDet keeps its own DENSE_HEAD: CenterHead' in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='pcdet_focal.registry'):
        registry.register_into_pcdet(verbose=False)
    assert caplog.text == ''


def test_top_level_register_into_pcdet_is_the_registry_one(fake_pcdet):
    import pcdet_focal
    added = pcdet_focal.register_into_pcdet(verbose=False)
    assert added == {s: sorted(set(r.names()) - PREEXISTING[s])
                     for s, r in REGISTRIES.items() if set(r.names()) - PREEXISTING[s]}


def test_register_without_pcdet_raises_exit_code_2(no_pcdet):
    with pytest.raises(PcdetNotAvailable) as err:
        registry.register_into_pcdet()
    assert isinstance(err.value, PcdetFocalError) and err.value.exit_code == 2
    msg = str(err.value)
    assert 'OpenPCDet is not importable' in msg and 'pip install' in msg and '\n' not in msg
    assert registry._pcdet_host is False
    assert registry.pcdet_available() is False


def test_register_with_unbuilt_ops_says_so(broken_pcdet):
    assert registry.pcdet_available() is True  # the package is there...
    with pytest.raises(PcdetNotAvailable) as err:
        registry.register_into_pcdet()      # ...but pcdet.models cannot import
    msg = str(err.value)
    assert 'OpenPCDet found but' in msg and 'iou3d_nms_cuda' in msg
    assert 'setup.py develop' in msg and err.value.exit_code == 2


def test_register_refuses_a_registry_that_is_not_a_dict(fake_pcdet, monkeypatch):
    import pcdet.models.dense_heads as heads
    monkeypatch.setattr(heads, '__all__', ['CenterHead'])
    with pytest.raises(PcdetNotAvailable, match=r'pcdet.models.dense_heads.__all__ is not a dict'):
        registry.register_into_pcdet()


# ----------------------------------------------------------------------------- lookup as host

def test_lookup_resolves_through_openpcdet_after_registration(fake_pcdet):
    import pcdet.models.dense_heads
    if 'CenterHead' in REGISTRIES['DENSE_HEAD']:
        assert lookup('DENSE_HEAD', 'CenterHead') is REGISTRIES['DENSE_HEAD'].get('CenterHead')
    with pytest.raises(ConfigError):
        lookup('DETECTOR', 'CenterPoint')  # OpenPCDet's, invisible before registration
    registry.register_into_pcdet()
    # OpenPCDet's own class wins for a shared name; its other names become visible
    assert lookup('DENSE_HEAD', 'CenterHead') is pcdet.models.dense_heads.CenterHead
    assert lookup('DETECTOR', 'CenterPoint') is pcdet_table('DETECTOR')['CenterPoint']
    for slot, reg in REGISTRIES.items():
        for name in reg.names():
            assert lookup(slot, name) is pcdet_table(slot)[name]
    # entries added to OpenPCDet's tables later (a user's module) are found too
    class UserHead(nn.Module):
        pass
    pcdet_table('DENSE_HEAD')['UserHead'] = UserHead
    assert lookup('DENSE_HEAD', 'UserHead') is UserHead


def test_lookup_unknown_name_lists_openpcdet_and_our_names(fake_pcdet):
    registry.register_into_pcdet()
    with pytest.raises(ConfigError) as err:
        lookup('MAP_TO_BEV', 'Nope', field='MODEL.MAP_TO_BEV.NAME')
    msg = str(err.value)
    assert msg.startswith("MODEL.MAP_TO_BEV.NAME: unknown module 'Nope'")
    assert 'OpenPCDet + pcdet_focal' in msg
    for name in set(REGISTRIES['MAP_TO_BEV'].names()) | PREEXISTING['MAP_TO_BEV']:
        assert name in msg


# ----------------------------------------------------------------------------- plugins

def test_plugins_env_var_registers_extra_modules(tmp_path):
    (tmp_path / 'my_plugin.py').write_text(
        'from torch import nn\n'
        'from pcdet_focal.registry import MAP_TO_BEV\n'
        '@MAP_TO_BEV.register()\n'
        'class MyScatter(nn.Module):\n'
        '    pass\n')
    env = subprocess_env(tmp_path)
    env['PCDET_FOCAL_PLUGINS'] = ' my_plugin , '
    code = ('from pcdet_focal.registry import lookup\n'
            'print(lookup("MAP_TO_BEV", "MyScatter").__module__)\n')
    out = run_python(code, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'my_plugin'
    env['PCDET_FOCAL_PLUGINS'] = 'no_such_plugin_module'
    out = run_python(code, env)
    assert out.returncode != 0 and 'no_such_plugin_module' in out.stderr


# ----------------------------------------------------------------------------- fixed bugs

def test_load_all_failure_is_not_silenced_on_the_next_call(tmp_path):
    env = subprocess_env(tmp_path)
    env['PCDET_FOCAL_PLUGINS'] = 'no_such_plugin_module'
    code = ('from pcdet_focal import registry\n'
            'for attempt in range(2):\n'
            '    try:\n'
            '        registry.load_all()\n'
            '        print("loaded")\n'
            '    except ImportError:\n'
            '        print("ImportError")\n')
    out = run_python(code, env)
    assert out.stdout.split() == ['ImportError', 'ImportError'], out.stdout + out.stderr


def test_missing_openpcdet_dependency_names_the_package_to_install(fake_pcdet, monkeypatch):
    monkeypatch.setitem(sys.modules, 'SharedArray', None)  # missing even where it is installed
    init = fake_pcdet / 'pcdet' / 'datasets' / '__init__.py'
    init.write_text('import SharedArray  # noqa\n' + init.read_text())
    with pytest.raises(PcdetNotAvailable) as err:
        registry.register_into_pcdet()
    msg = str(err.value)
    assert 'SharedArray' in msg and 'pip install' in msg  # the module, not the CUDA ops
    assert 'setup.py develop' not in msg
