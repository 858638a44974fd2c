"""The DPO loss family against TRL's own implementation, and hand-checked values."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from audiorl.config import DPO_LOSS_TYPES
from audiorl.objectives import PreferenceLogps, PreferenceLoss, sft_loss

trl = pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[test]'")


class _Outputs(torch.nn.Module):
    """Stands in for a causal LM: returns fixed per-token log-probs, as TRL's fused head would."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs
        self.is_gradient_checkpointing = False

    def forward(self, **kwargs):
        lp = self.log_probs
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
            log_sum_sq_probs=torch.zeros_like(lp),
        )


def _trl_loss(loss_type, weights, beta, label_smoothing, policy_tok, ref_tok, completion_mask):
    from trl import DPOTrainer

    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=_Outputs(policy_tok),
        ref_model=_Outputs(ref_tok),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity, unwrap_model=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=loss_type,
        loss_weights=weights,
        beta=beta,
        label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask, dtype=torch.long),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
    }
    loss = DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


def _batch(seed, pairs=6, length=9):
    """Random per-token log-probs for chosen and rejected completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt = 3
    completion_mask = torch.zeros(2 * pairs, length + prompt, dtype=torch.long)
    for row in range(2 * pairs):
        n = int(torch.randint(2, length + 1, (1,), generator=g))
        completion_mask[row, prompt : prompt + n] = 1
    shift = completion_mask[:, 1:].float()
    policy = -torch.rand(2 * pairs, length + prompt - 1, generator=g, dtype=torch.float64) * 3 * shift
    ref = -torch.rand(2 * pairs, length + prompt - 1, generator=g, dtype=torch.float64) * 3 * shift
    return policy, ref, completion_mask, shift


def _ours(loss_type, weights, beta, label_smoothing, policy, ref, shift):
    n = policy.shape[0] // 2
    sums, counts, ref_sums = policy.sum(1), shift.sum(1), ref.sum(1)
    fn = PreferenceLoss(loss_type, weights, beta=beta, label_smoothing=label_smoothing, discopop_tau=0.05)
    logps = PreferenceLogps(sums[:n], sums[n:], counts[:n], counts[n:])
    return fn(logps, ref_sums[:n], ref_sums[n:])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_loss_matches_trl(loss_type, seed):
    policy, ref, completion_mask, shift = _batch(seed)
    beta = 0.3
    smoothing = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    expected, trl_metrics = _trl_loss([loss_type], [1.0], beta, smoothing, policy, ref, completion_mask)
    ours = _ours([loss_type], [1.0], beta, smoothing, policy, ref, shift)
    # float64 inputs; TRL builds exo_pair's epsilon as a float32 tensor, hence rtol 1e-6 not 1e-12
    torch.testing.assert_close(ours.loss, expected.to(ours.loss.dtype), rtol=1e-6, atol=1e-9)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert float(ours.metrics[name]) == pytest.approx(trl_metrics[name][0], rel=1e-9, abs=1e-12), name


def test_mpo_weighting_matches_trl():
    policy, ref, completion_mask, shift = _batch(7)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    expected, _ = _trl_loss(types, weights, 0.1, 0.0, policy, ref, completion_mask)
    ours = _ours(types, weights, 0.1, 0.0, policy, ref, shift)
    torch.testing.assert_close(ours.loss, expected.to(ours.loss.dtype), rtol=1e-6, atol=1e-9)
    parts = sum(w * float(ours.metrics[f"loss/{t}"]) for t, w in zip(types, weights))
    assert float(ours.loss) == pytest.approx(parts, rel=1e-12)


def test_sigmoid_by_hand():
    # equal log-ratios: -log σ(0) = log 2; a margin of 10 nats at beta 0.1: -log σ(1)
    fn = PreferenceLoss(["sigmoid"], beta=0.1)
    zero = torch.zeros(1)
    logps = PreferenceLogps(zero - 1, zero - 1, zero + 1, zero + 1)
    assert float(fn(logps, zero - 1, zero - 1).loss) == pytest.approx(math.log(2))
    logps = PreferenceLogps(zero - 1, zero - 11, zero + 1, zero + 1)
    assert float(fn(logps, zero - 1, zero - 1).loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1))))


def test_bco_running_mean_shift_by_hand():
    """δ is the mean of all rewards seen so far (including this batch), subtracted from both."""
    fn = PreferenceLoss(["bco_pair"], beta=1.0, bco_running_mean=True)
    ones = torch.ones(2)
    # batch 1: chosen rewards [1, 3], rejected [-1, 1] -> δ = mean(1, 3, -1, 1) = 1
    out = fn(PreferenceLogps(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), ones, ones), torch.zeros(2), torch.zeros(2))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = sum(-math.log(sig(c - 1)) - math.log(sig(-(r - 1))) for c, r in [(1, -1), (3, 1)]) / 2
    assert float(out.loss) == pytest.approx(by_hand)
    assert float(out.metrics["bco/delta"]) == pytest.approx(1.0)
    # batch 2: rewards [5, 5] and [5, 5] -> δ = (1*4 + 20) / 8 = 3
    fn(PreferenceLogps(5 * ones, 5 * ones, ones, ones), torch.zeros(2), torch.zeros(2))
    assert fn.running.mean == pytest.approx(3.0)
    restored = PreferenceLoss(["bco_pair"], beta=1.0, bco_running_mean=True)
    restored.load_state_dict(fn.state_dict())
    assert restored.running.mean == pytest.approx(3.0) and restored.running.count == 8
    # without the option, bco_pair is TRL's unshifted form
    plain = PreferenceLoss(["bco_pair"], beta=1.0)
    out = plain(PreferenceLogps(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), ones, ones), torch.zeros(2), torch.zeros(2))
    assert float(out.loss) == pytest.approx(sum(-math.log(sig(c)) - math.log(sig(-r)) for c, r in [(1, -1), (3, 1)]) / 2)


def test_sft_loss_is_per_token():
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(sft_loss(token_logps, mask).loss) == pytest.approx(2.0)
