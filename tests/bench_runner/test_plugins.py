"""A recipe and a merge method from outside the package: the plugin written out in docs/extending.md, used from
the CLI (`moerge recipes`, `bench`, `merge`) and as an installed entry point, each checked against a dense
reference written out here."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def plugin_source() -> str:
    """The plugin file shown in docs/extending.md (the Python block that starts `# my_moerge_plugin.py`)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith("# my_moerge_plugin.py"))


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_moerge_plugin.py"
    path.write_text(plugin_source())
    return path


@pytest.fixture
def isolated_registries(monkeypatch):
    """Registries restored after the test, so a plugin's methods do not leak into other tests."""
    from moerge.merging import registry as merge_registry
    from moerge.recipes import registry as recipe_registry

    recipe_registry.list_recipes()
    merge_registry.available_methods()
    monkeypatch.setattr(recipe_registry, "_RECIPES", dict(recipe_registry._RECIPES))
    monkeypatch.setattr(merge_registry, "_REGISTRY", dict(merge_registry._REGISTRY))


def invoke(args: list[str]):
    from moerge.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_plugin_recipe_runs_in_the_benchmark_from_the_cli(
    plugin_file, isolated_registries, reduced_suite, base_model, tmp_path
):
    res = invoke(["recipes", "--plugin", str(plugin_file), "--json"])
    assert '"update_norm"' in res.output
    out = tmp_path / "report"
    invoke(["bench", "--plugin", str(plugin_file), "--suite", reduced_suite.root, "--recipe", "update_norm",
            "--recipe", "update_norm:k=1", "--baseline", "base", "--limit", "2", "--no-progress", "--threads", "1",
            "--out", str(out)])  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    methods = {m["name"]: m for m in data["methods"]}
    assert methods["update_norm"]["status"] == "ok" and methods["update_norm:k=1"]["status"] == "ok"
    assert methods["update_norm"]["taxonomy"]["granularity"] == "step"
    ran = [r for r in data["results"] if r["method"] == "update_norm"]
    assert ran and all(r["status"] == "ok" for r in ran)
    assert all(r["routing_accuracy"] is not None for r in ran if r["split"] == "held_in")
    # the signature was computed through its own compute function and kept in the run's artifacts folder
    from moerge.experts.artifacts import ArtifactOverlay, default_artifacts_dir

    library = reduced_suite.open_library()
    kept = ArtifactOverlay(library, default_artifacts_dir(library))
    assert all(kept.has_artifact("update_gram", {"version": 1}, n) for n in reduced_suite.experts)
    assert not any(library.has_artifact("update_gram", {"version": 1}, n) for n in reduced_suite.experts)


def test_plugin_router_matches_a_dense_reference(plugin_file, isolated_registries, base_model, reduced_suite):
    """update_norm's weights per token equal a top-k softmax over ‖ΔW_e x‖ with ΔW_e formed densely."""
    from moerge.plugins import load_plugins
    from moerge.recipes.facade import attach, detach

    load_plugins([str(plugin_file)])
    model, tok = base_model
    library = reduced_suite.open_library()
    experts = [library.get(n) for n in reduced_suite.experts]
    x = torch.randn(
        5, experts[0].lora[next(iter(experts[0].lora))].d_in, generator=torch.Generator().manual_seed(0)
    )
    routed = attach(model, library, "update_norm", k=2, experts=reduced_suite.experts)
    try:
        module = next(iter(routed.expert_layers))
        sel = routed.router.select(module, x, None)
        norms = torch.stack([(e.lora[module].delta() @ x.T).norm(dim=0) for e in experts], dim=1)  # [N, E]
        top, idx = torch.topk(norms, 2, dim=-1)
        torch.testing.assert_close(sel.indices, idx)
        torch.testing.assert_close(sel.weights, torch.softmax(top, -1), rtol=1e-4, atol=1e-5)
    finally:
        detach(routed)


def test_plugin_merge_method_from_the_cli(
    plugin_file, isolated_registries, base_model, reduced_suite, tmp_path
):
    """`moerge merge --plugin` with the plugin's `median`: each module's ΔW is the elementwise median."""
    from moerge.experts.peft_io import read_peft_folder

    library = reduced_suite.open_library()
    names = reduced_suite.experts[:3]
    config = {"merge_method": "median", "library": str(library.url), "models": names, "lora_mode": "dense",
              "parameters": {"scale": 0.5}, "name": "median3"}  # fmt: skip
    cfg = tmp_path / "median.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    res = invoke(["merge", "--plugin", str(plugin_file), str(cfg), str(out)])
    assert "median3" in res.output
    merged = read_peft_folder(out)
    experts = [library.get(n) for n in names]
    assert set(merged.dense) == {m + ".weight" for m in experts[0].lora}
    for module in experts[0].lora:
        want = 0.5 * torch.stack([e.lora[module].delta() for e in experts]).median(dim=0).values
        torch.testing.assert_close(merged.dense[module + ".weight"], want, rtol=1e-5, atol=1e-6)


def test_entry_point_plugins_are_found(tmp_path, monkeypatch):
    """An installed package declaring the `moerge.recipes` / `moerge.merge_methods` entry points."""
    from moerge.merging import registry as merge_registry
    from moerge.recipes import registry as recipe_registry

    site = tmp_path / "site"
    (site / "my_moerge_plugin.py").parent.mkdir(parents=True)
    (site / "my_moerge_plugin.py").write_text(plugin_source())
    dist = site / "my_moerge_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-moerge-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[moerge.recipes]\nupdate_norm = my_moerge_plugin\n\n"
        "[moerge.merge_methods]\nmedian = my_moerge_plugin:median\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(recipe_registry, "_RECIPES", {})
    monkeypatch.setattr(recipe_registry, "_LOADED", False)
    monkeypatch.setattr(merge_registry, "_REGISTRY", {})
    monkeypatch.setattr(merge_registry, "_LOADED", False)
    monkeypatch.delitem(sys.modules, "my_moerge_plugin", raising=False)
    assert recipe_registry.get_recipe("update-norm").name == "update_norm"
    assert "arrow" in [r.name for r in recipe_registry.list_recipes()]  # built-ins still there
    assert merge_registry.get_method("median").paper.startswith("docs/extending.md")


def test_bad_plugins_give_one_clear_error(tmp_path, isolated_registries):
    from moerge.cli import app

    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    for spec, match in [
        ("no_such_module_xyz", "neither a .py file nor an importable module"),
        (str(tmp_path / "missing.py"), "does not exist"),
        (str(empty), "defines no Recipe"),
        (str(broken), "failed to import: RuntimeError: boom"),
    ]:
        res = CliRunner().invoke(app, ["recipes", "--plugin", spec])
        assert res.exit_code != 0
        assert match in str(res.exception), (spec, res.exception)
