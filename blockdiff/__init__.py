"""blockdiff: one block-diffusion checkpoint, four decoding modes, chosen per call."""
from blockdiff.decoding.grammar import StructuredOutputs
from blockdiff.sampling import MODES, SamplingParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "MODES"]
__version__ = "0.1.0"


def __getattr__(name):
    # imported lazily so `import blockdiff` (and the CLI's --help) stays fast
    if name == "LLM":
        from blockdiff.engine.llm import LLM
        return LLM
    raise AttributeError(name)
