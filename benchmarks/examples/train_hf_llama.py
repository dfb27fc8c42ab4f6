"""Train a transformers Llama on lory shards, each document attending only to itself, and resume
mid-epoch exactly.

    python benchmarks/examples/train_hf_llama.py SHARDS --out run/ --steps 40 --stop-after 20   # "crashes" at 20
    python benchmarks/examples/train_hf_llama.py SHARDS --out run/ --steps 40 --resume          # goes on from 20

Batches come from `ShardDataset(with_metadata=True)` through torchdata's `StatefulDataLoader`;
`lorydata.masks` turns their `doc_starts` into the model's mask, positions and labels; the
checkpoint holds model, optimizer and loader state, so the resumed run sees exactly the batches
an uninterrupted run would. Needs `pip install 'lory[hf,loader]'`. Prints one JSON line per step.
"""

import argparse
import json
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lorydata.dataset import ShardDataset
from lorydata.masks import hf_attention_kwargs, packed_labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a lory shard folder, e.g. a build's train/")
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stop-after", type=int, default=None, help="save and stop after this step")
    parser.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint.pt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dataset = ShardDataset(args.data, seed=0, batch_size=args.batch_size, with_metadata=True)
    tok, seq_len = dataset.manifest.tokenizer, dataset.seq_len
    loader = StatefulDataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                collate_fn=ShardDataset.collate)
    config = LlamaConfig(vocab_size=tok["vocab_size"], hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=seq_len, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    checkpoint, step = Path(args.out) / "checkpoint.pt", 0
    if args.resume:
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step = state["step"]

    for batch in loader:
        ids, starts = batch["input_ids"], batch["doc_starts"]
        labels = packed_labels(ids, starts)  # no loss across a document boundary
        if tok["pad_id"] != tok["eos_id"]:
            labels[ids == tok["pad_id"]] = -100  # the padded tail of the corpus
        loss = model(ids, labels=labels, **hf_attention_kwargs(starts, seq_len)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        print(json.dumps({"step": step, "loss": round(loss.item(), 6), "seq_ids": batch["seq_id"].tolist()}),
              flush=True)
        if step in (args.stop_after, args.steps):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "loader": loader.state_dict(), "step": step}, checkpoint)
            break


if __name__ == "__main__":
    main()
