"""Width invariance: a row's result does not depend on how many rows share its forward.

This is what makes the spec modes lossless in every dtype (SPEC section 3): the verify pass
computes L positions in one forward, AR computes them one at a time, and at temperature 0
both must give the same argmax. Each test compares a wide computation with the same rows
computed alone, bit for bit, per op and per layer type, then end to end on the default model
in the dtype it runs in by default. The kernels' behaviour is a property of the machine, so
these run on whatever CPU the suite runs on.
"""
import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.model.attention import grouped_attention, key_bias
from blockdiff.model.dtype import native_bf16
from blockdiff.model.kv_cache import KVCache, aligned
from blockdiff.model.lora import inference_weight, linear
from support.formats import W4A8

DTYPES = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
SMOLLM2_PRODUCTS = [(576, 960), (576, 3072), (1536, 576), (576, 576)]  # (in, out): qkv, gate_up, down, o


@pytest.fixture(scope="module", params=["none", "int4", "int8", "fp16", W4A8])
def native_llm(request):
    """The default model in its default dtype for this machine (bf16 where native), as it is
    and quantized to int4, int8 and w4a8; with fp16 weights in float32, the dtype that format serves. The
    tests name their block lengths and batches speculate at every size, so nothing is timed at
    load (slow in int4 and int8 on AVX2)."""
    fixed = dict(block_lengths={}, spec_disable_batch_size=None)
    if request.param == "fp16":
        return LLM(dtype="float32", quantization="fp16", **fixed)
    return LLM(quantization=request.param, **fixed)


@pytest.mark.parametrize("quantization", ["none", "int4", "int8", "fp16", W4A8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fan_in,fan_out", SMOLLM2_PRODUCTS)
@torch.inference_mode()
def test_linear_rows_do_not_depend_on_the_row_count(dtype, fan_in, fan_out, quantization):
    if quantization == "fp16" and dtype != torch.float32:
        pytest.skip("fp16 weights serve float32 models")
    torch.manual_seed(0)
    weight = (torch.randn(fan_out, fan_in) * fan_in ** -0.5).to(dtype)
    packed = inference_weight(weight, quantization)
    # every width up to a batch of 16 quad_spec steps at L=4 (16 x 20 rows): on an AMX Xeon
    # oneDNN sums down_proj's rows in another order at some widths between 150 and 256. The
    # int4 and int8 kernels compute each row apart at a cost that grows with the rows: a sample there.
    sampled = quantization in ("int4", "int8")
    n = 130 if sampled else 320
    widths = [*range(2, 18), 33, 64, 129, 130] if sampled else range(2, n + 1)
    x = torch.randn(n, fan_in).to(dtype)
    alone = torch.cat([linear(x[r:r + 1], weight, packed) for r in range(n)])  # one forward per row
    differing = [w for w in widths if not torch.equal(linear(x[:w], weight, packed), alone[:w])]
    assert differing == []
    batched = linear(x.view(2, n // 2, fan_in), weight, packed)  # (B, T, in) as the model calls it
    assert torch.equal(batched.view(n, fan_out), alone)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@torch.inference_mode()
def test_attention_rows_do_not_depend_on_width_or_span(dtype):
    """Each query of a causal block over a cache equals that query computed alone over its
    own aligned span, for short and long caches (the softmax and the weighted sum over keys
    are where lengths leak in)."""
    torch.manual_seed(0)
    B, H, Hkv, D = 2, 9, 3, 64
    k = (torch.randn(B, Hkv, 640, D) * 3).to(dtype)  # scaled up: peaked softmaxes, as in a real model
    v = torch.randn(B, Hkv, 640, D).to(dtype)
    for cached in (3, 10, 60, 100, 300, 500):
        for width in (1, 4, 33):
            q = (torch.randn(B, width, H, D) * 3).to(dtype)
            span = aligned(cached + width)
            visible = torch.zeros(B, 1, width, span, dtype=torch.bool)
            for t in range(width):
                visible[:, :, t, :cached + t + 1] = True
            wide = grouped_attention(q, k[:, :, :span], v[:, :, :span], key_bias(visible))  # (B, T, H*D)
            for t in range(width):
                own = aligned(cached + t + 1)
                alone = grouped_attention(q[:, t:t + 1], k[:, :, :own], v[:, :, :own],
                                          key_bias(visible[:, :, t:t + 1, :own]))
                assert torch.equal(wide[:, t:t + 1], alone), (cached, width, t)


@torch.inference_mode()
def test_every_layer_of_a_wide_forward_equals_one_token_forwards(native_llm, monkeypatch):
    """Hooks on every norm, attention, MLP and decoder layer: row t of a 12-token causal
    forward over a cached prompt equals the output of the t-th one-token forward. (w4a8's
    one-call stack of the layers computes what they compute: tests/test_cpu_kernels.py.)"""
    model = native_llm.model
    monkeypatch.setattr(model, "_decoder_stack", None)
    modules = {"final norm": model.norm}
    for i, layer in enumerate(model.layers):
        modules.update({f"{i}.input_norm": layer.input_layernorm, f"{i}.attention": layer.self_attn,
                        f"{i}.post_norm": layer.post_attention_layernorm, f"{i}.mlp": layer.mlp, f"{i}": layer})
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(out))
               for name, m in modules.items()]
    ids = native_llm.encode("def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5")
    prompt, new = torch.tensor([ids[:8]]), torch.tensor([ids[8:20]])
    try:
        outputs = {}
        for label, chunks in (("wide", [new]), ("one by one", new.split(1, dim=1))):
            cache = KVCache(model.config, 1, 64, model.dtype)
            model(prompt, cache=cache)
            cache.advance(prompt.shape[1])
            for name in seen:
                seen[name].clear()
            for chunk in chunks:
                model(chunk, cache=cache)
                cache.advance(chunk.shape[1])
            outputs[label] = {name: torch.cat(outs, dim=1) for name, outs in seen.items()}  # (1, 12, hidden)
    finally:
        for h in handles:
            h.remove()
    differing = [name for name in modules if not torch.equal(outputs["wide"][name], outputs["one by one"][name])]
    assert differing == []


@pytest.mark.parametrize("mode,block", [("linear_spec", 8), ("linear_spec", 32), ("quad_spec", 4)])
def test_spec_modes_equal_ar_in_the_default_dtype(native_llm, mode, block):
    """End to end, batched (ragged rows) and one prompt at a time: the same tokens and the
    same log-probabilities, bit for bit."""
    if native_llm.model.quantization in ("int4", "int8"):
        pytest.skip("its kernel slows wide forwards; tests/test_quantize.py decodes it end to end")
    if native_llm.model.quantization == "fp16" and block == 32:
        pytest.skip("fp16's padded widths are all in L=8's 8-token and quad_spec's 20-token passes")
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Write a haiku about the sea.",
               "List three prime numbers:"]
    params = dict(max_new_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)

    def result(outputs):
        return [(o.token_ids, o.logprobs) for o in outputs]

    ar = result(native_llm.generate(prompts, SamplingParams(mode="ar", **params), use_tqdm=False))
    spec = SamplingParams(mode=mode, block_length=block, **params)
    batched = result(native_llm.generate(prompts, spec, use_tqdm=False))
    alone = [result(native_llm.generate(p, spec, use_tqdm=False))[0] for p in prompts]
    assert batched == ar and alone == ar
