"""`compress run | validate | eval | compare | sweep | export | install-converter`. Bad input: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from compress.errors import CompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress causal language models from a YAML recipe.")
console = Console(stderr=True)
SET_HELP = "Override a recipe value, e.g. --set stages.0.sparsity=0.6 (repeatable; the value is read as YAML)."


def user_errors(fn):
    """Turn CompressError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompressError as err:  # escaped: 'atp-compress[ray]' or a --grid value like [a] prints as written
            console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted; nothing was written to output_dir")
            raise typer.Exit(130) from None

    return wrapper


def setup_logging(quiet: bool) -> None:
    """quiet: warnings and the final table only, no progress bars (ours, transformers', lm-eval's)."""
    if quiet:
        # tqdm reads TQDM_* defaults when it is first imported, which happens after this point
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "tqdm" in sys.modules:  # imported already (a caller's own code): no bar can be turned off
            logging.getLogger("compress").warning("--quiet: tqdm was imported before the CLI; progress bars may show")
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    # Libraries that log at import or per call (torchao, installed with gptqmodel, warns about
    # CUDA-only kernels at import; torch about its own deprecations).
    for noisy in ("transformers", "accelerate", "huggingface_hub", "lm-eval", "lm_eval", "torchao", "torch.utils._pytree", "gptqmodel", "torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace output_dir if it exists (only once the new run is complete)."),
    restart: bool = typer.Option(False, help="Discard the checkpoints of an interrupted run of this recipe and start over (a killed run resumes by default)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and the final table."),
) -> None:
    """Run a recipe: compress, evaluate, export, and write a report into output_dir."""
    setup_logging(quiet)  # before the imports below: they import tqdm
    from compress.reports.report import summary_table
    from compress.run import engine
    from compress.run.recipe import load_recipe

    overrides = set_ or []
    parsed = load_recipe(recipe, overrides)
    result = engine.run(parsed, recipe, overrides, overwrite, restart)
    Console().print(summary_table(result.results))
    console.print(f"wrote {result.output_dir}/ (report.md, results.json, metadata.json, model)")


@app.command()
@user_errors
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Check a recipe (schema, files, values) without loading a model."""
    setup_logging(False)
    from compress.run.recipe import load_recipe
    from compress.run.validate import check_recipe

    parsed = load_recipe(recipe, set_ or [])
    for line in check_recipe(parsed, recipe):
        console.print(line, highlight=False)
    console.print(f"{recipe}: ok")


@app.command("eval")
@user_errors
def eval_(
    model: str = typer.Argument("smollm2-135m", help="Registered name, HF folder, run folder, .gguf file, ONNX export folder or hub id."),
    runtime: str = typer.Option("torch", help="torch (our loader; a GGUF dequantised), llama.cpp (a .gguf file as it is) or onnx (an ONNX export's folder)."),
    data: str = typer.Option("python-docs", help="Evaluation text: a .txt/.jsonl file, python-docs, wikitext2 or c4; 'none' for no perplexity."),
    seqlen: int = typer.Option(512, min=2, help="Window length in tokens."),
    nsamples: Optional[int] = typer.Option(None, min=1, help="Number of windows (default: all)."),
    tasks: Optional[str] = typer.Option(None, help="Zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,openbookqa,winogrande,hellaswag (need --tasks-dir) or lm-eval task names."),
    tasks_dir: Optional[Path] = typer.Option(None, help="Folder with the local task files (piqa.jsonl, ..., hellaswag-val.txt)."),
    limit: Optional[int] = typer.Option(None, min=1, help="First N items of each task."),
    speed: bool = typer.Option(False, help="Also measure tokens/s (prefill 128/512, decode 128) in the runtime."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (torch runtime)."),
    bos: str = typer.Option("auto", help="BOS first in every window: auto (as the tokenizer does), true or false."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt checkpoints."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Perplexity (every full window of a text, or the first --nsamples), zero-shot accuracy and
    tokens/s of a model or an exported file in its own runtime; JSON on stdout."""
    setup_logging(quiet)
    from compress.model.load import DTYPES
    from compress.run.eval_command import evaluate_source

    if dtype not in DTYPES:
        raise CompressError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    choices = {"auto": "auto", "true": True, "false": False}
    if bos not in choices:
        raise CompressError(f"--bos: expected auto, true or false, got {bos!r}")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else []
    result = evaluate_source(model, runtime, None if data == "none" else data, seqlen, nsamples, dtype, choices[bos], allow_pickle,
                             task_list, tasks_dir, limit, speed)
    print(json.dumps(result, indent=2))


