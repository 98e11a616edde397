"""The file names of a checkpoints dir, and what can be read from them without torch.

Tools that only look at runs (a study's executor deciding whether a training job finished) use
this instead of :mod:`megatron_align.checkpoint.dist_ckpt`, which imports torch and megatron-core.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

META_FILE = "meta.json"
LATEST_FILE = "latest"


def latest_iteration(checkpoints_dir: str | Path) -> Optional[int]:
    """The step of the checkpoint ``latest`` names; None when there is no complete one."""
    checkpoints_dir = Path(checkpoints_dir)
    try:
        name = (checkpoints_dir / LATEST_FILE).read_text().strip()
        meta = json.loads((checkpoints_dir / name / META_FILE).read_text())
        return int(meta["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
