"""PPO/GRPO math in `mpo_jax.rl` against independent float64 numpy references.

Every reference below is a plain loop transcription of the formulas in
`mpo_reference.md` D.2/D.3, i.e. of TRL's PPOTrainer (`masked_mean`, Bessel-corrected
`masked_var`, `masked_whiten`, `first_true_indices`, `truncate_response`, INVALID_LOGPROB
fills, the `actual_end` score placement, the reverse GAE loop, the clipped losses) and of
TRL's GRPOTrainer (group-normalised advantages, grpo/bnpo/dr_grpo aggregation).
None of them calls the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpo_jax.rl.advantages import compute_gae, group_advantages
from mpo_jax.rl.kl import kl_estimate
from mpo_jax.rl.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    grpo_loss,
    token_logprobs,
)
from mpo_jax.rl.masked import masked_mean, masked_var, masked_whiten
from mpo_jax.rl.rewards import (
    INVALID_LOGPROB,
    apply_missing_eos_penalty,
    response_masks,
    score_index,
    shape_rewards,
)

TOL = dict(rtol=1e-5, atol=1e-5)
PAD, EOS = 0, 2
ESTIMATORS = ("k1", "k2", "k3")


def close(actual, expected, **tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **(tol or TOL))


# ------------------------------------------------------------------ numpy references (TRL transcriptions)


def ref_masked_mean(x, mask):
    total, count = 0.0, 0
    for value, keep in zip(np.ravel(x), np.ravel(mask)):
        if keep:
            total += float(value)
            count += 1
    return total / count


def ref_masked_var(x, mask, unbiased=True):
    mean = ref_masked_mean(x, mask)
    kept = [float(v) for v, keep in zip(np.ravel(x), np.ravel(mask)) if keep]
    var = sum((v - mean) ** 2 for v in kept) / len(kept)
    if unbiased:
        var *= len(kept) / (len(kept) - 1)  # TRL's Bessel correction
    return var


def ref_masked_whiten(x, mask, shift_mean=True):
    mean, var = ref_masked_mean(x, mask), ref_masked_var(x, mask)
    out = (np.asarray(x, np.float64) - mean) / math.sqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def ref_first_true_indices(bools):
    out = []
    for row in bools:
        index = len(row)
        for t, b in enumerate(row):
            if b:
                index = t
                break
        out.append(index)
    return np.array(out)


def ref_truncate_response(responses, stop_token=EOS, pad_token=PAD):
    trunc = ref_first_true_indices(responses == stop_token)
    out = responses.copy()
    for b in range(responses.shape[0]):
        for t in range(responses.shape[1]):
            if t > trunc[b]:
                out[b, t] = pad_token
    return out


def ref_padding_masks(seq_len, length):
    padding = np.array([[t > s for t in range(length)] for s in seq_len])
    padding_p1 = np.array([[t > s + 1 for t in range(length)] for s in seq_len])
    return padding, padding_p1


def ref_kl(logprob, ref_logprob, estimator):
    logr = ref_logprob - logprob
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr**2
    return (math.exp(logr) - 1.0) - logr


def ref_trl_rewards(scores, logprobs, ref_logprobs, seq_len, kl_coef, estimator, whiten, position):
    """TRL's step 4/5: INVALID fills, kl, non_score_reward, score at actual_end, optional whitening."""
    bsz, length = logprobs.shape
    padding, padding_p1 = ref_padding_masks(seq_len, length)
    lp = np.where(padding, INVALID_LOGPROB, logprobs).astype(np.float64)
    rlp = np.where(padding, INVALID_LOGPROB, ref_logprobs).astype(np.float64)
    kl = np.zeros((bsz, length))
    for b in range(bsz):
        for t in range(length):
            kl[b, t] = ref_kl(lp[b, t], rlp[b, t], estimator)
    non_score = -kl_coef * kl
    rewards = non_score.copy()
    for b in range(bsz):
        if position == "after_last_token":
            end = seq_len[b] + 1 if seq_len[b] + 1 < length else seq_len[b]
        else:  # "last_token"; an empty response has none, the module puts it at 0
            end = max(seq_len[b], 0)
        rewards[b, end] += scores[b]
    if whiten:
        rewards = ref_masked_whiten(rewards, ~padding_p1, shift_mean=False)
        rewards[padding_p1] = 0.0
    return dict(rewards=rewards, kl=kl, non_score_reward=non_score, logprobs=lp, ref_logprobs=rlp)


