"""pcdet_focal.config: YAML loading with _BASE_CONFIG_, --set overrides, path resolution.

Every test writes its own small YAML tree under tmp_path; the expected merged configs are
written out by hand in the tests (no output of the loader is used as a reference).
"""
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from easydict import EasyDict

from pcdet_focal import config
from pcdet_focal.config import (apply_set, cfg_get, dump_config, load_config, require,
                                resolve_path, to_plain)
from pcdet_focal.errors import ConfigError

META = ('CFG_FILE', 'CFG_SEARCH_DIRS')


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip('\n'), encoding='utf-8')
    return path


def body(cfg):
    """The loaded config as plain dicts, without the keys the loader adds."""
    plain = {k: v for k, v in to_plain(cfg).items() if k not in META}
    if isinstance(plain.get('DATA_CONFIG'), dict):      # the loader copies META there too
        plain['DATA_CONFIG'] = {k: v for k, v in plain['DATA_CONFIG'].items() if k not in META}
    return plain


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """cwd = tmp_path/cwd and REPO_ROOT = tmp_path/repo, so the search order is observable."""
    (tmp_path / 'cwd').mkdir()
    (tmp_path / 'repo').mkdir()
    monkeypatch.chdir(tmp_path / 'cwd')
    monkeypatch.setattr(config, 'REPO_ROOT', tmp_path / 'repo')
    return tmp_path


# ----------------------------------------------------------------------------- plain loading

def test_plain_yaml_becomes_easydict_with_meta_keys(tmp_path):
    path = write(tmp_path / 'a.yaml', '''
        CLASS_NAMES: ['Car', 'Pedestrian']
        MODEL:
            NAME: FocalCenterPoint
            MAP_TO_BEV: {NAME: SparseHeightCompression, NUM_BEV_FEATURES: 128}
        OPTIMIZATION: {LR: 0.003, NUM_EPOCHS: 20, FLAG: True, NOTHING: null}
    ''')
    cfg = load_config(path)
    assert isinstance(cfg, EasyDict)
    assert cfg.MODEL.MAP_TO_BEV.NUM_BEV_FEATURES == 128  # attribute access at every level
    assert body(cfg) == {
        'CLASS_NAMES': ['Car', 'Pedestrian'],
        'MODEL': {'NAME': 'FocalCenterPoint',
                  'MAP_TO_BEV': {'NAME': 'SparseHeightCompression', 'NUM_BEV_FEATURES': 128}},
        'OPTIMIZATION': {'LR': 0.003, 'NUM_EPOCHS': 20, 'FLAG': True, 'NOTHING': None},
    }
    assert cfg.CFG_FILE == str(path.resolve())
    assert cfg.CFG_SEARCH_DIRS[0] == str(tmp_path.resolve())


def test_empty_file_is_an_empty_config(tmp_path):
    assert body(load_config(write(tmp_path / 'e.yaml', '# only a comment\n'))) == {}


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    write(tmp_path / 'h.yaml', 'A: 1\n')
    assert load_config('~/h.yaml').A == 1


# ----------------------------------------------------------------------------- _BASE_CONFIG_

def test_top_level_base_is_merged_deeply_with_the_including_file_winning(isolated):
    write(isolated / 'cfgs' / 'base.yaml', '''
        A: 1
        KEEP: base
        D: {x: 1, y: {p: 1, q: 2}, L: [1, 2, 3]}
    ''')
    top = write(isolated / 'cfgs' / 'top.yaml', '''
        _BASE_CONFIG_: base.yaml
        A: 2
        D: {y: {q: 20}, L: [9], NEW: true}
    ''')
    assert body(load_config(top)) == {
        'A': 2, 'KEEP': 'base',
        # lists are replaced, mappings merged key by key
        'D': {'x': 1, 'y': {'p': 1, 'q': 20}, 'L': [9], 'NEW': True},
    }


