"""The bottom of the fused PRoPE kernels: camera matrices, the per-token transform, precisions,
device checks and the launcher that falls back to smaller configs. Every other kernel module
imports from here; this module imports only the reference (for its RoPE angles) and the configs.

Math (docs/reference.md section 3; names as in `kernels.prope.reference`): per token t of
camera c,
    q' = D_t^T q,  k' = E_t k,  v' = E_t v,  o' = softmax(q' k'^T / sqrt(d)) v',  o = D_t o'
with D_t = blockdiag(I (x) P_c, R(x)^T, R(y)^T), E_t = blockdiag(I (x) A_c, R(x), R(y)): channels
[0, d/2) in 4-chunks through a camera matrix, [d/2, d) rotated by the patch column / row (RoPE).
A_c is the convention's key/value matrix (P_c^-1 textbook, so E_t = D_t^-1; T^-1 lift(K_n)
release); the backward applies D_t^T to do, D_t to dq', E_t^T to dk', dv'. The convention only
changes what the geometry kernel writes: every other kernel reads matrices.

Design: every transform is one per-token map x -> M_c x (4-chunks) + RoPE rotation
(`transform_tile`) on an fp32 register tile, so the attention loops themselves stay plain flash
attention, at flash-attention speed. The camera
part is a dot with blockdiag(M_c^T), one per camera present in the tile (at most 2 when the tile
is not longer than a view), not a gather; the RoPE partners come from a second load of the same
rows (the transform pass: cache hits) or a signed-permutation dot on register tiles (q, o, dq);
cos / sin are gathered from (2, max(ph, pw), d/8) angle tables (a few KiB: L1-resident). The
dots run in tf32 for bf16 (inside bf16's rounding), tf32x3 for fp16, exact for fp32
(`precisions`). The four camera matrices per view come from one small kernel
(`_geometry_kernel`); the angle tables are cached per (patches, d, device). Head dims that are
not powers of two (d = 48) run padded to the next one in registers; memory holds d columns.

Supported (`supported`): bf16 / fp32 on CUDA with d % 8 == 0 and 16 <= d <= 128, fp16 with
d <= 64; on CPU, fp32 under the Triton interpreter (TRITON_INTERPRET=1 set before triton was
first imported). Everything else runs the reference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kernels.prope.configs import BlockConfig, PRoPEKernels, padded
from kernels.prope.reference import check_convention, rope_tables

__all__ = ["Geometry", "geometry", "transform", "transform_tile", "token_block", "row_ptrs",
           "key_tile",
           "supported", "interpreted", "precisions", "precision_kwargs",
           "sm_major", "use_tma", "descriptors", "dense", "launch_kwargs", "launch_with_fallback",
           "launch_blocks",
           "LOG2E", "QT", "KV", "OUT", "GKV", "TensorDescriptor"]

LOG2E = 1.4426950408889634
try:   # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:   # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None


@triton.jit
def _geometry_kernel(W2C, KI, MATS, BV, inv_h, inv_w, RELEASE: tl.constexpr):
    """Per camera (program): P = lift(K_n) T and the key/value matrix A (prope_matrices' closed
    form, fp32): T^-1 lift(K_n^-1) = P^-1, or T^-1 lift(K_n) if RELEASE; stored as
    MATS[0..3] = P^T, A, P, A^T, each (B*V, 4, 4)."""
    cam = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, 4)[:, None]
    c = tl.arange(0, 4)[None, :]
    t = tl.load(W2C + cam * 16 + r * 4 + c)
    tt = tl.load(W2C + cam * 16 + c * 4 + r)                     # T^T
    kb = KI + cam * 9
    fx = tl.load(kb) * inv_w
    fy = tl.load(kb + 4) * inv_h
    cx = tl.load(kb + 2) * inv_w - 0.5
    cy = tl.load(kb + 5) * inv_h - 0.5
    diag = tl.where(r == 0, fx, tl.where(r == 1, fy, 1.0))
    off = tl.where(r == 0, cx, cy)
    lk = tl.where(r == c, diag, 0.0) + tl.where((r < 2) & (c == 2), off, 0.0)
    if RELEASE:
        lka = lk
    else:
        lka = tl.where(r == c, 1.0 / diag, 0.0) + tl.where((r < 2) & (c == 2), -off / diag, 0.0)
    tvec = tl.sum(tl.where(c == 3, t, 0.0), 1)                    # T[:, 3]
    rt = tl.where((r < 3) & (c < 3), tt, 0.0)                     # R^T
    rt_t = tl.sum(rt * tvec[None, :], 1)                          # R^T t
    t_inv = rt + tl.where((c == 3) & (r < 3), -rt_t[:, None], 0.0) + tl.where(
        (r == 3) & (c == 3), 1.0, 0.0)
    p = tl.sum(lk[:, :, None] * t[None, :, :], 1)
    a = tl.sum(t_inv[:, :, None] * lka[None, :, :], 1)
    out = MATS + cam * 16
    tl.store(out + c * 4 + r, p)                  # P^T
    tl.store(out + BV * 16 + r * 4 + c, a)
    tl.store(out + 2 * BV * 16 + r * 4 + c, p)
    tl.store(out + 3 * BV * 16 + c * 4 + r, a)


@triton.jit
def transform_tile(x, tok, ok, mat, CS, SN, NV, PW, PMAX, D: tl.constexpr,
                   DP: tl.constexpr, INV: tl.constexpr, XPREC: tl.constexpr):
    """The per-token transform (`_xform_p`) of the fp32 register tile x (BT, DP), rows tok."""
    return _xform_p(x, x, False, tok, ok, mat, CS, SN, NV, PW, PMAX, D, DP, INV, XPREC)


@triton.jit
def _xform_p(x, xp, HAVE_XP: tl.constexpr, tok, ok, mat, CS, SN, NV, PW, PMAX, D: tl.constexpr,
             DP: tl.constexpr, INV: tl.constexpr, XPREC: tl.constexpr):
    """Per-token transform of the fp32 register tile x (BT, DP), row r = token tok[r]:
    columns [0, D/2) in 4-chunks times M[camera] (out_i = sum_j M[i, j] x_j, M 4x4 row-major at
    mat + 16 * camera), columns [D/2, D) rotated by the token's RoPE angles (forward
    [a cos + b sin, -a sin + b cos], or the inverse if INV); columns >= D are 0.
    No gathers: the camera part is x @ blockdiag(M^T) (one dot per camera present in the tile,
    at most 2 when the tile is not longer than a view), the RoPE partner swap x @ (signed
    permutation), cos/sin gathered from the (2, PMAX, D/8) x / y angle tables (a few KiB: L1).
    With HAVE_XP, xp already holds each RoPE column's partner (a <-> b; the pass kernel loads
    it from memory, cache hits), which saves the permutation dot."""
    HALF: tl.constexpr = D // 2
    Q4: tl.constexpr = D // 4
    Q8: tl.constexpr = D // 8
    ri = tl.arange(0, DP)[:, None]
    c = tl.arange(0, DP)[None, :]
    okr = ok[:, None]
    cam = tok // NV
    rope = (c >= HALF) & (c < D)
    rel = tl.where(rope, c - HALF, 0)
    is_a = (rel % Q4) < Q8
    t = (tok % NV)[:, None]
    xy = rel // Q4
    tab = xy * (PMAX * Q8) + tl.where(xy == 0, t % PW, t // PW) * Q8 + rel % Q8
    cs = tl.load(CS + tab, mask=okr & rope, other=0.0)
    sn = tl.load(SN + tab, mask=okr & rope, other=0.0)
    sn = tl.where(is_a != INV, sn, -sn)
    swap = ((ri == tl.where(is_a, c + Q8, c - Q8)) & rope).to(tl.float32)
    if HAVE_XP:
        y = x * cs + xp * sn
    else:
        y = x * cs + tl.dot(x, swap, input_precision=XPREC) * sn
    blk = ((ri // 4) == (c // 4)) & (c < HALF)
    idx = (c % 4) * 4 + (ri % 4)                   # G[r, c] = M[c % 4, r % 4]
    lo = tl.min(tl.where(ok, cam, 2147483647), 0)
    hi = tl.max(tl.where(ok, cam, -1), 0)
    for cc in range(lo, hi + 1):
        g = tl.load(mat + cc * 16 + idx, mask=blk, other=0.0)
        y += tl.where((cam == cc)[:, None], tl.dot(x, g, input_precision=XPREC), 0.0)
    return y


@triton.jit
def token_block(NH, N, BT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """This program's (batch, head) and block of BT tokens (program ids 1 and 0): bh, b, h, the
    tokens tok (BT,), which of them exist (ok), tok as an int64 column t64 (BT, 1), the columns
    c (1, DP) and the mask (BT, DP) of the elements that exist."""
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = tok < N
    t64 = tok.to(tl.int64)[:, None]
    c = tl.arange(0, DP)[None, :]
    mask = ok[:, None] & (c < D)
    return bh, b, h, tok, ok, t64, c, mask


@triton.jit
def row_ptrs(X, b, h, t64, s_b, s_h, s_n):
    """Pointers to the rows t64 (BT, 1) of batch b, head h of X (strides s_b, s_h, s_n)."""
    return X + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + t64 * s_n


@triton.jit
def key_tile(desc, base, start, bh, s_n, N, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
             TMA: tl.constexpr):
    """Rows start + [0, BN) of a primed tensor's (batch, head) as a (BN, DP) tile: through the
    descriptor desc over (B*h, N, d) (bh: the index of its first dim) if TMA, else from base
    (row stride s_n); rows >= N and columns >= D read as 0 either way."""
    if TMA:
        x = desc.load([bh, start, 0]).reshape(BN, DP)
    else:
        key = start + tl.arange(0, BN)
        c = tl.arange(0, DP)[None, :]
        x = tl.load(base + key.to(tl.int64)[:, None] * s_n + c, mask=(key < N)[:, None] & (c < D),
                    other=0.0)
    return x


@triton.jit
def _xform_kernel(X, Y, MAT, CT, ST, s_xb, s_xh, s_xn, s_yb, s_yh, s_yn, NH, N, NV, NVIEW, PW,
                  PMAX,
                  D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, INV: tl.constexpr,
                  XPREC: tl.constexpr):
    """Y = transform(X) for every token (the pre-pass)."""
    bh, b, h, tok, ok, t64, c, mask = token_block(NH, N, BT, D, DP)
    rows = row_ptrs(X, b, h, t64, s_xb, s_xh, s_xn)
    x = tl.load(rows + c, mask=mask, other=0.0).to(tl.float32)
    # RoPE partners: column c of quarter [a | b] pairs with c +- D/8 (same rows: cache hits)
    rope = (c >= D // 2) & (c < D)
    rel = tl.where(rope, c - D // 2, 0)
    pc = tl.where(rope, tl.where((rel % (D // 4)) < D // 8, c + D // 8, c - D // 8), c)
    xp = tl.load(rows + pc, mask=mask & rope, other=0.0).to(tl.float32)
    y = _xform_p(x, xp, True, tok, ok, MAT + b * NVIEW * 16, CT, ST, NV, PW, PMAX, D, DP, INV,
                 XPREC)
    tl.store(row_ptrs(Y, b, h, t64, s_yb, s_yh, s_yn) + c, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """What the kernels need of the cameras and the token grid, computed once per call."""

    mats: Tensor     # (4, B, V, 4, 4) fp32: P^T (q, do), A (k, v), P (o, dq), A^T (dk, dv)
    ct: Tensor       # (2, pmax, d/8) fp32 cos of the x (by column) and y (by row) angles
    st: Tensor       # (2, pmax, d/8) fp32 sin of the same
    views: int
    per_view: int
    pw: int          # patch columns per view
    pmax: int        # max(ph, pw): rows of the angle tables


# Which of Geometry.mats a transform applies (per token: q' = P^T-side, k' / v' = A (P^-1 in the
# textbook convention), o and dq = P with the inverse rotation, dk / dv = A^T with the inverse
# rotation).
QT, KV, OUT, GKV = range(4)


def geometry(w2c: Tensor, K: Tensor, patches, image_size, d: int, device,
             convention: str = "textbook") -> Geometry:
    """Geometry of B x V cameras (w2c (B, V, 4, 4), K (B, V, 3, 3)) for head dim d; the key/value
    matrix A of `convention` ("textbook" or "release")."""
    B, V = w2c.shape[:2]
    mats = torch.empty(4, B, V, 4, 4, dtype=torch.float32, device=device)
    _geometry_kernel[(B * V,)](w2c.detach().to(device, torch.float32).contiguous(),
                               K.detach().to(device, torch.float32).contiguous(), mats, B * V,
                               1.0 / image_size[0], 1.0 / image_size[1],
                               RELEASE=check_convention(convention, "geometry") == "release")
    ct, st, pmax = _rope_pairs_tables(tuple(patches), d, torch.device(device))
    return Geometry(mats, ct, st, V, patches[0] * patches[1], patches[1], pmax)


@functools.lru_cache(maxsize=64)
def _rope_pairs_tables(patches: tuple[int, int], d: int,
                       device: torch.device) -> tuple[Tensor, Tensor, int]:
    """cos / sin (2, PMAX, d/8) fp32 of the x (index 0, by column) and y (1, by row) RoPE angles
    (a few KiB: they stay in L1), and PMAX = max(ph, pw)."""
    ph, pw = patches
    pmax = max(ph, pw)
    cx, sx, cy, sy = rope_tables((pmax, pmax), d, torch.float32, device)
    # rope_tables is row-major over (row, column): column angles of row 0, row angles of col 0.
    idx = torch.arange(pmax, device=device)
    cos = torch.stack([cx[idx], cy[idx * pmax]]).contiguous()
    sin = torch.stack([sx[idx], sy[idx * pmax]]).contiguous()
    return cos, sin, pmax


def supported(q: Tensor) -> bool:
    """Whether the fused kernels run for q (else `prope_attention` uses the reference)."""
    d = q.shape[-1]
    if d % 8 or not 16 <= d <= 128 or q.dtype not in (torch.float16, torch.bfloat16,
                                                       torch.float32):
        return False
    if q.dtype == torch.float16 and d > 64:
        return False   # see precisions
    if q.is_cuda:
        return not interpreted()
    return q.device.type == "cpu" and interpreted() and q.dtype == torch.float32


def interpreted() -> bool:
    """True when the kernels are Triton-interpreter functions (TRITON_INTERPRET=1 was set before
    triton was first imported in this process): then they run on CPU tensors."""
    return not isinstance(_xform_kernel, JITFunction)


def precisions(dtype: torch.dtype, interpret: bool) -> tuple[str, str]:
    """(attention dots, transform dots). fp32 inputs: exact (ieee) everywhere. 16-bit: the
    attention dots take 16-bit operands (the setting is unused); the transform dots see 16-bit
    exact operands or fp32 accumulators and feed one 16-bit rounding: tf32 (2^-11) is inside
    bf16's 2^-9, fp16 rounds at 2^-11 itself and gets tf32x3 (fp32-accurate). At d > 64
    tf32x3's split operands (x and two (d, d) fp32 matrices, hi and lo) need 256-448 KiB of
    shared memory, over the H100's 227, and tf32 put fp16's o error at 2.4x the reference's
    (H100, d = 128): `supported` sends fp16 at d > 64 to the reference."""
    if interpret or dtype == torch.float32:
        return "ieee", "ieee"
    return "tf32", ("tf32x3" if dtype == torch.float16 else "tf32")


@functools.lru_cache(maxsize=None)
def sm_major(device: torch.device) -> int:
    """The device's compute capability major (9: Hopper), looked up once per device."""
    return torch.cuda.get_device_capability(device)[0]


