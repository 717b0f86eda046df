"""The scale searches ggml's K-quant reference quantizers run per sub-block (ggml-quants.c):
make_qx_quants (rmse_type 1, no importance weights: Q6_K), make_q3_quants (Q3_K) and
make_qkx2_quants (Q2_K, Q4_K, Q5_K); what Q3_K and Q6_K share around theirs
(quantize_row16); what Q4_K and Q5_K share around it (the 12 bytes of packed 6-bit scales
and mins: get_scale_min_k4, scales_mins_k4, quantize_scales_mins_k4) and their row converters
(k4_row_converters); and format_function, which compiles a converter one factory makes for
several formats as its format module's own. Without an imatrix, llama-quantize's
quantize_q*_K call quantize_row_q*_K_ref, which use exactly these.

Byte-exactness depends on doing every step in float32 in the C order: numba turns
float32 * int into float64, so every integer is converted with f32() before it meets a float,
and sums are accumulated one term at a time like the C loops (no reassociation, no FMA:
ggml-base is built without -mfma, and numba without fastmath does not contract).
The quantizers compile with error_model="numpy", so that a float division by zero gives C's
inf or NaN (values of ~1e13 overflow the x^2-weighted sums to inf, and the scales derived from
them divide by zero) where numba would raise ZeroDivisionError.
"""

import math

import numpy as np
from llamachat.runtime.gguf.constants import QK_K
from numba import njit

from .rounding import nearest_int, read_f16_pair, write_f16

GROUP_MAX_EPS = np.float32(1e-15)
f32 = np.float32


def format_function(f, module: str, **options):
    """njit(f) (cached, nogil, or as `options` say) as the function f.__name__ of `module` (a
    format module's __name__), for the converters and kernels one factory here or in
    runtime.quants.block32 makes for several formats: numba names compiled code by module and
    qualified name (plus a counter of its own process), so under their common name closures
    compiled in different processes would load from the cache and link to one another's code.
    (numba's cache tells the formats' closures apart by their variables' pickled bytes: numbers,
    or a FormatKernels, which pickles as its name.)"""
    f.__module__ = module
    f.__qualname__ = f.__name__
    return njit(cache=True, **(options or {"nogil": True, "error_model": "numpy"}))(f)


@njit(cache=True, inline='always')
def signed_absmax(n, x):
    """(the first of x[:n] of largest magnitude, that magnitude), as ggml's loops find it
    (strict >: the first wins a tie). make_qx_quants, make_q3_quants, Q4_0/Q5_0 and the
    Q3_K/Q6_K super-block scales all scale against it."""
    vmax = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    return vmax, amax


@njit(cache=True, inline='always')
def _clamped(v, nmax):
    """MAX(-nmax, MIN(nmax - 1, nearest_int(v))), the quant make_qx_quants, make_q3_quants and
    the Q3_K/Q6_K requantize take. For NaN (from NaN or inf values) ggml's nearest_int gives 0
    (the mantissa of a quiet NaN), numba's conversion does not: guarded here, where it decides
    bytes, rather than in nearest_int, which the other quantizers call in tighter loops."""
    return max(-nmax, min(nmax - 1, nearest_int(v) if v == v else 0))


