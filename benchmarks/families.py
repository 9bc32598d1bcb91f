"""The GGUF family table of docs/exports.md, rendered from what tests/export/test_gguf_families.py measured.

    python -m pytest tests/export/test_gguf_families.py    # writes build/families.json, cell by cell
    python benchmarks/families.py                   # -> benchmarks/results/families.{json,md}, docs/exports.md

Nothing in the table is typed by hand: a cell is "works" only where the test ran that step with
every check on, and "refused" with the reason the tool gave; a family or step the tests did not
reach (a skipped test) shows as "not run".
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "build" / "families.json"
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- families:start -->", "<!-- families:end -->"
ORDER = ["Llama 2", "Llama 3", "Mistral", "Qwen2", "Qwen3", "Gemma 2", "Gemma 3", "Phi-3"]
TYPES = ["f16", "q8_0", "q4_k_m", "q4_0"]
# where each tokenizer comes from (tests/families.py): llama.cpp's vocab files, or the Gemma 3 270M
# file (no Gemma 2 vocabulary ships; Gemma 2 gets Gemma 3's, the same kind of SentencePiece model)
VOCAB = {"gemma3": "Gemma 3 270M's", "llama-spm": "llama-spm", "llama-bpe": "llama-bpe", "qwen2": "qwen2", "phi-3": "phi-3"}


def file_cell(entry) -> str:
    if not entry:
        return "not run"
    text = f"works, ppl x{entry['ppl']:.3f}"
    if entry.get("detail"):
        text += f" ({entry['detail']})"
    return text


def step_cell(entry) -> str:
    if entry is None:
        return "not run"
    if isinstance(entry, str):
        return entry
    return ("works: " if entry["ok"] else "refused: ") + entry["detail"]


def table(measured: dict) -> str:
    head = ["family", "real tokenizer", "llama.cpp arch", "tokenizer.json only -> GGUF + ONNX", "Wanda ATP -> GPTQ", *(f"GGUF {t}" for t in TYPES),
            "structured ATP -> GGUF", "structured uniform -> GGUF", "its GGUF as model.source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in [f for f in ORDER if f in measured] + sorted(set(measured) - set(ORDER)):
        row = measured[family]
        cells = [family, VOCAB.get(row.get("tokenizer"), row.get("tokenizer", "?")), row.get("arch", "?"),
                 step_cell(row.get("tokenizer.json only")), step_cell(row.get("prune + gptq")),
                 *(file_cell(row.get(t)) for t in TYPES), step_cell(row.get("structured")), step_cell(row.get("structured uniform")),
                 step_cell(row.get("gguf source"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    if not MEASURED.is_file():
        print(f"{MEASURED} not found: run python -m pytest tests/export/test_gguf_families.py first", file=sys.stderr)
        return 2
    measured = json.loads(MEASURED.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "families.json").write_text(json.dumps(measured, indent=2, sort_keys=True) + "\n")
    rendered = table(measured)
    (RESULTS / "families.md").write_text(rendered + "\n")
    readme = ROOT / "docs" / "exports.md"
    text = readme.read_text()
    if START not in text:
        print(f"docs/exports.md has no {START} ... {END} section; table written to {RESULTS / 'families.md'}", file=sys.stderr)
        return 1
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{rendered}\n{END}", text, flags=re.S)
    readme.write_text(text)
    print(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