def use_tma(x: Tensor, cfg) -> bool:
    """TMA descriptors for loads of x (contiguous scratch on a Hopper+ GPU, if cfg.tma)."""
    return (cfg.tma and x.is_cuda and x.is_contiguous() and TensorDescriptor is not None
            and sm_major(x.device) >= 9)


def descriptors(xs, rows: int, d: int, on: bool):
    """(B*h, N, d) TMA descriptors with (1, rows, padded d) blocks over contiguous xs, else xs."""
    if not on:
        return xs
    B, H, N, _ = xs[0].shape
    return [TensorDescriptor(x, [B * H, N, d], [N * d, d, 1], [1, rows, padded(d)]) for x in xs]


def dense(x: Tensor) -> Tensor:
    """x itself when its last dim is contiguous and empty_like keeps its strides (contiguous, or a
    permuted view such as (B, N, h, d).transpose(1, 2)): the backward then writes dq/dk/dv with
    q/k/v's strides. Otherwise a contiguous copy."""
    if x.stride(-1) == 1 and torch.empty_like(x, device="meta").stride() == x.stride():
        return x
    return x.contiguous()


def launch_kwargs(x: Tensor, cfg) -> dict:
    """num_warps / num_stages of cfg on a GPU; nothing under the interpreter."""
    return {} if not x.is_cuda else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def precision_kwargs(x: Tensor) -> dict:
    mprec, xprec = precisions(x.dtype, not x.is_cuda)
    return dict(MPREC=mprec, XPREC=xprec)


