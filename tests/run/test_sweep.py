"""`compress sweep` on a tiny model folder: grid expansion and names, up-front validation, local
processes and Ray giving the same numbers, a failing point recorded while the others finish, and
a rerun that skips every finished run."""

import importlib.util
import json
import shlex
import textwrap

import pytest
import yaml

from compress.errors import CompressError
from compress.run import engine, identity
from compress.run import sweep as sweep_mod
from compress.run.recipe import load_recipe

# magnitude pruning, no dense eval, no export check: a run is about a second once torch is imported
TEMPLATE = """\
    model: {{source: {model}}}
    data:
      calibration: {{source: python-docs, nsamples: 2, seqlen: 32}}
      validation: {{source: python-docs, nsamples: 2, seqlen: 32}}
      evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
    stages:
      - kind: prune
        method: magnitude
        sparsity: 0.5
        allocation: {{kind: uniform}}
    eval: {{dense: false}}
    export: {{check: false}}
    """
GRID = ["stages.0.sparsity=0.3,0.5", "stages.0.allocation={kind: uniform},{kind: atp, beta: 0.2}"]
NAMES = ["sparsity=0.3_allocation=kind-uniform", "sparsity=0.3_allocation=kind-atp-beta-0.2",
         "sparsity=0.5_allocation=kind-uniform", "sparsity=0.5_allocation=kind-atp-beta-0.2"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from conftest import build_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("sweep")
    folder = root / "tiny-llama"
    tiny_model("llama", layers=2).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    path = root / "tiny.yaml"
    path.write_text(textwrap.dedent(TEMPLATE.format(model=folder)))
    return path


def numbers(out, names):
    """{name: (perplexity, achieved sparsity per block)} read from each run's results.json."""
    found = {}
    for name in names:
        results = json.loads((out / "runs" / name / "results.json").read_text())
        stage = results["stages"][0]
        found[name] = (results["perplexity"]["compressed"]["ppl"], stage["achieved"], [round(r, 6) for r in stage["block_ratios"]])
    return found


def same_columns(rows):
    """The table without what differs between two executions of the same runs."""
    keep = ("run", "on", "perplexity", "sparsity", "bits_per_weight", "params", "file_mb", "stages", "run_id", "error")
    return [{k: row.get(k) for k in keep} for row in rows]


# ---------------------------------------------------------------- expansion (no runs)


def test_grid_expands_to_named_validated_recipes(template, tmp_path):
    out = tmp_path / "sw"
    points = sweep_mod.expand(template, GRID, ["seed=3"], out)
    assert [p.name for p in points] == NAMES  # the product, in --grid order
    assert points[1].overrides == ("stages.0.sparsity=0.3", "stages.0.allocation={kind: atp, beta: 0.2}")
    for p in points:
        sweep_mod.write_atomic(p.recipe_file, p.text)
    recipe = load_recipe(out / "recipes" / f"{NAMES[3]}.yaml")  # what `compress run` reads
    assert recipe.name == NAMES[3] and recipe.output_dir == str(out / "runs" / NAMES[3]) and recipe.seed == 3
    assert recipe.stages[0].sparsity == 0.5 and recipe.stages[0].allocation.kind == "atp"
    assert recipe.stages[0].allocation.beta == 0.2 and recipe.stages[0].method == "magnitude"
    assert load_recipe(out / "recipes" / f"{NAMES[0]}.yaml").stages[0].sparsity == 0.3
    # the written recipe is the template plus the overrides, nothing else
    raw = yaml.safe_load(points[0].text)
    base = yaml.safe_load(template.read_text())
    assert set(raw) == set(base) | {"name", "output_dir", "seed"} and raw["data"] == base["data"]


def test_names_are_readable_unique_and_safe():
    assert sweep_mod.labels(["stages.0.sparsity", "stages.1.sparsity", "seed"]) == ["0.sparsity", "1.sparsity", "seed"]
    grid = sweep_mod.parse_grid(["model.source=/a/b c,x/b c,Org/Model-1B", "eval.on=[model, hf],[model]"])
    assert grid == [("model.source", ["/a/b c", "x/b c", "Org/Model-1B"]), ("eval.on", ["[model, hf]", "[model]"])]
    combos = [("/a/b c", "[model]"), ("x/b c", "[model]"), ("Org/Model-1B", "[model, hf]")]
    # paths by their last part, made unique; YAML lists flattened to their words
    assert sweep_mod.point_names(grid, combos, "t") == ["source=b-c_on=model", "source=b-c_on=model-2", "source=Model-1B_on=model-hf"]
    grid = sweep_mod.parse_grid(["seed=a:b,a b"])  # both clean to a-b: the second gets a suffix
    assert sweep_mod.point_names(grid, [("a:b",), ("a b",)], "t") == ["seed=a-b", "seed=a-b-2"]
    long = sweep_mod.point_names([("name", ["x" * 300])], [("x" * 300,)], "t")[0]
    assert len(long) == sweep_mod.MAX_NAME
    assert sweep_mod.point_names([], [()], "my template") == ["my-template"]


@pytest.mark.parametrize("grid, message", [
    (["stages.0.sparsty=0.3,0.5"], "--grid stages.0.sparsty=0.3: .*tiny.yaml:\\d+: stages\\[0\\].sparsty: unknown key"),
    (["stages.0.sparsity=0.3,1.5"], "--grid stages.0.sparsity=1.5: .*stages\\[0\\].sparsity: .*less than 1"),
    (["stages.3.sparsity=0.3"], "--grid stages.3.sparsity=0.3: stages.3: no list item 3"),
    (["stages.0.sparsity=0.3,,0.5"], "--grid stages.0.sparsity=0.3,,0.5: an empty value"),
    (["stages.0.sparsity=0.3,0.3"], "the value 0.3 is listed twice"),
    (["seed=1", "seed=2"], "seed is given twice"),
    (["stages.0.sparsity"], "expected key.path=value1,value2"),
    # valid one by one, not together: the point is named
    (["stages.0.allocation.kind=uniform,atp", "stages.0.allocation.beta=0.1"],
     "--grid stages.0.allocation.beta=0.1: .*stages\\[0\\].allocation.beta: unknown key"),
])
def test_a_bad_grid_fails_at_once_naming_the_item(template, tmp_path, monkeypatch, grid, message):
    def no_run(*args, **kwargs):
        raise AssertionError("a run started although the grid is invalid")

    monkeypatch.setattr(engine, "run", no_run)
    out = tmp_path / "sw"
    with pytest.raises(CompressError, match=message) as err:
        sweep_mod.sweep(template, grid, out=out)
    assert "\n" not in str(err.value)
    assert not out.exists()  # nothing written, nothing run


# ---------------------------------------------------------------- running


def test_failed_point_is_recorded_and_the_rest_finish_then_rerun_skips(template, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    missing = tmp_path / "no-such-model"
    grid = [f"model.source={yaml.safe_load(template.read_text())['model']['source']},{missing}", "stages.0.sparsity=0.3,0.6"]
    result = sweep_mod.sweep(template, grid, out=out)  # --jobs 1: in this process
    good = [p.name for p in result.points if str(missing) not in p.text]
    bad = [p.name for p in result.points if str(missing) in p.text]
    assert len(good) == 2 and len(bad) == 2 and sorted(result.ran) == sorted(good) and set(result.failed) == set(bad)
    for name in bad:
        line = (out / "failed" / f"{name}.txt").read_text().strip()
        assert line == f"model.source: {missing} does not exist" == result.failed[name]
    ppl = {name: json.loads((out / "runs" / name / "results.json").read_text())["perplexity"]["compressed"]["ppl"] for name in good}
    rows = {row["run"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert set(rows) == set(good) | set(bad)
    for name in good:
        assert rows[name]["error"] is None and rows[name]["perplexity"] == pytest.approx(ppl[name])
        # `compress run DIR/recipes/<name>.yaml` computes exactly this run
        recorded = json.loads((out / "runs" / name / "metadata.json").read_text())["run_id"]
        assert identity.run_id(load_recipe(out / "recipes" / f"{name}.yaml")) == recorded == rows[name]["run_id"]
        assert rows[name]["command"] == f"compress run {shlex.quote(str(out / 'recipes' / (name + '.yaml')))}"
    for name in bad:
        assert rows[name]["error"] == f"model.source: {missing} does not exist"
    assert f"failed: model.source: {missing} does not exist" in (out / "comparison.md").read_text()
    sparsity = {name: json.loads((out / "runs" / name / "results.json").read_text())["stages"][0]["achieved"] for name in good}
    assert sorted(sparsity.values()) == pytest.approx([0.3, 0.6], abs=1 / 32)

    # rerun: the finished runs are read, not run again; the failed ones are retried (and fail again)
    mtimes = {name: (out / "runs" / name / "metadata.json").stat().st_mtime_ns for name in good}
    tried = []
    real_run = engine.run

    def counting_run(recipe, *args, **kwargs):
        tried.append(recipe.name)
        return real_run(recipe, *args, **kwargs)

    monkeypatch.setattr(engine, "run", counting_run)
    again = sweep_mod.sweep(template, grid, out=out)
    assert sorted(again.skipped) == sorted(good) and sorted(tried) == sorted(bad) and set(again.failed) == set(bad)
    assert {name: (out / "runs" / name / "metadata.json").stat().st_mtime_ns for name in good} == mtimes
    assert [r["perplexity"] for r in again.rows if r["run"] in good] == [ppl[n] for n in good]

    # a changed template value (the seed) changes every point's identity: the finished runs are
    # replaced in place, under the same names
    monkeypatch.setattr(engine, "run", real_run)
    reseeded = sweep_mod.sweep(template, grid, ["seed=1"], out=out)
    assert sorted(reseeded.ran) == sorted(good) and [p.name for p in reseeded.points] == [p.name for p in result.points]
    assert all((out / "runs" / name / "metadata.json").stat().st_mtime_ns != mtimes[name] for name in good)
    assert all(json.loads((out / "runs" / name / "metadata.json").read_text())["seed"] == 1 for name in good)


def test_cli_sweep_exit_status_and_messages(template, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compress.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    bad = runner.invoke(app, ["sweep", str(template), "--grid", "stages.0.sparsity=0.3,1.5"])
    assert bad.exit_code == 2 and "--grid stages.0.sparsity=1.5:" in bad.output
    both = runner.invoke(app, ["sweep", str(template), "--jobs", "2", "--ray"])
    assert both.exit_code == 2 and "--jobs and --ray" in both.output
    missing = tmp_path / "nothing"
    failed = runner.invoke(app, ["sweep", str(template), "--grid", f"model.source={missing}", "-q"])
    assert failed.exit_code == 1 and "1 of 1 runs failed" in failed.output
    assert (tmp_path / "runs" / "sweep-tiny" / "failed" / "source=nothing.txt").read_text().startswith(f"model.source: {missing} does not exist\n")


def test_ray_is_optional(monkeypatch, template, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(CompressError, match=r"^--ray needs the ray package: pip install 'atp-compress\[ray\]'$"):
        sweep_mod.sweep(template, [], out=tmp_path / "sw", ray=True)
    assert not (tmp_path / "sw").exists()  # said before anything was written

    from typer.testing import CliRunner

    from compress.cli import app

    result = CliRunner().invoke(app, ["sweep", str(template), "--out", str(tmp_path / "sw"), "--ray"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ray needs the ray package: pip install 'atp-compress[ray]'"


def test_gather_writes_results_the_driver_cannot_see(template, tmp_path):
    point = sweep_mod.expand(template, [], [], tmp_path / "sw")[0]
    outcome = sweep_mod.Outcome(point.name, results='{"a": 1}\n', metadata='{"run_id": "x"}\n', host="node-7")
    sweep_mod.gather(point, outcome)
    assert (point.output_dir / "results.json").read_text() == '{"a": 1}\n'
    assert (point.output_dir / "metadata.json").read_text() == '{"run_id": "x"}\n'
    assert json.loads((point.output_dir / "gathered.json").read_text())["host"] == "node-7"
    (point.output_dir / "gathered.json").unlink()
    sweep_mod.gather(point, outcome)  # the same metadata there already (shared disk): left alone
    assert not (point.output_dir / "gathered.json").exists()


@pytest.fixture
def local_ray():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray not installed: pip install 'atp-compress[ray]'")
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_jobs_2_and_ray_give_the_same_table(template, tmp_path, local_ray):
    local = sweep_mod.sweep(template, GRID, out=tmp_path / "local", jobs=2)
    assert sorted(local.ran) == sorted(NAMES) and not local.failed
    on_ray = sweep_mod.sweep(template, GRID, out=tmp_path / "ray", ray=True)
    assert sorted(on_ray.ran) == sorted(NAMES) and not on_ray.failed and local_ray.is_initialized()  # attached, not shut down

    a, b = numbers(tmp_path / "local", NAMES), numbers(tmp_path / "ray", NAMES)
    assert a == b  # bit-identical perplexities and per-block ratios
    assert [row["run"] for row in local.rows] == NAMES == [row["run"] for row in on_ray.rows]
    assert same_columns(local.rows) == same_columns(on_ray.rows)
    # real numbers: the grid did what its names say
    for name, (ppl, achieved, ratios) in a.items():
        target = 0.3 if "sparsity=0.3" in name else 0.5
        assert achieved == pytest.approx(target, abs=1 / 32)
        if "atp" in name:
            assert ratios == pytest.approx([target - 0.1, target + 0.1])
        else:
            assert ratios == pytest.approx([target, target])
    assert len({ppl for ppl, _, _ in a.values()}) == 4  # four different models (random weights: no ordering to expect)
    # each run had its own threads: 2 cores / 2 jobs locally, the default 1 on Ray
    meta = json.loads((tmp_path / "local" / "runs" / NAMES[0] / "metadata.json").read_text())
    import os

    assert meta["overrides"] == [f"threads={max(1, os.cpu_count() // 2)}"]
    assert json.loads((tmp_path / "ray" / "runs" / NAMES[0] / "metadata.json").read_text())["overrides"] == ["threads=1"]
