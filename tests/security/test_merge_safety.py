"""`moerge merge` never loses data and never writes a silently wrong result: OUT is written atomically, refused
when it is an input or non-empty without --overwrite; parameters outside their range, weights summing to 0 or
NaN are refused before anything is written; a full disk leaves OUT as it was. Then generated hostile merge
YAML: a `MoergeError` or a merge, and nothing outside OUT touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from security_helpers import (
    examples,
    hostile_strings,
    json_values,
    lora_expert,
    make_canaries,
    outside_state,
    write_model,
)

import moerge
from moerge.errors import (
    MoergeError,
    NonFiniteWeightsError,
    OutputExistsError,
    ParameterRangeError,
    UnsafePathError,
)
from moerge.experts.library import ExpertLibrary


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models, a library of LoRA experts and canaries in one folder (read-only for the tests)."""
    root = tmp_path_factory.mktemp("merge-world")
    make_canaries(root)
    for i, name in enumerate(["base", "ft0", "ft1"]):
        write_model(root / "models" / name, seed=i)
    write_model(root / "models" / "nan", seed=7, nan=True)
    lib = ExpertLibrary.create(root / "lib")
    for i in range(2):
        lib.add(lora_expert(f"e{i}", seed=i))
    lib.close()
    return root


def full(world: Path, **kw) -> dict:
    m = world / "models"
    return {"merge_method": "ties", "base_model": str(m / "base"), "models": [str(m / "ft0"), str(m / "ft1")],
            "parameters": {"density": 0.5}, **kw}  # fmt: skip


def lora(world: Path, **kw) -> dict:
    return {
        "merge_method": "linear",
        "library": str(world / "lib"),
        "lora_mode": "exact",
        "models": ["e0", "e1"],
        **kw,
    }


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ data loss


@pytest.mark.parametrize("target", ["ft0", "base", "models"])
def test_out_that_is_an_input_is_refused_before_anything_is_deleted(world, target):
    before = outside_state(world)
    out = world / "models" / target if target != "models" else world / "models"
    with pytest.raises(OutputExistsError, match="input"):
        moerge.merge(full(world), out, overwrite=True)
    assert outside_state(world) == before


def test_out_that_holds_the_library_is_refused(world):
    before = outside_state(world)
    with pytest.raises(OutputExistsError, match="input"):
        moerge.merge(lora(world), world, overwrite=True)
    assert outside_state(world) == before


def test_out_inside_the_library_is_refused(world):
    lib = world / "lib"
    before, entries = outside_state(world, lib), sorted(p.name for p in (lib / "experts").iterdir())
    for out in (lib / "merged", lib / "experts" / "merged"):
        with pytest.raises(OutputExistsError, match="inside the library"):
            moerge.merge(lora(world), out)
    with pytest.raises(OutputExistsError, match="inside the library"):
        ExpertLibrary.open(lib).export_peft("e0", lib / "experts" / "copy")
    assert outside_state(world, lib) == before and not (lib / "merged").exists()
    assert (
        sorted(p.name for p in (lib / "experts").iterdir()) == entries and ExpertLibrary.open(lib).verify().ok
    )


def test_a_failing_merge_leaves_the_earlier_good_merge(world, tmp_path):
    out = tmp_path / "out"
    moerge.merge(full(world), out)
    good = snapshot(out)
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"):
        moerge.merge(full(world), out)
    m = world / "models"
    with pytest.raises(NonFiniteWeightsError, match="NaN"):  # fails half-way through the tensors
        moerge.merge(full(world, models=[str(m / "ft0"), str(m / "nan")]), out, overwrite=True)
    assert snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder is left behind"
    moerge.merge(full(world, parameters={"density": 0.9}), out, overwrite=True)
    assert snapshot(out) != good and (out / "model.safetensors").is_file()


def test_lora_merge_out_is_atomic_too(world, tmp_path):
    out = tmp_path / "adapter"
    moerge.merge(lora(world), out)
    good = snapshot(out)
    with pytest.raises(ParameterRangeError):
        moerge.merge(lora(world, models=[{"model": "e0", "parameters": {"weight": 1.0}},
                                         {"model": "e1", "parameters": {"weight": -1.0}}]), out, overwrite=True)  # fmt: skip
    assert snapshot(out) == good


