import textwrap

import pytest

from compress.errors import CompressError
from compress.run.recipe import load_recipe
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


DUPLICATED = """\
    stages:
      - kind: prune
        sparsity: 0.5
        method: wanda
        sparsity: 0.9
"""


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    with pytest.raises(CompressError, match=r"^.*r\.yaml:5: stages\[0\]\.sparsity: the key is given twice \(first on line 3\); keep one$"):
        load_recipe(write(tmp_path, DUPLICATED))
    with pytest.raises(CompressError, match=r"r\.yaml:2: model: the key is given twice \(first on line 1\)"):
        load_recipe(write(tmp_path, "model: {dtype: bfloat16}\nmodel: {dtype: float32}\n"))


def test_merged_keys_may_be_given_again(tmp_path):
    # a key brought in by a merge and given again is YAML's override, not a duplicate
    text = """\
        stages:
          - &p {kind: prune, method: wanda, sparsity: 0.5}
          - <<: *p
            sparsity: 0.6
    """
    r = load_recipe(write(tmp_path, text))
    assert [s.target for s in r.stages] == [0.5, 0.6] and r.stages[1].method == "wanda"


@pytest.mark.parametrize("stages,ok", [
    ("[{kind: prune, sparsity: 0.5}]", False),
    ("[{kind: quantize, method: rtn}]", False),  # int4 g128: not a block format
    ("[{kind: quantize, bits: 4, group_size: 32, act_order: true}]", False),  # scattered groups
    ("[{kind: quantize, method: bnb}]", False),
    ("[{kind: quantize, grid: q4_k}]", True),
    ("[{kind: quantize, bits: 4, group_size: 32}]", True),  # Q4_0 as it stands
    ("[{kind: quantize, method: rtn, bits: 8, group_size: 32}]", True),  # Q8_0
    ("[{kind: prune, method: sparsegpt, sparsity: 0.5, quantize: {bits: 4, group_size: 32}}]", True),
])
def test_a_grid_gguf_file_needs_a_stage_that_makes_block_formats(tmp_path, stages, ok):
    path = write(tmp_path, f"stages: {stages}\nexport:\n  gguf: {{types: [f16, grid]}}\n")
    if ok:
        assert load_recipe(path).export.gguf.types == ["f16", "grid"]
    else:
        with pytest.raises(CompressError, match=r"r\.yaml:3: export\.gguf\.types: grid writes the llama\.cpp block formats"):
            load_recipe(path)


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
