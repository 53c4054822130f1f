#!/usr/bin/env python3
"""Standalone bandwidth profiler: the same as ``odma-mlu profile-bandwidth``.

Runs from a checkout without installing the package, e.g. inside Cambricon's PyTorch
container on an MLU server::

    python tools/profile_bandwidth.py --backend mlu --out device_profiles/mlu370-x4-measured.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.bandwidth_profiler import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
