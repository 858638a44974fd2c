"""Record TRL's CPO (SimPO, AlphaPO), ORPO and KTO losses on fixed inputs, for
tests/test_reference_free.py and tests/test_kto.py to compare with.

CPO and ORPO: random logits and labels go through TRL's own `get_batch_logps` (summed or
per-token-averaged, as each loss type asks), its loss function (`CPOTrainer.cpo_loss`,
`ORPOTrainer.odds_ratio_loss`, driven through a stand-in for the trainer) and its NLL (a
cross-entropy over the chosen labels); the total is combined the way `get_batch_loss_metrics`
combines it. KTO: `KTOTrainer._compute_loss` itself, on per-token log-probs made up here and
returned by stand-ins for the policy and the reference, with the mismatched (KL) completions TRL's
collator builds by cycling completions within the batch. What is written is the inputs that
matter to AudioRL's losses (summed log-probs and token counts per completion), TRL's outputs and
TRL's version. The tests then need neither TRL nor its private API. Needs TRL (the `dev` extra):

    python tests/data/record_trl_reference_free.py    # writes tests/data/trl_reference_free_losses.json
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import trl  # noqa: E402
from trl import KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

CPU = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda x: x)


def _pairs(seed: int, pairs: int = 6, length: int = 9, vocab: int = 11):
    """Logits and labels (−100 past each completion's end) for chosen (first half) and rejected rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, length, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    for row in range(2 * pairs):
        labels[row, int(torch.randint(1, length + 1, (1,), generator=g)):] = -100
    return logits, labels


def _summed_and_counts(logits, labels):
    """What AudioRL's losses read: each completion's summed log-prob and its token count."""
    mask = labels != -100
    logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1).to(torch.float64)


def _nll(logits, labels, n):
    return float(torch.nn.CrossEntropyLoss()(logits[:n].reshape(-1, logits.shape[-1]), labels[:n].reshape(-1)))


def _inputs(logits, labels, n):
    sums, counts = _summed_and_counts(logits, labels)
    return {"policy_chosen": sums[:n].tolist(), "policy_rejected": sums[n:].tolist(),
            "chosen_tokens": counts[:n].tolist(), "rejected_tokens": counts[n:].tolist()}


def cpo_case(loss_type, seed, *, beta=0.3, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, cpo_alpha=1.0):
    logits, labels = _pairs(seed)
    n = logits.shape[0] // 2
    effective_type, effective_cpo_alpha = ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, cpo_alpha)
    logps = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=effective_type in ["ipo", "simpo"], is_encoder_decoder=True)
    fake = SimpleNamespace(alpha=alpha, beta=beta, loss_type=effective_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                           accelerator=CPU)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, logps[:n], logps[n:])
    loss = losses.mean() + effective_cpo_alpha * _nll(logits, labels, n)
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(), "logps/chosen": logps[:n].mean(),
               "logps/rejected": logps[n:].mean(), "nll_loss": torch.tensor(_nll(logits, labels, n), dtype=torch.float64)}
    return {"method": "cpo", "loss_type": loss_type, "beta": beta, "label_smoothing": label_smoothing, "simpo_gamma": simpo_gamma,
            "alpha": alpha, "cpo_alpha": cpo_alpha, "seed": seed, **_inputs(logits, labels, n), "loss": float(loss),
            "metrics": {k: float(v) for k, v in metrics.items()}}


def orpo_case(seed, *, beta=0.3):
    logits, labels = _pairs(seed)
    n = logits.shape[0] // 2
    logps = ORPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True, is_encoder_decoder=True)
    fake = SimpleNamespace(beta=beta, accelerator=CPU)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])
    nll = _nll(logits, labels, n)
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(), "logps/chosen": logps[:n].mean(),
               "logps/rejected": logps[n:].mean(), "nll_loss": torch.tensor(nll, dtype=torch.float64), "log_odds_ratio": log_odds_ratio,
               "log_odds_chosen": log_odds_chosen}
    return {"method": "orpo", "beta": beta, "seed": seed, **_inputs(logits, labels, n), "loss": float(nll - losses.mean()),
            "metrics": {k: float(v) for k, v in metrics.items()}}


