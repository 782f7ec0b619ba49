/* gradwatch's optional CPU kernels: every statistic of a float32 tensor in one pass.
 *
 * torch needs one kernel per statistic (|g|, a dot, a sum, a max, a sign sum), so a
 * sampled step reads each gradient ~5 times; these loops read it once. Built on first
 * use by adapters/cpu_native.py with the system C compiler and loaded with ctypes;
 * without a compiler gradwatch falls back to the torch ops (same results).
 *
 * Only plain C99. The inner loops run on LANES independent accumulators, so the
 * compiler vectorises them without -ffast-math (which would break NaN handling).
 * Floats are summed per BLOCK in float32 lanes, then into doubles: float32 speed with
 * a relative rounding error below 1e-6 (tests/torch/test_cpu_native.py, 3M entries).
 * Where float32 squares would overflow (max |x| above 2^60) or turn subnormal (below
 * 2^-40), the squares are summed again on x times a power of two (exact), so norms
 * of 1e30 or 1e-40 entries are right; ordinary gradients never take that second pass.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define BLOCK 4096
#define ABS_BITS 0x7fffffffu
#define INF_BITS 0x7f800000u

static uint32_t bits_of(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static float float_of(uint32_t b) {
    float v;
    memcpy(&v, &b, sizeof v);
    return v;
}

/* Whether float32 lane sums of squares of entries up to mx (finite) could overflow
 * (a lane adds BLOCK / LANES = 256 squares) or lose precision to subnormal squares. */
static int needs_rescale(float mx) {
    return mx > 0x1p60f ? mx <= FLT_MAX : (mx > 0.0f && mx < 0x1p-40f);
}

/* A power of two s with mx * s in [0.5, 4) (s stays a normal float). */
static float pow2_scale(float mx) {
    int32_t e = 253 - (int32_t)(bits_of(mx) >> 23); /* mx >= 0: no sign bit */
    e = e < 1 ? 1 : (e > 254 ? 254 : e);
    return float_of((uint32_t)e << 23);
}

/* Sum of squares of x, on x * s (s a power of two, so the scaling is exact). */
static double scaled_squares(const float *x, int64_t n, float s) {
    double total = 0.0;
    int64_t i = 0;
    while (i < n) {
        int64_t end = (n - i > BLOCK) ? i + BLOCK : n;
        float acc[LANES] = {0};
        for (; i + LANES <= end; i += LANES) {
            for (int k = 0; k < LANES; k++) {
                float a = x[i + k] * s;
                acc[k] += a * a;
            }
        }
        for (; i < end; i++) {
            float a = x[i] * s;
            acc[0] += a * a;
        }
        for (int k = 0; k < LANES; k++) total += acc[k];
    }
    return total / ((double)s * (double)s);
}

/* Sum of squares, max |x|, sum |x|, non-zero entries and non-finite entries of x.
 * Written for SSE2, the x86-64 baseline: the bit patterns of |x| are compared as
 * signed int32 (they are below 2^31), and max |x| is a float max over finite
 * entries, made NaN or Inf afterwards from the counts of NaN and Inf entries. */
static void stats_one(const float *x, int64_t n, double *squares, float *max_abs,
                      double *sum_abs, int64_t *nonzero, int64_t *nonfinite) {
    double sq = 0.0, ab = 0.0;
    int64_t nz = 0, nan = 0, inf = 0;
    float mx = 0.0f;
    int64_t i = 0;
    while (i < n) {
        int64_t end = (n - i > BLOCK) ? i + BLOCK : n;
        float s_sq[LANES] = {0}, s_ab[LANES] = {0}, s_mx[LANES] = {0};
        int32_t s_nz[LANES] = {0}, s_nan[LANES] = {0}, s_inf[LANES] = {0};
        for (; i + LANES <= end; i += LANES) {
            for (int k = 0; k < LANES; k++) {
                int32_t b = (int32_t)(bits_of(x[i + k]) & ABS_BITS);
                float a = float_of((uint32_t)b);
                s_sq[k] += a * a;
                s_ab[k] += a;
                s_mx[k] = a > s_mx[k] ? a : s_mx[k]; /* NaN compares false: skipped */
                s_nz[k] += b != 0;
                s_nan[k] += b > (int32_t)INF_BITS;
                s_inf[k] += b == (int32_t)INF_BITS;
            }
        }
        for (; i < end; i++) {
            int32_t b = (int32_t)(bits_of(x[i]) & ABS_BITS);
            float a = float_of((uint32_t)b);
            s_sq[0] += a * a;
            s_ab[0] += a;
            s_mx[0] = a > s_mx[0] ? a : s_mx[0];
            s_nz[0] += b != 0;
            s_nan[0] += b > (int32_t)INF_BITS;
            s_inf[0] += b == (int32_t)INF_BITS;
        }
        for (int k = 0; k < LANES; k++) {
            sq += s_sq[k];
            ab += s_ab[k];
            nz += s_nz[k];
            nan += s_nan[k];
            inf += s_inf[k];
            mx = s_mx[k] > mx ? s_mx[k] : mx;
        }
    }
    if (nan + inf == 0 && needs_rescale(mx)) sq = scaled_squares(x, n, pow2_scale(mx));
    *squares = sq;
    *max_abs = nan ? float_of(0x7fc00000u) : (inf ? float_of(INF_BITS) : mx);
    *sum_abs = ab;
    *nonzero = nz;
    *nonfinite = nan + inf;
}

