/* Block-diagonal folds W M and M W for float32 and bfloat16 weights, at memory speed.
 *
 * Each 8x8 block product is defined as in so8t_deploy/bake/blockfold.py, whose torch code is the
 * reference this must equal bit for bit: the map's blocks are rounded to float32, every product
 * of a float32 (or bfloat16) weight and a float32 block entry is exact in float64, and the 8 of
 * them are summed in float64 in order k = 0..7, starting from the first product. The sum is then
 * rounded to float32, and from there to bfloat16 (round to nearest even) when the output is one.
 * Exact products make a fused multiply-add round exactly like a multiply then an add, so the
 * vector kernels below, the scalar ones and torch agree whatever the compiler contracts.
 *
 * There are three builds of each kernel, picked at run time for the CPU: AVX-512 (8 float64 lanes: one
 * block row is one register), AVX2 with FMA (two 4-lane registers), and scalar C. The two vector builds are
 * one source, _blockfold_isa.h, included once for each with its primitives. All three do the same
 * operations in the same order, so they write the same bits. torch's bmm of [rows, 8] x [8, 8] runs at about 1 GB/s per
 * core here, whatever the shapes; these run at memory speed. The GIL is released while they run: the
 * bake folds chunks on a thread pool.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_KERNELS 1
#include <immintrin.h>
#endif

enum kind { F32 = 0, BF16 = 1 };

static inline double load_scalar(const void *base, int kind, Py_ssize_t i) {
    if (kind == F32)
        return ((const float *)base)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t bf16_round(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0; /* a NaN, as torch writes it */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline void store_scalar(void *base, int kind, Py_ssize_t i, double sum) {
    float value = (float)sum;
    if (kind == F32)
        ((float *)base)[i] = value;
    else
        ((uint16_t *)base)[i] = bf16_round(value);
}

/* out[r, 8b + j] = sum_k w[r, 8b + k] * B[b, k, j]; a row is read whole before any of it is written. */
static void right_scalar(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                         Py_ssize_t dst_stride, Py_ssize_t rows, Py_ssize_t cols, const double *blocks,
                         double *row) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t c = 0; c < cols; c++)
            row[c] = load_scalar(src, src_kind, r * src_stride + c);
        for (Py_ssize_t b = 0; b < cols / 8; b++) {
            const double *x = row + 8 * b, *m = blocks + 64 * b;
            for (int j = 0; j < 8; j++) {
                double sum = x[0] * m[j];
                for (int k = 1; k < 8; k++)
                    sum += x[k] * m[8 * k + j];
                store_scalar(dst, dst_kind, r * dst_stride + 8 * b + j, sum);
            }
        }
    }
}

/* out[8b + i, c] = sum_j B[b, i, j] * w[8b + j, c], for rows 8b..8b+7 of this chunk. */
static void left_block_scalar(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                              Py_ssize_t dst_stride, Py_ssize_t first, Py_ssize_t cols, const double *m) {
    for (Py_ssize_t c = 0; c < cols; c++) {
        double x[8];
        for (int j = 0; j < 8; j++)
            x[j] = load_scalar(src, src_kind, (first + j) * src_stride + c);
        for (int i = 0; i < 8; i++) {
            double sum = m[8 * i] * x[0];
            for (int j = 1; j < 8; j++)
                sum += m[8 * i + j] * x[j];
            store_scalar(dst, dst_kind, (first + i) * dst_stride + c, sum);
        }
    }
}

#ifdef HAVE_X86_KERNELS
static inline const char *at(const void *base, int kind, Py_ssize_t i) {
    return (const char *)base + i * (kind == F32 ? 4 : 2);
}

/* The kernels compiled once per pair of dtypes, so no dtype is tested inside their loops. */
#define BY_KINDS(call, src_kind, dst_kind, ...)                                                                      \
    do {                                                                                                             \
        if (src_kind == F32 && dst_kind == F32) call(__VA_ARGS__, F32, F32);                                       \
        else if (src_kind == F32) call(__VA_ARGS__, F32, BF16);                                                     \
        else if (dst_kind == F32) call(__VA_ARGS__, BF16, F32);                                                     \
        else call(__VA_ARGS__, BF16, BF16);                                                                         \
    } while (0)

#define PANEL 256 /* columns of the left fold's float64 copy (8 rows of them: 16 KiB, in L1) */

/* -- AVX2 with FMA: 8 lanes are two 4-wide registers ------------------------------------------------------- */
#define AVX2 __attribute__((target("avx2,fma")))

