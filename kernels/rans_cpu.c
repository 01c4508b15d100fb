/* The compiled CPU path of cod's rANS coder (format: docs/entropy.md); cod/entropy/rans.py holds the NumPy
 * reference, and the two write and read the same bytes (tests/test_rans.py).
 *
 * Tables come as frequencies freqs[T][K] (int64, validated by rans_tables) and, when the symbols use each table
 * several times, their exclusive cumulative frequencies cdf[T][K + 1]; with cdf = NULL (per-symbol tables, each
 * used about once) a symbol's cumulative frequency is summed from its row, which reads the row once instead of
 * writing and reading a cumulative copy of every table. `rows` (the table of each symbol) may be NULL when T = 1.
 * Symbol i is coded by lane i mod J. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WORD_BITS 32
#define LOWER_BOUND ((uint64_t)1 << 32)
#define START_STATE 255

enum { OK = 0, BAD_SYMBOL = 1, ZERO_FREQUENCY = 2, BAD_STREAM = 3, BAD_ENTRY = 4, BAD_SUM = 5, NO_MEMORY = 6 };

/* Validate frequency tables freqs[T][K] (each entry in [0, total], each row summing to total) and, unless cdf is
 * NULL, write their exclusive cumulative frequencies cdf[T][K + 1], in one pass. *bad: the first bad row. */
int rans_tables(const int64_t *freqs, int64_t T, int64_t K, int64_t total, int64_t *cdf, int64_t *bad) {
    int bad_entry = 0;
    int64_t bad_sum = -1;
    for (int64_t t = 0; t < T; t++) {
        const int64_t *f = freqs + t * K;
        int64_t acc = 0;
        if (cdf) {
            int64_t *c = cdf + t * (K + 1);
            c[0] = 0;
            for (int64_t k = 0; k < K; k++) {
                int64_t v = f[k];
                int out_of_range = v < 0 || v > total;
                bad_entry |= out_of_range;
                acc += out_of_range ? 0 : v;  /* < K * total <= 2^32: no overflow */
                c[k + 1] = acc;
            }
        } else {
            for (int64_t k = 0; k < K; k++) {
                int64_t v = f[k];
                int out_of_range = v < 0 || v > total;
                bad_entry |= out_of_range;
                acc += out_of_range ? 0 : v;
            }
        }
        if (acc != total && bad_sum < 0) bad_sum = t;
    }
    /* entries first, then sums: the reference's order of checks, hence its messages */
    if (bad_entry) return BAD_ENTRY;
    if (bad_sum >= 0) { *bad = bad_sum; return BAD_SUM; }
    return OK;
}

static inline int lookup(const int64_t *freqs, const int64_t *cdf, int64_t K, const int64_t *rows,
                         const int64_t *sym, int64_t i, uint64_t *f, uint64_t *c) {
    int64_t s = sym[i], r = rows ? rows[i] : 0;
    if (s < 0 || s >= K) return BAD_SYMBOL;
    if (cdf) {
        const int64_t *row = cdf + r * (K + 1) + s;
        *c = (uint64_t)row[0];
        *f = (uint64_t)(row[1] - row[0]);
    } else {
        const int64_t *row = freqs + r * K;
        int64_t acc = 0;
        for (int64_t k = 0; k < s; k++) acc += row[k];
        *c = (uint64_t)acc;
        *f = (uint64_t)row[s];
    }
    return *f ? OK : ZERO_FREQUENCY;
}

/* Symbol i's frequency and cumulative frequency: given (fa, ca: already looked up), or from its table. */
static inline int get(const int64_t *freqs, const int64_t *cdf, int64_t K, const int64_t *rows, const int64_t *sym,
                      const uint64_t *fa, const uint64_t *ca, int64_t i, uint64_t *f, uint64_t *c) {
    if (fa) {
        *f = fa[i];
        *c = ca[i];
        return OK;
    }
    return lookup(freqs, cdf, K, rows, sym, i, f, c);
}

/* f_out[i], c_out[i] of every symbol (checked as in rans_encode). */
int rans_lookup(const int64_t *freqs, const int64_t *cdf, int64_t K, const int64_t *rows, const int64_t *sym,
                int64_t n, uint64_t *f_out, uint64_t *c_out, int64_t *bad) {
    for (int64_t i = 0; i < n; i++) {
        int err = lookup(freqs, cdf, K, rows, sym, i, f_out + i, c_out + i);
        if (err) { *bad = i; return err; }
    }
    return OK;
}

/* sum of log2_table[f] over the symbols (the lane-count rule's information estimate), checking every symbol on
 * the way; on error *bad is the first offending position. */
int rans_information(const int64_t *freqs, const int64_t *cdf, int64_t K, const int64_t *rows, const int64_t *sym,
                     const uint64_t *fa, const uint64_t *ca, int64_t n, const int64_t *log2_table, int64_t *sum,
                     int64_t *bad) {
    int64_t acc = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t f, c;
        int err = get(freqs, cdf, K, rows, sym, fa, ca, i, &f, &c);
        if (err) { *bad = i; return err; }
        acc += log2_table[f];
    }
    *sum = acc;
    return OK;
}

/* Encode n symbols on J lanes (from their tables, or from fa, ca when given). Out: states[J], words (capacity n: each symbol emits at most one word; lane after
 * lane, each in the decoder's reading order), counts[J]. */
