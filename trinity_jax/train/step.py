"""The train step: ``train_step(state, batch) -> (state, metrics)``, one pure function.

forward (``model.apply(..., return_hidden=True)``) → chunked CE + z-loss + α·balance loss →
gradients (summed over ``train.microbatches`` with ``lax.scan``; equal to the large batch) →
Muon/AdamW update → router-bias update (SMEBU / sign, SPEC §4) from the step's global expert
counts. A step whose loss or gradient norm is not finite changes nothing but ``step`` and
reports ``nonfinite=1``. Jitted once per batch shape with explicit in/out shardings and the
state donated (:func:`jit_train_step`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trinity_jax.train import balance as balance_lib
from trinity_jax.train.losses import LossSums, chunked_cross_entropy, combine_losses
from trinity_jax.train.optimizer import Optimizer

__all__ = ["TrainState", "expert_bias_of", "accumulate_gradients", "make_train_step",
           "make_eval_step", "init_state", "state_shardings", "jit_train_step", "jit_eval_step",
           "BATCH_KEYS"]

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly (plus the data iterator's own state)."""

    params: Any       # fp32 master weights (the model's 'params' collection)
    opt_state: Any    # Muon / AdamW state
    balance: Any      # the model's 'balance' collection: .../expert_bias [L_moe, E] fp32
    momentum: Any     # SMEBU momentum, same tree as `balance`
    step: jax.Array   # int32: steps taken (= batches consumed, skipped non-finite ones included)
    rng: jax.Array    # raw uint32 key data (jax.random.wrap_key_data to use); unused by the step


def expert_bias_of(balance: Any) -> jax.Array | None:
    """The single [L_moe, E] leaf of the balance collection (None without MoE layers)."""
    leaves = jax.tree.leaves(balance)
    if not leaves:
        return None
    if len(leaves) != 1:
        raise ValueError(f"balance collection has {len(leaves)} leaves; expected one expert_bias")
    return leaves[0]


def _head_kernel(params, dtype):
    """lm_head kernel [d, V] in the compute dtype, gathered over the FSDP axis once per step
    (not once per loss chunk); the vocab axis keeps its tensor sharding."""
    kernel = params["lm_head"]["kernel"].astype(dtype)
    return nn.with_logical_constraint(kernel, ("act_embed", "act_vocab"))


def _forward_losses(model, train_cfg, params, balance, batch, num_tokens, balance_scale):
    """Loss of one (micro)batch and its parts; the CE is normalised by the step's token count."""
    hidden, aux = model.apply({"params": params, "balance": balance}, batch["inputs"],
                              positions=batch["positions"], segment_ids=batch["segment_ids"],
                              return_hidden=True)                               # [B, S, d]
    sums = chunked_cross_entropy(hidden, _head_kernel(params, hidden.dtype), batch["targets"],
                                 batch["loss_mask"], chunk_size=train_cfg.loss_chunk_size,
                                 z_loss_weight=train_cfg.z_loss_weight)
    loss, parts = combine_losses(sums, aux["balance"], num_tokens=num_tokens,
                                 balance_loss_weight=train_cfg.balance_loss_weight,
                                 balance_scale=balance_scale)
    # token-slots dropped (expert-parallel buffers, capacity_factor), mean over MoE layers,
    # weighted across microbatches like the balance loss: 0 for a dropless run
    dropped = jax.lax.stop_gradient(aux.get("dropped", jnp.zeros((0,), jnp.float32)))
    parts["dropped"] = jnp.sum(dropped) / max(dropped.size, 1) * balance_scale
    return loss, (sums, aux["counts"], parts)


def _split_microbatches(batch: dict, m: int) -> dict:
    """[B, ...] -> [m, B/m, ...]; microbatch j takes rows j, j+m, ... so every microbatch keeps
    rows on every data-parallel device (the batch axis stays sharded)."""
    def split(x):
        x = jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "act_batch", "act_seq"))
    return jax.tree.map(split, batch)


def accumulate_gradients(cfg, model: nn.Module, params, balance, batch: dict):
    """Loss and gradients of the whole batch, summed over ``train.microbatches`` (lax.scan).

    Returns ``(loss, grads, LossSums, counts [L_moe, E], parts, microbatch_ce [m])``; equal to
    the single large batch because every microbatch's CE is divided by the step's total
    token count, and its balance loss (a mean over its sequences that hold a valid token) is
    weighted by its share of the step's such sequences (1/m when none is all padding).
    """
    tcfg = cfg.train
    m = tcfg.microbatches
    grad_fn = jax.value_and_grad(_forward_losses, argnums=2, has_aux=True)
    num_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    if m == 1:
        (loss, (sums, counts, parts)), grads = grad_fn(model, tcfg, params, balance, batch,
                                                      num_tokens, 1.0)
        return loss, grads, sums, counts, parts, (sums.ce / jnp.maximum(sums.count, 1.0))[None]

    def sequences(b):         # rows with a valid token: the balance loss averages over them
        return jnp.sum(jnp.any(b["segment_ids"] > 0, axis=-1).astype(jnp.float32))

    num_sequences = jnp.maximum(sequences(batch), 1.0)

    def body(carry, mb):
        g_acc, loss_acc, sums_acc, counts_acc, parts_acc = carry
        (loss, (sums, counts, parts)), g = grad_fn(model, tcfg, params, balance, mb,
                                                  num_tokens, sequences(mb) / num_sequences)
        carry = (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, sums_acc + sums,
                 counts_acc + counts, jax.tree.map(jnp.add, parts_acc, parts))
        return carry, sums.ce / jnp.maximum(sums.count, 1.0)

    zero = jnp.zeros((), jnp.float32)
    bias = expert_bias_of(balance)
    counts_shape = bias.shape if bias is not None else (0, max(cfg.model.num_experts, 1))
    init = (jax.tree.map(jnp.zeros_like, params), zero,
            LossSums.zeros(),
            jnp.zeros(counts_shape, jnp.float32),
            {"ce": zero, "z_loss": zero, "balance_loss": zero, "dropped": zero})
    (grads, loss, sums, counts, parts), mb_ce = jax.lax.scan(body, init, _split_microbatches(batch, m))
    return loss, grads, sums, counts, parts, mb_ce


