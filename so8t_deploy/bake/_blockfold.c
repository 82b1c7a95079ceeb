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
 * block row is one register), AVX2 with FMA (4 lanes), and scalar C. All three do the same operations in
 * the same order, so they write the same bits. torch's bmm of [rows, 8] x [8, 8] runs at about 1 GB/s per
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
#define AVX2 __attribute__((target("avx2,fma")))

/* 4 weights from `p` (float32 or bfloat16), widened to float64. */
static inline AVX2 __m256d load4(const void *p, int kind) {
    if (kind == F32)
        return _mm256_cvtps_pd(_mm_loadu_ps((const float *)p));
    __m128i halves = _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(halves, 16)));
}

/* 8 sums (lo: the first 4) rounded to float32, and to bfloat16 (nearest even, NaN as torch writes it) when dst
 * is one. */
static inline AVX2 void store8(void *p, int kind, __m256d lo, __m256d hi) {
    __m256 values = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
    if (kind == F32) {
        _mm256_storeu_ps((float *)p, values);
        return;
    }
    __m256i bits = _mm256_castps_si256(values);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

static inline AVX2 const char *at(const void *base, int kind, Py_ssize_t i) {
    return (const char *)base + i * (kind == F32 ? 4 : 2);
}

/* N rows of a block column: row k of the block, loaded once, serves all N rows. N is a constant at each
 * call, so the loops unroll and the 2N sums stay in registers. */
static inline __attribute__((always_inline)) AVX2 void right_rows(const double *x, Py_ssize_t cols, const double *m,
                                                                  char *out, Py_ssize_t out_stride, int dst_kind,
                                                                  const int N) {
    __m256d lo[4], hi[4];
    __m256d m_lo = _mm256_loadu_pd(m), m_hi = _mm256_loadu_pd(m + 4);
    for (int r = 0; r < N; r++) {
        __m256d xr = _mm256_broadcast_sd(x + r * cols);
        lo[r] = _mm256_mul_pd(xr, m_lo);
        hi[r] = _mm256_mul_pd(xr, m_hi);
    }
    for (int k = 1; k < 8; k++) {
        m_lo = _mm256_loadu_pd(m + 8 * k);
        m_hi = _mm256_loadu_pd(m + 8 * k + 4);
        for (int r = 0; r < N; r++) {
            __m256d xr = _mm256_broadcast_sd(x + r * cols + k);
            lo[r] = _mm256_fmadd_pd(xr, m_lo, lo[r]);
            hi[r] = _mm256_fmadd_pd(xr, m_hi, hi[r]);
        }
    }
    for (int r = 0; r < N; r++)
        store8((char *)at(out, dst_kind, r * out_stride), dst_kind, lo[r], hi[r]);
}

/* Rows go 4 at a time through a float64 copy (`tile`, 4 * cols), so each block is read once per 4 rows. */
static inline __attribute__((always_inline)) AVX2 void
right_avx2_kinds(const void *src, const int src_kind, Py_ssize_t src_stride, void *dst, const int dst_kind,
                 Py_ssize_t dst_stride, Py_ssize_t rows, Py_ssize_t cols, const double *blocks, double *tile) {
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += 4) {
        int n = rows - r0 < 4 ? (int)(rows - r0) : 4;
        for (int r = 0; r < n; r++) {
            const char *in = at(src, src_kind, (r0 + r) * src_stride);
            for (Py_ssize_t c = 0; c < cols; c += 4)
                _mm256_storeu_pd(tile + r * cols + c, load4(at(in, src_kind, c), src_kind));
        }
        for (Py_ssize_t b = 0; b < cols / 8; b++) {
            char *out = (char *)at(dst, dst_kind, r0 * dst_stride + 8 * b);
            if (n == 4) {
                right_rows(tile + 8 * b, cols, blocks + 64 * b, out, dst_stride, dst_kind, 4);
                continue;
            }
            for (int r = 0; r < n; r++)
                right_rows(tile + r * cols + 8 * b, cols, blocks + 64 * b, (char *)at(out, dst_kind, r * dst_stride),
                           dst_stride, dst_kind, 1);
        }
    }
}

/* The 8 rows go through a float64 copy a panel of columns at a time (`PANEL` wide, in L1), so each
 * output row is written in one contiguous run, and the 8 entries of a block row are broadcast once per
 * panel. Reading the 8 source rows column by column instead would hit one cache set 16 times when
 * their stride is a multiple of 4 KiB (down_proj's 8192 columns). */
#define PANEL 256

