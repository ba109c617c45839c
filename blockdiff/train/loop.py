"""The training loop: one call runs (or resumes) a run described by a TrainConfig.

RUN = cfg.run.out_dir holds config.yaml, metrics.jsonl, checkpoints/ and, at the end,
final/ (an HF/NLD checkpoint directory for target full, a PEFT adapter for target lora).
"""
from __future__ import annotations

import contextlib
import gc
import os
import time

import torch
import yaml

from blockdiff.train import checkpoint as ckpt
from blockdiff.train import distributed as D
from blockdiff.train import run_state
from blockdiff.train.acceptance import draft_acceptance, summarize
from blockdiff.train.batches import micro_batches
from blockdiff.train.config import TrainConfig
from blockdiff.train.data import load_data
from blockdiff.train.export import export_final
from blockdiff.train.metrics import MetricsLog, Progress
from blockdiff.train.model_setup import autocast_dtype, build, count_params
from blockdiff.train.objective import ObjectiveModule, combine, counts
from blockdiff.train.optim import make_optimizer, make_scheduler
from blockdiff.train.sampler import EpochSampler


def resolve_resume(run_dir: str, resume: str | None, log=print) -> str | None:
    """resume: None (fresh run), "latest" (newest good checkpoint, if any) or a checkpoint path."""
    if resume is None:
        return None
    if resume == "latest":
        return ckpt.latest_good(run_dir, log)
    ckpt.verify(resume)  # an explicitly named checkpoint must be good: no silent fallback
    return resume


def _autocast(cfg: TrainConfig, device: torch.device):
    low = autocast_dtype(cfg.run)
    return contextlib.nullcontext() if low is None else torch.autocast(device.type, dtype=low)


