#!/usr/bin/env bash
# llama.cpp's own quantizer on SmolLM2-135M WITH an importance matrix, against the same types
# without one: the anchor that our GPTQ-onto-GGUF-blocks rows (benchmarks/gguf_grids.py) are
# compared with.
#
#   1. pip downloads the llama-cpp-python sdist this project already compiles and unpacks it;
#      llama.cpp's sources are in vendor/llama.cpp (tools/imatrix, tools/quantize).
#   2. CMake builds only llama-imatrix and llama-quantize from that tree (~7 min on 2 cores).
#   3. `compress run` (no stages) writes the float32 GGUF through llama.cpp's converter;
#      llama-imatrix computes an importance matrix on Brown (64 chunks x 512 tokens); then
#      llama-quantize writes every type with and without --imatrix.
#   4. `compress eval --runtime llama.cpp` scores each file: the first 32 x 512 windows of
#      WikiText-2 test, the windows of benchmarks/sparsity.py (Q4_0 without imatrix reads 35.41).
#
# Writes $WORK/scores.json: type -> {with_imatrix, without_imatrix} -> MB (bytes / 2**20), ppl.
# Steps whose output exists are skipped (the build, the sdist, the f32 file); FORCE=1 redoes the
# f32 file, the imatrix, the quantized files and the scores; REBUILD=1 rebuilds the tools.
#
#   bash benchmarks/imatrix_anchor.sh
#   TYPES="Q4_0 Q2_K" CHUNKS=16 bash benchmarks/imatrix_anchor.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="${PROJECT:-$(dirname "$HERE")}"                  # the repository (its .venv runs compress)
LCPP_VERSION="${LCPP_VERSION:-0.3.36}"                     # llama-cpp-python, as in constraints.txt
SDIST_DIR="${SDIST_DIR:-/tmp/lcpp-sdist}"
SRC_DIR="${SRC_DIR:-/tmp/lcpp-src}"
BUILD_DIR="${BUILD_DIR:-/tmp/lcpp-build}"
WORK="${WORK:-/tmp/imatrix-work}"
MODEL="${MODEL:-/tmp/smollm2-hf}"                          # SmolLM2-135M as a float32 HF folder
DATA="$(realpath -m "${DATA:-$PROJECT/../shared/data}")"  # canonical: the path is stored in the imatrix
CALIB="${CALIB:-$DATA/brown.txt}"                          # imatrix calibration text
EVAL_DATA="${EVAL_DATA:-$DATA/wikitext2-test.raw}"         # perplexity text
THREADS="${THREADS:-2}"
CTX="${CTX:-512}"                                          # imatrix chunk length
CHUNKS="${CHUNKS:-64}"                                     # imatrix chunks
SEQLEN="${SEQLEN:-512}"                                    # eval window length
NSAMPLES="${NSAMPLES:-32}"                                 # eval windows
TYPES="${TYPES:-Q4_0 Q4_K_M Q3_K_M Q2_K}"
FORCE="${FORCE:-0}"
REBUILD="${REBUILD:-0}"

PY="$PROJECT/.venv/bin/python"
COMPRESS="$PROJECT/.venv/bin/compress"
BIN="$BUILD_DIR/bin"
mkdir -p "$WORK"
log() { echo "[imatrix_anchor] $*" >&2; }
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }

# 1. sdist -> vendored llama.cpp
SDIST="$SDIST_DIR/llama_cpp_python-$LCPP_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  log "downloading the llama-cpp-python $LCPP_VERSION sdist"
  "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$LCPP_VERSION" -d "$SDIST_DIR"
fi
LLAMA="$SRC_DIR/vendor/llama.cpp"
if [[ ! -d "$LLAMA/tools/imatrix" ]]; then
  mkdir -p "$SRC_DIR"
  tar xzf "$SDIST" -C "$SRC_DIR" --strip-components=1
fi
for tool in imatrix quantize; do
  [[ -f "$LLAMA/tools/$tool/CMakeLists.txt" ]] || { log "no tools/$tool in $LLAMA"; exit 1; }
done

# 2. build the two tools (system cmake, or one pip-installed into a throwaway venv)
BUILD_SECONDS=null
if [[ "$REBUILD" == 1 || ! -x "$BIN/llama-imatrix" || ! -x "$BIN/llama-quantize" ]]; then
  CMAKE="$(command -v cmake || true)"
  if [[ -z "$CMAKE" ]]; then
    "$PY" -m venv "$WORK/cmake-venv" && "$WORK/cmake-venv/bin/pip" install -q cmake
    CMAKE="$WORK/cmake-venv/bin/cmake"
  fi
  t0=$(now)
  "$CMAKE" -S "$LLAMA" -B "$BUILD_DIR" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release > "$WORK/cmake-configure.log"
  "$CMAKE" --build "$BUILD_DIR" --config Release --target llama-imatrix llama-quantize llama-perplexity -j"$THREADS" > "$WORK/cmake-build.log"
  BUILD_SECONDS=$(since "$t0")
  log "built llama-imatrix and llama-quantize in $BUILD_SECONDS s"
fi

# 3a. float32 GGUF through the project's exporter (llama.cpp's converter), no stages
F32="$WORK/f32run/gguf/model-f32.gguf"
if [[ "$FORCE" == 1 || ! -f "$F32" ]]; then
  cat > "$WORK/f32.yaml" <<EOF