static inline __attribute__((always_inline)) AVX2 void
left_block_avx2_kinds(const void *src, const int src_kind, Py_ssize_t src_stride, void *dst, const int dst_kind,
                      Py_ssize_t dst_stride, Py_ssize_t first, Py_ssize_t cols, const double *m) {
    double tile[8 * PANEL] __attribute__((aligned(32)));
    Py_ssize_t vector_cols = cols - cols % 8;  /* panels of whole 8-column groups; the rest goes scalar */
    for (Py_ssize_t c0 = 0; c0 < vector_cols; c0 += PANEL) {
        Py_ssize_t width = vector_cols - c0 < PANEL ? vector_cols - c0 : PANEL;
        for (int j = 0; j < 8; j++) {
            const char *in = at(src, src_kind, (first + j) * src_stride + c0);
            for (Py_ssize_t c = 0; c < width; c += 4)
                _mm256_store_pd(tile + j * PANEL + c, load4(at(in, src_kind, c), src_kind));
        }
        for (int i = 0; i < 8; i++) {
            __m256d row[8];
            for (int j = 0; j < 8; j++)
                row[j] = _mm256_broadcast_sd(m + 8 * i + j);
            char *out = (char *)at(dst, dst_kind, (first + i) * dst_stride + c0);
            for (Py_ssize_t c = 0; c < width; c += 8) {
                __m256d lo = _mm256_mul_pd(row[0], _mm256_load_pd(tile + c));
                __m256d hi = _mm256_mul_pd(row[0], _mm256_load_pd(tile + c + 4));
                for (int j = 1; j < 8; j++) {
                    lo = _mm256_fmadd_pd(row[j], _mm256_load_pd(tile + j * PANEL + c), lo);
                    hi = _mm256_fmadd_pd(row[j], _mm256_load_pd(tile + j * PANEL + c + 4), hi);
                }
                store8((char *)at(out, dst_kind, c), dst_kind, lo, hi);
            }
        }
    }
    if (vector_cols < cols) {
        /* The last columns, one at a time: shift the pointers so the scalar kernel sees them as columns 0... */
        left_block_scalar(at(src, src_kind, vector_cols), src_kind, src_stride,
                          (char *)at(dst, dst_kind, vector_cols), dst_kind, dst_stride, first, cols - vector_cols, m);
    }
}

/* The kernels above compiled once per pair of dtypes, so no dtype is tested inside their loops. */
#define BY_KINDS(call, src_kind, dst_kind, ...)                                                                      \
    do {                                                                                                             \
        if (src_kind == F32 && dst_kind == F32) call(__VA_ARGS__, F32, F32);                                       \
        else if (src_kind == F32) call(__VA_ARGS__, F32, BF16);                                                     \
        else if (dst_kind == F32) call(__VA_ARGS__, BF16, F32);                                                     \
        else call(__VA_ARGS__, BF16, BF16);                                                                         \
    } while (0)

static AVX2 void right_avx2(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                            Py_ssize_t dst_stride, Py_ssize_t rows, Py_ssize_t cols, const double *blocks,
                            double *tile) {
#define RIGHT(s, ss, d, ds, n, c, m, t, sk, dk) right_avx2_kinds(s, sk, ss, d, dk, ds, n, c, m, t)
    BY_KINDS(RIGHT, src_kind, dst_kind, src, src_stride, dst, dst_stride, rows, cols, blocks, tile);
#undef RIGHT
}

static AVX2 void left_block_avx2(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                                 Py_ssize_t dst_stride, Py_ssize_t first, Py_ssize_t cols, const double *m) {
#define LEFT(s, ss, d, ds, f, c, b, sk, dk) left_block_avx2_kinds(s, sk, ss, d, dk, ds, f, c, b)
    BY_KINDS(LEFT, src_kind, dst_kind, src, src_stride, dst, dst_stride, first, cols, m);
#undef LEFT
}
#endif

#ifdef HAVE_X86_KERNELS
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx2,fma")))
#define TILE_ROWS 8 /* rows of the right fold at a time: 8 sums and a block row in registers (32 of them) */

/* 8 weights from `p` (float32 or bfloat16), widened to float64. */
static inline AVX512 __m512d load8(const void *p, int kind) {
    if (kind == F32)
        return _mm512_cvtps_pd(_mm256_loadu_ps((const float *)p));
    __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(words, 16)));
}

/* 8 sums rounded to float32, and to bfloat16 (nearest even, NaN as torch writes it) when dst is one. */
static inline AVX512 void store8_512(void *p, int kind, __m512d sums) {
    __m256 values = _mm512_cvtpd_ps(sums);
    if (kind == F32) {
        _mm256_storeu_ps((float *)p, values);
        return;
    }
    __m256i bits = _mm256_castps_si256(values);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __mmask8 nan = _mm256_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    rounded = _mm256_mask_mov_epi32(rounded, nan, _mm256_set1_epi32(0x7fc0));
    _mm_storeu_si128((__m128i *)p, _mm256_cvtepi32_epi16(rounded));
}

