"""Triton kernels of the noise_loss op: noising, and the weighted loss with its gradient.

csrc/noise_loss.h states the contract (formulas, coefficient rows, `terms`, the loss kinds,
the mask, the scale convention); this file follows its arithmetic. Per sample b of D elements,
in compute type C (float64 for float64 data, float32 otherwise):

    add_noise    e_i    = eps_i, or rnd_T(eps_i + rnd_T(g_b xi_i))     coef [2|3, B]: a, s (, g)
                 x_t_i  = rnd_T(rnd_T(a_b x0_i) + rnd_T(s_b e_i))
    noise_loss   y_i    = p_b eps_i + q_b x0_i   (the terms named)     coef [3|4, B]: w, p, q (, c)
                 d_i    = pred_i - y_i,  m_i the mask's value (1 without a mask)
                 loss_b = sum_i m_i l(d_i) / D * w_b
                 grad_i = rnd_P(g_b (m_i h(d_i))),  g_b = k w_b / D / grad_div * go_b
                 total  = sum_b loss_b / loss_div
    philox_fill  eps itself

with the kind's l, h, k: l2 d^2, d, 2; l1 |d|, sign(d), 1; pseudo-Huber d^2 / (r + c),
d / r, 1 with r = sqrt(d^2 + c^2). Without a mask the gradient is rnd_P(g_b h(d_i)) (no
multiplication by 1). Element j of sample b reads m = mask[b mask_batch_stride +
(j // mask_inner) % mask_size].

Memory: add_noise reads N and writes N (+N read for given noise, +N for a given xi); the
loss reads pred and each term it names (+N for eps only when noise is given, +N for x0) and
writes N for grad; the mask, Mb x mask_size values, is read through the cache.

eps (and xi) is a given tensor or the package's Philox stream (csrc/philox.h holds the
definition; this file follows it to the bit, fused multiply-adds included), regenerated
wherever it is needed so that it never reaches memory. The launchers take tensors and scalars
only (no timesteps, no tables: the caller gathers the per-sample coefficients); the caller
(debias/ops/noise_loss.py) validates them.

Work split. One program per (sample b, chunk j): it walks the flat range
[b D + j CHUNK, min(b D + (j + 1) CHUNK, (b + 1) D)) in tiles of TILE elements, so the
per-sample coefficients are scalars and no element divides its index by D. Tiles start on a
multiple of 16 in the flat index: a Philox group (4 elements) never straddles two tiles, and
when D is a multiple of 16 the loads are 16-byte vectors; the first tile may begin up to 15
elements early and is masked. The mask's index is carried the same way: a quotient and a
remainder of the tile's start, stepped by TILE from tile to tile; an element adds its lane
and divides by multiply-shift constants that the launcher computes (no division instruction).

Reduction. Each program sums its chunk (C lanes, a fixed tree), publishes the partial,
then counts itself done on a per-sample counter; the program that finishes sample b last
adds that sample's partials (fp64, a fixed tree) and writes loss_b; the program that finishes
the last sample adds loss_0..loss_{B-1} (fp64, a fixed tree) into the batch total. One
launch, and the same bits on every run, whatever order the programs ran in. The counters
must be zero on entry.

Floating point. Kernels are launched with fp fusion off, so every product and sum of the
data arithmetic rounds on its own, as the contract asks (x_t equals diffusers' add_noise bit
for bit); the stream's polynomials call tl.fma where philox.h fuses. The pseudo-Huber
gradient takes its square root and division rounded to nearest (IEEE), as C++ does.

Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# csrc/philox.h: Philox4x32-10 multipliers and key bumps.
_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)

# Bits of `terms` (kEpsTerm, kX0Term of csrc/noise_loss.h): the parts of y = p eps + q x0
# that the loss reads; 3 = both. Kernels see them as the constexpr mirrors below (Triton
# reads no plain-int globals).
TERM_EPS, TERM_X0 = 1, 2
_EPS_BIT = tl.constexpr(TERM_EPS)
_X0_BIT = tl.constexpr(TERM_X0)
# Upstream gradient of the loss: none (1), one scalar for the batch, or one per sample.
GO_NONE, GO_SCALAR, GO_PER_SAMPLE = 0, 1, 2
# `kind` (Kind of csrc/noise_loss.h): the elementwise loss l, and its constexpr mirrors.
KIND_L2, KIND_L1, KIND_PSEUDO_HUBER = 0, 1, 2
_L2 = tl.constexpr(KIND_L2)
_L1 = tl.constexpr(KIND_L1)
_HUBER = tl.constexpr(KIND_PSEUDO_HUBER)

_MAX_TILE = 1024  # elements per tile: 8 per thread at 4 warps
_MAX_CHUNK = 16384  # elements per program: 16 tiles, enough to hide a tile's latency
_MIN_TILE = 16  # tiles start on multiples of 16 elements (see the module docstring)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


# ---- the stream ----------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        hi1 = tl.umulhi(c2, _M1)
        lo0 = c0 * _M0
        lo1 = c2 * _M1
        c0 = hi1 ^ c1 ^ k0
        c2 = hi0 ^ c3 ^ k1
        c1 = lo1
        c3 = lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def _minus_two_log(u):
    """-2 log(u) for u in [2^-33, 1]: philox.h's Cephes logf, every coefficient times -2."""
    bits = u.to(tl.uint32, bitcast=True)
    e = (bits - 0x3F3504F3).to(tl.int32, bitcast=True) >> 23
    m = (bits - (e.to(tl.uint32, bitcast=True) << 23)).to(tl.float32, bitcast=True)
    fe = e.to(tl.float32)
    x = m - 1.0
    z = x * x
    z2 = z * z
    p01 = tl.fma(x, 4.9999988079e-1, -6.6666662693e-1)
    p23 = tl.fma(x, 3.3336114883e-1, -4.0001428127e-1)
    p45 = tl.fma(x, 2.4840281904e-1, -2.8498646617e-1)
    p67 = tl.fma(x, 2.3029220104e-1, -2.3353996873e-1)
    p03 = tl.fma(p23, z, p01)
    p47 = tl.fma(p67, z, p45)
    p = tl.fma(z2 * z2, -1.4075367153e-1, tl.fma(p47, z2, p03))
    low_terms = tl.fma(fe, 4.2438888340e-4, z)
    y = tl.fma(p, x * z, low_terms)
    return tl.fma(fe, -1.38671875, tl.fma(x, -2.0, y))