def _no_sync(wrapped, d: D.Dist, cfg: TrainConfig, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not d.active or last:
        return contextlib.nullcontext()
    if cfg.run.parallel == "fsdp":
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> str:
    """Run to cfg.optim.max_steps; returns the final output directory."""
    run_dir = cfg.run.out_dir
    start = resolve_resume(run_dir, resume, log if int(os.environ.get("RANK", "0")) == 0 else (lambda _: None))
    torch.set_flush_denormal(True)  # denormals slow fp32 CPU steps by up to 9x
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    d = D.init(cfg.run.device)
    final = _run(cfg, d, resume, start, log)
    # FSDP's hooks keep the sharded modules, and through them the process group, in reference
    # cycles; collect them now, or gloo's worker threads are torn down at interpreter exit,
    # which can abort the process ("terminate called without an active exception")
    gc.collect()
    D.barrier(d)
    D.shutdown(d)
    return final


def _run(cfg: TrainConfig, d: D.Dist, resume: str | None, start: str | None, log) -> str:
    run_dir = cfg.run.out_dir
    os.makedirs(run_dir, exist_ok=True)
    setup = build(cfg)
    model = setup.model.to(d.device)
    train_data, val_data = load_data(cfg.data, setup.tokenizer)
    objective = ObjectiveModule(model, cfg.objective, draft_only=cfg.target == "lora")
    sharded = d.active and cfg.run.parallel == "fsdp"
    wrapped = D.wrap(objective, d, cfg.run.parallel)
    names = list(setup.trainable)
    params = dict(model.named_parameters())  # after wrapping: FSDP swaps in sharded parameters
    optimizer = make_optimizer({n: params[n] for n in names}, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim)
    sampler = EpochSampler(len(train_data), cfg.run.seed)
    step = 0
    if start is not None:
        state = ckpt.load(start)
        run_state.set_weights(objective, state["weights"], sharded)
        run_state.set_optimizer(objective, optimizer, state["optimizer"], sharded)
        scheduler.load_state_dict(state["scheduler"])
        run_state.set_rng_state(state["rng"])
        sampler.load_state_dict(state["state"]["data"])
        step = int(state["state"]["step"])
    elif resume is not None and d.main:
        log(f"no checkpoint in {run_dir} to resume from: starting from step 0")
    if d.main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        n_train = count_params(params[n] for n in names)
        log(f"model {count_params(model.parameters()) / 1e6:.2f}M params, training {n_train / 1e6:.3f}M "
            f"({cfg.target}); {len(train_data)} sequences of {cfg.data.seq_len} tokens; "
            f"{d.world} process(es); " + (f"resumed from {start} at step {step}" if start else "fresh run"))
    metrics = MetricsLog(run_dir, step if start else None) if d.main else None
    progress = Progress(cfg.optim.max_steps, step, cfg.run.progress and d.main)
    per_rank = cfg.optim.micro_batch * cfg.optim.grad_accum
    global_batch = per_rank * d.world
    mask_id = model.config.mask_token_id
    stop_id = setup.tokenizer.eos_token_ids[0] if setup.tokenizer.eos_token_ids else None  # acceptance ends there
    deadline = None if cfg.run.max_minutes is None else time.monotonic() + 60 * cfg.run.max_minutes
    stopping = step >= cfg.optim.max_steps  # a resumed run that had already finished
    while not stopping:
        t0 = time.perf_counter()
        ids = sampler.take(global_batch)
        mine = ids[d.rank * per_rank:(d.rank + 1) * per_rank]
        batches = micro_batches(train_data, mine, d.rank * per_rank, cfg.optim.micro_batch, step,
                                cfg.run.seed, mask_id, cfg.objective, d.device)
        # Normalise by the GLOBAL token counts of the step, known before any forward, so the
        # gradient is the same however the batch is split over processes and micro-batches.
        norms = D.all_sum(sum(counts(b.loss_mask) for b in batches), d)
        sums = torch.zeros(2, dtype=torch.float64, device=d.device)
        for k, b in enumerate(batches):
            with _no_sync(wrapped, d, cfg, k == len(batches) - 1), _autocast(cfg, d.device):
                part = wrapped(b.xt, b.x0, b.loss_mask, b.masked, b.p)
                loss = combine(part.float(), norms, cfg.objective) * d.world  # DDP/FSDP average gradients
            loss.backward()
            sums += part.detach().double()
        if sharded:
            wrapped.set_requires_gradient_sync(True)
        grad_norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        stopping = step >= cfg.optim.max_steps or _past(deadline, d)
        per_token = (D.all_sum(sums, d) / norms.clamp(min=1)).tolist()
        seconds = time.perf_counter() - t0
        record = {"step": step, "loss": float(combine(torch.tensor(per_token), torch.ones(2), cfg.objective)),
                  "ar_loss": per_token[0], "diff_loss": per_token[1] if cfg.objective.kind == "joint" else None,
                  "lr": lr, "grad_norm": float(grad_norm), "tokens": global_batch * cfg.data.seq_len,
                  "tokens_per_s": global_batch * cfg.data.seq_len / seconds, "step_s": seconds}
        if cfg.run.eval_every and val_data is not None and step % cfg.run.eval_every == 0:
            record.update(evaluate(wrapped, objective, val_data, cfg, d, mask_id, stop_id, sharded))
        if d.main:
            if step % cfg.run.log_every == 0 or stopping or "val_ar_loss" in record:
                metrics.write(record)
        progress.update(record)
        if step % cfg.run.save_every == 0 or stopping:
            save(cfg, objective, optimizer, scheduler, sampler, names, sharded, d, step)
        if cfg.run.throttle_s:
            time.sleep(cfg.run.throttle_s)
    progress.close()
    if step < cfg.optim.max_steps and d.main:
        log(f"run.max_minutes ({cfg.run.max_minutes:g}) reached at step {step} of {cfg.optim.max_steps}: "
            f"saved and exporting; --resume continues the schedule")
    return export_final(cfg, objective, setup, names, sharded, d)


def _past(deadline: float | None, d: D.Dist) -> bool:
    """Whether any process is past the deadline: all stop at the same step."""
    if deadline is None:
        return False
    late = torch.tensor([float(time.monotonic() >= deadline)], device=d.device)
    return bool(D.all_sum(late, d).item() > 0)


def save(cfg, objective, optimizer, scheduler, sampler, names, sharded, d, step) -> None:
    # Gathering FSDP state is collective: every rank takes part, rank 0 writes.
    weights = run_state.get_weights(objective, names, sharded)
    opt_state = run_state.get_optimizer(objective, optimizer, sharded)
    if d.main:
        ckpt.save(cfg.run.out_dir, step, weights, opt_state, scheduler.state_dict(), run_state.rng_state(),
                  {"data": sampler.state_dict(), "config": cfg.to_dict(), "world_size": d.world},
                  keep_last=cfg.run.keep_last)
    D.barrier(d)


@torch.no_grad()
def evaluate(wrapped, objective, val_data, cfg: TrainConfig, d: D.Dist, mask_id: int, stop_id: int | None,
             sharded: bool) -> dict:
    """AR and diffusion loss on a fixed slice of the held-out sequences, with fixed noise, and
    (joint objective, unsharded) the teacher-forced draft acceptance on the same slice."""
    drafting = cfg.objective.kind == "joint" and not sharded  # FSDP unshards only in the wrapped forward
    n = min(len(val_data), cfg.run.eval_batches * cfg.optim.micro_batch * d.world)
    ids = list(range(n))[d.rank::d.world]
    batches = micro_batches(val_data, ids, 0, cfg.optim.micro_batch, -1, cfg.run.seed, mask_id, cfg.objective, d.device)
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)
    norms = torch.zeros(2, dtype=torch.float64, device=d.device)
    accepted = torch.zeros(cfg.objective.block_size, dtype=torch.float64, device=d.device)
    for b in batches:
        with _autocast(cfg, d.device):
            sums += wrapped(b.xt, b.x0, b.loss_mask, b.masked, b.p).double()
            if drafting:
                accepted += draft_acceptance(objective, b.x0, b.loss_mask, mask_id, stop_id)
        norms += counts(b.loss_mask)
    per_token = (D.all_sum(sums, d) / D.all_sum(norms, d).clamp(min=1)).tolist()
    record = {"val_ar_loss": per_token[0], "val_diff_loss": per_token[1] if cfg.objective.kind == "joint" else None}
    if drafting:
        record.update(summarize(D.all_sum(accepted, d)))
    return record

