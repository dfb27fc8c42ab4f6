"""Changing tokens at positions ≥ p never changes logits before p (outside the first segment
for routing that looks at segment 1 itself), for every FFN at inference."""

import pytest
import torch

from lorytrain.model import ModelConfig, build_model
from tests.lorytrain.runkit import FFN_VARIANTS

T, LENGTH, VOCAB = 8, 40, 50

VARIANTS = {
    **FFN_VARIANTS,
    "prefix-uniform": dict(ffn="prefix", first_segment="uniform"),
    "topk1": dict(ffn="topk", top_k=1),
    "topk-samoe": dict(ffn="topk", top_k=2, samoe_pool=3),
}
# routing that reads segment 1's own mean is causal only from the second segment on
FIRST_CAUSAL_POSITION = {"lory": T, "prefix": T, "ec-segment": T, "lory-samoe": T}


def tiny_model(**options):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_experts=4, segment_len=T, **options)
    return build_model(config)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_is_causal(name):
    model = tiny_model(**VARIANTS[name]).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=generator)
    with torch.no_grad():
        reference = model(ids)
        for p in range(FIRST_CAUSAL_POSITION.get(name, 1), LENGTH):
            changed = ids.clone()
            changed[:, p:] = torch.randint(0, VOCAB, (2, LENGTH - p), generator=generator)
            torch.testing.assert_close(model(changed)[:, :p], reference[:, :p], rtol=0, atol=1e-5)


def test_lory_training_forward_is_causal_outside_the_first_segment():
    model = tiny_model(ffn="lory").train()
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    reference = model(ids).detach()
    for p in range(T, LENGTH, 3):
        changed = ids.clone()
        changed[:, p:] = (changed[:, p:] + 1) % VOCAB
        torch.testing.assert_close(model(changed)[:, :p].detach(), reference[:, :p], rtol=0, atol=1e-5)


def test_self_routing_of_the_first_segment_does_see_its_own_future():
    """The check above is sensitive: with first_segment='self' segment 1 is not causal."""
    model = tiny_model(ffn="lory").eval()
    ids = torch.randint(0, VOCAB, (1, LENGTH))
    changed = ids.clone()
    changed[:, T - 1] = (changed[:, T - 1] + 1) % VOCAB
    with torch.no_grad():
        assert (model(changed)[:, : T - 1] - model(ids)[:, : T - 1]).abs().max() > 1e-6
