/* The batch-hard row scan of fastdml's blocked CPU path, built and loaded by fastdml/blocked/native.py.
 *
 * For each row i of a (b, M) score block t (row-major, contiguous), in one pass over the row:
 *
 *     pv[i] = max { t[i][j] : z[j] == y[i], j != ex(i) }     pi[i] = the lowest such j reaching it
 *     nv[i] = min { t[i][j] : z[j] != y[i], j != ex(i) }     ni[i] = the lowest such j reaching it
 *
 * with ex(i) = excl[i] when excl is given (-1: none), else diag + i when diag >= 0 (the square case: the
 * anchor itself), else none. A row without any positive (negative) gets pv = -inf, pi = M (nv = +inf,
 * ni = M). The return value is the number of rows where a kept entry is NaN: for those the caller redoes the
 * block with torch (whose max/min propagate NaN), so NaN is never silently skipped.
 *
 * How: GCC/Clang vector extensions, L lanes of 64 bytes (AVX-512 registers; the compiler splits them on
 * narrower machines). Each lane keeps its own running extreme and its index, replaced only on a strict
 * improvement, so each lane holds the first extreme of its columns; the lanes are then merged, equal values
 * going to the lower index, and the last M % L columns are scanned one by one (they lie after every lane's
 * columns, so they win only on a strict improvement). Rows are independent and scanned in order: the result
 * is the same run to run.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define DEFINE_ROW_HARDEST(NAME, T, IT, L)                                                                   \
  typedef T NAME##_vt __attribute__((vector_size(64)));                                                      \
  typedef IT NAME##_vi __attribute__((vector_size(64)));                                                     \
  int64_t NAME(const T *restrict t, int64_t b, int64_t M, const IT *restrict y, const IT *restrict z,      \
               const int64_t *restrict excl, int64_t diag, T *restrict pv, int64_t *restrict pi,          \
               T *restrict nv, int64_t *restrict ni) {                                                     \
    typedef NAME##_vt vt;                                                                                    \
    typedef NAME##_vi vi;                                                                                    \
    vi lane;                                                                                                 \
    for (int k = 0; k < L; k++) lane[k] = (IT)k;                                                            \
    const int64_t Mv = M - M % L;                                                                            \
    int64_t nan_rows = 0;                                                                                    \
    for (int64_t i = 0; i < b; i++) {                                                                        \
      const T *restrict row = t + i * M;                                                                     \
      const int64_t ex = excl ? excl[i] : (diag >= 0 ? diag + i : -1);                                      \
      const IT yi = y[i];                                                                                    \
      const vi yv = (vi){} + yi, exv = (vi){} + (IT)ex;                                                     \
      vt bp = (vt){} - (T)INFINITY, bn = (vt){} + (T)INFINITY;                                              \
      vi jp = (vi){} + (IT)M, jn = jp, jv = lane, bad = (vi){};                                             \
      for (int64_t j = 0; j < Mv; j += L) {                                                                  \
        vt v;                                                                                                \
        vi zz;                                                                                               \
        memcpy(&v, row + j, sizeof v);                                                                       \
        memcpy(&zz, z + j, sizeof zz);                                                                       \
        const vi same = zz == yv, keep = jv != exv;                                                          \
        const vi up = same & keep & (v > bp);                                                                \
        const vi un = ~same & keep & (v < bn);                                                               \
        bad |= keep & (v != v);                                                                              \
        bp = (vt)(((vi)v & up) | ((vi)bp & ~up));                                                            \
        jp = (jv & up) | (jp & ~up);                                                                         \
        bn = (vt)(((vi)v & un) | ((vi)bn & ~un));                                                            \
        jn = (jv & un) | (jn & ~un);                                                                         \
        jv += (IT)L;                                                                                         \
      }                                                                                                      \
      T pm = -(T)INFINITY, nm = (T)INFINITY;                                                                 \
      int64_t pj = M, nj = M;                                                                                \
      int any_bad = 0;                                                                                       \
      for (int k = 0; k < L; k++) {                                                                          \
        any_bad |= bad[k] != 0;                                                                              \
        if (bp[k] > pm || (bp[k] == pm && (int64_t)jp[k] < pj)) { pm = bp[k]; pj = (int64_t)jp[k]; }         \
        if (bn[k] < nm || (bn[k] == nm && (int64_t)jn[k] < nj)) { nm = bn[k]; nj = (int64_t)jn[k]; }         \
      }                                                                                                      \
      for (int64_t j = Mv; j < M; j++) {                                                                     \
        if (j == ex) continue;                                                                               \
        const T v = row[j];                                                                                  \
        any_bad |= v != v;                                                                                   \
        if (z[j] == yi) {                                                                                    \
          if (v > pm) { pm = v; pj = j; }                                                                    \
        } else if (v < nm) { nm = v; nj = j; }                                                               \
      }                                                                                                      \
      nan_rows += any_bad;                                                                                   \
      pv[i] = pm; pi[i] = pj; nv[i] = nm; ni[i] = nj;                                                        \
    }                                                                                                        \
    return nan_rows;                                                                                         \
  }

/* float32 scores: 16 lanes, int32 labels (codes) and column numbers (M < 2^31) */
DEFINE_ROW_HARDEST(fastdml_row_hardest_f32, float, int32_t, 16)
/* float64 scores: 8 lanes, int64 labels and column numbers */
DEFINE_ROW_HARDEST(fastdml_row_hardest_f64, double, int64_t, 8)

/* The interface version of both sources: native.py refuses a library whose version differs from its own. */
int64_t fastdml_row_scan_version(void) { return 2; }
