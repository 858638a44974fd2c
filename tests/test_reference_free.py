"""CPO (SimPO, AlphaPO), ORPO and KTO against values TRL computed (recorded with its version by
tests/data/record_trl_reference_free.py), and worked by hand."""

import json
import math
from pathlib import Path

import pytest
import torch

from audiorl.objectives.dpo import PreferenceLogps
from audiorl.objectives.kto import kl_estimate, kto_loss
from audiorl.objectives.reference_free import cpo_loss, log1mexp, orpo_loss

RECORDED = json.loads((Path(__file__).parent / "data" / "trl_reference_free_losses.json").read_text())
CASES = RECORDED["cases"]


def _t(case, key):
    return torch.tensor(case[key], dtype=torch.float64)


def _policy(case):
    return PreferenceLogps(_t(case, "policy_chosen"), _t(case, "policy_rejected"), _t(case, "chosen_tokens"), _t(case, "rejected_tokens"))


def _id(case):
    knobs = {k: case[k] for k in ("loss_type", "label_smoothing", "alpha", "cpo_alpha", "desirable_weight") if k in case}
    return f"{case['method']}-" + "-".join(f"{v}" for v in knobs.values()) + f"-{len(case.get('label', []))}-seed{case['seed']}"


@pytest.mark.parametrize("case", [c for c in CASES if c["method"] in ("cpo", "orpo")], ids=_id)
def test_cpo_and_orpo_match_what_trl_computed(case):
    if case["method"] == "cpo":
        out = cpo_loss(_policy(case), loss_type=case["loss_type"], beta=case["beta"], label_smoothing=case["label_smoothing"],
                       simpo_gamma=case["simpo_gamma"], alpha=case["alpha"], cpo_alpha=case["cpo_alpha"])
    else:
        out = orpo_loss(_policy(case), beta=case["beta"])
    # TRL's odds_ratio_loss casts to float32 (for bf16 inputs); ours keeps float64 inputs in float64
    rel = 1e-6 if case["method"] == "orpo" else 1e-9
    assert float(out.loss) == pytest.approx(case["loss"], rel=rel, abs=1e-12), RECORDED["trl_version"]
    for name, value in case["metrics"].items():
        assert float(out.metrics[name]) == pytest.approx(value, rel=rel, abs=1e-12), name


@pytest.mark.parametrize("case", [c for c in CASES if c["method"] == "kto"], ids=_id)
def test_kto_matches_what_trl_computed(case):
    desirable = torch.tensor(case["label"])
    kl = kl_estimate(_t(case, "policy_kl"), _t(case, "ref_kl"))
    out = kto_loss(_t(case, "policy"), _t(case, "ref"), desirable, kl=kl, beta=case["beta"], desirable_weight=case["desirable_weight"],
                   undesirable_weight=case["undesirable_weight"], loss_type=case["loss_type"])
    assert float(out.loss) == pytest.approx(case["loss"], rel=1e-9, abs=1e-12), RECORDED["trl_version"]
    assert set(case["metrics"]) <= set(out.metrics)
    for name, value in case["metrics"].items():
        assert float(out.metrics[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_every_variant_was_recorded():
    cpo_types = {c["loss_type"] for c in CASES if c["method"] == "cpo"}
    assert cpo_types == {"sigmoid", "hinge", "ipo", "simpo", "alphapo"}
    kto = [c for c in CASES if c["method"] == "kto"]
    assert {c["loss_type"] for c in kto} == {"kto", "apo_zero_unpaired"}
    assert any(not any(c["label"]) for c in kto) and any(all(c["label"][:3]) and not all(c["label"]) for c in kto)
    # the reference point is clamped at 0 in some recorded batch and positive in another
    assert {c["metrics"]["kl"] > 0 for c in kto if c["loss_type"] == "kto"} == {True, False}


def _pair(chosen, rejected, chosen_tokens=1.0, rejected_tokens=1.0):
    return PreferenceLogps(torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64),
                           torch.tensor([chosen_tokens], dtype=torch.float64), torch.tensor([rejected_tokens], dtype=torch.float64))


def test_simpo_by_hand():
    # chosen −4 over 4 tokens (−1 per token), rejected −6 over 2 (−3 per token): d̄ = 2, β = 2, γ = 1
    out = cpo_loss(_pair(-4.0, -6.0, 4, 2), loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
    assert float(out.loss) == pytest.approx(-math.log(1 / (1 + math.exp(-(2 * 2 - 1)))))
    # the sums would have said the opposite margin is small: averaging is what SimPO compares
    assert float(out.metrics["logps/chosen"]) == pytest.approx(-1.0)
    # cpo_alpha adds the chosen NLL per token (4/4 = 1)
    with_nll = cpo_loss(_pair(-4.0, -6.0, 4, 2), loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.5)
    assert float(with_nll.loss) == pytest.approx(float(out.loss) + 0.5)


def test_orpo_by_hand():
    # per-token log-probs log 0.5 and log 0.2: odds 1 and 0.25, log odds ratio log 4
    out = orpo_loss(_pair(2 * math.log(0.5), 2 * math.log(0.2), 2, 2), beta=0.5)
    nll = -math.log(0.5)
    assert float(out.metrics["log_odds_chosen"]) == pytest.approx(math.log(4))
    assert float(out.loss) == pytest.approx(nll - 0.5 * math.log(1 / (1 + 1 / 4)))
    # stable on both sides of −ln 2 and next to 0
    x = torch.tensor([-50.0, -0.7, -0.69, -1e-9], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x.double())), rtol=1e-6)


def test_kto_by_hand_and_its_gradient():
    logps = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.5], dtype=torch.float64)
    out = kto_loss(logps, ref, torch.tensor([True, False]), kl=0.2, beta=1.0, desirable_weight=2.0, undesirable_weight=1.0)
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = (2.0 * (1 - s(0.5 - 0.2)) + (1 - s(0.2 - (-0.5)))) / 2
    assert float(out.loss.detach()) == pytest.approx(expected)
    out.loss.backward()
    # the desirable completion is pushed up, the undesirable one down
    assert logps.grad[0] < 0 < logps.grad[1]
    # a negative KL estimate is clamped at 0
    assert float(kto_loss(logps.detach(), ref, torch.tensor([True, False]), kl=-3.0).metrics["kl"]) == 0.0