def ref_trl_gae(rewards, values, gamma, lam):
    """TRL's unmasked reverse loop over every position, V_L = 0."""
    length = rewards.shape[1]
    lastgaelam = np.zeros(rewards.shape[0])
    reversed_adv = []
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = np.stack(reversed_adv[::-1], axis=1)
    return advantages, advantages + values


def ref_gae_closed_form(rewards, values, valid, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k} over the valid prefix of each row (zero elsewhere)."""
    bsz, length = rewards.shape
    adv = np.zeros((bsz, length))
    ret = np.zeros((bsz, length))
    for b in range(bsz):
        n = int(valid[b].sum())
        assert valid[b, :n].all()  # contiguous prefix
        r, v = rewards[b, :n].astype(np.float64), values[b, :n].astype(np.float64)
        deltas = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            ret[b, t] = adv[b, t] + v[t]
    return adv, ret


def ref_log_softmax(logits, temperature):
    z = logits.astype(np.float64) / (temperature + 1e-7)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------ fixtures


def make_rollout(seed=0, length=7, vocab=11):
    """Responses covering every edge case, run through TRL's truncation and length logic.

    rows: EOS mid-way with junk after it; full length without EOS; empty (all pad); EOS at the
    last index; EOS at L-2 (score lands on the last index); EOS first; EOS at 2.
    """
    rng = np.random.default_rng(seed)
    raw = rng.integers(3, vocab, size=(7, length))
    raw[0, 3] = EOS
    raw[0, 5] = EOS  # a second EOS after the first: truncated away
    raw[2, :] = PAD
    raw[3, length - 1] = EOS
    raw[4, length - 2] = EOS
    raw[5, 0] = EOS
    raw[6, 2] = EOS
    post = ref_truncate_response(raw)
    seq_len = ref_first_true_indices(post == PAD) - 1
    contains_eos = (post == EOS).any(axis=1)
    assert seq_len.tolist() == [3, length - 1, -1, length - 1, length - 2, 0, 2]
    assert contains_eos.tolist() == [True, False, False, True, True, True, True]
    return post, seq_len, contains_eos


# ------------------------------------------------------------------ masked statistics


def test_masked_mean_var_whiten_match_trl():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (4, 9)).astype(np.float32)
    mask = rng.random((4, 9)) < 0.6
    close(masked_mean(jnp.asarray(x), jnp.asarray(mask)), ref_masked_mean(x, mask))
    close(masked_var(jnp.asarray(x), jnp.asarray(mask)), ref_masked_var(x, mask), rtol=2e-5, atol=1e-5)
    close(masked_var(jnp.asarray(x), jnp.asarray(mask), unbiased=False), ref_masked_var(x, mask, False),
          rtol=2e-5, atol=1e-5)
    for shift in (True, False):
        close(masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift),
              ref_masked_whiten(x, mask, shift_mean=shift))
    # per-row means along an axis
    rows = masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=1)
    close(rows, [ref_masked_mean(x[b], mask[b]) for b in range(4)])


def test_masked_mean_ignores_nonfinite_values_at_masked_positions():
    x = np.array([[1.0, 2.0, np.nan, np.inf]], np.float32)
    mask = np.array([[True, True, False, False]])
    close(masked_mean(jnp.asarray(x), jnp.asarray(mask)), 1.5)
    close(masked_whiten(jnp.asarray(x), jnp.asarray(mask))[:, :2], ref_masked_whiten(x[:, :2], mask[:, :2]))


def test_masked_mean_all_masked_is_zero_not_nan():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32))
    mask = np.ones((3, 5), bool)
    mask[1] = False
    rows = np.asarray(masked_mean(x, jnp.asarray(mask), axis=1))
    assert np.isfinite(rows).all() and rows[1] == 0.0
    close(rows[[0, 2]], [ref_masked_mean(np.asarray(x)[b], mask[b]) for b in (0, 2)])
    assert float(masked_mean(x, jnp.zeros((3, 5), bool))) == 0.0
    assert np.isfinite(float(masked_var(x, jnp.zeros((3, 5), bool))))


@settings(max_examples=25, deadline=None, database=None)
@given(hnp.arrays(np.float32, (3, 6), elements=st.floats(-50, 50, width=32)),
       st.lists(st.integers(-1, 5), min_size=3, max_size=3),
       st.booleans())
def test_masked_whiten_property(x, seq_len, shift):
    """Whitened values match the reference; with real spread, masked mean -> 0 (or kept) and var -> 1."""
    seq_len = np.array(seq_len)
    if (seq_len + 1).sum() < 2:
        seq_len[0] = 5
    valid = ~ref_padding_masks(seq_len, 6)[0]
    out = np.asarray(masked_whiten(jnp.asarray(x), jnp.asarray(valid), shift_mean=shift), np.float64)
    assert np.isfinite(out).all()
    var = ref_masked_var(x, valid)
    if var < 1e-2:
        # near-constant inputs: float32 rounding of x - mean (~1e-7 |x|) is amplified by up to
        # 1 / sqrt(1e-8), so the float32 result legitimately departs from float64 (TRL's would too)
        return
    expected = ref_masked_whiten(x, valid, shift_mean=shift)
    amplification = np.abs(x).max() / math.sqrt(var)
    close(out, expected, rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()) + 1e-6 * amplification)
    target = 0.0 if shift else ref_masked_mean(x, valid)
    assert abs(ref_masked_mean(out, valid) - target) < 1e-4 * (1 + abs(target)) + 1e-6 * amplification
    assert abs(ref_masked_var(out, valid) - 1.0) < 1e-3


# ------------------------------------------------------------------ GAE


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.97, 1.0)])
def test_gae_with_padding_matches_closed_form_and_trl_loop(gamma, lam):
    post, seq_len, _ = make_rollout(seed=3)
    length = post.shape[1]
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=post.shape).astype(np.float32)
    values = rng.normal(size=post.shape).astype(np.float32)
    padding, padding_p1 = ref_padding_masks(seq_len, length)
    value_mask = ~padding_p1
    # junk outside the mask must not leak in
    rewards_junk = np.where(value_mask, rewards, 123.0).astype(np.float32)
    values_junk = np.where(value_mask, values, -77.0).astype(np.float32)
    adv, ret = compute_gae(jnp.asarray(rewards_junk), jnp.asarray(values_junk), jnp.asarray(value_mask), gamma, lam)

    exp_adv, exp_ret = ref_gae_closed_form(rewards, values, value_mask, gamma, lam)
    close(adv, exp_adv)
    close(ret, exp_ret)
    # TRL: values zeroed on padding_mask_p1, rewards zero there, then the unmasked loop
    trl_adv, trl_ret = ref_trl_gae(np.where(padding_p1, 0.0, rewards), np.where(padding_p1, 0.0, values), gamma, lam)
    close(adv, trl_adv)
    close(ret, trl_ret)
    # the empty row (seq_len -1) still has one value position; the full rows use every position
    assert value_mask[2].sum() == 1 and value_mask[1].all() and value_mask[3].all()


@settings(max_examples=25, deadline=None, database=None)
@given(hnp.arrays(np.float32, (3, 6), elements=st.floats(-5, 5, width=32)),
       hnp.arrays(np.float32, (3, 6), elements=st.floats(-5, 5, width=32)),
       st.lists(st.integers(-1, 5), min_size=3, max_size=3),
       st.floats(0.5, 1.0), st.floats(0.0, 1.0))
def test_gae_property_matches_trl_loop(rewards, values, seq_len, gamma, lam):
    padding_p1 = ref_padding_masks(np.array(seq_len), 6)[1]
    adv, ret = compute_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(~padding_p1), gamma, lam)
    trl_adv, trl_ret = ref_trl_gae(np.where(padding_p1, 0.0, rewards).astype(np.float64),
                                   np.where(padding_p1, 0.0, values).astype(np.float64), gamma, lam)
    close(adv, trl_adv, rtol=1e-5, atol=5e-5)
    close(ret, trl_ret, rtol=1e-5, atol=5e-5)
    if lam == 1.0:  # values telescope: returns are discounted reward sums
        r = np.where(padding_p1, 0.0, rewards).astype(np.float64)
        disc = np.array([[sum(gamma**k * r[b, t + k] for k in range(6 - t)) for t in range(6)] for b in range(3)])
        close(ret, disc, rtol=1e-5, atol=5e-5)


# ------------------------------------------------------------------ KL estimators


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_closed_forms(estimator):
    rng = np.random.default_rng(5)
    logp = rng.normal(-2.0, 1.5, (4, 8)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 1.0, (4, 8))).astype(np.float32)
    out = kl_estimate(jnp.asarray(logp), jnp.asarray(ref), estimator)
    expected = np.vectorize(lambda a, b: ref_kl(float(a), float(b), estimator))(logp, ref)
    close(out, expected, rtol=1e-5, atol=2e-5)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")


def test_k3_and_k2_are_nonnegative_and_zero_at_equality():
    logr = np.concatenate([np.linspace(-20, 20, 401), np.geomspace(1e-8, 1e-1, 50), -np.geomspace(1e-8, 1e-1, 50)])
    logp = np.full_like(logr, -3.0).astype(np.float32)
    ref = (logp + logr).astype(np.float32)
    for estimator in ("k2", "k3"):
        assert (np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), estimator)) >= 0).all()
        assert (np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(logp), estimator)) == 0).all()


def test_k1_and_k3_are_unbiased_on_exact_enumeration():
    """E_{x~p}[k(x)] computed exactly by weighting every outcome by p(x) equals KL(p || q)."""
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    exact_kl = sum(p[i] * math.log(p[i] / q[i]) for i in range(6))
    logp, logq = jnp.asarray(np.log(p), jnp.float32), jnp.asarray(np.log(q), jnp.float32)
    for estimator in ("k1", "k3"):
        per_outcome = np.asarray(kl_estimate(logp, logq, estimator), np.float64)
        assert abs(float((p * per_outcome).sum()) - exact_kl) < 1e-5
    # k2 is biased: E_p[0.5 log^2 r] differs from KL(p||q) in general
    k2 = np.asarray(kl_estimate(logp, logq, "k2"), np.float64)
    expected_k2 = sum(p[i] * 0.5 * math.log(q[i] / p[i]) ** 2 for i in range(6))
    assert abs(float((p * k2).sum()) - expected_k2) < 1e-5


# ------------------------------------------------------------------ reward shaping


def test_response_masks_and_score_index_match_trl():
    post, seq_len, _ = make_rollout(seed=7)
    length = post.shape[1]
    masks = response_masks(jnp.asarray(post != PAD))
    padding, padding_p1 = ref_padding_masks(seq_len, length)
    np.testing.assert_array_equal(np.asarray(masks.seq_len), seq_len)
    np.testing.assert_array_equal(np.asarray(masks.padding), padding)
    np.testing.assert_array_equal(np.asarray(masks.padding_p1), padding_p1)
    after = [s + 1 if s + 1 < length else s for s in seq_len]  # TRL's actual_end
    np.testing.assert_array_equal(np.asarray(score_index(jnp.asarray(seq_len), length)), after)
    assert after == [4, 6, 0, 6, 6, 1, 3]
    np.testing.assert_array_equal(np.asarray(score_index(jnp.asarray(seq_len), length, "last_token")),
                                  [3, 6, 0, 6, 5, 0, 2])
    with pytest.raises(ValueError):
        score_index(jnp.asarray(seq_len), length, "first_token")


def test_missing_eos_penalty():
    _, _, contains_eos = make_rollout(seed=8)
    scores = np.arange(7, dtype=np.float32) * 0.5
    out = apply_missing_eos_penalty(jnp.asarray(scores), jnp.asarray(contains_eos), 1.0)
    expected = scores.astype(np.float64).copy()
    for b in range(7):
        if not contains_eos[b]:
            expected[b] -= 1.0
    close(out, expected)
    close(apply_missing_eos_penalty(jnp.asarray(scores), jnp.asarray(contains_eos), None), scores)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("position", ["after_last_token", "last_token"])
@pytest.mark.parametrize("whiten", [False, True])
def test_shape_rewards_matches_trl(estimator, position, whiten):
    post, seq_len, contains_eos = make_rollout(seed=9)
    rng = np.random.default_rng(10)
    shape = post.shape
    # junk at padded positions: shape_rewards must overwrite it with INVALID_LOGPROB
    logprobs = rng.normal(-2.0, 1.0, shape).astype(np.float32)
    ref_logprobs = (logprobs + rng.normal(0, 0.5, shape)).astype(np.float32)
    raw_scores = rng.normal(3.0, 2.0, shape[0]).astype(np.float32)
    scores = apply_missing_eos_penalty(jnp.asarray(raw_scores), jnp.asarray(contains_eos), 1.0)
    trl_scores = np.where(contains_eos, raw_scores, raw_scores - 1.0)
    kl_coef = 0.05
    out = shape_rewards(scores, jnp.asarray(logprobs), jnp.asarray(ref_logprobs), jnp.asarray(post != PAD),
                        kl_coef=kl_coef, kl_estimator=estimator, score_position=position, whiten_rewards=whiten)
    exp = ref_trl_rewards(trl_scores, logprobs, ref_logprobs, seq_len, kl_coef, estimator, whiten, position)
    for key in ("rewards", "kl", "non_score_reward", "logprobs", "ref_logprobs"):
        close(out[key], exp[key])
    padding, _ = ref_padding_masks(seq_len, shape[1])
    assert (np.asarray(out["logprobs"])[padding] == INVALID_LOGPROB).all()
    assert (np.asarray(out["kl"])[padding] == 0).all()
    if not whiten:
        rewards = np.asarray(out["rewards"], np.float64)
        nsr = np.asarray(out["non_score_reward"], np.float64)
        # exactly one position per row carries the score, where TRL puts it
        ends = [s + 1 if s + 1 < shape[1] else s for s in seq_len] if position == "after_last_token" \
            else [max(s, 0) for s in seq_len]
        for b in range(shape[0]):
            close(rewards[b, ends[b]] - nsr[b, ends[b]], trl_scores[b])
            others = np.delete(rewards[b] - nsr[b], ends[b])
            assert (others == 0).all()


def test_full_trl_rollout_pipeline():
    """Rewards -> value masking -> GAE -> advantage whitening, end to end against TRL steps 1-6."""
    post, seq_len, contains_eos = make_rollout(seed=11)
    rng = np.random.default_rng(12)
    shape = post.shape
    logprobs = rng.normal(-2.0, 1.0, shape).astype(np.float32)
    ref_logprobs = (logprobs + rng.normal(0, 0.5, shape)).astype(np.float32)
    values = rng.normal(size=shape).astype(np.float32)
    raw_scores = rng.normal(2.0, 1.0, shape[0]).astype(np.float32)
    gamma, lam, kl_coef = 0.99, 0.9, 0.02

    scores = apply_missing_eos_penalty(jnp.asarray(raw_scores), jnp.asarray(contains_eos), 1.0)
    shaped = shape_rewards(scores, jnp.asarray(logprobs), jnp.asarray(ref_logprobs), jnp.asarray(post != PAD),
                           kl_coef=kl_coef, kl_estimator="k1")
    masks = shaped["masks"]
    adv, ret = compute_gae(shaped["rewards"], jnp.asarray(values), ~masks.padding_p1, gamma, lam)
    adv = jnp.where(masks.padding, 0.0, masked_whiten(adv, ~masks.padding))

    padding, padding_p1 = ref_padding_masks(seq_len, shape[1])
    trl = ref_trl_rewards(np.where(contains_eos, raw_scores, raw_scores - 1.0), logprobs, ref_logprobs, seq_len,
                          kl_coef, "k1", False, "after_last_token")
    trl_adv, trl_ret = ref_trl_gae(trl["rewards"], np.where(padding_p1, 0.0, values.astype(np.float64)), gamma, lam)
    trl_adv = np.where(padding, 0.0, ref_masked_whiten(trl_adv, ~padding))
    close(ret, trl_ret)
    close(adv, trl_adv)


# ------------------------------------------------------------------ PPO losses


def policy_batch(seed=13):
    rng = np.random.default_rng(seed)
    bsz, length = 4, 9
    seq_len = np.array([8, 3, -1, 5])
    padding, _ = ref_padding_masks(seq_len, length)
    old = rng.normal(-2.0, 1.0, (bsz, length))
    # log-ratios from log(0.5) to log(1.6): inside and outside [0.8, 1.2] on both sides
    log_ratio = rng.uniform(math.log(0.5), math.log(1.6), (bsz, length))
    new = old + log_ratio
    adv = rng.normal(0.0, 1.0, (bsz, length))
    # TRL fills both with INVALID_LOGPROB at pads (so their difference is 0 there)
    old = np.where(padding, INVALID_LOGPROB, old).astype(np.float32)
    new = np.where(padding, INVALID_LOGPROB, new).astype(np.float32)
    return new, old, adv.astype(np.float32), padding


def ref_policy_loss(new, old, adv, padding, eps):
    ratio = np.exp(new.astype(np.float64) - old.astype(np.float64))
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, 1 - eps, 1 + eps)
    keep = ~padding
    loss = ref_masked_mean(np.maximum(pg1, pg2), keep)
    clipfrac = ref_masked_mean((pg2 > pg1).astype(np.float64), keep)
    diff = new.astype(np.float64) - old.astype(np.float64)
    approxkl = 0.5 * float(np.mean(diff**2))  # unmasked, like TRL
    return loss, dict(clipfrac=clipfrac, approxkl=approxkl, ratio=float(np.mean(ratio)))


@pytest.mark.parametrize("eps", [0.2, 0.1])
def test_clipped_policy_loss_and_metrics(eps):
    new, old, adv, padding = policy_batch()
    ratio = np.exp(new.astype(np.float64) - old)[~padding]
    a = adv[~padding]
    # the batch exercises every branch
    assert ((ratio > 1 + eps) & (a > 0)).any() and ((ratio > 1 + eps) & (a < 0)).any()
    assert ((ratio < 1 - eps) & (a > 0)).any() and ((ratio < 1 - eps) & (a < 0)).any()
    assert (abs(ratio - 1) < eps).any()
    loss, metrics = clipped_policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(~padding),
                                        eps)
    exp_loss, exp_metrics = ref_policy_loss(new, old, adv, padding, eps)
    close(loss, exp_loss)
    for key, value in exp_metrics.items():
        close(metrics[key], value)
    assert 0 < float(metrics["clipfrac"]) < 1


def test_policy_approxkl_is_unmasked_mean():
    """TRL's approxkl/ratio average over every position: pads count (as zeros / ones when filled)."""
    new, old, adv, padding = policy_batch(seed=14)
    new_junk = np.where(padding, new + 0.5, new).astype(np.float32)
    _, metrics = clipped_policy_loss(jnp.asarray(new_junk), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(~padding),
                                     0.2)
    diff = new_junk.astype(np.float64) - old
    close(metrics["approxkl"], 0.5 * np.mean(diff**2))