# ------------------------------------------------------------------------------------ silent wrong results


@pytest.mark.parametrize(
    "params, message",
    [
        ({"density": -0.5}, r"density: -0.5 is outside \(0, 1\]"),
        ({"density": 1.5}, r"density: 1.5 is outside \(0, 1\]"),
        ({"density": 0}, r"density: 0.0 is outside \(0, 1\]"),
        ({"density": [0.5, 2.0]}, r"density: 2.0 is outside"),
        ({"density": float("nan")}, "not a finite number"),
        ({"density": 0.5, "scale": float("inf")}, "scale: inf is not a finite number"),
        ({"density": [{"filter": "mlp", "value": 3}, {"value": 0.5}]}, r"density: 3.0 is outside"),
    ],
)
def test_out_of_range_parameters_are_refused(world, tmp_path, params, message):
    with pytest.raises(ParameterRangeError, match=message):
        moerge.merge(full(world, parameters=params), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "t, message", [(1.5, r"t: 1.5 is outside \[0, 1\]"), (-0.1, "outside"), ([0, 2], "outside")]
)
def test_slerp_t_outside_0_1_is_refused(world, tmp_path, t, message):
    m = world / "models"
    cfg = {"merge_method": "slerp", "models": [str(m / "ft0"), str(m / "ft1")], "parameters": {"t": t}}
    with pytest.raises(ParameterRangeError, match=message):
        moerge.merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "weights, method, message",
    [
        ([1.0, -1.0], "linear", "sum to 0"),
        ([0.0, 0.0], "linear", "sum to 0"),
        ([float("nan"), 1.0], "linear", "not a finite number"),
        ([float("nan"), 1.0], "task_arithmetic", "not a finite number"),
        ([float("inf"), 1.0], "task_arithmetic", "not a finite number"),
    ],
)
def test_lora_merges_with_degenerate_weights_are_refused(world, tmp_path, weights, method, message):
    models = [{"model": f"e{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]
    with pytest.raises(ParameterRangeError, match=message):
        moerge.merge(lora(world, merge_method=method, models=models), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exact_lora_merge_still_equals_the_weighted_sum(world, tmp_path):
    """The checks change nothing for sound inputs: linear exact merge = Σ wᵢ ΔWᵢ / Σ wᵢ."""
    models = [{"model": "e0", "parameters": {"weight": 3.0}}, {"model": "e1", "parameters": {"weight": -1.0}}]
    merged = moerge.merge(lora(world, models=models))
    m = "model.layers.0.self_attn.q_proj"
    expected = (
        3.0 * lora_expert("e0", seed=0).lora[m].delta() - lora_expert("e1", seed=1).lora[m].delta()
    ) / 2.0
    torch.testing.assert_close(merged.lora[m].delta(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- disk full

DISK_FULL = textwrap.dedent(
    """
    set -e
    mount -t tmpfs -o size=64k tmpfs "$MNT"
    mkdir "$MNT/out" && echo "an earlier merge" > "$MNT/out/keep.txt"
    set +e
    "$PY" -m moerge merge "$CFG" "$MNT/out" --overwrite > "$LOG.out" 2> "$LOG.err"
    echo $? > "$LOG.rc"
    ls -a "$MNT" > "$LOG.ls"
    cat "$MNT/out/keep.txt" > "$LOG.keep"
    """
)


def test_disk_full_during_a_merge_leaves_out_as_it_was(world, tmp_path):
    """On a 64 KB tmpfs (mounted in a private mount namespace; skipped where that is not allowed) a merge whose
    output needs about 180 KB fails with one error line, removes its partial files and keeps OUT's old content."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        pytest.skip("needs Linux unshare to mount a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {tmp_path}"],
                           capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    big = tmp_path / "big"
    for i, name in enumerate(["base", "ft0"]):
        write_model(big / name, seed=i, vocab=512, hidden=64)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [str(big / "base"), str(big / "ft0")]})
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    env = {**os.environ, "MNT": str(mnt), "CFG": str(cfg), "PY": sys.executable, "LOG": str(log),
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    subprocess.run(["unshare", "-rm", "sh", "-c", DISK_FULL], env=env, check=True, timeout=300)
    err = Path(f"{log}.err").read_text()
    assert Path(f"{log}.rc").read_text().strip() == "1", err
    assert "Traceback" not in err and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and "disk is full" in err
    assert Path(f"{log}.ls").read_text().split() == [".", "..", "out"], "no partial or temporary files remain"
    assert Path(f"{log}.keep").read_text() == "an earlier merge\n"


# ------------------------------------------------------------------------------------ hostile merge YAML

METHODS = ["linear", "ties", "task_arithmetic", "dare_linear", "slerp", "della", "breadcrumbs", "model_stock",
           "multislerp", "fisher", "greedy_soup", "soup", "nope", ""]  # fmt: skip
PARAMS = [
    "density",
    "weight",
    "t",
    "normalize",
    "scale",
    "lambda",
    "epsilon",
    "gamma",
    "sign",
    "rescale",
    "unknown",
]


def number() -> st.SearchStrategy:
    return st.sampled_from([0, 1, -1, 0.5, -0.5, 1.5, 2, 1e300, float("nan"), float("inf"), True, None])


def params() -> st.SearchStrategy:
    value = (
        number()
        | st.lists(number(), max_size=3)
        | st.lists(
            st.fixed_dictionaries({"value": number()}, optional={"filter": hostile_strings() | number()}),
            max_size=2,
        )
        | json_values()
    )
    return st.dictionaries(st.sampled_from(PARAMS), value, max_size=3)


def templates(world: Path) -> list[dict]:
    """Sound merges (full checkpoints and library LoRA experts) that the mutations start from."""
    m, lib = world / "models", str(world / "lib")
    ft = [str(m / "ft0"), str(m / "ft1")]
    return [
        {"merge_method": "linear", "models": ft},
        {"merge_method": "ties", "base_model": str(m / "base"), "models": ft, "parameters": {"density": 0.5}},
        {"merge_method": "slerp", "models": ft, "parameters": {"t": 0.3}},
        {"merge_method": "linear", "library": lib, "lora_mode": "exact", "models": ["e0", "e1"]},
        {"merge_method": "ties", "library": lib, "lora_mode": "svd", "rank": 2, "models": ["e0", "e1"],
         "parameters": {"density": 0.5}},
    ]  # fmt: skip


@st.composite
def merge_configs(draw, world: Path):
    """A sound merge with 0–3 hostile mutations: wrong types, traversal paths, out-of-range numbers, …"""
    m = world / "models"
    paths = [str(m / n) for n in ("base", "ft0", "ft1", "nan")] + [str(world / "victim"), str(world / "lib"),
             str(world / "nope"), "../" * 8 + "etc"]  # fmt: skip
    pool = paths + ["e0", "e1", "nope", "../e0"]
    entry = (
        st.sampled_from(pool)
        | hostile_strings()
        | st.fixed_dictionaries(
            {"model": st.sampled_from(pool) | hostile_strings()},
            optional={
                "parameters": params(),
                "stats": st.sampled_from([str(world / "victim" / "precious.txt"), "x"]),
            },
        )
    )
    mutations = {
        "merge_method": st.sampled_from(METHODS) | json_values(),
        "models": st.lists(entry, max_size=3) | json_values(),
        "base_model": st.sampled_from(paths) | hostile_strings(),
        "parameters": params() | json_values(),
        "dtype": st.sampled_from(["float16", "bfloat16", "int8", None]),
        "seed": st.sampled_from([0, -1, 2**64, 1.5, "x"]),
        "shard_size": st.sampled_from(["1KB", "0", "-1MB", "1e400GB", "abc", 100, 0, True]),
        "copy_tokenizer": st.booleans() | json_values(),
        "library": st.sampled_from([str(world / "lib"), str(world / "victim"), "memory://nope", "s3://x/y"]),
        "lora_mode": st.sampled_from([None, "exact", "svd", "dense", "factor", "bogus"]),
        "rank": st.sampled_from([1, 0, -3, 2**40, "2"]),
        "name": hostile_strings(),
        "add_to_library": st.booleans(),
        "unknown_key": json_values(),
    }
    cfg = json.loads(json.dumps(draw(st.sampled_from(templates(world)))))
    for key in draw(st.lists(st.sampled_from(sorted(mutations)), unique=True, max_size=3)):
        cfg[key] = draw(mutations[key])
    return cfg


def test_hostile_merge_yaml(world):
    lib_dir = world / "lib"
    outcomes: Counter[str] = Counter()

    @settings(max_examples=examples(50))
    @given(cfg=merge_configs(world), raw=st.sampled_from([None] * 12 + ["!!python/object/apply:os.system ['touch pwned']",
                                                           "merge_method: [unclosed", "\xff\xfe", "- a\n- b"]),
           overwrite=st.booleans(), existing=st.booleans())  # fmt: skip
    def run(cfg, raw, overwrite, existing):
        scratch = Path(tempfile.mkdtemp(prefix="moerge-yaml-"))
        try:
            out = scratch / "out"
            if existing:
                out.mkdir()
                (out / "old.txt").write_text("an earlier merge")
            path = scratch / "merge.yaml"
            if raw is None:
                path.write_text(yaml.safe_dump(cfg))
            else:
                path.write_bytes(raw.encode("utf-8", "surrogateescape") if raw != "\xff\xfe" else b"\xff\xfe")
            world_before = outside_state(world, lib_dir)
            lib_before = ExpertLibrary.open(lib_dir).names()
            out_before = snapshot(out) if out.exists() else None
            try:
                moerge.merge(path, out, overwrite=overwrite)
            except MoergeError as e:
                event(f"refused: {type(e).__name__}")
                outcomes["refused"] += 1
                assert (snapshot(out) if out.exists() else None) == out_before, "a failed merge changed OUT"
            else:
                event("merged")
                outcomes["merged"] += 1
                assert out.is_dir() and any(out.glob("*.safetensors"))
                if existing:
                    assert overwrite, "a non-empty OUT was replaced without overwrite"
            assert outside_state(world, lib_dir) == world_before
            lib = ExpertLibrary.open(lib_dir)
            assert lib.verify().ok and set(lib_before) <= set(lib.names())
            assert sorted(p.name for p in scratch.iterdir() if p.name.startswith(".")) == [], (
                "temporary left over"
            )
            assert not Path("pwned").exists()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    run()
    print(f"hostile merge YAML: {dict(outcomes)}")
    assert outcomes["merged"] >= 3 and outcomes["refused"] >= 10, (
        f"the generator must reach both outcomes: {outcomes}"
    )
    lib = ExpertLibrary.open(lib_dir)
    for name in set(lib.names()) - {"e0", "e1"}:  # merged experts added to the library by the examples
        lib.remove(name)


def test_a_model_index_cannot_point_outside_its_folder(world, tmp_path):
    model = tmp_path / "sharded"
    shutil.copytree(world / "models" / "ft0", model)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    for target in ("../../victim/precious.txt", str(world / "models" / "ft1" / "model.safetensors")):
        index = {"metadata": {}, "weight_map": {"model.norm.weight": target}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(UnsafePathError, match="model.safetensors.index.json"):
            moerge.merge(
                {"merge_method": "linear", "models": [str(model), str(world / "models" / "ft1")]},
                tmp_path / "o",
            )
    assert not (tmp_path / "o").exists()


def test_sharded_model_linked_like_the_hugging_face_cache_still_merges(world, tmp_path):
    """In the HF cache a snapshot's shards are links into blobs/: a name in the folder, a file elsewhere."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    shutil.copyfile(world / "models" / "ft0" / "model.safetensors", blobs / "abc123")
    shutil.copyfile(world / "models" / "ft0" / "config.json", snap / "config.json")
    os.symlink(blobs / "abc123", snap / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(load_file(str(blobs / "abc123")), "model-00001-of-00001.safetensors")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = moerge.merge({"merge_method": "linear", "models": [str(snap)]}, tmp_path / "o")
    assert load_file(str(out / "model.safetensors")).keys() == weight_map.keys()


def test_yaml_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"merge_method: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\nmodels: [a]\n"
    )
    with pytest.raises(MoergeError, match="not valid YAML"):
        moerge.merge(path, tmp_path / "out")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_full_merge_result_is_unchanged_by_the_checks(world, tmp_path):
    """A sound TIES merge gives exactly what it gave before (the reference: linear, computed here)."""
    m = world / "models"
    out = moerge.merge({"merge_method": "linear", "models": [str(m / "ft0"), str(m / "ft1")]}, tmp_path / "o")
    a, b, got = (load_file(str(p / "model.safetensors")) for p in (m / "ft0", m / "ft1", out))
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + b[k]) / 2)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
