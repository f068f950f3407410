"""The Trinity recipe end to end: pre-training through the data phases (TrueBase at the end of the
first phase, before any LR decay; Base after all phases and the anneal), then the SFT stage that
turns Base into Preview (SPEC §4-5). Every stage resumes from its own checkpoints.

    workdir/                    pre-training run (config.json, metrics.jsonl, tb/, plots/, checkpoints/)
    workdir/variants/{truebase,base,preview}/
    workdir/sft/                the SFT run (its own metrics, checkpoints)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from trinity_jax.checkpoint import variants as variants_lib
from trinity_jax.checkpoint.manager import CheckpointCallback
from trinity_jax.config import ExperimentConfig, check_workdir_config, to_config_dict


class VariantCallback:
    """Exports `name` as a variant when the run reaches `step` (None: at the end of the run)."""

    def __init__(self, workdir: str, cfg: ExperimentConfig, tokenizer, name: str, *, step: int | None,
                 metadata: dict | None = None, log: Callable = print):
        self.path = os.path.join(workdir, "variants", name)
        self.cfg, self.tokenizer, self.name, self.step = cfg, tokenizer, name, step
        self.metadata = dict(metadata or {})
        self.log = log

    def export(self, run, step: int) -> None:
        """Every process takes part (a multi-process state's arrays span them all)."""
        meta = {"step": step, "phase": getattr(run.data.train, "phase_name", ""),
                "tokens_seen": int(getattr(run.data.train, "tokens_seen", 0)), **self.metadata}
        variants_lib.save_variant_arrays({"params": run.state.params, "balance": run.state.balance},
                                         self.cfg.model, self.path, name=self.name, metadata=meta,
                                         dtype=self.cfg.checkpoint.variant_dtype,
                                         experiment=to_config_dict(self.cfg), tokenizer=self.tokenizer)
        if run.is_main:
            self.log(f"wrote variant {self.name} (step {step}) to {self.path}")

    def on_step_end(self, run, step: int, metrics) -> None:
        if self.step is not None and step == self.step:
            self.export(run, step)

    def on_end(self, run) -> None:
        if self.step is None:
            self.export(run, int(jax.device_get(run.state.step)))


class InitFromCallback:
    """When no checkpoint was restored, start from `variables` (fresh optimizer state)."""

    def __init__(self, variables: dict):
        self.variables = variables

    def on_start(self, run) -> None:
        if run.state is not None:
            return
        state = run.init_state()
        params = jax.device_put(self.variables["params"], run.shardings.params)
        balance = jax.device_put(self.variables.get("balance", {}), run.shardings.balance)
        run.state = state.replace(params=params, balance=balance)


def _checkpointer(cfg: ExperimentConfig, workdir: str, extra_steps=(), log=print) -> CheckpointCallback:
    return CheckpointCallback(os.path.join(workdir, "checkpoints"), every=cfg.checkpoint.every,
                              keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                              extra_steps=extra_steps, log=log)


def variant_done(workdir: str, name: str, step: int | None = None) -> bool:
    path = os.path.join(workdir, "variants", name)
    if not variants_lib.is_variant_dir(path):
        return False
    if step is None:
        return True
    import json
    with open(os.path.join(path, "metadata.json")) as f:
        return int(json.load(f).get("step", -1)) == step


def pretrain(cfg: ExperimentConfig, workdir: str, *, log: Callable = print, data=None):
    """Pre-train through the phases; writes TrueBase (end of phase 1) and Base (end). Resumable."""
    from trinity_jax.data import build_data
    from trinity_jax.train import loop

    check_workdir_config(cfg, workdir)        # before the data is built into the workdir
    if data is None:
        data = build_data(cfg, workdir, process_index=jax.process_index(), process_count=jax.process_count(),
                          log=log)
    plan = list(data.phase_plan)
    phase_ends = [end for _, _, end in plan]
    callbacks = []
    if len(plan) > 1:
        callbacks.append(VariantCallback(workdir, cfg, data.tokenizer, "truebase", step=phase_ends[0],
                                         metadata={"parent": None, "stage": "pre-training, before any LR decay"},
                                         log=log))
    callbacks.append(VariantCallback(workdir, cfg, data.tokenizer, "base", step=None,
                                     metadata={"parent": "truebase" if len(plan) > 1 else None,
                                               "stage": "pre-training, all phases + anneal"}, log=log))
    callbacks.insert(len(callbacks) - 1, _checkpointer(cfg, workdir, phase_ends, log))
    run = loop.train(cfg, workdir, data=data, callbacks=callbacks, log=log)
    return run, data


class _SFTStageData:
    """The SFT data with a two-part phase plan so the LR warms up, then decays linearly to 0."""

    def __init__(self, sft_data, warmup: int, steps: int):
        self._d = sft_data
        self.train = sft_data.train
        self.tokenizer = sft_data.tokenizer
        self.phase_plan = [("sft_warmup", 0, warmup), ("sft", warmup, steps)]

    def validation_batches(self, n: int, batch_size: int):
        return self._d.validation_batches(n, batch_size)


def sft_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Pre-training config -> the SFT stage's config (SPEC §4: peak 0.1× pre-training, linear to 0)."""
    s = cfg.sft
    optim = dataclasses.replace(cfg.optim, muon_lr=cfg.optim.muon_lr * s.lr_fraction,
                                adam_lr=cfg.optim.adam_lr * s.lr_fraction, warmup_steps=s.warmup_steps,
                                decay="linear_to_zero", decay_start_phase=-1)
    train = dataclasses.replace(cfg.train, steps=s.steps, batch_size=s.batch_size, batch_ramp=(),
                                microbatches=1, eval_every=0)
    ckpt = dataclasses.replace(cfg.checkpoint, every=max(1, min(cfg.checkpoint.every, s.steps)))
    return dataclasses.replace(cfg, optim=optim, train=train, checkpoint=ckpt)


def post_train(cfg: ExperimentConfig, workdir: str, *, log: Callable = print):
    """SFT from Base -> Preview (assistant-only loss on chat data). Resumable."""
    from trinity_jax.data import build_sft
    from trinity_jax.train import loop

    base_path = os.path.join(workdir, "variants", "base")
    base = variants_lib.load_variant(base_path)
    scfg = sft_config(cfg)
    sft_data = build_sft(scfg, base.tokenizer, process_index=jax.process_index(),
                         process_count=jax.process_count(), log=log)
    data = _SFTStageData(sft_data, scfg.sft.warmup_steps, scfg.train.steps)
    sft_dir = os.path.join(workdir, "sft")
    callbacks = [VariantCallback(workdir, scfg, base.tokenizer, "preview", step=None,
                                 metadata={"parent": "base", "stage": f"SFT {scfg.train.steps} steps"}, log=log),
                 _checkpointer(scfg, sft_dir, log=log),
                 InitFromCallback({"params": base.params, "balance": base.variables.get("balance", {})})]
    run = loop.train(scfg, sft_dir, data=data, callbacks=callbacks, log=log)
    return run, data


def validation_loss(model, batches) -> float:
    """Mean next-token CE (nats/token) of a LoadedModel over batches in the pipeline's format
    (packed rows: each document sees only itself, from position 0, as in training)."""
    total, count = 0.0, 0.0
    for b in batches:
        logits = model.logits(np.asarray(b["inputs"]), b.get("positions"), b.get("segment_ids"))
        logp = logits - _logsumexp(logits)
        nll = -np.take_along_axis(logp, np.asarray(b["targets"])[..., None], -1)[..., 0]
        mask = np.asarray(b["loss_mask"], np.float64)
        total += float((nll * mask).sum())
        count += float(mask.sum())
    return total / max(count, 1.0)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
