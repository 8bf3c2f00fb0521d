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

import pytest

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


def replica_paths(replicas) -> dict[str, str]:
    return {
        REPLICA_OF["llava"]: replicas.vlm,
        REPLICA_OF["clip"]: replicas.clip,
        REPLICA_OF["reward_model"]: replicas.reward_model,
    }


def test_readme_quickstart_names_only_replicated_ids_and_compiles():
    paths = {hub_id: f"/replicas/{hub_id}" for hub_id in REPLICA_OF.values()}
    code = with_replica_paths(quickstart_snippet(), paths)
    compile(code, "README.md#quickstart", "exec")
    assert not any(f'"{hub_id}"' in code for hub_id in REPLICA_OF.values())
    assert "/replicas/" in code


# About 1,300 greedy tokens (generate with max_new_tokens=256, then a stream at the default 1024):
# 8-30 s on 2 shared CPU cores, so behind the slow marker (pytest -m slow).
@pytest.mark.slow
def test_readme_quickstart_runs_on_replicas(replica_checkpoints, tmp_path, monkeypatch):
    code = with_replica_paths(quickstart_snippet(), replica_paths(replica_checkpoints("llava")))
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
