"""pcdet-focal: sparse height compression, pure-PyTorch DSVT and FocalSST for OpenPCDet."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version():
    for line in (HERE / 'pcdet_focal' / '__init__.py').read_text().splitlines():
        if line.startswith('__version__'):
            return line.split('=')[1].strip().strip("'\"")
    raise RuntimeError('pcdet_focal/__init__.py has no __version__')


# Runtime dependencies. spconv-cu121 is a CUDA 12.1 build that also runs on the CPU
# (ConvAlgo.Native); it pulls cumm-cu121. numpy is not capped: spconv 2.3.8 / cumm 0.7.11
# ran forward+backward with numpy 2.4.6 here (see README, "Environment notes").
INSTALL_REQUIRES = [
    'torch>=2.1',
    'spconv-cu121>=2.3.6',
    'numba>=0.58',
    'numpy>=1.24',
    'pyyaml>=6.0',
    'easydict>=1.10',
    'tqdm>=4.60',
]
# 'cu12' (the README's install command on a GPU machine): a CUDA 12 torch to pair with
# spconv-cu121. PyPI's Linux torch wheels are CUDA 12 builds from 2.5 to 2.10 and CUDA 13 from
# 2.11 on, and spconv has no CUDA 13 build (its last is spconv-cu126). The plain install keeps
# any torch >= 2.1, so such a torch installed first (CI's CPU build, an OpenPCDet environment's)
# is never replaced.
CU12 = ['torch>=2.1,<2.11']

setup(
    name='pcdet-focal',
    version=read_version(),
    description='Sparse 3D detection plugin for OpenPCDet: SparseHeightCompression, '
                'pure-PyTorch DSVT with downsampling input layers, FocalSST, memory estimator',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    packages=find_packages(include=['pcdet_focal', 'pcdet_focal.*']),
    install_requires=INSTALL_REQUIRES,
    # 'plot': the pictures (BEV frames, training curves, estimate_mem.py --plot); without it
    # each picture is skipped with one log line. The tests check the pictures, so 'test' has it.
    extras_require={'plot': ['matplotlib>=3.5'], 'test': ['pytest>=7', 'matplotlib>=3.5'],
                    'cu12': CU12},
    entry_points={'console_scripts': ['pcdet-focal = pcdet_focal.cli:main']},
    license='Apache-2.0',
)
