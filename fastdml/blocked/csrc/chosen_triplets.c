/* The loss of one chosen triplet per anchor, with its gradient, for fastdml's blocked CPU path
 * (fastdml/portable/chosen.py; built and loaded by fastdml/blocked/native.py).
 *
 * Anchor i (row i of x, N x D) has a positive p[i] and a negative n[i] (rows of ref, M x D) and a flag
 * valid[i]. With d'(a, b) per kind (0: |a - b|, 1: |a - b|^2, 2: -a.b) and
 * v_i = d'(x_i, ref_p) - d'(x_i, ref_n) + margin, the term is relu(v_i) (softplus(v_i) if smooth, as
 * torch's softplus: v for v > 20, else log1p(exp(v))), counted iff valid[i] and low < term < high
 * (low = -inf, high = +inf impose nothing):
 *
 *     stats[0] = sum of the counted terms (double)     stats[1] = how many were counted
 *
 * With w_i = f'(v_i) on counted anchors (relu: [v_i > 0]; softplus: sigmoid(v_i)), 0 elsewhere, and
 * e_p = x_i - ref_p, e_n = x_i - ref_n:
 *
 *     l2:   c = w / d (0 where that is not finite: the subgradient at d = 0);  sql2: c = 2 w
 *           gx[i] = c_p e_p - c_n e_n;   gcol[p[i]] -= c_p e_p;   gcol[n[i]] += c_n e_n
 *     dot:  gx[i] = w (ref_n - ref_p);   gcol[p[i]] -= w x_i;     gcol[n[i]] += w x_i
 *
 * gx (N x D) is written (=), gcol (M x D, may be gx itself: the square case) is added to, first every
 * positive part in anchor order, then every negative part: the same result run to run. gx = NULL: no
 * gradient; gcol = NULL: no column part. coef: 2 N scratch values.
 *
 * Returns FASTDML_BAD_ARGUMENT for a negative size or an unknown kind; 0; 1 when a distance or a term is not finite (the caller redoes the call with torch, whose NaN
 * rules it follows); 2 when an index is out of range (the caller's torch ops raise the error). Nothing
 * is written to gx or gcol before every anchor has been checked.
 */
#include <math.h>
#include <stdint.h>

#include "fastdml_native.h"

