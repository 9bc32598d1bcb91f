"""llama.cpp's block formats as quantisation grids: pure tensor functions.

A GGUF block holds `span` consecutive weights of one row: legacy formats (q4_0 ... q8_0) 32 of
them under one float16 scale (and, asymmetric, a float16 offset m); K-quants 256 of them in
sub-blocks of 16 or 32, each with a small integer scale (and min) under float16 super-block
scales d (and dmin). A weight is decoded as

    w = scale * q + offset        q an integer in [lo, hi]

with scale = d (legacy) or d * sc (K-quant sub-block, sc signed for q3_k / q6_k), offset = m
(q4_1, q5_1), -dmin * m (q2_k, q4_k, q5_k) or none (the symmetric formats, whose 0 is on the grid:
q = 0). The products are float32 of float16 and integer values, computed as gguf's dequantisers
compute them, so the in-memory weights equal what the file decodes to, bit for bit.

`choose` picks a span's parameters from its current weights the way the format stores them: raw
per-sub-block scales (and mins) searched as llama.cpp's make_qx_quants does (candidate ranges,
each refitted by weighted least squares; GPTQ weighs by diag(H), the statistic llama-imatrix
collects; without data a legacy format keeps llama.cpp's reference scale), then,
for K-quants, those scales quantised to their few bits under a float16 super-block scale (as
llama.cpp's quantize_row_q*_K_ref does). GPTQ calls it when it reaches a span (compress/algorithms/obs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from compress.algorithms.quant import rounding_slack

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class BlockFormat:
    name: str
    qtype: Q
    width: int  # columns per scale (sub-block)
    span: int  # columns whose parameters are chosen together (one GGUF block)
    lo: int  # code range
    hi: int
    asym: bool  # an offset beside the scale
    sub_bits: int = 0  # K-quants: bits of a sub-block scale (and min); 0: legacy (the scale is float16)

    @property
    def bits_per_weight(self) -> float:
        """As stored, scales included (gguf's block sizes)."""
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return 8 * size / block

    @property
    def holds_zero(self) -> bool:
        """0 is on the grid (q = 0) whatever the scale: earlier stages' zeros stay exactly zero."""
        return not self.asym

    @property
    def subs(self) -> int:
        return self.span // self.width


FORMATS = {f.name: f for f in (
    BlockFormat("q4_0", Q.Q4_0, 32, 32, -8, 7, False),
    BlockFormat("q4_1", Q.Q4_1, 32, 32, 0, 15, True),
    BlockFormat("q5_0", Q.Q5_0, 32, 32, -16, 15, False),
    BlockFormat("q5_1", Q.Q5_1, 32, 32, 0, 31, True),
    BlockFormat("q8_0", Q.Q8_0, 32, 32, -128, 127, False),
    BlockFormat("q2_k", Q.Q2_K, 16, 256, 0, 3, True, 4),
    BlockFormat("q3_k", Q.Q3_K, 16, 256, -4, 3, False, 6),
    BlockFormat("q4_k", Q.Q4_K, 32, 256, 0, 15, True, 6),
    BlockFormat("q5_k", Q.Q5_K, 32, 256, 0, 31, True, 6),
    BlockFormat("q6_k", Q.Q6_K, 16, 256, -32, 31, False, 8),
)}
# Where a sub-block's extreme lands, in steps of a tenth of a level either side of the format's
# last level, as llama.cpp's make_qx_quants searches (is = -9 .. 9); each candidate's codes then
# get the least-squares scale (and offset) under the importance weights, and the lowest weighted
# error wins.
STEPS = tuple(i / 10 for i in range(-9, 10))


def fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16, held as float32."""
    return x.half().float()


@dataclass
class SpanParams:
    """One span's stored parameters for every row: d (rows,), dmin / m (legacy asym: m is the
    float16 offset, (rows,)); K-quants: sc, m (rows, subs) integers."""

    d: torch.Tensor
    sc: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None


def effective(fmt: BlockFormat, p: SpanParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, offset) per (row, sub-block) as float32, products computed as gguf decodes them."""
    if not fmt.sub_bits:
        return p.d[:, None], (p.m[:, None] if fmt.asym else None)
    scale = p.d[:, None] * p.sc.float()
    return scale, (-(p.dmin[:, None] * p.m.float()) if fmt.asym else None)


