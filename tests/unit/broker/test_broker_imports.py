"""Import contract: the broker model and the state machine stay free of I/O and Raft."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("anyio", "asyncio", "pysyncobj", "socket", "uvloop", "pickle")


def test_model_imports_no_io() -> None:
    code = (
        "import sys\n"
        "import cluster.state, node.broker.model, node.broker.snapshot, node.broker.views\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""
