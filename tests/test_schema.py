"""Config declarations: the schema layer, unknown keys, --set of declared keys, missing
sections, `pcdet-focal config`, the README key tables, and SparseHeightCompression's height bins
taken from the real upstream module."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from easydict import EasyDict

from pcdet_focal import schema as S
from pcdet_focal.cli import cli
from pcdet_focal.config import Provenance, apply_set, load_config
from pcdet_focal.config_schema import (check_config, declared_parser, describe, key_tables,
                                       load_checked, readme_with_tables)
from pcdet_focal.errors import ConfigError
from pcdet_focal.models.map_to_bev import SparseHeightCompression, backbone_output_shape

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml'


@pytest.fixture(autouse=True)
def _strict_unknown_keys():
    old = S.allow_unknown_keys(False)
    yield
    S.allow_unknown_keys(old)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def typo_cfg(tmp_path):
    """The users' report: two typo'd keys in MAP_TO_BEV, on top of the demo config."""
    path = tmp_path / 'typo.yaml'
    path.write_text(f'_BASE_CONFIG_: {DEMO}\nMODEL:\n    MAP_TO_BEV: {{MODEE: mean, '
                    'USE_NROM: False}\n')
    return path


# ----------------------------------------------------------------------------- specs
@pytest.mark.parametrize('spec,value,words', [
    (S.Int(lo=1), 0, ['X.K=0', 'an integer >= 1']),
    (S.Int(lo=1), True, ['X.K=True']),
    (S.Int(lo=3, odd=True), 4, ['odd integer >= 3']),
    (S.Float(lo=0, hi=1, lo_open=True), 0, ['X.K=0', '(0, 1]']),
    (S.Float(), float('nan'), ['X.K=nan']),
    (S.Bool(), 'yes', ["X.K='yes'", 'true or false']),
    (S.Choice('a', 'b'), 'c', ["X.K='c' is not one of a, b"]),
    (S.ListOf(S.Int(lo=0), length=3), [1, 2], ['X.K=[1, 2]']),
    (S.ListOf(S.Int(lo=0)), [1, -1], ['X.K[1]=-1']),
    (S.PerSplit(S.Int()), {'train': 1}, ["'test' entry"]),
    (S.Range(lo=0), [2, 1], ['X.K=[2, 1]']),
])
def test_specs_name_the_key_and_value(spec, value, words):
    schema = S.Schema('T', [S.Key('K', spec, None)])
    with pytest.raises(ConfigError) as err:
        schema.parse({'K': value}, 'X')
    msg = str(err.value)
    assert '\n' not in msg
    for word in words:
        assert word in msg, (word, msg)


def test_parse_fills_defaults_and_keeps_types():
    schema = S.Schema('T', [
        S.Key('A', S.Int(lo=1), 4), S.Key('B', S.Float(), 0.5), S.Key('C', S.Int(), S.REQUIRED),
        S.Key('D', S.Float(lo=0), 1.0, nullable=True),
        S.Key('E', S.Section(S.Schema('E', [S.Key('F', S.Bool(), True)])))])
    out = schema.parse({'C': 2.0, 'D': None}, 'X')
    assert out == {'A': 4, 'B': 0.5, 'C': 2, 'D': None, 'E': {'F': True}}
    assert isinstance(out.C, int)
    with pytest.raises(ConfigError, match=r'^X\.C is required$'):
        schema.parse({}, 'X')
    with pytest.raises(ConfigError, match=r'^X\.C is required'):   # an explicit null too
        schema.parse({'C': None}, 'X')


def test_unknown_key_suggests_the_nearest_and_can_warn(caplog):
    schema = S.Schema('T', [S.Key('MODE', S.Str(), 'max'), S.Key('USE_NORM', S.Bool(), True)])
    with pytest.raises(ConfigError, match='X.MODEE: unknown key; did you mean MODE?'):
        schema.parse({'MODEE': 'mean'}, 'X')
    with pytest.raises(ConfigError, match='X.use_norm: unknown key; did you mean USE_NORM?'):
        schema.parse({'use_norm': False}, 'X')
    with pytest.raises(ConfigError, match='known keys: MODE, NAME, USE_NORM'):
        schema.parse({'ZZZ': 1}, 'X')
    S.allow_unknown_keys(True)
    with caplog.at_level('WARNING', logger='pcdet_focal'):
        out = schema.parse({'MODEE': 'mean', 'MODE': 'x'}, 'X2')
    assert out.MODE == 'x' and 'MODEE' not in out
    assert sum('X2.MODEE: unknown key; did you mean MODE?' in r.message
               for r in caplog.records) == 1


# ----------------------------------------------------------------------------- whole configs
def shipped_configs():
    return sorted(REPO.glob('cfgs/*.yaml')) + sorted(REPO.glob('cfgs/openpcdet/*.yaml'))


@pytest.mark.parametrize('path', shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_checks_unchanged(path):
    cfg = load_checked(path)
    assert cfg.MODEL.NAME == 'FocalCenterPoint'


def test_typo_config_names_file_line_key_and_suggestion(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_checked(typo_cfg(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f'{tmp_path / "typo.yaml"}:3: MODEL.MAP_TO_BEV.MODEE: unknown key; '
                          'did you mean MODE?'), msg


@pytest.mark.parametrize('tool,extra', [('train.py', []), ('test.py', ['--ckpt', 'none.pth']),
                                        ('estimate_mem.py', [])])
def test_typo_config_fails_in_every_cli_with_one_line(tmp_path, tool, extra):
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / tool), '--cfg',
                           str(typo_cfg(tmp_path)), *extra], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'MODEL.MAP_TO_BEV.MODEE: unknown key; did you mean MODE?' \
        in lines[0], proc.stderr


def test_allow_unknown_keys_flag_warns_and_trains_on(tmp_path):
    S.allow_unknown_keys(True)
    cfg = load_checked(typo_cfg(tmp_path), ['MODEL.MAP_TO_BEV.MODE', 'max'])
    assert cfg.MODEL.MAP_TO_BEV.MODE == 'max'


def test_missing_sections_get_one_line(tmp_path):
    full = yaml.safe_load(DEMO.read_text())
    full['DATA_CONFIG']['_BASE_CONFIG_'] = str(REPO / 'cfgs/dataset_configs/synthetic_dataset.yaml')
    for section in ('OPTIMIZATION', 'MODEL', 'DATA_CONFIG', 'CLASS_NAMES'):
        data = {k: v for k, v in full.items() if k != section}
        path = write(tmp_path, f'no_{section}.yaml', data)
        with pytest.raises(ConfigError) as err:
            load_checked(path)
        assert str(err.value).startswith(f'{path}: {section} is missing; it needs'), err.value
    # a test run needs no OPTIMIZATION; a typo'd section name is pointed out
    load_checked(write(tmp_path, 'eval.yaml', {k: v for k, v in full.items()
                                                if k != 'OPTIMIZATION'}), training=False)
    data = dict(full)
    data['OPTIMISATION'] = data.pop('OPTIMIZATION')
    with pytest.raises(ConfigError, match=r'OPTIMIZATION is missing \(found OPTIMISATION: a '
                                          r'typo\?\)'):
        load_checked(write(tmp_path, 'typo_section.yaml', data))


def test_train_without_optimization_exits_with_one_line(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data['DATA_CONFIG']['_BASE_CONFIG_'] = str(REPO / 'cfgs/dataset_configs/synthetic_dataset.yaml')
    del data['OPTIMIZATION']
    path = write(tmp_path, 'noopt.yaml', data)
    proc = subprocess.run([sys.executable, str(REPO / 'tools/train.py'), '--cfg', str(path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f'error: {path}: OPTIMIZATION is missing; it needs '
                                   'BATCH_SIZE_PER_GPU, NUM_EPOCHS, OPTIMIZER and LR')


def test_set_accepts_declared_keys_the_file_lacks(tmp_path):
    # the README's KITTI command: STRICT is KittiDataset's, absent from the synthetic base
    cfg = load_checked(DEMO, ['DATA_CONFIG.DATASET', 'KittiDataset', 'DATA_CONFIG.DATA_PATH',
                              str(tmp_path), 'DATA_CONFIG.STRICT', 'True'])
    assert cfg.DATA_CONFIG.STRICT is True and cfg.DATA_CONFIG.DATASET == 'KittiDataset'
    # typed as declared; nested sections are created
    cfg = load_checked(DEMO, ['MODEL.BACKBONE_3D.FOCAL_ENCODER.TOPK_RATIO', '0.3',
                              'MODEL.DENSE_HEAD.POST_PROCESSING.NMS_CONFIG.NMS_THRESH', '0.1',
                              'MODEL.MAP_TO_BEV.USE_NORM', 'false'])
    assert cfg.MODEL.BACKBONE_3D.FOCAL_ENCODER.TOPK_RATIO == 0.3
    assert cfg.MODEL.MAP_TO_BEV.USE_NORM is False
    with pytest.raises(ConfigError, match="TOPK_RATIO='lots' must be a number"):
        load_checked(DEMO, ['MODEL.BACKBONE_3D.FOCAL_ENCODER.TOPK_RATIO', 'lots'])
    # keys nothing declares are still refused: STRICT belongs to KittiDataset only
    with pytest.raises(ConfigError, match="--set DATA_CONFIG.STRICT: no key .* and no module "
                                          'declares it'):
        load_checked(DEMO, ['DATA_CONFIG.STRICT', 'True'])
    with pytest.raises(ConfigError, match='no module declares it'):
        load_checked(DEMO, ['MODEL.MAP_TO_BEV.MODEE', 'mean'])


def test_switching_dataset_keeps_the_other_datasets_keys():
    cfg = load_checked(DEMO, ['DATA_CONFIG.DATASET', 'KittiDataset'])
    assert cfg.DATA_CONFIG.NUM_FRAMES.train == 320     # SyntheticDataset's, carried, unused


def test_openpcdet_module_sections_pass_through(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data['DATA_CONFIG']['_BASE_CONFIG_'] = str(REPO / 'cfgs/dataset_configs/synthetic_dataset.yaml')
    data['MODEL']['BACKBONE_3D'] = {'NAME': 'VoxelBackBone8x', 'ANY_KEY': 1}
    data['MODEL']['ROI_HEAD'] = {'NAME': 'VoxelRCNNHead', 'WHATEVER': [1]}
    check_config(EasyDict(data), Provenance())


def test_config_command_shows_each_origin(tmp_path, capsys):
    child = tmp_path / 'child.yaml'
    child.write_text(f'_BASE_CONFIG_: {DEMO}\nOPTIMIZATION:\n    LR: 0.01\n')
    assert cli(['config', str(child), '--set', 'OPTIMIZATION.NUM_EPOCHS', '3']) == 0
    out = {line.split(':')[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert out['LR'].endswith(f'# {child}:3')
    assert out['NUM_EPOCHS'].endswith('# --set on the command line')
    assert 'inherited through _BASE_CONFIG_ in' in out['DATASET']
    assert out['FOCAL_ALPHA'].endswith('# default declared by FocalSSTEncoder')
    assert 'FOCAL_ALPHA: 0.25' in out['FOCAL_ALPHA']


def test_readme_key_tables_match_the_declarations():
    text = (REPO / 'README.md').read_text(encoding='utf-8')
    assert text == readme_with_tables(text), ('README key tables are stale: run pcdet-focal '
                                              'config --keys --update-readme README.md')
    for title in key_tables():
        assert f'<!-- keys: {title} -->' in text, title


def test_readme_table_rows_follow_a_declaration_change():
    text = '<!-- keys: MAP_TO_BEV `HeightCompression` -->\nstale\n<!-- /keys -->\n'
    new = readme_with_tables(text)
    assert '| `NUM_BEV_FEATURES` | an integer >= 1 | **required** |' in new
    with pytest.raises(ConfigError, match='names no declared module'):
        readme_with_tables('<!-- keys: Nope -->\n<!-- /keys -->\n')



def test_update_readme_that_cannot_be_written_is_one_error():
    target = Path('/proc/version')   # readable, and not writable even by root
    if not target.is_file():
        pytest.skip('needs Linux /proc')
    with pytest.raises(ConfigError, match='--update-readme /proc/version: cannot write it'):
        cli(['config', '--keys', '--update-readme', str(target)])


@pytest.mark.parametrize('flag', ['--seed', '--workers'])
def test_negative_seed_or_workers_is_a_usage_error(flag):
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), '--cfg', 'x.yaml',
                           flag, '-1'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(f'argument {flag}: must be >= 0, got -1')

# ----------------------------------------------------------------------------- height bins
def shc_cfg(**extra):
    return EasyDict(NAME='SparseHeightCompression', MODE='learned', INPUT_FEATURES=8,
                    NUM_BEV_FEATURES=16, **extra)


class _PooledDSVT(torch.nn.Module):
    """Stands in for OpenPCDet's DSVT: its input layer lists the stage grids (z pooled to 1)."""

    def __init__(self):
        super().__init__()
        self.input_layer = torch.nn.Module()
        self.input_layer.sparse_shape_list = [(40, 40, 32), (20, 20, 8), (10, 10, 1)]