class _Outputs(torch.nn.Module):
    """Stands in for a causal LM with TRL's fused head: fixed per-token log-probs per input."""

    def __init__(self, by_input):
        super().__init__()
        self.by_input = by_input  # id(input_ids) -> (N, T - 1) log-probs, 0 outside the completion
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, **kwargs):
        lp = self.by_input[id(input_ids)]
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))


KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def kto_case(seed, labels, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto", length=9, prompt=3):
    """KTO on one batch: completion i with its own clip, and (the KL estimate) completion i − 1
    with clip i, as TRL's collator cycles them."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    lengths = [int(torch.randint(1, length + 1, (1,), generator=g)) for _ in range(n)]
    kl_lengths = lengths[-1:] + lengths[:-1]

    def rows(counts):
        mask = torch.zeros(n, prompt + length, dtype=torch.long)
        for row, c in enumerate(counts):
            mask[row, prompt : prompt + c] = 1
        return mask

    mask, kl_mask = rows(lengths), rows(kl_lengths)
    made_up = {name: -torch.rand(n, prompt + length - 1, generator=g, dtype=torch.float64) * 3 for name in ("policy", "ref", "policy_kl", "ref_kl")}
    policy, ref = made_up["policy"] * mask[:, 1:], made_up["ref"] * mask[:, 1:]
    policy_kl, ref_kl = made_up["policy_kl"] * kl_mask[:, 1:], made_up["ref_kl"] * kl_mask[:, 1:]
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": torch.zeros_like(kl_mask), "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
              "label": torch.tensor(labels)}
    model = _Outputs({id(inputs["input_ids"]): policy, id(inputs["KL_input_ids"]): policy_kl})
    ref_model = _Outputs({id(inputs["input_ids"]): ref, id(inputs["KL_input_ids"]): ref_kl})
    fake = SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=CPU, calculate_KL=loss_type == "kto", precompute_ref_logps=False,
        loss_type=loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, aux_loss_enabled=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    fake._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(fake, m, batch)
    loss = KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    metrics = {name: float(fake._metrics["train"][name][0]) for name in KTO_METRICS if fake._metrics["train"][name]}
    return {"method": "kto", "loss_type": loss_type, "beta": beta, "desirable_weight": desirable_weight,
            "undesirable_weight": undesirable_weight, "seed": seed, "label": labels,
            "policy": policy.sum(-1).tolist(), "ref": ref.sum(-1).tolist(), "policy_kl": policy_kl.sum(-1).tolist(),
            "ref_kl": ref_kl.sum(-1).tolist(), "tokens": [float(c) for c in lengths], "loss": float(loss), "metrics": metrics}


def main() -> None:
    cases = []
    for seed in (0, 1):
        cases += [cpo_case("sigmoid", seed), cpo_case("sigmoid", seed, label_smoothing=0.1), cpo_case("hinge", seed),
                  cpo_case("ipo", seed), cpo_case("simpo", seed, cpo_alpha=0.0, simpo_gamma=1.0), cpo_case("simpo", seed),
                  cpo_case("alphapo", seed, alpha=0.25), cpo_case("sigmoid", seed, alpha=-0.5), orpo_case(seed)]
        cases += [kto_case(seed, [True, False, True, True, False, False]),
                  kto_case(seed, [True, True, False, True, False, True, True], beta=0.3, desirable_weight=1.33, undesirable_weight=0.7),
                  kto_case(seed, [True, True, True, False]), kto_case(seed, [False, False, False, False]),
                  kto_case(seed, [True, False, False, True], loss_type="apo_zero_unpaired")]
    out = Path(__file__).with_name("trl_reference_free_losses.json")
    out.write_text(json.dumps({"trl_version": trl.__version__, "torch_version": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"{len(cases)} cases from TRL {trl.__version__} -> {out}")


if __name__ == "__main__":
    main()
