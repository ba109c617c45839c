"""blockdiff's CPU kernels for inference forwards, built for this CPU on first use.

A one-token forward of a small model is mostly small ATen ops, not products: SmolLM2-135M's
runs about 2,200 of them, each a Python call and a dispatch, for RMSNorm's five steps, RoPE,
the cache write, the float32 attention of model/attention.py and SwiGLU's activation. Here
each of those is one call per layer (cpu_kernels.c), computed per row (rows independent of the
width, as attention.py's contract requires; the C file says how), on torch's own OpenMP
threads. Products have kernels here too: w4a8 (cpu_w4a8.c, model/quantize.py's format) and
bf16 on the AMX tile unit (cpu_bf16.c, `Bf16TileWeight`); where every product of a model runs
on them, `DecoderStack` runs all its layers as one call (cpu_decoder.c).

The library is compiled with the system C compiler for the machine at hand (-march=native)
and cached by source, flags and CPU; `available()` is False, and the model keeps its ATen
path, where there is no compiler, on non-x86 hosts, on CPUs without AVX2 and FMA (the portable
C, which the tests compare the vector code with, is slower than ATen there), or with
BLOCKDIFF_CPU_KERNELS=0. The two
paths round differently in the last bits (float32 sums in another order), so one process
uses one of them throughout: every forward of a CPU model in bf16 or float32 without
gradients takes the kernels when they are available.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_kernels.c", "cpu_w4a8.c", "cpu_bf16.c", "cpu_decoder.c"))
HEADER = Path(__file__).with_name("cpu_kernels.h")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
log = logging.getLogger(__name__)

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "bd_rms_norm": [_P, _P, _P, _I, _I, _F, ctypes.c_int],
    "bd_silu_mul": [_P, _P, _I, _I, ctypes.c_int],
    "bd_rope_store": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_int],
    "bd_attention": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _F, ctypes.c_int],
    "bd_vectorized": [],
    "bd_w4a8_linear": [_P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int],
    "bd_w4a8_path": [],
    "bd_bf16_amx": [],
    "bd_bf16_linear": [_P, _P, _P, _I, _I, _I],
    "bd_decoder_stack": [_P, _P, _I, _P, _P, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _F, _F,
                         _P, ctypes.c_int],
}


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("BLOCKDIFF_KERNEL_CACHE", Path(root) / "blockdiff" / "kernels"))


def build(flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library compiled with `flags` for this CPU, unless a cached build exists."""
    compiler = os.environ.get("CC", "cc")
    sources = [path.read_text() for path in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*sources, compiler, *flags, _cpu_identity()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"blockdiff_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"], check=True, capture_output=True, text=True)
            os.replace(built, target)  # atomic: concurrent builders leave one whole file
    return target


