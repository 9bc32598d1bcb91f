"""End to end on a tiny model folder: outputs, provenance, reload parity, atomic publishing, CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.run import engine
from compress.run.recipe import load_recipe
from compress.stages import STAGES


def recipe_file(tmp_path, folder, out, extra=""):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        model: {{source: {folder}}}
        data:
          calibration: {{source: python-docs, nsamples: 4, seqlen: 32}}
          validation: {{source: python-docs, nsamples: 2, seqlen: 32}}
          evaluation: {{source: python-docs, nsamples: 4, seqlen: 32}}
        stages:
          - kind: prune
            method: wanda
            sparsity: 0.6
            allocation: {{kind: atp, beta: auto, trials: 3}}
        output_dir: {out}
        """) + extra)
    return path


def run(path, overrides=(), overwrite=False):
    return engine.run(load_recipe(path, list(overrides)), path, list(overrides), overwrite)


def test_run_writes_a_complete_loadable_output(tmp_path, tiny_folder):
    out = tmp_path / "out"
    path = recipe_file(tmp_path, tiny_folder, out)
    result = run(path)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metadata.json", "results.json", "report.md",
            "stage0_sparsity.png", "stage0_beta_search.png"} <= names
    assert not list(tmp_path.glob(".out.partial-*"))

    results = json.loads((out / "results.json").read_text())
    metadata = json.loads((out / "metadata.json").read_text())
    stage = results["stages"][0]
    assert [t["beta"] for t in stage["search"]][0] == 0.0 and len(stage["search"]) == 3
    assert results["perplexity"]["dense"]["tokens"] == 4 * 31 == results["perplexity"]["compressed"]["tokens"]
    assert results["export"]["hf"]["parity"]["identical"] is True
    assert metadata["recipe_sha256"] == load_recipe(path).sha256()
    assert metadata["versions"]["torch"].startswith("2.") and "commit" in metadata["git"]
    assert metadata["peak_rss_mb"] > 0 and metadata["timings"]["stage0_prune"] > 0
    assert metadata["recipe"]["stages"][0]["allocation"]["kind"] == "atp"

    # the saved model has exactly the recorded per-layer sparsity
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, achieved in metadata["layer_achieved"]["0"].items():
        W = reloaded.get_submodule(name).weight
        assert (W == 0).float().mean().item() == pytest.approx(achieved, abs=1e-7)
    assert stage["achieved"] == pytest.approx(0.6, abs=1 / 32)
    assert result.output_dir == out


def test_existing_output_needs_overwrite_and_failed_run_keeps_it(tmp_path, tiny_folder, monkeypatch):
    out = tmp_path / "out"
    path = recipe_file(tmp_path, tiny_folder, out, )
    run(path, ["stages.0.allocation.beta=0.0"])
    before = (out / "results.json").read_text()
    with pytest.raises(CompressError, match="already exists; pass --overwrite"):
        run(path)

    def crash(model, ctx, cfg):
        raise RuntimeError("stage crashed")

    monkeypatch.setitem(STAGES, "prune", (STAGES["prune"][0], crash))
    with pytest.raises(RuntimeError, match="stage crashed"):
        run(path, overwrite=True)
    assert (out / "results.json").read_text() == before  # the earlier run is untouched
    assert not list(tmp_path.glob(".out.partial-*")) and not (tmp_path / "out.old").exists()


def test_overwrite_replaces_after_success(tmp_path, tiny_folder):
    out = tmp_path / "out"
    path = recipe_file(tmp_path, tiny_folder, out)
    run(path, ["stages.0.allocation.beta=0.0"])
    run(path, ["stages.0.allocation.beta=0.0", "stages.0.sparsity=0.3"], overwrite=True)
    assert json.loads((out / "results.json").read_text())["stages"][0]["target"] == 0.3
    assert not (tmp_path / "out.old").exists()


# ---------------------------------------------------------------- command line


def cli(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}  # the default: bars on
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


@pytest.mark.parametrize(
    "recipe,message",
    [
        ("stages:\n  - kind: prune\n    sparsity: 2\n", "stages[0].sparsity: Input should be less than 1"),
        ("stages:\n  - {kind: distill}\n", "'distill' found using 'kind' does not match any of the expected tags: 'prune'"),
        ("data:\n  calibration: {source: nowhere.txt}\n", "data.calibration.source: nowhere.txt not found"),
        ("model: {source: ./nowhere}\n", "model.source: ./nowhere does not exist"),
        (
            "stages:\n  - {kind: prune, sparsity: 0.7, allocation: {kind: atp, beta: 0.05}}\n",
            "stages[0].allocation.beta: atp: beta=0.05 gives block ratios",
        ),
    ],
)
def test_validate_errors_are_one_line_exit_2(tmp_path, recipe, message):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    result = cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr.replace("\n", " ") and "Traceback" not in result.stderr


