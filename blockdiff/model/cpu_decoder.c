/* The decoder layers of a model whose products all run on blockdiff's kernels (w4a8, or bf16 on
 * AMX tiles) as one call: the kernels of cpu_kernels.c, cpu_w4a8.c and cpu_bf16.c chained in C,
 * in the order and with the roundings of the model's Python forward (model/transformer.py's
 * DecoderLayer), so that a forward no longer returns to Python eight times a layer. Without a
 * draft adapter its results are those of the layer-by-layer path bit for bit: the same kernels
 * on the same inputs, and each residual sum rounded to the dtype as PyTorch's addition rounds
 * it. An adapter's products are summed here in another order than ATen's (the same to rounding).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

void bd_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t dim, float eps, int dtype);
void bd_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t dim, int dtype);
void bd_rope_store(const void *qkv, const void *cos, const void *sin, void *q_out, void *k_cache, void *v_cache,
                   const int64_t *starts, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                   int64_t batch_stride, int64_t head_stride, int dtype);
void bd_attention(const void *q, const void *k_cache, const void *v_cache, const uint8_t *visible, void *out,
                  int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t span,
                  int64_t batch_stride, int64_t head_stride, float scale, int dtype);
void bd_rows_linear(const void *x, const void *w, void *out, int64_t rows, int64_t in, int64_t outs, int dtype);
void bd_w4a8_linear(const void *x, const uint8_t *codes, const uint16_t *d, const uint16_t *m, void *out,
                    int64_t rows, int64_t in, int64_t outs, int dtype);
void bd_bf16_linear(const uint16_t *x, const uint16_t *weights, uint16_t *out, int64_t rows, int64_t in,
                    int64_t outs);

/* one packed product: w4a8 (kind 0, model/quantize.py's W4A8Weight) or bf16 tiles (kind 1,
 * model/cpu_kernels.py's Bf16TileWeight) */
typedef struct {
    const uint8_t *codes;
    const uint16_t *steps, *minimums;
    const uint16_t *tiles;
    int64_t kind;
} bd_product;

static void multiply(const bd_product *p, const void *x, void *out, int64_t rows, int64_t in, int64_t outs, int dtype) {
    if (p->kind == 1) bd_bf16_linear(x, p->tiles, out, rows, in, outs);
    else bd_w4a8_linear(x, p->codes, p->steps, p->minimums, out, rows, in, outs, dtype);
}

/* a LoRA adapter on (part of) one of a layer's products: A (rank, in), B (width, rank) in the
 * dtype, adding to the product's output columns column .. column + width - 1; in a bf16 model on
 * a CPU with AMX also A and B in cpu_bf16.c's tile layout (else NULL) */
typedef struct {
    const void *A, *B;
    const uint16_t *A_tiles, *B_tiles;
    int64_t product;  /* 0 qkv, 1 o, 2 gate_up, 3 down */
    int64_t rank, column, width;
    float scale;
} bd_lora;

/* A LoRA adapter's delta added into a product's output, for the rows whose gate is nonzero:
 * out[r][column + j] = round(out + round(round(B[j] . round(A . x[r])) * round(scale * gate[r]))),
 * rounding to the dtype where PyTorch's y + F.linear(F.linear(x, A), B) * (scale * gate) rounds.
 * The two products run on the tile unit where the adapter has tiles, else in `dot`'s order.
 * x: (rows, in); out: rows `outs` elements apart; gate: (rows,) float32. */
static void lora_add(const bd_lora *lora, const float *gate, const void *x, void *out, int64_t rows, int64_t in,
                     int64_t outs, int dtype) {
    const int64_t element = dtype ? 2 : 4;
    int64_t gated = 0, *which = malloc(rows * sizeof(int64_t));
    for (int64_t r = 0; r < rows; r++)
        if (gate[r] != 0.0f) which[gated++] = r;
    char *inputs = malloc(gated * in * element), *inner = malloc(gated * lora->rank * element);
    char *delta = malloc(gated * lora->width * element);
    for (int64_t i = 0; i < gated; i++) memcpy(inputs + i * in * element, (const char *)x + which[i] * in * element, in * element);
    if (gated && lora->A_tiles && dtype == 1) {
        bd_bf16_linear((uint16_t *)inputs, lora->A_tiles, (uint16_t *)inner, gated, in, lora->rank);
        bd_bf16_linear((uint16_t *)inner, lora->B_tiles, (uint16_t *)delta, gated, lora->rank, lora->width);
    } else if (gated) {
        bd_rows_linear(inputs, lora->A, inner, gated, in, lora->rank, dtype);
        bd_rows_linear(inner, lora->B, delta, gated, lora->rank, lora->width, dtype);
    }
    for (int64_t i = 0; i < gated; i++) {
        const float scaled_gate = rounded(lora->scale * gate[which[i]], dtype);
        for (int64_t j = 0; j < lora->width; j++) {
            const int64_t at = which[i] * outs + lora->column + j;
            store(out, at, load(out, at, dtype) + rounded(load(delta, i * lora->width + j, dtype) * scaled_gate, dtype), dtype);
        }
    }
    free(which); free(inputs); free(inner); free(delta);
}