def _openpcdet_style_build(backbone, cfg, grid):
    # what OpenPCDet's Detector3DTemplate.build_map_to_bev_module does: grid_size only
    model_info_dict = {'module_list': [backbone], 'grid_size': grid}
    return SparseHeightCompression(model_cfg=cfg, grid_size=model_info_dict['grid_size'])


def test_learned_height_bins_come_from_the_upstream_module():
    grid = [40, 40, 32]
    shc = _openpcdet_style_build(_PooledDSVT(), shc_cfg(), grid)
    assert shc.num_height_bins == 1                       # not the grid's 32
    assert sum(p.numel() for p in shc.parameters()) == 16 * 8 * 1 + 2 * 16
    with pytest.raises(ConfigError, match='NUM_HEIGHT_BINS=32 gives 32 height bins but the 3D '
                                          'backbone outputs 1 .* set NUM_HEIGHT_BINS: 1'):
        _openpcdet_style_build(_PooledDSVT(), shc_cfg(NUM_HEIGHT_BINS=32), grid)
    # a backbone that does not say: the build stops and names the key
    with pytest.raises(ConfigError, match='NUM_HEIGHT_BINS is required for MODE=learned here'):
        _openpcdet_style_build(torch.nn.Linear(2, 2), shc_cfg(), grid)
    assert _openpcdet_style_build(torch.nn.Linear(2, 2), shc_cfg(NUM_HEIGHT_BINS=5),
                                  grid).num_height_bins == 5


