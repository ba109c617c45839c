"""Baselines on the same weights: transformers' greedy generate(), and its assisted generation
by prompt lookup (the speculative decoding a user gets without blockdiff).

transformers is a dev dependency; it is imported only when a baseline runs.
"""
from __future__ import annotations

import time

import torch

from blockdiff.bench.results import Run, Sample


def hf_model(llm):
    """transformers' LlamaForCausalLM holding exactly our base weights (no draft adapter)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("the baselines need transformers (pip install -e '.[dev]'); or pass --no-hf") from None

    from blockdiff.model.loader_hf import config_to_hf
    hf_config = {k: v for k, v in config_to_hf(llm.config, "llama").items() if k not in ("architectures", "model_type")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    # LoRA tensors belong to draft passes only; the baseline is the plain AR model
    state = {k if k.startswith("lm_head") else "model." + k: v
             for k, v in llm.model.state_dict().items() if "lora_" not in k}
    missing, _ = model.load_state_dict(state, strict=False)  # extra: our rotary buffers
    missing = [k for k in missing if not (k == "lm_head.weight" and llm.config.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"transformers model lacks weights for {missing[:5]}")
    return model.to(device=llm.model.device, dtype=llm.model.dtype).eval()


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA launches are asynchronous: time the work, not the launch


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """generate() pads finished rows of a batch with the pad token (= EOS here); our outputs end
    at the first EOS, included."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def _gen_kwargs(llm, max_new_tokens: int) -> dict:
    eos = llm.tokenizer.eos_token_ids
    return dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])


@torch.inference_mode()
def run_generate(model, llm, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 1) -> Run:
    """Greedy generate() in batches; rows are left-padded so every row's next token is at the end."""
    device, eos = model.device, set(llm.tokenizer.eos_token_ids)
    pad = llm.tokenizer.eos_token_ids[0]
    samples, wall = [], 0.0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, width)
        mask = torch.zeros_like(ids)  # (B, width): 1 on real tokens, 0 on left padding
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        sync_device(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **_gen_kwargs(llm, max_new_tokens))  # (B, width + new)
        sync_device(device)
        wall += time.perf_counter() - start
        samples += [Sample(_cut_at_eos(row[width:].tolist(), eos)) for row in out]
    return Run(samples, wall)


@torch.inference_mode()
def run_prompt_lookup(model, llm, prompts: list[list[int]], max_new_tokens: int, num_tokens: int) -> Run:
    """Greedy assisted generation with prompt-lookup drafts of up to `num_tokens` tokens.

    transformers runs assisted generation at batch size 1 only, so this baseline is batch 1.
    """
    device, eos = model.device, set(llm.tokenizer.eos_token_ids)
    samples, wall = [], 0.0
    for p in prompts:
        ids = torch.tensor([p], device=device)  # (1, P)
        sync_device(device)
        start = time.perf_counter()
        out = model.generate(ids, prompt_lookup_num_tokens=num_tokens, **_gen_kwargs(llm, max_new_tokens))
        sync_device(device)
        wall += time.perf_counter() - start
        samples.append(Sample(_cut_at_eos(out[0, len(p):].tolist(), eos)))  # (1, P + new) -> new tokens
    return Run(samples, wall)


def llama_cpp_model(llm, threads: int):
    """llama.cpp (the `llama-cpp-python` binding) on the GGUF the model was loaded from, or a
    sentence saying why it cannot run: it is an optional extra (`make llama`, which builds
    llama.cpp from the sdist's sources) and reads GGUF files only."""
    if not str(llm.model_path).endswith(".gguf"):
        return None, f"llama.cpp baseline skipped: {llm.model_path} is not a GGUF file"
    try:
        import llama_cpp.llama_cpp as bindings
        from llama_cpp import Llama
    except ImportError:
        return None, "llama.cpp baseline skipped: llama-cpp-python is not installed (make llama)"
    # Off: ggml's extra buffer types (weight repacking; for Q4_1 on x86 that is its AMX kernel),
    # which the binding does not expose: built natively on an AMX Xeon, llama.cpp 0.3.36
    # segfaulted in ggml_backend_amx_mul_mat on the first decode.
    defaults = bindings.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params
    bindings.llama_model_default_params = without_extra_buffers
    try:
        model = Llama(model_path=str(llm.model_path), n_ctx=llm.max_context, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
    finally:
        bindings.llama_model_default_params = defaults
    return model, None


def run_llama_cpp(model, llm, prompts: list[list[int]], max_new_tokens: int) -> Run:
    """Greedy decoding by llama.cpp, one prompt at a time (the binding decodes one sequence),
    from an empty cache each time: no prompt prefix is reused across prompts."""
    eos = set(llm.tokenizer.eos_token_ids)
    samples, wall = [], 0.0
    for p in prompts:
        model.reset()
        start = time.perf_counter()
        out: list[int] = []
        for token in model.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if token in eos or len(out) == max_new_tokens:
                break
        wall += time.perf_counter() - start
        samples.append(Sample(out))
    return Run(samples, wall)
