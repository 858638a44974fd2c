"""The DPO loss family against values TRL computed (recorded with its version by
tests/data/record_trl_dpo_losses.py), and hand-checked values."""

import json
import math
from pathlib import Path

import pytest
import torch

from audiorl.config import validate_config
from audiorl.objectives import LOSSES, Pairs, PreferenceLogps, PreferenceLoss, sft_loss

RECORDED = json.loads((Path(__file__).parent / "data" / "trl_dpo_losses.json").read_text())


def _case_id(case):
    return "+".join(case["loss_type"]) + f"-seed{case['seed']}"


@pytest.mark.parametrize("case", RECORDED["cases"], ids=_case_id)
def test_each_loss_matches_what_trl_computed(case):
    t = lambda key: torch.tensor(case[key], dtype=torch.float64)  # noqa: E731
    fn = PreferenceLoss(case["loss_type"], case["loss_weights"], beta=case["beta"], label_smoothing=case["label_smoothing"],
                        discopop_tau=case["discopop_tau"])
    out = fn(PreferenceLogps(t("policy_chosen"), t("policy_rejected"), t("chosen_tokens"), t("rejected_tokens")),
             t("ref_chosen"), t("ref_rejected"))
    # float64 inputs; TRL builds exo_pair's epsilon as a float32 tensor, hence rtol 1e-6 not 1e-12
    assert float(out.loss) == pytest.approx(case["loss"], rel=1e-6, abs=1e-9), RECORDED["trl_version"]
    for name, value in case["metrics"].items():
        assert float(out.metrics[name]) == pytest.approx(value, rel=1e-9, abs=1e-12), name
    parts = sum(w * float(out.metrics[f"loss/{n}"]) for n, w in zip(case["loss_type"], case["loss_weights"]))
    assert float(out.loss) == pytest.approx(parts, rel=1e-12)


def test_every_registered_loss_was_recorded_and_the_schema_takes_the_registry():
    recorded = {name for case in RECORDED["cases"] for name in case["loss_type"]}
    assert recorded == set(LOSSES)
    for name in LOSSES:
        assert LOSSES[name].__doc__, f"{name}: say what it is and cite the paper"
        cfg = validate_config({"model": {"name_or_path": "m"}, "objective": {"loss_type": [name],
                                                                              "label_smoothing": 0.1 if name == "exo_pair" else 0.0}})
        assert cfg.objective.loss_type == [name]
    with pytest.raises(Exception, match="unknown loss_type \\['sigmod'\\]; choose from \\['sigmoid', 'hinge'"):
        validate_config({"model": {"name_or_path": "m"}, "objective": {"loss_type": ["sigmod"]}})


def test_a_users_loss_has_the_built_ins_signature():
    def double_sigmoid(pairs: Pairs) -> torch.Tensor:
        return 2 * LOSSES["sigmoid"](pairs)

    logps = PreferenceLogps(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.ones(2), torch.ones(2))
    ref = torch.tensor([-1.5, -1.5])
    ours = PreferenceLoss(["double", "sigmoid"], custom={"double": double_sigmoid})(logps, ref, ref)
    assert float(ours.metrics["loss/double"]) == pytest.approx(2 * float(ours.metrics["loss/sigmoid"]))
    with pytest.raises(ValueError, match="unknown loss_type \\['nope'\\]"):
        PreferenceLoss(["nope"])


def test_sigmoid_by_hand():
    # equal log-ratios: -log σ(0) = log 2; a margin of 10 nats at beta 0.1: -log σ(1)
    fn = PreferenceLoss(["sigmoid"], beta=0.1)
    zero = torch.zeros(1)
    logps = PreferenceLogps(zero - 1, zero - 1, zero + 1, zero + 1)
    assert float(fn(logps, zero - 1, zero - 1).loss) == pytest.approx(math.log(2))
    logps = PreferenceLogps(zero - 1, zero - 11, zero + 1, zero + 1)
    assert float(fn(logps, zero - 1, zero - 1).loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1))))


