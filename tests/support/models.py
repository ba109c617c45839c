"""Small random models and sequences for tests (no files, no downloads)."""
from __future__ import annotations

import torch

from blockdiff.config import ModelConfig, RopeConfig
from blockdiff.decoding.batch import EventHook
from blockdiff.decoding.sequence import Sequence
from blockdiff.engine.request import Request
from blockdiff.engine.scheduler import Scheduler
from blockdiff.model.transformer import Transformer
from blockdiff.sampling import SamplingParams
from blockdiff.tokenizer import Tokenizer


def tiny_config(vocab: int = 32, **overrides) -> ModelConfig:
    fields = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=512, mask_token_id=vocab - 1,
                  rope=RopeConfig(theta=10000.0), tie_word_embeddings=False)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, vocab: int = 32, sharpness: float = 3.0, **overrides) -> Transformer:
    """A random model whose weights are scaled up so its predictions are confident, like a
    trained model's, which makes draft acceptance and early stopping actually happen."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(sharpness)
    return model


def attach_random_draft_adapter(model: Transformer, seed: int = 1) -> Transformer:
    """A LoRA on every o_proj with a random (non-zero) B, so drafts differ from the base model's."""
    torch.manual_seed(seed)
    for name, module in model.lora_modules().items():
        if name.endswith("o_proj"):
            module.attach_lora(4, 8.0, B=torch.randn(module.out_features, 4))
    return model


def decode(model: Transformer, seqs: list[Sequence], on_event: EventHook | None = None) -> list[Sequence]:
    """Decode the sequences together on a Scheduler, as LLM.generate does, without an LLM."""
    requests = [Request(seq, on_step=on_event) for seq in seqs]
    scheduler = Scheduler(model, max_running=len(seqs))
    for request in requests:
        scheduler.add(request)
    for request, update in scheduler.drain():
        if request.exception is not None:
            raise request.exception
    return seqs


def run(model: Transformer, prompts: list[list[int]], eos: int | None = None, **params) -> list[Sequence]:
    seqs = [Sequence(p, SamplingParams(**params), frozenset([eos] if eos is not None else [])) for p in prompts]
    return decode(model, seqs)


def causal_logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-softmax of one causal forward over ids without a cache: row i is the
    model's distribution for token i+1 (the reference every logprobs test compares with)."""
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), None, None, "causal")  # (1, T, hidden)
        return torch.log_softmax(model.logits(hidden[0]).float(), dim=-1)


def tiny_tokenizer() -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "def main():\n    return 0", "hello there"] * 5, trainer)
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return Tokenizer(tok, template, "<s>", ["</s>"])


def save_tiny_checkpoint(path, fmt: str = "llama", seed: int = 0, dtype=torch.float32, **overrides) -> str:
    """A random-weight model with a real (tiny) BPE tokenizer, saved as an HF/NLD directory."""
    from blockdiff.model.checkpoint import save_checkpoint
    tokenizer = tiny_tokenizer()
    fields = dict(bos_token_id=1, eos_token_ids=[2], mask_token_id=3, max_position_embeddings=256) | overrides
    config = tiny_config(vocab=300, **fields)
    model = tiny_model(seed, vocab=300, **fields)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    return save_checkpoint((config, state, tokenizer), path, format=fmt)
