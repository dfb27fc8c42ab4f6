"""Training-time MoE diagnostics: expert similarity, routing entropy, top-1 spread, router gradients,
and the levers that break the experts' symmetry (upcycling noise, router init scale)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lorytrain import ModelConfig, build_model, upcycle
from lorytrain.training.diagnostics import (
    expert_similarity,
    moe_diagnostics,
    router_grad_norms,
    routing_entropy,
    top1_off_mode,
)
from lorytrain.training.metrics_log import read_metrics
from tests.lorytrain.runkit import train_tiny_run

VOCAB = 60
E = 4


def tiny(**options):
    return ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_experts=E, segment_len=8, **options)


def upcycled(**options):
    torch.manual_seed(0)
    dense = build_model(tiny(ffn="dense"))
    with torch.no_grad():  # a dense FFN that is not fresh init
        for p in dense.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return dense, upcycle(dense, tiny(ffn="lory", **options))


def test_expert_similarity_against_a_naive_reference():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 4, 2) + 0.5
    flat = w.flatten(1).double()
    pairs = [F.cosine_similarity(flat[i], flat[j], dim=0) for i, j in itertools.combinations(range(5), 2)]
    mean = flat.mean(0)
    spread = math.sqrt(sum(float((row - mean).norm() ** 2) for row in flat) / 5) / float(mean.norm())
    cosine, found_spread = expert_similarity(w)
    assert cosine == pytest.approx(float(sum(pairs) / len(pairs)), abs=1e-12)
    assert found_spread == pytest.approx(spread, rel=1e-12)
    assert expert_similarity(w[:1].expand(4, -1, -1, -1)) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_routing_entropy_is_log_e_for_uniform_and_zero_for_one_hot():
    uniform = torch.full((2, 3, E), 1 / E)
    assert routing_entropy(uniform) == pytest.approx((math.log(E), 0.0), abs=1e-12)
    one_hot = F.one_hot(torch.tensor([[0, 1, 2], [3, 0, 1]]), E).float()
    assert routing_entropy(one_hot) == pytest.approx((0.0, 0.0), abs=1e-12)
    mixed = torch.stack([torch.full((E,), 1 / E), F.one_hot(torch.tensor(2), E).float()])  # log E and 0
    assert routing_entropy(mixed) == pytest.approx((math.log(E) / 2, math.log(E) / 2), abs=1e-12)


def test_top1_off_mode_counts_segments_away_from_the_batch_favourite():
    weights = F.one_hot(torch.tensor([[1, 1, 2], [1, 3, 1]]), E).float() * 0.6 + 0.1  # top experts 1,1,2,1,3,1
    assert top1_off_mode(weights) == pytest.approx(2 / 6)
    assert top1_off_mode(torch.full((2, 2, E), 1 / E)) == 0.0  # ties: argmax picks expert 0 everywhere


def train_steps(model, steps: int, freeze_router: bool) -> None:
    """AdamW steps on random tokens; the routers frozen or trained."""
    for layer in model.moe_layers():
        layer.routing.router.weight.requires_grad_(not freeze_router)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 32), generator=generator)
        F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_experts_stay_copies_under_uniform_routing_and_diverge_under_non_uniform():
    _, uniform = upcycled()
    after = moe_diagnostics(uniform)
    assert after["expert_cosine"] == pytest.approx([1.0] * 2, abs=1e-7)
    assert after["expert_spread"] == pytest.approx([0.0] * 2, abs=1e-7)
    assert after["log_experts"] == pytest.approx(math.log(E))
    with torch.no_grad():
        for layer in uniform.moe_layers():
            layer.routing.router.weight.zero_()  # softmax(0) = 1/E for every segment
    train_steps(uniform, 5, freeze_router=True)
    found = moe_diagnostics(uniform)
    # expert g's gradient is Σ_s c_s,g ∂L/∂θ̄_s: with c = 1/E every expert gets the same update
    assert found["routing_entropy"] == pytest.approx([math.log(E)] * 2, abs=1e-6)
    assert found["routing_entropy_std"] == pytest.approx([0.0] * 2, abs=1e-6)
    assert found["expert_cosine"] == pytest.approx([1.0] * 2, abs=1e-6)

    _, forced = upcycled()
    with torch.no_grad():
        for layer in forced.moe_layers():
            layer.routing.router.weight.normal_(std=3.0)  # far from uniform, different per segment
    train_steps(forced, 5, freeze_router=True)
    found = moe_diagnostics(forced)
    assert all(h < 0.9 * math.log(E) for h in found["routing_entropy"])
    assert all(c < 1 - 1e-4 for c in found["expert_cosine"])
    assert all(s > 1e-3 for s in found["expert_spread"])
    assert all(0 < share < 1 for share in found["top1_off_mode"])


def test_router_grad_norm_is_the_norm_of_the_router_gradients():
    _, copies = upcycled()
    ids = torch.randint(0, VOCAB, (2, 32))
    copies(ids).square().mean().backward()
    # identical experts merge to the same FFN whatever the weights: the router gets no gradient
    assert max(router_grad_norms(copies)) < 1e-9
    _, moe = upcycled(upcycle_noise=0.1)
    ids = torch.randint(0, VOCAB, (2, 32))
    moe(ids).square().mean().backward()
    expected = [float(layer.routing.router.weight.grad.norm()) for layer in moe.moe_layers()]
    assert router_grad_norms(moe) == pytest.approx(expected, rel=1e-6)
    assert all(v > 0 for v in expected)
    assert moe_diagnostics(moe, router_grad_norms(moe))["router_grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert moe_diagnostics(build_model(tiny(ffn="dense"))) is None


def test_upcycle_noise_breaks_symmetry_but_keeps_the_mean_and_the_uniform_output():
    dense, noisy = upcycled(upcycle_noise=0.1)
    for block_d, block_m in zip(dense.layers, noisy.moe_layers(), strict=True):
        w, source = block_m.experts.w, block_d.ffn.w
        torch.testing.assert_close(w.mean(0), source, rtol=0, atol=1e-6)
        for part in range(3):
            rms = source[:, part].pow(2).mean().sqrt()
            relative = (w[:, :, part] - source[:, part]).std() / rms
            assert relative.item() == pytest.approx(0.1 * math.sqrt((E - 1) / E), rel=0.05)
    assert all(c < 0.999 for c in moe_diagnostics(noisy)["expert_cosine"])
    with torch.no_grad():
        for layer in noisy.moe_layers():
            layer.routing.router.weight.zero_()  # uniform routing merges the mean of the experts
        ids = torch.randint(0, VOCAB, (2, 29))
        torch.testing.assert_close(noisy(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_router_init_std_sets_the_routers_scale_at_upcycling_and_from_scratch():
    _, default = upcycled()
    _, wide = upcycled(router_init_std=0.5)
    scratch = build_model(tiny(ffn="lory", router_init_std=0.5))
    for model, std in ((default, 0.02), (wide, 0.5), (scratch, 0.5)):
        weights = torch.cat([layer.routing.router.weight.flatten() for layer in model.moe_layers()])
        assert weights.std().item() == pytest.approx(std, rel=0.2)
    assert max(moe_diagnostics(default)["expert_cosine"]) == pytest.approx(1.0, abs=1e-7)


def test_bad_lever_values_are_refused():
    from lorytrain import LoryTrainError

    with pytest.raises(LoryTrainError, match="upcycle_noise"):
        tiny(ffn="lory", upcycle_noise=-0.1)


def test_every_logged_moe_step_carries_diagnostics(text_shards, tmp_path):
    train, _ = text_shards
    out = train_tiny_run(train, tmp_path / "run", ffn="lory", experts=4, log_every=2)
    records = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all("diagnostics" not in r for r in records if r["phase"] == "dense")
    moe = [r["diagnostics"] for r in records if r["phase"] == "moe"]
    assert len(moe) == 2
    for found in moe:
        assert set(found) == {"expert_cosine", "expert_spread", "routing_entropy", "routing_entropy_std",
                              "top1_off_mode", "router_grad_norm", "log_experts"}
        assert all(len(found[key]) == 2 for key in found if key != "log_experts")
        assert all(0.99 < c <= 1 + 1e-9 for c in found["expert_cosine"])  # a few steps after upcycling
        assert all(0 <= h <= found["log_experts"] + 1e-9 for h in found["routing_entropy"])
    # the first MoE step's experts are still copies (no router gradient); the next one's are not
    assert max(moe[0]["router_grad_norm"]) < 1e-8 < min(moe[1]["router_grad_norm"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"diagnostics/expert_cosine/0", "diagnostics/routing_entropy/1", "diagnostics/router_grad_norm/0"} <= set(tags)


@pytest.mark.slow
def test_diagnostics_under_fsdp_gather_the_sharded_experts(text_shards, tmp_path):
    """2 CPU processes under FSDP2: expert weights and router gradients are sharded DTensors;
    every rank joins the gathers and rank 0 logs whole-layer numbers."""
    from tests.lorytrain.test_training import _torchrun

    train, _ = text_shards
    result = _torchrun("--data", str(train), "--steps", "4", "--batch-size", "2", "--dense-warmup", "0.5",
                       "--parallel", "fsdp", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    moe = [r["diagnostics"] for r in read_metrics(tmp_path / "run") if r.get("phase") == "moe"]
    assert len(moe) == 2
    for found in moe:
        assert len(found["expert_cosine"]) == len(found["router_grad_norm"]) == 2
        assert all(0.99 < c <= 1 + 1e-9 for c in found["expert_cosine"])
    # the experts move apart from the upcycled copies, and the router's gradient grows with them
    for key in ("expert_spread", "router_grad_norm"):
        assert all(0 <= a < b for a, b in zip(moe[0][key], moe[1][key], strict=True))