def test_bco_running_mean_shift_by_hand():
    """δ is the mean of the batches' mean rewards so far (this batch's included), subtracted from both."""
    fn = PreferenceLoss(["bco_pair"], beta=1.0, bco_running_mean=True)
    ones = torch.ones(2)
    # batch 1: chosen rewards [1, 3], rejected [-1, 1] -> δ = mean(1, 3, -1, 1) = 1
    out = fn(PreferenceLogps(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), ones, ones), torch.zeros(2), torch.zeros(2))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = sum(-math.log(sig(c - 1)) - math.log(sig(-(r - 1))) for c, r in [(1, -1), (3, 1)]) / 2
    assert float(out.loss) == pytest.approx(by_hand)
    assert float(out.metrics["bco/delta"]) == pytest.approx(1.0)
    # batch 2: rewards [5, 5] and [5, 5] -> δ = mean(1, 5) = 3
    fn(PreferenceLogps(5 * ones, 5 * ones, ones, ones), torch.zeros(2), torch.zeros(2))
    assert fn.running.mean == pytest.approx(3.0)
    restored = PreferenceLoss(["bco_pair"], beta=1.0, bco_running_mean=True)
    restored.load_state_dict(fn.state_dict())
    assert restored.running.mean == pytest.approx(3.0) and restored.running.count == 2
    # a short last batch (one pair, rewards 9 and 9) counts as one batch mean: δ = mean(1, 5, 9) = 5,
    # where the mean of all 10 rewards would be 4.6; a resumed loss continues the same way
    for loss in (fn, restored):
        loss(PreferenceLogps(torch.tensor([9.0]), torch.tensor([9.0]), ones[:1], ones[:1]), torch.zeros(1), torch.zeros(1))
        assert loss.running.mean == pytest.approx(5.0)
    # a batch whose rewards are not finite leaves δ as it was
    nan = torch.tensor([float("nan"), 1.0])
    out = fn(PreferenceLogps(nan, ones, ones, ones), torch.zeros(2), torch.zeros(2))
    assert fn.running.mean == pytest.approx(5.0) and fn.running.count == 3 and float(out.metrics["bco/delta"]) == pytest.approx(5.0)
    # without the option, bco_pair is TRL's unshifted form
    plain = PreferenceLoss(["bco_pair"], beta=1.0)
    out = plain(PreferenceLogps(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]), ones, ones), torch.zeros(2), torch.zeros(2))
    assert float(out.loss) == pytest.approx(sum(-math.log(sig(c)) - math.log(sig(-r)) for c, r in [(1, -1), (3, 1)]) / 2)


def test_sft_loss_is_per_token():
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(sft_loss(token_logps, mask).loss) == pytest.approx(2.0)


def _bco_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from audiorl.distributed import mean_tensor_across_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fn = PreferenceLoss(["bco_pair"], beta=1.0, bco_running_mean=True, reduce=mean_tensor_across_ranks)
    # rank 0's rewards have mean 1 then 10 (a short batch), rank 1's mean 3 then 0
    batches = {0: [([1.0, 1.0], [1.0, 1.0]), ([10.0], [10.0])], 1: [([3.0, 3.0], [3.0, 3.0]), ([0.0, 0.0], [0.0, 0.0])]}[rank]
    deltas = []
    for chosen, rejected in batches:
        n = len(chosen)
        fn(PreferenceLogps(torch.tensor(chosen), torch.tensor(rejected), torch.ones(n), torch.ones(n)), torch.zeros(n), torch.zeros(n))
        deltas.append(fn.running.mean)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(deltas))
    dist.destroy_process_group()


def test_bco_running_mean_is_the_same_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_bco_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    deltas = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # step 1: the ranks' means 1 and 3 -> 2; step 2: 10 and 0 -> 5, δ = mean(2, 5) = 3.5 on both
    assert deltas[0] == deltas[1] == pytest.approx([2.0, 3.5])


OPTIONS = json.loads((Path(__file__).parent / "data" / "trl_dpo_options.json").read_text())


def _options_id(case):
    return "+".join(case["loss_type"]) + "-" + "-".join(f"{k}={v}" for k, v in case["options"].items()) + f"-seed{case['seed']}"


