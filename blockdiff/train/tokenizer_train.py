"""`blockdiff tokenizer train`: a byte-level BPE with the special tokens a three-mode model needs.

Reserved tokens: <|endoftext|> (document separator, eos), <|im_start|>/<|im_end|> (ChatML
turns; <|im_end|> also ends a chat answer), <|mask|> (the diffusion mask token, a row of the
vocabulary, as in NLD) and <|pad|>. They take ids 0..4 in that order.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from blockdiff.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<|pad|>"]
MASK_TOKEN = "<|mask|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, CHATML, None, ["<|endoftext|>", "<|im_end|>"])


def save_tokenizer(tokenizer: Tokenizer, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json (with the mask token, which the model config copies)."""
    tokenizer.save(out_dir)
    cfg_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(mask_token=MASK_TOKEN, pad_token="<|pad|>", additional_special_tokens=SPECIAL_TOKENS)
    with open(cfg_file, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    # generation_config.json lists every end token (tokenizer_config holds only one)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": tokenizer.eos_token_ids}, f)


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    t = tokenizer.tok
    return {"mask": t.token_to_id(MASK_TOKEN), "pad": t.token_to_id("<|pad|>"),
            "eos": tokenizer.eos_token_ids}


def read_texts(files: list[str]) -> Iterable[str]:
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            yield f.read()
