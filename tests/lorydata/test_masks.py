"""Document masks for packed sequences, checked against running every document alone through a
transformers Llama, and the continuation flag against the packing it comes from."""

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from lorydata.continuation import continued_sequences
from lorydata.dataset import ShardDataset
from lorydata.errors import LoryDataError, ShardError
from lorydata.masks import (
    block_causal_mask,
    document_ids,
    hf_attention_kwargs,
    packed_labels,
    position_ids,
    varlen_metadata,
)
from lorydata.shards import read_shard, write_shard
from lorydata.tokenizer import Tokenizer
from tests.lorydata.shardkit import build_shards, make_documents

SEQ_LEN = 32
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Four packed sequences of real shards, with their document starts (several per row)."""
    folder = tmp_path_factory.mktemp("masks")
    build_shards(folder, make_documents(40), seq_len=SEQ_LEN, rows_per_shard=8)
    dataset = ShardDataset(folder, shuffle=False, epochs=1, with_metadata=True)
    rows = [r for r in dataset if len(r["doc_starts"]) >= 2][:4]
    assert len(rows) == 4
    return ShardDataset.collate(rows)


def llama(implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=Tokenizer().vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         attn_implementation=implementation)
    return LlamaForCausalLM(config).eval()


def pieces(doc_starts):
    """(row, start, end) of every document piece of a batch."""
    for row, starts in enumerate(doc_starts):
        for start, end in zip(starts, [*starts[1:], SEQ_LEN], strict=True):
            yield row, start, end


@torch.no_grad()
def alone_logits(model, input_ids, doc_starts) -> torch.Tensor:
    """Each document piece run through the model by itself, put back in place."""
    out = torch.empty(*input_ids.shape, model.config.vocab_size)
    for row, start, end in pieces(doc_starts):
        out[row, start:end] = model(input_ids[row : row + 1, start:end], use_cache=False).logits[0]
    return out


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_masks_make_packed_logits_equal_each_document_alone(batch, implementation):
    model = llama(implementation)
    ids, starts = batch["input_ids"], batch["doc_starts"]
    with torch.no_grad():
        packed = model(ids, use_cache=False, **hf_attention_kwargs(starts, SEQ_LEN, implementation)).logits
        plain = model(ids, use_cache=False).logits
    alone = alone_logits(model, ids, starts)
    assert (packed - alone).abs().max() <= TOLERANCE
    assert (plain - alone).abs().max() > 1e-2, "without the masks, later documents see earlier ones"


def test_position_ids_alone_let_transformers_find_the_documents(batch):
    # transformers builds the block-diagonal mask itself from position_ids that restart (no mask given)
    model = llama("sdpa")
    ids, starts = batch["input_ids"], batch["doc_starts"]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids(starts, SEQ_LEN), use_cache=False).logits
    assert (packed - alone_logits(model, ids, starts)).abs().max() <= TOLERANCE


def test_packed_labels_give_the_loss_of_the_documents_alone(batch):
    model = llama("sdpa")
    ids, starts = batch["input_ids"], batch["doc_starts"]
    with torch.no_grad():
        packed = model(ids, labels=packed_labels(ids, starts), use_cache=False,
                       **hf_attention_kwargs(starts, SEQ_LEN)).loss
        total, count = 0.0, 0
        for row, start, end in pieces(starts):
            if end - start > 1:
                doc = ids[row : row + 1, start:end]
                total += model(doc, labels=doc, use_cache=False).loss.item() * (end - start - 1)
                count += end - start - 1
    assert packed.item() == pytest.approx(total / count, abs=TOLERANCE)


def test_varlen_metadata_matches_transformers_and_a_varlen_reference(batch):
    starts = batch["doc_starts"]
    cu_seqlens, max_seqlen = varlen_metadata(starts, SEQ_LEN)
    positions = position_ids(starts, SEQ_LEN).reshape(1, -1)
    (hf_cu, _), (hf_max, _) = prepare_fa_kwargs_from_position_ids(positions)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == hf_cu.tolist()
    assert max_seqlen == int(hf_max) == max(e - s for _, s, e in pieces(starts))

    # Attention computed the way a varlen kernel reads cu_seqlens (the batch flattened to one
    # row, each segment causal on its own) equals masked attention over the batch.
    torch.manual_seed(1)
    batch_size, heads, dim = len(starts), 2, 8
    q, k, v = (torch.randn(batch_size, heads, SEQ_LEN, dim) for _ in range(3))
    flat = [t.transpose(1, 2).reshape(-1, heads, dim) for t in (q, k, v)]  # (tokens, heads, dim)
    varlen = torch.empty_like(flat[0])
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        seg = [t[a:b].transpose(0, 1) for t in flat]
        varlen[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True).transpose(0, 1)
    for dtype in (torch.bool, torch.float32):
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(starts, SEQ_LEN, dtype))
        assert (masked.transpose(1, 2).reshape(-1, heads, dim) - varlen).abs().max() <= TOLERANCE


def test_helpers_equal_a_naive_loop():
    rng = np.random.default_rng(0)
    starts = [[0, *sorted(rng.choice(np.arange(1, SEQ_LEN), size=n, replace=False).tolist())] for n in (0, 1, 3, 7)]
    docs, positions = document_ids(starts, SEQ_LEN), position_ids(starts, SEQ_LEN)
    mask = block_causal_mask(starts, SEQ_LEN, torch.bool)
    float_mask = block_causal_mask(starts, SEQ_LEN, torch.bfloat16)
    for row, row_starts in enumerate(starts):
        doc_of = [sum(1 for s in row_starts if s <= i) - 1 for i in range(SEQ_LEN)]
        assert docs[row].tolist() == doc_of
        assert positions[row].tolist() == [i - row_starts[doc_of[i]] for i in range(SEQ_LEN)]
        for i in range(SEQ_LEN):
            allowed = [j <= i and doc_of[j] == doc_of[i] for j in range(SEQ_LEN)]
            assert mask[row, 0, i].tolist() == allowed
            assert (float_mask[row, 0, i] == 0).tolist() == allowed
    assert float_mask.min() == torch.finfo(torch.bfloat16).min


@pytest.mark.parametrize("bad", [[[1, 4]], [[0, 4, 4]], [[0, 9, 3]], [[0, SEQ_LEN]], [[]], []])
def test_bad_doc_starts_are_one_clear_error(bad):
    with pytest.raises(LoryDataError, match="doc_starts"):
        position_ids(bad, SEQ_LEN)


def test_unknown_attention_implementation_is_refused():
    with pytest.raises(LoryDataError, match="flex"):
        hf_attention_kwargs([[0]], SEQ_LEN, "flex")


def test_flash_kwargs_flatten_the_batch(batch):
    kwargs = hf_attention_kwargs(batch["doc_starts"], SEQ_LEN, "flash_attention_2")
    assert kwargs["position_ids"].shape == (1, 4 * SEQ_LEN)
    assert kwargs["cu_seq_lens_q"] is kwargs["cu_seq_lens_k"]
    assert kwargs["cu_seq_lens_q"][-1] == 4 * SEQ_LEN


@pytest.mark.gpu
def test_cu_seqlens_drive_torch_varlen_flash_attention(batch):
    from torch.nn.attention.varlen import varlen_attn

    starts = batch["doc_starts"]
    cu_seqlens, max_seqlen = varlen_metadata(starts, SEQ_LEN)
    torch.manual_seed(2)
    q, k, v = (torch.randn(len(starts) * SEQ_LEN, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = cu_seqlens.cuda()
    out = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, window_size=(-1, 0))
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        alone = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True)
        assert (out[a:b] - alone.transpose(0, 1)).abs().max() <= 2e-2  # bf16 kernels


# ---- the continuation flag ------------------------------------------------------------------
def true_continuations(documents, seq_len):
    """Per sequence of one packing stream: does a document cross into it? (from document lengths)"""
    tok = Tokenizer()
    lengths = np.array([len(tok.encode(text)) + 1 for _, text in documents])  # one EOS each
    ends = np.cumsum(lengths)
    starts = ends - lengths
    n = -(-int(ends[-1]) // seq_len)
    return np.array([bool(((starts < s * seq_len) & (ends > s * seq_len)).any()) for s in range(n)])


@pytest.mark.parametrize("seq_len", [16, 32])
def test_continuation_flags_match_the_packing(tmp_path, seq_len):
    documents = make_documents(50)
    manifest = build_shards(tmp_path, documents, seq_len=seq_len, rows_per_shard=6, tail="pad")
    flags = continued_sequences(tmp_path)
    assert flags.tolist() == true_continuations(documents, seq_len).tolist()
    assert flags.sum() == manifest.counts["continued_documents"]
    rows = list(ShardDataset(tmp_path, shuffle=False, epochs=1, with_metadata=True))
    assert all(r["continues"] == flags[r["seq_id"]] for r in rows)
    assert ShardDataset.collate(rows[:3])["continues"].dtype == torch.bool


def test_continuation_flags_need_the_previous_seq_id(tmp_path):
    manifest = build_shards(tmp_path, make_documents(20), seq_len=16, rows_per_shard=100)
    table = read_shard(tmp_path / manifest.shards[0].file)
    field = table.schema.field("seq_id")
    gaps = pa.array(table.column("seq_id").to_numpy() * 2)  # no sequence has its predecessor
    manifest.shards = [write_shard(table.set_column(3, field, gaps), tmp_path, manifest.shards[0].file)]
    manifest.write(tmp_path)
    assert not continued_sequences(tmp_path).any()
    assert len(list(ShardDataset(tmp_path, shuffle=False, epochs=1, with_metadata=True))) == table.num_rows
    repeated = pa.array(np.zeros(table.num_rows, dtype=np.int64))
    manifest.shards = [write_shard(table.set_column(3, field, repeated), tmp_path, manifest.shards[0].file)]
    manifest.write(tmp_path)
    with pytest.raises(ShardError, match="repeats a seq_id"):
        continued_sequences(tmp_path)
