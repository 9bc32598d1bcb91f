"""Integer codes and stored parameters of a llama.cpp block format -> the bytes of GGUF blocks.

Each packer is the inverse of gguf's own dequantiser for its type (gguf/quants.py: the byte
layouts of ggml-common.h), and tests/algorithms/test_ggml_formats.py checks pack -> gguf.dequantize against
our decoding for every format. Input: q (rows, cols) int codes in the format's [lo, hi], and a
compress.ggml_formats.GgufState; output (rows, cols / span * bytes per block) uint8.
"""

from __future__ import annotations

import numpy as np
import torch

from compress.algorithms.ggml_formats import GgufState


def f16_bytes(x: torch.Tensor) -> np.ndarray:
    """(..., n) values -> (..., n, 2) little-endian float16 bytes."""
    return x.half().contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low & 0x0F) | ((high & 0x0F) << 4)


def pack(state: GgufState, q: torch.Tensor) -> np.ndarray:
    fmt = state.fmt
    rows, cols = q.shape
    n = cols // fmt.span
    u = (q.to(torch.int64) - fmt.lo).numpy().astype(np.uint8).reshape(rows, n, fmt.span)  # unsigned codes
    d = f16_bytes(state.d)  # (rows, n, 2)
    parts = PACKERS[fmt.name](u, state, d, rows, n)
    return np.concatenate([p.reshape(rows, n, -1) for p in parts], axis=-1).reshape(rows, -1)


def legacy(u, state, d, rows, n):
    """q4_0 / q4_1 / q5_0 / q5_1: element j in byte j's low nibble, element j + 16 in its high one;
    5-bit formats keep the fifth bits in a little-endian uint32 (bit j for element j)."""
    fmt = state.fmt
    qs = nibbles(u[..., :16], u[..., 16:])
    out = [d] + ([f16_bytes(state.m)] if fmt.asym else [])
    if fmt.hi - fmt.lo == 31:
        out.append(np.packbits(u >> 4, axis=-1, bitorder="little"))
    return out + [qs]


def q8_0(u, state, d, rows, n):
    return [d, (u.astype(np.int16) + state.fmt.lo).astype(np.int8).view(np.uint8)]


def two_bit(u):
    """Q2_K / Q3_K low bits: byte c*32 + b holds elements c*128 + k*32 + b at bits 2k (k = 0..3)."""
    v = u.reshape(*u.shape[:-1], 2, 4, 32).astype(np.uint8) & 3
    return (v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6)).reshape(*u.shape[:-1], 64)


def q2_k(u, state, d, rows, n):
    sc = state.sc.numpy().astype(np.uint8).reshape(rows, n, 16)
    m = state.m.numpy().astype(np.uint8).reshape(rows, n, 16)
    return [sc | (m << 4), two_bit(u), d, f16_bytes(state.dmin)]


def q3_k(u, state, d, rows, n):
    """q in [-4, 3]: the high bit set for q >= 0 (llama.cpp subtracts 4 where it is clear)."""
    q = u.astype(np.int16) - 4
    high = (q >= 0).astype(np.uint8)
    low = np.where(q >= 0, q, q + 4).astype(np.uint8)
    hb = high.reshape(rows, n, 8, 32)  # element k*32 + b -> byte b, bit k
    hmask = np.zeros((rows, n, 32), dtype=np.uint8)
    for k in range(8):
        hmask |= hb[:, :, k, :] << k
    s = (state.sc.numpy() + 32).astype(np.uint8).reshape(rows, n, 16)  # 6 bits, stored + 32
    scales = np.zeros((rows, n, 12), dtype=np.uint8)
    for i in range(16):  # low nibble: byte i % 8, half i // 8; high 2 bits: byte 8 + i % 4, bits 2 * (i // 4)
        scales[..., i % 8] |= (s[..., i] & 0x0F) << (4 * (i // 8))
        scales[..., 8 + i % 4] |= (s[..., i] >> 4) << (2 * (i // 4))
    return [hmask, two_bit(low), scales, d]


def k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 six-bit scales and mins in 12 bytes (gguf's Q4_K.get_scale_min, inverted)."""
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    for j in range(4):
        out[..., j] = (sc[..., j] & 0x3F) | ((sc[..., j + 4] >> 4) << 6)
        out[..., 4 + j] = (m[..., j] & 0x3F) | ((m[..., j + 4] >> 4) << 6)
        out[..., 8 + j] = (sc[..., j + 4] & 0x0F) | ((m[..., j + 4] & 0x0F) << 4)
    return out


def four_bit_pairs(u):
    """Q4_K / Q5_K low nibbles: byte c*32 + b holds elements (2c)*32 + b (low) and (2c+1)*32 + b (high)."""
    v = u.reshape(*u.shape[:-1], 4, 2, 32)
    return nibbles(v[..., 0, :], v[..., 1, :]).reshape(*u.shape[:-1], 128)


def q4_k(u, state, d, rows, n):
    sc = state.sc.numpy().astype(np.uint8).reshape(rows, n, 8)
    m = state.m.numpy().astype(np.uint8).reshape(rows, n, 8)
    return [d, f16_bytes(state.dmin), k_scales(sc, m), four_bit_pairs(u)]


def q5_k(u, state, d, rows, n):
    sc = state.sc.numpy().astype(np.uint8).reshape(rows, n, 8)
    m = state.m.numpy().astype(np.uint8).reshape(rows, n, 8)
    hb = (u >> 4).reshape(rows, n, 8, 32)  # element s*32 + b -> byte b, bit s
    qh = np.zeros((rows, n, 32), dtype=np.uint8)
    for s in range(8):
        qh |= hb[:, :, s, :] << s
    return [d, f16_bytes(state.dmin), k_scales(sc, m), qh, four_bit_pairs(u & 0x0F)]


def q6_k(u, state, d, rows, n):
    """ql byte h*64 + x: elements h*128 + x (low nibble) and h*128 + 64 + x (high); qh byte
    h*32 + b: elements h*128 + k*32 + b at bits 2k."""
    v = u.reshape(rows, n, 2, 2, 64)
    ql = nibbles(v[..., 0, :], v[..., 1, :]).reshape(rows, n, 128)
    w = (u >> 4).reshape(rows, n, 2, 4, 32)
    qh = (w[..., 0, :] | (w[..., 1, :] << 2) | (w[..., 2, :] << 4) | (w[..., 3, :] << 6)).reshape(rows, n, 64)
    scales = state.sc.numpy().astype(np.int8).view(np.uint8).reshape(rows, n, 16)
    return [ql, qh, scales, d]


PACKERS = {"q4_0": legacy, "q4_1": legacy, "q5_0": legacy, "q5_1": legacy, "q8_0": q8_0,
           "q2_k": q2_k, "q3_k": q3_k, "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}
