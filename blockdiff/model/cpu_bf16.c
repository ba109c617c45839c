/* bf16 products on the AMX tile unit, for bf16 models on CPUs that have it: the layers' and the
 * output head's (bd_bf16_linear) and attention's (bd_bf16_tile_attention, cpu_kernels.c's
 * bd_attention hands its work items to it).
 *
 * out (rows, outs) = x (rows, in) . W^T with W packed (model/cpu_kernels.py, pack_bf16_tiles)
 * as, for each tile of 16 outputs and each block of 32 inputs, 16 input pairs x 16 outputs x 2
 * bf16: the layout tdpbf16ps reads. Each output tile's sums accumulate in one tile register over
 * the input blocks in order (three output tiles at a time), for up to 16 rows at a time; the
 * unit computes each row of a product on its own, so a row's result does not depend on the rows
 * beside it.
 */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#define BF16_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define BF16_AMX 0
#endif

#define TILE 16        /* outputs per tile, rows per block */
#define BLOCK 32       /* inputs per tile product */
#define BLOCK_BYTES 1024
#ifndef BF16_PREFETCH
#define BF16_PREFETCH 4  /* blocks ahead */
#endif

#if BF16_AMX
static int amx_permitted(void) {
    static int permitted = -1;
    if (permitted < 0)
        permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return permitted;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* tiles 0, 3 and 5: OUT_TILES output tiles' sums (rows x 16 float32); tile 1: inputs (rows x 32
 * bf16); tiles 2, 4 and 6: their weights (16 input pairs x 16 outputs x 2 bf16). Independent
 * sums let one tile product start before another's result is back. */
#define OUT_TILES 3
static void configure_tiles(int rows) {
    tile_config config = {0};
    config.palette = 1;
    const int sums[OUT_TILES] = {0, 3, 5}, weights[OUT_TILES] = {2, 4, 6};
    for (int k = 0; k < OUT_TILES; k++) {
        config.rows[sums[k]] = rows, config.bytes_per_row[sums[k]] = TILE * 4;
        config.rows[weights[k]] = BLOCK / 2, config.bytes_per_row[weights[k]] = TILE * 4;
    }
    config.rows[1] = rows, config.bytes_per_row[1] = BLOCK * 2;
    _tile_loadconfig(&config);
}

/* rows -> bf16 outputs of one output tile, from its float32 sums */
static void store_tile(const float *sums, uint16_t *out, int n, int64_t outs) {
    for (int r = 0; r < n; r++)
        _mm256_storeu_si256((__m256i *)(out + r * outs), bf16_bits16(_mm512_load_ps(sums + r * TILE)));
}
#endif


int bd_bf16_amx(void) {
#if BF16_AMX
    return amx_permitted();
#else
    return 0;
#endif
}

#if BF16_AMX
/* r[i][j] -> r[j][i] for sixteen rows of sixteen 32-bit elements */
static void transpose16(__m512i r[16]) {
    __m512i u[16];
    for (int g = 0; g < 16; g += 4) {  /* u[g + c]: column c, c + 4, c + 8, c + 12 of rows g..g+3, a 128-bit lane each */
        const __m512i t0 = _mm512_unpacklo_epi32(r[g], r[g + 1]), t1 = _mm512_unpackhi_epi32(r[g], r[g + 1]);
        const __m512i t2 = _mm512_unpacklo_epi32(r[g + 2], r[g + 3]), t3 = _mm512_unpackhi_epi32(r[g + 2], r[g + 3]);
        u[g] = _mm512_unpacklo_epi64(t0, t2), u[g + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[g + 2] = _mm512_unpacklo_epi64(t1, t3), u[g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i even_low = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), odd_low = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
        const __m512i even_high = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i odd_high = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
        r[c] = _mm512_shuffle_i32x4(even_low, even_high, 0x88), r[c + 8] = _mm512_shuffle_i32x4(even_low, even_high, 0xdd);
        r[c + 4] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88), r[c + 12] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xdd);
    }
}

/* tiles 0, 3 and 5 = the sums of `count` (1 to 3) output tiles over `blocks` tile products:
 * block b's first operand at a + b * a_step (rows a_stride bytes apart), output tile k's second
 * operand at b_tiles + (k * tile_step + b * block_step) * 512; with `prefetch`, the second
 * operands BF16_PREFETCH blocks ahead are asked for (weights streamed from memory) */
