"""GRPO's loss and gradient against a small example worked by hand, for each aggregation mode."""

import math

import pytest
import torch

from audiorl.objectives.grpo import group_advantages, grpo_loss

# two completions; the first has 2 tokens, the second 3. Importance ratios chosen so that some
# tokens fall outside the clip range [0.8, 1.2]:
#   seq 0 (A = +1): r = 1.5 (clipped, -1.2), 1.0 (-1.0)
#   seq 1 (A = -1): r = 0.5 (clipped, +0.8), 1.1 (+1.1), 1.0 (+1.0)
RATIOS = [[1.5, 1.0, 1.0], [0.5, 1.1, 1.0]]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -1.0])
# d(token loss)/d(log p) = -A * r where the unclipped branch is taken, 0 where the clip is
TOKEN_GRADS = torch.tensor([[0.0, -1.0, 0.0], [0.0, 1.1, 1.0]])


def _inputs():
    token_logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, -3.0]], requires_grad=True)
    old = token_logps.detach() - torch.log(torch.tensor(RATIOS))
    return token_logps, old


@pytest.mark.parametrize(
    "loss_type,expected,scale",
    [
        ("grpo", ((-1.2 - 1.0) / 2 + (0.8 + 1.1 + 1.0) / 3) / 2, torch.tensor([[1 / 4, 1 / 4, 0], [1 / 6, 1 / 6, 1 / 6]])),
        ("bnpo", (-2.2 + 2.9) / 5, torch.full((2, 3), 1 / 5)),
        ("dr_grpo", (-2.2 + 2.9) / (2 * 4), torch.full((2, 3), 1 / 8)),
        ("dapo", (-2.2 + 2.9) / 10, torch.full((2, 3), 1 / 10)),
    ],
)
def test_loss_and_gradient_by_hand(loss_type, expected, scale):
    token_logps, old = _inputs()
    out = grpo_loss(
        token_logps, old, ADV, MASK, loss_type=loss_type, epsilon=0.2, max_completion_length=4,
        num_items=10 if loss_type == "dapo" else None,
    )
    assert float(out.loss.detach()) == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(token_logps.grad, TOKEN_GRADS * scale * MASK, rtol=1e-5, atol=1e-6)
    # 2 of 5 tokens were clipped: one low (A<0, r<0.8), one high (A>0, r>1.2)
    assert float(out.metrics["clip_ratio/low_mean"]) == pytest.approx(1 / 5)
    assert float(out.metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 5)


def test_dapo_defaults_to_this_batch_tokens():
    token_logps, old = _inputs()
    assert float(grpo_loss(token_logps, old, ADV, MASK, loss_type="dapo").loss.detach()) == pytest.approx(0.7 / 5)


def test_epsilon_high_widens_the_upper_clip():
    token_logps, old = _inputs()
    out = grpo_loss(token_logps, old, ADV, MASK, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6)
    # r = 1.5 is now inside [0.8, 1.6]: -1.5 instead of -1.2
    assert float(out.loss.detach()) == pytest.approx((-1.5 - 1.0 + 2.9) / 5)


def test_sequence_level_importance_sampling():
    token_logps, old = _inputs()
    out = grpo_loss(token_logps, old, ADV, MASK, loss_type="grpo", importance_sampling_level="sequence")
    r0 = math.exp(math.log(1.5) / 2)  # geometric mean over seq 0's two tokens: 1.2247 > 1.2 -> clipped
    r1 = math.exp((math.log(0.5) + math.log(1.1)) / 3)  # 0.8193: inside the range
    assert r0 > 1.2 and 0.8 < r1 < 1.2
    expected = (-1.2 + r1) / 2
    assert float(out.loss.detach()) == pytest.approx(expected, abs=1e-6)


def test_kl_term_k3():
    token_logps, old = _inputs()
    ref = token_logps.detach() + 0.5  # log π_ref − log π = 0.5 everywhere
    base = float(grpo_loss(token_logps, old, ADV, MASK, loss_type="bnpo").loss.detach())
    out = grpo_loss(token_logps, old, ADV, MASK, loss_type="bnpo", beta=0.1, ref_token_logps=ref)
    k3 = math.exp(0.5) - 0.5 - 1
    assert float(out.metrics["kl"]) == pytest.approx(k3, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(base + 0.1 * k3, rel=1e-5)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]))
    grouped = group_advantages(rewards, group_size=4, scale_rewards="group")
    std0 = torch.tensor([1.0, 0.0, 0.5, 0.5]).std()
    assert float(grouped[0]) == pytest.approx(0.5 / (float(std0) + 1e-4))
    batch = group_advantages(rewards, group_size=4, scale_rewards="batch")
    assert float(batch[4]) == pytest.approx(1.0 / (float(rewards.std()) + 1e-4))
    # a group whose completions all scored the same teaches nothing
    same = group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), group_size=4)
    assert torch.all(same == 0)