@triton.jit
def _sincos_quarter_turns(t):
    """sin and cos of (pi / 2) t for t in [0, 4]: philox.h's polynomials and quadrant swap."""
    q = (t + 12582912.0) - 12582912.0  # rint(t)
    f = t - q
    quadrant = q.to(tl.int32) & 3
    z = f * f
    z2 = z * z
    s_lo = tl.fma(z, -6.4596360922e-1, 1.5707963705e0)
    s_hi = tl.fma(z, -4.6048373915e-3, 7.9681411386e-2)
    s = f * tl.fma(s_hi, z2, s_lo)
    c_lo = tl.fma(z, -1.2337005138e0, 1.0)
    c_hi = tl.fma(z2, 9.0560456738e-4, tl.fma(z, -2.0861119032e-2, 2.5366938114e-1))
    c = tl.fma(c_hi, z2, c_lo)
    swap = (quadrant & 1) != 0
    sin_sign = ((quadrant & 2) << 30).to(tl.uint32, bitcast=True)
    cos_sign = (((quadrant + 1) & 2) << 30).to(tl.uint32, bitcast=True)
    sin = tl.where(swap, c, s).to(tl.uint32, bitcast=True) ^ sin_sign
    cos = tl.where(swap, s, c).to(tl.uint32, bitcast=True) ^ cos_sign
    return sin.to(tl.float32, bitcast=True), cos.to(tl.float32, bitcast=True)


