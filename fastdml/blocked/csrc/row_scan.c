/* The batch-hard row scan of fastdml's blocked CPU path, built and loaded by fastdml/blocked/native.py.
 *
 * For each row i of a (b, M) score block t (row-major, contiguous), in one pass over the row:
 *
 *     pv[i] = max { t[i][j] : z[j] == y[i], j != ex(i) }     pi[i] = the lowest such j reaching it
 *     nv[i] = min { t[i][j] : z[j] != y[i], j != ex(i) }     ni[i] = the lowest such j reaching it
 *
 * with ex(i) = excl[i] when excl is given (-1: none), else diag + i when diag >= 0 (the square case: the
 * anchor itself), else none. A row without any positive (negative) gets pv = -inf, pi = M (nv = +inf,
 * ni = M). The return value is FASTDML_BAD_ARGUMENT for a negative or oversized b or M, else the number of
 * rows where a kept entry is NaN: for those the caller redoes the
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

#include "fastdml_native.h"

#define DEFINE_ROW_HARDEST(NAME, T, IT, L, IMAX)                                                                \
  typedef T NAME##_vt __attribute__((vector_size(64)));                                                      \
  typedef IT NAME##_vi __attribute__((vector_size(64)));                                                     \
  int64_t NAME(const T *restrict t, int64_t b, int64_t M, const IT *restrict y, const IT *restrict z,      \
               const int64_t *restrict excl, int64_t diag, T *restrict pv, int64_t *restrict pi,          \
               T *restrict nv, int64_t *restrict ni) {                                                     \
    typedef NAME##_vt vt;                                                                                    \
    typedef NAME##_vi vi;                                                                                    \
    if (b < 0 || M < 0 || M > (IMAX) || (M > 0 && b > INT64_MAX / M)) return FASTDML_BAD_ARGUMENT;          \
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

/* The square case with half the GEMM: a strip of rows of the upper triangle.
 *
 * G (b x W, row-major) holds x_a . x_c for the anchors a = s .. s+b-1 and the columns c = s .. s+W-1 (the
 * strip of row block [s, s+b) against every later row; W = N - s). The score of anchor a against candidate
 * c is off[c] + scale * (x_a . x_c) (l2/sql2: off = |x|^2, scale = -2; dot: off = 0, scale = -1), and G is
 * symmetric, so one entry serves both directions:
 *
 *   row direction:    anchor s+i, candidate s+jj, for every jj != i;
 *   column direction: anchor s+jj, candidate s+i, for jj >= b (the anchors of later blocks; those inside the
 *                     block see each other in the row direction).
 *
 * bp/bpi and bn/bni (N each, indexed by anchor) are the running farthest positive and nearest negative and
 * their columns, carried from strip to strip (start: -inf / +inf, index N). Every anchor meets its
 * candidates in increasing column order (earlier strips' rows, then this strip's rows in order, then its own
 * row's columns, lane by lane), so a strict improvement keeps the first extreme, and lanes merge with equal
 * values going to the lower index. Returns FASTDML_BAD_ARGUMENT unless 0 < b <= W and 0 <= s with s + W in
 * range, else the number of rows where a score is NaN (the caller then uses its torch ops).
 */
#define BETTER_MAX(v, j, bv, bj) ((v) > (bv) || ((v) == (bv) && (j) < (bj)))
#define BETTER_MIN(v, j, bv, bj) ((v) < (bv) || ((v) == (bv) && (j) < (bj)))