def load(path: Path) -> ctypes.CDLL:
    # torch is loaded already, so the library's libgomp.so.1 resolves to torch's own OpenMP
    # runtime: the kernels share torch's thread pool instead of starting a second one
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built (the reason is logged)."""
    if os.environ.get("BLOCKDIFF_CPU_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        lib = load(build())
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("blockdiff's fused CPU kernels are unavailable, using ATen ops: %s", detail)
        return None
    if not lib.bd_vectorized():
        log.info("this CPU has no AVX2 and FMA: PyTorch's own ops run the inference forwards")
        return None
    return lib


def available() -> bool:
    return library() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether a forward over `x` runs through the kernels: on the CPU, in bf16 or float32,
    without gradients (training keeps autograd's ATen ops), with the library built."""
    return x.device.type == "cpu" and x.dtype in DTYPE_CODES and not torch.is_grad_enabled() and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., dim) -> (..., dim): RMSNorm with the reference models' rounding (cpu_kernels.c)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().bd_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                          x.shape[-1], eps, DTYPE_CODES[x.dtype])
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2*I) [gate | up] -> (..., I): silu(gate) * up, rounded as PyTorch rounds."""
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    library().bd_silu_mul(gate_up.data_ptr(), out.data_ptr(), out.numel() // out.shape[-1], out.shape[-1],
                          DTYPE_CODES[gate_up.dtype])
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               k_cache: torch.Tensor, v_cache: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """qkv (B, T, H + 2*Hkv, D) -> rotated queries (B, T, H, D); the rotated keys and the values
    go to slots starts[b] + t of the (B, Hkv, capacity, D) caches. cos, sin: (B, T, 1, D)."""
    B, T, heads, D = qkv.shape
    Hkv = (heads - num_heads) // 2
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    _check_cache(k_cache, v_cache, qkv.dtype)
    _check_slots(starts, T, k_cache)
    starts = starts.contiguous()
    q = qkv.new_empty(B, T, num_heads, D)
    library().bd_rope_store(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
                            v_cache.data_ptr(), starts.data_ptr(), B, T, num_heads, Hkv, D, k_cache.stride(0),
                            k_cache.stride(1), DTYPE_CODES[qkv.dtype])
    return q


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: int,
              visible: torch.Tensor | None) -> torch.Tensor:
    """q (B, T, H, D) over the first `span` slots of the (B, Hkv, capacity, D) caches -> (B, T, H*D).
    visible: (B, T, span) contiguous bool, or None when every query sees every key."""
    B, T, H, D = q.shape
    q = q.contiguous()
    _check_cache(k_cache, v_cache, q.dtype)
    _check_span(q.shape, k_cache, span, visible)
    out = q.new_empty(B, T, H * D)
    library().bd_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           None if visible is None else visible.data_ptr(), out.data_ptr(), B, T, H,
                           k_cache.shape[1], D, span, k_cache.stride(0), k_cache.stride(1), D ** -0.5,
                           DTYPE_CODES[q.dtype])
    return out


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernels address a cache as rows of heads of contiguous slots; both caches alike."""
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise ValueError(f"the KV cache is {k_cache.dtype}, the activations {dtype}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride()[1:] != (k_cache.shape[2] * k_cache.shape[3], k_cache.shape[3], 1):
        raise ValueError(f"the KV cache's layout {k_cache.stride()} is not rows of contiguous heads")


def _check_slots(starts: torch.Tensor, T: int, k_cache: torch.Tensor) -> None:
    """T new tokens from slot starts[b] on fit each of the cache's rows."""
    B = k_cache.shape[0]
    if starts.shape != (B,) or starts.dtype != torch.int64 or int(starts.max()) + T > k_cache.shape[2]:
        raise ValueError(f"{T} tokens from slots {starts.tolist()} do not fit {B} cache rows of {k_cache.shape[2]} slots")


def _check_span(query_shape: tuple[int, ...], k_cache: torch.Tensor, span: int, visible: torch.Tensor | None) -> None:
    """(B, T, H, D) queries over the first `span` slots of the cache, through `visible`."""
    B, T, H, D = query_shape
    if span > k_cache.shape[2] or k_cache.shape[0] != B or k_cache.shape[3] != D or H % k_cache.shape[1]:
        raise ValueError(f"queries {tuple(query_shape)} over a span of {span} keys of a {tuple(k_cache.shape)} cache")
    if visible is not None and (visible.shape != (B, T, span) or visible.dtype != torch.bool or not visible.is_contiguous()):
        raise ValueError(f"visibility must be a contiguous bool ({B}, {T}, {span}) tensor, got {tuple(visible.shape)} {visible.dtype}")


def w4a8_linear(rows: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, out_features: int) -> torch.Tensor:
    """(n, in) bf16/float32 -> (n, out_features): the int4-weight, int8-activation product of
    cpu_w4a8.c over weights packed by model/quantize.py (codes uint8, d and m float16)."""
    n, in_features = rows.shape
    rows = rows.contiguous()
    if (codes.dtype != torch.uint8 or codes.numel() * 2 != in_features * out_features or d.dtype != torch.float16
            or d.shape != m.shape or d.numel() * 32 != in_features * out_features or in_features % 32 or out_features % 16):
        raise ValueError(f"a packed w4a8 weight of {tuple(codes.shape)} codes and {tuple(d.shape)} scales does not "
                         f"fit ({in_features} -> {out_features})")
    out = rows.new_empty(n, out_features)
    library().bd_w4a8_linear(rows.data_ptr(), codes.data_ptr(), d.data_ptr(), m.data_ptr(), out.data_ptr(), n,
                             in_features, out_features, DTYPE_CODES[rows.dtype])
    return out


@dataclass
class Bf16TileWeight:
    """A bf16 weight in the AMX tile layout of cpu_bf16.c: for each tile of 16 outputs and block of
    32 inputs, 16 input pairs x 16 outputs x 2 values."""
    packed: torch.Tensor  # (out/16, in/32, 16, 16, 2) bf16
    out_features: int

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) bf16 -> (n, out) bf16."""
        n, in_features = rows.shape
        if rows.dtype != torch.bfloat16 or in_features != self.packed.shape[1] * 32:
            raise ValueError(f"a {tuple(rows.shape)} {rows.dtype} input does not fit a bf16 tile weight of "
                             f"{self.packed.shape[1] * 32} inputs")
        rows = rows.contiguous()
        out = rows.new_empty(n, self.out_features)
        library().bd_bf16_linear(rows.data_ptr(), self.packed.data_ptr(), out.data_ptr(), n, in_features,
                                 self.out_features)
        return out


def pack_bf16_tiles(weight: torch.Tensor) -> Bf16TileWeight:
    """(out, in) bf16 weight -> Bf16TileWeight."""
    out, inp = weight.shape
    tiles = weight.detach().reshape(out // 16, 16, inp // 32, 16, 2)  # (tile, j, block, pair, 2)
    return Bf16TileWeight(tiles.permute(0, 2, 3, 1, 4).contiguous(), out)  # (tile, block, pair, j, 2)


@functools.cache
def bf16_tiles() -> bool:
    """Whether bf16 products run on the AMX tile unit here: the library built with AMX, Linux
    lending the tile registers, and a row's result checked not to depend on the rows beside it."""
    if library() is None or not library().bd_bf16_amx():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = pack_bf16_tiles(torch.randn(48, 96, generator=generator).bfloat16())
    return same_rows_at_every_width(weight, torch.randn(40, 96, generator=generator).bfloat16(), range(1, 36))


