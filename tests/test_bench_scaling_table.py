"""scripts/bench_scaling.py's table: speed-ups against the first arm of a group, and the issue's
goals read in the right direction (throughput up, time down). No benchmark runs here."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_scaling.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_table_ratios_and_goals():
    m = _module()
    arms = [
        m.Arm("server", "safe traffic, 1 client(s)", "req/s", True, [1.0, 1.2, 0.8]),
        m.Arm("server", "safe traffic, 8 client(s)", "req/s", True, [2.5, 2.0, 2.2]),
        m.Arm("server", "50/50 traffic, 1 client(s)", "req/s", True, [0.5]),
        m.Arm("server", "50/50 traffic, 8 client(s)", "req/s", True, [0.6]),
        m.Arm("batch", "8 sequential generate", "s", False, [10.0]),
        m.Arm("batch", "ETA.batch of 8", "s", False, [6.0]),
        m.Arm("threads", "generate, main thread", "ms/token", False, [100.0]),
        m.Arm("threads", "served request (HTTP)", "ms/token", False, [110.0]),
    ]
    args = argparse.Namespace(size="bench", tokens=8, candidates=5, reps=3, requests=4, threads=1)
    lines = m._table(arms, args).splitlines()
    safe8 = next(x for x in lines if "safe traffic, 8" in x)
    assert "2.20x" in safe8 and ">= 2x: met" in safe8  # median 2.2 / median 1.0
    mix8 = next(x for x in lines if "50/50 traffic, 8" in x)
    assert "1.20x" in mix8 and "met" not in mix8  # compared with its own traffic's 1 client
    batch = next(x for x in lines if "ETA.batch" in x)
    assert "1.67x" in batch and "not met" in batch  # time: 10 / 6
    served = next(x for x in lines if "served" in x)
    assert "time <= 1.05x: 1.10x not met" in served
    assert arms[1].best == 2.5 and arms[4].best == 10.0
