"""Record TRL's DPO-family losses on fixed inputs, for tests/test_objectives.py to compare with:
each loss type (trl_dpo_losses.json), and the options that change what a loss receives,
f_divergence_type, ld_alpha and use_weighting, with per-token inputs (trl_dpo_options.json).

TRL computes its DPO losses inside `DPOTrainer._compute_loss`, a private method that takes a
whole trainer; this script drives it once, on per-token log-probs it makes up, through a
stand-in for the trainer and the model, and writes what TRL returned (the loss and its metrics)
with the inputs that matter to a DPO-family loss (summed log-probs and token counts per
completion) and TRL's version. The test then needs neither TRL nor its private API. Rerun it
when TRL changes its formulas, and say so in the commit:

    python tests/data/record_trl_dpo_losses.py    # writes tests/data/trl_dpo_losses.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl import DPOTrainer

# TRL's loss_type names, each recorded on two random batches; MPO's weighted mix once
LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
          "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}  # recorded with label_smoothing 0.1, the rest with 0
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]


class _Outputs(torch.nn.Module):
    """Stands in for a causal LM: returns fixed per-token log-probs, as TRL's fused head would."""

    def __init__(self, log_probs, log_sum_sq_probs=None):
        super().__init__()
        self.log_probs = log_probs
        self.log_sum_sq_probs = torch.zeros_like(log_probs) if log_sum_sq_probs is None else log_sum_sq_probs
        self.is_gradient_checkpointing = False

    def forward(self, **kwargs):
        lp = self.log_probs
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool), log_sum_sq_probs=self.log_sum_sq_probs)


def _trl(loss_type, weights, beta, label_smoothing, policy_tok, ref_tok, completion_mask, *, ld_alpha=None, f_divergence_type="reverse_kl",
         f_alpha_divergence_coef=0.5, use_weighting=False, log_sum_sq=None):
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=_Outputs(policy_tok, log_sum_sq), ref_model=_Outputs(ref_tok),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity, unwrap_model=identity),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=False, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=loss_type, loss_weights=weights, beta=beta,
        label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        use_weighting=use_weighting, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(completion_mask, dtype=torch.long), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask}
    loss = DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    return float(loss), {name: float(fake._metrics["train"][name][0]) for name in METRICS}


def _batch(seed, pairs=6, length=9):
    """Random per-token log-probs for chosen (the first half) and rejected completions of different lengths."""
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


def main() -> None:
    cases = []
    plan = [([name], [1.0], 0.3, 0.1 if name in SMOOTHED else 0.0, seed) for name in LOSSES for seed in (0, 1)]
    plan.append((["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, 0.0, 7))
    for loss_type, weights, beta, smoothing, seed in plan:
        policy, ref, mask, shift = _batch(seed)
        loss, metrics = _trl(loss_type, weights, beta, smoothing, policy, ref, mask)
        n = policy.shape[0] // 2
        sums, refs, counts = policy.sum(1), ref.sum(1), shift.sum(1)
        cases.append({
            "loss_type": loss_type, "loss_weights": weights, "beta": beta, "label_smoothing": smoothing, "discopop_tau": 0.05,
            "seed": seed, "policy_chosen": sums[:n].tolist(), "policy_rejected": sums[n:].tolist(),
            "ref_chosen": refs[:n].tolist(), "ref_rejected": refs[n:].tolist(),
            "chosen_tokens": counts[:n].tolist(), "rejected_tokens": counts[n:].tolist(),
            "loss": loss, "metrics": metrics,
        })
    out = Path(__file__).with_name("trl_dpo_losses.json")
    out.write_text(json.dumps({"trl_version": trl.__version__, "torch_version": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases from TRL {trl.__version__} -> {out}")
    record_options()


def _left_aligned(per_token, shift):
    """Each row's completion values, in order from its first token, padded with 0: AudioRL's layout."""
    rows = [per_token[r][shift[r].bool()].tolist() for r in range(per_token.shape[0])]
    width = max(len(r) for r in rows)
    return [r + [0.0] * (width - len(r)) for r in rows]


# the options that change what a loss receives: f-divergences, LD-DPO's length weighting, WPO's weights
OPTIONS = [
    *[(["sigmoid"], {"f_divergence_type": f}) for f in ("forward_kl", "js_divergence", "alpha_divergence")],
    (["sigmoid"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}),
    (["sigmoid"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    *[([name], {"f_divergence_type": "js_divergence"}) for name in ("hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm")],
    (["sigmoid", "sft"], {"f_divergence_type": "forward_kl"}),
    *[([name], {"ld_alpha": 0.5}) for name in ("sigmoid", "ipo", "bco_pair", "apo_zero", "sft")],
    (["sigmoid"], {"ld_alpha": 0.0}),
    # TRL 1.16 cannot weigh its sft term (an in-place multiply of an expanded tensor raises), so
    # sft is recorded with ld_alpha and f-divergences but not with use_weighting
    *[([name], {"use_weighting": True}) for name in ("sigmoid", "ipo", "bco_pair")],
    (["sigmoid", "bco_pair"], {"use_weighting": True, "ld_alpha": 0.3, "f_divergence_type": "js_divergence"}),
]


def record_options() -> None:
    cases = []
    for number, (loss_type, options) in enumerate(OPTIONS):
        for seed in (0, 1):
            policy, ref, mask, shift = _batch(100 + 2 * number + seed)
            g = torch.Generator().manual_seed(seed)
            log_sum_sq = -torch.rand(policy.shape, generator=g, dtype=torch.float64) * 2 * shift
            if options.get("f_divergence_type") == "alpha_divergence":  # TRL's clamp table has no float64 entry
                policy, ref, log_sum_sq = policy.float(), ref.float(), log_sum_sq.float()
            weights = [0.8, 0.2] if loss_type == ["sigmoid", "bco_pair"] else [1.0] * len(loss_type)
            smoothing = 0.1 if set(loss_type) & SMOOTHED else 0.0
            loss, metrics = _trl(loss_type, weights, 0.3, smoothing, policy, ref, mask, log_sum_sq=log_sum_sq, **options)
            cases.append({"loss_type": loss_type, "loss_weights": weights, "beta": 0.3, "label_smoothing": smoothing, "seed": seed,
                          "options": options, "policy_tokens": _left_aligned(policy, shift), "ref_tokens": _left_aligned(ref, shift),
                          "log_sum_sq_probs": _left_aligned(log_sum_sq, shift), "lengths": shift.sum(1).tolist(), "loss": loss,
                          "dtype": str(policy.dtype).removeprefix("torch."), "metrics": metrics})
    out = Path(__file__).with_name("trl_dpo_options.json")
    out.write_text(json.dumps({"trl_version": trl.__version__, "torch_version": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases from TRL {trl.__version__} -> {out}")


if __name__ == "__main__":
    main()
