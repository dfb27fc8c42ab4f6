"""CUDA checks of the training paths (marked `gpu`: skipped without CUDA; run by
`benchmarks/gpu_check.py`): bf16 autocast of the Lory layer, cached generation, FSDP2 with
sharded checkpoints on NCCL, and `--compile`."""

import os
import socket

import pytest
import torch

from lorytrain.model import ModelConfig, build_model
from tests.lorytrain.test_model_cache import PROMPT_LENS, VOCAB, decode
from tests.lorytrain.test_model_lory import ctx_for, make_layer, naive_lory
from tests.lorytrain.test_training import config, losses

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 references must be fp32: no TF32 matmuls while these tests run."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


def test_lory_layer_bf16_autocast_forward_and_backward_vs_fp32_reference():
    """The fused Lory layer on CUDA: exact in fp32 against the naive segment loop, and within
    bf16 rounding (relative error < 2e-2) under bf16 autocast, outputs and all gradients."""
    torch.manual_seed(0)
    d, f, E, T, length = 256, 704, 8, 64, 512
    layer = make_layer("lory", "self", E=E, T=T, d=d, f=f).to(CUDA)
    x = torch.randn(2, length, d, device=CUDA, requires_grad=True)
    upstream = torch.randn(2, length, d, device=CUDA)
    params = [layer.routing.router.weight, layer.experts.w]

    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    y_ref = naive_lory(x_ref, *ref_params, T=T)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *ref_params], upstream)

    y32 = layer(x, ctx_for(length))
    grads32 = torch.autograd.grad(y32, [x, *params], upstream)
    assert _relative_error(y32, y_ref) < 1e-4
    for name, got, want in zip(["x", "router", "experts"], grads32, ref_grads, strict=True):
        assert _relative_error(got, want) < 1e-4, name

    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = layer(x, ctx_for(length))
    grads16 = torch.autograd.grad(y16, [x, *params], upstream.to(y16.dtype))
    assert y16.dtype == torch.bfloat16
    assert _relative_error(y16, y_ref) < 2e-2
    for name, got, want in zip(["x", "router", "experts"], grads16, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert _relative_error(got, want) < 2e-2, name


@pytest.mark.parametrize("routing", ["segment", "prompt"])
def test_cached_generation_equals_a_full_forward_on_cuda(routing):
    torch.manual_seed(0)
    model_config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, n_experts=4, segment_len=8, ffn="lory")
    model = build_model(model_config).to(CUDA).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (3, max(PROMPT_LENS)), generator=generator).to(CUDA)
    new_tokens = torch.randint(0, VOCAB, (3, 14), generator=generator).to(CUDA)
    with torch.no_grad():
        cached = decode(model, prompts, PROMPT_LENS, new_tokens, routing)
        full_ids = torch.zeros(3, max(PROMPT_LENS) + 14, dtype=torch.long, device=CUDA)
        for b, n in enumerate(PROMPT_LENS):
            full_ids[b, : n + 14] = torch.cat([prompts[b, :n], new_tokens[b]])
        full = model(full_ids, routing=routing, prompt_lens=torch.tensor(PROMPT_LENS, device=CUDA))
    for b, n in enumerate(PROMPT_LENS):
        torch.testing.assert_close(cached[b], full[b, : n + 14], rtol=1e-4, atol=1e-4)


@pytest.fixture
def nccl_group():
    """A one-process NCCL group on cuda:0."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_fsdp2_step_on_one_gpu_and_its_sharded_checkpoint(nccl_group, tmp_path):
    """FSDP2 (NCCL, one GPU): one AdamW step under bf16 autocast equals the unwrapped model's
    step; the checkpoint written from it (DCP optimizer shards) loads back exactly."""
    from lorytrain.training.checkpoint import load_model_weights, load_optimizer_state, save_checkpoint
    from lorytrain.training.distributed import full_optimizer_state, full_state_dict
    from lorytrain.training.trainer import lm_loss

    model_config = ModelConfig.from_preset("tiny", ffn="lory", n_experts=4, segment_len=16, vocab_size=512)

    def fresh(sharded: bool, seed: int = 0):
        torch.manual_seed(seed)
        model = build_model(model_config).to(CUDA)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0)).to(CUDA)
    results = {}
    for sharded in (False, True):  # the sharded model and its optimizer stay in `model`, `optimizer`
        model, optimizer = fresh(sharded)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(ids), ids, None)
        loss.backward()
        optimizer.step()
        results[sharded] = (loss.item(), full_state_dict(model))
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], value, rtol=1e-5, atol=1e-5)

    save_checkpoint(tmp_path, 1, results[True][1], {"step": 1}, model=model, optimizer=optimizer, device=CUDA)
    path = tmp_path / "checkpoints" / "step-00000001"
    loaded, loaded_optimizer = fresh(True, seed=1)
    load_model_weights(loaded, path)
    load_optimizer_state(loaded, loaded_optimizer, path)
    for name, value in full_state_dict(loaded).items():
        assert torch.equal(value, results[True][1][name]), name
    want = full_optimizer_state(model, optimizer)["state"]
    got = full_optimizer_state(loaded, loaded_optimizer)["state"]
    for name, moments in want.items():
        for key, value in moments.items():
            assert torch.equal(got[name][key], value), (name, key)


def test_compile_trains_with_the_eager_loss(text_shards, tmp_path):
    """`--compile` on CUDA, Lory from the first step: per-step losses within 1e-3 of eager."""
    from lorytrain.training.trainer import Trainer

    os.environ.setdefault("LORY_PROGRESS", "0")
    train, _ = text_shards
    options = {"steps": 6, "ffn": "lory", "dense_warmup": 0.0, "precision": "fp32"}
    for name, compile_ in (("eager", False), ("compiled", True)):
        Trainer(config(train, tmp_path / name, compile=compile_, **options), log=lambda *a, **k: None).train()
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 7))
    assert all(abs(compiled[s] - eager[s]) <= 1e-3 for s in eager), (eager, compiled)
