"""`model.attention_impl`: every implementation equals the full masked matrix (`xla`).

fp32 throughout; the implementations sum the same non-zero terms in a different order, so
outputs and gradients agree to 1e-5 relative (measured differences are ~1e-7).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trinity_jax.config import model_config
from trinity_jax.model import Transformer, init_variables
from trinity_jax.model.attention import (_kv_windows, _with_previous, apply_rope, attention_mask,
                                         causal_block_attention, dot_product_attention, local_block_attention,
                                         resolve_attention_impl, rope_frequencies, rope_tables)


def _qkv(b, t, hq, hkv, dh, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, hq, dh)), jax.random.normal(ks[1], (b, t, hkv, dh)),
            jax.random.normal(ks[2], (b, t, hkv, dh)))


def _naive_attention(q, k, v, mask):
    """Plain autodiff reference: repeat kv heads for GQA, softmax over masked scores."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


def test_custom_vjp_attention_equals_autodiff_of_the_naive_formula():
    """The memory-efficient VJP (probabilities recomputed from the saved log-sum-exp)."""
    q, k, v = _qkv(2, 21, 6, 2, 8, seed=3)
    seg = jnp.stack([jnp.where(jnp.arange(21) < 9, 1, 2), jnp.ones((21,), jnp.int32)])
    idx = jnp.broadcast_to(jnp.arange(21), (2, 21))
    mask = attention_mask(idx, idx, seg, seg, 5)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask), _naive_attention(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.key(4), q.shape)
    g = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a, mask) * ct), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(_naive_attention(*a, mask) * ct), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _assert_equals_full_matrix(blocked, t, window):
    """blocked(q, k, v, seg) equals autodiff of the naive full masked formula (which checks the
    custom VJP as well) on two rows, two packed documents in row 0 (boundary at 13): value and
    grads within 1e-5 (fp32, the same products over fewer masked keys)."""
    q, k, v = _qkv(2, t, 4, 2, 8)
    seg = jnp.stack([(jnp.arange(t) >= 13).astype(jnp.int32) + 1, jnp.ones((t,), jnp.int32)])
    idx = jnp.broadcast_to(jnp.arange(t), (2, t))

    def full(q, k, v):
        return _naive_attention(q, k, v, attention_mask(idx, idx, seg, seg, window))

    np.testing.assert_allclose(blocked(q, k, v, seg), full(q, k, v), rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.key(9), q.shape)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    g_blocked = jax.grad(lambda *a: jnp.sum(blocked(*a, seg) * ct), argnums=(0, 1, 2))(q, k, v)
    for x, y in zip(g_blocked, g_full):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,w,split", [(32, 8, 1), (37, 8, 1), (5, 8, 1), (24, 1, 1),
                                       (37, 8, 2), (37, 8, 4), (30, 6, 4)])
def test_local_blocks_equal_the_full_masked_matrix(t, w, split):
    """Query blocks of w / split rows (split 4 at w = 6 falls back to 3: blocks of 2 rows)."""
    _assert_equals_full_matrix(lambda q, k, v, seg: local_block_attention(q, k, v, seg, w, split), t, w)


@pytest.mark.parametrize("t,blocks,min_rows", [(37, 8, 8), (32, 4, 8), (40, 5, 1), (20, 8, 128)])
def test_causal_blocks_equal_the_full_masked_matrix(t, blocks, min_rows):
    """Global layers in causal query blocks (37 rows -> 4 blocks of 10, 10, 10, 7; 40 rows -> 5
    blocks of 8; 20 rows with min_rows 128 -> one block)."""
    _assert_equals_full_matrix(
        lambda q, k, v, seg: causal_block_attention(q, k, v, seg, blocks, min_rows), t, None)


def test_auto_picks_blocks_only_when_they_skip_work():
    assert resolve_attention_impl("auto", 512, 128) == "local_blocks"
    assert resolve_attention_impl("auto", 200, 128) == "xla"
    assert resolve_attention_impl("xla", 512, 128) == "xla"


KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
          num_dense_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
          num_experts_per_tok=2, sliding_window=4, global_attn_every_n_layers=2,
          moe_impl="dense_reference")     # attention is under test: the cheapest MoE to compile


