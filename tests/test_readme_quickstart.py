"""The README's quickstart runs as written on the replicas, with only the model ids swapped.

The snippet is read from README.md (so the test follows the README), every reference Hub id is
replaced by the path of its offline replica (``eta_guard.replicas.REPLICA_OF``), and it runs in
a folder holding a ``photo.jpg``. Random replicas: this proves the code path, not safety.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from eta_guard import ETAResult
from eta_guard.replicas import REPLICA_OF
from eta_guard.testing import make_test_image

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""")


def quickstart_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart (Python)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README.md has no python block under '## Quickstart (Python)'"
    return match.group(1)


def with_replica_paths(snippet: str, paths: dict[str, str]) -> str:
    ids = set(HUB_ID.findall(snippet))
    unknown = ids - set(paths)
    assert not unknown, f"the quickstart uses ids without a replica: {sorted(unknown)}"
    assert ids, "the quickstart names no model id: nothing would be swapped"
    for hub_id, path in paths.items():
        snippet = snippet.replace(f'"{hub_id}"', repr(path)).replace(f"'{hub_id}'", repr(path))
    return snippet


def test_readme_quickstart_runs_on_replicas(replica_checkpoints, tmp_path, monkeypatch):
    replicas = replica_checkpoints("llava")
    paths = {
        REPLICA_OF["llava"]: replicas.vlm,
        REPLICA_OF["clip"]: replicas.clip,
        REPLICA_OF["reward_model"]: replicas.reward_model,
    }
    code = with_replica_paths(quickstart_snippet(), paths)
    make_test_image("noise", (80, 60)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "README.md#quickstart", "exec"), namespace)  # noqa: S102
    result, final = namespace["result"], namespace["final"]
    printed = stdout.getvalue()
    assert isinstance(result, ETAResult) and isinstance(final, ETAResult)
    assert printed.startswith(result.text + "\n")  # print(result.text)
    assert printed.endswith(final.text)  # the streamed chunks, printed back to back
    assert result.verdict.pre_score is not None  # the CLIP replica judged photo.jpg