static void three_tiles(const uint16_t *a, int64_t a_step, int64_t a_stride, const uint16_t *b_tiles,
                        int64_t tile_step, int64_t block_step, int64_t blocks, int count, int prefetch) {
    _tile_zero(0);
    _tile_zero(3);
    _tile_zero(5);
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t *second = b_tiles + b * block_step * 512;
        if (BF16_PREFETCH && prefetch)
            for (int k = 0; k < count; k++)
                for (int line = 0; line < BLOCK_BYTES; line += 64)
                    _mm_prefetch((const char *)(second + (k * tile_step + BF16_PREFETCH * block_step) * 512) + line,
                                 _MM_HINT_T0);
        _tile_loadd(1, a + b * a_step, a_stride);
        _tile_loadd(2, second, TILE * 4);
        _tile_dpbf16ps(0, 1, 2);
        if (count > 1) {
            _tile_loadd(4, second + tile_step * 512, TILE * 4);
            _tile_dpbf16ps(3, 1, 4);
        }
        if (count > 2) {
            _tile_loadd(6, second + 2 * tile_step * 512, TILE * 4);
            _tile_dpbf16ps(5, 1, 6);
        }
    }
}

/* three_tiles' sums to float32 rows `width` elements apart, output tile k from column 16 k on */
static void store_three_tiles(float *out, int64_t width, int count) {
    _tile_stored(0, out, width * 4);
    if (count > 1) _tile_stored(3, out + TILE, width * 4);
    if (count > 2) _tile_stored(5, out + 2 * TILE, width * 4);
}

/* keys as tdpbf16ps' second operand: per 16 keys and 32 dimensions, 16 dimension pairs x 16
 * keys x 2 (a transpose of the keys' dimension pairs); zeros past the last key */
static void pack_keys(const uint16_t *k_head, const int64_t *slots, int64_t keys, int64_t D, uint16_t *k_tiles) {
    for (int64_t first = 0; first < keys; first += TILE)
        for (int64_t d = 0; d < D; d += BLOCK) {
            __m512i r[16];
            for (int64_t j = 0; j < TILE; j++)
                r[j] = first + j < keys ? _mm512_loadu_si512(k_head + slots[first + j] * D + d) : _mm512_setzero_si512();
            transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_si512(k_tiles + p * 32, r[p]);
            k_tiles += 512;
        }
}

/* values as tdpbf16ps' second operand: per 32 keys and 16 dimensions, 16 key pairs x 16
 * dimensions x 2 (two keys' values interleaved); zeros past the last key */
static void pack_values(const uint16_t *v_head, const int64_t *slots, int64_t keys, int64_t D, uint16_t *v_tiles) {
    for (int64_t first = 0; first < keys; first += BLOCK)
        for (int64_t d = 0; d < D; d += TILE)
            for (int64_t pair = 0; pair < BLOCK / 2; pair++, v_tiles += 32) {
                const int64_t a = first + 2 * pair, b = a + 1;
                const __m512i even = a < keys ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v_head + slots[a] * D + d)))
                                              : _mm512_setzero_si512();
                const __m512i odd = b < keys ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v_head + slots[b] * D + d)))
                                             : _mm512_setzero_si512();
                _mm512_store_si512(v_tiles, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
            }
}
#endif

/* Attention of `rows` query rows over `keys` keys of one cache head, on the tile unit.
 * queries: (rows, D) bf16; k_head, v_head: the head's keys and values, slot s at s * D; slots:
 * the keys' slots in order; seen[r]: how many of them row r sees, a prefix; out: (rows, D) float32.
 * Scores are query . key on the unit, times `scale`; their exponentials less the row's maximum
 * (cpu_kernels.c's, over the seen scores) are rounded to bf16 for the unit's product with the
 * values, zero past row r's prefix, and the product is divided by the exponentials' sum. So row
 * r's result depends on its query and its seen keys alone: the unit computes each output element
 * from one row and one column, and the keys past a row's prefix add exact zeros (their values
 * finite). D: a multiple of 32. */
float bd_shifted_exp(float *row, int64_t n);