def test_bases_at_any_nesting_level_and_recursive(isolated):
    # model.yaml -> DATA_CONFIG from dataset_configs/ds.yaml (which has its own base, and a
    # nested base two levels down) and MODEL.DENSE_HEAD from a head file.
    write(isolated / 'cfgs' / 'dataset_configs' / 'common.yaml', '''
        DATASET: Common
        POINT_CLOUD_RANGE: [0, -40, -3, 70.4, 40, 1]
        COMMON_ONLY: 7
    ''')
    write(isolated / 'cfgs' / 'dataset_configs' / 'ds.yaml', '''
        _BASE_CONFIG_: common.yaml
        DATASET: KittiDataset
        AUG:
            _BASE_CONFIG_: aug/flip.yaml
            PROB: 0.25
    ''')
    write(isolated / 'cfgs' / 'dataset_configs' / 'aug' / 'flip.yaml', '''
        NAME: random_world_flip
        PROB: 0.5
        AXES: ['x']
    ''')
    write(isolated / 'cfgs' / 'heads' / 'center.yaml', 'NAME: CenterHead\nNUM_HM_CONV: 2\n')
    top = write(isolated / 'cfgs' / 'models' / 'model.yaml', '''
        DATA_CONFIG:
            _BASE_CONFIG_: ../dataset_configs/ds.yaml
            POINT_CLOUD_RANGE: [0, -20, -3, 100, 20, 4]
        MODEL:
            NAME: FocalCenterPoint
            DENSE_HEAD:
                _BASE_CONFIG_: ../heads/center.yaml
                NUM_HM_CONV: 1
    ''')
    cfg = load_config(top)
    assert body(cfg) == {
        'DATA_CONFIG': {
            'DATASET': 'KittiDataset', 'COMMON_ONLY': 7,
            'POINT_CLOUD_RANGE': [0, -20, -3, 100, 20, 4],
            'AUG': {'NAME': 'random_world_flip', 'PROB': 0.25, 'AXES': ['x']},
        },
        'MODEL': {'NAME': 'FocalCenterPoint',
                  'DENSE_HEAD': {'NAME': 'CenterHead', 'NUM_HM_CONV': 1}},
    }
    # every file's folder is searched later by resolve_path, the including file's first
    dirs = cfg.CFG_SEARCH_DIRS
    assert dirs[0] == str((isolated / 'cfgs' / 'models').resolve())
    for sub in ('dataset_configs', 'dataset_configs/aug', 'heads'):
        assert str((isolated / 'cfgs' / sub).resolve()) in dirs


def test_diamond_is_not_a_cycle(isolated):
    write(isolated / 'd.yaml', 'SHARED: 1\n')
    write(isolated / 'b.yaml', '_BASE_CONFIG_: d.yaml\nB: 1\n')
    write(isolated / 'c.yaml', '_BASE_CONFIG_: d.yaml\nC: 1\n')
    top = write(isolated / 'a.yaml', '''
        X: {_BASE_CONFIG_: b.yaml}
        Y: {_BASE_CONFIG_: c.yaml}
    ''')
    assert body(load_config(top)) == {'X': {'SHARED': 1, 'B': 1}, 'Y': {'SHARED': 1, 'C': 1}}


def test_base_search_order_including_file_then_repo_root_then_cwd(isolated):
    inc = isolated / 'project' / 'cfgs'
    # the same relative name in all three places: the including file's folder wins
    for where, tag in ((inc, 'file'), (isolated / 'repo', 'repo'), (isolated / 'cwd', 'cwd')):
        write(where / 'dataset_configs' / 'x.yaml', f'WHO: {tag}\n')
    top = write(inc / 'top.yaml', '_BASE_CONFIG_: dataset_configs/x.yaml\n')
    assert load_config(top).WHO == 'file'
    # not beside the file: the repo root beats the current directory
    (inc / 'dataset_configs' / 'x.yaml').unlink()
    assert load_config(top).WHO == 'repo'
    # only in the current directory (OpenPCDet's convention: it runs from tools/)
    (isolated / 'repo' / 'dataset_configs' / 'x.yaml').unlink()
    assert load_config(top).WHO == 'cwd'