def test_clipped_policy_loss_gradient_is_analytic():
    eps = 0.2
    new, old, adv, padding = policy_batch(seed=15)
    keep = ~padding
    grad = jax.grad(lambda nl: clipped_policy_loss(nl, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(keep),
                                                   eps)[0])(jnp.asarray(new))
    n = keep.sum()
    expected = np.zeros(new.shape)
    n_clipped = 0
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not keep[b, t]:
                continue
            r = math.exp(float(new[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            # the clipped branch is the max (active) iff r is outside the range on the side where the
            # clip lowers the loss: r > 1+eps with A > 0, or r < 1-eps with A < 0. Then d/dlogp = 0.
            if (r > 1 + eps and a > 0) or (r < 1 - eps and a < 0):
                n_clipped += 1
                continue
            expected[b, t] = -a * r / n  # d(-A r)/dlogp = -A r
    assert n_clipped > 0
    close(grad, expected)


def test_clipped_value_loss_and_clipfrac():
    rng = np.random.default_rng(16)
    bsz, length = 4, 8
    seq_len = np.array([7, 2, -1, 6])
    _, padding_p1 = ref_padding_masks(seq_len, length)
    old_values = rng.normal(size=(bsz, length))
    values = old_values + rng.uniform(-0.5, 0.5, (bsz, length))
    returns = old_values + rng.normal(0, 0.7, (bsz, length))
    # TRL zeroes vpred and the stored values on padding_mask_p1
    values = np.where(padding_p1, 0.0, values).astype(np.float32)
    old_values = np.where(padding_p1, 0.0, old_values).astype(np.float32)
    returns = returns.astype(np.float32)
    cv = 0.2
    loss, metrics = clipped_value_loss(jnp.asarray(values), jnp.asarray(old_values), jnp.asarray(returns),
                                       jnp.asarray(~padding_p1), cv)
    v, vo, r = (x.astype(np.float64) for x in (values, old_values, returns))
    vclip = np.clip(v, vo - cv, vo + cv)
    vf1, vf2 = (v - r) ** 2, (vclip - r) ** 2
    close(loss, 0.5 * ref_masked_mean(np.maximum(vf1, vf2), ~padding_p1))
    close(metrics["clipfrac"], ref_masked_mean((vf2 > vf1).astype(np.float64), ~padding_p1))
    assert 0 < float(metrics["clipfrac"]) < 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy(temperature):
    rng = np.random.default_rng(17)
    logits = rng.normal(0, 3, (2, 5, 13)).astype(np.float32)
    tokens = rng.integers(0, 13, (2, 5))
    logp = ref_log_softmax(logits, temperature)
    expected_lp = np.array([[logp[b, t, tokens[b, t]] for t in range(5)] for b in range(2)])
    expected_ent = -(np.exp(logp) * logp).sum(-1)
    close(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature), expected_lp, rtol=1e-5, atol=3e-5)
    close(entropy_from_logits(jnp.asarray(logits), temperature), expected_ent, rtol=1e-5, atol=3e-5)
    # TRL's form: logsumexp(z) - sum(softmax(z) * z)
    z = logits.astype(np.float64) / (temperature + 1e-7)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    p = np.exp(z - lse[..., None])
    close(entropy_from_logits(jnp.asarray(logits), temperature), lse - (p * z).sum(-1), rtol=1e-5, atol=3e-5)


def test_token_logprobs_accepts_bf16_logits():
    rng = np.random.default_rng(18)
    logits = rng.normal(0, 2, (1, 3, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (1, 3))
    bf16 = jnp.asarray(logits).astype(jnp.bfloat16)
    out = token_logprobs(bf16, jnp.asarray(tokens))
    assert out.dtype == jnp.float32
    lp = ref_log_softmax(np.asarray(bf16.astype(jnp.float32)), 1.0)
    close(out, [[lp[0, t, tokens[0, t]] for t in range(3)]], rtol=1e-5, atol=3e-5)


# ------------------------------------------------------------------ GRPO


def ref_group_advantages(scores, group, scale, eps=1e-4):
    out = np.zeros(len(scores))
    for start in range(0, len(scores), group):
        chunk = [float(s) for s in scores[start:start + group]]
        mean = sum(chunk) / group
        std = math.sqrt(sum((c - mean) ** 2 for c in chunk) / (group - 1))  # torch.std: unbiased
        for i, c in enumerate(chunk):
            out[start + i] = (c - mean) / (std + eps) if scale else c - mean
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages(scale):
    rng = np.random.default_rng(19)
    scores = rng.normal(5.0, 2.0, 12).astype(np.float32)
    scores[8:12] = 3.0  # a constant group: zero advantage, not NaN
    out = group_advantages(jnp.asarray(scores), 4, scale=scale)
    close(out, ref_group_advantages(scores, 4, scale), rtol=1e-5, atol=2e-5)
    assert (np.asarray(out)[8:12] == 0).all()
    with pytest.raises(ValueError):
        group_advantages(jnp.asarray(scores), 5)


def ref_grpo(new, old, ref, adv, mask, eps_low, eps_high, beta, loss_type):
    bsz, length = new.shape
    per_token = np.zeros((bsz, length))
    kl = np.zeros((bsz, length))
    ratio = np.zeros((bsz, length))
    clipped = np.zeros((bsz, length))
    for b in range(bsz):
        for t in range(length):
            r = math.exp(float(new[b, t]) - float(old[b, t]))
            ratio[b, t] = r
            a = float(adv[b])
            loss1, loss2 = r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a
            kl[b, t] = ref_kl(float(new[b, t]), float(ref[b, t]), "k3")
            per_token[b, t] = -min(loss1, loss2) + beta * kl[b, t]
            clipped[b, t] = float((r < 1 - eps_low and a < 0) or (r > 1 + eps_high and a > 0))
    m = mask.astype(np.float64)
    if loss_type == "grpo":
        loss = np.mean([(per_token[b] * m[b]).sum() / max(m[b].sum(), 1.0) for b in range(bsz)])
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / max(m.sum(), 1.0)
    else:  # dr_grpo: batch * max_completion_length (= the padded length here)
        loss = (per_token * m).sum() / (bsz * length)
    metrics = dict(clipfrac=ref_masked_mean(clipped, mask), kl=ref_masked_mean(kl, mask),
                   ratio=ref_masked_mean(ratio, mask))
    return loss, metrics


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("cliprange_high", [None, 0.28])
def test_grpo_loss(loss_type, beta, cliprange_high):
    rng = np.random.default_rng(20)
    bsz, length = 6, 7
    lengths = np.array([7, 3, 0, 5, 1, 6])  # includes an empty completion
    mask = np.arange(length)[None] < lengths[:, None]
    old = rng.normal(-2.0, 1.0, (bsz, length)).astype(np.float32)
    new = (old + rng.uniform(math.log(0.6), math.log(1.5), (bsz, length))).astype(np.float32)
    ref = (new + rng.normal(0, 0.3, (bsz, length))).astype(np.float32)
    adv = np.array([1.2, -0.7, 0.4, -1.5, 0.9, -0.2], np.float32)
    loss, metrics = grpo_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                              jnp.asarray(mask), cliprange=0.2, cliprange_high=cliprange_high, beta=beta,
                              kl_estimator="k3", loss_type=loss_type)
    high = 0.2 if cliprange_high is None else cliprange_high
    exp_loss, exp_metrics = ref_grpo(new, old, ref, adv, mask, 0.2, high, beta, loss_type)
    close(loss, exp_loss)
    for key, value in exp_metrics.items():
        close(metrics[key], value)
    assert 0 < exp_metrics["clipfrac"] < 1


def test_grpo_loss_on_policy_gradient_is_advantage_weighted():
    """With new == old (mu = 1) and beta = 0, d loss / d logp = -A / |o_i| / G on the mask ("grpo")."""
    rng = np.random.default_rng(21)
    lengths = np.array([4, 2, 3])
    mask = np.arange(4)[None] < lengths[:, None]
    logp = rng.normal(-2, 1, (3, 4)).astype(np.float32)
    adv = np.array([0.5, -1.0, 2.0], np.float32)
    grad = jax.grad(lambda nl: grpo_loss(nl, jax.lax.stop_gradient(nl), jnp.asarray(logp), jnp.asarray(adv),
                                         jnp.asarray(mask), cliprange=0.2)[0])(jnp.asarray(logp))
    expected = np.array([[-adv[b] / lengths[b] / 3 if mask[b, t] else 0.0 for t in range(4)] for b in range(3)])
    close(grad, expected)
