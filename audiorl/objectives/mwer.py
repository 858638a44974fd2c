"""MWER: minimum word error rate training over an N-best list (Prabhavalkar et al. 2018,
"Minimum Word Error Rate Training for Attention-based Sequence-to-Sequence Models",
arXiv 1712.01818), Eq. 7-8.

For each clip with hypotheses y_1..y_N and their word errors W(y_i, y*) against the reference:

    P̂(y_i | x) = exp(log P(y_i | x)) / Σ_j exp(log P(y_j | x))        renormalised over the list
    L_MWER     = Σ_i P̂(y_i | x) · (W(y_i, y*) − Ŵ),   Ŵ = the list's mean number of word errors

averaged over the clips of the batch; the paper's full loss adds λ · L_CE (the reference's token
cross-entropy, `mwer_ce_weight` in the method). Subtracting Ŵ (the paper's variance reduction)
shifts the loss, not its gradient: ∂L/∂log P(y_i) = P̂_i · (W_i − Σ_j P̂_j W_j), which raises the
hypotheses with fewer errors than the list's expectation and lowers the others.

The list here is N samples of the policy (AudioRL's decoders have no beam search); a hypothesis
drawn twice is one entry of the N-best list (`keep` masks the repeats), so the renormalisation
does not count it twice.

Shapes: logps, errors, keep (N,), clip-major in groups of `group_size`.
"""

from __future__ import annotations

from typing import Any

from audiorl.lazy import on_first_use
from audiorl.objectives.dpo import LossOutput

torch: Any = on_first_use("torch")


def first_occurrences(texts: list[str], group_size: int) -> list[bool]:
    """True for each hypothesis that is the first of its text within its clip's group."""
    keep = []
    for start in range(0, len(texts), group_size):
        seen: set[str] = set()
        for text in texts[start : start + group_size]:
            keep.append(text not in seen)
            seen.add(text)
    return keep


def mwer_loss(logps: torch.Tensor, errors: torch.Tensor, group_size: int, keep: torch.Tensor | None = None) -> LossOutput:
    """`logps`: summed log-probs of each hypothesis; `errors`: its number of word errors."""
    lp = logps.view(-1, group_size)
    err = errors.to(lp.device, lp.dtype).view(-1, group_size)
    kept = torch.ones_like(lp, dtype=torch.bool) if keep is None else keep.to(lp.device).view(-1, group_size)
    posterior = torch.softmax(lp.masked_fill(~kept, float("-inf")), dim=1)  # P̂, 0 on repeats
    mean_errors = (err * kept).sum(1) / kept.sum(1)
    per_clip = (posterior * (err - mean_errors.unsqueeze(1))).sum(1)
    with torch.no_grad():
        expected = (posterior * err).sum(1)
        best = err.masked_fill(~kept, float("inf")).min(1).values
        metrics = {
            "mwer/expected_errors": expected.mean(),  # under the renormalised posterior
            "mwer/mean_errors": mean_errors.mean(),  # Ŵ
            "mwer/oracle_errors": best.mean(),  # the list's best hypothesis
            "mwer/distinct_hypotheses": kept.sum(1).to(lp.dtype).mean(),
        }
    return LossOutput(loss=per_clip.mean(), metrics=metrics)
