#!/usr/bin/env python3
"""Standalone bandwidth profiler: the same as ``odma-mlu profile-bandwidth``.

Runs from a checkout without installing the package, e.g. inside Cambricon's PyTorch
container on an MLU server::

    python tools/profile_bandwidth.py --backend mlu --out device_profiles/mlu370-x4-measured.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.bandwidth_profiler import profile_bandwidth_main  # noqa: E402
from odma_mlu.errors import OdmaError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The same options as ``odma-mlu profile-bandwidth``."""
    p = argparse.ArgumentParser(prog="profile_bandwidth", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("cpu", "cuda", "mlu"), default="cpu")
    p.add_argument("--quick", action="store_true", help="small buffer and few repeats (< 30 s)")
    p.add_argument("--out", default=None, metavar="PROFILE.yaml")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    p.add_argument("--name", default=None, help="profile name (default: backend-hostname)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return profile_bandwidth_main(ns)
    except OdmaError as e:
        print(f"profile_bandwidth: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