@triton.jit
def _box_muller(xa, xb):
    """(r cos theta, r sin theta) with r = sqrt(-2 log u(xa)), theta = 2 pi u(xb)."""
    u = xa.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # 2^-32, 2^-33
    r = tl.sqrt_rn(_minus_two_log(u))
    turns = xb.to(tl.float32) * 9.313225746154785e-10 + 4.656612873077393e-10  # 2^-30, 2^-31
    sin, cos = _sincos_quarter_turns(turns)
    return r * cos, r * sin


@triton.jit
def _normals(start, seed_lo, seed_hi, off_lo, off_hi, TILE: tl.constexpr):
    """float32 normals of flat elements start .. start + TILE - 1 (start a multiple of 4):
    one Philox call per group of four, the four normals interleaved back into element order."""
    g = start // 4 + tl.arange(0, TILE // 4).to(tl.int64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.full([TILE // 4], 0, tl.uint32) + off_lo
    c3 = tl.full([TILE // 4], 0, tl.uint32) + off_hi
    x0, x1, x2, x3 = _philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    # [g, p, q] = n_{2p + q}: flat index 4g + 2p + q
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [TILE])


@triton.jit
def _eps(
    noise_ptr,
    idx,
    mask,
    k,
    seed_lo,
    seed_hi,
    off_lo,
    off_hi,
    HAS_NOISE: tl.constexpr,
    EPS: tl.constexpr,
    C: tl.constexpr,
    TILE: tl.constexpr,
):
    """eps of tile idx = k + arange(TILE) in compute type C: the given noise, or the stream
    rounded to the noise dtype EPS."""
    if HAS_NOISE:
        return tl.load(noise_ptr + idx, mask=mask, other=0.0).to(C)
    return _round(_normals(k, seed_lo, seed_hi, off_lo, off_hi, TILE), EPS).to(C)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (float32 or wider) rounded to DTYPE, to nearest even. bfloat16 is rounded on the
    bits (NaN kept), as the GPU's conversion does, because the interpreter truncates."""
    if DTYPE == tl.bfloat16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def _sqrt_rn(x):
    """sqrt rounded to nearest (IEEE): tl.sqrt_rn takes float32 only, tl.sqrt of float64 is
    sqrt.rn.f64 already."""
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _div_rn(x, y):
    """x / y rounded to nearest (IEEE): float32's '/' is div.full (2 ulp), float64's is
    div.rn.f64 already, and tl.div_rn takes float32 only."""
    if x.dtype == tl.float64:
        q = x / y
    else:
        q = tl.div_rn(x, y)
    return q


@triton.jit
def _loss_and_factor(d, c, cc, KIND: tl.constexpr):
    """(l(d), h(d)) of the kind (csrc/noise_loss.h), each operation rounded on its own; c and
    cc = rnd(c c) are the sample's pseudo-Huber constants (unused otherwise)."""
    if KIND == _L2:
        return d * d, d
    elif KIND == _L1:
        # sign(d), with d itself at 0 and NaN (0 keeps its sign, as in C++)
        return tl.abs(d), tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d)).to(d.dtype)
    else:
        dd = d * d
        r = _sqrt_rn(dd + cc)
        # The loss is summed in another order on every backend: its division need not be
        # the IEEE one. The gradient's is, for the same bits everywhere.
        return dd / (r + c), _div_rn(d, r)


@triton.jit
def _words(x):
    """(low, high) uint32 words of a signed int64 taken as uint64 (philox.h)."""
    bits = tl.cast(x, tl.int64).to(tl.uint64, bitcast=True)
    return (bits & 0xFFFFFFFF).to(tl.uint32), (bits >> 32).to(tl.uint32)