def test_validate_ok_and_run_refuses_missing_recipe(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("stages:\n  - {kind: prune, sparsity: 0.5}\n")
    ok = cli("validate", str(path), "--set", "stages.0.method=magnitude")
    assert ok.returncode == 0 and "ok" in ok.stderr
    missing = cli("run", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "recipe file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_help_on_every_command():
    for command in ("run", "validate", "eval"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout


def test_eval_command_reports_perplexity(tiny_folder):
    result = cli("eval", str(tiny_folder), "--seqlen", "32", "--nsamples", "3", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["windows"] == 3 and report["tokens"] == 3 * 31 and report["ppl"] > 1


def test_run_with_zero_shot_tasks(tmp_path, tiny_folder):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'atp-compress[eval]')")
    from zeroshot_items import ITEMS, write_data

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    write_data(tasks_dir)
    extra = f"eval: {{tasks: [piqa, winogrande], tasks_dir: {tasks_dir}, limit: 2}}\n"
    out = tmp_path / "out"
    path = recipe_file(tmp_path, tiny_folder, out, extra)
    results = run(path, ["stages.0.allocation.beta=0.0"]).results
    for which in ("dense", "compressed"):
        zs = results["zero_shot"][which]
        assert {t: m["n"] for t, m in zs["tasks"].items()} == {"piqa": 2, "winogrande": 2}
        accs = [m["acc"] for m in zs["tasks"].values()]
        assert all(a in (0.0, 0.5, 1.0) for a in accs) and zs["mean_acc"] == pytest.approx(sum(accs) / 2)
    assert "zero-shot mean acc" in (out / "report.md").read_text()
    assert len(ITEMS["piqa"]) > 2  # limit really cut the task


def test_tasks_without_dir_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("eval: {tasks: [piqa]}\n")
    with pytest.raises(CompressError, match=r"r\.yaml:1: eval: tasks_dir is required with the local tasks \['piqa'\]"):
        load_recipe(path)
    path.write_text("eval: {tasks: [mmlu]}\n")  # one of lm-eval's own tasks: read from its dataset, no folder needed
    assert load_recipe(path).eval.tasks == ["mmlu"]


def test_quiet_prints_no_progress_bars(tmp_path, tiny_folder):
    out = tmp_path / "out"
    path = recipe_file(tmp_path, tiny_folder, out)
    loud = cli("run", str(path), "--set", "stages.0.allocation.beta=0.0")
    assert loud.returncode == 0 and "%|" in loud.stderr  # bars show by default
    quiet = cli("run", str(path), "--set", "stages.0.allocation.beta=0.0", "--overwrite", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "%|" not in quiet.stderr and "it/s" not in quiet.stderr
    assert "compressed" in quiet.stdout  # the final table


def file_hash(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_recipe_and_seed_give_bit_identical_weights(tmp_path, tiny_folder, method):
    """Two runs of one recipe (beta search included) write the same model.safetensors byte for
    byte; Wanda (float32 calibration) also on 1 thread instead of 2. SparseGPT's Hessian sums
    depend on how BLAS splits them over threads (README: Reproducibility)."""
    hashes = {}
    runs = (("first", 2), ("second", 2)) + ((("one-thread", 1),) if method == "wanda" else ())
    for name, threads in runs:
        out = tmp_path / name
        path = recipe_file(tmp_path, tiny_folder, out)
        result = run(path, [f"stages.0.method={method}", f"threads={threads}"])
        hashes[name] = file_hash(out / "model.safetensors")
        assert result.metadata["machine"]["torch_threads"] == threads
    assert len(set(hashes.values())) == 1, hashes


def test_export_check_frees_the_model_before_reloading(tmp_path, tiny_folder, monkeypatch):
    """The check reloads the export into a second model: the in-memory one must be gone by then,
    or the run's peak memory holds two models."""
    import dataclasses
    import gc
    import weakref

    from compress import export

    refs, alive = [], []
    hf = export.EXPORTERS["hf"]

    def remember(model, *args):
        refs.append(weakref.ref(model))
        return hf.save(model, *args)

    def check(*args):
        gc.collect()
        alive.append(refs[0]() is not None)
        return {}

    monkeypatch.setitem(export.EXPORTERS, "hf", dataclasses.replace(hf, save=remember, check=check))
    run(recipe_file(tmp_path, tiny_folder, tmp_path / "out"), ["stages.0.allocation.beta=0.0"])
    assert alive == [False]
