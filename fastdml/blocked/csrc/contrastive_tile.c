/* One tile of the all-pairs contrastive loss, square case, for fastdml's blocked CPU path
 * (fastdml/blocked/contrastive.py; built and loaded by fastdml/blocked/native.py).
 *
 * The tile is rows si..si+h-1 x columns sj..sj+w-1 of the label-sorted problem x (N x D, row-major); v (h x w)
 * holds the GEMM's x_i.x_j, turned in place into m = q = xn_i + xn_j - 2 x_i.x_j (kind 0 "l2", 1 "sql2";
 * xn: squared norms) or m = -x_i.x_j (kind 2 "dot", read negated); d' = sqrt(m) (l2) or m. With full = 0 only
 * the entries with column j > row i are taken, each standing for the pairs (i, j) and (j, i) (weight 2); with
 * full = 1 (a diagonal tile: si == sj, h == w) every entry but (i, i), each for its own pair (weight 1). An
 * entry is a positive when plo[i] <= j < phi[i] (the label run of row i), else a negative, and lies in an
 * open interval (lo, hi) of bounds[0..7] = (positive counted, positive active, negative counted, negative
 * active), taken on m and cast to T first (as torch casts a scalar). Then
 *
 *     stats += weight [sum_{pos active} (d' - pm), #pos counted, sum_{neg active} (nm - d'), #neg counted]
 *
 * Near-duplicates (near > 0; l2 and sql2 only, refused for dot): entries with q <= near (xn_i + xn_j) are
 * first recomputed by direct differences; for l2 (with need_grad) their weights are left out of cp, cn and
 * rs and their gradient is added to gx by
 * direct differences (0 at d' = 0). With need_grad, the pair weights c = [active] / d' (l2) or [active]:
 *   - positives of a row with pdir[i] = 0: c into cp (h x w, on the row's positive columns, 0 where not taken),
 *     row sums into rs[0][i] and (full = 0) column sums into rs[0][j]; pdir[i] = 1 (short label runs): the
 *     gradient straight into gx[0] (l2: 2 c (x_i - x_j) on row i and, full = 0, its negative on row j;
 *     sql2: 4 (x_i - x_j); dot: -2 x_j on row i, -2 x_i on row j);
 *   - negatives: c into cn (h x w, every entry, only when some negative of the tile is active) and rs[1].
 * gx: 2 x N x D (the sorted rows); rs: 2 x N. Rows are taken in order, single-threaded: the same result run
 * to run. Returns FASTDML_BAD_ARGUMENT for sizes or offsets out of range, FASTDML_NO_MEMORY, else bit 0: cn
 * was written; bit 1: cp holds a nonzero weight.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fastdml_native.h"

/* a weights call with kind, f (flags or NULL) and csum (column sums or NULL) as constants */
#define WEIGHTS(NAME, K, F, CS) NAME##_weights(vr, a, b, K, lo, hi, pos, pmT, nmT, F, crow, CS, sum)
#define WEIGHTS_K(NAME, K)                                                                                    \
  (f ? (csum ? WEIGHTS(NAME, K, f, csum) : WEIGHTS(NAME, K, f, NULL))                                          \
     : (csum ? WEIGHTS(NAME, K, NULL, csum) : WEIGHTS(NAME, K, NULL, NULL)))