def test_base_relative_to_a_parent_folder_of_the_including_file(isolated):
    # OpenPCDet layout: tools/cfgs/kitti_models/m.yaml says cfgs/dataset_configs/k.yaml
    write(isolated / 'tools' / 'cfgs' / 'dataset_configs' / 'k.yaml', 'DATASET: KittiDataset\n')
    top = write(isolated / 'tools' / 'cfgs' / 'kitti_models' / 'm.yaml', '''
        DATA_CONFIG: {_BASE_CONFIG_: cfgs/dataset_configs/k.yaml}
    ''')
    assert load_config(top).DATA_CONFIG.DATASET == 'KittiDataset'


def test_absolute_base_path(isolated):
    base = write(isolated / 'elsewhere' / 'b.yaml', 'B: 2\n')
    top = write(isolated / 'a.yaml', f'_BASE_CONFIG_: {base}\nA: 1\n')
    assert body(load_config(top)) == {'A': 1, 'B': 2}


def test_real_repo_root_is_this_checkout():
    root = Path(config.__file__).resolve().parents[1]
    if not (root / 'cfgs').is_dir():
        pytest.skip('installed without the cfgs/ folder (not a checkout)')
    assert config.REPO_ROOT == root


def test_missing_base_names_file_key_and_value(isolated):
    top = write(isolated / 'a.yaml', 'DATA_CONFIG:\n    _BASE_CONFIG_: nowhere/ds.yaml\n')
    with pytest.raises(ConfigError) as err:
        load_config(top)
    msg = str(err.value)
    assert str(top.resolve()) in msg and 'DATA_CONFIG._BASE_CONFIG_' in msg
    assert 'nowhere/ds.yaml' in msg and '\n' not in msg


@pytest.mark.parametrize('value', ['null', '3', '[a.yaml]', '{x: 1}'])
def test_base_must_be_a_path_string(isolated, value):
    top = write(isolated / 'a.yaml', f'_BASE_CONFIG_: {value}\n')
    with pytest.raises(ConfigError, match='_BASE_CONFIG_ must be a file path'):
        load_config(top)


def test_cycle_error_names_the_chain(isolated):
    a = write(isolated / 'a.yaml', '_BASE_CONFIG_: b.yaml\nA: 1\n')
    b = write(isolated / 'b.yaml', '_BASE_CONFIG_: c.yaml\nB: 1\n')
    c = write(isolated / 'c.yaml', '_BASE_CONFIG_: a.yaml\nC: 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(a)
    msg = str(err.value)
    assert 'cycle' in msg and '\n' not in msg
    chain = [str(p.resolve()) for p in (a, b, c, a)]
    assert ' -> '.join(chain) in msg


def test_self_base_and_nested_cycle(isolated):
    me = write(isolated / 'me.yaml', 'X:\n    _BASE_CONFIG_: me.yaml\n')
    with pytest.raises(ConfigError, match='cycle'):
        load_config(me)
    write(isolated / 'ds.yaml', '_BASE_CONFIG_: model.yaml\n')
    model = write(isolated / 'model.yaml', 'DATA_CONFIG:\n    _BASE_CONFIG_: ds.yaml\n')
    with pytest.raises(ConfigError) as err:
        load_config(model)
    chain = [str((isolated / n).resolve()) for n in ('model.yaml', 'ds.yaml', 'model.yaml')]
    assert ' -> '.join(chain) in str(err.value)


# ----------------------------------------------------------------------------- bad files

def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match='config file not found'):
        load_config(tmp_path / 'nope.yaml')


def test_a_folder_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path)


@pytest.mark.parametrize('text, line', [
    ('A: 1\nB: [1, 2\nC: 3\n', None),        # unclosed flow sequence
    ('A: 1\n  B: 2\n', 2),                  # mapping value in a scalar
    ('A:\n  - x\n - y\n', 3),               # bad indentation
    ('A: "unterminated\n', None),
])
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f'{path.resolve()}:') and 'YAML syntax error' in msg
    assert '\n' not in msg
    if line is not None:
        assert msg.startswith(f'{path.resolve()}:{line}:')