@triton.jit
def _span(D, chunks, CHUNK: tl.constexpr):
    """(sample b, first element, end, first tile start) of this program's chunk."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // chunks
    begin = b * D + (pid - b * chunks) * CHUNK
    end = tl.minimum(begin + CHUNK, (b + 1) * D)
    return b, begin, end, (begin // 16) * 16


# ---- kernels -------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "offset", "xi_seed", "xi_offset"])
def _add_noise_kernel(
    x0_ptr,  # [B * D] data, dtype T
    coef_ptr,  # [2, B] contiguous in C: rows a, s; [3, B] with PERTURBED: rows a, s, g
    noise_ptr,  # [B * D] eps, dtype T (unused when HAS_NOISE is off)
    x_t_ptr,  # [B * D] output, dtype T
    seed, offset,  # eps's stream: key and counter offset (int64)
    B, D, chunks,  # samples, elements per sample, programs per sample
    # xi's last: the unperturbed kernel keeps the parameter layout it had without them.
    xi_ptr,  # [B * D] perturbation, dtype T (read only with PERTURBED and HAS_XI)
    xi_seed, xi_offset,  # xi's stream (read only with PERTURBED and not HAS_XI)
    HAS_NOISE: tl.constexpr,  # eps read from noise_ptr, else generated: two code paths
    PERTURBED: tl.constexpr,  # e = eps + g xi (coef has row g); off: today's path untouched
    HAS_XI: tl.constexpr,  # xi read from xi_ptr, else generated (with PERTURBED)
    CHUNK: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    b, begin, end, first = _span(D, chunks, CHUNK)
    seed_lo, seed_hi = _words(seed)
    off_lo, off_hi = _words(offset)
    T = x_t_ptr.dtype.element_ty
    C = coef_ptr.dtype.element_ty
    a = tl.load(coef_ptr + b)
    s = tl.load(coef_ptr + B + b)
    if PERTURBED:
        g = tl.load(coef_ptr + 2 * B + b)
        xi_seed_lo, xi_seed_hi = _words(xi_seed)
        xi_off_lo, xi_off_hi = _words(xi_offset)
    for k in range(first, end, TILE):
        k = tl.multiple_of(k, 16)
        idx = k + tl.arange(0, TILE)
        mask = (idx >= begin) & (idx < end)
        x = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(C)
        eps = _eps(noise_ptr, idx, mask, k, seed_lo, seed_hi, off_lo, off_hi, HAS_NOISE, T, C, TILE)
        if PERTURBED:
            xi = _eps(
                xi_ptr, idx, mask, k, xi_seed_lo, xi_seed_hi, xi_off_lo, xi_off_hi, HAS_XI, T, C,
                TILE,
            )  # fmt: skip
            eps = _round(eps + _round(g * xi, T).to(C), T).to(C)
        signal = _round(a * x, T).to(C)
        scaled = _round(s * eps, T).to(C)
        tl.store(x_t_ptr + idx, _round(signal + scaled, T), mask=mask)


@triton.jit(
    do_not_specialize=[
        "seed", "offset", "grad_div", "loss_div", "mask_inner", "mask_size", "mask_batch_stride",
        "inner_mul", "inner_shift", "size_mul", "size_shift",
    ]
)  # fmt: skip
def _noise_loss_kernel(
    pred_ptr,  # [B * D] model output, dtype P
    coef_ptr,  # [3, B] contiguous in C: rows w, p, q; [4, B] for pseudo-Huber: row c too
    noise_ptr,  # [B * D] eps (read only with the eps term and HAS_NOISE)
    x0_ptr,  # [B * D] data (read only with the x0 term)
    grad_ptr,  # [B * D] output, dtype P (GRAD)
    go_ptr,  # upstream gradient in C: one element (GO == 1) or [B] (GO == 2)
    loss_ptr, total_ptr,  # [B] and [] outputs in C (LOSS)
    partial_ptr, count_ptr,  # [B * chunks] fp64 scratch, [B + 1] int32 zeros (LOSS)
    seed, offset,  # the stream's key and counter offset (int64)
    grad_div, loss_div,  # integer divisors of the gradient and of the total
    B, D, chunks,  # samples, elements per sample, programs per sample
    # The mask's last: the unmasked kernel keeps the parameter layout it had without them.
    mask_ptr,  # Mb x mask_size values in C (read only with HAS_MASK)
    mask_inner, mask_size,  # element j of a sample reads the mask at (j // inner) % size
    mask_batch_stride,  # mask_size (a row per sample) or 0 (one row for the batch)
    inner_mul, inner_shift, size_mul, size_shift,  # _magic(mask_inner), _magic(mask_size)
    TERMS: tl.constexpr,  # bits of TERM_EPS / TERM_X0: what y reads, what is never touched
    HAS_NOISE: tl.constexpr, EPS: tl.constexpr,  # eps given, or the stream rounded to EPS
    KIND: tl.constexpr,  # KIND_L2 / KIND_L1 / KIND_PSEUDO_HUBER: l, h and k of the contract
    HAS_MASK: tl.constexpr,  # m_i read: off, no index arithmetic and no product by 1
    INNER1: tl.constexpr,  # mask_inner == 1 (pixel masks): no division by inner
    LOSS: tl.constexpr, GRAD: tl.constexpr,  # outputs asked (the backward: GRAD only)
    GO: tl.constexpr,  # upstream gradient: 0 none, 1 one element, 2 one per sample
    CHUNK: tl.constexpr, TILE: tl.constexpr, RTILE: tl.constexpr,
):  # fmt: skip
    b, begin, end, first = _span(D, chunks, CHUNK)
    seed_lo, seed_hi = _words(seed)
    off_lo, off_hi = _words(offset)
    C = coef_ptr.dtype.element_ty
    w = tl.load(coef_ptr + b)
    if GRAD:
        # C(k) * w / C(D) / C(grad_div) * go, left to right (csrc/noise_loss.h); 1 * w is w
        if KIND == _L2:
            gscale = 2.0 * w
        else:
            gscale = w
        gscale = gscale / tl.cast(D, C) / tl.cast(grad_div, C)
        if GO == 1:
            gscale = gscale * tl.load(go_ptr)
        elif GO == 2:
            gscale = gscale * tl.load(go_ptr + b)
    # constexpr on the left: the interpreter passes TERMS as a plain int
    if (_EPS_BIT & TERMS) != 0:
        p = tl.load(coef_ptr + B + b)
    if (_X0_BIT & TERMS) != 0:
        q = tl.load(coef_ptr + 2 * B + b)
    c = w  # pseudo-Huber's c; the other kinds never read it
    if KIND == _HUBER:
        c = tl.load(coef_ptr + 3 * B + b)
    cc = c * c
    if HAS_MASK:
        # Element j of the sample, j = n inner + r (0 <= r < inner), reads mask[n % size]. A
        # tile starting at j0 carries (n0 % size, r0) of j0, stepped by TILE from tile to
        # tile with compares; lane t divides r0 + t by inner and n0 + that by size with
        # the launcher's multiply-shift constants (no division instruction, nothing held
        # per lane across tiles). inner and size are below 2^30 (the launcher checks), so
        # every dividend stays below 2^31.
        m_row = mask_ptr + b * mask_batch_stride
        j0 = first - b * D  # the first tile may start up to 15 elements early: j0 < 0
        inner = mask_inner.to(tl.uint32)
        size = mask_size.to(tl.uint32)
        inner_mul, inner_shift = inner_mul.to(tl.uint32), inner_shift.to(tl.uint32)
        size_mul, size_shift = size_mul.to(tl.uint32), size_shift.to(tl.uint32)
        r0 = _floor_mod(j0, mask_inner)
        m_n = _floor_mod((j0 - r0) // mask_inner, mask_size).to(tl.uint32)
        m_r = r0.to(tl.uint32)
        step_n = ((TILE // mask_inner) % mask_size).to(tl.uint32)
        step_r = (TILE % mask_inner).to(tl.uint32)
    acc = tl.zeros([TILE], C)
    for k in range(first, end, TILE):
        k = tl.multiple_of(k, 16)
        idx = k + tl.arange(0, TILE)
        mask = (idx >= begin) & (idx < end)
        pr = tl.load(pred_ptr + idx, mask=mask, other=0.0)
        # y in C: each product rounds, then their sum (fp fusion is off)
        if TERMS == _EPS_BIT:
            y = p * _eps(
                noise_ptr, idx, mask, k, seed_lo, seed_hi, off_lo, off_hi, HAS_NOISE, EPS, C, TILE
            )
        elif TERMS == _X0_BIT:
            y = q * tl.load(x0_ptr + idx, mask=mask, other=0.0).to(C)
        else:
            eps = _eps(
                noise_ptr, idx, mask, k, seed_lo, seed_hi, off_lo, off_hi, HAS_NOISE, EPS, C, TILE
            )
            y = p * eps + q * tl.load(x0_ptr + idx, mask=mask, other=0.0).to(C)
        d = tl.where(mask, pr.to(C) - y, 0.0)
        l, h = _loss_and_factor(d, c, cc, KIND)
        if HAS_MASK:
            lane = tl.arange(0, TILE).to(tl.uint32)
            if INNER1:
                o_m = m_n + lane
            else:
                o_m = m_n + _udiv(m_r + lane, inner_mul, inner_shift)
                m_r += step_r
                wrap = m_r >= inner
                m_r = tl.where(wrap, m_r - inner, m_r)
                m_n += wrap.to(tl.uint32)
            o_m = (o_m - size * _udiv(o_m, size_mul, size_shift)).to(tl.int32)
            m_n += step_n
            m_n = tl.where(m_n >= size, m_n - size, m_n)
            b_m = tl.load(m_row + o_m, mask=mask, other=0.0)
            l = b_m * l
            h = b_m * h
        if LOSS:
            acc += l
        if GRAD:
            tl.store(grad_ptr + idx, _round(gscale * h, pr.dtype), mask=mask)
    if LOSS:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(acc).to(tl.float64))
        # Every thread's store is done before one thread releases them with the count.
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + b, 1, sem="acq_rel") == chunks - 1:
            _finish_sample(
                partial_ptr, loss_ptr, total_ptr, count_ptr, b, w, loss_div, B, D, chunks, RTILE
            )


@triton.jit
def _udiv(x, mul, shift):
    """x // d of uint32 x < 2^31 by the constants of _magic(d): the high word of x (2^32 +
    mul), shifted (Granlund and Montgomery's round-up method; the sum stays below 2^32)."""
    return (tl.umulhi(x, mul) + x) >> shift


@triton.jit
def _floor_mod(x, n):
    """x mod n in [0, n) for n > 0, whichever way '%' rounds (C truncates, the interpreter
    floors)."""
    r = x % n
    return tl.where(r < 0, r + n, r)


@triton.jit
def _finish_sample(
    partial_ptr, loss_ptr, total_ptr, count_ptr, b, w, loss_div, B, D, chunks, RTILE: tl.constexpr
):
    """Run by the last program of sample b: loss_b from its partials, and the batch total
    when b is the last sample to finish. Partials are read past L1 (.cg): other programs
    wrote them."""
    acc = tl.zeros([RTILE], tl.float64)
    for c in range(0, chunks, RTILE):
        r = c + tl.arange(0, RTILE)
        acc += tl.load(
            partial_ptr + b * chunks + r, mask=r < chunks, other=0.0, cache_modifier=".cg"
        )
    loss = tl.sum(acc) / tl.cast(D, tl.float64) * w.to(tl.float64)
    tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty))
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + B, 1, sem="acq_rel") == B - 1:
        tot = tl.zeros([RTILE], tl.float64)
        for c in range(0, B, RTILE):
            r = c + tl.arange(0, RTILE)
            loss_r = tl.load(loss_ptr + r, mask=r < B, other=0.0, cache_modifier=".cg")
            tot += loss_r.to(tl.float64)
        total = tl.sum(tot) / tl.cast(loss_div, tl.float64)
        tl.store(total_ptr, total.to(total_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_fill_kernel(out_ptr, n, seed, offset, TILE: tl.constexpr):
    seed_lo, seed_hi = _words(seed)
    off_lo, off_hi = _words(offset)
    k = tl.program_id(0).to(tl.int64) * TILE
    idx = k + tl.arange(0, TILE)
    normal = _normals(k, seed_lo, seed_hi, off_lo, off_hi, TILE)
    tl.store(out_ptr + idx, _round(normal, out_ptr.dtype.element_ty), mask=idx < n)


# ---- launchers -----------------------------------------------------------------------------


def _magic(d: int) -> tuple[int, int]:
    """(mul, shift) with x // d == (umulhi(x, mul) + x) >> shift for 0 <= x < 2^31, d >= 1:
    2^32 + mul = ceil(2^(32 + shift) / d), shift = ceil(log2 d)."""
    shift = (d - 1).bit_length()
    return -(-(1 << (32 + shift)) // d) - (1 << 32), shift


def _split(D: int) -> tuple[int, int, int]:
    """(TILE, CHUNK, chunks per sample) for samples of D elements: tiles of at most 1024,
    programs of at most 16384 elements; small samples get one program with a small tile.
    Fixed by D alone, so the loss's summation order (and bits) never depends on the device."""
    tile = min(_MAX_TILE, max(_MIN_TILE, triton.next_power_of_2(D)))
    chunk = min(_MAX_CHUNK, max(tile, triton.next_power_of_2(D)))
    return tile, chunk, triton.cdiv(D, chunk)


def add_noise(
    x0: torch.Tensor,
    coef: torch.Tensor,
    noise: torch.Tensor | None,
    seed: int,
    offset: int,
    xi: torch.Tensor | None = None,
    xi_seed: int = 0,
    xi_offset: int = 0,
) -> torch.Tensor:
    """x_t like contiguous x0 [B, ...]; coef [2, B] contiguous in the compute type (rows a,
    s), or [3, B] (a, s, g): the noise is perturbed, e = eps + g xi. noise like x0, or None
    for the stream of (seed, offset) rounded to x0's dtype; xi (read with 3 rows only) like
    x0, or None for the stream of (xi_seed, xi_offset) drawn the same way."""
    B = x0.shape[0]
    D = x0.numel() // B
    tile, chunk, chunks = _split(D)
    x_t = torch.empty_like(x0)
    perturbed = coef.shape[0] == 3
    _add_noise_kernel[(B * chunks,)](
        x0,
        coef,
        x0 if noise is None else noise,
        x_t,
        seed,
        offset,
        B,
        D,
        chunks,
        x0 if xi is None else xi,
        xi_seed,
        xi_offset,
        HAS_NOISE=noise is not None,
        PERTURBED=perturbed,
        HAS_XI=perturbed and xi is not None,
        CHUNK=chunk,
        TILE=tile,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return x_t


def noise_loss(
    pred: torch.Tensor,
    coef: torch.Tensor,
    noise: torch.Tensor | None,
    x0: torch.Tensor | None,
    terms: int,
    eps_dtype: torch.dtype,
    seed: int,
    offset: int,
    kind: int,
    mask: torch.Tensor | None,
    mask_inner: int,
    mask_size: int,
    mask_batch_stride: int,
    grad_div: int = 1,
    loss_div: int = 1,
    need_loss: bool = True,
    need_grad: bool = True,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(loss [B], total = sum(loss) / loss_div, grad like pred); None for what was not asked.

    pred [B, ...] contiguous; coef [3, B] contiguous in the compute type (rows w, p, q), [4, B]
    for kind KIND_PSEUDO_HUBER (row c too); terms: TERM_EPS | TERM_X0 bits naming the parts
    of y = p eps + q x0. noise (pred's shape, or None for the stream of (seed, offset) rounded
    to eps_dtype) is read only with TERM_EPS, x0 (pred's shape) only with TERM_X0. kind:
    KIND_L2, KIND_L1 or KIND_PSEUDO_HUBER. mask: None, or Mb x mask_size values contiguous in
    the compute type (Mb = B with mask_batch_stride = mask_size, 1 with 0); element j of
    sample b is weighted by mask[b * mask_batch_stride + (j // mask_inner) % mask_size]. The
    gradient is that of loss_b / grad_div (grad_div = B for a batch mean), times grad_output
    (compute type, one element or [B]) read on the device."""
    B = pred.shape[0]
    D = pred.numel() // B
    tile, chunk, chunks = _split(D)
    compute = coef.dtype
    if mask is None:
        mask_inner, mask_size, mask_batch_stride = 1, 1, 0  # unread: one compiled kernel
    elif max(mask_inner, mask_size) >= 2**30:
        raise ValueError(
            f"noise_loss (triton): mask_inner and mask_size must be below 2^30, got "
            f"{mask_inner} and {mask_size}"
        )
    # float64 pseudo-Huber: ptxas expands each IEEE double sqrt and division with a slow-path
    # call and spills around them at 8 elements a thread; 8 warps hold 4 (no spills).
    warps = 8 if kind == KIND_PSEUDO_HUBER and compute == torch.float64 else 4
    loss = total = grad = None
    partial = count = pred  # placeholders: never touched without LOSS
    if need_loss:
        loss = torch.empty(B, dtype=compute, device=pred.device)
        total = torch.empty((), dtype=compute, device=pred.device)
        partial = torch.empty(B * chunks, dtype=torch.float64, device=pred.device)
        count = torch.zeros(B + 1, dtype=torch.int32, device=pred.device)
    if need_grad:
        grad = torch.empty_like(pred)
    go = GO_NONE
    if grad_output is not None:
        go = GO_SCALAR if grad_output.numel() == 1 else GO_PER_SAMPLE
    _noise_loss_kernel[(B * chunks,)](
        pred,
        coef,
        pred if noise is None else noise,
        pred if x0 is None else x0,
        pred if grad is None else grad,
        coef if grad_output is None else grad_output,
        coef if loss is None else loss,
        coef if total is None else total,
        partial,
        count,
        seed,
        offset,
        grad_div,
        loss_div,
        B,
        D,
        chunks,
        coef if mask is None else mask,
        mask_inner,
        mask_size,
        mask_batch_stride,
        *_magic(mask_inner),
        *_magic(mask_size),
        TERMS=terms,
        HAS_NOISE=noise is not None,
        EPS=_TL_DTYPES[eps_dtype],
        KIND=kind,
        HAS_MASK=mask is not None,
        INNER1=mask_inner == 1,
        LOSS=need_loss,
        GRAD=need_grad,
        GO=go,
        CHUNK=chunk,
        TILE=tile,
        RTILE=128,
        num_warps=warps,
        enable_fp_fusion=False,
    )
    return loss, total, grad


def philox_fill(out: torch.Tensor, seed: int, offset: int) -> None:
    """Writes the stream of (seed, offset) into contiguous ``out``, rounded to its dtype."""
    tile = 1024
    _philox_fill_kernel[(triton.cdiv(out.numel(), tile),)](
        out,
        out.numel(),
        seed,
        offset,
        TILE=tile,
        num_warps=4,
        enable_fp_fusion=False,
    )
