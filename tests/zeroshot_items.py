"""A few items of each of the six local zero-shot tasks, in the files' own formats: what the
zero-shot, runtime and engine tests score (shared by the test packages, like families.py)."""

from __future__ import annotations

import json
from pathlib import Path

from compress.evaluation import zeroshot

ITEMS = {
    "piqa": [
        ("How do I boil an egg?", ["Put it in boiling water for ten minutes.", "Put it in the freezer."], 0),
        ("To clean a pan,", ["scrub it with soap and water.", "paint it blue."], 0),
        ("How to make café au lait?", ["Mix coffee and hot milk, café style.", "Mix sand and salt."], 0),
    ],
    "arc_easy": [
        ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
        ("What melts ice?", ["heat", "cold", "darkness"], 0),
        ("Which is a mammal?", ["shark", "whale", "trout", "tuna", "eel"], 1),
    ],
    "arc_challenge": [
        ("Why does the moon shine?", ["It reflects sunlight.", "It burns gas."], 0),
        ("What do roots absorb?", ["light", "water", "sound", "wind"], 1),
    ],
    "openbookqa": [
        ("The sun is responsible for", ["puppies learning new tricks", "plants sprouting and growing"], 1),
        ("A magnet will stick to", ["a wooden table", "an iron nail", "a glass cup", "a paper bag"], 1),
    ],
    "winogrande": [
        ("Sarah was a much better surgeon than Maria so _ always got the easier cases.", ["Sarah", "Maria"], 1),
        ("The trophy did not fit in the suitcase because the _ was too big.", ["trophy", "suitcase"], 0),
    ],
}
HELLASWAG = [
    (
        "Roof shingle removal: A man is sitting on a roof. he",
        3,
        ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a cube.",
         "starts pulling up roofing on a roof."],
    ),
    (
        "Health: How to stay warm. Wear layers of clothing.",
        0,
        ["Put on a hat and gloves.", "Visit a site like [www.example.org] to learn more.", "Eat ice.",
         "Open all the windows."],
    ),
]
# The prompts lm-eval builds for HELLASWAG (ctx_b capitalised, brackets removed from endings).
HELLASWAG_QUERIES = ["Roof shingle removal: A man is sitting on a roof. He", "Health: How to stay warm. Wear layers of clothing."]

CORPUS = [q for items in ITEMS.values() for q, options, _ in items for q in [q, *options]] + [
    line for ctx, _, endings in HELLASWAG for line in [ctx, *endings]
]


# ---------------------------------------------------------------------------------------------
# Fixtures: data files, tokenizer, model
# ---------------------------------------------------------------------------------------------


def write_data(folder: Path) -> Path:
    for task, items in ITEMS.items():
        rows = [{"centerpiece": q, "options": o, "correct_options_idx": [g]} for q, o, g in items]
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        (folder / zeroshot.DATA_FILES[task]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = [line for ctx, gold, endings in HELLASWAG for line in [ctx, str(gold), *endings]]
    (folder / "hellaswag-val.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
