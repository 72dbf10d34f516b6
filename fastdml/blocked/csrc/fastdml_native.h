/* The entry points of fastdml's compiled CPU helpers: the one prototype table. The C sources include it (so
 * the compiler checks each definition against it) and fastdml/blocked/native.py parses it for the ctypes
 * argument types. Keep one prototype per line: pointers, int64_t and double only.
 *
 * Every entry point returns an int64 status; a negative value means an offset or size it was given is out of
 * range (nothing was read or written). See each source for the meaning of the others.
 */
#ifndef FASTDML_NATIVE_H
#define FASTDML_NATIVE_H
#include <stdint.h>

#define FASTDML_BAD_ARGUMENT (-1)
#define FASTDML_NO_MEMORY (-2)

int64_t fastdml_row_scan_version(void);
int64_t fastdml_row_hardest_f32(const float *t, int64_t b, int64_t M, const int32_t *y, const int32_t *z, const int64_t *excl, int64_t diag, float *pv, int64_t *pi, float *nv, int64_t *ni);
int64_t fastdml_row_hardest_f64(const double *t, int64_t b, int64_t M, const int64_t *y, const int64_t *z, const int64_t *excl, int64_t diag, double *pv, int64_t *pi, double *nv, int64_t *ni);
int64_t fastdml_row_hardest_strip_f32(const float *G, int64_t b, int64_t W, int64_t s, const float *off, double scale, const int32_t *y, float *bp, int32_t *bpi, float *bn, int32_t *bni);
int64_t fastdml_row_hardest_strip_f64(const double *G, int64_t b, int64_t W, int64_t s, const double *off, double scale, const int64_t *y, double *bp, int64_t *bpi, double *bn, int64_t *bni);
int64_t fastdml_chosen_triplets_f32(const float *x, int64_t N, int64_t D, const float *ref, int64_t M, const int64_t *p, const int64_t *n, const uint8_t *valid, int64_t kind, double margin, int64_t smooth, double low, double high, float *gx, float *gcol, float *coef, double *stats);
int64_t fastdml_chosen_triplets_f64(const double *x, int64_t N, int64_t D, const double *ref, int64_t M, const int64_t *p, const int64_t *n, const uint8_t *valid, int64_t kind, double margin, int64_t smooth, double low, double high, double *gx, double *gcol, double *coef, double *stats);
int64_t fastdml_contrastive_tile_f32(float *v, int64_t h, int64_t w, int64_t si, int64_t sj, int64_t N, int64_t D, const float *x, const float *xn, const int64_t *plo, const int64_t *phi, const uint8_t *pdir, int64_t kind, const double *bounds, double pm, double nm, double near, int64_t full, int64_t need_grad, float *cp, float *cn, double *rs, float *gx, double *stats);
int64_t fastdml_contrastive_tile_f64(double *v, int64_t h, int64_t w, int64_t si, int64_t sj, int64_t N, int64_t D, const double *x, const double *xn, const int64_t *plo, const int64_t *phi, const uint8_t *pdir, int64_t kind, const double *bounds, double pm, double nm, double near, int64_t full, int64_t need_grad, double *cp, double *cn, double *rs, double *gx, double *stats);

#endif