@njit(cache=True, inline='always')
def _first_fit(n, nmax, x, L, offset, iscale):
    """The opening step of make_qx_quants and make_q3_quants: l = clamp(nearest_int(iscale *
    x), -nmax, nmax - 1) stored as l + offset, and the x^2-weighted sums (sum w*x*l,
    sum w*l*l) of that fit."""
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = _clamped(iscale * x[i], nmax)
        L[i] = l + offset
        w = x[i] * x[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    return sumlx, suml2


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): weights x^2, scale search over
    iscale = -(nmax + 0.1*is)/max for is in -9..9. L gets l + nmax in [0, 2*nmax)."""
    vmax, amax = signed_absmax(n, x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    sumlx, suml2 = _first_fit(n, nmax, x, L, nmax, f32(-nmax) / vmax)
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = _clamped(iscale * x[i], nmax)
            w = x[i] * x[i]
            fl = f32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + _clamped(iscale * x[i], nmax)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L):
    """make_q3_quants(n, nmax, x, L, do_rmse=true): start from iscale = -nmax/max, then up to
    5 rounds of moving single quants while that improves the x^2-weighted fit.
    L gets l + nmax in [0, 2*nmax)."""
    vmax, amax = signed_absmax(n, x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    sumlx, suml2 = _first_fit(n, nmax, x, L, 0, f32(-nmax) / vmax)
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fL = f32(L[i])
            slx = sumlx - w * x[i] * fL
            if slx > 0:
                sl2 = suml2 - w * fL * fL
                new_l = _clamped(x[i] * sl2 / slx, nmax)
                if new_l != L[i]:
                    fn = f32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


@njit(cache=True, inline='always')
def quantize_row16(search, nmax, write_scales, scale_of, scales_at, write_quants, block_bytes, xr, row):
    """quantize_row_q3_K_ref / q6_K_ref: per 256-value super-block xb of xr, into its block
    blk of `row` (block_bytes each):
      scales[j] = search(16, nmax, sub-block j's values, its quants in L) (make_q3_quants or
          make_qx_quants; L holds l + nmax);
      d = write_scales(blk, scales, max_scale, max_abs_scale, L): the format packs the scales
          against the one of largest magnitude (max_scale, signed_absmax of the 16) and writes
          d, returning it as stored (a half);
      every value requantized with its sub-block's rounded scale d * scale_of(sc, j) (sc: the
          block's bytes from scales_at), L = clamp(nearest_int(x / that), -nmax, nmax - 1) +
          nmax, a sub-block whose scale is 0 keeping its quants;
      write_quants(L, blk): the format packs the quants."""
    L = np.empty(QK_K, np.int8)
    scales = np.empty(16, np.float32)
    for b in range(xr.shape[0] // QK_K):
        xb = xr[b * QK_K:(b + 1) * QK_K]
        blk = row[b * block_bytes:(b + 1) * block_bytes]
        for j in range(16):
            scales[j] = search(16, nmax, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
        max_scale, max_abs_scale = signed_absmax(16, scales)
        d = write_scales(blk, scales, max_scale, max_abs_scale, L)
        sc = blk[scales_at:]
        for j in range(16):
            dj = d * f32(scale_of(sc, j))
            if dj == 0:
                continue
            for ii in range(16):
                L[16 * j + ii] = _clamped(xb[16 * j + ii] / dj, nmax) + nmax
        write_quants(L, blk)


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants: fit x ~ scale * L + min (min <= 0, L in [0, nmax]) by weighted least
    squares over nstep+1 candidate iscales. Returns (scale, the_min) with the_min = -min."""
    rmin = f32(rmin)
    rdelta = f32(rdelta)
    vmin = x[0]
    vmax = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < vmin:
            vmin = x[i]
        if x[i] > vmax:
            vmax = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if vmin > 0:
        vmin = f32(0.0)
    if vmax == vmin:
        for i in range(n):
            L[i] = 0
        return f32(0.0), -vmin
    iscale = f32(nmax) / (vmax - vmin)
    scale = f32(1.0) / iscale
    best_error = f32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - vmin))
        L[i] = max(0, min(nmax, l))
        diff = scale * f32(L[i]) + vmin - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -vmin
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * f32(step) + f32(nmax)) / (vmax - vmin)
        sum_l = f32(0.0)
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - vmin))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = f32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = f32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0.0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


@njit(cache=True)
def sqrtf(v):
    # float64 sqrt rounded to float32 equals the correctly rounded float32 sqrt
    return f32(math.sqrt(float(v)))


