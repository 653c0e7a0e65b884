"""Installs the CPU stand-ins for OpenPCDet's compiled ops in every Python process started with
``PYTHONPATH=tests/pcdet_cpu_ops`` (see ``__init__.py`` in this folder)."""
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _TESTS)
try:
    import pcdet_cpu_ops
    pcdet_cpu_ops.install()
finally:
    sys.path.remove(_TESTS)