def make_train_step(cfg, model: nn.Module, optimizer: Optimizer) -> Callable:
    """The pure ``train_step(state, batch) -> (state, metrics)`` for ``ExperimentConfig`` cfg."""
    update_bias = balance_lib.balance_update(cfg.train.balance, cfg.train)

    def train_step(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS}
        loss, grads, sums, counts, parts, mb_ce = accumulate_gradients(
            cfg, model, state.params, state.balance, batch)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lrs = optimizer.learning_rates(state.step)

        def apply(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params, lrs)
            params = optax.apply_updates(state.params, updates)
            bias = expert_bias_of(state.balance)
            if bias is None:
                return params, opt_state, state.balance, state.momentum
            new_bias, new_mom = update_bias(bias, expert_bias_of(state.momentum), counts)
            treedef = jax.tree.structure(state.balance)
            return (params, opt_state, jax.tree.unflatten(treedef, [new_bias]),
                    jax.tree.unflatten(treedef, [new_mom]))

        def skip(_):
            return state.params, state.opt_state, state.balance, state.momentum

        # Only one branch runs: a taken step pays no select pass over the whole state (a
        # `where` per leaf cost ~90 ms of the bench model's ~140 ms AdamW update), a skipped
        # one no optimizer work.
        params, opt_state, balance, momentum = jax.lax.cond(ok, apply, skip, None)
        new_state = state.replace(params=params, opt_state=opt_state, balance=balance,
                                  momentum=momentum, step=state.step + 1)
        load = balance_lib.load_metrics(counts, expert_bias_of(new_state.balance))
        metrics = {
            "loss": loss, **parts, "grad_norm": grad_norm,
            "lr_muon": lrs["muon"], "lr_adam": lrs["adam"],
            "logit_max": sums.logit_max, "logit_mean": sums.logit_mean,
            "tokens": sums.count, "microbatch_losses": mb_ce,
            "batchhet": jnp.max(mb_ce) - jnp.mean(mb_ce),
            "nonfinite": (~ok).astype(jnp.int32), "counts": counts, **load,
        }
        return new_state, metrics

    return train_step


def make_eval_step(cfg, model: nn.Module) -> Callable:
    """``eval_step(params, balance, batch) -> LossSums`` (no gradients, no updates)."""
    tcfg = cfg.train

    def eval_step(params, balance, batch):
        hidden, _ = model.apply({"params": params, "balance": balance}, batch["inputs"],
                                positions=batch["positions"], segment_ids=batch["segment_ids"],
                                return_hidden=True)
        return chunked_cross_entropy(hidden, _head_kernel(params, hidden.dtype), batch["targets"],
                                     batch["loss_mask"], chunk_size=tcfg.loss_chunk_size,
                                     z_loss_weight=tcfg.z_loss_weight)

    return eval_step


# ----------------------------------------------------------------------------- state + jit

def init_state(variables: dict, optimizer: Optimizer, rng: jax.Array) -> TrainState:
    """A fresh TrainState from model variables {'params', 'balance'} (pure; jit it with
    ``out_shardings=state_shardings(...)`` to create it sharded)."""
    params = variables["params"]
    balance = variables.get("balance", {})
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)   # plain uint32 (checkpoint-friendly); wrap_key_data to use
    return TrainState(params=params, opt_state=optimizer.init(params), balance=balance,
                      momentum=jax.tree.map(jnp.zeros_like, balance),
                      step=jnp.zeros((), jnp.int32), rng=rng)


def state_shardings(param_shardings: Any, balance_shardings: Any, optimizer: Optimizer,
                    abstract_params: Any, replicated) -> TrainState:
    """NamedShardings of a TrainState: every optimizer-state leaf whose key path ends with a
    parameter's path (and has its shape) follows that parameter; the rest (counts, NS
    coefficients, step, rng) is replicated. (``optax.tree_map_params`` can't see through the
    ``MaskedNode`` s of ``optax.partition``.)"""
    by_path = {}
    for (path, sh), x in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0],
                             jax.tree.leaves(abstract_params)):
        by_path[_keys(path)] = (sh, tuple(x.shape))

    def one(path, leaf):
        keys = _keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[1] == tuple(leaf.shape):
                return hit[0]
        return replicated

    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = jax.tree_util.tree_map_with_path(one, abstract_opt)
    return TrainState(params=param_shardings, opt_state=opt_sh, balance=balance_shardings,
                      momentum=balance_shardings, step=replicated, rng=replicated)


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def jit_train_step(train_step: Callable, shardings: TrainState, batch_sharding) -> Callable:
    """jit with explicit shardings; the state is donated (its buffers are reused)."""
    return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, shardings: TrainState, batch_sharding) -> Callable:
    return jax.jit(eval_step, in_shardings=(shardings.params, shardings.balance, batch_sharding))