_fell_back: dict = {}


def launch_with_fallback(kind: str, x: Tensor, cfg, given: bool, launch: Callable,
                         fallbacks: tuple) -> None:
    """launch(cfg). A config the caller `given` runs as it is (an OutOfResources error
    propagates); a default one that the compiler cannot fit (out of shared memory or registers,
    e.g. fp32 at d = 128) is retried with 2 stages, then with each of `fallbacks`, and the one
    that fits is remembered per (kind, d, dtype) for later calls."""
    if given:
        launch(cfg)
        return
    key = (kind, x.shape[-1], x.dtype, cfg)
    first = _fell_back.get(key, cfg)
    try:
        launch(first)
        return
    except triton.runtime.errors.OutOfResources:
        if not x.is_cuda:
            raise
    for fb in (replace(first, num_stages=2),) + fallbacks:
        try:
            launch(fb)
        except triton.runtime.errors.OutOfResources:
            continue
        _fell_back[key] = fb
        return
    raise RuntimeError(f"prope_attention: no launch config of the {kind} kernel fits "
                       f"d={x.shape[-1]}, {x.dtype}")


_BLOCK_FALLBACKS = (BlockConfig(64, 64, 4, 2), BlockConfig(32, 32, 4, 1))


def launch_blocks(kind: str, x: Tensor, kernels: PRoPEKernels, operands: list, rows: str,
                  launch: Callable) -> None:
    """Launch the attention kernel `kind` ("prepass", "dq", "dkdv") for x (B, h, N, d) with the
    choice's config for it (or the default, with fallbacks): launch(cfg, tma, descs), descs TMA
    descriptors over the two primed `operands` (blocks of cfg.<rows> rows) where both can use
    TMA, else the operands themselves."""
    d = x.shape[-1]
    cfg, given = kernels.config(kind, d, not x.is_cuda)

    def launch_with(cfg):
        tma = all(use_tma(t, cfg) for t in operands)
        launch(cfg, tma, descriptors(operands, getattr(cfg, rows), d, tma))
    launch_with_fallback(kind, x, cfg, given, launch_with, _BLOCK_FALLBACKS)


def transform(x: Tensor, y: Tensor, g: Geometry, which: int, inverse: bool, cfg) -> None:
    """y = per-token transform of x (B, h, N, d) with g.mats[which] (inverse rotation if
    `inverse`), launched with the TransformConfig cfg; y may be x (each program reads its rows
    into registers before it writes them)."""
    B, H, N, d = x.shape
    launch = {} if not x.is_cuda else dict(num_warps=cfg.num_warps)
    _xform_kernel[(triton.cdiv(N, cfg.block), B * H)](
        x, y, g.mats[which], g.ct, g.st, x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2), H, N, g.per_view, g.views, g.pw, g.pmax,
        D=d, DP=padded(d), BT=cfg.block, INV=inverse, XPREC=precisions(x.dtype, not x.is_cuda)[1],
        **launch)
