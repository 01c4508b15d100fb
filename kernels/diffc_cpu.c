/* DiffC candidate scoring on the CPU: the same integers as cod/diffc/philox.py (NumPy reference) and
 * kernels/philox.py (Triton), compiled at first use by kernels/diffc_cpu.py (gcc -O3, OpenMP).
 *
 * One task = LANES candidates of one chunk; the lanes are candidates (c1 = n), so every lane reads the same
 * residual value r[j] and the inner loops vectorise over candidates (32x32->64-bit products, table gathers).
 * Scores are float32 sums in a fixed order per candidate: the same binary gives the same scores. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define LANES 16

static inline void philox_lanes(uint32_t *c0, uint32_t *c1, uint32_t *c2, uint32_t *c3, uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        for (int l = 0; l < LANES; l++) {
            uint64_t p0 = (uint64_t)c0[l] * M0, p1 = (uint64_t)c2[l] * M1;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ k1;
            c1[l] = (uint32_t)p1;
            c3[l] = (uint32_t)p0;
            c0[l] = n0;
            c2[l] = n2;
        }
        k0 += W0;
        k1 += W1;
    }
}

static inline float normal(uint32_t u, const int32_t *T) {
    int32_t v = (int32_t)(u & 0x7FFFFFFFu);
    float vf = (float)v;
    uint32_t bits;
    memcpy(&bits, &vf, 4);
    int32_t e = (int32_t)((bits >> 23) & 0xFFu) - 127;  /* floor(log2 v), or one more where rounding carried */
    e = e < 8 ? 8 : (e > 31 ? 31 : e);
    e -= ((uint32_t)1 << e) > (uint32_t)v;
    e = e < 8 ? 8 : (e > 30 ? 30 : e);
    int32_t h = e - 7;
    int32_t i = (v >> h) - 128;
    i = i < 0 ? 0 : i;
    int32_t p = h < 15 ? h : 15;
    int32_t f = (v & ((1 << h) - 1)) >> (h - p);
    int32_t base = 256 + (e - 8) * 129 + i;
    int32_t idx = v < 256 ? v : base;
    int32_t k0 = T[idx], k1 = T[base + 1];
    int32_t m = k0 - (int32_t)(((uint32_t)(k0 - k1) * (uint32_t)f) >> p);
    m = v < 256 ? k0 : m;
    int32_t z = (u >> 31) ? -m : m;
    return (float)z * 5.9604644775390625e-08f;
}

/* scores[outs[c] + n] = sum_j z_{c,n,j} r[starts[c] + j] for n < counts[c], j < dims[c]. */
int diffc_score(const float *r, float *scores, int64_t nchunks, const int64_t *starts, const int64_t *dims,
                const int64_t *counts, const int64_t *outs, const int32_t *T, uint32_t seed, uint32_t c3,
                int nthreads) {
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(nchunks + 1));
    if (!first) return 1;
    first[0] = 0;
    for (int64_t c = 0; c < nchunks; c++) first[c + 1] = first[c] + (counts[c] + LANES - 1) / LANES;
    int64_t ntasks = first[nchunks];
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
    for (int64_t t = 0; t < ntasks; t++) {
        int64_t lo = 0, hi = nchunks - 1;  /* the chunk c with first[c] <= t < first[c + 1] */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (first[mid] <= t) lo = mid; else hi = mid - 1;
        }
        int64_t c = lo, d = dims[c], n0 = (t - first[c]) * LANES;
        const float *rc = r + starts[c];
        float acc[LANES];
        uint32_t w0[LANES], w1[LANES], w2[LANES], w3[LANES];
        for (int l = 0; l < LANES; l++) acc[l] = 0.0f;
        for (int64_t q = 0; 4 * q < d; q++) {
            for (int l = 0; l < LANES; l++) {
                w0[l] = (uint32_t)q;
                w1[l] = (uint32_t)(n0 + l);
                w2[l] = (uint32_t)c;
                w3[l] = c3;
            }
            philox_lanes(w0, w1, w2, w3, seed, 0);
            float r0 = rc[4 * q];
            float r1 = 4 * q + 1 < d ? rc[4 * q + 1] : 0.0f;
            float r2 = 4 * q + 2 < d ? rc[4 * q + 2] : 0.0f;
            float r3 = 4 * q + 3 < d ? rc[4 * q + 3] : 0.0f;
            for (int l = 0; l < LANES; l++)
                acc[l] += (normal(w0[l], T) * r0 + normal(w1[l], T) * r1) +
                          (normal(w2[l], T) * r2 + normal(w3[l], T) * r3);
        }
        for (int l = 0; l < LANES; l++)
            if (n0 + l < counts[c]) scores[outs[c] + n0 + l] = acc[l];
    }
    free(first);
    return 0;
}

/* out[row * length + j] = word j of the stream (c2[row], c1[row]) as a normal (normals != 0) or a raw word. */
int diffc_stream(void *out, int64_t rows, const uint32_t *c2, const uint32_t *c1, int64_t length, uint32_t c3,
                 uint32_t seed, const int32_t *T, int normals, int nthreads) {
    int64_t blocks = (length + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t row = 0; row < rows; row++) {
        uint32_t w[4][LANES];
        for (int64_t q0 = 0; q0 < blocks; q0 += LANES) {
            for (int l = 0; l < LANES; l++) {
                w[0][l] = (uint32_t)(q0 + l);
                w[1][l] = c1[row];
                w[2][l] = c2[row];
                w[3][l] = c3;
            }
            philox_lanes(w[0], w[1], w[2], w[3], seed, 0);
            for (int l = 0; l < LANES && q0 + l < blocks; l++)
                for (int k = 0; k < 4; k++) {
                    int64_t j = 4 * (q0 + l) + k;
                    if (j >= length) break;
                    if (normals) ((float *)out)[row * length + j] = normal(w[k][l], T);
                    else ((uint32_t *)out)[row * length + j] = w[k][l];
                }
        }
    }
    return 0;
}
