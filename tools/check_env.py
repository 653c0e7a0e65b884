#!/usr/bin/env python
"""Check this environment for pcdet-focal (same as ``pcdet-focal doctor``).

``python tools/check_env.py [--scan PATH ...] [--skip-smoke]``: versions, known-bad
combinations (numpy 2 + old cumm, torch/spconv CUDA mismatch), cuDNN on LD_LIBRARY_PATH,
non-ASCII temp dirs, conv/BN/pool + spconv smoke tests on every device, removed numpy aliases.
Exit 0 all good, 1 warnings, 2 a blocking problem.
"""
import _init_path  # noqa: F401  (pcdet_focal from this checkout)

from pcdet_focal.doctor import main

if __name__ == '__main__':
    main()
