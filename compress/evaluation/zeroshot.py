"""Zero-shot accuracy of a causal LM on six local task files (offline) or lm-eval's own tasks.

Route: lm-eval 0.4.13 scores everything. Its `HFLM` wraps the model and tokenizer we already hold,
and each task is an lm-eval `ConfigurableTask` built from a local YAML file in `compress/evaluation/tasks/`
(prompt template and metrics, copied from lm-eval's own task files) plus a `custom_dataset`
callable that hands lm-eval the docs parsed here from local files, so nothing touches the hub.
lm-eval therefore does the tokenisation (context and continuation encoded together, the
continuation's tokens taken from the end; trailing context spaces moved to the continuation),
the batching (right padding, sorted by length) and the metrics. We only add:

* `softmax_dtype=float32`, so log-softmax runs in float32 whatever the model's dtype (the forward
  pass itself runs in the model's own dtype: we do not cast a caller's model);
* `torch.inference_mode()` and `model.eval()` around the run (the training flag is restored);
* `bootstrap_iters=0`: no stderr bootstrap, which would cost more than the scoring on CPU.

Data formats (see ../shared/data/README.md):

* `piqa.jsonl`, `arc-easy.jsonl`, `arc-challenge.jsonl`, `openbookqa.jsonl`, `winogrande.jsonl`:
  one JSON object a line with `centerpiece` (the question / goal / sentence), `options` (list of
  strings) and `correct_options_idx` (list holding the gold index).
* `hellaswag-val.txt`: 6 lines per item: context, gold index (0-3), 4 endings.

Prompts, as lm-eval builds them:

* piqa, arc_easy, arc_challenge: "Question: {centerpiece}\\nAnswer:", continuation " {option}".
* openbookqa: the question stem as is, continuation " {option}".
* winogrande (partial evaluation): contexts are the sentence up to "_" filled with each option,
  the shared continuation is " " + the text after "_" (stripped); acc only, so acc_norm is None.
* hellaswag: lm-eval builds `preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize())`. The context line in this file already is `activity_label: ctx_a ctx_b`
  (the label is there) with lm-eval's "[title]" -> ". " rewrite applied, but ctx_b is not
  capitalised and the split between ctx_a and ctx_b is lost. We rebuild it this way: when the
  text after the last sentence end (". ", "! ", "? ") starts with a lower-case letter, that
  fragment is taken as ctx_b and capitalised with `str.capitalize()` (3,236 of the 10,042 items,
  all ActivityNet ones; WikiHow items have an empty ctx_b). lm-eval's `preprocess` then runs on
  the context and on each ending, as in lm-eval.

Metrics are lm-eval's: acc is the argmax of summed log-likelihoods; acc_norm the argmax of the
log-likelihood divided by the option's length. Note that lm-eval 0.4.13 measures that length in
characters (`len(choice)`, its `acc_bytes` uses bytes); the two differ only for the few options
with non-ASCII characters (62 in piqa, 28 in arc-easy, 27 in arc-challenge).

`limit` keeps the first `limit` items of each file, so runs are deterministic.

Beyond the six local tasks, any other name is one of lm-eval's own tasks, loaded by lm-eval's
TaskManager (its full index, ~15 s) with its dataset from the hub; when the name is unknown or the
dataset cannot be downloaded (offline), one CompressError names the task and the reason.

Standard errors: with bootstrap_iters=0 lm-eval reports none, so each acc / acc_norm gets the
binomial standard error of a mean, sqrt(p(1-p)/(n-1)) (lm-eval's mean_stderr), and the mean over
k tasks sqrt(sum se_i^2)/k (tasks are independent samples).

Exported artefacts are scored by handing `zero_shot` / `run_lm_eval` a ready lm-eval LM (`lm=`):
compress.runtimes builds one per runtime (HFLM for an HF folder, llama.cpp for GGUF, ONNX Runtime
for ONNX).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.errors import CompressError

log = logging.getLogger("compress")

TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "hellaswag")

DATA_FILES: dict[str, str] = {
    "piqa": "piqa.jsonl",
    "arc_easy": "arc-easy.jsonl",
    "arc_challenge": "arc-challenge.jsonl",
    "openbookqa": "openbookqa.jsonl",
    "winogrande": "winogrande.jsonl",
    "hellaswag": "hellaswag-val.txt",
}

JSONL_FORMAT = (
    "one JSON object a line with keys centerpiece (str), options (list of str) and "
    "correct_options_idx (list holding the gold index)"
)
HELLASWAG_FORMAT = "6 lines per item: context, gold index (0-3), then the 4 endings"

TASK_DIR = Path(__file__).with_name("tasks")

# Tasks whose lm-eval definition reports acc only.
_ACC_ONLY = {"winogrande"}


class DataError(CompressError, ValueError):
    """A task file is missing or malformed; the message names the file and the expected format."""


# ---------------------------------------------------------------------------------------------
# Reading the local files into the docs the YAML templates expect
# ---------------------------------------------------------------------------------------------


def load_docs(task: str, data_dir: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Docs for one task, first `limit` items: {query, choices, gold} or, for winogrande,
    {contexts, target, gold}."""
    _check_task(task)
    path = Path(data_dir) / DATA_FILES[task]
    expected = HELLASWAG_FORMAT if task == "hellaswag" else JSONL_FORMAT
    if not path.is_file():
        raise DataError(f"{task}: data file {path} not found; expected {expected}")
    if task == "hellaswag":
        docs = _read_hellaswag(path)
    elif task == "winogrande":
        docs = [_winogrande_doc(row, f"{path}:{n}") for n, row in _read_jsonl(path)]
    else:
        docs = [_choice_doc(row) for _, row in _read_jsonl(path)]
    if not docs:
        raise DataError(f"{task}: {path} holds no items; expected {expected}")
    return docs if limit is None else docs[:limit]


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line, with the keys and types checked."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not JSON ({err.msg}); expected {JSONL_FORMAT}") from err
        if not _valid_row(row):
            raise DataError(f"{path}:{n}: bad item; expected {JSONL_FORMAT}")
        rows.append((n, row))
    return rows