@app.command()
@user_errors
def compare(
    items: list[str] = typer.Argument(..., help="Finished run folders and/or recipe .yaml files (a recipe without a finished run is run first)."),
    out: Path = typer.Option(Path("runs/comparison"), "--out", help="Folder for comparison.md, .csv, .json and the plots."),
    run_missing: bool = typer.Option(True, "--run/--no-run", help="Run recipes that have no finished run (--no-run: fail instead)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Put finished runs side by side: one table (perplexity, zero-shot accuracy, size, speed) and plots."""
    setup_logging(quiet)
    from compress.reports.compare import write_comparison
    from compress.run.compare import entries_from_args

    write_comparison(entries_from_args(items, run_missing), out)
    console.print(f"wrote {out}/comparison.md (and .csv, .json, plots)", highlight=False)


@app.command()
@user_errors
def sweep(
    template: Path = typer.Argument(..., help="Template recipe YAML file."),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="key.path=value1,value2,... (repeatable): one run per combination of the values; each value is read as YAML, commas inside [] or {} do not split."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a template value in every run, e.g. --set threads=4 (repeatable; the value is read as YAML)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder: recipes/, runs/, failed/, comparison.md (default runs/sweep-<template name>)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Runs at a time in local processes (default 1), each with cpu_count/jobs torch threads unless the recipe sets threads."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray instead: start or attach a local Ray (ray.init()); each run asks for its recipe's threads (default 1) as CPUs. Needs pip install 'atp-compress\\[ray]'."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDRESS", help="Run on the Ray cluster at ADDRESS (implies --ray), e.g. ray://head:10001 or auto."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings, failures and the summary."),
) -> None:
    """Run a template recipe over a grid of values (locally in parallel or on Ray), resume what
    finished, and write one comparison table. Exit status 1 if some run failed."""
    setup_logging(quiet)
    from compress.run.sweep import sweep as run_sweep

    ray = ray or ray_address is not None
    if ray and jobs is not None:
        raise CompressError("--jobs and --ray: give one (Ray decides how many runs fit at a time)")
    result = run_sweep(template, grid or [], set_ or [], out, jobs or 1, ray, ray_address)
    total, failed, where = len(result.points), len(result.failed), escape(str(result.out))
    console.print(f"{total} runs: {len(result.ran)} ran, {len(result.skipped)} finished earlier (skipped), {failed} failed", highlight=False)
    console.print(f"wrote {where}/comparison.md (and .csv, .json, plots); recipes in {where}/recipes/", highlight=False)
    if failed:
        console.print(f"[bold red]{failed} of {total} runs failed[/] (errors in {where}/failed/; rerun the sweep to retry them)", highlight=False)
        raise typer.Exit(1)


@app.command("export")
@user_errors
def export_(
    run_dir: Path = typer.Argument(..., help="A finished run's output_dir."),
    to: str = typer.Option(..., "--to", help="hf (sparse or dense safetensors), gguf (llama.cpp) or onnx (ONNX Runtime)."),
    type_: Optional[list[str]] = typer.Option(None, "--type", help="GGUF type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k (repeatable; default f16)."),
    format_: Optional[str] = typer.Option(None, "--format", help="With --to hf: sparse (default) or dense."),
    check: bool = typer.Option(True, help="Reload the export in its runtime and compare with the model."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export of the same kind (only once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Export a finished run to another format, without compressing it again."""
    setup_logging(quiet)
    from compress.run.reexport import export_run

    info = export_run(run_dir, to, type_ or [], format_, check, overwrite)
    notes = "; ".join(info.get("notes", []))
    console.print(f"wrote {to} export into {run_dir}/ ({info['format']}){': ' + notes if notes else ''}", highlight=False)


@app.command("install-converter")
@user_errors
def install_converter(
    version: Optional[str] = typer.Option(None, help="llama-cpp-python version whose converter to keep (default: the installed one's, else 0.3.36)."),
) -> None:
    """Keep llama.cpp's HF -> GGUF converter (and its tokenizer test vocabularies) beside this
    install: pip fetches llama-cpp-python's source distribution, which carries them."""
    setup_logging(False)
    from compress.export.gguf import convert as llama_convert

    console.print(f"llama.cpp's converter is in {escape(str(llama_convert.install(version)))}", highlight=False)


def main() -> None:
    """The CLI, with typer's own usage errors (a bad option value, a missing argument) printed as
    one line with exit status 2, like every other user error."""
    command = typer.main.get_command(app)
    if len(sys.argv) == 1:  # no command: the help, and the usage-error status
        command.main(["--help"], standalone_mode=False)
        sys.exit(2)
    try:
        code = command.main(standalone_mode=False)
    except typer.TyperException as err:  # usage errors (bad parameter, no such command / option)
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx is not None else "compress"
        console.print(f"[bold red]error:[/] {where}: {err.format_message()} (see {where} --help)", highlight=False, soft_wrap=True)
        code = getattr(err, "exit_code", 2)
    except typer.Abort:
        console.print("interrupted")
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