/* N rows of a block column, as right_rows: block row k is one register, loaded once for all N rows. */
static inline __attribute__((always_inline)) AVX512 void right_rows_512(const double *x, Py_ssize_t cols,
                                                                        const double *m, char *out,
                                                                        Py_ssize_t out_stride, int dst_kind,
                                                                        const int N) {
    __m512d sum[8];
    __m512d row = _mm512_loadu_pd(m);
    for (int r = 0; r < N; r++)
        sum[r] = _mm512_mul_pd(_mm512_set1_pd(x[r * cols]), row);
    for (int k = 1; k < 8; k++) {
        row = _mm512_loadu_pd(m + 8 * k);
        for (int r = 0; r < N; r++)
            sum[r] = _mm512_fmadd_pd(_mm512_set1_pd(x[r * cols + k]), row, sum[r]);
    }
    for (int r = 0; r < N; r++)
        store8_512((char *)at(out, dst_kind, r * out_stride), dst_kind, sum[r]);
}

/* As right_avx2_kinds, 8 rows at a time. */
static inline __attribute__((always_inline)) AVX512 void
right_avx512_kinds(const void *src, const int src_kind, Py_ssize_t src_stride, void *dst, const int dst_kind,
                   Py_ssize_t dst_stride, Py_ssize_t rows, Py_ssize_t cols, const double *blocks, double *tile) {
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        int n = rows - r0 < TILE_ROWS ? (int)(rows - r0) : TILE_ROWS;
        for (int r = 0; r < n; r++) {
            const char *in = at(src, src_kind, (r0 + r) * src_stride);
            for (Py_ssize_t c = 0; c < cols; c += 8)
                _mm512_storeu_pd(tile + r * cols + c, load8(at(in, src_kind, c), src_kind));
        }
        for (Py_ssize_t b = 0; b < cols / 8; b++) {
            char *out = (char *)at(dst, dst_kind, r0 * dst_stride + 8 * b);
            if (n == TILE_ROWS) {
                right_rows_512(tile + 8 * b, cols, blocks + 64 * b, out, dst_stride, dst_kind, TILE_ROWS);
                continue;
            }
            for (int r = 0; r < n; r++)
                right_rows_512(tile + r * cols + 8 * b, cols, blocks + 64 * b,
                               (char *)at(out, dst_kind, r * dst_stride), dst_stride, dst_kind, 1);
        }
    }
}

/* As left_block_avx2_kinds, 8 columns to a register. */
static inline __attribute__((always_inline)) AVX512 void
left_block_avx512_kinds(const void *src, const int src_kind, Py_ssize_t src_stride, void *dst, const int dst_kind,
                        Py_ssize_t dst_stride, Py_ssize_t first, Py_ssize_t cols, const double *m) {
    double tile[8 * PANEL] __attribute__((aligned(64)));
    Py_ssize_t vector_cols = cols - cols % 8;
    for (Py_ssize_t c0 = 0; c0 < vector_cols; c0 += PANEL) {
        Py_ssize_t width = vector_cols - c0 < PANEL ? vector_cols - c0 : PANEL;
        for (int j = 0; j < 8; j++) {
            const char *in = at(src, src_kind, (first + j) * src_stride + c0);
            for (Py_ssize_t c = 0; c < width; c += 8)
                _mm512_store_pd(tile + j * PANEL + c, load8(at(in, src_kind, c), src_kind));
        }
        for (int i = 0; i < 8; i++) {
            __m512d row[8];
            for (int j = 0; j < 8; j++)
                row[j] = _mm512_set1_pd(m[8 * i + j]);
            char *out = (char *)at(dst, dst_kind, (first + i) * dst_stride + c0);
            for (Py_ssize_t c = 0; c < width; c += 8) {
                __m512d sum = _mm512_mul_pd(row[0], _mm512_load_pd(tile + c));
                for (int j = 1; j < 8; j++)
                    sum = _mm512_fmadd_pd(row[j], _mm512_load_pd(tile + j * PANEL + c), sum);
                store8_512((char *)at(out, dst_kind, c), dst_kind, sum);
            }
        }
    }
    if (vector_cols < cols)
        left_block_scalar(at(src, src_kind, vector_cols), src_kind, src_stride,
                          (char *)at(dst, dst_kind, vector_cols), dst_kind, dst_stride, first, cols - vector_cols, m);
}

static AVX512 void right_avx512(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                                Py_ssize_t dst_stride, Py_ssize_t rows, Py_ssize_t cols, const double *blocks,
                                double *tile) {
#define RIGHT(s, ss, d, ds, n, c, m, t, sk, dk) right_avx512_kinds(s, sk, ss, d, dk, ds, n, c, m, t)
    BY_KINDS(RIGHT, src_kind, dst_kind, src, src_stride, dst, dst_stride, rows, cols, blocks, tile);
#undef RIGHT
}

static AVX512 void left_block_avx512(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                                     Py_ssize_t dst_stride, Py_ssize_t first, Py_ssize_t cols, const double *m) {
#define LEFT(s, ss, d, ds, f, c, b, sk, dk) left_block_avx512_kinds(s, sk, ss, d, dk, ds, f, c, b)
    BY_KINDS(LEFT, src_kind, dst_kind, src, src_stride, dst, dst_stride, first, cols, m);
#undef LEFT
}
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
