"""`compress run | validate | eval`. Bad input: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

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
        except CompressError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted; nothing was written to output_dir")
            raise typer.Exit(130) from None

    return wrapper


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
@user_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="Replace output_dir if it exists (only once the new run is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and the final table."),
) -> None:
    """Run a recipe: compress, evaluate, export, and write a report into output_dir."""
    from compress import engine
    from compress.recipe import load_recipe
    from compress.report import summary_table

    setup_logging(quiet)
    overrides = set_ or []
    parsed = load_recipe(recipe, overrides)
    result = engine.run(parsed, recipe, overrides, overwrite)
    Console().print(summary_table(result.results))
    console.print(f"wrote {result.output_dir}/ (report.md, results.json, metadata.json, model)")


@app.command()
@user_errors
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Check a recipe (schema, files, values) without loading a model."""
    from compress.recipe import load_recipe
    from compress.validate import check_recipe

    parsed = load_recipe(recipe, set_ or [])
    for line in check_recipe(parsed):
        console.print(line, highlight=False)
    console.print(f"{recipe}: ok")


@app.command("eval")
@user_errors
def eval_(
    model: str = typer.Argument("smollm2-135m", help="Registered name, HF folder, .gguf file or hub id."),
    data: str = typer.Option("python-docs", help="Evaluation text: a .txt/.jsonl file, python-docs, wikitext2 or c4."),
    seqlen: int = typer.Option(512, min=2, help="Window length in tokens."),
    nsamples: Optional[int] = typer.Option(None, min=1, help="Number of windows (default: all)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt checkpoints."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Perplexity of a model on a whole text (every full window, or the first --nsamples)."""
    from compress.data import SegmentsConfig, build_segments
    from compress.evaluate import perplexity
    from compress.model import DTYPES, load_model

    setup_logging(quiet)
    if dtype not in DTYPES:
        raise CompressError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    loaded = load_model(model, dtype, allow_pickle)
    # The whole source is the evaluation part: nothing here is used for calibration.
    segments = build_segments({"evaluation": SegmentsConfig(source=data, seqlen=seqlen, nsamples=nsamples)}, loaded.tokenizer)
    result = perplexity(loaded.model, segments["evaluation"].tokens)
    print(json.dumps({"model": model, "data": data, **result.as_dict()}, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
