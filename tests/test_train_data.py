"""Training data: reading, loss masks, packing, the resumable sampler, BPE training."""
import json

import pytest
import torch

from blockdiff.tokenizer import Tokenizer
from blockdiff.train.config import DataConfig, config_from_dict
from blockdiff.train.data import is_validation, list_files, load_data
from blockdiff.train.sampler import EpochSampler
from blockdiff.train.tokenizer_train import MASK_TOKEN, save_tokenizer, special_ids, train_tokenizer

CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = train_tokenizer([CODE * 3, "the cat sat on the mat. " * 10], vocab_size=400)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(t, str(out))
    return Tokenizer.from_dir(out)


def test_tokenizer_round_trip_and_special_tokens(tok):
    ids = special_ids(tok)
    assert ids["mask"] == 3 and tok.tok.token_to_id(MASK_TOKEN) == 3
    assert tok.eos_token_ids == [0, 2]
    assert tok.decode(tok.encode(CODE)) == CODE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok.encode("<|mask|>") == [3]


def test_files_directories_and_jsonl(tmp_path, tok):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "skip").mkdir()
    (tmp_path / "src" / "pkg" / "a.py").write_text(CODE)
    (tmp_path / "src" / "skip" / "b.py").write_text(CODE)
    (tmp_path / "src" / "notes.bin").write_text("ignored")
    records = [{"text": "the cat"}, {"prompt": "def add", "completion": "(a, b):"},
               {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    files = list_files([str(tmp_path / "src"), str(tmp_path / "d.jsonl")], [".py"], ["skip"])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.py", "d.jsonl"]
    train, val = load_data(DataConfig(paths=[str(tmp_path / "d.jsonl")], seq_len=4), tok)
    assert val is None
    stream, mask = train.tokens.flatten().tolist(), train.loss_mask.flatten().tolist()
    text = tok.decode(stream, skip_special_tokens=False)
    assert text.startswith("the cat<|endoftext|>def add(a, b):<|endoftext|>")
    # the prompt "def add" is outside the loss, its completion inside
    n_cat = len(tok.encode("the cat")) + 1
    n_prompt = len(tok.encode("def add"))
    assert all(mask[:n_cat]) and not any(mask[n_cat:n_cat + n_prompt]) and mask[n_cat + n_prompt]
    # the chat record learns only the answer and the end of turn (the stream may be cut short by packing)
    masked_text = tok.decode([t for t, m in zip(stream, mask) if m][n_cat + 3:], skip_special_tokens=False)
    assert "user" not in masked_text


def test_packing_and_validation_split(tmp_path, tok):
    for i in range(20):
        (tmp_path / f"m{i}.py").write_text(CODE.replace("add", f"add{i}"))
    train, val = load_data(DataConfig(paths=[str(tmp_path)], seq_len=16, val_fraction=0.3), tok)
    assert train.tokens.shape[1] == 16 and val is not None and len(val) > 0
    held = [i for i in range(20) if is_validation(str(tmp_path / f"m{i}.py"), 0.3)]
    assert 0 < len(held) < 20
    again, _ = load_data(DataConfig(paths=[str(tmp_path)], seq_len=16, val_fraction=0.3), tok)
    assert torch.equal(again.tokens, train.tokens)
    with pytest.raises(ValueError, match="no such"):
        load_data(DataConfig(paths=[str(tmp_path / "missing")]), tok)


def test_pad_to_block_starts_every_document_on_a_block_and_learns_the_pads(tmp_path, tok):
    records = [{"prompt": "def add", "completion": "(a, b):"}, {"text": "the cat sat"}, {"text": "x"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train, _ = load_data(DataConfig(paths=[str(tmp_path / "d.jsonl")], seq_len=8, pad_to_block=8), tok)
    stream, mask = train.tokens.flatten().tolist(), train.loss_mask.flatten().tolist()
    eos = tok.eos_token_ids[0]
    plain, _ = load_data(DataConfig(paths=[str(tmp_path / "d.jsonl")], seq_len=1), tok)
    documents, doc = [], []
    for t in plain.tokens.flatten().tolist():  # the unpadded stream, split after each EOS
        doc.append(t)
        if t == eos:
            documents.append(doc)
            doc = []
    assert len(documents) == 3 and len(stream) > sum(map(len, documents))  # some pads were added
    start = 0
    for doc in documents:
        assert start % 8 == 0  # every document starts on a block boundary
        assert stream[start:start + len(doc)] == doc
        end = start + len(doc) + (-len(doc) % 8)
        assert stream[start + len(doc):end] == [eos] * (end - start - len(doc))  # pads: the end-of-text token...
        assert all(mask[start + len(doc) - 1:end])  # ...learned, like the one that ends the document
        start = end
    assert start == len(stream)
    with pytest.raises(ValueError, match="pad_to_block must be 0 or divide data.seq_len"):
        config_from_dict({"base_model": "default", "data": {"paths": ["x"], "seq_len": 100, "pad_to_block": 32}}).validate()


def test_sampler_is_a_permutation_per_epoch_and_resumes_exactly():
    s = EpochSampler(10, seed=3)
    first = s.take(4) + s.take(4) + s.take(2)
    assert sorted(first) == list(range(10)) and s.state_dict()["epoch"] == 1
    whole = EpochSampler(10, seed=3)
    stream = [whole.take(3) for _ in range(8)]
    part = EpochSampler(10, seed=3)
    for _ in range(5):
        part.take(3)
    resumed = EpochSampler(10, seed=3)
    resumed.load_state_dict(part.state_dict())
    assert [resumed.take(3) for _ in range(3)] == stream[5:]
    with pytest.raises(ValueError, match="data"):
        EpochSampler(11, seed=3).load_state_dict(part.state_dict())
