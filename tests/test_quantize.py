"""The quantized formats (model/quantize.py): int4 codes reproduce Q4_1-shaped weights
exactly and round to nearest otherwise, int8 rounds each channel to nearest, fp16 multiplies
by the weights rounded to half precision, w4a8 computes llama.cpp's Q4_1 x Q8_1 arithmetic
(its kernel: tests/test_cpu_kernels.py), and a quantized model decodes the same tokens in
every lossless mode (row independence: tests/test_width_invariance.py)."""
import pytest
import torch

from blockdiff import LLM
from blockdiff.model import cpu_kernels, quantize
from blockdiff.model.quantize import GROUP_SIZE, dequantize_int4, quantize_fp16, quantize_int4, quantize_int8
from support.formats import AUTO_CANDIDATES, W4A8
from support.models import attach_random_draft_adapter, run, tiny_model


def test_q4_1_weights_come_back_exactly():
    """GGUF's Q4_1 is w = q * d + m per group of 32, its codes spanning 0..15: re-quantized,
    such a weight keeps its codes, so the kernel multiplies by the model's own weights."""
    torch.manual_seed(0)
    out, groups = 48, 6
    codes = torch.randint(0, 16, (out, groups, GROUP_SIZE))
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans the whole code range, as Q4_1 makes it
    d = torch.rand(out, groups, 1) * 0.01 + 1e-3
    m = torch.randn(out, groups, 1) * 0.05
    weight = (codes * d + m).reshape(out, groups * GROUP_SIZE)  # float32
    back = dequantize_int4(quantize_int4(weight), groups * GROUP_SIZE)
    assert torch.allclose(back, weight, rtol=0, atol=1e-6)


