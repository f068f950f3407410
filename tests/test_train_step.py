"""The train step (train/step.py): gradient accumulation equals the large batch, the
non-finite guard leaves everything unchanged, the router bias follows the step's counts.

Uses a small stand-in MoE LM with the model's call signature (compiles in seconds); the real
model is exercised end to end in test_train_loop.py.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trinity_jax.config import ExperimentConfig, OptimConfig, TrainConfig, model_config
from trinity_jax.train import balance as balance_lib
from trinity_jax.train import step as step_lib
from trinity_jax.train.optimizer import make_optimizer
from trinity_jax.train.schedules import group_schedules
from trinity_jax.train.synthetic import synthetic_batch

V, D, E, K, L = 64, 16, 4, 2, 2


class _Head(nn.Module):
    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.normal(0.3), (D, V))        # [D, V]


class StubMoELM(nn.Module):
    """embed -> L × (x + Σ_k g·expert(x)) with sigmoid top-k routing on scores + bias -> norm."""

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, return_hidden=False):
        init = nn.initializers.normal(0.3)
        x = nn.Embed(V, D, name="embed_tokens")(tokens)                       # [B, S, D]
        bias = self.variable("balance", "expert_bias", jnp.zeros, (L, E))
        valid = (segment_ids > 0).astype(jnp.float32)
        counts, bal = [], []
        for layer in range(L):
            wr = self.param(f"router_{layer}", init, (D, E))
            we = self.param(f"experts_{layer}", init, (E, D, D))
            s = jax.nn.sigmoid(x @ wr)                                        # [B, S, E]
            _, idx = jax.lax.top_k(s + bias.value[layer], K)                  # [B, S, K]
            sel = jax.nn.one_hot(idx, E).sum(-2)                              # [B, S, E]
            g = sel * s / jnp.sum(sel * s, -1, keepdims=True)
            x = x + jnp.einsum("bse,bsd,edf->bsf", g, x, we)
            counts.append(jnp.sum(sel * valid[..., None], (0, 1)))
            f = E / K * jnp.mean(sel, 1)
            p = jnp.mean(s / jnp.sum(s, -1, keepdims=True), 1)
            # like the model's: a mean over the sequences that hold a valid token
            has = jnp.any(segment_ids > 0, axis=1).astype(jnp.float32)
            bal.append(jnp.sum(jnp.sum(f * p, -1) * has) / jnp.maximum(jnp.sum(has), 1.0))
        scale = self.param("norm_scale", nn.initializers.ones, (D,))  # a 1-D param on AdamW
        x = x * scale
        kernel = _Head(name="lm_head")()
        aux = {"counts": jnp.stack(counts), "balance": jnp.stack(bal)}
        return (x, aux) if return_hidden else (x @ kernel, aux)


def _setup(microbatches=1, balance="smebu"):
    cfg = ExperimentConfig(
        model=model_config(num_experts=E, num_experts_per_tok=K),
        train=TrainConfig(batch_size=8, seq_len=24, microbatches=microbatches, loss_chunk_size=8,
                          balance=balance, smebu_lambda=1e-2),
        optim=OptimConfig(warmup_steps=2, muon_lr=0.02, adam_lr=0.01))
    model = StubMoELM()
    batch = synthetic_batch(np.random.default_rng(0), np.random.default_rng(1).permutation(V), 8, 24)
    variables = model.init(jax.random.key(0), batch["inputs"], segment_ids=batch["segment_ids"])
    opt = make_optimizer(cfg.optim, variables["params"], group_schedules(cfg.optim, total_steps=10))
    return cfg, model, opt, variables, {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("padded_rows", [(), (0, 4)])
def test_gradient_accumulation_equals_the_large_batch(padded_rows):
    """4 microbatches of 2 vs 1 batch of 8: loss, every gradient and the counts agree (1e-5),
    also when rows 0 and 4 (both in microbatch 0) are all padding, so that microbatches hold
    different numbers of sequences for the balance loss's mean (it was weighted 1/m each)."""
    outs = []
    for m in (1, 4):
        cfg, model, _, v, batch = _setup(microbatches=m)
        for r in padded_rows:
            batch["segment_ids"] = batch["segment_ids"].at[r].set(0)
            batch["loss_mask"] = batch["loss_mask"].at[r].set(0.0)
        f = jax.jit(lambda p, b: step_lib.accumulate_gradients(cfg, model, p, v["balance"], b))
        outs.append(f(v["params"], batch))
    (l1, g1, s1, c1, p1, mb1), (l4, g4, s4, c4, p4, mb4) = outs
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    np.testing.assert_allclose(p4["balance_loss"], p1["balance_loss"], rtol=1e-5)
    np.testing.assert_array_equal(c4, c1)
    assert float(s4.count) == float(s1.count)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert mb1.shape == (1,) and mb4.shape == (4,)
    # the step's loss is the token-weighted mean of the microbatch CEs
    assert float(jnp.max(mb4)) > float(jnp.min(mb4))


@pytest.fixture(scope="module")
def stepped():
    """One compiled train step (2 microbatches) shared by the tests below."""
    cfg, model, opt, v, batch = _setup(microbatches=2)
    state = step_lib.init_state(v, opt, jax.random.key(0))
    step = jax.jit(step_lib.make_train_step(cfg, model, opt))
    new, m = step(state, batch)
    return step, state, new, m, batch


def test_step_updates_bias_from_counts_and_reports_metrics(stepped):
    _, state, new, m, batch = stepped
    want_b, want_m = balance_lib.smebu_update(jnp.zeros((L, E)), jnp.zeros((L, E)), m["counts"],
                                              lam=1e-2, beta=0.5, kappa=2.0)
    np.testing.assert_allclose(step_lib.expert_bias_of(new.balance), want_b, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(step_lib.expert_bias_of(new.momentum), want_m, rtol=1e-6, atol=1e-9)
    assert int(new.step) == 1 and int(m["nonfinite"]) == 0
    assert float(m["counts"].sum()) == L * K * float(jnp.sum(batch["segment_ids"] > 0))
    np.testing.assert_allclose(m["lr_muon"], 0.02 * 0.5, rtol=1e-6)  # warm-up step 1 of 2
    mb = np.asarray(m["microbatch_losses"])
    assert mb.shape == (2,)
    np.testing.assert_allclose(m["batchhet"], mb.max() - mb.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["ce"] + m["z_loss"] + m["balance_loss"], rtol=1e-6)
    leaves = zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))
    assert all(not np.array_equal(a, b) for a, b in leaves)


def test_nonfinite_step_changes_nothing_but_the_step(stepped):
    step, _, state, _, batch = stepped                  # after one good step: non-zero opt state / bias
    bad = dict(batch, loss_mask=batch["loss_mask"].at[0, 3].set(jnp.nan))
    new, m = step(state, bad)
    assert int(m["nonfinite"]) == 1 and int(new.step) == 2
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state, new.balance, new.momentum)),
                    jax.tree.leaves((state.params, state.opt_state, state.balance, state.momentum))):
        np.testing.assert_array_equal(a, b)