def same_rows_at_every_width(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, widths: range) -> bool:
    """Whether each row of product(x) comes out the same among fewer rows: every width in
    `widths` at offsets 0, 1 and 5 (kernels picked by the CPU's instruction set are checked on
    the machine before a model uses them)."""
    reference = product(x)
    return all(torch.equal(product(x[start:start + n]), reference[start:start + n])
               for start in (0, 1, 5) for n in widths)


def bf16_tile_weight(weight: torch.Tensor) -> Bf16TileWeight | None:
    """`weight` in the tile layout, where it is a bf16 CPU weight the unit takes (output size a
    multiple of 16, input size of 32) on a CPU with AMX; else None."""
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2
            or weight.shape[0] % 16 or weight.shape[1] % 32 or not bf16_tiles()):
        return None
    return pack_bf16_tiles(weight)


class _Product(ctypes.Structure):
    _fields_ = [("codes", _P), ("steps", _P), ("minimums", _P), ("tiles", _P), ("kind", _I)]


class _Lora(ctypes.Structure):
    _fields_ = [("A", _P), ("B", _P), ("A_tiles", _P), ("B_tiles", _P), ("product", _I), ("rank", _I), ("column", _I),
                ("width", _I), ("scale", _F)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_attention_norm", _P), ("qkv", _Product), ("o", _Product),
                ("gate_up", _Product), ("down", _Product), ("loras", ctypes.POINTER(_Lora)), ("num_loras", _I)]


