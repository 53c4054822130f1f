"""Write a tiny random-weight Qwen2 model folder (tokenizer + chat template), offline.

No weights ship with the project, yet emulator-mode CI must serve something: this writes
the same folder the tests use (tests/tiny_model.py) so ``deploy/emulator-cpu.yaml`` has a
model to load::

    python tools/make_tiny_model.py out/tiny-qwen2
    odma-mlu serve --config deploy/emulator-cpu.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="out/tiny-qwen2", help="where to write it (default: out/tiny-qwen2)")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import make_tiny_qwen2

    # Long positions so the emulated server takes the 7B's request lengths (rotary grows lazily).
    folder = make_tiny_qwen2(ns.folder, seed=ns.seed, max_position_embeddings=32768)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