def test_rounding_is_to_the_nearest_code():
    torch.manual_seed(1)
    weight = torch.randn(48, 4 * GROUP_SIZE)
    groups = weight.reshape(48, 4, GROUP_SIZE)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15)[..., None]  # (48, 4, 1)
    error = (dequantize_int4(quantize_int4(weight), 4 * GROUP_SIZE) - weight).reshape(48, 4, GROUP_SIZE).abs()
    assert bool((error <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_multiplies_by_each_channel_rounded_to_the_nearest_step(dtype):
    torch.manual_seed(3)
    weight = torch.randn(40, 96).to(dtype)
    packed = quantize_int8(weight)
    step = packed.scales.float()[:, None]  # (40, 1)
    # codes round against the float32 step; a bf16 model keeps the step rounded to bf16 (2^-9 relative)
    slack = packed.codes.float().abs() * step * (2 ** -8 if dtype == torch.bfloat16 else 0.0) + 1e-6
    assert bool((packed.codes.float() * step - weight.float()).abs().le(step / 2 + slack).all())
    assert int(packed.codes.abs().amax(1).min()) == 127  # each channel's largest weight is the top code
    x = torch.randn(5, 96).to(dtype)
    expected = x.double() @ (packed.codes.double() * packed.scales.double()[:, None]).T  # (5, 40)
    assert torch.allclose(packed(x).double(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def test_shapes_the_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(16, 33))
    if cpu_kernels.available():
        with pytest.raises(ValueError, match="multiple of 16"):
            quantize.quantize_w4a8(torch.randn(8, 32))
        with pytest.raises(ValueError, match="float16"):
            quantize.quantize_w4a8(torch.randn(16, 32) * 1e6)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_int4(torch.randn(8, 32))
    with pytest.raises(ValueError, match="unknown quantization"):
        tiny_model().prepare_for_inference("int3")


def test_fp16_multiplies_by_the_half_precision_weights():
    torch.manual_seed(2)
    weight, x = torch.randn(40, 24) * 0.1, torch.randn(9, 24)
    expected = x.double() @ weight.half().double().T  # (9, 40)
    assert torch.allclose(quantize_fp16(weight)(x).double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(quantize_fp16(weight)(x).double(), x.double() @ weight.double().T, rtol=0, atol=1e-6)


def raw_fp16_product(weight, rows):
    """fbgemm's product without Fp16Weight's padding."""
    return torch.ops.quantized.linear_dynamic_fp16(rows, weight.packed)


def one_row_summed_apart(weight, rows):
    """A kernel whose one-row products round differently from wider ones, as fbgemm's AVX2
    one- and two-row blocks do."""
    y = raw_fp16_product(weight, rows)
    return y if rows.shape[0] > 1 else (y.double() * (1 + 2 ** -20)).float()


@pytest.mark.parametrize("kernel", [raw_fp16_product, one_row_summed_apart], ids=["fbgemm", "emulated"])
def test_the_fp16_row_check_sees_a_row_dependent_kernel(monkeypatch, kernel):
    """The check that guards the format must see a kernel whose rows depend on their
    neighbours: fbgemm's own without the padding (on AVX2, where its small blocks sum in
    another order), and one made so on any CPU."""
    quantize.rows_are_independent.cache_clear()
    assert quantize.rows_are_independent("fp16", torch.float32)
    monkeypatch.setattr(quantize.Fp16Weight, "__call__", kernel)
    quantize.rows_are_independent.cache_clear()
    try:
        if kernel is raw_fp16_product and quantize.rows_are_independent("fp16", torch.float32):
            pytest.skip(f"fbgemm's fp16 rows are independent without the padding on this CPU "
                        f"({torch.backends.cpu.get_cpu_capability()})")
        assert not quantize.rows_are_independent("fp16", torch.float32)
        with pytest.raises(ValueError, match="another result"):
            tiny_model().prepare_for_inference("fp16")
    finally:
        quantize.rows_are_independent.cache_clear()


def test_each_format_refuses_the_dtypes_it_cannot_serve():
    with pytest.raises(ValueError, match="fp16 weights serve float32 models"):
        tiny_model().to(torch.bfloat16).prepare_for_inference("fp16")
    for quantization in ("int4", "int8", "w4a8"):  # refused for the dtype before anything else
        with pytest.raises(ValueError, match=f"{quantization} weights serve bfloat16 and float32 models"):
            tiny_model().to(torch.float16).prepare_for_inference(quantization)


def test_every_quantized_format_passes_the_row_check_here():
    """The check that guards each format at load (the emulated failure above shows it can fail)."""
    for quantization in ("int4", "int8", "fp16", "w4a8"):
        if quantization == "w4a8" and not cpu_kernels.available():
            continue
        for dtype in quantize.FORMAT_DTYPES[quantization]:
            assert quantize.rows_are_independent(quantization, dtype), (quantization, dtype)


@pytest.mark.parametrize("quantization", ["int4", "int8", "fp16", W4A8])
@pytest.mark.parametrize("mode,block", [("linear_spec", 4), ("quad_spec", 3)])
def test_quantized_spec_modes_equal_quantized_ar(mode, block, quantization):
    model = attach_random_draft_adapter(tiny_model(5, vocab=64, hidden_size=64, intermediate_size=128))
    model.prepare_for_inference(quantization)
    prompts = [[1, 2, 3, 4, 5], [7], [3] * 13, [9, 8]]
    ar = [s.output_ids for s in run(model, prompts, max_new_tokens=24, ignore_eos=True, mode="ar")]
    spec = [s.output_ids for s in run(model, prompts, max_new_tokens=24, ignore_eos=True, mode=mode,
                                      block_length=block)]
    assert spec == ar


@pytest.mark.parametrize("quantization,kind", [("int4", "Int4Weight"), ("int8", "Int8Weight"), ("fp16", "Fp16Weight"),
                                               pytest.param("w4a8", "W4A8Weight", marks=W4A8.marks)])
def test_llm_quantizes_every_product(tiny_dir, quantization, kind):
    llm = LLM(tiny_dir, dtype="float32", quantization=quantization)
    layer = llm.model.layers[0]
    assert type(layer.mlp.down_proj.packed).__name__ == kind
    assert type(layer.self_attn.qkv.packed).__name__ == kind
    if quantization not in ("int4", "w4a8"):  # they need an output size divisible by 16, which tiny's head (300) is not
        assert type(llm.model._packed_head).__name__ == kind
    plain = LLM(tiny_dir, dtype="float32")
    a = llm.generate("the cat", max_new_tokens=8, use_tqdm=False)[0]
    b = plain.generate("the cat", max_new_tokens=8, use_tqdm=False)[0]
    assert len(a.token_ids) == len(b.token_ids) == 8  # runs; its tokens may differ from the float model's


def test_auto_picks_the_format_of_the_highest_expected_rate_and_leaves_the_model_in_it(monkeypatch):
    """int4 faster in one-token steps, slower in wide passes (as on an AMX Xeon): the caller's
    rate decides, and the model is left prepared in the winner, whose timings come back."""
    from blockdiff.model import autotune
    cost = {("none", 1): 2.0, ("int4", 1): 1.0, ("int8", 1): 1.6, ("fp16", 1): 3.0, ("w4a8", 1): 1.25,
            ("none", 8): 2.2, ("int4", 8): 4.0, ("int8", 8): 5.0, ("w4a8", 8): 5.0}
    w4a8 = {"w4a8": 1 / 1.25} if quantize.unavailable("w4a8", torch.float32, torch.device("cpu")) is None else {}
    timed = []

    def fake_seconds(model, width, repeats, batch=1, drafting=False):
        timed.append((model.quantization, width))
        return cost[(model.quantization, width)]

    monkeypatch.setattr(autotune, "forward_seconds", fake_seconds)
    model = tiny_model(5, vocab=64, hidden_size=64, intermediate_size=128)
    ar_only = lambda seconds: 1 / seconds(1)  # noqa: E731
    name, rates, seconds = autotune.choose_quantization(model, ar_only)
    assert (name, rates) == ("int4", {"none": 0.5, "int4": 1.0, "int8": 0.625, "fp16": 1 / 3, **w4a8})
    assert seconds(1) == 1.0 and model.quantization == "int4"
    assert type(model.layers[0].mlp.down_proj.packed).__name__ == "Int4Weight"
    # a spec mode committing 2.5 tokens per 8-token pass: wide forwards decide
    timed.clear()
    with_spec = lambda seconds: max(1 / seconds(1), 2.5 / seconds(8))  # noqa: E731
    name, rates, seconds = autotune.choose_quantization(model, with_spec, most_tokens_per_forward=2.5)
    assert name == "none" and rates["none"] == 2.5 / 2.2 and rates["int4"] == 1.0 and seconds(8) == 2.2
    assert rates["int8"] == 1 / 1.6  # timed at 8 tokens too: its bound (2.5 / 1.6) passed the best
    assert model.quantization == "none" and type(model.layers[0].mlp.down_proj.packed).__name__ != "Int4Weight"
    # fp16's one-token forward bounds it below the best (2.5 / 3 < 2.5 / 2.2): never timed wider
    assert rates["fp16"] == 2.5 / 3 and ("fp16", 8) not in timed
    assert len(timed) == len(set(timed))  # each width timed once per format
    # formats are scored best bound first: where fp16 wins (an AVX2 CPU), the slow ones that
    # come before it in QUANTIZATIONS are never timed wide
    timed.clear()
    cost |= {("none", 1): 2.0, ("int4", 1): 4.0, ("int8", 1): 5.0, ("fp16", 1): 1.0, ("fp16", 8): 1.1, ("w4a8", 1): 6.0}
    name, rates, _ = autotune.choose_quantization(model, with_spec, most_tokens_per_forward=2.5)
    assert name == "fp16" and rates["fp16"] == 2.5 / 1.1 and model.quantization == "fp16"
    assert [t for t in timed if t[1] == 8] == [("fp16", 8)]


def test_forward_widths_of_each_mode():
    from blockdiff.model.autotune import forward_width
    assert [forward_width(m, 4) for m in ("ar", "diffusion", "linear_spec", "quad_spec")] == [1, 4, 4, 20]


def test_llm_auto_quantization_measures_every_format_and_stays_lossless(tiny_dir):
    llm = LLM(tiny_dir, dtype="float32", quantization="auto")
    assert set(llm.quantization_rates) == AUTO_CANDIDATES
    assert all(rate > 0 for rate in llm.quantization_rates.values())
    assert llm.model.quantization == max(llm.quantization_rates, key=llm.quantization_rates.get)
    ar, spec = (llm.generate("the cat", mode=m, max_new_tokens=12, ignore_eos=True, use_tqdm=False)[0]
                for m in ("ar", "linear_spec"))
    assert spec.token_ids == ar.token_ids