/* 8 weights (float32 or bfloat16) as float32, exactly. */
static inline AVX2 __m256 load8_ps(const void *p, int kind) {
    if (kind == F32)
        return _mm256_loadu_ps((const float *)p);
    __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
}

/* 8 float32 rounded to bfloat16 (nearest even; a NaN as torch writes it), each in the low half of a 32-bit lane. */
static inline AVX2 __m256i round8_bf16(__m256 values) {
    __m256i bits = _mm256_castps_si256(values);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

typedef struct {
    __m256d lo, hi;
} v8_avx2;

static inline AVX2 __m256d splat_avx2(double s) { return _mm256_set1_pd(s); }
static inline AVX2 v8_avx2 loadu_avx2(const double *p) { return (v8_avx2){_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
static inline AVX2 void storeu_avx2(double *p, v8_avx2 v) {
    _mm256_storeu_pd(p, v.lo);
    _mm256_storeu_pd(p + 4, v.hi);
}
static inline AVX2 v8_avx2 times_avx2(__m256d s, v8_avx2 x) {
    return (v8_avx2){_mm256_mul_pd(s, x.lo), _mm256_mul_pd(s, x.hi)};
}
static inline AVX2 v8_avx2 times_add_avx2(__m256d s, v8_avx2 x, v8_avx2 acc) {
    return (v8_avx2){_mm256_fmadd_pd(s, x.lo, acc.lo), _mm256_fmadd_pd(s, x.hi, acc.hi)};
}
static inline AVX2 v8_avx2 widen_avx2(const void *p, int kind) {
    __m256 values = load8_ps(p, kind);
    return (v8_avx2){_mm256_cvtps_pd(_mm256_castps256_ps128(values)),
                     _mm256_cvtps_pd(_mm256_extractf128_ps(values, 1))};
}
static inline AVX2 void narrow_avx2(void *p, int kind, v8_avx2 v) {
    __m256 values = _mm256_set_m128(_mm256_cvtpd_ps(v.hi), _mm256_cvtpd_ps(v.lo));
    if (kind == F32) {
        _mm256_storeu_ps((float *)p, values);
        return;
    }
    __m256i rounded = round8_bf16(values);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

#define ISA avx2
#define TARGET AVX2
#define TILE_ROWS 4 /* 8 sums and a block row: 10 of the 16 registers */
#define V8 v8_avx2
#define SPLAT __m256d
#include "_blockfold_isa.h"
#undef ISA
#undef TARGET
#undef TILE_ROWS
#undef V8
#undef SPLAT

/* -- AVX-512: 8 lanes are one register ---------------------------------------------------------------------- */
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma")))

static inline AVX512 __m512d splat_avx512(double s) { return _mm512_set1_pd(s); }
static inline AVX512 __m512d loadu_avx512(const double *p) { return _mm512_loadu_pd(p); }
static inline AVX512 void storeu_avx512(double *p, __m512d v) { _mm512_storeu_pd(p, v); }
static inline AVX512 __m512d times_avx512(__m512d s, __m512d x) { return _mm512_mul_pd(s, x); }
static inline AVX512 __m512d times_add_avx512(__m512d s, __m512d x, __m512d acc) { return _mm512_fmadd_pd(s, x, acc); }

static inline AVX512 __m512d widen_avx512(const void *p, int kind) { return _mm512_cvtps_pd(load8_ps(p, kind)); }
static inline AVX512 void narrow_avx512(void *p, int kind, __m512d v) {
    __m256 values = _mm512_cvtpd_ps(v);
    if (kind == F32)
        _mm256_storeu_ps((float *)p, values);
    else
        _mm_storeu_si128((__m128i *)p, _mm256_cvtepi32_epi16(round8_bf16(values)));
}

#define ISA avx512
#define TARGET AVX512
#define TILE_ROWS 8 /* 8 sums and a block row: 9 of the 32 registers */
#define V8 __m512d
#define SPLAT __m512d
#include "_blockfold_isa.h"
#undef ISA
#undef TARGET
#undef TILE_ROWS
#undef V8
#undef SPLAT
#endif

/* What each build of the kernels needs of the CPU; `level` picks the best this CPU runs, at most `wanted`. */
enum level { SCALAR = 0, WITH_AVX2 = 1, WITH_AVX512 = 2 };

static int best_level(void) {
#ifdef HAVE_X86_KERNELS
    static int level = -1;
    if (level < 0) {
        __builtin_cpu_init();
        level = SCALAR;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            level = WITH_AVX2;
        if (level == WITH_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512bw"))
            level = WITH_AVX512;
    }
    return level;
#else
    return SCALAR;
#endif
}

typedef struct {
    unsigned long long src, dst, blocks;
    int src_kind, dst_kind, level;
    Py_ssize_t src_stride, dst_stride, rows, cols;
} fold_args;

static int parse(PyObject *args, fold_args *a) {
    a->level = WITH_AVX512;
    if (!PyArg_ParseTuple(args, "KinKinnnK|i", &a->src, &a->src_kind, &a->src_stride, &a->dst, &a->dst_kind,
                          &a->dst_stride, &a->rows, &a->cols, &a->blocks, &a->level))
        return 0;
    if (a->level < SCALAR || a->level > WITH_AVX512) {
        PyErr_SetString(PyExc_ValueError, "level is 0 (scalar), 1 (AVX2) or 2 (AVX-512)");
        return 0;
    }
    if (a->level > best_level())
        a->level = best_level();
    if ((a->src_kind != F32 && a->src_kind != BF16) || (a->dst_kind != F32 && a->dst_kind != BF16)) {
        PyErr_SetString(PyExc_ValueError, "dtype kinds are 0 (float32) or 1 (bfloat16)");
        return 0;
    }
    if (a->rows < 0 || a->cols < 0 || a->src_stride < a->cols || a->dst_stride < a->cols) {
        PyErr_SetString(PyExc_ValueError, "bad shape or strides");
        return 0;
    }
    return 1;
}

static PyObject *right(PyObject *self, PyObject *args) {
    fold_args a;
    if (!parse(args, &a))
        return NULL;
    if (a.cols % 8) {
        PyErr_SetString(PyExc_ValueError, "columns must be a multiple of 8");
        return NULL;
    }
    double *tile = malloc(sizeof(double) * 8 * (size_t)(a.cols + 8)); /* up to 8 rows in float64 */
    if (!tile)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    switch (a.level) {
#ifdef HAVE_X86_KERNELS
    case WITH_AVX512:
        right_avx512((void *)a.src, a.src_kind, a.src_stride, (void *)a.dst, a.dst_kind, a.dst_stride, a.rows,
                     a.cols, (const double *)a.blocks, tile);
        break;
    case WITH_AVX2:
        right_avx2((void *)a.src, a.src_kind, a.src_stride, (void *)a.dst, a.dst_kind, a.dst_stride, a.rows, a.cols,
                   (const double *)a.blocks, tile);
        break;
#endif
    default:
        right_scalar((void *)a.src, a.src_kind, a.src_stride, (void *)a.dst, a.dst_kind, a.dst_stride, a.rows,
                     a.cols, (const double *)a.blocks, tile);
    }
    Py_END_ALLOW_THREADS
    free(tile);
    Py_RETURN_NONE;
}

static PyObject *left(PyObject *self, PyObject *args) {
    fold_args a;
    if (!parse(args, &a))
        return NULL;
    if (a.rows % 8) {
        PyErr_SetString(PyExc_ValueError, "rows must be a multiple of 8");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t first = 0; first < a.rows; first += 8) {
        const double *m = (const double *)a.blocks + 8 * first;
        switch (a.level) {
#ifdef HAVE_X86_KERNELS
        case WITH_AVX512:
            left_block_avx512((void *)a.src, a.src_kind, a.src_stride, (void *)a.dst, a.dst_kind, a.dst_stride,
                              first, a.cols, m);
            break;
        case WITH_AVX2:
            left_block_avx2((void *)a.src, a.src_kind, a.src_stride, (void *)a.dst, a.dst_kind, a.dst_stride, first,
                            a.cols, m);
            break;
#endif
        default:
            left_block_scalar((void *)a.src, a.src_kind, a.src_stride, (void *)a.dst, a.dst_kind, a.dst_stride,
                              first, a.cols, m);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *level(PyObject *self, PyObject *unused) {
    return PyLong_FromLong(best_level());
}

static PyMethodDef methods[] = {
    {"right", right, METH_VARARGS,
     "right(src, src_kind, src_stride, dst, dst_kind, dst_stride, rows, cols, blocks, level=2): dst <- src M"},
    {"left", left, METH_VARARGS,
     "left(src, src_kind, src_stride, dst, dst_kind, dst_stride, rows, cols, blocks, level=2): dst <- M src"},
    {"level", level, METH_NOARGS, "The best kernels this CPU runs: 0 scalar, 1 AVX2 with FMA, 2 AVX-512."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockfold", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blockfold(void) { return PyModule_Create(&module); }
