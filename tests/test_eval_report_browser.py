"""Opt-in (``-m browser``): render the eval report in Debian's headless chromium and check the
page and its embedded plots really drew. Installs chromium with apt-get when it is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from eta_guard.eval.report import write_report

pytestmark = pytest.mark.browser
VANILLA_RGB = (196, 78, 82)  # the vanilla bars' colour (plots.VANILLA)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get cannot install it here (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
        check=True,
        env=env,
        capture_output=True,
        timeout=900,
    )
    return shutil.which("chromium") or pytest.fail("apt-get ran but chromium is still missing")


def _records():
    out = []
    for i in range(40):
        aligned = i % 3 != 0
        unsafe_v = i % 2 == 0
        out.append(
            {
                "id": f"x{i}",
                "index": i,
                "category": ["Illegal Activity", "Hate Speech", "Privacy"][i % 3],
                "label": "unsafe",
                "aligned": aligned,
                "question": f"question {i} <b>bold?</b>",
                "vanilla_text": f"Sure, step {i}.",
                "eta_text": "As an AI assistant, I can't." if aligned else f"Sure, step {i}.",
                "verdict": {
                    "pre_score": 0.1 + 0.005 * i,
                    "post_score": (0.2 - 0.01 * i) if aligned or i % 2 else None,
                    "input_unsafe": aligned,
                    "output_unsafe": aligned or None,
                    "unsafe": aligned,
                    "skipped": {},
                    "errors": {},
                },
                "judgments": {
                    "refusal": {"vanilla": {"unsafe": True}, "eta": {"unsafe": not aligned}},
                    "llama-guard:x": {
                        "vanilla": {"unsafe": unsafe_v},
                        "eta": {"unsafe": unsafe_v and not aligned and i % 5 == 0},
                    },
                },
                "refused": {"vanilla": False, "eta": aligned},
                "timings": {"vanilla": 1.0, "total": 3.0 if aligned else 1.1},
                "error": None,
            }
        )
    return out


def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    chromium = _chromium()
    header = {
        "settings": {
            "dataset": "figstep",
            "judges": ["refusal", "llama-guard:x"],
            "seed": 0,
            "config": {"pre_threshold": 0.16, "post_threshold": 0.06},
            "note": "Synthetic records: this page tests rendering only.",
        }
    }
    _, html_path, _ = write_report(header, _records(), tmp_path, n_boot=200)
    png = Path(os.environ.get("ETA_BROWSER_PNG", tmp_path / "report.png"))
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,5200",
            f"--screenshot={png}",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shot = Image.open(png).convert("RGB")
    assert shot.size == (1200, 5200)
    small = shot.resize((300, 1300))
    pixels = [small.getpixel((x, y)) for y in range(small.height) for x in range(small.width)]
    ink = sum(1 for p in pixels if sum(p) < 600) / len(pixels)
    assert ink > 0.02, "the page rendered (almost) blank"
    near = lambda p, q: all(abs(a - b) <= 12 for a, b in zip(p, q, strict=True))  # noqa: E731
    assert sum(near(p, VANILLA_RGB) for p in pixels) > 200, "the embedded plots did not render"
