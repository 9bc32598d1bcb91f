"""`compress sweep`: one template recipe, a grid of overrides, one run per grid point.

    template + --set (fixed) + one value per --grid key  ->  DIR/recipes/<name>.yaml  ->  DIR/runs/<name>/

Every point's recipe is written out whole (its name and output_dir included), so that
`compress run DIR/recipes/<name>.yaml` reproduces it alone. All points are validated before any
runs. Runs go to local processes (--jobs) or to Ray tasks (--ray); either way the worker is
`run_point`, which never raises: a failed run comes back as its one-line error, is written to
DIR/failed/<name>.txt and shows in the comparison table. A point whose output_dir already holds
this recipe's finished result (compress.identity.finished) is skipped, so rerunning a sweep resumes it.

This module imports only the standard library and yaml at the top: spawned workers import it to
find run_point, and must set their environment (no progress bars) before torch, transformers
and tqdm are imported.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from compress.errors import CompressError
from compress.reports.compare import Entry, write_comparison
from compress.run import engine
from compress.run.identity import finished
from compress.run.recipe import Recipe, apply_override, describe_error, load_recipe, yaml_path

log = logging.getLogger("compress")

RAY_MISSING = "--ray needs the ray package: pip install 'atp-compress[ray]'"
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
NOISY_LOGGERS = ("transformers", "accelerate", "huggingface_hub", "lm-eval", "lm_eval", "torchao", "torch.utils._pytree",
                 "gptqmodel", "torch.onnx", "onnxscript")
MAX_NAME = 100  # characters of a point's name (a folder and a file name)


@dataclass(frozen=True)
class Point:
    name: str
    overrides: tuple[str, ...]  # its --grid assignments, "key=value", in --grid order
    recipe_file: Path  # DIR/recipes/<name>.yaml
    output_dir: Path  # DIR/runs/<name>
    text: str  # the recipe file's YAML
    threads: int | None  # the recipe's own `threads` (None: the sweep chooses)


@dataclass
class Outcome:
    """What a worker sends back: small enough for Ray to carry between machines."""

    name: str
    error: str | None = None  # one line; None: finished
    detail: str | None = None  # a traceback, for errors that are not CompressError
    results: str | None = None  # results.json, as written
    metadata: str | None = None  # metadata.json, as written
    host: str = ""
    seconds: float = 0.0


@dataclass
class SweepResult:
    out: Path
    points: list[Point]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished by an earlier sweep
    failed: dict[str, str] = field(default_factory=dict)  # name -> one-line error
    rows: list[dict] = field(default_factory=list)  # compress.compare.write_comparison's rows


# ---------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """Split "a,b,[1, 2],{k: v, w: x}" at the commas outside brackets and quotes."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """--grid key.path=v1,v2,... -> [(key.path, [v1, v2, ...])], the values still YAML text."""
    grid, seen = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CompressError(f"--grid {item}: expected key.path=value1,value2,...")
        if key in seen:
            raise CompressError(f"--grid {item}: {key} is given twice; list all its values in one --grid")
        seen.add(key)
        split = split_values(values)
        if any(v == "" for v in split):
            raise CompressError(f"--grid {item}: an empty value (two commas, or a comma at an end)")
        for value in split:
            try:
                yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise CompressError(f"--grid {key}={value}: not valid YAML: {getattr(err, 'problem', err)}") from None
        if len(set(split)) < len(split):
            twice = next(v for v in split if split.count(v) > 1)
            raise CompressError(f"--grid {item}: the value {twice} is listed twice")
        grid.append((key, split))
    return grid


def labels(keys: list[str]) -> list[str]:
    """Each key's shortest dotted tail that no other key shares: stages.0.sparsity -> sparsity;
    beside stages.1.sparsity -> 0.sparsity and 1.sparsity."""
    parts = [key.split(".") for key in keys]
    out = []
    for mine in parts:
        for n in range(1, len(mine) + 1):
            if not any(other != mine and other[-n:] == mine[-n:] for other in parts):
                break
        out.append(".".join(mine[-n:]))
    return out


def safe(text: str) -> str:
    """A value as part of a file name: letters, digits, '.', '+', '-'."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "empty"


def short(value: str) -> str:
    """A path or hub id by its last part (/models/llama-7b -> llama-7b); other values whole."""
    if "/" in value and not value.lstrip().startswith(("[", "{")):
        return value.rstrip("/").rsplit("/", 1)[-1] or value
    return value