@pytest.mark.parametrize("impl", ["local_blocks", "dot_product_attention"])
def test_model_impls_agree_with_xla(impl):
    """Layers 1 and 3 are global, 0 and 2 local (window 4 of 19 tokens, two packed documents)."""
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 64)
    seg = jnp.where(jnp.arange(19) < 11, 1, 2)[None].repeat(2, 0)
    pos = jnp.where(jnp.arange(19) < 11, jnp.arange(19), jnp.arange(19) - 11)[None].repeat(2, 0)
    v = init_variables(model_config(**KW), jax.random.key(0))

    def loss_and_grads(attention_impl):
        cfg = model_config(**KW, attention_impl=attention_impl)
        f = lambda p: jnp.mean(Transformer(cfg).apply({"params": p, "balance": v["balance"]}, tokens,  # noqa: E731
                                                      positions=pos, segment_ids=seg)[0] ** 2)
        return jax.jit(jax.value_and_grad(f))(v["params"])

    (l0, g0), (l1, g1) = loss_and_grads("xla"), loss_and_grads(impl)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _plain_rope(x, cos, sin):
    """The rotate-half formula as written in HF, for autodiff."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def test_apply_rope_custom_vjp_equals_autodiff_and_rounds_bf16_once():
    """`apply_rope`'s hand-written backward (g·cos + rotᵀ(g·sin)) equals autodiff of the plain
    formula in fp32 (1e-6: the same products summed in another order); in bf16 the forward and
    the backward are the fp32 results rounded once (exactly equal); cos 1, sin 0 (NoPE) is the
    identity, bit for bit."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 16))
    g = jax.random.normal(jax.random.key(1), x.shape)
    cos, sin = rope_frequencies(jnp.arange(7)[None].repeat(2, 0) * 3, 16, 1e4)
    out, vjp = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    want, want_vjp = jax.vjp(lambda x: _plain_rope(x, cos, sin), x)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(g)[0], want_vjp(g)[0], rtol=1e-6, atol=1e-6)
    xb, gb = x.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    outb, vjpb = jax.vjp(lambda x: apply_rope(x, cos, sin), xb)
    assert outb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(outb, apply_rope(xb.astype(jnp.float32), cos, sin).astype(jnp.bfloat16))
    np.testing.assert_array_equal(vjpb(gb)[0], vjp(gb.astype(jnp.float32))[0].astype(jnp.bfloat16))
    np.testing.assert_array_equal(apply_rope(x, jnp.ones_like(cos), jnp.zeros_like(sin)), x)


def test_kv_windows_backward_sums_each_blocks_copies_in_fp32_once():
    """Local attention's key/value windows (each block with its `split` predecessors): the
    custom backward equals autodiff of the plain windowing in fp32 (exactly: each block's
    cotangent is a sum of ≤ 3 copies) and, in bf16, is that fp32 sum rounded once."""
    a = jax.random.normal(jax.random.key(0), (2, 3, 5, 4, 8))          # [b, h, n blocks, c, dh]
    for split in (1, 2):
        g = jax.random.normal(jax.random.key(split), (2, 3, 5, 4 * (split + 1), 8))
        out, vjp = jax.vjp(lambda a: _kv_windows(a, split), a)
        want, want_vjp = jax.vjp(lambda a: _with_previous(a, 2, split), a)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_allclose(vjp(g)[0], want_vjp(g)[0], rtol=1e-6, atol=1e-6)
        gb = g.astype(jnp.bfloat16)
        _, vjpb = jax.vjp(lambda a: _kv_windows(a, split), a.astype(jnp.bfloat16))
        np.testing.assert_array_equal(vjpb(gb)[0], want_vjp(gb.astype(jnp.float32))[0].astype(jnp.bfloat16))


def test_rope_tables_equal_the_frequencies_and_are_computed_once_per_forward():
    """`rope_tables` returns exactly `rope_frequencies` (both branches of its conditional:
    positions ≥ 0, and a negative one), and in a compiled 4-layer forward+backward cos and sin
    are each evaluated once — not fused into every layer's q/k rotation (the ~10×-slower path
    on XLA:CPU it exists to avoid)."""
    pos = jnp.where(jnp.arange(19) < 11, jnp.arange(19), jnp.arange(19) - 11)[None].repeat(2, 0)
    for p in (pos, pos.at[1, 3].set(-2)):
        want = jax.jit(lambda p: rope_frequencies(p, 16, 1e4))(p)
        got = jax.jit(lambda p: rope_tables(p, 16, 1e4))(p)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    cfg = model_config(**KW, attention_impl="local_blocks", nope_global=False)
    v = init_variables(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 64)
    f = lambda p, pos: jnp.mean(Transformer(cfg).apply(  # noqa: E731
        {"params": p, "balance": v["balance"]}, tokens, positions=pos, segment_ids=jnp.ones_like(pos))[0] ** 2)
    # positions are an argument, as in the train step (constant ones fold the conditional away)
    hlo = jax.jit(jax.grad(f)).lower(v["params"], pos).compile().as_text()
    # one cosine and one sine in the taken branch, one of each in the recomputing branch
    assert hlo.count(" cosine(") == 2 and hlo.count(" sine(") == 2, (hlo.count(" cosine("), hlo.count(" sine("))