#define DEFINE_CONTRASTIVE_TILE(NAME, T, SQRT)                                                                        \
  /* direct-difference gradient of one pair: coef (x_i - x_j) on row i, its negative on row j (dot: see top) */       \
  static inline void NAME##_pair(T *restrict gi, T *restrict gj, const T *restrict xi, const T *restrict xj,          \
                                 int64_t D, int64_t kind, T coef, int both) {                                         \
    if (kind == 2) {                                                                                                  \
      for (int64_t k = 0; k < D; k++) gi[k] -= coef * xj[k];                                                          \
      if (both)                                                                                                       \
        for (int64_t k = 0; k < D; k++) gj[k] -= coef * xi[k];                                                        \
    } else {                                                                                                          \
      for (int64_t k = 0; k < D; k++) gi[k] += coef * (xi[k] - xj[k]);                                                \
      if (both)                                                                                                       \
        for (int64_t k = 0; k < D; k++) gj[k] -= coef * (xi[k] - xj[k]);                                              \
    }                                                                                                                 \
  }                                                                                                                   \
                                                                                                                      \
  /* one row's counts (cnt: positives counted, negatives counted, negatives active) on v, the bounds lim              \
   * turned to v's orientation; with xnc, the number of near-duplicate candidates */                                  \
  static inline int32_t NAME##_count(const T *restrict vr, int64_t j0, int64_t pl, int64_t ph, int64_t w,             \
                                     const T *restrict lim, T nearT, T xni, const T *restrict xnc,                    \
                                     int32_t *restrict cnt) {                                                         \
    const T pcl = lim[0], pch = lim[1], ncl = lim[4], nch = lim[5], nal = lim[6], nah = lim[7];                       \
    int32_t nf = 0, cp = 0, cn = 0, an = 0;                                                                           \
    for (int64_t j = pl; j < ph; j++) {                                                                               \
      const T m = vr[j];                                                                                              \
      cp += (m > pcl) & (m < pch);                                                                                    \
      if (xnc) nf += m <= nearT * (xni + xnc[j]);                                                                     \
    }                                                                                                                 \
    for (int seg = 0; seg < 2; seg++) {                                                                               \
      const int64_t a = seg ? ph : j0, b = seg ? w : pl;                                                              \
      for (int64_t j = a; j < b; j++) {                                                                               \
        const T m = vr[j];                                                                                            \
        cn += (m > ncl) & (m < nch);                                                                                  \
        an += (m > nal) & (m < nah);                                                                                  \
        if (xnc) nf += m <= nearT * (xni + xnc[j]);                                                                   \
      }                                                                                                               \
    }                                                                                                                 \
    cnt[0] = cp;                                                                                                      \
    cnt[1] = cn;                                                                                                      \
    cnt[2] = an;                                                                                                      \
    return nf;                                                                                                        \
  }                                                                                                                   \
                                                                                                                      \
  /* weights of the entries a..b-1 of one row: c (0 where inactive or flagged) into crow, added to the column         \
   * sums csum when given; the terms' sum into *sum; returns the row's weight sum. kind, f and csum are               \
   * constants at each call site (weights_at), so each variant compiles to its own vector loop (a sqrt under a        \
   * runtime condition would not vectorize). */                                                                       \
  static inline __attribute__((always_inline)) T NAME##_weights(const T *restrict vr, int64_t a, int64_t b, int64_t kind, T lo, T hi, int pos, \
                                 T pmT, T nmT, const uint8_t *restrict f, T *restrict crow, T *restrict csum,         \
                                 double *restrict sum) {                                                              \
    T s = 0, rsum = 0;                                                                                                \
    _Pragma("omp simd reduction(+ : s, rsum)") for (int64_t j = a; j < b; j++) {                                      \
      const T vv = vr[j];                                                                                             \
      const int act = (vv > lo) & (vv < hi) & !(f && f[j]);                                                           \
      const T m = kind == 2 ? -vv : vv;                                                                               \
      const T d = kind == 0 ? SQRT(m) : m;                                                                            \
      const T t = pos ? d - pmT : nmT - d;                                                                            \
      const T c = kind == 0 ? (T)1 / d : (T)1;                                                                        \
      const T cc = act ? c : (T)0;                                                                                    \
      s += act ? t : (T)0;                                                                                            \
      crow[j] = cc;                                                                                                   \
      if (csum) csum[j] += cc;                                                                                        \
      rsum += cc;                                                                                                     \
    }                                                                                                                 \
    if (f) /* a flagged entry's term counts (only its weight is left out) */                                          \
      for (int64_t j = a; j < b; j++)                                                                                 \
        if (f[j] && (vr[j] > lo) & (vr[j] < hi)) {                                                                    \
          const T m = kind == 2 ? -vr[j] : vr[j], d = kind == 0 ? SQRT(m) : m;                                        \
          s += pos ? d - pmT : nmT - d;                                                                               \
        }                                                                                                             \
    *sum += (double)s;                                                                                                \
    return rsum;                                                                                                      \
  }                                                                                                                   \
                                                                                                                      \
  static inline T NAME##_weights_at(const T *restrict vr, int64_t a, int64_t b, int64_t kind, T lo, T hi, int pos,    \
                                    T pmT, T nmT, const uint8_t *f, T *crow, T *csum, double *sum) {                  \
    return kind == 0 ? WEIGHTS_K(NAME, 0) : (kind == 1 ? WEIGHTS_K(NAME, 1) : WEIGHTS_K(NAME, 2));                    \
  }                                                                                                                   \
                                                                                                                      \
  /* the terms' sum of the active entries a..b-1 of one row (no weights), kind a constant as above */                 \
  static inline __attribute__((always_inline)) double NAME##_terms(const T *restrict vr, int64_t a, int64_t b,        \
                                                                   int64_t kind, T lo, T hi, int pos, T pmT,          \
                                                                   T nmT) {                                           \
    T s = 0;                                                                                                          \
    _Pragma("omp simd reduction(+ : s)") for (int64_t j = a; j < b; j++) {                                            \
      const T vv = vr[j], m = kind == 2 ? -vv : vv, d = kind == 0 ? SQRT(m) : m;                                      \
      s += (vv > lo) & (vv < hi) ? (pos ? d - pmT : nmT - d) : (T)0;                                                  \
    }                                                                                                                 \
    return (double)s;                                                                                                 \
  }                                                                                                                   \
                                                                                                                      \
  static inline double NAME##_terms_at(const T *restrict vr, int64_t a, int64_t b, int64_t kind, T lo, T hi,          \
                                       int pos, T pmT, T nmT) {                                                       \
    if (kind == 0) return NAME##_terms(vr, a, b, 0, lo, hi, pos, pmT, nmT);                                           \
    if (kind == 1) return NAME##_terms(vr, a, b, 1, lo, hi, pos, pmT, nmT);                                           \
    return NAME##_terms(vr, a, b, 2, lo, hi, pos, pmT, nmT);                                                          \
  }                                                                                                                   \
                                                                                                                      \
  int64_t NAME(T *restrict v, int64_t h, int64_t w, int64_t si, int64_t sj, int64_t N, int64_t D,                     \
               const T *restrict x, const T *restrict xn, const int64_t *restrict plo,                                \
               const int64_t *restrict phi, const uint8_t *restrict pdir, int64_t kind,                               \
               const double *restrict bounds, double pm, double nm, double near, int64_t full,                        \
               int64_t need_grad, T *restrict cp, T *restrict cn, double *rs, T *gx, double *restrict stats) {        \
    if (h < 0 || w < 0 || si < 0 || sj < 0 || N < 0 || D < 0 || si > N - h || sj > N - w || kind < 0 ||               \
        kind > 2 || w > INT32_MAX || (full && (si != sj || h != w)) || (need_grad && (!cp || !cn || !rs || !gx)) ||   \
        (D > 0 && N > INT64_MAX / 2 / D) || (kind == 2 && near > 0) || !bounds || !stats ||                           \
        (h > 0 && (!v || !xn || !plo || !phi || !pdir || (D > 0 && !x))))                                             \
      return FASTDML_BAD_ARGUMENT;                                                                                    \
    for (int64_t i = si; i < si + h; i++)                                                                             \
      if (plo[i] < 0 || phi[i] < plo[i] || phi[i] > N) return FASTDML_BAD_ARGUMENT;                                   \
    /* the bounds on v: m = v, or m = -v (dot), where lo < m < hi reads -hi < v < -lo */                              \
    T lim[8];                                                                                                         \
    for (int k = 0; k < 8; k += 2) {                                                                                  \
      lim[k] = kind == 2 ? -(T)bounds[k + 1] : (T)bounds[k];                                                          \
      lim[k + 1] = kind == 2 ? -(T)bounds[k] : (T)bounds[k + 1];                                                      \
    }                                                                                                                 \
    const T pmT = (T)pm, nmT = (T)nm, nearT = (T)near;                                                                \
    T *gx0 = gx, *gx1 = gx ? gx + N * D : NULL;                                                                       \
    double *rs0 = rs, *rs1 = rs ? rs + N : NULL;                                                                      \
    double Sp = 0.0, Sn = 0.0;                                                                                        \
    int64_t Cp = 0, Cn = 0;                                                                                           \
    int any_pos = 0, any_neg = 0;                                                                                     \
    uint8_t *fm = NULL; /* the row's flagged near-duplicates, allocated when the first one is met */                  \
    /* the tile's column sums of the weights (full = 0), added to rs at the end */                                    \
    T *csp = NULL, *csn = NULL;                                                                                       \
    if (need_grad && !full && w > 0) {                                                                                \
      if (!(csp = calloc(2 * (size_t)w, sizeof(T)))) return FASTDML_NO_MEMORY;                                        \
      csn = csp + w;                                                                                                  \
    }                                                                                                                 \
    for (int64_t i = 0; i < h; i++) {                                                                                 \
      const int64_t gi = si + i;                                                                                      \
      T *restrict vr = v + i * w;                                                                                     \
      const T *restrict xi = x + gi * D;                                                                              \
      int64_t j0 = full ? 0 : gi + 1 - sj, lo = plo[gi] - sj, hi = phi[gi] - sj;                                      \
      j0 = j0 < 0 ? 0 : (j0 > w ? w : j0);                                                                            \
      if (kind != 2) {                                                                                                \
        const T xni = xn[gi], *restrict xnc = xn + sj;                                                                \
        for (int64_t j = j0; j < w; j++) vr[j] = (xni + xnc[j]) - 2 * vr[j];                                          \
      }                                                                                                               \
      if (full) vr[i] = (T)NAN; /* the pair (i, i): in no interval, weight 0, never a near-duplicate */               \
      lo = lo < 0 ? 0 : (lo > w ? w : lo);                                                                            \
      hi = hi < lo ? lo : (hi > w ? w : hi);                                                                          \
      const int64_t pl = lo > j0 ? lo : j0, ph = hi > pl ? hi : pl; /* positives taken: pl..ph-1 */                   \
      const int direct = pdir[gi] != 0;                                                                               \
      const uint8_t *f = NULL;                                                                                        \
      const T *xnc = near > 0 ? xn + sj : NULL, xni = near > 0 ? xn[gi] : 0;                                          \
      int32_t cnt[3];                                                                                                 \
      if (NAME##_count(vr, j0, pl, ph, w, lim, nearT, xni, xnc, cnt)) {                                               \
        /* near-duplicates: recomputed by direct differences, then the row counted again */                           \
        if (!fm && !(fm = malloc(w > 0 ? (size_t)w : 1))) {                                                           \
          free(csp);                                                                                                  \
          return FASTDML_NO_MEMORY;                                                                                   \
        }                                                                                                             \
        memset(fm, 0, (size_t)w);                                                                                     \
        for (int64_t j = j0; j < w; j++) {                                                                            \
          if (!(vr[j] <= nearT * (xni + xnc[j]))) continue;                                                           \
          const T *restrict xj = x + (sj + j) * D;                                                                    \
          double s = 0.0;                                                                                             \
          for (int64_t k = 0; k < D; k++) {                                                                           \
            const double e = (double)xi[k] - (double)xj[k];                                                           \
            s += e * e;                                                                                               \
          }                                                                                                           \
          vr[j] = (T)s;                                                                                               \
          fm[j] = 1;                                                                                                  \
        }                                                                                                             \
        NAME##_count(vr, j0, pl, ph, w, lim, nearT, xni, NULL, cnt);                                                  \
        if (kind == 0 && need_grad) f = fm;                                                                           \
      }                                                                                                               \
      Cp += cnt[0];                                                                                                   \
      Cn += cnt[1];                                                                                                   \
      /* positives */                                                                                                 \
      if (need_grad && !direct)                                                                                       \
        for (int64_t j = lo; j < (pl < hi ? pl : hi); j++) cp[i * w + j] = 0;                                         \
      if (ph > pl) {                                                                                                  \
        if (need_grad && !direct) {                                                                                   \
          const T rsum = NAME##_weights_at(vr, pl, ph, kind, lim[2], lim[3], 1, pmT, nmT, f, cp + i * w, csp, &Sp);   \
          rs0[gi] += (double)rsum;                                                                                    \
          any_pos |= rsum != 0;                                                                                       \
        } else if (!need_grad) {                                                                                      \
          Sp += NAME##_terms_at(vr, pl, ph, kind, lim[2], lim[3], 1, pmT, nmT);                                       \
        } else {                                                                                                      \
          double s = 0.0;                                                                                             \
          for (int64_t j = pl; j < ph; j++) {                                                                         \
            if (!((vr[j] > lim[2]) & (vr[j] < lim[3]))) continue;                                                     \
            const T m = kind == 2 ? -vr[j] : vr[j];                                                                   \
            const T d = kind == 0 ? SQRT(m) : m;                                                                      \
            s += (double)(d - pmT);                                                                                   \
            const T coef = kind == 0 ? (d > 0 ? (T)2 / d : (T)0) : (kind == 1 ? (T)4 : (T)2);                         \
            NAME##_pair(gx0 + gi * D, gx0 + (sj + j) * D, xi, x + (sj + j) * D, D, kind, coef, !full);                \
          }                                                                                                           \
          Sp += s;                                                                                                    \
        }                                                                                                             \
      }                                                                                                               \
      /* negatives: j0..pl-1 and ph..w-1 */                                                                           \
      T *restrict cnr = cn ? cn + i * w : NULL;                                                                       \
      if (cnt[2]) {                                                                                                   \
        if (need_grad) {                                                                                              \
          if (!any_neg) memset(cn, 0, (size_t)(i * w) * sizeof(T));                                                   \
          memset(cnr, 0, (size_t)w * sizeof(T));                                                                      \
          T rsum = NAME##_weights_at(vr, j0, pl, kind, lim[6], lim[7], 0, pmT, nmT, f, cnr, csn, &Sn);                \
          rsum += NAME##_weights_at(vr, ph, w, kind, lim[6], lim[7], 0, pmT, nmT, f, cnr, csn, &Sn);                  \
          rs1[gi] += (double)rsum;                                                                                    \
        } else {                                                                                                      \
          Sn += NAME##_terms_at(vr, j0, pl, kind, lim[6], lim[7], 0, pmT, nmT);                                       \
          Sn += NAME##_terms_at(vr, ph, w, kind, lim[6], lim[7], 0, pmT, nmT);                                        \
        }                                                                                                             \
        any_neg = 1;                                                                                                  \
      } else if (any_neg && need_grad) {                                                                              \
        memset(cnr, 0, (size_t)w * sizeof(T));                                                                        \
      }                                                                                                               \
      /* l2 near-duplicates left out of cp and cn: their gradient by direct differences */                            \
      if (f) {                                                                                                        \
        for (int64_t j = j0; j < w; j++) {                                                                            \
          if (!f[j]) continue;                                                                                        \
          const int pos = j >= pl && j < ph;                                                                          \
          if (pos && direct) continue; /* (already taken by direct differences) */                                    \
          const T m = vr[j], d = SQRT(m);                                                                             \
          const int on = pos ? (m > lim[2]) & (m < lim[3]) : (m > lim[6]) & (m < lim[7]);                             \
          if (!on || !(d > 0)) continue;                                                                              \
          T *g = pos ? gx0 : gx1;                                                                                     \
          NAME##_pair(g + gi * D, g + (sj + j) * D, xi, x + (sj + j) * D, D, kind, (pos ? (T)2 : (T)-2) / d, !full);  \
        }                                                                                                             \
      }                                                                                                               \
    }                                                                                                                 \
    free(fm);                                                                                                         \
    if (csp) {                                                                                                        \
      for (int64_t j = 0; j < w; j++) {                                                                               \
        rs0[sj + j] += (double)csp[j];                                                                                \
        rs1[sj + j] += (double)csn[j];                                                                                \
      }                                                                                                               \
      free(csp);                                                                                                      \
    }                                                                                                                 \
    const double wt = full ? 1.0 : 2.0;                                                                               \
    stats[0] += wt * Sp;                                                                                              \
    stats[1] += wt * (double)Cp;                                                                                      \
    stats[2] += wt * Sn;                                                                                              \
    stats[3] += wt * (double)Cn;                                                                                      \
    return (any_neg && need_grad ? 1 : 0) | (any_pos ? 2 : 0);                                                        \
  }

DEFINE_CONTRASTIVE_TILE(fastdml_contrastive_tile_f32, float, sqrtf)
DEFINE_CONTRASTIVE_TILE(fastdml_contrastive_tile_f64, double, sqrt)