def decode(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    w = scale * q
    return w if offset is None else w + offset


def encode(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: BlockFormat) -> torch.Tensor:
    """Nearest codes (as float) of w on the grid; a zero scale gives q = 0 (the offset)."""
    x = w if offset is None else w - offset
    q = torch.where(scale != 0, x / torch.where(scale != 0, scale, 1), 0)
    return torch.round(q).clamp_(fmt.lo, fmt.hi)


def raw_params(fmt: BlockFormat, W: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unquantised per-sub-block (scale, offset), (rows, subs) each. W (rows, span); importance
    (span,) >= 0 (GPTQ: diag(H)). Without data (None) a legacy format takes llama.cpp's reference
    scale (the extreme on the last level, no search) and a K-quant weighs by x^2, as llama.cpp's
    quantizers do without an importance matrix. (llama.cpp also multiplies an importance matrix by
    sqrt(sigma2 + x^2); measured worse under GPTQ: Q4_0 32.49 against 31.66 on SmolLM2.)"""
    rows = W.shape[0]
    x = W.reshape(rows, fmt.subs, fmt.width)
    if fmt.asym:
        low = x.min(dim=-1).values
        high = x.max(dim=-1).values
        if fmt.sub_bits:  # K-quants store min as -dmin * m with m >= 0: the offset is never above 0
            low = low.clamp(max=0)
        reference = ((high - low) / fmt.hi, low)
    else:
        at = x.abs().argmax(dim=-1, keepdim=True)
        extreme = x.gather(-1, at).squeeze(-1)  # signed: it lands on lo, the level without a mirror
        reference = (extreme / fmt.lo, None)
    if importance is None:
        if not fmt.sub_bits:
            return reference
        weights = x**2
    else:
        weights = importance.reshape(1, fmt.subs, fmt.width).expand_as(x)
    return (searched_asym if fmt.asym else searched_sym)(fmt, x, weights, reference)


ROW_CHUNK = 1024  # rows searched at once: the candidates make (rows, subs, steps, width) temporaries


def codes_at(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: BlockFormat) -> torch.Tensor:
    """encode() for every candidate at once: x (..., width), scale / offset (..., steps) ->
    codes (..., steps, width)."""
    inverse = torch.where(scale != 0, 1 / torch.where(scale != 0, scale, 1), 0)[..., None]
    x = x[..., None, :] if offset is None else x[..., None, :] - offset[..., None]
    return torch.round(x * inverse).clamp_(fmt.lo, fmt.hi)


def best_of(score: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each value at the candidate (last axis) with the highest score; the first on ties."""
    at = score.argmax(dim=-1, keepdim=True)
    return [v.gather(-1, at).squeeze(-1) for v in values]


def by_row_chunks(search):
    """Run a candidate search on ROW_CHUNK rows at a time (bounded temporaries), joined back."""

    def run(fmt, x, w, reference):
        if x.shape[0] <= ROW_CHUNK:
            return search(fmt, x, w, reference)
        parts = [search(fmt, x[i : i + ROW_CHUNK], w[i : i + ROW_CHUNK],
                        tuple(None if r is None else r[i : i + ROW_CHUNK] for r in reference)) for i in range(0, x.shape[0], ROW_CHUNK)]
        return tuple(None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in range(2))

    return run


@by_row_chunks
def searched_sym(fmt: BlockFormat, x: torch.Tensor, w: torch.Tensor, reference) -> tuple[torch.Tensor, None]:
    """w = scale * q: for each candidate the codes, then scale = sum(w x q) / sum(w q^2); the best
    maximises sum(w x q)^2 / sum(w q^2) (the weighted error is sum(w x^2) minus that)."""
    steps = torch.tensor(STEPS, dtype=x.dtype, device=x.device)
    extreme = (reference[0] * fmt.lo)[..., None]  # signed extreme of each sub-block, (rows, subs, 1)
    q = codes_at(x, extreme / (fmt.lo - steps), None, fmt)  # the extreme at lo - step levels
    wq = w[..., None, :] * q
    sumlx, suml2 = torch.einsum("...cw,...w->...c", wq, x), (wq * q).sum(-1)
    ok = suml2 > 0
    score = torch.where(ok, sumlx * sumlx / torch.where(ok, suml2, 1), -1.0)
    fitted = torch.where(ok, sumlx / torch.where(ok, suml2, 1), 0.0)
    scale, score = best_of(score, fitted, score)
    return torch.where(score >= 0, scale, reference[0]), None


@by_row_chunks
def searched_asym(fmt: BlockFormat, x: torch.Tensor, w: torch.Tensor, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """w = scale * q + offset: for each candidate range the codes, then (scale, offset) by weighted
    least squares (offset <= 0 for K-quants, whose min is stored as -dmin * m); lowest error wins."""
    base, low = reference
    steps = torch.tensor(STEPS, dtype=x.dtype, device=x.device)
    scale = (base[..., None] * fmt.hi / (fmt.hi + steps))  # (rows, subs, steps)
    offset = low[..., None].expand_as(scale)
    q = codes_at(x, scale, offset, fmt)
    wq = w[..., None, :] * q
    sw, sx, sxx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True), (w * x * x).sum(-1, keepdim=True)
    sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), torch.einsum("...cw,...w->...c", wq, x)
    det = sw * sqq - sq * sq
    ok = det > 1e-30 * sw * sqq
    fit_scale = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, 1), scale)
    fit_offset = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, 1), offset)
    if fmt.sub_bits:  # offset above 0 is not storable: the best scale with offset 0
        above = fit_offset > 0
        fit_scale = torch.where(above, torch.where(sqq > 0, sqx / torch.where(sqq > 0, sqq, 1), scale), fit_scale)
        fit_offset = torch.where(above, torch.zeros_like(fit_offset), fit_offset)
    bad = ~torch.isfinite(fit_scale) | (fit_scale <= 0)
    fit_scale, fit_offset = torch.where(bad, scale, fit_scale), torch.where(bad, offset, fit_offset)
    # the weighted squared error, expanded: no pass over the codes again
    err = (fit_scale**2 * sqq + 2 * fit_scale * fit_offset * sq - 2 * fit_scale * sqx
           + fit_offset**2 * sw - 2 * fit_offset * sx + sxx)
    return tuple(best_of(-err, fit_scale, fit_offset))