#define DEFINE_ROW_HARDEST_STRIP(NAME, T, IT, L, IMAX)                                                          \
  typedef T NAME##_vt __attribute__((vector_size(64)));                                                      \
  typedef IT NAME##_vi __attribute__((vector_size(64)));                                                     \
  int64_t NAME(const T *restrict G, int64_t b, int64_t W, int64_t s, const T *restrict off, double scale_d,  \
               const IT *restrict y, T *restrict bp, IT *restrict bpi, T *restrict bn, IT *restrict bni) {  \
    typedef NAME##_vt vt;                                                                                    \
    typedef NAME##_vi vi;                                                                                    \
    if (b <= 0 || W < b || s < 0 || s > (IMAX) - W || b > INT64_MAX / W) return FASTDML_BAD_ARGUMENT;       \
    const T scale = (T)scale_d;                                                                              \
    vi lane;                                                                                                 \
    for (int k = 0; k < L; k++) lane[k] = (IT)k;                                                            \
    const T *restrict offs = off + s;                                                                        \
    const IT *restrict ys = y + s;                                                                           \
    T *restrict cbp = bp + s, *restrict cbn = bn + s;                                                        \
    IT *restrict cbpi = bpi + s, *restrict cbni = bni + s;                                                   \
    int64_t nan_rows = 0;                                                                                    \
    for (int64_t i = 0; i < b; i++) {                                                                        \
      const T *restrict row = G + i * W;                                                                     \
      const IT yi = ys[i], self = (IT)(s + i);                                                               \
      const T oi = offs[i];                                                                                  \
      const vi yv = (vi){} + yi, iv = (vi){} + (IT)i, selfv = (vi){} + self;                                \
      const vt sc = (vt){} + scale, oiv = (vt){} + oi;                                                       \
      vt rbp = (vt){} - (T)INFINITY, rbn = (vt){} + (T)INFINITY;                                            \
      vi rjp = (vi){} + (IT)(s + W), rjn = rjp, bad = (vi){};                                               \
      int64_t jj = 0;                                                                                        \
      /* the diagonal block's columns: row direction only */                                                \
      for (; jj + L <= b; jj += L) {                                                                         \
        vt g, o;                                                                                             \
        vi yc;                                                                                               \
        memcpy(&g, row + jj, sizeof g);                                                                      \
        memcpy(&o, offs + jj, sizeof o);                                                                     \
        memcpy(&yc, ys + jj, sizeof yc);                                                                     \
        const vt v = o + sc * g;                                                                             \
        const vi jv = lane + (IT)jj;                                                                         \
        const vi same = yc == yv, keep = jv != iv;                                                           \
        const vi up = same & keep & (v > rbp), un = ~same & keep & (v < rbn);                                \
        bad |= keep & (v != v);                                                                              \
        rbp = (vt)(((vi)v & up) | ((vi)rbp & ~up));                                                          \
        rjp = ((jv + (IT)s) & up) | (rjp & ~up);                                                             \
        rbn = (vt)(((vi)v & un) | ((vi)rbn & ~un));                                                          \
        rjn = ((jv + (IT)s) & un) | (rjn & ~un);                                                             \
      }                                                                                                      \
      T pm = -(T)INFINITY, nm = (T)INFINITY;                                                                 \
      IT pj = (IT)(s + W), nj = pj;                                                                          \
      int any_bad = 0;                                                                                       \
      for (; jj < b; jj++) {                                                                                 \
        if (jj == i) continue;                                                                               \
        const T v = offs[jj] + scale * row[jj];                                                              \
        any_bad |= v != v;                                                                                   \
        if (ys[jj] == yi) {                                                                                  \
          if (BETTER_MAX(v, (IT)(s + jj), pm, pj)) { pm = v; pj = (IT)(s + jj); }                            \
        } else if (BETTER_MIN(v, (IT)(s + jj), nm, nj)) { nm = v; nj = (IT)(s + jj); }                      \
      }                                                                                                      \
      /* later blocks' columns: both directions from one entry */                                            \
      for (; jj + L <= W; jj += L) {                                                                         \
        vt g, o, cp, cn;                                                                                     \
        vi yc, cpj, cnj;                                                                                     \
        memcpy(&g, row + jj, sizeof g);                                                                      \
        memcpy(&o, offs + jj, sizeof o);                                                                     \
        memcpy(&yc, ys + jj, sizeof yc);                                                                     \
        const vt sg = sc * g, v = o + sg, w = oiv + sg;                                                      \
        const vi jv = lane + (IT)(s + jj);                                                                   \
        const vi same = yc == yv;                                                                            \
        const vi up = same & (v > rbp), un = ~same & (v < rbn);                                              \
        bad |= (v != v) | (w != w);                                                                          \
        rbp = (vt)(((vi)v & up) | ((vi)rbp & ~up));                                                          \
        rjp = (jv & up) | (rjp & ~up);                                                                       \
        rbn = (vt)(((vi)v & un) | ((vi)rbn & ~un));                                                          \
        rjn = (jv & un) | (rjn & ~un);                                                                       \
        memcpy(&cp, cbp + jj, sizeof cp);                                                                    \
        memcpy(&cpj, cbpi + jj, sizeof cpj);                                                                 \
        memcpy(&cn, cbn + jj, sizeof cn);                                                                    \
        memcpy(&cnj, cbni + jj, sizeof cnj);                                                                 \
        const vi cu = same & (w > cp), cd = ~same & (w < cn);                                                \
        cp = (vt)(((vi)w & cu) | ((vi)cp & ~cu));                                                            \
        cpj = (selfv & cu) | (cpj & ~cu);                                                                    \
        cn = (vt)(((vi)w & cd) | ((vi)cn & ~cd));                                                            \
        cnj = (selfv & cd) | (cnj & ~cd);                                                                    \
        memcpy(cbp + jj, &cp, sizeof cp);                                                                    \
        memcpy(cbpi + jj, &cpj, sizeof cpj);                                                                 \
        memcpy(cbn + jj, &cn, sizeof cn);                                                                    \
        memcpy(cbni + jj, &cnj, sizeof cnj);                                                                 \
      }                                                                                                      \
      for (; jj < W; jj++) {                                                                                 \
        const T sg = scale * row[jj], v = offs[jj] + sg, w = oi + sg;                                        \
        const IT c = (IT)(s + jj);                                                                           \
        any_bad |= (v != v) | (w != w);                                                                      \
        if (ys[jj] == yi) {                                                                                  \
          if (BETTER_MAX(v, c, pm, pj)) { pm = v; pj = c; }                                                  \
          if (w > cbp[jj]) { cbp[jj] = w; cbpi[jj] = self; }                                                 \
        } else {                                                                                             \
          if (BETTER_MIN(v, c, nm, nj)) { nm = v; nj = c; }                                                  \
          if (w < cbn[jj]) { cbn[jj] = w; cbni[jj] = self; }                                                 \
        }                                                                                                    \
      }                                                                                                      \
      for (int k = 0; k < L; k++) {                                                                          \
        any_bad |= bad[k] != 0;                                                                              \
        if (BETTER_MAX(rbp[k], rjp[k], pm, pj)) { pm = rbp[k]; pj = rjp[k]; }                                \
        if (BETTER_MIN(rbn[k], rjn[k], nm, nj)) { nm = rbn[k]; nj = rjn[k]; }                                \
      }                                                                                                      \
      /* earlier strips gave this anchor lower columns: they win ties */                                    \
      if (BETTER_MAX(pm, pj, cbp[i], cbpi[i])) { cbp[i] = pm; cbpi[i] = pj; }                                \
      if (BETTER_MIN(nm, nj, cbn[i], cbni[i])) { cbn[i] = nm; cbni[i] = nj; }                                \
      nan_rows += any_bad;                                                                                   \
    }                                                                                                        \
    return nan_rows;                                                                                         \
  }

DEFINE_ROW_HARDEST_STRIP(fastdml_row_hardest_strip_f32, float, int32_t, 16, INT32_MAX)
DEFINE_ROW_HARDEST_STRIP(fastdml_row_hardest_strip_f64, double, int64_t, 8, INT64_MAX)

/* float32 scores: 16 lanes, int32 labels (codes) and column numbers (M < 2^31) */
DEFINE_ROW_HARDEST(fastdml_row_hardest_f32, float, int32_t, 16, INT32_MAX)
/* float64 scores: 8 lanes, int64 labels and column numbers */
DEFINE_ROW_HARDEST(fastdml_row_hardest_f64, double, int64_t, 8, INT64_MAX)

/* The interface version of both sources: native.py refuses a library whose version differs from its own. */
int64_t fastdml_row_scan_version(void) { return 5; }
