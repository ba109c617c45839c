"""The fused CPU kernels (model/cpu_kernels.c) against the ATen ops they replace.

RoPE with the cache write and RMSNorm round exactly where the ATen path rounds, so they must
match it bit for bit; attention sums in another order, so it must match to float32
precision, and each of its rows must not depend on the width, the span, the batch or the
threads (tests/test_width_invariance.py runs the end-to-end streams through it).
"""
import platform
import shutil

import pytest
import torch

from blockdiff.model import cpu_kernels
from blockdiff.model.attention import grouped_attention, key_bias
from blockdiff.model.kv_cache import KVCache, aligned
from blockdiff.model.rope import apply_rotary
from blockdiff.model.transformer import RMSNorm
from support.models import tiny_model

DTYPES = [torch.float32, torch.bfloat16]
BUILDABLE = platform.machine() == "x86_64" and shutil.which("cc") is not None

pytestmark = pytest.mark.skipif(not BUILDABLE, reason="the kernels are built for x86-64 with a C compiler")


def test_the_kernels_build_and_take_over_cpu_inference():
    assert cpu_kernels.available()
    x = torch.zeros(2, 3)
    with torch.inference_mode():
        assert cpu_kernels.applies(x) and cpu_kernels.applies(x.bfloat16())
        assert not cpu_kernels.applies(x.double())
    assert not cpu_kernels.applies(x)  # gradients on: training's autograd ops


