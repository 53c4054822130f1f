"""One entry point for every caller (bench, generate, serve, eval) to get a predictor by name.

``None`` or ``"auto"`` -> the default: ``AutoPredictor`` (online lengths per client and
prompt band; the bundled learned model only where it proves calibrated on the traffic);
``"default"`` -> the bundled learned model alone (odma_mlu/predictor/default/);
``"median"`` -> its global-median baseline; ``"s3"`` -> its S3 classifier; ``"simple"`` ->
the online predictor alone; anything else -> a trained predictor folder.
"""

from __future__ import annotations

from pathlib import Path

from odma_mlu.predictor.base import LengthPredictor
from odma_mlu.predictor.learned import MANIFEST, PredictorFormatError, load_learned, load_median, load_s3

DEFAULT_DIR = Path(__file__).resolve().parent / "default"


def resolve_folder(name_or_dir: str | None) -> Path:
    """The folder a name refers to; the bundled default for None/'default'."""
    if name_or_dir in (None, "", "default"):
        if not (DEFAULT_DIR / MANIFEST).is_file():
            raise PredictorFormatError(f"the bundled default predictor is missing ({DEFAULT_DIR}); "
                                       f"build it with `make predictor` from the project root")
        return DEFAULT_DIR
    path = Path(str(name_or_dir)).expanduser()
    if not path.is_dir():
        raise PredictorFormatError(f"predictor '{name_or_dir}' is neither a folder nor one of: default, median, "
                                   f"s3, simple")
    return path


def load_predictor(name_or_dir: str | None = None) -> LengthPredictor:
    """Load a predictor by name or folder (see the module docstring)."""
    if name_or_dir in (None, "", "auto"):
        from odma_mlu.predictor.auto import AutoPredictor

        learned = load_learned(DEFAULT_DIR) if (DEFAULT_DIR / MANIFEST).is_file() else None
        return AutoPredictor(learned)
    if name_or_dir == "simple":
        from odma_mlu.predictor.simple import SimplePredictor  # written by the engine lead; imported lazily

        return SimplePredictor()
    if name_or_dir == "median":
        return load_median(resolve_folder(None))
    if name_or_dir == "s3":
        return load_s3(resolve_folder(None))
    return load_learned(resolve_folder(name_or_dir))