/* one layer's weights; the products' shapes follow from the dimensions passed to the stack */
typedef struct {
    const void *input_norm, *post_attention_norm;  /* (hidden,) in the dtype */
    bd_product qkv, o, gate_up, down;
    const bd_lora *loras;
    int64_t num_loras;
} bd_layer;

/* the adapters on product `product` of a layer, for the gated rows (gate NULL: none are) */
static void adapt(const bd_layer *layer, int64_t product, const float *gate, const void *x, void *out,
                  int64_t rows, int64_t in, int64_t outs, int dtype) {
    if (!gate) return;
    for (int64_t i = 0; i < layer->num_loras; i++) {
        const bd_lora *lora = layer->loras + i;
        if (lora->product == product) lora_add(lora, gate, x, out, rows, in, outs, dtype);
    }
}

/* x += y, rounded to the dtype */
static void add_into(void *x, const void *y, int64_t n, int dtype) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) store16(x, i, _mm512_add_ps(load16(x, i, dtype), load16(y, i, dtype)), dtype);
#endif
    for (; i < n; i++) store(x, i, load(x, i, dtype) + load(y, i, dtype), dtype);
}

static void *scratch(int64_t elements, int dtype) { return malloc(elements * (dtype ? 2 : 4)); }

/* x: (B, T, hidden), the residual stream, updated in place through `layers` layers; gate:
 * (B, T) float32, the rows that run the layers' adapters (a draft pass), or NULL.
 * k_cache, v_cache: layer 0's (B, Hkv, capacity, D) caches, the next layer's `layer_stride`
 * elements on; cos, sin, starts, visible, span: as bd_rope_store and bd_attention take them. */
void bd_decoder_stack(void *x, const bd_layer *layers, int64_t num_layers, void *k_cache, void *v_cache,
                      int64_t layer_stride, int64_t batch_stride, int64_t head_stride, const void *cos,
                      const void *sin, const int64_t *starts, const uint8_t *visible, int64_t span, int64_t B,
                      int64_t T, int64_t hidden, int64_t H, int64_t Hkv, int64_t D, int64_t intermediate,
                      float eps, float attention_scale, const float *gate, int dtype) {
    const int64_t rows = B * T, element = dtype ? 2 : 4;
    void *normed = scratch(rows * hidden, dtype), *qkv = scratch(rows * (H + 2 * Hkv) * D, dtype);
    void *q = scratch(rows * H * D, dtype), *attended = scratch(rows * H * D, dtype);
    void *update = scratch(rows * hidden, dtype), *gate_up = scratch(rows * 2 * intermediate, dtype);
    void *activated = scratch(rows * intermediate, dtype);
    for (int64_t i = 0; i < num_layers; i++) {
        const bd_layer *layer = layers + i;
        char *k = (char *)k_cache + i * layer_stride * element, *v = (char *)v_cache + i * layer_stride * element;
        bd_rms_norm(x, layer->input_norm, normed, rows, hidden, eps, dtype);
        multiply(&layer->qkv, normed, qkv, rows, hidden, (H + 2 * Hkv) * D, dtype);
        adapt(layer, 0, gate, normed, qkv, rows, hidden, (H + 2 * Hkv) * D, dtype);
        bd_rope_store(qkv, cos, sin, q, k, v, starts, B, T, H, Hkv, D, batch_stride, head_stride, dtype);
        bd_attention(q, k, v, visible, attended, B, T, H, Hkv, D, span, batch_stride, head_stride, attention_scale,
                     dtype);
        multiply(&layer->o, attended, update, rows, H * D, hidden, dtype);
        adapt(layer, 1, gate, attended, update, rows, H * D, hidden, dtype);
        add_into(x, update, rows * hidden, dtype);
        bd_rms_norm(x, layer->post_attention_norm, normed, rows, hidden, eps, dtype);
        multiply(&layer->gate_up, normed, gate_up, rows, hidden, 2 * intermediate, dtype);
        adapt(layer, 2, gate, normed, gate_up, rows, hidden, 2 * intermediate, dtype);
        bd_silu_mul(gate_up, activated, rows, intermediate, dtype);
        multiply(&layer->down, activated, update, rows, intermediate, hidden, dtype);
        adapt(layer, 3, gate, activated, update, rows, intermediate, hidden, dtype);
        add_into(x, update, rows * hidden, dtype);
    }
    free(normed); free(qkv); free(q); free(attended); free(update); free(gate_up); free(activated);
}