def point_names(grid: list[tuple[str, list[str]]], combos: list[tuple[str, ...]], fallback: str) -> list[str]:
    """sparsity=0.6_kind=atp per point; made unique, and cut to MAX_NAME characters with a hash."""
    tags = labels([key for key, _ in grid])
    names, used = [], set()
    for combo in combos:
        name = "_".join(f"{safe(tag)}={safe(short(value))}" for tag, value in zip(tags, combo)) or safe(fallback)
        if len(name) > MAX_NAME:
            name = name[: MAX_NAME - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        base, k = name, 2
        while name.lower() in used:  # case-insensitive file systems
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def expand(template: Path, grid_items: list[str], sets: list[str], out: Path) -> list[Point]:
    """Every grid point's recipe, validated; nothing is written. The first bad point raises one
    CompressError naming its --grid item (or the whole point, when no single item is to blame)."""

    load_recipe(template, sets)  # the template and the fixed --set values alone: their own errors
    text = template.read_text(encoding="utf-8")
    base = yaml.safe_load(text)
    for item in sets:
        apply_override(base, item)
    grid = parse_grid(grid_items)
    combos = list(itertools.product(*(values for _, values in grid)))
    names = point_names(grid, combos, template.stem)

    points = []
    for name, combo in zip(names, combos):
        raw = copy.deepcopy(base)
        assigned = [f"{key}={value}" for (key, _), value in zip(grid, combo)]
        for (key, _), item in zip(grid, assigned):
            try:
                apply_override(raw, item)
            except CompressError as err:
                raise CompressError(str(err).replace(f"--set {key}", f"--grid {item}", 1)) from None
        output_dir = out / "runs" / name
        raw["name"], raw["output_dir"] = name, str(output_dir)
        try:
            recipe = Recipe.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            message = describe_error(first, raw, text, template, len(err.errors()))
            where = [str(k) for k in yaml_path(first["loc"], raw)]
            blamed = [item for (key, _), item in zip(grid, assigned) if prefix_of(key.split("."), where)]
            # the deepest matching key: stages.0.allocation.beta rather than stages.0.allocation
            culprit = f"--grid {max(blamed, key=lambda i: i.split('=', 1)[0].count('.'))}" if blamed else f"grid point {name} ({', '.join(assigned)})"
            raise CompressError(f"{culprit}: {message}") from None
        recipe_text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
        points.append(Point(name, tuple(assigned), out / "recipes" / f"{name}.yaml", output_dir, recipe_text, recipe.threads))
    return points


def prefix_of(a: list[str], b: list[str]) -> bool:
    """One key path starts the other (an error can sit above or below the key that was set)."""
    n = min(len(a), len(b))
    return n > 0 and a[:n] == b[:n]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- one run (the worker)


def quiet_worker() -> None:
    """A worker's process: no progress bars, warnings only (parallel runs share one terminal).
    Runs before the worker imports torch / transformers / tqdm, which read these at import."""
    os.environ.update(QUIET_ENV)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextmanager
def working_dir(path: str | None):
    """The driver's folder, where relative paths in a recipe point; left alone on a machine that
    lacks it (a Ray node without the shared file system: its recipe paths must then be absolute)."""
    before = os.getcwd()
    if path and os.path.isdir(path):
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def one_line(err: BaseException, limit: int = 500) -> str:
    """CompressError's message, else "TypeName: message", on one line (a Ray error carries the
    remote traceback in its message: cut, the whole of it goes to the failed/ file)."""
    text = str(err) if isinstance(err, CompressError) else f"{type(err).__name__}: {err}"
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_point(name: str, recipe_file: str, text: str, threads: int | None, cwd: str | None = None) -> Outcome:
    """Run one point's recipe (its YAML text: a Ray node need not see the driver's files) and
    return its results.json and metadata.json. Never raises; a failure is the outcome's error."""
    start = time.perf_counter()
    outcome = Outcome(name, host=socket.gethostname())
    try:
        with working_dir(cwd):
            raw = yaml.safe_load(text)
            overrides = []
            if raw.get("threads") is None and threads:
                raw["threads"] = threads
                overrides = [f"threads={threads}"]
            recipe = Recipe.model_validate(raw)
            # output_dir holds no result of this recipe (the driver checked): replace it
            result = engine.run(recipe, Path(recipe_file), overrides, overwrite=True)
            outcome.results = (result.output_dir / "results.json").read_text(encoding="utf-8")
            outcome.metadata = (result.output_dir / "metadata.json").read_text(encoding="utf-8")
    except Exception as err:  # noqa: BLE001 -- every failure is recorded; the sweep goes on
        outcome.error = one_line(err)
        if not isinstance(err, CompressError):
            outcome.detail = traceback.format_exc()
    outcome.seconds = round(time.perf_counter() - start, 1)
    return outcome


def run_point_quietly(*args) -> Outcome:
    """run_point in a process of its own (a Ray worker): warnings only."""
    quiet_worker()
    return run_point(*args)


# ---------------------------------------------------------------- executors


def run_in_process(points: list[Point], threads: int, cwd: str):
    for point in points:
        yield run_point(point.name, str(point.recipe_file), point.text, point.threads or threads, cwd)


def run_local(points: list[Point], jobs: int, cwd: str):
    """Spawned processes (fork would copy torch's thread pools); one fresh process per run, so
    its metadata's peak memory is its own and nothing leaks from one run into the next."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=quiet_worker, **fresh) as pool:
        futures = {pool.submit(run_point, p.name, str(p.recipe_file), p.text, p.threads or threads, cwd): p for p in points}
        try:
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # noqa: BLE001 -- the worker process died (killed, out of memory)
                    yield Outcome(futures[future].name, error=one_line(err), detail=str(err))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def require_ray():
    try:
        import ray
    except ImportError:
        raise CompressError(RAY_MISSING) from None
    return ray


def run_ray(points: list[Point], address: str | None, cwd: str):
    """One Ray task per run, asking for as many CPUs as the run has threads (the recipe's
    `threads`, else 1) and a GPU for a recipe on cuda; results come back by value."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address) if address else ray.init()
    try:
        # a fresh worker process per run (max_calls=1), as locally; a failed run is not retried
        task = ray.remote(max_calls=1, max_retries=0, runtime_env={"env_vars": QUIET_ENV})(run_point_quietly)
        refs = {}
        for p in points:
            threads = p.threads or 1
            gpus = 0 if yaml.safe_load(p.text).get("model", {}).get("device", "cpu") == "cpu" else 1  # cuda, cuda:N, auto
            refs[task.options(num_cpus=threads, num_gpus=gpus).remote(p.name, str(p.recipe_file), p.text, threads, cwd)] = p
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield ray.get(ref)
                except Exception as err:  # noqa: BLE001 -- the worker or its node died
                    yield Outcome(refs[ref].name, error=one_line(err), detail=str(err))
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- the sweep


def gather(point: Point, outcome: Outcome) -> None:
    """Put a finished run's results.json and metadata.json under DIR/runs/<name>/ when the driver
    cannot see what the worker wrote (a Ray node with its own disk); gathered.json says so."""
    here = point.output_dir / "metadata.json"
    if here.is_file() and here.read_text(encoding="utf-8") == outcome.metadata:
        return  # a shared file system: the whole run is there
    point.output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{point.name}.gathered-", dir=point.output_dir.parent))
    (tmp / "results.json").write_text(outcome.results, encoding="utf-8")
    (tmp / "metadata.json").write_text(outcome.metadata, encoding="utf-8")
    note = {"host": outcome.host, "note": "results.json and metadata.json only; the model and the report stayed on host"}
    (tmp / "gathered.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(point.output_dir, ignore_errors=True)  # an older run: not this recipe's (finished said so)
    os.rename(tmp, point.output_dir)


def is_finished(point: Point, finished, load_recipe) -> bool:
    """The point's output_dir holds its recipe's finished run. A point whose files are missing
    (a model path that does not exist) is not finished: its run will say what is wrong."""
    if not (point.output_dir / "metadata.json").is_file():
        return False  # no run there: nothing to hash
    try:
        return finished(point.output_dir, load_recipe(point.recipe_file))
    except CompressError:
        return False


def sweep(template: Path, grid: list[str], sets: list[str] = (), out: Path | None = None, jobs: int = 1,
          ray: bool = False, address: str | None = None) -> SweepResult:
    """Expand, validate and write every point's recipe, run the unfinished points, and write the
    comparison of all points (finished, failed) into `out`."""
    out = Path(out) if out is not None else Path("runs") / f"sweep-{template.stem}"
    if jobs < 1:
        raise CompressError(f"--jobs: expected 1 or more, got {jobs}")
    if ray:
        require_ray()  # before anything is written
    points = expand(template, list(grid), list(sets), out)
    for point in points:
        write_atomic(point.recipe_file, point.text)
    result = SweepResult(out, points)

    todo = []
    for point in points:
        if is_finished(point, finished, load_recipe):
            result.skipped.append(point.name)
        else:
            todo.append(point)
    log.info("sweep %s: %d points, %d finished earlier, %d to run%s", out, len(points), len(result.skipped), len(todo),
             " on Ray" if ray else f" ({jobs} at a time)" if jobs > 1 else "")

    cwd = os.getcwd()
    if not todo:
        outcomes = iter(())
    elif ray:
        outcomes = run_ray(todo, address, cwd)
    elif jobs == 1:
        outcomes = run_in_process(todo, os.cpu_count() or 1, cwd)
    else:
        outcomes = run_local(todo, jobs, cwd)
    by_name = {p.name: p for p in points}
    for k, outcome in enumerate(outcomes, 1):
        point, failure = by_name[outcome.name], out / "failed" / f"{outcome.name}.txt"
        if outcome.error is None:
            gather(point, outcome)
            failure.unlink(missing_ok=True)
            result.ran.append(point.name)
            log.info("[%d/%d] %s: finished in %.1f s", k, len(todo), point.name, outcome.seconds)
        else:
            write_atomic(failure, outcome.error + "\n" + (f"\n{outcome.detail}" if outcome.detail else ""))
            result.failed[point.name] = outcome.error
            log.warning("[%d/%d] %s: failed after %.1f s: %s", k, len(todo), point.name, outcome.seconds, outcome.error)

    entries = []
    for point in points:
        command = f"compress run {shlex.quote(str(point.recipe_file))}"
        if point.name in result.failed:
            entries.append(Entry(point.name, None, command=command, error=result.failed[point.name]))
        else:
            entries.append(Entry(point.name, point.output_dir, command=command))
    result.rows = write_comparison(entries, out)
    return result
