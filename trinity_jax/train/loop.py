"""The trainer, top to bottom: config → mesh → data → model & optimizer → sharded state →
loop (tqdm, metrics.jsonl, TensorBoard) → evaluation → plots.

``python -m trinity_jax train --config experiments/tiny.py --workdir DIR`` calls
:func:`train`. Checkpointing plugs in through callbacks (see :class:`Callback`): in
:func:`train` the state is not initialised before the callbacks' ``on_start(run)``, which may
set ``run.state`` by restoring onto ``run.abstract_state`` (a
:class:`~trinity_jax.train.step.TrainState` of ShapeDtypeStructs carrying the shardings) and
call ``run.data.train.set_state(...)``; if ``run.state`` is still None it is initialised
fresh. The loop continues from ``run.state.step``. ``on_step_end(run, step, metrics)`` runs right after each
step is dispatched (``run.state`` is the state *after* ``step`` steps, ``run.data.train`` is
positioned after that step's batch; ``metrics`` are un-fetched device arrays); ``on_end(run)``
runs after the final evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from trinity_jax.config import ExperimentConfig, check_workdir_config, to_config_dict
from trinity_jax.model import Transformer, init_boxed, init_variables
from trinity_jax.parallel import mesh as mesh_lib
from trinity_jax.parallel import rules as rules_lib
from trinity_jax.train import metrics as metrics_lib
from trinity_jax.train import step as step_lib
from trinity_jax.train.optimizer import format_table, make_optimizer
from trinity_jax.train.schedules import batch_size_at, group_schedules

__all__ = ["train", "setup", "run_loop", "evaluate", "Run", "Callback", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Callback:
    """Hooks (all optional); the checkpoint manager is one of these."""

    def on_start(self, run: "Run") -> None: ...
    def on_step_end(self, run: "Run", step: int, metrics: dict) -> None: ...
    def on_end(self, run: "Run") -> None: ...


@dataclasses.dataclass
class Run:
    """Everything the loop and its callbacks share."""

    cfg: ExperimentConfig
    workdir: str
    mesh: Any
    model: Any
    optimizer: Any
    data: Any                      # .train (iterator with get_state/set_state), .validation_batches
    state: Optional[step_lib.TrainState]  # None until initialised or restored
    shardings: step_lib.TrainState  # NamedShardings of `state`
    abstract_state: step_lib.TrainState  # ShapeDtypeStructs with .sharding (restore target)
    init_state: Callable           # () -> a fresh sharded TrainState (seed train.seed)
    batch_sharding: Any
    train_step: Callable           # jitted (state, batch) -> (state, metrics); state donated
    eval_step: Callable            # jitted (params, balance, batch) -> LossSums
    writer: metrics_lib.MetricsWriter
    flops_per_token: float
    peak_flops: float
    log: Callable = print
    is_main: bool = True
    last_counts: Optional[np.ndarray] = None

    def to_device(self, batch: dict) -> dict:
        """This process's numpy rows -> global arrays sharded over the data axes."""
        out = {}
        for k in step_lib.BATCH_KEYS:
            local = np.asarray(batch[k])
            global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)
        return out


def _build_data(cfg: ExperimentConfig, workdir: str, log):
    from trinity_jax.data import build_data
    return build_data(cfg, workdir, process_index=jax.process_index(),
                      process_count=jax.process_count(), log=log)