class DecoderStack:
    """The decoder layers of a model whose products are all W4A8Weights or Bf16TileWeights, as
    one call of cpu_decoder.c. Holds every tensor it
    points at, so the pointers stay valid while it lives; build it again when the weights change
    (Transformer.prepare_for_inference does). Adapters are read from their modules when a
    gated (draft) forward runs, so one attached or replaced later is the one used."""

    def __init__(self, norms: list[tuple[torch.Tensor, torch.Tensor]], products: list[tuple], adaptable: list[list],
                 eps: float):
        """norms: each layer's (input, post-attention) RMSNorm weights; products: each layer's
        (qkv, o, gate_up, down) W4A8Weights or Bf16TileWeights; adaptable: each layer's (product index, module
        with lora_A/lora_B/lora_scale, first output column) for every part of its products."""
        def tensors(p) -> tuple[torch.Tensor, ...]:
            return (p.packed,) if isinstance(p, Bf16TileWeight) else (p.codes, p.steps, p.minimums)

        self.tensors = [t for pair in norms for t in pair] + [t for ps in products for p in ps for t in tensors(p)]
        if not all(t.is_contiguous() for t in self.tensors):
            raise ValueError("the decoder stack reads contiguous weights")

        def product(p) -> _Product:
            if isinstance(p, Bf16TileWeight):
                return _Product(None, None, None, p.packed.data_ptr(), 1)
            return _Product(p.codes.data_ptr(), p.steps.data_ptr(), p.minimums.data_ptr(), None, 0)

        self.layers = (_Layer * len(norms))(*[_Layer(a.data_ptr(), b.data_ptr(), *map(product, ps), None, 0)
                                              for (a, b), ps in zip(norms, products)])
        self.dtype = norms[0][0].dtype
        self.eps = eps
        self.adaptable = adaptable
        self._adapters_seen = None  # what the layers' LoRA arrays were built from
        self._adapter_arrays: list = []

    def _sync_adapters(self) -> None:
        """Point each layer at its modules' current LoRA weights (rebuilt only when they change)."""
        # the arrays hold the adapters they were built from, so an id seen here is not reused
        seen = [(id(m.lora_A), id(m.lora_B), m.lora_scale) for parts in self.adaptable for _, m, _ in parts]
        if seen == self._adapters_seen:
            return
        self._adapter_arrays = []
        for layer, parts in zip(self.layers, self.adaptable):
            loras = []
            for index, module, column in parts:
                if module.lora_A is None:
                    continue
                A, B = module.lora_A.detach(), module.lora_B.detach()
                if A.dtype != self.dtype or not (A.is_contiguous() and B.is_contiguous()):
                    raise ValueError(f"an adapter of {A.dtype} or non-contiguous weights does not fit a {self.dtype} stack")
                # wide draft passes multiply on the tile unit where the model's products do
                A_tiles, B_tiles = bf16_tile_weight(A), bf16_tile_weight(B)
                tiled = A_tiles is not None and B_tiles is not None and A.shape[0] % 32 == 0
                tiles = (A_tiles.packed.data_ptr(), B_tiles.packed.data_ptr()) if tiled else (None, None)
                self._adapter_arrays += [A, B] + ([A_tiles, B_tiles] if tiled else [])
                loras.append(_Lora(A.data_ptr(), B.data_ptr(), *tiles, index, A.shape[0], column, B.shape[0],
                                   module.lora_scale))
            array = (_Lora * max(len(loras), 1))(*loras)
            self._adapter_arrays.append(array)
            layer.loras, layer.num_loras = ctypes.cast(array, ctypes.POINTER(_Lora)), len(loras)
        self._adapters_seen = seen

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k: torch.Tensor,
                 v: torch.Tensor, starts: torch.Tensor, span: int, visible: torch.Tensor | None,
                 intermediate_size: int, gate: torch.Tensor | None = None) -> None:
        """x (B, T, hidden) contiguous, updated in place through every layer; k, v: the
        (layers, B, Hkv, capacity, D) caches; gate: (B, T), the rows that run the adapters, or
        None; the rest as `rope_store` and `attention` take them."""
        B, T, hidden = x.shape
        D, Hkv = k.shape[-1], k.shape[2]
        if x.dtype != self.dtype or not x.is_contiguous() or k.shape[0] != len(self.layers) or k.stride(0) != v.stride(0):
            raise ValueError(f"a {tuple(x.shape)} {x.dtype} stream and {tuple(k.shape)} caches do not fit the "
                             f"decoder stack of {len(self.layers)} {self.dtype} layers")
        cos, sin = cos.contiguous(), sin.contiguous()
        if cos.shape != (B, T, 1, D) or sin.shape != cos.shape:
            raise ValueError(f"RoPE tables {tuple(cos.shape)} do not fit ({B}, {T}, 1, {D})")
        _check_cache(k[0], v[0], x.dtype)
        _check_slots(starts, T, k[0])
        _check_span((B, T, num_heads, D), k[0], span, visible)
        starts = starts.contiguous()
        if gate is not None:
            if gate.numel() != B * T:
                raise ValueError(f"an adapter gate of {tuple(gate.shape)} does not fit ({B}, {T}) tokens")
            gate = gate.reshape(B * T).float().contiguous()
            self._sync_adapters()
        library().bd_decoder_stack(x.data_ptr(), self.layers, len(self.layers), k.data_ptr(), v.data_ptr(), k.stride(0),
                                   k.stride(1), k.stride(2), cos.data_ptr(), sin.data_ptr(), starts.data_ptr(),
                                   None if visible is None else visible.data_ptr(), span, B, T, hidden, num_heads,
                                   Hkv, D, intermediate_size, self.eps, D ** -0.5,
                                   None if gate is None else gate.data_ptr(), DTYPE_CODES[x.dtype])