def causal_visibility(B: int, cached: int, width: int, span: int) -> torch.Tensor:
    """(B, T, span): query t sees the cache and the new tokens up to itself."""
    visible = torch.zeros(B, width, span, dtype=torch.bool)
    for t in range(width):
        visible[:, t, :cached + t + 1] = True
    return visible


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: the portable path, past the vector code's widths
@torch.inference_mode()
def test_attention_matches_aten_and_its_rows_do_not_depend_on_width_span_or_threads(dtype, head_dim):
    torch.manual_seed(0)
    B, H, Hkv, D = 2, 9, 3, head_dim
    k = (torch.randn(B, Hkv, 640, D) * 3).to(dtype)  # scaled up: peaked softmaxes, as in a real model
    v = torch.randn(B, Hkv, 640, D).to(dtype)
    threads = torch.get_num_threads()
    for cached in (3, 60, 300, 500):
        for width in (1, 4, 33):
            q = (torch.randn(B, width, H, D) * 3).to(dtype)
            span = aligned(cached + width)
            visible = causal_visibility(B, cached, width, span)
            wide = cpu_kernels.attention(q, k, v, span, visible)  # (B, T, H*D)
            reference = grouped_attention(q, k[:, :, :span], v[:, :, :span], key_bias(visible[:, None]))
            torch.testing.assert_close(wide.float(), reference.float(), atol=2e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
            for t in range(width):
                own = cached + t + 1  # the query alone, over exactly the keys it sees
                assert torch.equal(wide[:, t:t + 1], cpu_kernels.attention(q[:, t:t + 1], k, v, own, None))
                assert torch.equal(wide[1:, t:t + 1], cpu_kernels.attention(q[1:, t:t + 1], k[1:], v[1:], own, None))
            torch.set_num_threads(1)
            try:
                assert torch.equal(wide, cpu_kernels.attention(q, k, v, span, visible))
            finally:
                torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_attention_skips_unseen_keys_and_gives_a_query_that_sees_none_zeros(dtype):
    """Holes in what a query sees (quad_spec's fused pass has them): the query's result is the
    one it gets over its own keys alone, and a query that sees nothing gets zeros."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 4, 64).to(dtype), torch.randn(1, 2, 64, 64).to(dtype),
               torch.randn(1, 2, 64, 64).to(dtype))
    visible = torch.zeros(1, 3, 64, dtype=torch.bool)
    visible[0, 0, ::3] = True
    visible[0, 1, 10:20] = True
    out = cpu_kernels.attention(q, k, v, 64, visible)
    poisoned = k.clone()
    poisoned[:, :, 1::3] = float("nan")  # keys query 0 does not see
    assert torch.equal(cpu_kernels.attention(q[:, :1], poisoned, v, 64, visible[:, :1]), out[:, :1])
    compacted = slice(0, None, 3)
    alone = cpu_kernels.attention(q[:, :1], k[:, :, compacted].contiguous(), v[:, :, compacted].contiguous(), 22, None)
    assert torch.equal(alone, out[:, :1])
    reference = grouped_attention(q[:, :2], k, v, key_bias(visible[:, None, :2]))
    torch.testing.assert_close(out[:, :2], reference.to(dtype), atol=2e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
    assert torch.equal(out[0, 2], torch.zeros(4 * 64, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_rope_and_the_cache_write_equal_the_aten_ops(dtype):
    """Rotated queries and keys bit for bit as apply_rotary computes them, each row's tokens at
    its own slots, values copied, every other slot untouched."""
    torch.manual_seed(0)
    B, T, H, Hkv, D, capacity = 2, 5, 6, 2, 32, 64
    qkv = torch.randn(B, T, H + 2 * Hkv, D).to(dtype)
    angles = torch.randn(B, T, 1, D // 2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)  # (B, T, 1, D)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1).to(dtype)
    starts = torch.tensor([3, 40])
    k_cache, v_cache = torch.randn(2, B, Hkv, capacity, D).to(dtype).unbind(0)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = cpu_kernels.rope_store(qkv, cos, sin, H, k_cache, v_cache, starts)
    rotated = apply_rotary(qkv[:, :, :H + Hkv], cos, sin)  # (B, T, H+Hkv, D)
    assert torch.equal(q, rotated[:, :, :H])
    for b, start in enumerate(starts.tolist()):
        slots = slice(start, start + T)
        assert torch.equal(k_cache[b, :, slots], rotated[b, :, H:].transpose(0, 1))
        assert torch.equal(v_cache[b, :, slots], qkv[b, :, H + Hkv:].transpose(0, 1))
        k_before[b, :, slots], v_before[b, :, slots] = k_cache[b, :, slots], v_cache[b, :, slots]
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_rms_norm_equals_the_aten_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576)
    norm = norm.to(dtype)
    x = (torch.randn(7, 576) * 4).to(dtype)
    fused = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
    if dtype == torch.float32:
        aten = torch.nn.functional.rms_norm(x, (576,), norm.weight, norm.eps)
        torch.testing.assert_close(fused, aten, atol=1e-6, rtol=1e-6)  # the mean of squares sums in another order
    else:
        aten = norm.weight * torch.nn.functional.rms_norm(x.float(), (576,), eps=norm.eps).to(dtype)
        assert torch.equal(fused, aten)
    assert torch.equal(cpu_kernels.rms_norm(x[3:4], norm.weight, norm.eps), fused[3:4])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_silu_mul_matches_the_aten_ops(dtype):
    """silu(gate) * up of a fused gate/up product; exp is the kernels' own, so a bf16 result may
    round the other way where silu lands on a rounding boundary."""
    torch.manual_seed(0)
    gate_up = (torch.randn(5, 2 * 1540) * 6).to(dtype)  # 1540: vector lanes and a scalar tail
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's overflow and underflow ends
    fused = cpu_kernels.silu_mul(gate_up)
    g, u = gate_up.chunk(2, dim=-1)
    aten = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(fused, aten, atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 8e-3)
    assert torch.equal(cpu_kernels.silu_mul(gate_up[2:3]), fused[2:3])


@torch.inference_mode()
def test_the_vector_code_computes_what_the_portable_code_computes(monkeypatch):
    """A CPU without AVX2 runs the portable C; this machine's build, its vector code. Each
    computes the same operations in the same order, so the two agree bit for bit. (bf16
    attention on the AMX tile unit is another computation, as bf16 products there are: the
    vector code is built here without the tile unit.)"""
    portable = cpu_kernels.load(cpu_kernels.build(tuple(f if f != "-march=native" else "-march=x86-64"
                                                        for f in cpu_kernels.FLAGS)))
    vector = cpu_kernels.load(cpu_kernels.build((*cpu_kernels.FLAGS, "-mno-amx-tile")))
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 4, 64) * 3, torch.randn(2, 2, 128, 64) * 3, torch.randn(2, 2, 128, 64)
    visible = causal_visibility(2, 70, 5, 128)
    x, weight, gate_up = torch.randn(3, 96) * 3, torch.randn(96), torch.randn(3, 2 * 100) * 6

    def outputs():
        results = []
        for dtype in DTYPES:
            results += [cpu_kernels.attention(q.to(dtype), k.to(dtype), v.to(dtype), 128, visible),
                        cpu_kernels.rms_norm(x.to(dtype), weight.to(dtype), 1e-5), cpu_kernels.silu_mul(gate_up.to(dtype))]
        return results

    monkeypatch.setattr(cpu_kernels, "library", lambda: vector)
    native = outputs()
    monkeypatch.setattr(cpu_kernels, "library", lambda: portable)
    assert all(torch.equal(a, b) for a, b in zip(native, outputs()))


@pytest.mark.parametrize("shape", [{}, dict(hidden_size=128, num_heads=2, num_kv_heads=1)], ids=["head_dim 8", "head_dim 64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_a_model_forward_through_the_kernels_matches_the_aten_forward(monkeypatch, dtype, shape):
    """Cached and cache-less, causal and block patterns: the same logits to rounding."""
    model = tiny_model(**shape).to(dtype)
    model.prepare_for_inference()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    block = torch.ones(12, 12, dtype=torch.bool).tril() | torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3)

    def logits(pattern, cached: bool):
        cache = KVCache(model.config, 2, 32, dtype) if cached else None
        if cached:
            model(ids[:, :5], cache=cache)
            cache.advance(5)
        return model.logits(model(ids[:, 5:] if cached else ids, cache=cache, pattern=pattern))

    runs = [(pattern, cached) for pattern in ("causal", block) for cached in (False, True) if not (cached and pattern is block)]
    fused = [logits(*run) for run in runs]
    monkeypatch.setattr(cpu_kernels, "applies", lambda x: False)
    aten = [logits(*run) for run in runs]
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for a, b in zip(fused, aten):
        torch.testing.assert_close(a, b, **tolerance)


@torch.inference_mode()
def test_the_wrappers_refuse_what_would_read_or_write_outside_the_tensors():
    """The kernels take raw pointers: a shape that does not fit is an error, not a stray write."""
    k_cache, v_cache = torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16)
    qkv, cos = torch.randn(1, 4, 8, 16), torch.ones(1, 4, 1, 16)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernels.rope_store(qkv, cos, cos, 4, k_cache, v_cache, torch.tensor([61]))
    with pytest.raises(ValueError, match="KV cache is"):
        cpu_kernels.rope_store(qkv, cos, cos, 4, k_cache.bfloat16(), v_cache.bfloat16(), torch.tensor([0]))
    q = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match="span of 65"):
        cpu_kernels.attention(q, k_cache, v_cache, 65, None)
    with pytest.raises(ValueError, match="visibility"):
        cpu_kernels.attention(q, k_cache, v_cache, 64, torch.ones(1, 4, 32, dtype=torch.bool))
    assert not k_cache.any() and not v_cache.any()


def w4a8_reference(x: torch.Tensor, packed) -> torch.Tensor:
    """cpu_w4a8.c's contract computed with torch: activations rounded to int8 per group of 32,
    exact integer sums, then a group's two multiply-adds (in float64, so within an ulp of the
    kernel's fused float32 ones)."""
    from blockdiff.model.quantize import GROUP_SIZE
    rows, inp = x.shape
    groups = x.float().reshape(rows, inp // GROUP_SIZE, GROUP_SIZE)  # (n, G, 32)
    amax = groups.abs().amax(-1, keepdim=True)  # (n, G, 1)
    # a true division (`127 / amax` would multiply by a reciprocal, another rounding)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    a = (groups * inverse).round().clamp(-127, 127)  # (n, G, 32), ties to even as rint
    scale = (amax / 127)[..., 0]  # (n, G)
    scaled_sum = scale * a.sum(-1)  # (n, G), rounded to float32 as the kernel rounds it
    tiles, G, _, _, _ = packed.codes.shape
    nibbles = torch.stack([packed.codes & 15, packed.codes >> 4], -1)  # (tile, G, c, j, i, nibble)
    codes = nibbles.permute(0, 3, 1, 2, 5, 4).reshape(tiles * 16, G, GROUP_SIZE).double()  # (out, G, 32)
    steps = packed.steps.transpose(1, 2).reshape(tiles * 16, G).float()  # (out, G)
    minimums = packed.minimums.transpose(1, 2).reshape(tiles * 16, G).double()
    isum = torch.einsum("ngk,ogk->nog", a.double(), codes)  # (n, out, G), exact
    y = torch.zeros(rows, tiles * 16, dtype=torch.float64)
    for g in range(G):
        y = (y + isum[..., g] * (steps[None, :, g] * scale[:, None, g]).double()).float().double()
        y = (y + minimums[None, :, g] * scaled_sum[:, None, g].double()).float().double()
    return y.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_w4a8_computes_its_documented_arithmetic_and_rows_do_not_depend_on_width(dtype):
    from blockdiff.model.quantize import quantize_w4a8
    torch.manual_seed(0)
    weight = (torch.randn(48, 160) * 0.1).to(dtype)
    packed = quantize_w4a8(weight)
    x = (torch.randn(11, 160) * 3).to(dtype)
    x[3] = 0  # a row of zeros: scale 0, no division by it
    y = packed(x)
    assert y.dtype == dtype and y.shape == (11, 48)
    torch.testing.assert_close(y.float(), w4a8_reference(x, packed).to(dtype).float(), atol=1e-5, rtol=1e-5)
    assert bool((y[3] == 0).all())
    # against the float weights: int4 steps of random weights, a few percent of the outputs' scale
    exact = x.double() @ weight.double().T
    assert float((y.double() - exact).abs().max()) < 0.1 * float(exact.abs().max())
    for start, n in [(0, 1), (2, 1), (1, 4), (5, 5), (0, 9)]:
        assert torch.equal(packed(x[start:start + n]), y[start:start + n])


@torch.inference_mode()
def test_w4a8_paths_agree_bit_for_bit(monkeypatch):
    """AVX-512 VNNI, AVX2 and the portable C sum the same integers and round the same floats."""
    from blockdiff.model.quantize import quantize_w4a8
    torch.manual_seed(1)
    packed = quantize_w4a8((torch.randn(64, 96) * 0.1).to(torch.bfloat16))
    x = torch.randn(6, 96) * 2

    def outputs():
        return [packed(x.to(dtype)) for dtype in DTYPES]

    builds = {march: cpu_kernels.load(cpu_kernels.build(tuple(f if f != "-march=native" else f"-march={march}"
                                                              for f in cpu_kernels.FLAGS)))
              for march in ("x86-64", "haswell")}
    native = outputs()
    assert {lib.bd_w4a8_path() for lib in builds.values()} == {0, 1}
    for lib in builds.values():
        monkeypatch.setattr(cpu_kernels, "library", lambda lib=lib: lib)
        assert all(torch.equal(a, b) for a, b in zip(native, outputs()))


STACK_FORMATS = [("w4a8", torch.float32), ("w4a8", torch.bfloat16), ("none", torch.bfloat16)]


@pytest.mark.parametrize("quantization,dtype", STACK_FORMATS, ids=["w4a8-float32", "w4a8-bf16", "bf16 tiles"])
@torch.inference_mode()
def test_the_decoder_stack_computes_what_the_layers_compute_one_by_one(quantization, dtype):
    """One C call for every layer: the same kernels in the same order, so the same bits, in
    prefill, one-token steps, ragged rows and a block pattern. A draft pass's adapter (a LoRA on
    every linear here, so on each part of the fused products) sums in another order than ATen's
    products: the same to rounding."""
    model = tiny_model(4, vocab=64, hidden_size=64, intermediate_size=128)
    torch.manual_seed(1)
    for module in model.lora_modules().values():
        module.attach_lora(4, 8.0, B=torch.randn(module.out_features, 4) * 0.3)
    model = model.to(dtype)
    if quantization == "none" and not cpu_kernels.bf16_tiles():
        pytest.skip("bf16 products run on AMX tiles only")
    model.prepare_for_inference(quantization)
    assert model._decoder_stack is not None
    ids = torch.randint(0, 64, (2, 20))
    block = torch.ones(6, 6, dtype=torch.bool).tril() | torch.block_diag(*[torch.ones(3, 3, dtype=torch.bool)] * 2)
    gate = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1]])

    def forwards():
        cache, outputs = KVCache(model.config, 2, 32, dtype), []
        outputs.append(model(ids[:, :9], cache=cache))
        cache.advance(torch.tensor([9, 5]))  # ragged rows: the second keeps 5 of its 9
        outputs.append(model(ids[:, 9:10], cache=cache))
        cache.advance(1)
        outputs.append(model(ids[:, 10:16], cache=cache, pattern=block))
        outputs.append(model(ids[:, :7]))  # no cache
        return outputs, model(ids[:, 10:16], cache=cache, pattern=block, adapter_gate=gate)

    calls = []
    stack = model._decoder_stack
    model._decoder_stack = lambda *args: calls.append(stack(*args))
    fused, fused_draft = forwards()
    assert len(calls) == 5
    model._decoder_stack = None
    layered, layered_draft = forwards()
    assert all(torch.equal(a, b) for a, b in zip(fused, layered))
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(fused_draft, layered_draft, **tolerance)
    assert not torch.allclose(fused_draft, fused[2], **tolerance)  # the adapter changed the forward