def setup(cfg: ExperimentConfig, workdir: str, *, data=None, log: Callable = print,
          init: bool = True) -> Run:
    """Build mesh, data, model, optimizer, the jitted steps and (``init``) the sharded state."""
    is_main = jax.process_index() == 0
    mesh_lib.validate_mesh_for(cfg)               # ConfigError before anything compiles
    check_workdir_config(cfg, workdir)            # ... or anything is written
    mesh = mesh_lib.make_mesh(cfg.mesh)
    log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s)")
    if data is None:
        data = _build_data(cfg, workdir, log)
    phase_starts = [start for _, start, _ in data.phase_plan] or [0]
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(to_config_dict(cfg), f, indent=2)

    model = Transformer(cfg.model)
    key = jax.random.key(cfg.train.seed)
    boxed = jax.eval_shape(lambda r: init_boxed(cfg.model, r), key)  # carries logical axes
    abstract = nn.unbox(boxed)
    schedules = group_schedules(cfg.optim, total_steps=cfg.train.steps, phase_starts=phase_starts)
    optimizer = make_optimizer(cfg.optim, abstract["params"], schedules)
    table = format_table(abstract["params"], cfg.optim.router_on_muon, cfg.optim.hidden_optimizer)
    if is_main:
        log(table)
        with open(os.path.join(workdir, "optimizer_table.txt"), "w") as f:
            f.write(table + "\n")

    replicated = rules_lib.replicated(mesh)
    param_sh = rules_lib.param_shardings(boxed["params"], mesh)
    balance_sh = rules_lib.param_shardings(boxed.get("balance", {}), mesh)
    shardings = step_lib.state_shardings(param_sh, balance_sh, optimizer, abstract["params"], replicated)
    init_fn = jax.jit(lambda r: step_lib.init_state(init_variables(cfg.model, r), optimizer, r),
                      out_shardings=shardings)
    abstract_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  jax.eval_shape(init_fn, key), shardings)
    batch_sharding = rules_lib.batch_sharding(mesh)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(cfg, model, optimizer),
                                         shardings, batch_sharding)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(cfg, model), shardings, batch_sharding)

    fpt = metrics_lib.flops_per_token(cfg.model, cfg.train.seq_len, abstract["params"])
    peak, how = metrics_lib.peak_flops_total(cfg.train, cfg.model.dtype)
    log(f"train FLOPs/token {fpt:.3g}; peak {peak / 1e9:.1f} GFLOP/s ({how})")
    return Run(cfg=cfg, workdir=workdir, mesh=mesh, model=model, optimizer=optimizer, data=data,
               state=init_fn(key) if init else None, shardings=shardings,
               abstract_state=abstract_state, init_state=lambda: init_fn(key),
               batch_sharding=batch_sharding,
               train_step=train_step, eval_step=eval_step,
               writer=metrics_lib.MetricsWriter(workdir, enabled=is_main),
               flops_per_token=fpt, peak_flops=peak, log=log, is_main=is_main)


