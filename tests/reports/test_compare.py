"""compress compare and run identity: finished runs are read, never rerun; the table and plots
carry the runs' own numbers."""

import csv
import json
import shutil
import textwrap

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.errors import CompressError
from compress.reports import compare, pareto
from compress.run import engine, identity
from compress.run.compare import entries_from_args
from compress.run.recipe import load_recipe


def write_recipe(tmp_path, folder, name, stages, text=None, extra=""):
    path = tmp_path / f"{name}.yaml"
    text_source = text or "python-docs"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{source: {folder}}}
        data:
          calibration: {{source: {text_source}, nsamples: 4, seqlen: 32}}
          validation: {{source: {text_source}, nsamples: 2, seqlen: 32}}
          evaluation: {{source: {text_source}, nsamples: 4, seqlen: 32}}
        stages: {stages}
        output_dir: {tmp_path / 'runs' / name}
        """) + extra)
    return path


STAGES = {
    "dense": "[]",
    "uniform": "[{kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: uniform}}]",
    "atp": "[{kind: prune, method: wanda, sparsity: 0.5, allocation: {kind: atp, beta: auto, trials: 3}}]",
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer):
    """Three finished runs of a tiny Llama: dense, uniform and ATP Wanda 50%."""
    from conftest import tiny_model

    tmp = tmp_path_factory.mktemp("compare")
    folder = tmp / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipes = {name: write_recipe(tmp, folder, name, stages) for name, stages in STAGES.items()}
    for path in recipes.values():
        engine.run(load_recipe(path), path)
    return tmp, folder, recipes


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compare loaded a model")

    monkeypatch.setattr(engine, "load_model", refuse)
    monkeypatch.setattr("compress.model.load.load_model", refuse)
    monkeypatch.setattr(engine, "run", refuse)


def test_compare_reads_three_finished_runs_without_loading_a_model(finished, no_model_loading, tmp_path):
    tmp, _, recipes = finished
    out = tmp_path / "cmp"
    # two run folders and one recipe whose finished run is found by its run_id
    items = [str(tmp / "runs" / "dense"), str(tmp / "runs" / "uniform"), str(recipes["atp"])]
    rows = compare.write_comparison(entries_from_args(items), out)

    assert {p.name for p in out.iterdir()} >= {"comparison.md", "comparison.csv", "comparison.json", "allocation.png", "pareto_size.png", "beta_search.png"}
    assert [r["run"] for r in rows] == ["dense", "uniform", "atp"]
    for row in rows:  # every number is the run's own
        results = json.loads((tmp / "runs" / row["run"] / "results.json").read_text())
        which = "compressed" if results["stages"] else "dense"
        assert row["perplexity"] == results["perplexity"][which]["ppl"]
        assert row["sparsity"] == results["size"]["block_linear_sparsity"]
        assert row["file_mb"] == results["size"]["files_mb"]["hf"]
    assert rows[0]["sparsity"] == 0.0 and rows[1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows[2]["command"] == f"compress run {recipes['atp']}"
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["perplexity"]) for r in table] == [r["perplexity"] for r in rows]
    md = (out / "comparison.md").read_text()
    assert "| atp | model |" in md and "![Quality vs size](pareto_size.png)" in md and "wanda 50% atp b=" in md


def test_rows_carried_from_an_earlier_table_stay_in_it(finished, no_model_loading, tmp_path):
    """A committed table keeps rows whose run folders are gone (benchmarks/comparison.py)."""
    tmp, _, _ = finished
    first = compare.write_comparison(entries_from_args([str(tmp / "runs" / "dense"), str(tmp / "runs" / "uniform")]), tmp_path / "a")
    carried = [row for row in first if row["run"] == "dense"]
    rows = compare.write_comparison(entries_from_args([str(tmp / "runs" / "uniform")]), tmp_path / "b", carried)
    assert [r["run"] for r in rows] == ["dense", "uniform"] and rows[0] == first[0]
    assert json.loads((tmp_path / "b" / "comparison.json").read_text())["rows"][0]["perplexity"] == first[0]["perplexity"]
    assert "| dense | model |" in (tmp_path / "b" / "comparison.md").read_text()


def test_rows_measured_with_other_package_versions_are_named(finished, no_model_loading, tmp_path):
    """The same run_id can hold numbers from another transformers: the report says which rows."""
    tmp, _, _ = finished
    runs = tmp_path / "runs"
    for name in ("dense", "uniform", "atp"):
        shutil.copytree(tmp / "runs" / name, runs / name)
    same = compare.write_comparison(entries_from_args([str(runs / n) for n in ("dense", "uniform")]), tmp_path / "same")
    assert same[0]["versions"]["transformers"] == same[1]["versions"]["transformers"]
    assert "## Versions differ" not in (tmp_path / "same" / "comparison.md").read_text()

    meta = json.loads((runs / "uniform" / "metadata.json").read_text())
    meta["versions"]["transformers"] = "5.17.0"
    (runs / "uniform" / "metadata.json").write_text(json.dumps(meta))
    rows = compare.write_comparison(entries_from_args([str(runs / n) for n in ("dense", "uniform", "atp")]), tmp_path / "other")
    current = rows[0]["versions"]["transformers"]
    assert compare.version_differences(rows) == {"transformers": {current: ["dense", "atp"], "5.17.0": ["uniform"]}}
    md = (tmp_path / "other" / "comparison.md").read_text()
    assert f"- transformers: {current} (dense, atp); 5.17.0 (uniform)" in md


def test_a_recipe_whose_inputs_changed_is_not_read_as_finished(finished, tmp_path):
    tmp, folder, recipes = finished
    recipe = load_recipe(recipes["uniform"])
    out = tmp / "runs" / "uniform"
    assert identity.finished(out, recipe)
    assert not identity.finished(out, load_recipe(recipes["uniform"], ["stages.0.sparsity=0.4"]))
    # a value written at its default is the same computation (and a field added to the schema
    # with a default does not change the id of finished runs)
    assert identity.run_id(load_recipe(recipes["uniform"], ["seed=0", "model.stream=false"])) == identity.run_id(recipe)
    # where and how fast a run goes is not what it computes
    assert identity.run_id(load_recipe(recipes["uniform"], ["output_dir=/elsewhere", "threads=1", "name=x"])) == identity.run_id(recipe)
    # the same recipe on other text is another run
    text = tmp_path / "text.txt"
    text.write_text("hello world\n" * 2000)
    changed = write_recipe(tmp_path, folder, "t", STAGES["uniform"], text=text)
    before = identity.run_id(load_recipe(changed))
    text.write_text("hello there\n" * 2000)
    assert identity.run_id(load_recipe(changed)) != before


def test_no_run_refuses_a_recipe_without_a_finished_run(finished, no_model_loading, tmp_path):
    tmp, folder, _ = finished
    fresh = write_recipe(tmp_path, folder, "fresh", STAGES["uniform"])
    with pytest.raises(CompressError, match="no finished run of this recipe"):
        entries_from_args([str(fresh)], run_missing=False)


def test_compare_cli_and_bad_input(finished, no_model_loading, tmp_path):
    tmp, _, _ = finished
    result = CliRunner().invoke(app, ["compare", str(tmp / "runs" / "dense"), str(tmp / "runs" / "atp"), "--out", str(tmp_path / "c"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "comparison.md").is_file()
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "no such run folder or recipe file" in result.output


def test_failed_entries_are_rows_with_their_error(finished, tmp_path):
    tmp, _, _ = finished
    entries = [compare.Entry("dense", tmp / "runs" / "dense"), compare.Entry("broken", None, "compress run x.yaml", "data.calibration.source: x.txt not found")]
    rows = compare.write_comparison(entries, tmp_path / "c")
    assert rows[1]["error"] == "data.calibration.source: x.txt not found"
    assert "| broken | failed: data.calibration.source: x.txt not found |" in (tmp_path / "c" / "comparison.md").read_text()


def test_pareto_frontier():
    # (MB, ppl): b is beaten by a (smaller and better); d ties c on size but is worse
    points = [(100, 20.0), (150, 25.0), (200, 15.0), (200, 16.0), (300, 12.0)]
    assert pareto.frontier(points) == [0, 2, 4]
    # speed is a benefit: higher tokens/s is better
    assert pareto.frontier([(10, 20.0), (20, 20.0), (30, 25.0)], cost_lower=False) == [1, 2]
