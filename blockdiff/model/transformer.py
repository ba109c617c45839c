"""The Llama / Mistral / Ministral-3 decoder: RMSNorm, GQA, SwiGLU, RoPE (YaRN, Llama-4 scaling).

One forward serves every decoding mode; only the attention pattern and what the caller
does with the cache afterwards differ (see kv_cache.py and attention_mask.py).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from blockdiff.config import ModelConfig
from blockdiff.model import cpu_kernels, huge_pages
from blockdiff.model.attention import grouped_attention, sdpa_attention
from blockdiff.model.attention_mask import AttentionMask, Pattern, visibility
from blockdiff.model.kv_cache import KVCache
from blockdiff.model.lora import AdaptableLinear, FusedLinear, InferenceWeight, inference_weight, linear
from blockdiff.model.quantize import QUANTIZATIONS, W4A8Weight, unavailable
from blockdiff.model.rope import Rotary, apply_rotary
from blockdiff.model.sampler_head import SamplerHead


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the model dtype, as the reference implementations do
        # (bf16 variance loses bits); ATen's fused kernel is one op where the formula is five,
        # and in float32 it scales too. The fused CPU kernel rounds in the same places.
        if cpu_kernels.applies(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = AdaptableLinear(cfg.hidden_size, cfg.num_heads * cfg.head_dim)
        self.k_proj = AdaptableLinear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
        self.v_proj = AdaptableLinear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
        self.o_proj = AdaptableLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.qkv: FusedLinear | None = None  # set by Transformer.prepare_for_inference

    def project(self, x: torch.Tensor, gate) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, H + 2*Hkv, D): query heads, then key heads, then value heads."""
        B, T, _ = x.shape
        if self.qkv is not None:
            qkv = self.qkv(x, gate)
        else:
            qkv = torch.cat([self.q_proj(x, gate), self.k_proj(x, gate), self.v_proj(x, gate)], dim=-1)
        return qkv.view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)  # (B, T, H+2Hkv, D)

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, gate):
        if isinstance(cache, KVCache) and cpu_kernels.applies(x):  # not training's read-only prefix
            return self.o_proj(self._fused_attention(x, rope, mask, cache, layer, gate), gate)
        H, Hkv = self.num_heads, self.num_kv_heads
        qk, v = self.project(x, gate).split([H + Hkv, Hkv], dim=2)  # (B, T, H+Hkv, D), (B, T, Hkv, D)
        cos, sin, q_scale = rope
        q, k = apply_rotary(qk, cos, sin).split([H, Hkv], dim=2)  # one rotation for both: (B, T, H|Hkv, D)
        if q_scale is not None:
            q = q * q_scale
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, span, D)
        if torch.is_grad_enabled():
            y = sdpa_attention(q, k, v, mask.visible, mask.is_causal)  # (B, T, H*D)
        else:
            y = grouped_attention(q, k, v, mask.bias)  # (B, T, H*D)
        return self.o_proj(y, gate)

    def _fused_attention(self, x, rope, mask, cache: KVCache, layer: int, gate) -> torch.Tensor:
        """The same computation through model/cpu_kernels.py: RoPE and the cache write in one
        call, attention in another. (B, T, hidden) -> (B, T, H*D)."""
        cos, sin, q_scale = rope
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # (B, Hkv, capacity, D)
        q = cpu_kernels.rope_store(self.project(x, gate), cos, sin, self.num_heads, k_cache, v_cache,
                                   cache.starts)  # (B, T, H, D)
        if q_scale is not None:
            q = q * q_scale
        return cpu_kernels.attention(q, k_cache, v_cache, cache.span, mask.per_query)  # (B, T, H*D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = AdaptableLinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = AdaptableLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = AdaptableLinear(cfg.intermediate_size, cfg.hidden_size)
        self.gate_up: FusedLinear | None = None  # set by Transformer.prepare_for_inference

    def forward(self, x, gate):
        if self.gate_up is not None and cpu_kernels.applies(x):
            return self.down_proj(cpu_kernels.silu_mul(self.gate_up(x, gate)), gate)
        if self.gate_up is not None:
            g, u = self.gate_up(x, gate).chunk(2, dim=-1)  # (B, T, I) each
        else:
            g, u = self.gate_proj(x, gate), self.up_proj(x, gate)
        return self.down_proj(F.silu(g) * u, gate)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def products(self) -> tuple:
        """The layer's inference products in the order a forward runs them (set by
        Transformer.prepare_for_inference): fused q/k/v, o, fused gate/up, down."""
        return self.self_attn.qkv, self.self_attn.o_proj, self.mlp.gate_up, self.mlp.down_proj

    def forward(self, x, rope, mask, cache, layer, gate):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, gate)
        return x + self.mlp(self.post_attention_layernorm(x), gate)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.rope, config.head_dim)
        self._packed_head: InferenceWeight = None
        self.quantization = "none"
        self.sampler_head: SamplerHead | None = None  # part of a draft adapter (model/sampler_head.py)
        # decode steps through captured graphs over static caches (model/step_graphs.py), or None
        self.step_graphs = None
        # every layer as one C call where every product runs on blockdiff's kernels (w4a8, or
        # bf16 on AMX tiles; model/cpu_kernels.py), or None
        self._decoder_stack: cpu_kernels.DecoderStack | None = None

    def prepare_for_inference(self, quantization: str = "none") -> None:
        """Fuse the q/k/v and gate/up products and prepare every product's weight for its kernel:
        bf16 weights in AMX tiles where the CPU has them (model/cpu_bf16.c), else oneDNN's
        packed layout; with quantization "int4", "int8", "fp16" or "w4a8", every product's
        weight, the output head's too, in that format (model/quantize.py). Where every product
        runs on blockdiff's own kernels the layers run as one C call (model/cpu_decoder.c).
        Call again after changing weights; training must not use it (the fused and packed
        copies do not follow the parameters)."""
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; allowed: {', '.join(QUANTIZATIONS)}")
        reason = unavailable(quantization, self.dtype, self.device)
        if reason is not None:
            raise ValueError(reason)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], quantization)
            mlp.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], quantization)
            attn.o_proj.pack(quantization)
            mlp.down_proj.pack(quantization)
        self._packed_head = inference_weight(self.head_weight, quantization)
        self.quantization = quantization
        self._gather_kernel_weights()
        self._decoder_stack = self._build_decoder_stack()

    def _build_decoder_stack(self) -> cpu_kernels.DecoderStack | None:
        """The layers as one call when every product of every layer runs on blockdiff's own
        kernels: w4a8, or bf16 in AMX tiles (a product in another format keeps the layers in
        Python)."""
        products = [tuple(product.packed for product in layer.products()) for layer in self.layers]
        if not all(isinstance(p, W4A8Weight | cpu_kernels.Bf16TileWeight) for ps in products for p in ps):
            return None
        norms = [(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
                 for layer in self.layers]
        adaptable = []  # (product index, LoRA-carrying module, first output column): cpu_decoder.c's order
        for layer in self.layers:
            qkv, gate_up = layer.self_attn.qkv, layer.mlp.gate_up
            adaptable.append([(0, part, lo) for part, (lo, _) in zip(qkv.parts, qkv.columns)]
                             + [(1, layer.self_attn.o_proj, 0)]
                             + [(2, part, lo) for part, (lo, _) in zip(gate_up.parts, gate_up.columns)]
                             + [(3, layer.mlp.down_proj, 0)])
        return cpu_kernels.DecoderStack(norms, products, adaptable, self.config.rms_norm_eps)

    def _gather_kernel_weights(self) -> None:
        """The tensors of every weight prepared for a kernel of blockdiff's or ATen's (quantized,
        or bf16 in AMX tiles) into one buffer on huge pages, in the order a forward reads them
        (model/huge_pages.py)."""
        places = [(product, "packed") for layer in self.layers for product in layer.products()]
        places.append((self, "_packed_head"))
        weights = [getattr(owner, name) for owner, name in places]
        fields = [[f.name for f in dataclasses.fields(w) if isinstance(getattr(w, f.name), torch.Tensor)]
                  if dataclasses.is_dataclass(w) else [] for w in weights]  # fp16's packed copy is fbgemm's own
        tensors = [getattr(w, f) for w, names in zip(weights, fields) for f in names]
        if not tensors:
            return
        copies = iter(huge_pages.gather(tensors))
        for (owner, name), weight, names in zip(places, weights, fields):
            if names:
                setattr(owner, name, dataclasses.replace(weight, **{f: next(copies) for f in names}))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, pattern: Pattern = "causal",
                adapter_gate: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, hidden); call `logits` on the rows you need.

        positions default to each row's cache length onward. With a cache, the new keys and
        values are stored past the valid length; the caller commits them with cache.advance.
        adapter_gate: (B, T) bool/0-1, which tokens use the draft adapter (None: none do).
        With a static cache (kv_cache.py) nothing here reads the host or copies to the device
        when the inputs are on the device already: the forward can be captured (step_graphs.py).
        """
        B, T = input_ids.shape
        if cache is None and cpu_kernels.applies(self.embed_tokens.weight):
            # the fused attention reads keys from a cache: an empty one serves a forward without
            cache = KVCache(self.config, B, T, self.dtype, self.device)
        static = cache is not None and cache.static
        if cache is not None:
            cache.begin(T)
        if static:
            lengths = cache.device_lengths
            mask = AttentionMask(visibility(pattern, lengths, T, cache.span, self.device), False)
        else:
            lengths = torch.zeros(B, dtype=torch.long) if cache is None else cache.lengths
            mask = AttentionMask.build(pattern, lengths, T, T if cache is None else cache.span, self.device)
        if positions is None:
            positions = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
        positions = positions.to(self.device)
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        rope = (cos, sin, self.rotary.query_scale(positions, self.dtype))
        gate = None
        # a static forward applies a gate it is given even when it is all 0: same result, no host read
        if adapter_gate is not None and (static or bool(adapter_gate.any())):
            gate = adapter_gate.to(self.device, self.dtype)[..., None]  # (B, T, 1)
        x = self.embed_tokens(input_ids.to(self.device))  # (B, T, hidden)
        if (self._decoder_stack is not None and rope[2] is None and isinstance(cache, KVCache) and not static
                and cpu_kernels.applies(x)):
            self._decoder_stack(x, cos, sin, self.config.num_heads, cache.k, cache.v, cache.starts, cache.span,
                                mask.per_query, self.config.intermediate_size, gate)
            return self.norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i, gate)
        return self.norm(x)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., vocab) float32 logits."""
        return linear(hidden, self.head_weight, self._packed_head).float()

    def lora_modules(self) -> dict[str, AdaptableLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, AdaptableLinear)}
