"""`blockdiff distill`: the model's own greedy answers, resumable, in a format training reads."""
import json

import pytest

from blockdiff.bench.prompts import Prompt, load_prompts
from blockdiff.engine.llm import LLM
from blockdiff.train.data import iter_documents
from blockdiff.train.distill import count_lines, distill
from support.models import save_tiny_checkpoint


def write_prompts(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_bad_prompt_lines_are_named(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r'p.jsonl:3: expected exactly one of "prompt" or "messages"'):
        load_prompts(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: Expecting value"):
        load_prompts(str(bad))


def test_a_torn_last_line_is_cut_off(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert count_lines(str(out)) == 2
    assert out.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert count_lines(str(tmp_path / "missing.jsonl")) == 0


def test_distill_writes_greedy_answers_and_resumes(tmp_path):
    llm = LLM(save_tiny_checkpoint(tmp_path / "m"), dtype="float32")
    prompts = load_prompts(write_prompts(tmp_path / "p.jsonl", [
        {"prompt": "the cat sat"}, {"messages": [{"role": "user", "content": "hello there"}]},
        {"prompt": "def main():"}]))
    out = str(tmp_path / "d.jsonl")
    params = dict(mode="ar", max_new_tokens=5, temperature=0.0)
    assert distill(llm, prompts[:2], out, batch_size=2, chat=True, log=lambda _: None, **params) == 2
    assert distill(llm, prompts, out, batch_size=2, chat=True, log=lambda _: None, **params) == 1  # resumes
    assert distill(llm, prompts, out, batch_size=2, chat=True, log=lambda _: None, **params) == 0
    records = [json.loads(line) for line in open(out)]
    assert [r["messages"][0]["content"] for r in records] == ["the cat sat", "hello there", "def main():"]
    for record in records:
        expected = llm.chat(record["messages"][:1], use_tqdm=False, **params)[0].text
        assert record["messages"][-1] == {"role": "assistant", "content": expected}
    # the output is training data: the answer is in the loss, the question is not
    docs = list(iter_documents([out], llm.tokenizer))
    assert len(docs) == 3 and all([in_loss for _, in_loss in segs] == [False, True] for _, segs in docs)


def test_raw_prompts_give_prompt_completion_records(tmp_path):
    llm = LLM(save_tiny_checkpoint(tmp_path / "m"), dtype="float32")
    out = str(tmp_path / "d.jsonl")
    distill(llm, [Prompt(text="the cat")], out, batch_size=4, chat=False, log=lambda _: None,
            mode="ar", max_new_tokens=4, temperature=0.0)
    record = json.loads(open(out).read())
    assert record == {"prompt": "the cat", "completion": llm.generate("the cat", max_new_tokens=4,
                                                                      use_tqdm=False)[0].text}
