"""LR schedules and the batch-size ramp (train/schedules.py)."""
import numpy as np
import pytest

from trinity_jax.config import OptimConfig
from trinity_jax.train.schedules import (batch_size_at, decay_start_step, group_schedules,
                                         lr_schedule, phase_start_steps, steps_for_tokens)


def test_warmup_constant_linear_to_zero():
    f = lr_schedule(1e-3, warmup_steps=10, decay="linear_to_zero", decay_start=50, total_steps=100)
    np.testing.assert_allclose([f(0), f(4), f(9)], [1e-4, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose([f(10), f(30), f(50)], [1e-3] * 3, rtol=1e-6)   # constant
    np.testing.assert_allclose([f(75), f(100)], [5e-4, 0.0], atol=1e-9)        # linear to 0


def test_cosine_to_fraction():
    f = lr_schedule(8e-4, warmup_steps=0, decay="cosine_to_fraction", decay_start=100,
                    total_steps=300, final_fraction=0.1)
    np.testing.assert_allclose([f(0), f(100)], [8e-4, 8e-4], rtol=1e-6)
    np.testing.assert_allclose(f(200), 8e-4 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way
    np.testing.assert_allclose(f(300), 8e-5, rtol=1e-5)


def test_decay_starts_at_the_configured_phase_so_truebase_is_undecayed():
    """3 phases starting at steps 0/600/800: decay_start_phase=-1 -> 800; lr at the end of
    phase 0 (step 599, where TrueBase is taken) is the peak."""
    starts = [0, 600, 800]
    assert decay_start_step(-1, starts, 1000) == 800
    assert decay_start_step(1, starts, 1000) == 600
    with pytest.raises(ValueError, match="decay_start_phase"):
        decay_start_step(3, starts, 1000)
    cfg = OptimConfig(muon_lr=1e-3, adam_lr=2e-4, warmup_steps=100)
    s = group_schedules(cfg, total_steps=1000, phase_starts=starts)
    got = [s["muon"](599), s["adam"](599), s["muon"](800)]
    np.testing.assert_allclose(got, [1e-3, 2e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(s["muon"](900), 5e-4, rtol=1e-5)


def test_one_phase_decays_only_after_the_warmup_reaches_the_peak():
    """One data phase (decay phase = step 0): warm-up to the peak, then linear decay over the
    rest. Before, the decay started at step 0 and multiplied the warm-up: the LR peaked at
    0.8x (step 1999 of 10k with a 2000-step warm-up)."""
    cfg = OptimConfig(muon_lr=1e-3, adam_lr=2e-4, warmup_steps=2000)
    f = group_schedules(cfg, total_steps=10_000, phase_starts=[0])["muon"]
    lrs = np.asarray([f(s) for s in range(0, 10_001, 250)] + [f(1999)])
    np.testing.assert_allclose(lrs.max(), 1e-3, rtol=1e-6)
    np.testing.assert_allclose([f(1999), f(6000), f(10_000)], [1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-9)
    # a decay phase that starts inside the warm-up waits for it too
    g = group_schedules(cfg, total_steps=10_000, phase_starts=[0, 1000])["muon"]
    np.testing.assert_allclose(g(1999), 1e-3, rtol=1e-6)


def test_batch_ramp_keyed_on_tokens_seen():
    """Large: 12288 sequences, 16384 after 4.9T tokens."""
    ramp = ((4_900_000_000_000, 16384),)
    assert batch_size_at(0, 12288, ramp) == 12288
    assert batch_size_at(4_899_999_999_999, 12288, ramp) == 12288
    assert batch_size_at(4_900_000_000_000, 12288, ramp) == 16384
    assert batch_size_at(10, 4, ((8, 6), (20, 8))) == 6
    assert batch_size_at(25, 4, ((8, 6), (20, 8))) == 8


def test_phase_start_steps_follow_the_ramp():
    """seq 10, batch 2 (20 tok/step) -> 4 after 100 tokens: phase budgets 100/80/40 tokens."""
    ramp = ((100, 4),)
    assert steps_for_tokens(100, 10, 2, ramp) == 5
    assert phase_start_steps([100, 80, 40], 10, 2, ramp) == [0, 5, 7]