void bd_bf16_tile_attention(const uint16_t *queries, int64_t rows, const int64_t *seen, const uint16_t *k_head,
                            const uint16_t *v_head, const int64_t *slots, int64_t keys, int64_t D, float scale,
                            float *out) {
#if BF16_AMX
    if (!amx_permitted()) abort();
    const int64_t key_tiles = (keys + TILE - 1) / TILE, key_blocks = (keys + BLOCK - 1) / BLOCK;
    const int64_t d_blocks = D / BLOCK, d_tiles = D / TILE;
    const int64_t score_width = key_tiles * TILE, prob_width = key_blocks * BLOCK;
    uint16_t *k_tiles = aligned_alloc(64, key_tiles * d_blocks * BLOCK_BYTES);
    uint16_t *v_tiles = aligned_alloc(64, key_blocks * d_tiles * BLOCK_BYTES);
    pack_keys(k_head, slots, keys, D, k_tiles);
    pack_values(v_head, slots, keys, D, v_tiles);
    float *scores = malloc(rows * score_width * sizeof(float));
    uint16_t *probs = calloc(rows * prob_width, 2);
    int configured = 0;
    for (int64_t first = 0; first < rows; first += TILE) {
        const int n = rows - first < TILE ? (int)(rows - first) : TILE;
        if (configured != n) configure_tiles(configured = n);
        for (int64_t t = 0; t < key_tiles; t += OUT_TILES) {  /* scores, three key tiles a pass */
            const int count = key_tiles - t < OUT_TILES ? (int)(key_tiles - t) : OUT_TILES;
            three_tiles(queries + first * D, BLOCK, D * 2, k_tiles + t * d_blocks * 512, d_blocks, 1, d_blocks, count, 0);
            store_three_tiles(scores + first * score_width + t * TILE, score_width, count);
        }
        float sums[TILE];
        for (int64_t r = first; r < first + n; r++) {  /* a row that sees no key: weights 0, result 0 */
            float *row = scores + r * score_width;
            uint16_t *weights = probs + r * prob_width;
            int64_t j = 0;
            for (; j < seen[r]; j++) row[j] *= scale;
            sums[r - first] = bd_shifted_exp(row, seen[r]);
            for (j = 0; j + 16 <= seen[r]; j += 16) _mm256_storeu_si256((__m256i *)(weights + j), bf16_bits16(_mm512_loadu_ps(row + j)));
            for (; j < seen[r]; j++) weights[j] = float_to_bf16(row[j]);
        }
        for (int64_t t = 0; t < d_tiles; t += OUT_TILES) {  /* probabilities . values, three dimension tiles a pass */
            const int count = d_tiles - t < OUT_TILES ? (int)(d_tiles - t) : OUT_TILES;
            three_tiles(probs + first * prob_width, BLOCK, prob_width * 2, v_tiles + t * 512, 1, d_tiles, key_blocks, count, 0);
            store_three_tiles(out + first * D + t * TILE, D, count);
        }
        for (int64_t r = first; r < first + n; r++)
            if (seen[r])
                for (int64_t d = 0; d < D; d++) out[r * D + d] /= sums[r - first];
    }
    if (configured) _tile_release();
    free(k_tiles); free(v_tiles); free(scores); free(probs);
#else
    (void)queries, (void)rows, (void)seen, (void)k_head, (void)v_head, (void)slots, (void)keys, (void)D, (void)scale,
        (void)out;
    abort();  /* callers ask bd_bf16_amx() first */
#endif
}

/* x: (rows, in) bf16 -> out: (rows, outs) bf16; in a multiple of 32, outs of 16 */
void bd_bf16_linear(const uint16_t *x, const uint16_t *weights, uint16_t *out, int64_t rows, int64_t in,
                    int64_t outs) {
#if BF16_AMX
    if (!amx_permitted()) abort();  /* callers ask bd_bf16_amx() first; this asks Linux for the tiles too */
    const int64_t blocks = in / BLOCK, tiles = outs / TILE;
    const int parallel = tiles > 1 && rows * in * outs >= (1 << 16);
#pragma omp parallel if (parallel)
    {
        int configured = 0;
        float sums[TILE * TILE] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t group = 0; group < (tiles + OUT_TILES - 1) / OUT_TILES; group++) {
            const int64_t t = OUT_TILES * group;
            const int count = tiles - t < OUT_TILES ? (int)(tiles - t) : OUT_TILES;
            const uint16_t *w = weights + t * blocks * 512;
            for (int64_t first = 0; first < rows; first += TILE) {
                const int n = rows - first < TILE ? (int)(rows - first) : TILE;
                if (configured != n) configure_tiles(configured = n);
                /* later row blocks find the weights in cache */
                three_tiles(x + first * in, BLOCK, in * 2, w, blocks, 1, blocks, count, first == 0);
                uint16_t *o = out + first * outs + t * TILE;
                _tile_stored(0, sums, TILE * 4);
                store_tile(sums, o, n, outs);
                if (count > 1) {
                    _tile_stored(3, sums, TILE * 4);
                    store_tile(sums, o + TILE, n, outs);
                }
                if (count > 2) {
                    _tile_stored(5, sums, TILE * 4);
                    store_tile(sums, o + 2 * TILE, n, outs);
                }
            }
        }
        if (configured) _tile_release();
    }
#else
    (void)x, (void)weights, (void)out, (void)rows, (void)in, (void)outs;
    abort();  /* callers ask bd_bf16_amx() first */
#endif
}
