"""`import eta_guard` must stay cheap: no torch, no transformers until a model is used."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_torch_or_transformers():
    code = (
        "import sys, eta_guard; eta_guard.ETAConfig(); eta_guard.SafetyVerdict; eta_guard.InvalidInputError;"
        "import eta_guard.media, eta_guard.messages;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error():
    import eta_guard

    try:
        eta_guard.NotAThing  # noqa: B018
    except AttributeError as e:
        assert "NotAThing" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
