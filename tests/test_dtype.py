"""dtype="auto": bf16 only where the hardware multiplies it natively, float32 elsewhere."""
import pytest
import torch

from blockdiff import LLM
from blockdiff.model import dtype as dtypes
from blockdiff.train.config import TrainConfig
from blockdiff.train.model_setup import autocast_dtype


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request, monkeypatch) -> bool:
    monkeypatch.setattr(dtypes, "native_bf16", lambda device="cpu": request.param)
    return request.param


def test_auto_is_bf16_only_where_it_is_native(native):
    assert dtypes.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert dtypes.resolve_dtype("float32") == torch.float32  # an explicit choice is never overridden
    assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16


def test_llm_loads_in_the_resolved_dtype(tiny_dir, native):
    llm = LLM(tiny_dir)  # the default is auto
    expected = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in llm.model.parameters()} == {expected}
    out = llm.generate(["the cat"], max_new_tokens=4, use_tqdm=False)
    assert len(out[0].token_ids) == 4


def test_training_autocast_follows_auto(native, monkeypatch):
    import blockdiff.train.model_setup as model_setup
    monkeypatch.setattr(model_setup, "native_bf16", dtypes.native_bf16)
    run = TrainConfig().run
    assert run.dtype == "auto"
    assert autocast_dtype(run) == (torch.bfloat16 if native else None)
    run.dtype = "fp32"
    assert autocast_dtype(run) is None
    run.dtype = "fp16"
    assert autocast_dtype(run) == torch.float16


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*auto, bfloat16, float32, float16"):
        dtypes.resolve_dtype("fp8")
