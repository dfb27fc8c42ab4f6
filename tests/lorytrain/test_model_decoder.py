"""Decoder-level behaviour: upcycling, activation checkpointing, routing statistics, tied embeddings."""

import pytest
import torch

from lorytrain import LoryTrainError, ModelConfig, build_model, upcycle

VOCAB = 60


def tiny(**options):
    return ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_experts=4, segment_len=8, **options)


@pytest.mark.parametrize("options", [
    dict(ffn="lory"), dict(ffn="lory", first_segment="uniform"), dict(ffn="prefix"), dict(ffn="topk", top_k=2),
])
def test_upcycled_model_equals_the_dense_model(options):
    torch.manual_seed(0)
    dense = build_model(tiny(ffn="dense"))
    dense(torch.randint(0, VOCAB, (2, 20))).sum().backward()  # a state that is not fresh init
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moe = upcycle(dense, tiny(**options))
    ids = torch.randint(0, VOCAB, (3, 29))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-5, atol=1e-5)
    for block_d, block_m in zip(dense.layers, moe.layers, strict=True):
        assert torch.equal(block_m.ffn.experts.w[2], block_d.ffn.w)
    assert moe.training == dense.training
    moe(ids).sum().backward()  # trains as an MoE from here
    assert all(p.grad is not None for p in moe.parameters())


def test_upcycle_refuses_what_it_cannot_do():
    dense = build_model(tiny(ffn="dense"))
    with pytest.raises(LoryTrainError, match="cannot be upcycled"):
        upcycle(dense, tiny(ffn="lory", samoe_pool=3))
    with pytest.raises(LoryTrainError, match="ffn_dim"):
        upcycle(dense, tiny(ffn="lory", ffn_dim=32))
    with pytest.raises(LoryTrainError, match="needs an MoE config"):
        upcycle(dense, tiny(ffn="dense"))
    with pytest.raises(LoryTrainError, match="needs a dense model"):
        upcycle(build_model(tiny(ffn="lory")), tiny(ffn="lory"))


@pytest.mark.parametrize("ffn", ["lory", "topk"])
def test_activation_checkpointing_gives_the_same_gradients(ffn):
    torch.manual_seed(0)
    model = build_model(tiny(ffn=ffn))
    ids = torch.randint(0, VOCAB, (2, 20))

    def grads():
        model.zero_grad()
        loss = model(ids).logsumexp(-1).mean() + sum(model.aux_losses().values(), torch.zeros(()))
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_activation_checkpointing(True)
    for a, b in zip(grads(), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_routing_stats_give_weights_per_segment_for_every_moe_kind():
    ids = torch.randint(0, VOCAB, (3, 30))  # 4 segments of 8, the last partial
    for options in (dict(ffn="lory"), dict(ffn="topk"), dict(ffn="expert-choice", ec_level="segment")):
        model = build_model(tiny(**options))
        model(ids)
        for stats in model.routing_stats():
            assert stats.segment_weights.shape == (3, 4, 4) and not stats.segment_weights.requires_grad
            assert stats.expert_use().shape == (4,)
    lory_stats = build_model(tiny(ffn="lory"))
    lory_stats(ids)
    weights = lory_stats.routing_stats()[0].segment_weights
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4))
    assert build_model(tiny(ffn="dense")).routing_stats() == [None, None]


def test_tied_embeddings_share_one_matrix():
    model = build_model(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
