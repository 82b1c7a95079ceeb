/* The vector kernels of _blockfold.c, written once over 8 float64 lanes and compiled once per instruction set.
 *
 * The file that includes this defines, for one instruction set:
 *   ISA         the suffix of every name defined here (avx2, avx512), and TARGET, its function attribute;
 *   TILE_ROWS   rows of the right fold at a time, as many as keep their sums in registers;
 *   V8, SPLAT   8 float64 lanes, and one float64 in every lane of a register;
 * and these functions, each suffixed with _ISA:
 *   splat(s), loadu(p), storeu(p, v)   one value everywhere; 8 float64 from or to memory;
 *   widen(p, kind), narrow(p, kind, v) 8 weights (float32 or bfloat16) to float64; 8 sums rounded to float32,
 *                                      then to bfloat16 when kind is one, and stored;
 *   times(s, x), times_add(s, x, acc)  s * x; s * x + acc, which rounds once (the product is exact).
 * All builds do the same operations in the same order, so they write the same bits.
 */
#define FN_(name, isa) name##_##isa
#define FN__(name, isa) FN_(name, isa)
#define FN(name) FN__(name, ISA)

/* N rows of a block column: block row k is loaded once and serves all N rows. N is a constant at each call,
 * so the loops unroll and the N sums stay in registers. */
static inline __attribute__((always_inline)) TARGET void FN(right_rows)(const double *x, Py_ssize_t cols,
                                                                         const double *m, char *out,
                                                                         Py_ssize_t out_stride, int dst_kind,
                                                                         const int N) {
    V8 sum[TILE_ROWS];
    V8 row = FN(loadu)(m);
    for (int r = 0; r < N; r++)
        sum[r] = FN(times)(FN(splat)(x[r * cols]), row);
    for (int k = 1; k < 8; k++) {
        row = FN(loadu)(m + 8 * k);
        for (int r = 0; r < N; r++)
            sum[r] = FN(times_add)(FN(splat)(x[r * cols + k]), row, sum[r]);
    }
    for (int r = 0; r < N; r++)
        FN(narrow)((char *)at(out, dst_kind, r * out_stride), dst_kind, sum[r]);
}

/* Rows go TILE_ROWS at a time through a float64 copy (`tile`, TILE_ROWS * cols), so each block is read once per
 * TILE_ROWS rows. */
static inline __attribute__((always_inline)) TARGET void
FN(right_kinds)(const void *src, Py_ssize_t src_stride, void *dst, Py_ssize_t dst_stride, Py_ssize_t rows,
                Py_ssize_t cols, const double *blocks, double *tile, const int src_kind, const int dst_kind) {
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        int n = rows - r0 < TILE_ROWS ? (int)(rows - r0) : TILE_ROWS;
        for (int r = 0; r < n; r++) {
            const char *in = at(src, src_kind, (r0 + r) * src_stride);
            for (Py_ssize_t c = 0; c < cols; c += 8)
                FN(storeu)(tile + r * cols + c, FN(widen)(at(in, src_kind, c), src_kind));
        }
        for (Py_ssize_t b = 0; b < cols / 8; b++) {
            char *out = (char *)at(dst, dst_kind, r0 * dst_stride + 8 * b);
            if (n == TILE_ROWS) {
                FN(right_rows)(tile + 8 * b, cols, blocks + 64 * b, out, dst_stride, dst_kind, TILE_ROWS);
                continue;
            }
            for (int r = 0; r < n; r++)
                FN(right_rows)(tile + r * cols + 8 * b, cols, blocks + 64 * b,
                               (char *)at(out, dst_kind, r * dst_stride), dst_stride, dst_kind, 1);
        }
    }
}

/* The 8 rows go through a float64 copy a panel of columns at a time (PANEL wide, in L1), so each output row is
 * written in one contiguous run, and the 8 entries of a block row are broadcast once per panel. Reading the 8
 * source rows column by column instead would hit one cache set 16 times when their stride is a multiple of
 * 4 KiB (down_proj's 8192 columns). */
static inline __attribute__((always_inline)) TARGET void
FN(left_block_kinds)(const void *src, Py_ssize_t src_stride, void *dst, Py_ssize_t dst_stride, Py_ssize_t first,
                     Py_ssize_t cols, const double *m, const int src_kind, const int dst_kind) {
    double tile[8 * PANEL] __attribute__((aligned(64)));
    Py_ssize_t vector_cols = cols - cols % 8; /* panels of whole 8-column groups; the rest goes scalar */
    for (Py_ssize_t c0 = 0; c0 < vector_cols; c0 += PANEL) {
        Py_ssize_t width = vector_cols - c0 < PANEL ? vector_cols - c0 : PANEL;
        for (int j = 0; j < 8; j++) {
            const char *in = at(src, src_kind, (first + j) * src_stride + c0);
            for (Py_ssize_t c = 0; c < width; c += 8)
                FN(storeu)(tile + j * PANEL + c, FN(widen)(at(in, src_kind, c), src_kind));
        }
        for (int i = 0; i < 8; i++) {
            SPLAT row[8];
            for (int j = 0; j < 8; j++)
                row[j] = FN(splat)(m[8 * i + j]);
            char *out = (char *)at(dst, dst_kind, (first + i) * dst_stride + c0);
            for (Py_ssize_t c = 0; c < width; c += 8) {
                V8 sum = FN(times)(row[0], FN(loadu)(tile + c));
                for (int j = 1; j < 8; j++)
                    sum = FN(times_add)(row[j], FN(loadu)(tile + j * PANEL + c), sum);
                FN(narrow)((char *)at(out, dst_kind, c), dst_kind, sum);
            }
        }
    }
    if (vector_cols < cols) {
        /* The last columns, one at a time: shift the pointers so the scalar kernel sees them as columns 0... */
        left_block_scalar(at(src, src_kind, vector_cols), src_kind, src_stride,
                          (char *)at(dst, dst_kind, vector_cols), dst_kind, dst_stride, first, cols - vector_cols, m);
    }
}

/* The entry points: each runs the kernel compiled for the pair of dtypes at hand. */
static TARGET void FN(right)(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                             Py_ssize_t dst_stride, Py_ssize_t rows, Py_ssize_t cols, const double *blocks,
                             double *tile) {
    BY_KINDS(FN(right_kinds), src_kind, dst_kind, src, src_stride, dst, dst_stride, rows, cols, blocks, tile);
}

static TARGET void FN(left_block)(const void *src, int src_kind, Py_ssize_t src_stride, void *dst, int dst_kind,
                                  Py_ssize_t dst_stride, Py_ssize_t first, Py_ssize_t cols, const double *m) {
    BY_KINDS(FN(left_block_kinds), src_kind, dst_kind, src, src_stride, dst, dst_stride, first, cols, m);
}

#undef FN
#undef FN__
#undef FN_
