"""`moerge bench --library` leaves the user's library as it was: the routing artifacts the run computes go to its
artifacts folder, and ``--experts`` routes over (and prepares) the named experts only."""

from __future__ import annotations

import json

from typer.testing import CliRunner


def folder_digest(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, but SQLite's shared-memory index (rewritten by any reader)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")}  # fmt: skip


def test_bench_keeps_computed_artifacts_out_of_the_users_library(reduced_suite, tmp_path):
    from moerge.cli import app
    from moerge.experts.artifacts import ArtifactOverlay
    from moerge.experts.library import ExpertLibrary
    from moerge.train.gates import GATES_KIND, gates_config
    from moerge.transforms.arrow import ARROW_CONFIG, ARROW_KIND

    lib = ExpertLibrary.create(tmp_path / "lib")  # the suite's experts, without any artifact
    for name in reduced_suite.experts:
        lib.add(reduced_suite.open_library().get(name))
    chosen = reduced_suite.experts[:2]
    before = folder_digest(tmp_path / "lib")
    out, kept = tmp_path / "report", tmp_path / "kept"
    args = ["bench", "--suite", reduced_suite.root, "--library", str(tmp_path / "lib"), "--experts", ",".join(chosen),
            "--recipe", "phatgoose:gate_steps=2", "--recipe", "arrow", "--baseline", "base", "--limit", "1",
            "--threads", "1", "--artifacts-dir", str(kept), "--no-plots", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert folder_digest(tmp_path / "lib") == before
    data = json.loads((out / "results.json").read_text())
    assert data["experts"] == chosen
    assert {m["name"]: m["status"] for m in data["methods"]} == {
        "base": "ok", "phatgoose:gate_steps=2": "ok", "arrow": "ok"
    }  # fmt: skip
    overlay = ArtifactOverlay(lib, kept)
    for kind, config in ((GATES_KIND, gates_config(2)), (ARROW_KIND, ARROW_CONFIG)):
        assert [n for n in reduced_suite.experts if overlay.has_artifact(kind, config, n)] == chosen
    assert any(str(kept) in note for note in data["notes"])
