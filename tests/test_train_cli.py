"""The commands: tokenizer train, train (overrides), convert (full and lora), plot-train."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from support.models import tiny_config
from support.train import make_workspace, write_config
from blockdiff.cli import main
from blockdiff.model.adapter import load_adapter
from blockdiff.model.checkpoint import load_checkpoint, save_checkpoint
from blockdiff.model.transformer import Transformer
from blockdiff.tokenizer import Tokenizer
from blockdiff.train.config import load_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    raw = make_workspace(root)
    raw["run"].pop("threads")  # in-process runs must not change this process's thread count
    return root, raw


def test_tokenizer_train_command(tmp_path, workspace, capsys):
    root, _ = workspace
    out = str(tmp_path / "bpe")
    assert main(["tokenizer", "train", str(root / "corpus"), "--out", out, "--vocab-size", "280"]) == 0
    assert "'mask': 3" in capsys.readouterr().out
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 280 and tok.decode(tok.encode("def f(x):")) == "def f(x):"


def test_overrides_by_path_and_by_unique_name(tmp_path, workspace):
    _, raw = workspace
    cfg = write_config(tmp_path, raw)
    c = load_config(cfg, {"optim.lr": "1e-4", "max_steps": "7", "model.num_layers": "3", "data.paths": "[a, b]"})
    assert (c.optim.lr, c.optim.max_steps, c.model["num_layers"], c.data.paths) == (1e-4, 7, 3, ["a", "b"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config(cfg, {"optim.lrr": "1"})
    assert main(["train", "--config", cfg, "--max-steps", "5", "--lr", "0.01", "--print-config"]) == 0


def test_train_from_scratch_then_plot(tmp_path, workspace):
    _, raw = workspace
    cfg = write_config(tmp_path, raw)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run.out_dir", run, "--max_steps", "6", "--eval_every", "3",
                 "--val_fraction", "0.2"]) == 0
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "ar_loss", "diff_loss", "lr", "tokens_per_s"} <= records[0].keys()
    assert "val_ar_loss" in records[2] and "val_diff_loss" in records[5]
    ckpt = load_checkpoint(os.path.join(run, "final"))
    assert ckpt.config.mask_token_id == 3 and ckpt.config.block_size == 4
    assert main(["plot-train", run]) == 0
    with open(os.path.join(run, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_model(workspace):
    """A small 'pretrained' AR checkpoint in HF format to convert."""
    root, raw = workspace
    tok = Tokenizer.from_dir(raw["tokenizer"])
    config = tiny_config(vocab=320, mask_token_id=3)
    torch.manual_seed(1)
    model = Transformer(config)
    out = str(root / "base")
    save_checkpoint((config, model.state_dict(), tok), out)
    conv = {k: v for k, v in raw.items() if k not in ("model", "tokenizer")}
    return out, write_config(root, conv, "convert.yaml")


def test_convert_lora_keeps_the_ar_path_exactly(tmp_path, base_model):
    base, cfg = base_model
    run = str(tmp_path / "lora")
    assert main(["convert", "--config", cfg, "--model", base, "--target", "lora", "--out", run,
                 "--max_steps", "4", "--lora.r", "4", "--lora.alpha", "8"]) == 0
    adapter = json.load(open(os.path.join(run, "final", "adapter_config.json")))
    assert adapter["target_modules"] == ["o_proj"] and adapter["r"] == 4
    ckpt = load_checkpoint(base)
    plain, adapted = Transformer(ckpt.config), Transformer(ckpt.config)
    plain.load_state_dict(ckpt.state_dict)
    adapted.load_state_dict(ckpt.state_dict)
    load_adapter(adapted, os.path.join(run, "final"))
    x = torch.randint(0, 300, (1, 12))
    assert torch.equal(adapted(x), plain(x))  # AR (no gate): the base model, bit for bit
    gate = torch.ones(1, 12, dtype=torch.bool)
    assert not torch.allclose(adapted(x, adapter_gate=gate), plain(x, adapter_gate=gate))  # it learned


def test_convert_lora_continues_from_an_adapter_and_reports_acceptance(tmp_path, base_model):
    base, cfg = base_model
    convert = ["convert", "--config", cfg, "--model", base, "--target", "lora"]
    first = str(tmp_path / "first")
    assert main(convert + ["--out", first, "--max_steps", "2", "--lora.r", "4", "--lora.alpha", "8"]) == 0
    start = os.path.join(first, "final")
    untouched = str(tmp_path / "untouched")  # no steps: the export is the adapter it started from
    assert main(convert + ["--out", untouched, "--max_steps", "0", "--lora.init", start, "--lora.r", "16"]) == 0
    before = load_file(os.path.join(start, "adapter_model.safetensors"))
    after = load_file(os.path.join(untouched, "final", "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    more = str(tmp_path / "more")
    assert main(convert + ["--out", more, "--max_steps", "2", "--lora.init", start, "--eval_every", "2",
                           "--val_fraction", "0.2", "--objective.draft_fraction", "0.5"]) == 0
    last = [json.loads(line) for line in open(os.path.join(more, "metrics.jsonl"))][-1]
    rates = last["val_accept_rate"]  # P(first k drafts accepted), k = 1..3 with blocks of 4
    assert len(rates) == 3 and all(0 <= b <= a <= 1 for a, b in zip(rates, rates[1:]))
    assert abs(last["val_accept_len"] - sum(rates)) < 1e-3


def test_convert_trains_a_sampler_head_with_the_adapter_and_continues_it(tmp_path, base_model):
    base, cfg = base_model
    convert = ["convert", "--config", cfg, "--model", base, "--target", "lora", "--lora.r", "4", "--lora.alpha", "8"]
    first = str(tmp_path / "first")
    assert main(convert + ["--out", first, "--max_steps", "2", "--lora.sampler_head_inner", "8",
                           "--lora.sampler_head_top_k", "3", "--objective.kl_weight", "1"]) == 0
    adapter = json.load(open(os.path.join(first, "final", "adapter_config.json")))
    assert adapter["blockdiff_sampler_head"] == {"inner_size": 8, "top_k": 3}
    head = load_file(os.path.join(first, "final", "sampler_head.safetensors"))
    assert head["up.weight"].abs().sum() > 0  # trained away from its zero start
    more = str(tmp_path / "more")  # lora.init carries the head on, without the option
    assert main(convert + ["--out", more, "--max_steps", "1", "--lora.init", os.path.join(first, "final")]) == 0
    again = load_file(os.path.join(more, "final", "sampler_head.safetensors"))
    assert again.keys() == head.keys() and not torch.equal(again["up.weight"], head["up.weight"])
    head_only = str(tmp_path / "head-only")
    assert main(convert + ["--out", head_only, "--max_steps", "1", "--lora.init", os.path.join(first, "final"),
                           "--lora.train_adapter", "false"]) == 0
    lora_before, lora_after = (load_file(os.path.join(run, "final", "adapter_model.safetensors")) for run in (first, head_only))
    assert all(torch.equal(lora_before[k], lora_after[k]) for k in lora_before)  # the adapter is kept as it was
    trained = load_file(os.path.join(head_only, "final", "sampler_head.safetensors"))
    assert not torch.equal(trained["up.weight"], head["up.weight"])


def test_convert_full_writes_a_loadable_checkpoint(tmp_path, base_model):
    base, cfg = base_model
    run = str(tmp_path / "full")
    assert main(["convert", "--config", cfg, "--model", base, "--out", run, "--max_steps", "2",
                 "--run.export_format", "nld", "--run.export_dtype", "bf16"]) == 0
    out = load_checkpoint(os.path.join(run, "final"))
    assert out.config.checkpoint_format == "nld" and out.config.mask_token_id == 3
    assert out.state_dict["norm.weight"].dtype == torch.bfloat16
    before = load_checkpoint(base).state_dict["layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(out.state_dict["layers.0.self_attn.q_proj.weight"].float(), before, atol=1e-4)
