import textwrap

import pytest

from compress.errors import CompressError
from compress.recipe import load_recipe
from compress.stages.prune import NM


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    name: t
    model: {source: smollm2-135m}
    data:
      calibration: {source: python-docs, nsamples: 8, seqlen: 64}
    stages:
      - kind: prune
        method: sparsegpt
        pattern: "2:4"
        allocation: {kind: atp, beta: 0.001}
    output_dir: out
"""


def test_good_recipe_parses_into_typed_config(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    stage = r.stages[0]
    assert stage.pattern == NM(2, 4) and stage.target == 0.5
    assert stage.allocation.kind == "atp" and stage.allocation.beta == 0.001
    # validation and evaluation default to the calibration source (disjoint parts of it)
    assert r.data.validation.source == "python-docs" and r.data.validation.nsamples == 16
    assert r.data.evaluation.seqlen == 64 and r.data.evaluation.nsamples is None


def test_recipe_hash_is_stable_and_changes_with_content(tmp_path):
    a = load_recipe(write(tmp_path, GOOD))
    b = load_recipe(write(tmp_path, GOOD, "copy.yaml"))
    c = load_recipe(write(tmp_path, GOOD), ["seed=1"])
    assert a.sha256() == b.sha256() != c.sha256()


@pytest.mark.parametrize(
    "text,expected",
    [
        # unknown key: names file, line and key path
        ("stages:\n  - kind: prune\n    sparsity: 0.5\n    sparsty: 0.5\n", r"r\.yaml:4: stages\[0\]\.sparsty: unknown key"),
        # unknown stage kind: lists the allowed kinds
        ("stages:\n  - kind: quantise\n", r"r\.yaml:2: stages\[0\]: .*'quantise'.*expected tags: 'prune'"),
        # out-of-range ratio
        ("stages:\n  - kind: prune\n    sparsity: 1.5\n", r"r\.yaml:3: stages\[0\]\.sparsity: Input should be less than 1 \(got 1\.5\)"),
        # bad method lists the allowed values
        ("stages:\n  - kind: prune\n    sparsity: 0.5\n    method: foo\n", r"stages\[0\]\.method: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
        ("stages:\n  - kind: prune\n    pattern: '4:2'\n", r"stages\[0\]\.pattern: pattern must be 'unstructured' or 'N:M'"),
        ("stages:\n  - kind: prune\n    sparsity: 0.5\n    allocation: {kind: atp, beta: -0.1}\n", r"stages\[0\]\.allocation: beta must be >= 0"),
        ("stages:\n  - kind: prune\n    sparsity: 0.5\n    allocation: {kind: zigzag}\n", r"stages\[0\]\.allocation: .*'zigzag'.*'uniform', 'atp', 'owl', 'alpha', 'explicit'"),
        ("stages:\n  - kind: prune\n", r"stages\[0\]: sparsity is required"),
        ("stages:\n  - kind: prune\n    sparsity: 0.6\n    pattern: '2:4'\n", r"sparsity 0.6 contradicts pattern 2:4"),
        ("stages:\n  - kind: prune\n    sparsity: 0.5\n    targets: ['(']\n", r"stages\[0\]\.targets: bad regular expression"),
        ("model: {sorce: x}\n", r"r\.yaml:1: model\.sorce: unknown key"),
        ("data:\n  calibration: {seqlen: 0}\n", r"data\.calibration\.seqlen: Input should be greater than 1"),
        ("stages: [\n", r"r\.yaml:\d+: not valid YAML"),
        ("- 1\n- 2\n", r"a recipe is a mapping"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, expected):
    with pytest.raises(CompressError, match=expected):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(CompressError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_set_overrides(tmp_path):
    r = load_recipe(
        write(tmp_path, GOOD),
        ["stages.0.allocation.beta=auto", "stages.0.method=wanda", "data.calibration.nsamples=4", "eval.dense=false"],
    )
    assert r.stages[0].allocation.beta == "auto" and r.stages[0].method == "wanda"
    assert r.data.calibration.nsamples == 4 and r.eval.dense is False


@pytest.mark.parametrize(
    "override,expected",
    [("stages.3.sparsity=0.5", r"no list item 3"), ("seed", r"expected key\.path=value"), ("name.x=1", r"cannot set a key inside a str")],
)
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(CompressError, match=expected):
        load_recipe(write(tmp_path, GOOD), [override])


def test_override_errors_are_validated_too(tmp_path):
    with pytest.raises(CompressError, match=r"stages\[0\]\.dampening: Input should be greater than 0"):
        load_recipe(write(tmp_path, GOOD), ["stages.0.dampening=0"])
