"""The comparison's plots: per-block allocation of every run overlaid, quality vs size and quality
vs speed with the Pareto frontier drawn, and the beta-search curves.

The frontier is the set of rows no other row beats on both axes (smaller-or-equal file and
lower-or-equal perplexity, one strictly better); drawn as a step line through them.
"""

from __future__ import annotations

from pathlib import Path

from compress.reports.report import _pyplot


def frontier(points: list[tuple[float, float]], cost_lower: bool = True) -> list[int]:
    """Indices of the points on the frontier, ordered by x. Points are (x, y), lower y is better;
    x is a cost (lower is better) when cost_lower, else a benefit (higher is better, e.g. tokens/s)."""
    def beats(a, b):  # a dominates b
        ax, bx = (a[0], b[0]) if cost_lower else (-a[0], -b[0])
        return ax <= bx and a[1] <= b[1] and (ax < bx or a[1] < b[1])

    keep = [i for i, p in enumerate(points) if not any(beats(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: points[i][0])


def write_plots(rows: list[dict], runs: dict[str, dict], out: Path) -> dict[str, str]:
    """{plot name: file name} of the plots that have data."""
    plots = {}
    ok = [r for r in rows if not r.get("error") and r.get("perplexity") is not None]
    if plot_allocation(runs, out / "allocation.png"):
        plots["allocation"] = "allocation.png"
    sized = [r for r in ok if r.get("file_mb")]
    if sized:
        plot_pareto(sized, "file_mb", "file size (MB)", out / "pareto_size.png", cost_lower=True)
        plots["pareto_size"] = "pareto_size.png"
    fast = [r for r in ok if r.get("decode_tps") or r.get("prefill_tps")]
    if fast:
        key = "decode_tps" if all(r.get("decode_tps") for r in fast) else "prefill_tps"
        plot_pareto(fast, key, "decode tokens/s" if key == "decode_tps" else "prefill tokens/s", out / "pareto_speed.png", cost_lower=False)
        plots["pareto_speed"] = "pareto_speed.png"
    if plot_searches(runs, out / "beta_search.png"):
        plots["beta_search"] = "beta_search.png"
    return plots


def label(row: dict) -> str:
    return row["run"] if row["on"] == "model" else f"{row['run']} ({row['on']})"


def plot_pareto(rows: list[dict], key: str, xlabel: str, path: Path, cost_lower: bool) -> None:
    plt = _pyplot()
    with_acc = [r for r in rows if r.get("mean_acc") is not None]
    panels = [("perplexity", "perplexity (lower is better)", rows, True)]
    if with_acc:
        panels.append(("mean_acc", "mean zero-shot accuracy (higher is better)", with_acc, False))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (metric, ylabel, subset, lower) in zip(axes[0], panels):
        xs = [r[key] for r in subset]
        ys = [r[metric] for r in subset]
        ax.scatter(xs, ys, color="tab:blue")
        for r, x, y in zip(subset, xs, ys):
            ax.annotate(label(r), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        on = frontier([(x, y if lower else -y) for x, y in zip(xs, ys)], cost_lower)
        if len(on) > 1:
            ax.step([xs[i] for i in on], [ys[i] for i in on], where="post", color="tab:red", linestyle="--", label="Pareto frontier")
            ax.legend(fontsize=8)
        elif on:
            ax.scatter([xs[on[0]]], [ys[on[0]]], color="tab:red", label="Pareto frontier")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if metric == "perplexity" and max(ys) / max(min(ys), 1e-9) > 20:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    save(plt, fig, path)


def plot_allocation(runs: dict[str, dict], path: Path) -> bool:
    """Per-block ratio of every stage that allocates one (sparsity, rank or heads/channels removed),
    and per-block bits of quantize stages, one line per run and stage."""
    ratio_lines, bit_lines = [], []
    for name, results in runs.items():
        for k, record in enumerate(results["stages"]):
            tag = f"{name}: {k} {record['kind']}" if len(results["stages"]) > 1 else f"{name} ({record['kind']})"
            if record.get("block_ratios"):
                ratio_lines.append((tag, record["block_ratios"]))
            elif record.get("block_bits"):
                bit_lines.append((tag, record["block_bits"]))
    if not ratio_lines and not bit_lines:
        return False
    plt = _pyplot()
    panels = [p for p in (("ratio removed per block", ratio_lines), ("bits per block", bit_lines)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for tag, values in lines:
            ax.plot(range(len(values)), values, "o-", markersize=3, label=tag)
        finish_axes(ax, "decoder block", ylabel)
    save(plt, fig, path)
    return True


def plot_searches(runs: dict[str, dict], path: Path) -> bool:
    curves = [(f"{name}: {record['kind']}", record) for name, results in runs.items() for record in results["stages"] if record.get("search")]
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, record in curves:
        trials = sorted(record["search"], key=lambda t: t["beta"])
        line, = ax.plot([t["beta"] for t in trials], [t["score"] for t in trials], "o-", markersize=3, label=tag)
        best = min(trials, key=lambda t: t["score"])
        ax.scatter([best["beta"]], [best["score"]], color=line.get_color(), marker="*", s=80)
    ax.set_yscale("log")
    finish_axes(ax, "beta", "validation perplexity")
    save(plt, fig, path)
    return True


def finish_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
