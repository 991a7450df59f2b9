import torch

from specontext_compiler.runtime.sampling import sample


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    gen = torch.Generator().manual_seed(1)
    seen = {int(sample(logits, temperature=1.0, top_p=0.5, generator=gen)) for _ in range(50)}
    assert seen == {0}
    seen = {int(sample(logits, temperature=1.0, top_p=0.99, generator=gen)) for _ in range(200)}
    assert seen == {0, 1}
