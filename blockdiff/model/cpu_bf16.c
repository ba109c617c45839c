/* bf16 products on the AMX tile unit, for bf16 models on CPUs that have it.
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

/* float_to_bf16 on sixteen lanes, NaN included */
static inline __m256i bf16_bits16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(bits);
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
            const uint8_t *w = (const uint8_t *)weights + t * blocks * BLOCK_BYTES;
            for (int64_t first = 0; first < rows; first += TILE) {
                const int n = rows - first < TILE ? (int)(rows - first) : TILE;
                if (configured != n) configure_tiles(configured = n);
                _tile_zero(0);
                _tile_zero(3);
                _tile_zero(5);
                for (int64_t b = 0; b < blocks; b++) {
                    if (BF16_PREFETCH && first == 0)  /* later row blocks find the weights in cache */
                        for (int k = 0; k < count; k++)
                            for (int line = 0; line < BLOCK_BYTES; line += 64)
                                _mm_prefetch((const char *)w + (k * blocks + b + BF16_PREFETCH) * BLOCK_BYTES + line,
                                             _MM_HINT_T0);
                    _tile_loadd(1, x + first * in + b * BLOCK, in * 2);
                    _tile_loadd(2, w + b * BLOCK_BYTES, TILE * 4);
                    _tile_dpbf16ps(0, 1, 2);
                    if (count > 1) {
                        _tile_loadd(4, w + (blocks + b) * BLOCK_BYTES, TILE * 4);
                        _tile_dpbf16ps(3, 1, 4);
                    }
                    if (count > 2) {
                        _tile_loadd(6, w + (2 * blocks + b) * BLOCK_BYTES, TILE * 4);
                        _tile_dpbf16ps(5, 1, 6);
                    }
                }
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
