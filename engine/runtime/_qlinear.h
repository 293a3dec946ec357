/* The products of _qlinear.c for the other C files of the extension (_t5ops.c's decoder_layers). */
#ifndef ENGINE_QLINEAR_H
#define ENGINE_QLINEAR_H
#include <Python.h>

/* 0, or -1 with a Python error set (GIL held): whether `mode` runs here and w_len bytes of weights
   (and scale_len bytes of scales, -1 for none) fit N outputs x K inputs in it. */
int qlinear_check(int mode, Py_ssize_t N, Py_ssize_t K, Py_ssize_t w_len, Py_ssize_t scale_len);
/* out[M, N] = x[M, K] . w^T (/ scale) in `mode` (checked first); no Python calls. 0, or -1 out of memory. */
int qlinear_compute(int mode, const float *x, Py_ssize_t M, Py_ssize_t K, const void *w, const float *scale,
                    Py_ssize_t N, float *out, int threads);

/* Modes 2 and 4 in two halves: qlinear_quantize writes rows of x as the product takes them
   (qlinear_quantized_row_bytes each, into xq, and their scales into sx; rows are independent, so
   any split of them gives the same bytes), then qlinear_product_quantized multiplies them, the
   same as qlinear_compute. For other modes qlinear_takes_quantized says no. */
int qlinear_takes_quantized(int mode);
Py_ssize_t qlinear_quantized_row_bytes(int mode, Py_ssize_t K);
void qlinear_quantize(int mode, const float *x, Py_ssize_t M, Py_ssize_t K, void *xq, float *sx);
void qlinear_product_quantized(int mode, const void *xq, const float *sx, Py_ssize_t M, Py_ssize_t K, const void *w,
                               const float *scale, Py_ssize_t N, float *out, int threads);

#endif