int rans_encode(const int64_t *freqs, const int64_t *cdf, int64_t K, const int64_t *rows, const int64_t *sym,
                const uint64_t *fa, const uint64_t *ca, int64_t n, int64_t J, int precision, uint64_t *states,
                uint32_t *words, int64_t *counts, int64_t *bad) {
    const int top = 64 - precision;
    /* lane j's words are produced last-first: they are written backwards from the end of its room in `words`
     * (its symbol count, rooms lane after lane), then the rooms are compacted. The symbols are visited in one
     * backward sweep (lane i mod J), so the inputs stream through the cache once whatever J is. */
    uint32_t **ends = malloc((size_t)J * sizeof(uint32_t *)), **ps = malloc((size_t)J * sizeof(uint32_t *));
    if (!ends || !ps) {
        free(ends); free(ps);
        return NO_MEMORY;
    }
    int64_t room = 0;
    for (int64_t j = 0; j < J; j++) {
        room += j < n ? (n - j + J - 1) / J : 0;
        ends[j] = ps[j] = words + room;
        states[j] = j < n ? START_STATE : 0;  /* a lane without symbols is empty: state 0 */
    }
    int err = OK;
    int64_t j = n ? (n - 1) % J : 0;
    for (int64_t i = n - 1; i >= 0; i--) {
        uint64_t f, c, x = states[j];
        if ((err = get(freqs, cdf, K, rows, sym, fa, ca, i, &f, &c)) != OK) break;
        if ((x >> top) >= f) {
            *--ps[j] = (uint32_t)x;
            x >>= WORD_BITS;
        }
        states[j] = ((x / f) << precision) + x % f + c;
        j = j ? j - 1 : J - 1;
    }
    if (err) {  /* report the first bad symbol, as a forward check would */
        for (int64_t i = 0; i < n; i++) {
            uint64_t f, c;
            if ((err = get(freqs, cdf, K, rows, sym, fa, ca, i, &f, &c)) != OK) { *bad = i; break; }
        }
    } else {
        int64_t out = 0;
        for (int64_t j2 = 0; j2 < J; j2++) {
            int64_t m = ends[j2] - ps[j2];
            memmove(words + out, ps[j2], (size_t)m * sizeof(uint32_t));
            out += m;
            counts[j2] = m;
        }
    }
    free(ends); free(ps);
    return err;
}

static inline int64_t search(const int64_t *row, int64_t K, uint64_t slot) {
    /* the largest s with row[s] <= slot (row[0] = 0 <= slot < row[K] = 2^precision) */
    int64_t lo = 0, hi = K;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) >> 1;
        if ((uint64_t)row[mid] <= slot) lo = mid; else hi = mid;
    }
    return lo;
}

static inline int64_t scan(const int64_t *f, int64_t K, uint64_t slot, uint64_t *c) {
    /* the same symbol from the frequencies: the first s with f[0] + ... + f[s] > slot (the row sums to more) */
    uint64_t acc = 0;
    int64_t s = 0;
    for (int64_t k = 0; k < K; k++) {
        if (acc + (uint64_t)f[k] > slot) { s = k; break; }
        acc += (uint64_t)f[k];
    }
    /* f[s] > 0 here, and cdf[s] <= slot < cdf[s + 1]: s is also the largest s with cdf[s] <= slot (search) */
    *c = acc;
    return s;
}

/* Decode n symbols, the first being symbol number i0 of the stream (Decoder pieces), updating each lane's state x,
 * word pointer ptr (into words) and words remaining. slot_table: optional [T][2^precision] slot -> symbol map
 * (uint16), else binary search in cdf. Returns BAD_STREAM at the first renormalisation the encoder cannot have
 * made (*bad = its position in this piece). */
int rans_decode(const int64_t *freqs, const int64_t *cdf, int64_t K, const int64_t *rows, int64_t n, int64_t i0, int64_t J,
                int precision, uint64_t *x, int64_t *ptr, int64_t *remaining, const uint32_t *words,
                const uint16_t *slot_table, int64_t *out, int64_t *bad) {
    const int top = 64 - precision;
    const uint64_t mask = ((uint64_t)1 << precision) - 1;
    int64_t j = i0 % J;
    for (int64_t k = 0; k < n; k++) {
        int64_t r = rows ? rows[k] : 0, s;
        uint64_t y = x[j], slot = y & mask, c, f;
        if (cdf) {
            const int64_t *row = cdf + r * (K + 1);
            s = slot_table ? (int64_t)slot_table[((uint64_t)r << precision) | slot] : search(row, K, slot);
            c = (uint64_t)row[s];
            f = (uint64_t)row[s + 1] - c;
        } else {
            s = scan(freqs + r * K, K, slot, &c);
            f = (uint64_t)freqs[r * K + s];
        }
        y = f * (y >> precision) + slot - c;
        int need = y < LOWER_BOUND && remaining[j] > 0;
        if (need) {
            y = (y << WORD_BITS) | words[ptr[j]++];
            remaining[j]--;
        }
        x[j] = y;
        out[k] = s;
        /* the encoder renormalised exactly when its state was >= f * 2^(64 - precision) */
        if (((y >> top) >= f) != need) { *bad = k; return BAD_STREAM; }
        if (++j == J) j = 0;
    }
    return OK;
}
