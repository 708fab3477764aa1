"""bench_cluster's latency-trace summary on synthetic traces (no broker).

Outside the default test run (testpaths are tests/unit and tests/integration):
`pytest tests/benchmarks`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cluster as bc

MS = 1_000_000


def _trace(slow_every_ms: int | None, seed: int = 1) -> list[tuple[int, int]]:
    """10 s at 1,000 msg/s, 200-400 µs each; with `slow_every_ms`, the message sent at
    each multiple of it takes 2 ms."""
    rng = random.Random(seed)
    out = []
    for i in range(10_000):
        sent = 5_000 * MS + i * MS + rng.randrange(-100_000, 100_000)
        slow = slow_every_ms is not None and i % slow_every_ms == 0
        out.append((sent, 2_000_000 if slow else rng.randrange(200_000, 400_000)))
    return out


def test_the_period_of_periodic_slow_messages_is_found() -> None:
    line = bc.trace_summary(_trace(slow_every_ms=50))
    assert "10,000 samples" in line
    assert "p99.9 2,000" in line
    assert "at a 50 ms period" in line


def test_no_period_is_claimed_for_random_slow_messages() -> None:
    trace = _trace(None)
    rng = random.Random(2)
    trace = [(sent, 2_000_000 if rng.random() < 0.02 else x) for sent, x in trace]
    line = bc.trace_summary(trace)
    score = float(line.rsplit(": ", 1)[1].split("x")[0])
    assert score < 2.0  # no bin stands out: folding finds nothing


def test_write_traces_writes_one_tsv_per_run(tmp_path: Path) -> None:
    bc.TRACES.clear()
    bc.TRACES["Warren"] = [_trace(50)[:100], _trace(None)[:50]]
    lines = bc.write_traces(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["warren-latency-1.tsv", "warren-latency-2.tsv"]
    rows = (tmp_path / "warren-latency-2.tsv").read_text().splitlines()
    assert rows[0] == "sent_ns\tlatency_ns"
    assert len(rows) == 51
    assert sum("Warren #" in line for line in lines) == 2
    bc.TRACES.clear()
