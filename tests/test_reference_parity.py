"""Our transformer against transformers' independent Llama / Mistral / Ministral-3 code."""
import pytest
import torch
import transformers

from blockdiff.config import ModelConfig, RopeConfig
from blockdiff.model.transformer import Transformer
from support.models import run

DIMS = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5)


def reference_models():
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
                beta_fast=32.0, beta_slow=1.0, llama_4_scaling_beta=0.1)
    return {
        "llama": (transformers.LlamaConfig(**DIMS, max_position_embeddings=256, tie_word_embeddings=True,
                                           rope_parameters=dict(rope_type="default", rope_theta=5000.0)),
                  transformers.LlamaForCausalLM,
                  RopeConfig(theta=5000.0), True),
        "mistral": (transformers.MistralConfig(**DIMS, max_position_embeddings=256, sliding_window=None,
                                               head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
                    transformers.MistralForCausalLM, RopeConfig(theta=1e6), False),
        # original_max is tiny so YaRN and the Llama-4 query scaling both act inside a short test
        "ministral3": (transformers.Ministral3Config(**DIMS, max_position_embeddings=256, head_dim=16,
                                                     rope_parameters=yarn, pad_token_id=0),
                       transformers.Ministral3ForCausalLM,
                       RopeConfig(theta=10000.0, yarn_factor=4.0, yarn_original_max=8, llama4_beta=0.1,
                                  llama4_original_max=8), False),
    }


def build_pair(name):
    hf_config, hf_class, rope, tied = reference_models()[name]
    torch.manual_seed(0)
    hf_config._attn_implementation = "eager"
    reference = hf_class(hf_config).eval()
    config = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=8,
                         num_kv_heads=2, head_dim=hf_config.head_dim if hasattr(hf_config, "head_dim") else None,
                         max_position_embeddings=256, tie_word_embeddings=tied, rope=rope, mask_token_id=96)
    ours = Transformer(config).eval()
    state = {k.removeprefix("model."): v for k, v in reference.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=True)
    return reference, ours


@pytest.mark.parametrize("name", ["llama", "mistral", "ministral3"])
@torch.inference_mode()
def test_logits_match(name):
    reference, ours = build_pair(name)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = reference(ids).logits
    torch.testing.assert_close(ours.logits(ours(ids)), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral", "ministral3"])
@torch.inference_mode()
def test_greedy_generation_matches(name):
    reference, ours = build_pair(name)
    prompt = [5, 17, 42, 8, 77, 3]
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    for mode in ["ar", "linear_spec", "quad_spec"]:
        assert run(ours, [prompt], mode=mode, max_new_tokens=30, block_length=8)[0].output_ids == expected