def test_spconv_backbone_output_height_is_read_from_its_convs():
    import spconv.pytorch as spconv
    net = torch.nn.Module()
    net.sparse_shape = [41, 160, 140]            # OpenPCDet: grid[::-1] + [1, 0, 0]
    net.convs = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, padding=1),
        spconv.SparseConv3d(8, 8, 3, stride=2, padding=1),
        spconv.SparseConv3d(8, 8, 3, stride=2, padding=1),
        spconv.SparseConv3d(8, 8, 3, stride=2, padding=(0, 1, 1)),
        spconv.SparseConv3d(8, 8, (3, 1, 1), stride=(2, 1, 1)))
    # by hand: z 41 -> 21 -> 11 -> 5 -> 2, y 160 -> 80 -> 40 -> 20, x 140 -> 70 -> 35 -> 18
    assert backbone_output_shape(net) == [18, 20, 2]


def test_our_detector_passes_the_backbone_grid(tmp_path):
    from pcdet_focal.builder import build_network
    from pcdet_focal.data.dataset import build_dataset
    cfg = load_config(REPO / 'cfgs/focalsst_dsvt.yaml')
    del cfg.MODEL.MAP_TO_BEV['Z_STRIDE']       # nothing states D: it comes from DSVT
    dataset = build_dataset(cfg.DATA_CONFIG, cfg.CLASS_NAMES, training=False)
    with torch.device('meta'):
        model = build_network(cfg.MODEL, 3, dataset)
    assert model.map_to_bev_module.num_height_bins == 44        # ceil(175 / 4)
    cfg.MODEL.MAP_TO_BEV.NUM_HEIGHT_BINS = 175
    with pytest.raises(ConfigError, match='set NUM_HEIGHT_BINS: 44'):
        with torch.device('meta'):
            build_network(cfg.MODEL, 3, dataset)