def evaluate(run: Run) -> dict:
    """Validation CE (nats/token) over ``train.eval_batches`` fixed batches of one microbatch
    (``batch_size / microbatches`` sequences: the memory of a training microbatch)."""
    tcfg = run.cfg.train
    batches = run.data.validation_batches(tcfg.eval_batches, tcfg.batch_size // tcfg.microbatches)
    if not batches:
        return {}
    ce, count = 0.0, 0.0
    with rules_lib.use_mesh(run.mesh, ep_buffer_factor=run.cfg.mesh.ep_buffer_factor):
        for b in batches:
            sums = run.eval_step(run.state.params, run.state.balance, run.to_device(b))
            ce += float(sums.ce)
            count += float(sums.count)
    if count == 0:
        return {}
    return {"val_loss": ce / count, "val_tokens": count}


_LOGGED = ("loss", "ce", "z_loss", "balance_loss", "dropped", "grad_norm", "lr_muon", "lr_adam",
           "logit_max", "logit_mean", "max_vio", "max_vio_layers", "dead_frac", "bias_norm",
           "batchhet", "microbatch_losses", "nonfinite", "tokens")


def run_loop(run: Run, callbacks: Sequence[Callback] = ()) -> dict:
    """Train from ``run.state.step`` to ``train.steps``; returns the last logged record."""
    cfg, tcfg = run.cfg, run.cfg.train
    for cb in callbacks:
        getattr(cb, "on_start", lambda r: None)(run)
    if run.state is None:
        run.state = run.init_state()
    start = int(jax.device_get(run.state.step))
    if start == 0:      # a fresh start: what an earlier run left in this workdir's metrics goes
        run.writer.resume_at(0)
    total = tcfg.steps
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=not run.is_main, dynamic_ncols=True,
               unit="step", desc="train")
    pending = None       # (step_done, metrics, phase, batch_size, tokens_seen): logged a step late
    window = {"t": None, "tokens": 0}
    consecutive_bad, counts_acc, last = 0, None, {}
    evals: dict[int, dict] = {}  # step -> validation metrics, evaluated right after that step
    # "lr": the hidden matrices' LR (Muon's, or AdamW's when they are on AdamW)
    lr_key = "lr_adam" if cfg.optim.hidden_optimizer == "adamw" else "lr_muon"

    def process(item, force_log: bool):
        nonlocal consecutive_bad, counts_acc, last
        done, m, phase, bs, seen = item
        host = metrics_lib.to_python({k: m[k] for k in _LOGGED + ("counts",)})
        counts = np.asarray(host.pop("counts"), np.float64)
        counts_acc = counts if counts_acc is None else counts_acc + counts
        consecutive_bad = consecutive_bad + 1 if host["nonfinite"] else 0
        if consecutive_bad >= tcfg.max_nonfinite_steps:
            run.writer.close()
            bar.close()
            raise NonFiniteError(
                f"stopping at step {done}: {consecutive_bad} consecutive steps (from step "
                f"{done - consecutive_bad + 1}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={tcfg.max_nonfinite_steps}); params, optimizer "
                f"state and router bias were left unchanged on those steps. Lower optim.muon_lr "
                f"/ optim.adam_lr, raise optim.warmup_steps, or check the data near this step.")
        now = time.perf_counter()
        bar.update(1)
        bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
        if window["t"] is None:   # the first step includes compilation: the clock starts after it
            window["t"] = now
        else:
            window["tokens"] += bs * tcfg.seq_len
        ev = evals.pop(done, None)
        if not (force_log or ev is not None or done % tcfg.log_every == 0):
            return
        tps = window["tokens"] / (now - window["t"]) if window["tokens"] else None
        window["t"], window["tokens"] = now, 0
        rec = {"step": done, **host, "lr": host[lr_key], "batch_size": bs,
               "tokens_seen": int(seen if seen is not None else done * bs * tcfg.seq_len),
               "tokens_per_s": tps,
               "mfu": tps * run.flops_per_token / run.peak_flops if tps else None,
               "phase": phase}
        rec.update(ev or {})
        run.last_counts = counts_acc
        counts_acc = None
        run.writer.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps or 0:,.0f}")
        last = rec

    with rules_lib.use_mesh(run.mesh, ep_buffer_factor=run.cfg.mesh.ep_buffer_factor):
        for step in range(start, total):
            bs = batch_size_at(int(getattr(run.data.train, "tokens_seen", 0)), tcfg.batch_size,
                               tcfg.batch_ramp)
            batch = run.to_device(run.data.train.next_batch(bs))
            # the phase and token count of this batch, read now (drawing it may have started a
            # phase), not when the step is logged (one batch later)
            phase = getattr(run.data.train, "phase_name", "")
            seen = getattr(run.data.train, "tokens_seen", None)
            run.state, metrics = run.train_step(run.state, batch)
            # The previous step is logged while this one runs, before the callbacks (a
            # checkpoint save waits for this step) and any evaluation: its clock stops when its
            # own metrics arrive, not after this step's work.
            if pending is not None:
                process(pending, force_log=False)
                pending = None
            try:
                for cb in callbacks:
                    getattr(cb, "on_step_end", lambda *a: None)(run, step + 1, metrics)
            except SystemExit:      # a callback stops the run (SIGTERM save): log what was run
                process((step + 1, metrics, phase, bs, seen), force_log=True)
                bar.close()
                run.writer.close()
                raise
            if step + 1 == total or (tcfg.eval_every > 0 and (step + 1) % tcfg.eval_every == 0):
                jax.block_until_ready(run.state)   # the step's own time stays in tokens/s
                t_eval = time.perf_counter()
                evals[step + 1] = evaluate(run)
                if window["t"] is not None:   # keep evaluation out of tokens/s
                    window["t"] += time.perf_counter() - t_eval
            pending = (step + 1, metrics, phase, bs, seen)
        if pending is not None:
            process(pending, force_log=True)
    bar.close()
    if start >= total:
        run.log(f"nothing to train: the state is at step {start} >= train.steps={total}")
    _plots(run)
    for cb in callbacks:
        getattr(cb, "on_end", lambda r: None)(run)
    run.writer.close()
    return last


def _plots(run: Run) -> None:
    if not run.is_main:
        return
    d = os.path.join(run.workdir, "plots")
    os.makedirs(d, exist_ok=True)
    metrics_lib.plot_losses(run.writer.records, os.path.join(d, "loss.png"))
    if run.last_counts is not None:
        step = run.writer.records[-1]["step"] if run.writer.records else 0
        metrics_lib.plot_expert_load(run.last_counts, os.path.join(d, "expert_load.png"),
                                     title=f"expert load (last log interval, step {step})")


def train(cfg: ExperimentConfig, workdir: str, *, data=None, callbacks: Sequence[Callback] = (),
          log: Callable = print) -> Run:
    """Set up and run a whole training job in ``workdir``; returns the finished :class:`Run`.

    ``data``: a data module (default ``trinity_jax.data.build_data``; tests and benchmarks
    pass ``trinity_jax.train.synthetic.SyntheticData``). ``callbacks``: see :class:`Callback`.
    Raises :class:`NonFiniteError` after ``train.max_nonfinite_steps`` consecutive bad steps.
    """
    run = setup(cfg, workdir, data=data, log=log, init=False)
    summary = run_loop(run, callbacks)
    if summary:
        keys = ("step", "loss", "val_loss", "tokens_per_s", "mfu", "max_vio")
        log("done: " + ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float)
                                 else f"{k}={summary.get(k)}" for k in keys if k in summary))
    return run