name: f32
seed: 0
model: {source: $MODEL}
data:
  calibration: {source: $CALIB, nsamples: 64, seqlen: 512, seed: 0}
  validation: {source: $CALIB, nsamples: 16, seqlen: 512}
  evaluation: {source: $EVAL_DATA, nsamples: $NSAMPLES, seqlen: $SEQLEN}
stages: []
eval: {perplexity: false}
export: {hf: false, gguf: {types: [f32]}, check: false}
output_dir: $WORK/f32run
EOF
  (cd "$PROJECT" && "$COMPRESS" run "$WORK/f32.yaml" --overwrite -q)
fi

# 3b. importance matrix: the first CHUNKS x CTX tokens of the calibration text
IMATRIX="$WORK/imatrix.gguf"
if [[ "$FORCE" == 1 || ! -f "$IMATRIX" ]]; then
  log "llama-imatrix: $CHUNKS chunks x $CTX tokens of $CALIB"
  t0=$(now)
  "$BIN/llama-imatrix" -m "$F32" -f "$CALIB" -c "$CTX" --chunks "$CHUNKS" -t "$THREADS" -o "$IMATRIX" > "$WORK/imatrix.log" 2>&1
  echo "$(since "$t0")" > "$WORK/imatrix.seconds"
  log "imatrix in $(cat "$WORK/imatrix.seconds") s"
fi

# 3c. quantize every type with (imat-*) and without (plain-*) the importance matrix
for T in $TYPES; do
  t="${T,,}"
  for variant in plain imat; do
    out="$WORK/$variant-$t.gguf"
    [[ "$FORCE" != 1 && -f "$out" ]] && continue
    extra=(); [[ "$variant" == imat ]] && extra=(--imatrix "$IMATRIX")
    "$BIN/llama-quantize" "${extra[@]}" "$F32" "$out" "$T" "$THREADS" > "$WORK/quantize-$variant-$t.log" 2>&1
  done
done

# 4. score each file in llama.cpp (one at a time: ~4 min each on 2 busy cores)
for T in $TYPES; do
  t="${T,,}"
  for variant in plain imat; do
    out="$WORK/eval-$variant-$t.json"
    [[ "$FORCE" != 1 && -s "$out" && "$out" -nt "$WORK/$variant-$t.gguf" ]] && continue
    log "scoring $variant-$t.gguf"
    (cd "$PROJECT" && "$COMPRESS" eval "$WORK/$variant-$t.gguf" --runtime llama.cpp --data "$EVAL_DATA" \
        --seqlen "$SEQLEN" --nsamples "$NSAMPLES" -q > "$out.tmp" 2> "$WORK/eval-$variant-$t.log")
    mv "$out.tmp" "$out"
  done
done

# scores.json: type -> MB / ppl / tensor types, with and without the importance matrix
"$PY" - "$WORK" "$BUILD_SECONDS" "$CALIB" "$CTX" "$CHUNKS" "$EVAL_DATA" "$NSAMPLES" "$SEQLEN" "$TYPES" <<'EOF'
import collections, json, sys
from pathlib import Path
import gguf
work, build_s, calib, ctx, chunks, eval_data, nsamples, seqlen, types = sys.argv[1:]
work = Path(work)
def row(variant, t):
    f = work / f"{variant}-{t}.gguf"
    ev = json.loads((work / f"eval-{variant}-{t}.json").read_text())
    kinds = collections.Counter(x.tensor_type.name for x in gguf.GGUFReader(f).tensors)
    return {"mb": round(f.stat().st_size / 2**20, 2), "ppl": round(ev["ppl"], 2), "ppl_exact": ev["ppl"],
            "tokens": ev["tokens"], "windows": ev["windows"], "tensor_types": dict(kinds), "file": str(f)}
sec = work / "imatrix.seconds"
scores = {
    "types": {T: {"with_imatrix": row("imat", T.lower()), "without_imatrix": row("plain", T.lower())} for T in types.split()},
    "imatrix": {"calibration": calib, "ctx": int(ctx), "chunks": int(chunks),
                "seconds": float(sec.read_text()) if sec.is_file() else None},
    "eval": {"data": eval_data, "windows": int(nsamples), "seqlen": int(seqlen), "runtime": "llama.cpp"},
    "build_seconds": None if build_s == "null" else float(build_s),
}
(work / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
print("| type | MB (imatrix) | ppl with imatrix | MB (plain) | ppl without |")
print("|---|---|---|---|---|")
for T, r in scores["types"].items():
    w, p = r["with_imatrix"], r["without_imatrix"]
    print(f"| {T} | {w['mb']:.2f} | {w['ppl']:.2f} | {p['mb']:.2f} | {p['ppl']:.2f} |")
q = scores["types"].get("Q4_0")
if q and int(nsamples) == 32 and int(seqlen) == 512 and abs(q["without_imatrix"]["ppl_exact"] - 35.41) > 0.01:
    print(f"WARNING: Q4_0 without imatrix reads {q['without_imatrix']['ppl_exact']:.2f}, not 35.41: the windows differ", file=sys.stderr)
EOF
log "wrote $WORK/scores.json"