/* For each of `count` contiguous float32 tensors, the rows of grad_stats_on_device:
 * out[0*count + t] = L2 norm (the root taken in double), out[1*count + t] = max |x|,
 * out[2*count + t] = sum |x|, out[3*count + t] = non-zero, out[4*count + t] =
 * non-finite entries. `out` holds 5 * count floats. */
void gw_grad_stats_f32(int64_t count, const uintptr_t *ptrs, const int64_t *numels,
                       float *out) {
    for (int64_t t = 0; t < count; t++) {
        double sq, ab;
        float mx;
        int64_t nz, nf;
        stats_one((const float *)ptrs[t], numels[t], &sq, &mx, &ab, &nz, &nf);
        out[t] = (float)sqrt(sq);
        out[count + t] = mx;
        out[2 * count + t] = (float)ab;
        out[3 * count + t] = (float)nz;
        out[4 * count + t] = (float)nf;
    }
}

/* Sum of squares of each of `count` contiguous float32 tensors, into out[t] (double:
 * squares of float32 entries neither overflow nor underflow there). */
void gw_sum_squares_f32(int64_t count, const uintptr_t *ptrs, const int64_t *numels,
                        double *out) {
    for (int64_t t = 0; t < count; t++) {
        const float *x = (const float *)ptrs[t];
        int64_t n = numels[t], i = 0;
        double total = 0.0;
        float mx = 0.0f;
        while (i < n) {
            int64_t end = (n - i > BLOCK) ? i + BLOCK : n;
            float s[LANES] = {0}, m[LANES] = {0};
            for (; i + LANES <= end; i += LANES) {
                for (int k = 0; k < LANES; k++) {
                    float a = float_of(bits_of(x[i + k]) & ABS_BITS);
                    s[k] += a * a;
                    m[k] = a > m[k] ? a : m[k];
                }
            }
            for (; i < end; i++) {
                float a = float_of(bits_of(x[i]) & ABS_BITS);
                s[0] += a * a;
                m[0] = a > m[0] ? a : m[0];
            }
            for (int k = 0; k < LANES; k++) {
                total += s[k];
                mx = m[k] > mx ? m[k] : mx;
            }
        }
        if (needs_rescale(mx)) total = scaled_squares(x, n, pow2_scale(mx));
        out[t] = total;
    }
}

/* Entries of x[0..n) that are not <= 0 (positive or NaN), summed in int32 lanes per
 * BLOCK (int64 lanes would halve the vector width). */
static int64_t count_active(const float *x, int64_t n) {
    int64_t total = 0, i = 0;
    while (i < n) {
        int64_t end = (n - i > BLOCK) ? i + BLOCK : n;
        int32_t c = 0;
        for (; i < end; i++) c += !(x[i] <= 0.0f);
        total += c;
    }
    return total;
}

/* Active (not <= 0: positive or NaN) entries of y viewed as (outer, units, inner),
 * per unit, into counts[units]. Returns -1 if scratch memory is unavailable. */
int gw_active_per_unit_f32(const float *y, int64_t outer, int64_t units, int64_t inner,
                           float *counts) {
    int64_t *acc = calloc((size_t)units, sizeof *acc);
    if (acc == NULL) return -1;
    if (inner == 1) {
        int32_t *row = calloc((size_t)units, sizeof *row);
        if (row == NULL) {
            free(acc);
            return -1;
        }
        for (int64_t o = 0; o < outer; o++) {
            const float *r = y + o * units;
            for (int64_t u = 0; u < units; u++) row[u] += !(r[u] <= 0.0f);
            if ((o & 0xffff) == 0xffff || o == outer - 1) { /* int32 cannot overflow */
                for (int64_t u = 0; u < units; u++) {
                    acc[u] += row[u];
                    row[u] = 0;
                }
            }
        }
        free(row);
    } else {
        for (int64_t o = 0; o < outer; o++)
            for (int64_t u = 0; u < units; u++)
                acc[u] += count_active(y + (o * units + u) * inner, inner);
    }
    for (int64_t u = 0; u < units; u++) counts[u] = (float)acc[u];
    free(acc);
    return 0;
}

/* Active (not <= 0) entries of y. */
double gw_count_active_f32(const float *y, int64_t n) { return (double)count_active(y, n); }

/* Entries in a flat tail: |y - centre| >= half, or y >= half when one_sided. NaN
 * compares false, so it is in no tail. int32 counts per BLOCK, as count_active. */
double gw_count_in_tails_f32(const float *y, int64_t n, float centre, float half,
                             int one_sided) {
    int64_t total = 0, i = 0;
    while (i < n) {
        int64_t end = (n - i > BLOCK) ? i + BLOCK : n;
        int32_t c = 0;
        if (one_sided) {
            for (; i < end; i++) c += y[i] >= half;
        } else {
            for (; i < end; i++) {
                float d = y[i] - centre;
                c += (d >= half) | (d <= -half);
            }
        }
        total += c;
    }
    return (double)total;
}

/* NaN/Inf entries of y: |y|'s bit pattern at or above Inf's, compared as signed int32
 * as in stats_one (x86 has no unsigned vector compare). int32 counts per BLOCK. */
double gw_count_nonfinite_f32(const float *y, int64_t n) {
    int64_t total = 0, i = 0;
    while (i < n) {
        int64_t end = (n - i > BLOCK) ? i + BLOCK : n;
        int32_t c = 0;
        for (; i < end; i++) c += (int32_t)(bits_of(y[i]) & ABS_BITS) >= (int32_t)INF_BITS;
        total += c;
    }
    return (double)total;
}