def test_yaml_error_in_a_base_names_the_base(isolated):
    base = write(isolated / 'base.yaml', 'A: [1\n')
    top = write(isolated / 'top.yaml', '_BASE_CONFIG_: base.yaml\n')
    with pytest.raises(ConfigError, match=str(base.resolve())):
        load_config(top)


@pytest.mark.parametrize('text, kind', [('- 1\n- 2\n', 'list'), ('just a string\n', 'str'),
                                        ('42\n', 'int')])
def test_config_must_be_a_mapping(tmp_path, text, kind):
    path = write(tmp_path / 'x.yaml', text)
    with pytest.raises(ConfigError, match=f'must be a YAML mapping.*{kind}'):
        load_config(path)


def test_non_string_key_is_refused(tmp_path):
    path = write(tmp_path / 'x.yaml', 'MODEL:\n    1: a\n')
    with pytest.raises(ConfigError, match='MODEL'):
        load_config(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / 'latin.yaml'
    path.write_bytes('NAME: caf\xe9\n'.encode('latin-1'))
    with pytest.raises(ConfigError, match='cannot read'):
        load_config(path)


@pytest.mark.parametrize('tag', [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/new:os.system ["touch {marker}"]',
    '!!python/name:os.system',
    '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
])
def test_unsafe_yaml_tags_are_refused_and_never_executed(tmp_path, tag):
    marker = tmp_path / 'pwned'
    path = write(tmp_path / 'evil.yaml', 'A: 1\nB: ' + tag.format(marker=marker) + '\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert not marker.exists()
    msg = str(err.value)
    assert msg.startswith(f'{path.resolve()}:2:') and 'refused YAML tag' in msg


def test_unsafe_tag_in_a_base_is_refused_too(isolated):
    marker = isolated / 'pwned'
    write(isolated / 'base.yaml', f'X: !!python/object/apply:os.system ["touch {marker}"]\n')
    top = write(isolated / 'top.yaml', 'M:\n    _BASE_CONFIG_: base.yaml\n')
    with pytest.raises(ConfigError, match='refused YAML tag'):
        load_config(top)
    assert not marker.exists()


# ----------------------------------------------------------------------------- --set

def base_cfg():
    return EasyDict({
        'OPTIMIZATION': {'LR': 0.003, 'NUM_EPOCHS': 20, 'MOMS': [0.95, 0.85], 'FLAG': False,
                         'OPTIMIZER': 'adam_onecycle', 'NOTHING': None},
        'DATA_CONFIG': {'DATA_PATH': '../data/kitti', 'SPLIT': {'train': 'train', 'test': 'val'},
                        'SEQ': '001'},
        'CLASS_NAMES': ['Car', 'Pedestrian'],
    })


@pytest.mark.parametrize('key, text, expected', [
    ('OPTIMIZATION.NUM_EPOCHS', '3', 3),                      # int
    ('OPTIMIZATION.LR', '0.01', 0.01),                         # float
    ('OPTIMIZATION.LR', '1e-4', 1e-4),                         # float, exponent form
    ('OPTIMIZATION.MOMS', '[0.9, 0.8]', [0.9, 0.8]),           # list literal
    ('OPTIMIZATION.MOMS', '0.9,0.8', [0.9, 0.8]),              # comma list (a tuple literal)
    ('CLASS_NAMES', "['Car']", ['Car']),
    ('OPTIMIZATION.FLAG', 'True', True),                       # bool
    ('OPTIMIZATION.OPTIMIZER', 'adamw', 'adamw'),              # string fallback
    ('DATA_CONFIG.DATA_PATH', '/data/kitti v2', '/data/kitti v2'),
    ('DATA_CONFIG.SEQ', '002', '002'),                         # a string stays as typed
    ('DATA_CONFIG.SEQ', '7', '7'),
    ('OPTIMIZATION.NOTHING', '5', 5),                          # None accepts any type
    ('OPTIMIZATION.NUM_EPOCHS', 'None', None),                 # and anything may become None
])
def test_set_parses_values(key, text, expected):
    cfg = base_cfg()
    apply_set(cfg, [key, text])
    assert cfg_get(cfg, key) == expected
    assert type(cfg_get(cfg, key)) is type(expected)


def test_set_dict_value_replaces_the_mapping_as_easydict():
    cfg = apply_set(base_cfg(), ['DATA_CONFIG.SPLIT', "{'train': 'trainval', 'test': 'test'}"])
    assert isinstance(cfg.DATA_CONFIG.SPLIT, EasyDict)
    assert cfg.DATA_CONFIG.SPLIT.train == 'trainval'


def test_set_several_pairs_in_order_and_returns_cfg():
    cfg = base_cfg()
    out = apply_set(cfg, ['OPTIMIZATION.LR', '0.1', 'OPTIMIZATION.NUM_EPOCHS', '1',
                          'OPTIMIZATION.LR', '0.2'])
    assert out is cfg and cfg.OPTIMIZATION.LR == 0.2 and cfg.OPTIMIZATION.NUM_EPOCHS == 1
    assert apply_set(cfg, None) is cfg and apply_set(cfg, []) is cfg


def test_set_value_is_never_evaluated(tmp_path):
    marker = tmp_path / 'pwned'
    code = f"__import__('os').system('touch {marker}')"
    cfg = apply_set(base_cfg(), ['OPTIMIZATION.OPTIMIZER', code])
    assert cfg.OPTIMIZATION.OPTIMIZER == code and not marker.exists()


@pytest.mark.parametrize('key', [
    'OPTIMIZATION.NOPE',
    'NOPE.LR',
    'OPTIMIZATION.LR.SUB',            # below a leaf
    'CLASS_NAMES.0',                  # into a list
])
def test_set_refuses_keys_neither_present_nor_declared(key):
    # without a declaration lookup, --set only changes keys the config holds
    cfg = base_cfg()
    before = to_plain(cfg)
    with pytest.raises(ConfigError) as err:
        apply_set(cfg, [key, '1'])
    assert f"'{key}'" in str(err.value) and 'no module declares it' in str(err.value)
    assert to_plain(cfg) == before


@pytest.mark.parametrize('key, text, held', [
    ('OPTIMIZATION.NUM_EPOCHS', 'abc', 'int'),
    ('OPTIMIZATION.LR', '[1, 2]', 'float'),
    ('OPTIMIZATION.MOMS', 'abc', 'list'),
    ('OPTIMIZATION.MOMS', '5', 'list'),
    ('OPTIMIZATION.FLAG', '1', 'bool'),                        # 1 is not a bool
    ('OPTIMIZATION.FLAG', 'maybe', 'bool'),
    ('OPTIMIZATION.NUM_EPOCHS', 'True', 'int'),                # a bool is not an int here
    ('DATA_CONFIG.SPLIT', 'train', 'mapping'),
])
def test_set_type_mismatch_is_an_error_naming_key_and_types(key, text, held):
    cfg = base_cfg()
    with pytest.raises(ConfigError) as err:
        apply_set(cfg, [key, text])
    msg = str(err.value)
    assert msg.startswith(f'--set {key}:') and held in msg and '\n' not in msg


def test_set_needs_pairs():
    with pytest.raises(ConfigError, match="'OPTIMIZATION.LR' has no value"):
        apply_set(base_cfg(), ['OPTIMIZATION.NUM_EPOCHS', '2', 'OPTIMIZATION.LR'])


def test_set_int_field_refuses_a_fractional_float():
    with pytest.raises(ConfigError):
        apply_set(base_cfg(), ['OPTIMIZATION.NUM_EPOCHS', '2.5'])


def test_set_quoted_string_loses_its_quotes():
    cfg = apply_set(base_cfg(), ['OPTIMIZATION.OPTIMIZER', "'adamw'"])
    assert cfg.OPTIMIZATION.OPTIMIZER == 'adamw'


# ----------------------------------------------------------------------------- resolve_path

def test_resolve_path_order_config_dirs_then_repo_then_cwd(isolated):
    cfg_dir = isolated / 'cfgs'
    top = write(cfg_dir / 'top.yaml', 'DATA_PATH: data/kitti\n')
    cfg = load_config(top)
    targets = [cfg_dir / 'data' / 'kitti', isolated / 'repo' / 'data' / 'kitti',
               isolated / 'cwd' / 'data' / 'kitti']
    for t in targets:
        t.mkdir(parents=True)
    for t in targets:
        assert resolve_path(cfg.DATA_PATH, cfg, 'DATA_CONFIG.DATA_PATH') == t.resolve()
        t.rmdir()


def test_resolve_path_searches_the_base_files_folders(isolated):
    write(isolated / 'ds' / 'base.yaml', 'DATA_PATH: beside_base\n')
    top = write(isolated / 'models' / 'top.yaml', '_BASE_CONFIG_: ../ds/base.yaml\n')
    (isolated / 'ds' / 'beside_base').mkdir()
    cfg = load_config(top)
    assert resolve_path(cfg.DATA_PATH, cfg) == (isolated / 'ds' / 'beside_base').resolve()


def test_resolve_path_absolute_home_and_no_cfg(isolated, monkeypatch):
    target = isolated / 'abs.bin'
    target.write_bytes(b'')
    assert resolve_path(str(target)) == target.resolve()
    monkeypatch.setenv('HOME', str(isolated))
    assert resolve_path('~/abs.bin') == target.resolve()
    (isolated / 'cwd' / 'here.txt').write_text('x')
    assert resolve_path('here.txt') == (isolated / 'cwd' / 'here.txt').resolve()


def test_resolve_path_missing_names_field_and_tries(isolated):
    cfg = load_config(write(isolated / 'cfgs' / 'top.yaml', 'A: 1\n'))
    with pytest.raises(ConfigError) as err:
        resolve_path('data/missing', cfg, 'DATA_CONFIG.DATA_PATH')
    msg = str(err.value)
    assert msg.startswith("DATA_CONFIG.DATA_PATH: 'data/missing' not found")
    assert str(isolated / 'cfgs' / 'data' / 'missing') in msg
    # must_exist=False: the first candidate (beside the config) for outputs
    assert resolve_path('out/x', cfg, must_exist=False) == \
        Path(cfg.CFG_SEARCH_DIRS[0]) / 'out' / 'x'


# ----------------------------------------------------------------------------- helpers

def test_dump_config_round_trip(tmp_path):
    cfg = load_config(write(tmp_path / 'a.yaml', '''
        MODEL: {NAME: X, L: [1, 2.5, 'a'], N: null, B: false}
        TUPLE_FREE: 1
    '''))
    cfg.MODEL.T = (1, 2)                      # tuples and numpy arrays become lists
    cfg.MODEL.ARR = np.array([1.5, 2.0], dtype=np.float32)
    out = tmp_path / 'dump.yaml'
    dump_config(cfg, out)
    back = yaml.safe_load(out.read_text())
    assert back['MODEL'] == {'NAME': 'X', 'L': [1, 2.5, 'a'], 'N': None, 'B': False,
                             'T': [1, 2], 'ARR': [1.5, 2.0]}
    assert body(load_config(out)) == body(cfg) | {'MODEL': back['MODEL']}


def test_cfg_get_and_require():
    cfg = base_cfg()
    assert cfg_get(cfg, 'OPTIMIZATION.LR') == 0.003
    assert cfg_get(cfg, 'OPTIMIZATION.NOPE.X', 'd') == 'd'
    assert cfg_get(cfg, 'CLASS_NAMES.0', 'd') == 'd'           # lists are not indexed
    assert cfg_get(cfg, 'OPTIMIZATION.NOTHING', 'd') is None    # present-but-None stays None
    assert require(cfg.OPTIMIZATION, 'LR', 'OPTIMIZATION') == 0.003
    with pytest.raises(ConfigError, match=r'^MODEL\.NAME is required$'):
        require(EasyDict(), 'NAME', 'MODEL')
    with pytest.raises(ConfigError, match='MODEL.NAME'):
        require(None, 'NAME', 'MODEL')


def test_cwd_is_restored_and_loading_does_not_chdir(tmp_path):
    before = os.getcwd()
    load_config(write(tmp_path / 'a.yaml', 'A: 1\n'))
    assert os.getcwd() == before
