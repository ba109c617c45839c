"""Moving trained weights and optimizer state between a (possibly sharded) run and a checkpoint.

Unsharded runs use the plain state dicts; FSDP runs gather full tensors to CPU on save and
scatter them back on load through torch.distributed.checkpoint.state_dict.
"""
from __future__ import annotations

import random

import torch
from torch import nn

from blockdiff.train.objective import ObjectiveModule


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def get_weights(objective: ObjectiveModule, trainable: list[str], sharded: bool) -> dict[str, torch.Tensor]:
    """{name in the Transformer's state_dict: fp32 CPU tensor} for the trained parameters."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        full = get_model_state_dict(objective, options=_options(cpu_offload=True))
        return {n: full["model." + n] for n in trainable if "model." + n in full}
    params = dict(objective.model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in trainable}


def set_weights(objective: ObjectiveModule, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(objective, {"model." + n: t for n, t in weights.items()},
                             options=_options(strict=False))
        return
    params = dict(objective.model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint tensor {missing[0]} is not a parameter of this model (config changed?)")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def get_optimizer(objective: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(objective, optimizer, options=_options(cpu_offload=True))
    return optimizer.state_dict()


def set_optimizer(objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(objective, optimizer, state, options=_options())
        return
    optimizer.load_state_dict(state)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(
        [x for x in random.getstate()[1]], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Training noise comes from explicitly seeded generators; the global streams are restored
    too so that anything else drawing from them (dropout, user hooks) resumes in step."""
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(int(x) for x in state["python"].tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
