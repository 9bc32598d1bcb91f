"""What a person reads after a run: report.md with tables, PNG plots, and a terminal summary."""

from __future__ import annotations

import re
from pathlib import Path

from rich.table import Table


def _pyplot():
    """matplotlib, imported when the first plot is drawn (it costs ~30 MB and a second at start)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _ppl(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['ppl']:.3f}"


def _acc(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['mean_acc']:.4f}"


def plot_block_ratios(record: dict, path: Path, ylabel: str = "sparsity", title: str | None = None) -> None:
    plt = _pyplot()
    blocks = range(len(record["block_ratios"]))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(blocks, record["block_ratios"], "o-", label="allocated")
    ax.plot(blocks, record["block_achieved"], "x", label="achieved")
    ax.axhline(record["target"], color="grey", linestyle=":", label=f"target {record['target']:.2f}")
    ax.set_xlabel("decoder block")
    ax.set_ylabel(ylabel)
    alloc = record["allocation"]["kind"] + (f", beta={record['beta']:.4g}" if record.get("beta") is not None else "")
    ax.set_title(f"{title or record['method'] + ' ' + record['pattern']} ({alloc})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_search(record: dict, path: Path) -> None:
    plt = _pyplot()
    trials = sorted(record["search"], key=lambda t: t["beta"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([t["beta"] for t in trials], [t["score"] for t in trials], "o-")
    ax.axvline(record["beta"], color="green", linestyle=":", label=f"chosen beta {record['beta']:.4g}")
    ax.set_xlabel("beta")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curve(record: dict, path: Path) -> None:
    plt = _pyplot()
    losses = record["losses"]
    w = min(10, len(losses))  # trailing mean: single batches are noisy
    starts = [max(0, i - w + 1) for i in range(len(losses))]
    smooth = [sum(losses[a : i + 1]) / (i + 1 - a) for i, a in enumerate(starts)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, color="lightgrey", label="per step")
    ax.plot(range(1, len(losses) + 1), smooth, label=f"mean of {w} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"LoRA r{record['rank']} ({record['allocation']['kind']}), lr {record['lr']:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _evaluation_lines(results: dict) -> list[str]:
    """Where the perplexity numbers come from, or why there are none."""
    evaluation = results["data"].get("evaluation")
    if evaluation is None:
        return ["Perplexity not measured (eval.perplexity: false)."]
    bos = "BOS first" if evaluation.get("bos") else "no BOS"
    return [
        f"Perplexity on {evaluation['source']} (part {evaluation['part']} of its tokens): "
        f"{evaluation['nsamples']} windows x {evaluation['seqlen']} tokens, {bos}."
    ]


def _artefact_lines(evaluations: dict) -> list[str]:
    """The compressed model as each artefact measured it (eval.artefacts), speed included."""
    if not evaluations or (list(evaluations) == ["model"] and not evaluations["model"].get("speed")):
        return []  # the table above says it all
    lines = ["", "Measured on each artefact (exports reloaded in their own runtime):", "",
             "| artefact | file | perplexity | zero-shot mean acc | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|"]
    for label, ev in evaluations.items():
        speed = ev.get("speed") or {}
        prefill = speed.get("prefill_512", speed.get("prefill_128"))
        prefill = "-" if prefill is None else f"{prefill:.0f}"
        decode = "-" if "decode_128" not in speed else f"{speed['decode_128']:.1f}"
        lines.append(f"| {label} | {ev.get('path') or 'in memory'} | {_ppl(ev.get('perplexity'))} | {_acc(ev.get('zero_shot'))} | {prefill} | {decode} |")
    return lines


def write_report(out: Path, results: dict) -> list[str]:
    """report.md and one plot per stage (and per beta search); returns the files written."""
    files = ["report.md"]
    model = results["model"]
    lines = [
        f"# {results['name']}",
        "",
        f"Model: `{model['source']}` ({model['model_type']}, {model['blocks']} blocks, "
        f"{model['params'] / 1e6:.1f}M parameters)",
        "",
        "| model | perplexity | zero-shot mean acc | params | nonzero params |",
        "|---|---|---|---|---|",
    ]
    ppl = results["perplexity"]
    size = results["size"]
    zs = results.get("zero_shot", {})
    dense_params = size.get("params_dense", model["params"]) / 1e6
    lines.append(f"| dense | {_ppl(ppl.get('dense'))} | {_acc(zs.get('dense'))} | {dense_params:.2f}M | - |")
    if results["stages"]:
        lines.append(f"| compressed | {_ppl(ppl.get('compressed'))} | {_acc(zs.get('compressed'))} | {size['params'] / 1e6:.2f}M | {size['nonzero'] / 1e6:.2f}M |")
    lines += ["", *_evaluation_lines(results)]
    for which in ("dense", "compressed"):
        if zs.get(which):
            per_task = ", ".join(f"{t} {m['acc']:.3f}" for t, m in zs[which]["tasks"].items())
            bos = "BOS first" if zs[which].get("bos") else "no BOS"
            lines.append(f"\nZero-shot acc ({which}, first {results['zero_shot_limit'] or 'all'} items per task, {bos}): {per_task}")
    lines += _artefact_lines(results.get("evaluations") or {})
    memory = results.get("memory")
    if memory:
        lines += ["", f"Peak memory {memory['peak_rss_mb']:.0f} MB (resident), reached during {memory['peak_phase']}."]
    lines.append("")
    for k, record in enumerate(results["stages"]):
        lines += STAGE_SECTIONS[record["kind"]](k, record, out, files) + [""]
    lines += _export_lines(results.get("export", {}), results["size"])
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def _search_lines(k: int, record: dict, out: Path, files: list[str]) -> list[str]:
    if not record.get("search"):
        return []
    name = f"stage{k}_beta_search.png"
    plot_search(record, out / name)
    files.append(name)
    lines = ["", "| beta | validation ppl | seconds |", "|---|---|---|"]
    lines += [f"| {t['beta']:.5f} | {t['score']:.3f} | {t['seconds']:.1f} |" for t in record["search"]]
    windows = {t.get("calibration_windows") for t in record["search"]} - {None}
    chosen = f"Chosen beta: {record['beta']:.5f}"
    if windows:  # the trials took fewer windows than the stage: it compressed the chosen beta once more on all
        chosen += f" (trials calibrated on {', '.join(map(str, sorted(windows)))} of the calibration windows; the chosen beta then on all of them)"
    return lines + ["", chosen, "", f"![beta search]({name})"]


def _notes(record: dict) -> list[str]:
    return ["", "Notes:"] + [f"- {n}" for n in record["notes"]] if record.get("notes") else []


def prune_section(k: int, record: dict, out: Path, files: list[str]) -> list[str]:
    lines = [f"## Stage {k}: prune ({record['method']}, {record['pattern']}, {record['allocation']['kind']})", ""]
    lines.append(f"Target sparsity {record['target']:.4f}, achieved {record['achieved']:.4f}, {record['seconds']:.1f} s.")
    if record.get("quantize"):
        q = record["quantize"]
        lines.append(f"Kept weights quantised in the same pass (joint SparseGPT): int{q['bits']} g{q['group_size']} {'sym' if q['sym'] else 'asym'}.")
    lines += _search_lines(k, record, out, files)
    name = f"stage{k}_sparsity.png"
    plot_block_ratios(record, out / name)
    files.append(name)
    lines += ["", f"![per-block sparsity]({name})", "", "| block | allocated | pattern | achieved |", "|---|---|---|---|"]
    patterns = record.get("block_patterns") or [record["pattern"]] * len(record["block_ratios"])
    for i, (r, p, a) in enumerate(zip(record["block_ratios"], patterns, record["block_achieved"])):
        lines.append(f"| {i} | {r:.4f} | {p} | {a:.4f} |")
    return lines + _notes(record)


def quantize_section(k: int, record: dict, out: Path, files: list[str]) -> list[str]:
    lines = [f"## Stage {k}: quantize ({record['method']}, {record['format']}, {record['allocation']['kind']})", ""]
    lines.append(
        f"Mean bit-width {record['achieved']:.3f} (target {record['target']:g}); {record['bits_per_weight']:.3f} bits per weight "
        f"stored with scales and zero points; {record['seconds']:.1f} s."
    )
    lines.append(f"Zeros from earlier stages: {record['zeros_before']}, of which {record['zeros_kept']} still exactly zero; "
                 f"{record['zeros_after']} zeros after quantising.")
    sqnr = list(record.get("layer_sqnr_db", {}).values())
    if sqnr:
        lines.append(f"Layer output SQNR on the calibration inputs: min {min(sqnr):.1f} dB, mean {sum(sqnr) / len(sqnr):.1f} dB.")
    lines += _search_lines(k, record, out, files)
    if len(set(record["block_bits"])) > 1:
        lines += ["", "| block | bits |", "|---|---|"] + [f"| {i} | {b} |" for i, b in enumerate(record["block_bits"])]
    return lines + _notes(record)


def recover_section(k: int, record: dict, out: Path, files: list[str]) -> list[str]:
    lines = [f"## Stage {k}: recover (LoRA r{record['rank']}, {record['allocation']['kind']})", ""]
    lines.append(
        f"{record['steps']} steps at lr {record['lr']:g}, {record['batch_size']} windows of {record['seqlen']} tokens per step "
        f"({record['windows']} windows); {record['trainable_params']} trainable parameters in {record['layers']} layers; {record['seconds']:.1f} s."
    )
    lines.append(f"Training loss {record['loss_first']:.4f} (first steps) -> {record['loss_last']:.4f} (last steps).")
    if record["ppl_before"] is None:
        lines.append("Validation perplexity not measured (no validation data).")
    else:
        lines.append(f"Validation perplexity {record['ppl_before']:.3f} before, {record['ppl_after']:.3f} after.")
    lines.append(f"Zeros in the adapted layers: {record['zeros_before']}, of which {record['zeros_kept']} still exactly zero.")
    name = f"stage{k}_loss.png"
    plot_loss_curve(record, out / name)
    files.append(name)
    lines += ["", f"![training loss]({name})"]
    if len(set(record["block_ranks"])) > 1:
        lines += ["", "| block | LoRA rank |", "|---|---|"] + [f"| {i} | {r} |" for i, r in enumerate(record["block_ranks"])]
    return lines + _notes(record)


def structured_section(k: int, record: dict, out: Path, files: list[str]) -> list[str]:
    lines = [f"## Stage {k}: structured ({record['metric']}, {record['split']}, {record['allocation']['kind']})", ""]
    lines.append(
        f"Target {record['target']:.4f} of the blocks' projection weights removed, achieved {record['achieved']:.4f} "
        f"({record['params_before'] / 1e6:.2f}M -> {record['params_after'] / 1e6:.2f}M); {record['seconds']:.1f} s."
    )
    lines += _search_lines(k, record, out, files)
    name = f"stage{k}_structure.png"
    plot_block_ratios(record, out / name, "share of weights removed", "heads + channels")
    files.append(name)
    lines += ["", f"![per-block removal]({name})", "",
              f"| block | allocated | achieved | query heads (of {record['heads']}) | KV heads (of {record['kv_heads']}) | MLP channels (of {record['channels']}) |",
              "|---|---|---|---|---|---|"]
    for i, row in enumerate(zip(record["block_ratios"], record["block_achieved"], record["block_heads"], record["block_kv_heads"], record["block_channels"])):
        lines.append(f"| {i} | {row[0]:.4f} | {row[1]:.4f} | {row[2]} | {row[3]} | {row[4]} |")
    return lines + _notes(record)


def lowrank_section(k: int, record: dict, out: Path, files: list[str]) -> list[str]:
    residual = f", residual sparsity {record['residual_sparsity']:g}" if record.get("residual_sparsity") is not None else ""
    lines = [f"## Stage {k}: lowrank ({record['method']}{residual}, {record['allocation']['kind']})", ""]
    lines.append(f"Target fraction of weights removed {record['target']:.4f}, achieved {record['achieved']:.4f} "
                 f"({record['params_before'] / 1e6:.2f}M -> {record['params_after'] / 1e6:.2f}M weights in the selected layers), "
                 f"{record['seconds']:.1f} s.")
    errors = record["layer_output_error"]
    if errors:
        lines.append(f"Layer output error tr(E H E^T) / tr(W H W^T) on the calibration inputs: mean "
                     f"{sum(errors.values()) / len(errors):.4f}, max {max(errors.values()):.4f}.")
    lines += _search_lines(k, record, out, files)
    name = f"stage{k}_lowrank.png"
    plot_block_ratios(record, out / name, "fraction of weights removed", record["method"])
    files.append(name)
    lines += ["", f"![per-block reduction]({name})", "", "| block | allocated | achieved | ranks | mean output error |", "|---|---|---|---|---|"]
    by_block: dict[int, list[str]] = {}
    for layer in record["layer_rank"]:  # names are <blocks path>.<i>.<rest>; the blocks path has no numbers
        by_block.setdefault(int(re.search(r"\.(\d+)\.", layer)[1]), []).append(layer)
    for i, (r, a) in enumerate(zip(record["block_ratios"], record["block_achieved"])):
        ranks = [record["layer_rank"][n] for n in by_block.get(i, [])]
        shown = "dense" if all(x is None for x in ranks) else f"{min(x for x in ranks if x is not None)}-{max(x for x in ranks if x is not None)}"
        errs = [errors[n] for n in by_block.get(i, []) if n in errors]
        lines.append(f"| {i} | {r:.4f} | {a:.4f} | {shown} | {sum(errs) / len(errs) if errs else 0:.4f} |")
    return lines + _notes(record)


STAGE_SECTIONS = {"prune": prune_section, "quantize": quantize_section, "lowrank": lowrank_section, "recover": recover_section, "structured": structured_section}


def _export_lines(exports: dict, size: dict) -> list[str]:
    if not exports:
        return ["No export (every exporter under `export:` is off)."]
    lines = [f"Decoder-block Linear layers: sparsity {size['block_linear_sparsity']:.4f}, "
             f"{size['block_linear_bits_per_weight']:.3f} bits per weight as stored; the model as plain tensors: {size['dense_mb']:.1f} MB."]
    for name, info in exports.items():
        lines += ["", f"## Export: {name} ({info['format']})", ""] + EXPORT_SECTIONS[name.split("-")[0]](info, size)
        lines += [f"- {n}" for n in info.get("notes", [])]
    return lines


def _hf_lines(info: dict, size: dict) -> list[str]:
    lines = [f"Files: {', '.join(info['files'])} ({size['safetensors_mb']:.1f} MB of safetensors)."]
    weights = info.get("weights")
    if weights and "max_abs_weight_diff" in weights:
        lines.append(f"Saved weights decoded: {weights['layers']} quantised layers, largest difference from the model {weights['max_abs_weight_diff']:g}.")
    elif weights:
        lines.append(f"Saved weights read back: {weights['tensors']} tensors, {'all bit-identical' if weights['identical'] else 'DIFFERENT'}.")
    parity = info.get("parity")
    if parity and parity.get("checked"):
        lines.append(f"Reloaded with {parity['loader']}: logits differ by at most {parity['max_abs_logit_diff']:g} "
                     f"({parity['relative']:.2e} of the largest logit; tolerance {parity['tolerance']:g}).")
    elif parity:
        lines.append(f"Not reloaded: {parity['reason']}.")
    return lines


def _gguf_lines(info: dict, size: dict) -> list[str]:
    checks = info.get("files_checked", {}) or {}
    lines = ["| type | file | MB | how | zeros kept | max logit diff (rel.) | top-1 agree | llama.cpp ppl (ours) |", "|---|---|---|---|---|---|---|---|"]
    for kind, entry in info["files"].items():
        c = checks.get(kind, {})
        kept = "-" if entry.get("zeros_kept") is None else f"{entry['zeros_kept']:.1%}"
        diff = f"{c['max_abs_logit_diff']:.3g} ({c['relative']:.1e})" if "relative" in c else "not checked"
        agree = f"{c['top1_agreement']:.1%}" if "top1_agreement" in c else "-"
        ppl = f"{c['perplexity']:.3f} ({c['reference_perplexity']:.3f})" if c.get("perplexity") is not None else "-"
        lines.append(f"| {kind} | {entry['file']} | {entry['mb']:.1f} | {entry['how']} | {kept} | {diff} | {agree} | {ppl} |")
    if info.get("checked") is False:
        lines.append(f"\nNot loaded in llama.cpp: {info['reason']}.")
    elif checks:
        n = next(iter(checks.values())).get("windows")
        lines.append(f"\nChecked in llama.cpp: tokenization of a sample text equal to the HF tokenizer's; perplexity on the first {n} evaluation windows, ours on the same windows in brackets.")
    return lines


def _onnx_lines(info: dict, size: dict) -> list[str]:
    graphs = ", ".join(f"{k} `{v}`" for k, v in info.get("graphs", {}).items())
    lines = [f"Graphs: {graphs}; {info.get('mb', 0):.1f} MB with the weights (stored once); {info.get('exporter')} exporter, opset {info.get('opset')}."]
    if info.get("checked") is False:
        return lines + [f"Not loaded in ONNX Runtime: {info['reason']}."]
    weights, parity, greedy, ppl = info.get("weights"), info.get("parity"), info.get("greedy"), info.get("perplexity")
    if weights and weights.get("identical"):
        lines.append(f"All {weights['matrices']} weight matrices stored bit for bit.")
    if parity:
        lines.append(f"{info.get('runtime', 'ONNX Runtime')}: logits differ by at most {parity['max_abs_logit_diff']:g} "
                     f"({parity['relative']:.1e} of the largest logit; tolerance {parity['tolerance']:g}).")
    if greedy:
        lines.append(f"Greedy generation of {len(greedy['tokens'])} tokens through {greedy['graphs']}: "
                     f"{'equal to' if greedy['equal'] else 'DIFFERENT from'} the model's.")
    if ppl:
        ours = f" (ours {ppl['reference']:.3f})" if ppl.get("relative_difference") is not None else ""
        lines.append(f"Perplexity in ONNX Runtime {ppl['onnx']:.3f} on {ppl['windows']} evaluation windows{ours}.")
    return lines


EXPORT_SECTIONS = {"hf": _hf_lines, "gguf": _gguf_lines, "onnx": _onnx_lines}


def summary_table(results: dict) -> Table:
    table = Table(title=results["name"])
    for column in ("model", "perplexity", "zero-shot acc", "params", "sparsity", "bits/weight", "seconds"):
        if column == "model":
            table.add_column(column, justify="left", no_wrap=True, min_width=10)  # "compressed" stays whole on 80 columns
        else:
            table.add_column(column, justify="right")
    ppl, zs, size = results["perplexity"], results.get("zero_shot", {}), results["size"]
    dense_params = size.get("params_dense", results["model"]["params"])
    table.add_row("dense", _ppl(ppl.get("dense")), _acc(zs.get("dense")), f"{dense_params / 1e6:.1f}M", "-", "-", "-")
    if results["stages"]:
        stage_seconds = sum(r["seconds"] for r in results["stages"])
        table.add_row(
            "compressed", _ppl(ppl.get("compressed")), _acc(zs.get("compressed")), f"{size['params'] / 1e6:.1f}M",
            f"{size['block_linear_sparsity']:.3f}", f"{size['block_linear_bits_per_weight']:.2f}", f"{stage_seconds:.0f}",
        )
    for label, ev in (results.get("evaluations") or {}).items():
        if label != "model":  # an export, reloaded in its runtime
            table.add_row(f" {label}", _ppl(ev.get("perplexity")), _acc(ev.get("zero_shot")), "", "", "", "")
    return table
