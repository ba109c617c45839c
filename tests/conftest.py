"""Session fixtures: the embedded default model, loaded once, by us and by transformers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import support/ as a package
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    from blockdiff.model.registry import smollm2_gguf_path
    return str(smollm2_gguf_path())


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own GGUF loading and LlamaForCausalLM: an implementation no one here wrote."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="session")
def default_llm():
    """The default model in float32 (tests/test_width_invariance.py covers the default dtype),
    speculating at every batch size: the tests check speculation itself."""
    from blockdiff import LLM
    return LLM(dtype="float32", spec_disable_batch_size=None)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    from support.models import save_tiny_checkpoint
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


# Fixtures that load the embedded default model (seconds each) or start processes: a test
# that uses one is part of `make test` only, not `make test-fast`.
SLOW_FIXTURES = {"gguf_path", "hf_model", "hf_tokenizer", "default_llm", "native_llm"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
