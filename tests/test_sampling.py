"""Drawing the next token: the inverse-CDF draw gives each token its probability, never one of
probability zero, and a row with its own generator draws the same whatever shares its batch."""

from __future__ import annotations

import torch

from audiorl.models.sampling import inverse_cdf, next_tokens


def test_each_token_is_drawn_with_its_probability_and_never_one_of_zero():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.0, 0.3])
    n = 200_000
    drawn = inverse_cdf(probs.repeat(n, 1), torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    counts = torch.bincount(drawn, minlength=5).double()
    assert counts[1] == counts[3] == 0
    expected = probs.double() * n
    sigma = (expected * (1 - probs.double())).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma + 1e-9).all(), counts
    # the edges of [0, 1): the first token that can be drawn, and the last one (the 0 after it is skipped)
    edges = inverse_cdf(torch.tensor([[0.0, 0.5, 0.5, 0.0]] * 2), torch.tensor([0.0, 1 - 1e-17], dtype=torch.float64))
    assert edges.tolist() == [1, 2]


def test_top_k_and_temperature_keep_to_the_tokens_they_allow():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5, 2.8, -4.0]]).repeat(5000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits, do_sample=True, top_k=3, generator=generator)
    assert set(drawn.tolist()) == {0, 1, 4}
    cold = next_tokens(logits, do_sample=True, temperature=0.05, generator=generator)
    assert (cold == 0).float().mean() > 0.8  # near greedy


def test_a_row_with_its_own_generator_draws_the_same_in_any_batch():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(3))

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = next_tokens(logits, do_sample=True, generator=generators(range(6)))
    apart = [next_tokens(logits[i : i + 1], do_sample=True, generator=generators([i])).item() for i in range(6)]
    assert together.tolist() == apart
    reordered = next_tokens(logits.flip(0), do_sample=True, generator=generators(reversed(range(6))))
    assert reordered.flip(0).tolist() == apart
