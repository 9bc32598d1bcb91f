"""`compress eval`: perplexity, zero-shot accuracy and tokens/s of any model or exported file, in
the runtime that will serve it: torch (our loader: an HF folder, a run folder, a GGUF file
dequantised, a hub id), llama.cpp (a GGUF file as it is) or ONNX Runtime (an ONNX export's folder).
The perplexity windows are cut by the model's HF tokenizer (for a GGUF file, the one transformers
reads from it) and scored by the runtime, exactly as a run's eval.artefacts does.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from compress.data.windows import SegmentsConfig, build_segments
from compress.errors import CompressError
from compress.evaluation import runtimes
from compress.evaluation import speed as speed_mod
from compress.evaluation.runtimes import runtime_perplexity
from compress.evaluation.zeroshot import zero_shot
from compress.model.load import load_model, read_config, read_tokenizer
from compress.run.engine import check_context

RUNTIMES = {"torch": "hf", "llama.cpp": "gguf", "onnx": "onnx"}


def open_source(source: str, runtime: str, dtype: str, allow_pickle: bool):
    """(Runtime, HF tokenizer, model config) of `source` in `runtime`."""
    if runtime not in RUNTIMES:
        raise CompressError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        loaded = load_model(source, dtype, allow_pickle)
        return runtimes.TorchRuntime(loaded.model, loaded.tokenizer, "torch", Path(loaded.resolved)), loaded.tokenizer, loaded.model.config
    if dtype != "float32":
        raise CompressError(f"--dtype {dtype}: only the torch runtime casts; {runtime} runs the file's own types")
    path = Path(source)
    if runtime == "llama.cpp":
        if path.suffix != ".gguf":
            raise CompressError(f"--runtime llama.cpp: {source} is not a .gguf file")
        rt = runtimes.open_runtime("gguf", path)
        return rt, read_tokenizer(str(path)), read_config(str(path))
    rt = runtimes.open_runtime("onnx", path)

    return rt, rt.tokenizer, AutoConfig.from_pretrained(path)


def evaluate_source(source: str, runtime: str = "torch", data: str | None = "python-docs", seqlen: int = 512, nsamples: int | None = None,
                    dtype: str = "float32", bos="auto", allow_pickle: bool = False, tasks: list[str] = (), tasks_dir: Path | None = None,
                    limit: int | None = None, speed: bool = False) -> dict:
    rt, tokenizer, config = open_source(source, runtime, dtype, allow_pickle)
    out: dict = {"model": source, "runtime": runtime, "artefact": rt.label}
    try:
        windows = None
        if data is not None:
            # The whole source is the evaluation part: nothing here is used for calibration.
            cfg = SegmentsConfig(source=data, seqlen=seqlen, nsamples=nsamples, bos=bos)
            try:
                check_context({"evaluation": cfg}, config)
            except CompressError as err:
                raise CompressError(str(err).replace("data.evaluation.seqlen", "--seqlen")) from None
            segments = build_segments({"evaluation": cfg}, tokenizer)["evaluation"]
            windows = segments.tokens
            out.update({"data": data, "bos": segments.bos, **runtime_perplexity(rt, windows).as_dict()})
        if tasks:
            task_bos = None if bos == "auto" else bos
            out["zero_shot"] = zero_shot(None, None, list(tasks), tasks_dir, limit, 16, task_bos, lm=rt.lm(16, task_bos))
        if speed:
            ids = (windows.flatten().tolist() if windows is not None else tokenizer("\n".join(["The quick brown fox."] * 200)).input_ids)
            ids = ids[: max(speed_mod.PREFILL) + speed_mod.PROMPT + 1]
            out["speed"] = speed_mod.runtime_rates(rt, ids)
    finally:
        rt.close()
    return out