def nearest(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def choose(fmt: BlockFormat, W: torch.Tensor, importance: torch.Tensor | None = None) -> SpanParams:
    """A span's parameters for every row of W (rows, span), from its current weights."""
    W = W.float()
    return stored_params(fmt, *raw_params(fmt, W, None if importance is None else importance.float().clamp(min=0)))


def stored_params(fmt: BlockFormat, scale: torch.Tensor, offset: torch.Tensor | None) -> SpanParams:
    """Per-sub-block (scale, offset), (rows, subs), as the format stores them: float16 (legacy),
    or small integers under float16 super-block scales (K-quants, as quantize_row_q*_K_ref)."""
    if not fmt.sub_bits:  # legacy: the scale (and offset) are float16
        return SpanParams(d=fp16(scale[:, 0]), m=fp16(offset[:, 0]) if fmt.asym else None)
    top = (1 << (fmt.sub_bits - 1)) if not fmt.asym else (1 << fmt.sub_bits) - 1  # 32 / 128 signed, 15 / 63 unsigned
    if fmt.asym:
        max_scale = scale.max(dim=1).values  # scales >= 0
        d = fp16(max_scale / top)
        sc = torch.where(max_scale[:, None] > 0, nearest(scale * (top / torch.where(max_scale > 0, max_scale, 1))[:, None]), 0).clamp(0, top)
        mins = -offset  # >= 0
        max_min = mins.max(dim=1).values
        dmin = fp16(max_min / top)
        m = torch.where(max_min[:, None] > 0, nearest(mins * (top / torch.where(max_min > 0, max_min, 1))[:, None]), 0).clamp(0, top)
        return SpanParams(d=d, sc=sc.to(torch.int32), dmin=dmin, m=m.to(torch.int32))
    # symmetric K-quants: signed sub-scales; the largest in magnitude maps to -top (q3_k: -32, q6_k: -128)
    at = scale.abs().argmax(dim=1, keepdim=True)
    max_scale = scale.gather(1, at).squeeze(1)
    safe = torch.where(max_scale != 0, max_scale, 1)
    iscale = -top / safe
    sc = torch.where(max_scale[:, None] != 0, nearest(iscale[:, None] * scale), 0).clamp(-top, top - 1)
    d = torch.where(max_scale != 0, fp16(1 / iscale), 0)
    return SpanParams(d=d, sc=sc.to(torch.int32))


@dataclass
class GgufState:
    """Where a Linear's weight sits on a block format: every span's stored parameters, spans in
    column order (d: (rows, spans); sc, m: (rows, spans * subs)). What the GGUF exporter packs.
    file_type: the llama.cpp file type whose mix chose this format (compress/algorithms/ggml_mixes.py),
    None for a format asked for as such."""

    fmt: BlockFormat
    d: torch.Tensor
    sc: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None
    file_type: str | None = None

    @classmethod
    def stack(cls, fmt: BlockFormat, spans: list[SpanParams]) -> "GgufState":
        def cat(name, dim):
            parts = [getattr(p, name) for p in spans]
            return None if parts[0] is None else torch.stack(parts, dim=1) if dim == "stack" else torch.cat(parts, dim=1)

        if fmt.sub_bits:
            return cls(fmt, cat("d", "stack"), cat("sc", "cat"), cat("dmin", "stack"), cat("m", "cat"))
        return cls(fmt, cat("d", "stack"), m=cat("m", "stack"))

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, offset) per (row, column), float32."""
        fmt = self.fmt
        if fmt.sub_bits:
            scale = self.d.repeat_interleave(fmt.subs, dim=1) * self.sc.float()
            offset = -(self.dmin.repeat_interleave(fmt.subs, dim=1) * self.m.float()) if fmt.asym else None
        else:
            scale, offset = self.d, self.m
        expand = lambda t: None if t is None else t.repeat_interleave(fmt.width, dim=1)  # noqa: E731
        return expand(scale), expand(offset)

    def rows(self, index: torch.Tensor) -> "GgufState":
        """The same parameters for the rows in `index` order (a file's row order)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return GgufState(self.fmt, pick(self.d), pick(self.sc), pick(self.dmin), pick(self.m), self.file_type)

    def codes(self, W: torch.Tensor) -> torch.Tensor:
        """Integer codes (rows, cols) of W, which must lie on this grid: exactly in float32; a
        bfloat16 / float16 model holds the grid values rounded to its dtype (within one unit in
        the last place of the value)."""
        scale, offset = self.scale_offset()
        q = encode(W.float(), scale, offset, self.fmt)
        grid = decode(q, scale, offset)
        if not bool(((grid - W.float()).abs() <= rounding_slack(grid, W.dtype)).all()):  # NaN is refused too
            raise ValueError(f"weights are not on their {self.fmt.name} grid (changed after quantizing?)")
        return q.to(torch.int32)

    def dequantized(self, q: torch.Tensor) -> torch.Tensor:
        scale, offset = self.scale_offset()
        return decode(q.float(), scale, offset)


# What llama.cpp's quantizer puts a matrix in when its rows are not whole blocks of the format
# asked for (src/llama-quant.cpp, tensor_type_fallback); a 32-block format that does not fit
# either leaves the matrix in float (F16 in the file).
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# the formats a block-by-depth allocation chooses among, by the family of the grid asked for
LADDERS = {
    "k": ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"),
    "legacy": ("q4_0", "q5_0", "q8_0"),
    "legacy_asym": ("q4_1", "q5_1", "q8_0"),
}


def ladder_of(name: str) -> tuple[str, ...]:
    fmt = FORMATS[name]
    return LADDERS["k" if fmt.sub_bits or name == "q8_0" else "legacy_asym" if fmt.asym else "legacy"]


def fitting(name: str, cols: int) -> BlockFormat | None:
    """The format a matrix of `cols` columns gets: the one asked for, its fallback, or None (float)."""
    fmt = FORMATS[name]
    if cols % fmt.span == 0:
        return fmt
    fallback = FORMATS.get(FALLBACK.get(name, ""))
    return fallback if fallback is not None and cols % fallback.span == 0 else None


FLOAT_BITS = 16  # a matrix no block fits is written in float16 by llama.cpp's quantizer


def stored_bits_per_weight(name: str, cols: int) -> float:
    """Bits per weight a matrix of `cols` columns stores when asked for format `name`."""
    fmt = fitting(name, cols)
    return fmt.bits_per_weight if fmt is not None else FLOAT_BITS


def rtn(W: torch.Tensor, fmt: BlockFormat) -> tuple[torch.Tensor, GgufState]:
    """Round to nearest on the format's blocks: every span's parameters from W itself."""
    W = W.float()
    rows, cols = W.shape
    spans = cols // fmt.span
    flat = W.reshape(rows, spans, fmt.span).permute(1, 0, 2).reshape(spans * rows, fmt.span)  # span-major
    params = choose(fmt, flat)
    per_span = [SpanParams(**{k: None if v is None else v.reshape(spans, rows, *v.shape[1:])[s] for k, v in vars(params).items()})
                for s in range(spans)]
    state = GgufState.stack(fmt, per_span)
    scale, offset = state.scale_offset()
    return decode(encode(W, scale, offset, fmt), scale, offset), state


# ---------------------------------------------------------------- the states on disk


STATE_FIELDS = ("d", "sc", "dmin", "m")
GRIDS_FILE = "ggml_grids.safetensors"  # an HF folder's block-format parameters, beside its dequantised weights (compress/export/hf/__init__.py)


def state_tensors(prefix: str, state: GgufState) -> dict[str, torch.Tensor]:
    """A layer's stored parameters as named tensors (what ggml_grids.safetensors holds)."""
    return {f"{prefix}.{field}": getattr(state, field).contiguous() for field in STATE_FIELDS if getattr(state, field) is not None}


def state_from_tensors(fmt_name: str, prefix: str, tensors: dict[str, torch.Tensor], file_type: str | None = None) -> GgufState:
    return GgufState(FORMATS[fmt_name], **{field: tensors.get(f"{prefix}.{field}") for field in STATE_FIELDS}, file_type=file_type)
