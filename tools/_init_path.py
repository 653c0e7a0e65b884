"""Make ``pcdet_focal`` importable when tools/ scripts run from a checkout without an install
(the same convention as OpenPCDet's tools/_init_path.py)."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