@pytest.mark.parametrize("case", OPTIONS["cases"], ids=_options_id)
def test_f_divergence_ld_alpha_and_wpo_match_what_trl_computed(case):
    """The options that change what a loss receives, on per-token inputs, through the step's own
    summing (`methods.dpo.summed`) and the loss."""
    from audiorl.methods.dpo import summed
    from audiorl.models.base import SequenceLogps

    dtype = getattr(torch, case["dtype"])
    options = case["options"]
    lengths = torch.tensor(case["lengths"], dtype=dtype)
    width = len(case["policy_tokens"][0])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    policy_tokens, ref_tokens = torch.tensor(case["policy_tokens"], dtype=dtype), torch.tensor(case["ref_tokens"], dtype=dtype)
    squares = torch.tensor(case["log_sum_sq_probs"], dtype=dtype)
    n = len(lengths) // 2
    ld = options.get("ld_alpha")
    sums = summed(SequenceLogps(policy_tokens, mask), n, ld)
    refs = summed(SequenceLogps(ref_tokens, mask), n, ld)
    policy = PreferenceLogps(sums[:n], sums[n:], lengths[:n], lengths[n:], policy_tokens[:n], policy_tokens[n:], mask[:n], mask[n:],
                             squares[:n], squares[n:])
    fn = PreferenceLoss(case["loss_type"], case["loss_weights"], beta=case["beta"], label_smoothing=case["label_smoothing"],
                        f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
                        f_alpha_divergence_coef=options.get("f_alpha_divergence_coef", 0.5), use_weighting=options.get("use_weighting", False))
    out = fn(policy, refs[:n], refs[n:])
    # float32 inputs (TRL's alpha-divergence takes no float64), and exo_pair's ε, a float32 tensor in TRL
    rel = 1e-5 if dtype == torch.float32 else 1e-6 if "exo_pair" in case["loss_type"] else 1e-9
    assert float(out.loss) == pytest.approx(case["loss"], rel=rel, abs=1e-9), OPTIONS["trl_version"]
    for name, value in case["metrics"].items():
        assert float(out.metrics[name]) == pytest.approx(value, rel=rel, abs=1e-9), name


def test_every_option_was_recorded_and_the_schema_checks_its_losses():
    recorded = [case["options"] for case in OPTIONS["cases"]]
    assert {o.get("f_divergence_type") for o in recorded} >= {"forward_kl", "js_divergence", "alpha_divergence"}
    assert any("ld_alpha" in o for o in recorded) and any(o.get("use_weighting") for o in recorded)
    with pytest.raises(Exception, match=r"f_divergence_type=js_divergence works with the losses .* not \['bco_pair'\]"):
        validate_config({"model": {"name_or_path": "m"}, "objective": {"loss_type": ["sigmoid", "bco_pair"], "f_divergence_type": "js_divergence"}})
    with pytest.raises(Exception, match="use_weighting does not go with aot"):
        validate_config({"model": {"name_or_path": "m"}, "objective": {"loss_type": ["aot"], "use_weighting": True}})


def test_ld_alpha_by_hand():
    from audiorl.objectives.dpo import ld_weighted

    tokens = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # the pair shares 2 tokens: the chosen's third weighs 0.5, the rejected has no tail
    out = ld_weighted(tokens, mask, torch.tensor([2.0, 2.0]), 0.5)
    assert out.tolist() == [-1.0 - 2.0 - 0.5 * 3.0, -2.0]


def test_wpo_weighs_the_sft_term_too():
    # TRL 1.16 raises on sft with use_weighting; here each pair's copy of the batch NLL is weighted
    ones = torch.ones(2, 1)
    logps = PreferenceLogps(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.ones(2), torch.ones(2),
                            torch.tensor([[-1.0], [-3.0]]), torch.tensor([[-2.0], [-2.0]]), ones, ones, torch.zeros(2, 1), torch.zeros(2, 1))
    out = PreferenceLoss(["sft"], use_weighting=True)(logps, torch.zeros(2), torch.zeros(2))
    weights = [math.exp(-1) * math.exp(-2), math.exp(-3) * math.exp(-2)]
    assert float(out.loss) == pytest.approx(2.0 * sum(weights) / 2)
