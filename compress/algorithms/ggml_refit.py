"""After GPTQ has fixed a matrix's codes on one of llama.cpp's block formats, refit its scales
(and mins) to the layer's output error, with the codes left as they are.

GPTQ chooses a block's scales when it reaches the block, from the weights as updated so far,
then rounds column after column with error feedback: the codes end good, but the scales were
chosen before the codes they multiply. With the codes q fixed, the output error of a row,
(w - w_hat) H (w - w_hat)^T with H the layer's input Hessian, is quadratic in the scales and
offsets, so we lower it in three steps, each exact coordinate descent on that error:

1. each sub-block's scale (and offset) continuous, two sweeps;
2. stored as the format stores them (ggml_formats.stored_params: float16, or integer sub-scales
   under a float16 super-block scale), then each super-block scale d (and dmin) refitted;
3. K-quants: each integer sub-scale (and min) tried one step either way, kept where it helps.

A row keeps GPTQ's own parameters where the refit is not better (never worse, by construction).
Zeros of earlier stages stay: q = 0 decodes to 0 whatever the scale in the symmetric formats.

Measured (benchmarks/results/gguf_kld.md): lower error on the calibration Hessian, not on held-out
text, so the quantize stage runs it only with `scale_refit: true`.
"""

from __future__ import annotations

import torch

from compress.algorithms.ggml_formats import GgufState, decode, fp16, stored_params

SWEEPS = 2


def row_error(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(e H e^T) per row of the weight error E (rows, cols)."""
    return ((E @ H) * E).sum(1)


class Residual:
    """The weight error E = W - W_hat and G = E H, updated as the parameters move."""

    def __init__(self, W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor):
        self.E, self.H = W - W_hat, H
        self.G = self.E @ H

    def gain(self, V: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """For W_hat[:, cols] += t * V: the error falls by 2 t num - t^2 den (per row)."""
        return (V * self.G[:, cols]).sum(1), ((V @ self.H[cols, cols]) * V).sum(1)

    def move(self, dW: torch.Tensor, cols: slice) -> None:
        self.E[:, cols] -= dW
        self.G -= dW @ self.H[cols, :]


def best_step(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def refit(state: GgufState, q: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> GgufState:
    """state's parameters refitted to the output error of W (rows, cols) under H, codes q fixed."""
    fmt = state.fmt
    W, H, q = W.float(), H.float(), q.float()
    scale, offset = state.scale_offset()
    before = row_error(W - decode(q, scale, offset), H)
    s, o = scale[:, :: fmt.width].clone(), None if offset is None else offset[:, :: fmt.width].clone()
    continuous(fmt, q, Residual(W, decode(q, scale, offset), H), s, o)
    spans = W.shape[1] // fmt.span
    pick = lambda t, k: None if t is None else t[:, k * fmt.subs : (k + 1) * fmt.subs]  # noqa: E731
    new = GgufState.stack(fmt, [stored_params(fmt, pick(s, k), pick(o, k)) for k in range(spans)])
    new.file_type = state.file_type
    if fmt.sub_bits:
        residual = Residual(W, new.dequantized(q.int()), H)
        super_scales(new, q, residual)
        integer_steps(new, q, residual)
        super_scales(new, q, residual)
    after = row_error(W - new.dequantized(q.int()), H)
    return keep_better(after < before, new, state)


def continuous(fmt, q: torch.Tensor, r: Residual, s: torch.Tensor, o: torch.Tensor | None) -> None:
    """Step 1, in place on s / o (rows, subs): K-quants keep scales >= 0 (asymmetric) and
    offsets <= 0 (stored as -dmin * m)."""
    w = fmt.width
    for _ in range(SWEEPS):
        for j in range(s.shape[1]):
            cols = slice(j * w, (j + 1) * w)
            Q = q[:, cols]
            t = best_step(*r.gain(Q, cols))
            if fmt.sub_bits and fmt.asym:
                t = torch.maximum(t, -s[:, j])
            s[:, j] += t
            r.move(t[:, None] * Q, cols)
            if o is not None:
                ones = torch.ones_like(Q)
                t = best_step(*r.gain(ones, cols))
                if fmt.sub_bits:
                    t = torch.minimum(t, -o[:, j])
                o[:, j] += t
                r.move(t[:, None] * ones, cols)


def super_scales(state: GgufState, q: torch.Tensor, r: Residual) -> None:
    """Step 2 for K-quants: each super-block's d (and dmin) by the exact step, stored in float16."""
    fmt = state.fmt
    for k in range(state.d.shape[1]):
        cols = slice(k * fmt.span, (k + 1) * fmt.span)
        subs = slice(k * fmt.subs, (k + 1) * fmt.subs)
        def expand(t):
            return t.float().repeat_interleave(fmt.width, dim=1)

        # d multiplies sc * q; dmin multiplies -m
        fields = [("d", q[:, cols] * expand(state.sc[:, subs]))] + ([("dmin", -expand(state.m[:, subs]))] if fmt.asym else [])
        for name, V in fields:
            old = getattr(state, name)[:, k]
            new = fp16(old + best_step(*r.gain(V, cols)))
            if name == "dmin":
                new = new.clamp(min=0)
            getattr(state, name)[:, k] = new
            r.move((new - old)[:, None] * V, cols)


def integer_steps(state: GgufState, q: torch.Tensor, r: Residual) -> None:
    """Step 3: each integer sub-scale (and min) one step up or down where the error falls."""
    fmt = state.fmt
    top = (1 << fmt.sub_bits) - 1 if fmt.asym else 1 << (fmt.sub_bits - 1)
    low, high = (0, top) if fmt.asym else (-top, top - 1)
    for j in range(state.sc.shape[1]):
        cols, k = slice(j * fmt.width, (j + 1) * fmt.width), j // fmt.subs
        fields = [("sc", q[:, cols] * state.d[:, k, None])]
        if fmt.asym:  # the offset is -dmin * m: m + 1 lowers it by dmin
            fields.append(("m", -state.dmin[:, k, None].expand(-1, fmt.width)))
        for name, V in fields:
            num, den = r.gain(V, cols)
            codes = getattr(state, name)
            best = torch.zeros_like(num)
            best_gain = torch.zeros_like(num)
            for t in (-1.0, 1.0):
                ok = (codes[:, j] + t >= low) & (codes[:, j] + t <= high)
                gain = torch.where(ok, 2 * t * num - den, -1.0)
                better = gain > best_gain
                best, best_gain = torch.where(better, t, best), torch.where(better, gain, best_gain)
            codes[:, j] += best.to(codes.dtype)
            r.move(best[:, None] * V, cols)


def keep_better(better: torch.Tensor, new: GgufState, old: GgufState) -> GgufState:
    """Per row: the refitted parameters where they lower the error, GPTQ's elsewhere."""
    def choose(a, b):
        return None if a is None else torch.where(better.view(-1, *([1] * (a.dim() - 1))), a, b)

    return GgufState(new.fmt, choose(new.d, old.d), choose(new.sc, old.sc), choose(new.dmin, old.dmin), choose(new.m, old.m), old.file_type)