def _valid_row(row: Any) -> bool:
    if not isinstance(row, dict):
        return False
    options, gold = row.get("options"), row.get("correct_options_idx")
    return (
        isinstance(row.get("centerpiece"), str)
        and isinstance(options, list)
        and len(options) >= 2
        and all(isinstance(o, str) for o in options)
        and isinstance(gold, list)
        and len(gold) == 1
        and isinstance(gold[0], int)
        and 0 <= gold[0] < len(options)
    )


def _choice_doc(row: dict[str, Any]) -> dict[str, Any]:
    return {"query": row["centerpiece"], "choices": row["options"], "gold": row["correct_options_idx"][0]}


def _winogrande_doc(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Partial evaluation, as lm-eval's preprocess_winogrande: each option fills the prefix, and
    the text after the blank is the one continuation scored."""
    sentence = row["centerpiece"]
    if "_" not in sentence:
        raise DataError(f'{where}: winogrande centerpiece has no "_" blank for the options to fill')
    blank = sentence.index("_")
    return {
        "contexts": [sentence[:blank] + option for option in row["options"]],
        "target": sentence[blank + 1 :].strip(),
        "gold": row["correct_options_idx"][0],
    }


def _read_hellaswag(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    lines = text.rstrip("\n").split("\n") if text.strip() else []
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, not a multiple of 6; expected {HELLASWAG_FORMAT}")
    docs = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start : start + 6]
        if gold.strip() not in {"0", "1", "2", "3"}:
            raise DataError(f"{path}:{start + 2}: gold index {gold!r} is not 0-3; expected {HELLASWAG_FORMAT}")
        docs.append(
            {
                "query": hellaswag_query(context),
                "choices": [hellaswag_preprocess(e) for e in endings],
                "gold": int(gold),
            }
        )
    return docs


# The lower-case fragment after the last sentence end: ctx_b, which lm-eval capitalises.
_CTX_B = re.compile(r"(?<=[.!?] )[a-z][^.!?]*$")


def hellaswag_query(context: str) -> str:
    """lm-eval's HellaSwag query from the file's `label: ctx_a ctx_b` line (see module doc)."""
    fragment = _CTX_B.search(context)
    if fragment:
        context = context[: fragment.start()] + fragment.group().capitalize()
    return hellaswag_preprocess(context)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval 0.4.13 tasks/hellaswag/utils.py `preprocess`, verbatim (the brackets are WikiHow
    artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


# ---------------------------------------------------------------------------------------------
# Scoring through lm-eval
# ---------------------------------------------------------------------------------------------


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    bos: bool | None = None,
    lm=None,
) -> dict:
    """Zero-shot acc / acc_norm per task with their standard errors, the mean acc and its standard
    error, and the wall time in seconds.

    tasks: names in TASKS are read from local files in data_dir; any other name is one of
    lm-eval's own tasks, loaded (and its dataset downloaded) by lm-eval's TaskManager.
    bos: put BOS first in every request (lm-eval's add_bos_token); None: as the tokenizer does
    by default, which is what lm-eval's HFLM does for Gemma and Llama tokenizers.
    lm: a ready lm-eval LM (e.g. compress.runtimes' GGUF or ONNX one) to score with instead of
    HFLM over model and tokenizer, which may then be None.
    Returns {"tasks": {name: {"acc", "acc_norm" (None where the task has none), "acc_stderr",
    "acc_norm_stderr", "n"}}, "mean_acc", "mean_acc_stderr", "bos", "seconds"}, where bos says
    whether the encoded requests really started with BOS.
    """
    start = time.perf_counter()
    if not tasks:
        raise CompressError(f"zero-shot: no tasks given; choose from {', '.join(TASKS)} or an lm-eval task name")
    if limit is not None and limit < 1:
        raise CompressError(f"zero-shot: limit must be a positive number of items, got {limit}")
    local = [task for task in tasks if task in DATA_FILES]
    if local and data_dir is None:
        raise CompressError(f"zero-shot: tasks {', '.join(local)} are read from local files: give their folder (tasks_dir)")
    # Read every file first, so that a bad file fails before any scoring time is spent.
    docs = {task: load_docs(task, data_dir, limit) for task in local}
    standard = load_standard_tasks([task for task in tasks if task not in DATA_FILES])
    results = run_lm_eval(model, tokenizer, docs, batch_size=batch_size, bos=bos, lm=lm, standard=standard, limit=limit)
    per_task = {task: _task_metrics(results, task) for task in tasks}
    if bos is not None and results["bos"] != bos:
        log.warning("zero-shot: asked for %s BOS, but lm-eval encodes with this tokenizer's own template (%s BOS)",
                    "a" if bos else "no", "with" if results["bos"] else "without")
    accs = [m["acc"] for m in per_task.values() if m["acc"] is not None]
    errors = [m["acc_stderr"] for m in per_task.values() if m["acc"] is not None]
    return {
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        # independent tasks: the variance of a mean of k means is the sum of their variances / k^2
        "mean_acc_stderr": math.sqrt(sum(e * e for e in errors)) / len(errors) if accs and None not in errors else None,
        "bos": results["bos"],
        "seconds": time.perf_counter() - start,
    }


def build_hflm(model, tokenizer, batch_size: int = 16, bos: bool | None = None):
    """lm-eval's HFLM over the model and tokenizer we hold (softmax in float32, the caller's
    tokenizer never changed)."""
    return _import_lm_eval().HFLM(
        pretrained=model,
        tokenizer=_tokenizer_for_lm_eval(tokenizer),
        batch_size=batch_size,
        softmax_dtype=torch.float32,
        add_bos_token=bos,
    )


def run_lm_eval(
    model,
    tokenizer,
    docs: dict[str, list[dict[str, Any]]],
    batch_size: int = 16,
    bos: bool | None = None,
    lm=None,
    standard: dict | None = None,
    limit: int | None = None,
) -> dict:
    """lm-eval's full result dict (with per-doc `samples`) for the given docs of each local task
    and the `standard` lm-eval tasks (from load_standard_tasks; `limit` items each), plus "bos":
    whether lm-eval's encoding of a request starts with the BOS token. lm: score with this lm-eval
    LM instead of an HFLM over model and tokenizer."""
    lm_eval = _import_lm_eval()
    # An empty manager: the default one indexes all of lm-eval's built-in tasks (slow).
    task_dict = lm_eval.TaskManager(include_defaults=False).load(
        [_lm_eval_task(lm_eval, task, task_docs) for task, task_docs in docs.items()]
    ) if docs else {}
    for name in ("tasks", "groups", "group_map"):  # TaskManager.load's three dicts, merged
        task_dict.setdefault(name, {}).update((standard or {}).get(name, {}))
    was_training = model is not None and model.training  # HFLM switches the model to eval mode; we switch it back
    try:
        if lm is None:
            lm = build_hflm(model, tokenizer, batch_size, bos)
            model.eval()
        with torch.inference_mode():
            # local docs are cut to `limit` already; the standard tasks are cut here
            results = lm_eval.evaluate(lm, task_dict, limit=limit if standard else None, bootstrap_iters=0, log_samples=True)
        bos_id = getattr(lm, "bos_token_id", None) if getattr(lm, "tokenizer", None) is None else getattr(lm.tokenizer, "bos_token_id", None)
        results["bos"] = bos_id is not None and lm.tok_encode("Question")[:1] == [bos_id]
        return results
    finally:
        if model is not None:
            model.train(was_training)


def check_task_names(names: Sequence[str], key: str = "eval.tasks") -> None:
    """Every name that is not a local task is one of lm-eval's tasks or groups: checked by
    validate and before a run loads its model (lm-eval's index of them takes ~15 s)."""
    others = [name for name in names if name not in DATA_FILES]
    if not others:
        return
    known = set(_import_lm_eval().TaskManager().all_tasks)
    unknown = [name for name in others if name not in known]
    if unknown:
        raise CompressError(f"{key}: {unknown[0]!r} is not a local task ({', '.join(TASKS)}) nor one of lm-eval's "
                            f"{len(known)} tasks and groups")


def load_standard_tasks(names: Sequence[str]) -> dict:
    """lm-eval's own tasks by name (TaskManager.load's dict), datasets downloaded by lm-eval.
    One CompressError names the task and why it cannot be used (unknown, or offline)."""
    if not names:
        return {}
    lm_eval = _import_lm_eval()
    manager = lm_eval.TaskManager()  # indexes every built-in task: ~15 s, paid only here
    loaded: dict = {}
    for name in names:
        if name not in manager.all_tasks:
            raise CompressError(f"zero-shot: unknown task {name!r}: not a local task ({', '.join(TASKS)}) nor one of lm-eval's")
        try:
            one = manager.load([name])
        except Exception as err:  # datasets and the hub raise many types (ConnectionError, OSError, ...)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CompressError(f"zero-shot: unknown task {name!r} here: not a local task ({', '.join(TASKS)}), "
                                f"and lm-eval could not load its dataset (offline?): {type(err).__name__}: {first}") from err
        for key, value in one.items():
            loaded.setdefault(key, {}).update(value)
    return loaded


def _lm_eval_task(lm_eval, task: str, docs: list[dict[str, Any]]):
    """A ConfigurableTask from compress/evaluation/tasks/<task>.yaml, fed our docs instead of a hub dataset."""
    config = yaml.safe_load((TASK_DIR / f"{task}.yaml").read_text(encoding="utf-8"))
    # lm-eval calls custom_dataset(**metadata, **dataset_kwargs) and expects a DatasetDict.
    config["custom_dataset"] = functools.partial(_as_dataset_dict, docs)
    return lm_eval.ConfigurableTask(config=config)


def _as_dataset_dict(docs: list[dict[str, Any]], **_metadata):
    import datasets  # an lm-eval dependency

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _tokenizer_for_lm_eval(tokenizer):
    """HFLM gives a tokenizer without a pad token one (possibly a new special token): hand it a
    copy then, so the caller's tokenizer is never changed."""
    if getattr(tokenizer, "pad_token", None) is None:
        return copy.deepcopy(tokenizer)
    return tokenizer


def _task_metrics(results: dict, task: str) -> dict[str, Any]:
    scores = results["results"][task]
    n = int(results["n-samples"][task]["effective"])
    acc, acc_norm = scores.get("acc,none"), None if task in _ACC_ONLY else scores.get("acc_norm,none")
    return {
        "acc": None if acc is None else float(acc),
        "acc_norm": None if acc_norm is None else float(acc_norm),
        "acc_stderr": binomial_stderr(acc, n),
        "acc_norm_stderr": binomial_stderr(acc_norm, n),
        "n": n,
    }


def binomial_stderr(p: float | None, n: int) -> float | None:
    """Standard error of a mean of n 0/1 scores: sqrt(p(1-p)/(n-1)), lm-eval's mean_stderr
    (sample standard deviation / sqrt(n)); we run with bootstrap_iters=0, so lm-eval reports none."""
    if p is None or n < 2:
        return None
    return math.sqrt(float(p) * (1 - float(p)) / (n - 1))


def _check_task(task: str) -> None:
    if task not in DATA_FILES:
        raise CompressError(f"zero-shot: unknown task {task!r}; choose from {', '.join(TASKS)}")


class _LmEval:
    """The few lm-eval entry points we use, imported on first use (lm-eval is an optional extra)."""

    def __init__(self) -> None:
        from lm_eval.api.task import ConfigurableTask
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self.ConfigurableTask = ConfigurableTask
        self.evaluate = evaluate
        self.HFLM = HFLM
        self.TaskManager = TaskManager


@functools.cache
def _import_lm_eval() -> _LmEval:
    try:
        return _LmEval()
    except ImportError as err:
        raise CompressError(
            "zero-shot evaluation needs lm-eval 0.4.13: pip install 'atp-compress[eval]' "
            f"(import failed: {err})"
        ) from err