def scale_min_k4(j, q):
    """The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes q of a Q4_K/Q5_K
    block (ggml's get_scale_min_k4):

        byte  0..3   (j = 0..3)  ss ssssss   low 6 bits: scale j, top 2 bits: scale j+4 bits 4-5
        byte  4..7   (j = 0..3)  mm mmmmmm   low 6 bits: min j,   top 2 bits: min j+4 bits 4-5
        byte  8..11  (j = 4..7)  mmmm ssss   low nibble: scale j bits 0-3, high: min j bits 0-3

    Written once with integer operators only, so that numba compiles it (get_scale_min_k4,
    for q an array of uint8) and the vector kernels emit it as IR (q: runtime.quants.q4_k's
    IR integers)."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


get_scale_min_k4 = njit(cache=True, inline='always')(scale_min_k4)


@njit(cache=True, inline='always')
def scales_mins_k4(g, sc, d, dmin):
    """Q4_K/Q5_K: the 64 values of group g are sub-blocks 2g and 2g+1; returns their
    (d * scale, dmin * min) pairs (d1, m1, d2, m2): x = d1 * q - m1, then d2 * q - m2."""
    s1, m1 = get_scale_min_k4(2 * g, sc)
    s2, m2 = get_scale_min_k4(2 * g + 1, sc)
    return d * f32(s1), dmin * f32(m1), d * f32(s2), dmin * f32(m2)


@njit(cache=True, inline='always')
def quantize_scales_mins_k4(xb, blk, L, Laux, weights, scales, mins, nmax, rmin, nstep):
    """Q4_K/Q5_K quantize of one super-block xb (256 values) up to its quants, as
    quantize_row_q4_K_ref/q5_K_ref do it: make_qkx2_quants(32, nmax, weights = rms + |x|,
    rmin, rdelta 0.1, nstep) per sub-block, the 6-bit scales and mins against the largest
    packed into blk[4:16], d and dmin written at blk[0:4], and L[0:256] set to every value
    requantized with the rounded scales (in [0, nmax]). The callers pack L their own way."""
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(8):
        xs = xb[32 * j:32 * j + 32]
        sum_x2 = f32(0.0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = sqrtf(sum_x2 / f32(32))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(32, nmax, xs, weights, L[32 * j:32 * j + 32], Laux,
                                              rmin, 0.1, nstep, False)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0.0)
    inv_min = f32(63) / max_min if max_min > 0 else f32(0.0)
    sc = blk[4:16]
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C stores the int in a uint8_t
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d = write_f16(blk, 0, max_scale / f32(63))
    dmin = write_f16(blk, 2, max_min / f32(63))
    for j in range(8):
        s, m = get_scale_min_k4(j, sc)
        dj = d * f32(s)
        if dj == 0:
            continue
        dm = dmin * f32(m)
        for ii in range(32):
            l = nearest_int((xb[32 * j + ii] + dm) / dj)
            L[32 * j + ii] = max(0, min(nmax, l))


def k4_row_converters(block_bytes: int, qh_at: int, qs_at: int, nmax: int, rmin: float, nstep: int, module: str):
    """The (dequantize_row(row, y), quantize_row(xr, row)) of Q4_K (qh_at 0: no 5th bits) or
    Q5_K (qh: 32 bytes at qh_at, value 64g + l (l < 32) has bit 2g of qh[l], value 64g + 32 + l
    bit 2g + 1), as functions of `module` (format_function): ggml's dequantize_row_q4_K/q5_K and
    quantize_row_q4_K_ref/q5_K_ref (quantize_scales_mins_k4 with nmax, rmin, nstep), the low 4
    bits at qs_at, per 64 values 32 bytes: low nibbles values 0..31, high nibbles 32..63. numba
    takes the numbers (closure variables) as constants: one specialised converter per format and
    direction."""

    def dequantize_row(row, y):
        for b in range(y.shape[0] // QK_K):
            o = b * block_bytes
            d, dmin = read_f16_pair(row, o)
            sc = row[o + 4:o + 16]
            qs = row[o + qs_at:o + block_bytes]
            yb = y[b * QK_K:(b + 1) * QK_K]
            for g in range(4):  # 64 values per group: two sub-blocks sharing 32 bytes
                d1, mm1, d2, mm2 = scales_mins_k4(g, sc, d, dmin)
                for l in range(32):
                    q = np.int32(qs[32 * g + l]) & 0xF
                    if qh_at:
                        q += ((np.int32(row[o + qh_at + l]) >> (2 * g)) & 1) << 4
                    yb[64 * g + l] = d1 * f32(q) - mm1
                for l in range(32):
                    q = np.int32(qs[32 * g + l]) >> 4
                    if qh_at:
                        q += ((np.int32(row[o + qh_at + l]) >> (2 * g + 1)) & 1) << 4
                    yb[64 * g + 32 + l] = d2 * f32(q) - mm2

    def quantize_row(xr, row):
        L = np.empty(QK_K, np.uint8)
        Laux = np.empty(32, np.uint8)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for b in range(xr.shape[0] // QK_K):
            xb = xr[b * QK_K:(b + 1) * QK_K]
            blk = row[b * block_bytes:(b + 1) * block_bytes]
            quantize_scales_mins_k4(xb, blk, L, Laux, weights, scales, mins, nmax, rmin, nstep)
            qs = blk[qs_at:]
            if qh_at:
                qh = blk[qh_at:qh_at + 32]
                qh[:] = 0
            for g in range(4):
                for l in range(32):
                    l1 = np.int32(L[64 * g + l])
                    l2 = np.int32(L[64 * g + 32 + l])
                    if qh_at:
                        if l1 > 15:
                            l1 -= 16
                            qh[l] |= 1 << (2 * g)
                        if l2 > 15:
                            l2 -= 16
                            qh[l] |= 2 << (2 * g)
                    qs[32 * g + l] = l1 | (l2 << 4)

    return format_function(dequantize_row, module), format_function(quantize_row, module)
