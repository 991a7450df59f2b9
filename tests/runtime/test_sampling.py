import torch

from specontext_compiler.runtime.sampling import exponential_noise, keep_top, sample


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    seen = {int(sample(logits, temperature=1.0, top_p=0.5, seeds=1, draws=d)) for d in range(50)}
    assert seen == {0}
    seen = {int(sample(logits, temperature=1.0, top_p=0.99, seeds=1, draws=d)) for d in range(200)}
    assert seen == {0, 1}


def test_top_k_and_top_p_per_row():
    scaled = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    kept = keep_top(scaled, torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 0.5]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False], [True] * 4,
                                             [True, False, False, False]]


def test_sampling_follows_the_distribution_and_depends_only_on_seed_and_draw():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(4000, 4)
    draws = torch.arange(4000)
    ids = sample(logits, temperature=torch.ones(4000), seeds=torch.full((4000,), 7), draws=draws)
    freq = torch.bincount(ids, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # The same (seed, draw) gives the same token in any row or batch; another seed differs.
    again = sample(logits[:5], temperature=1.0, seeds=7, draws=draws[:5])
    assert torch.equal(again, ids[:5])
    other = sample(logits, temperature=torch.ones(4000), seeds=torch.full((4000,), 8), draws=draws)
    assert not torch.equal(other, ids)


def test_mixed_rows_greedy_and_sampled():
    logits = torch.randn(2, 30)
    ids = sample(logits, temperature=torch.tensor([0.0, 5.0]), seeds=torch.tensor([1, 1]), draws=0)
    assert int(ids[0]) == int(logits[0].argmax())


def test_noise_is_positive_and_unit_mean():
    noise = exponential_noise(torch.tensor([3, 4]), torch.tensor([0, 9]), 50000)
    assert bool((noise > 0).all()) and abs(float(noise.mean()) - 1.0) < 0.02