#define DEFINE_CHOSEN(NAME, T)                                                                                \
  int64_t NAME(const T *restrict x, int64_t N, int64_t D, const T *ref, int64_t M, const int64_t *restrict p, \
               const int64_t *restrict n, const uint8_t *restrict valid, int64_t kind, double margin,        \
               int64_t smooth, double low, double high, T *gx, T *gcol, T *restrict coef,                    \
               double *restrict stats) {                                                                     \
    if (N < 0 || D < 0 || M < 0 || kind < 0 || kind > 2 || (smooth != 0 && smooth != 1) ||                  \
        (D > 0 && (N > INT64_MAX / D || M > INT64_MAX / D)))                                                 \
      return FASTDML_BAD_ARGUMENT;                                                                           \
    for (int64_t i = 0; i < N; i++)                                                                          \
      if (p[i] < 0 || p[i] >= M || n[i] < 0 || n[i] >= M) return 2;                                          \
    double S = 0.0, C = 0.0;                                                                                 \
    for (int64_t i = 0; i < N; i++) {                                                                        \
      const T *restrict a = x + i * D, *restrict rp = ref + p[i] * D, *restrict rn = ref + n[i] * D;        \
      T sp = 0, sn = 0;                                                                                      \
      if (kind == 2) {                                                                                       \
        _Pragma("omp simd reduction(+ : sp, sn)") for (int64_t k = 0; k < D; k++) {                          \
          sp += a[k] * rp[k];                                                                                \
          sn += a[k] * rn[k];                                                                                \
        }                                                                                                    \
        sp = -sp;                                                                                            \
        sn = -sn;                                                                                            \
      } else {                                                                                               \
        _Pragma("omp simd reduction(+ : sp, sn)") for (int64_t k = 0; k < D; k++) {                          \
          const T ep = a[k] - rp[k], en = a[k] - rn[k];                                                      \
          sp += ep * ep;                                                                                     \
          sn += en * en;                                                                                     \
        }                                                                                                    \
        if (kind == 0) {                                                                                     \
          sp = sqrt(sp);                                                                                     \
          sn = sqrt(sn);                                                                                     \
        }                                                                                                    \
      }                                                                                                      \
      const T v = (T)(sp - sn + (T)margin);                                                                  \
      const T term = smooth ? (v > 20 ? v : (T)log1p(exp(v))) : (v > 0 ? v : 0);                             \
      if (!isfinite(sp) || !isfinite(sn) || !isfinite(v) || !isfinite(term)) return 1;                       \
      const int counted = valid[i] && (low == -INFINITY || term > low) && (high == INFINITY || term < high);            \
      T w = 0;                                                                                               \
      if (counted) {                                                                                         \
        S += (double)term;                                                                                   \
        C += 1.0;                                                                                            \
        w = smooth ? (T)(1 / (1 + exp(-v))) : (T)(v > 0);                                                    \
      }                                                                                                      \
      T cp = w, cn = w;                                                                                      \
      if (kind == 0) {                                                                                       \
        cp = w / sp;                                                                                         \
        cn = w / sn;                                                                                         \
        if (!isfinite(cp)) cp = 0;                                                                           \
        if (!isfinite(cn)) cn = 0;                                                                           \
      } else if (kind == 1) {                                                                                \
        cp = 2 * w;                                                                                          \
        cn = 2 * w;                                                                                          \
      }                                                                                                      \
      coef[i] = cp;                                                                                          \
      coef[N + i] = cn;                                                                                      \
    }                                                                                                        \
    stats[0] = S;                                                                                            \
    stats[1] = C;                                                                                            \
    if (!gx) return 0;                                                                                       \
    /* the anchors' rows first (gcol may be gx: the square case), then the column parts */                   \
    for (int64_t i = 0; i < N; i++) {                                                                        \
      const T *restrict a = x + i * D, *restrict rp = ref + p[i] * D, *restrict rn = ref + n[i] * D;        \
      T *restrict g = gx + i * D;                                                                            \
      const T cp = coef[i], cn = coef[N + i];                                                                \
      if (kind == 2) {                                                                                       \
        _Pragma("omp simd") for (int64_t k = 0; k < D; k++) g[k] = cp * (rn[k] - rp[k]);                     \
      } else {                                                                                               \
        _Pragma("omp simd") for (int64_t k = 0; k < D; k++) g[k] = cp * (a[k] - rp[k]) - cn * (a[k] - rn[k]); \
      }                                                                                                      \
    }                                                                                                        \
    if (!gcol) return 0;                                                                                     \
    for (int side = 0; side < 2; side++) {                                                                   \
      for (int64_t i = 0; i < N; i++) {                                                                      \
        const int64_t j = side ? n[i] : p[i];                                                                \
        const T c = side ? coef[N + i] : -coef[i];                                                           \
        if (c == 0) continue;                                                                                \
        const T *restrict a = x + i * D, *restrict r = ref + j * D;                                          \
        T *restrict g = gcol + j * D;                                                                        \
        if (kind == 2) {                                                                                     \
          _Pragma("omp simd") for (int64_t k = 0; k < D; k++) g[k] += c * a[k];                              \
        } else {                                                                                             \
          _Pragma("omp simd") for (int64_t k = 0; k < D; k++) g[k] += c * (a[k] - r[k]);                     \
        }                                                                                                    \
      }                                                                                                      \
    }                                                                                                        \
    return 0;                                                                                                \
  }

DEFINE_CHOSEN(fastdml_chosen_triplets_f32, float)
DEFINE_CHOSEN(fastdml_chosen_triplets_f64, double)
