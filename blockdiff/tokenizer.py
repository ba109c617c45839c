"""Tokenizer: a `tokenizers.Tokenizer` plus the special-token ids and the chat template."""
from __future__ import annotations

import json
import os
import re
import warnings
from datetime import datetime
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, processors

from blockdiff.errors import CheckpointError

# How llama.cpp names the pre-tokenizer ("tokenizer.ggml.pre") -> pre-tokenizer pieces before the
# byte-level mapping. Splitting must match training, or merges apply to the wrong spans.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_CONTROL = 3  # llama.cpp token types: 1 normal, 3 control, 4 user-defined
_GGUF_USER_DEFINED = 4
# byte-level BPE stores byte b as this character (GPT-2's table): printable bytes as themselves
_BYTE_CHARS = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_CHAR_TO_BYTE = {chr(b): b for b in _BYTE_CHARS} | {
    chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in _BYTE_CHARS)}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte tokens


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp: every digit is its own piece, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in ("default", "gpt2", "gpt-2", ""):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known; splitting text with the GPT-2 rule")
    return byte_level


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (used by some templates to mark assistant text): render the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


class Tokenizer:
    """Text <-> token ids, special tokens and chat-template rendering."""

    def __init__(self, tok: tokenizers.Tokenizer, chat_template: str | None = None,
                 bos_token: str | None = None, eos_tokens: list[str] | None = None,
                 extra_eos_ids: list[int] | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_tokens = list(eos_tokens or [])
        ids = [tok.token_to_id(t) for t in self.eos_tokens] + list(extra_eos_ids or [])
        self._eos_ids = list(dict.fromkeys(i for i in ids if i is not None))  # unique, in order
        self._template: jinja2.Template | None = None

    # --- ids and text ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """The vocabulary entry as stored (byte-level pieces look like 'Ġthe'); '' if unknown."""
        return self.tok.id_to_token(int(token_id)) or ""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for: its text's UTF-8, or, for a token that holds part of
        a character (its text decodes to U+FFFD), the raw bytes of its vocabulary entry."""
        text = self.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.token_str(token_id)
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match[1], 16)])
        if piece and all(c in _CHAR_TO_BYTE for c in piece):
            return bytes(_CHAR_TO_BYTE[c] for c in piece)
        return text.encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    # --- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the model's Jinja template, as transformers does (extra kwargs reach the template)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass a raw prompt instead of messages")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        eos = self.eos_tokens[0] if self.eos_tokens else None
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=eos, **kwargs)

    # --- construction and saving -----------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json and the template / special tokens from a Hugging Face style directory."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise CheckpointError(f"{path}: no tokenizer.json in {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_file)
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise CheckpointError(f"{tok_file}: cannot parse tokenizer ({e})") from e

        def opt(name: str) -> dict:
            p = os.path.join(path, name)
            return _read_json(p) if os.path.isfile(p) else {}

        cfg, special_map = opt("tokenizer_config.json"), opt("special_tokens_map.json")
        bos = _token_content(cfg.get("bos_token", special_map.get("bos_token")))
        eos = _token_content(cfg.get("eos_token", special_map.get("eos_token")))
        template = cls._find_template(path, cfg)
        gen_eos = opt("generation_config.json").get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        return cls(tok, template, bos, [eos] if eos else [], gen_eos)

    @staticmethod
    def _find_template(path: str, cfg: dict) -> str | None:
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        template = cfg.get("chat_template")
        json_file = os.path.join(path, "chat_template.json")
        if template is None and os.path.isfile(json_file):
            template = _read_json(json_file).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        return template

    @classmethod
    def from_gguf(cls, reader: Any, path: str = "<gguf>") -> "Tokenizer":
        """Build a byte-level BPE tokenizer from a `gguf.GGUFReader`'s tokenizer.ggml.* metadata.

        `path` only names the file in error messages."""

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(field("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> ...) must match whole and be skippable when decoding.
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
        tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])

        def token_of(key: str) -> str | None:
            i = field(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos = token_of("tokenizer.ggml.bos_token_id")
        if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        eos = [t for t in (token_of("tokenizer.ggml.eos_token_id"), token_of("tokenizer.ggml.eot_token_id"))
               if t is not None]
        return cls(tok, field("tokenizer.chat_template"), bos, list(dict.fromkeys(eos)))

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (template, bos/eos) into directory `path`."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                               "eos_token": self.eos_tokens[0] if self.eos_tokens else None}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)