def test_set_list_replaces_the_provenance_of_its_items_and_takes_yaml_bool_words(capsys):
    """A list set on the command line is the command line's, items included; a bool key takes
    YAML's on / off whether or not the file holds it."""
    prov = Provenance()
    cfg = load_config(REPO / 'cfgs' / 'focalsst_dsvt_demo.yaml', provenance=prov)
    key = 'DATA_CONFIG.DATA_AUGMENTOR.AUG_CONFIG_LIST'
    assert any(p.startswith(key + '[') for p in prov)
    apply_set(cfg, [key, "[{'NAME': 'random_world_flip', 'ALONG_AXIS_LIST': ['x']}]",
                    'OPTIMIZATION.FIND_UNUSED_PARAMETERS', 'on'],
              declared=declared_parser, provenance=prov)
    assert not any(p.startswith(key + '[') for p in prov)
    assert prov.origin(key + '[0].ALONG_AXIS_LIST').kind == 'set'
    assert cfg.OPTIMIZATION.FIND_UNUSED_PARAMETERS is True
    apply_set(cfg, ['OPTIMIZATION.FIND_UNUSED_PARAMETERS', 'off'], declared=declared_parser,
              provenance=prov)
    assert cfg.OPTIMIZATION.FIND_UNUSED_PARAMETERS is False