def test_cispo_keeps_every_tokens_gradient_through_a_capped_weight():
    token_logps, old = _inputs()
    out = grpo_loss(token_logps, old, ADV, MASK, loss_type="cispo", epsilon_high=1.2)
    # −sg(min(r, 1.2)) · A · log p per token, summed / 5 tokens: the clipped tokens still count
    weights = torch.tensor([[1.2, 1.0, 1.0], [0.5, 1.1, 1.0]])
    expected = float((-(weights * ADV.unsqueeze(1) * token_logps.detach()) * MASK).sum() / 5)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    torch.testing.assert_close(token_logps.grad, -weights * ADV.unsqueeze(1) * MASK / 5)
    assert float(out.metrics["cispo_clip_ratio"]) == pytest.approx(1 / 5)  # r = 1.5 > 1.2 with A > 0


def test_sapo_gates_softly():
    token_logps, old = _inputs()
    out = grpo_loss(token_logps, old, ADV, MASK, loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=2.0)
    tau = torch.tensor([[1.0], [2.0]])
    r = torch.tensor(RATIOS)
    per_token = -torch.sigmoid(tau * (r - 1)) * 4 / tau * ADV.unsqueeze(1)
    expected = ((per_token * MASK).sum(1) / MASK.sum(1)).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    out.loss.backward()
    # d/dlog p = −4 σ(x)(1 − σ(x)) · r · A, x = τ (r − 1): at r = 1 the plain surrogate's −A
    sig = torch.sigmoid(tau * (r - 1))
    grads = -4 * sig * (1 - sig) * r * ADV.unsqueeze(1) * MASK / MASK.sum(1, keepdim=True) / 2
    torch.testing.assert_close(token_logps.grad, grads, rtol=1e-5, atol=1e-7)
    assert float(grads[0, 1]) == pytest.approx(-1.0 / 2 / 2)  # r = 1, A = +1, 2 tokens, 2 sequences


def test_top_entropy_quantile_trains_only_the_uncertain_tokens():
    from audiorl.objectives.grpo import high_entropy_mask

    entropies = torch.tensor([[0.1, 2.0, 9.0], [1.5, 0.2, 3.0]])  # 9.0 is padding
    keep = high_entropy_mask(entropies, MASK, top_quantile=0.4)
    # the 5 real tokens' entropies 0.1, 2.0, 1.5, 0.2, 3.0: the 0.6 quantile is 1.8 -> 2.0 and 3.0
    assert keep.tolist() == [[False, True, False], [False, False, True]]
    token_logps, old = _inputs()
    out = grpo_loss(token_logps, old, ADV, MASK, loss_type="bnpo", entropy_mask=keep)
    out.loss.backward()
    # only the kept tokens carry gradient; the loss still averages over all 5 tokens, as TRL does
    torch.testing.assert_close(token_logps.grad, TOKEN_GRADS * keep / 5)
    assert float(out.metrics["entropy_mask/kept"]) == pytest.approx(2 / 5)


def test_rloo_baseline_leaves_the_completion_out():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = group_advantages(rewards, group_size=4, scale_rewards="none", estimator="rloo")
    # 1.0 against the mean of (0, 0.5, 0.5) = 1/3; 0.0 against 2/3; 0.5 against 0.5
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, 0.0, 0.0]))
    # G/(G − 1) times the group-mean advantage
    torch.testing.assert_close(adv, group_advantages(rewards, group_size=4, scale_rewards="none") * 4 / 3)


def test_normalize_then_sum_normalises_each_reward_in_its_group():
    from audiorl.objectives.grpo import normalize_then_sum

    nan = float("nan")
    # two rewards, one group of 3; the second reward does not apply to the third completion, and
    # no reward applies to a fourth completion in a second group
    per_reward = torch.tensor([[1.0, 10.0], [0.0, 20.0], [2.0, nan], [nan, nan], [1.0, 1.0], [1.0, 1.0]])
    adv = normalize_then_sum(per_reward, torch.tensor([1.0, 0.5]), group_size=3)
    z1 = [(v - 1.0) / (1.0 + 1e-4) for v in (1.0, 0.0, 2.0)]  # mean 1, std 1
    z2 = [(10 - 15) / (50**0.5 + 1e-4), (20 - 15) / (50**0.5 + 1e-4)]  # two values: mean 15, std sqrt(50)
    sums = [z1[0] + 0.5 * z2[0], z1[1] + 0.5 * z2[1], z1[2], 0.0, 0.0]  # completions 4 (none applies) out
    mean = sum(sums) / 5
    std = (sum((x - mean) ** 2 for x in sums) / 4) ** 0.5
    expected = [(x - mean) / (std + 1e-4) for x in sums[:3]] + [0.0] + [(x - mean) / (std + 1e-4) for x in sums[3:]]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-6)