def test_the_decoder_stack_refuses_caches_and_streams_that_do_not_fit():
    model = tiny_model(4, vocab=64, hidden_size=64, intermediate_size=128)
    model.prepare_for_inference("w4a8")
    stack, config = model._decoder_stack, model.config
    x, cos = torch.zeros(1, 4, 64), torch.ones(1, 4, 1, 16)
    cache = KVCache(config, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="do not fit the decoder stack"):
        stack(x.bfloat16(), cos, cos, 4, cache.k, cache.v, cache.starts, 4, None, 128)
    with pytest.raises(ValueError, match="do not fit 1 cache rows"):
        stack(x, cos, cos, 4, cache.k, cache.v, torch.tensor([cache.k.shape[3] - 2]), 4, None, 128)
    with pytest.raises(ValueError, match="RoPE tables"):
        stack(x, cos[:, :2], cos[:, :2], 4, cache.k, cache.v, cache.starts, 4, None, 128)


@torch.inference_mode()
def test_the_decoder_stack_reads_an_adapter_attached_after_it_was_built():
    model = tiny_model(4, vocab=64, hidden_size=64, intermediate_size=128)
    model.prepare_for_inference("w4a8")
    ids, gate = torch.randint(0, 64, (1, 6)), torch.ones(1, 6)
    plain = model(ids, adapter_gate=gate)
    torch.manual_seed(2)
    for name, module in model.lora_modules().items():
        if name.endswith("down_proj"):
            module.attach_lora(4, 8.0, B=torch.randn(module.out_features, 4))
    adapted = model(ids, adapter_gate=gate)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    model._decoder_stack = None
    torch.testing.assert_close(adapted, model(ids, adapter_gate=gate), atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_bf16_tile_products_round_the_float32_sums_and_keep_rows_apart():
    if not cpu_kernels.bf16_tiles():
        pytest.skip("bf16 products run on AMX tiles only")
    torch.manual_seed(5)
    weight = (torch.randn(64, 96) * 0.1).bfloat16()
    packed = cpu_kernels.bf16_tile_weight(weight)
    x = torch.randn(37, 96).bfloat16()
    y = packed(x)
    exact = x.double() @ weight.double().T  # float32 sums of exact bf16 products: within bf16 rounding
    torch.testing.assert_close(y.double(), exact, atol=1e-3, rtol=2 ** -7)
    assert all(torch.equal(packed(x[start:start + n]), y[start:start + n]) for start in (0, 2) for n in (1, 3, 16, 17, 35))
    with pytest.raises(ValueError, match="does not fit a bf16 tile weight"):
        packed(x.float())
    assert cpu_kernels.bf16_tile_weight(weight.float()) is None and cpu_kernels.bf16_tile_weight(weight[:8]) is None
