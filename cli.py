"""The `lory` command line: thin commands that parse options and call library functions."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

import click

from lorydata.errors import LoryError

# Set by `lory --debug` (or LORY_DEBUG=1): failures print their traceback, not just one line.
_DEBUG = {"on": False}
_BEAM_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker",
                 "apache_beam.runners.portability.fn_api_runner")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lory")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (as LORY_DEBUG=1 does).")
def lory(debug: bool) -> None:
    """lory: similarity-batched pre-training of fully differentiable MoE language models.

    Every failure is one line on stderr (`error: ...`; exit 2 for bad input, 1 for anything
    else, 130 on Ctrl-C); `--debug` or LORY_DEBUG=1 adds the traceback.
    """
    if debug:
        _DEBUG["on"] = True
        logging.getLogger("lory").setLevel(logging.INFO)
        for name in _BEAM_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# ---- model half ------------------------------------------------------------------------
def _cache_options(command):
    """--cache-dir and --cache-limit: where shards streamed from a URL are cached."""
    command = click.option("--cache-limit", default=None, metavar="SIZE",
                           help="Most bytes in --cache-dir, e.g. 20GB (default: 3 shards per reading process).")(command)
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                        help="Local cache of shards streamed from a URL (default: ~/.cache/lory/shards).")(command)


@lory.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML/TOML/JSON file of options; command-line options override it.")
@click.option("--data", default=None, help="Training shard folder, or its URL (s3://bucket/prefix/train).")
@click.option("--out", default=None, help="Run folder (checkpoints, metrics.jsonl, tensorboard/).")
@click.option("--eval-data", default=None, help="Held-out shard folder (or URL) for periodic evaluation.")
@_cache_options
@click.option("--preset", default=None, help="Model size preset: tiny, small, 0.3b, 1.5b.")
@click.option("--ffn", default=None, type=click.Choice(["dense", "lory", "topk", "expert-choice", "prefix"]))
@click.option("--experts", default=None, type=int, help="Experts per MoE layer.")
@click.option("--segment-len", default=None, type=int, help="Lory routing segment length.")
@click.option("--model-override", "model_overrides", multiple=True, metavar="KEY=VALUE",
              help="Any ModelConfig field, e.g. --model-override n_layers=2 (repeatable).")
@click.option("--seq-len", default=None, type=int, help="Must match the shards (default: the shards').")
@click.option("--batch-size", default=None, type=int, help="Sequences per micro-batch per process.")
@click.option("--tokens-per-step", default=None, type=int, help="Tokens per optimizer step (sets accumulation).")
@click.option("--steps", default=None, type=int)
@click.option("--tokens", default=None, type=int, help="Training tokens in all (instead of --steps).")
@click.option("--lr", default=None, type=float)
@click.option("--warmup", default=None, type=float, help="Warm-up share of steps (<1) or steps (>=1).")
@click.option("--dense-warmup", default=None, type=float, help="Share of steps trained dense before upcycling.")
@click.option("--weight-decay", default=None, type=float)
@click.option("--grad-clip", default=None, type=float)
@click.option("--precision", default=None, type=click.Choice(["auto", "fp32", "bf16"]))
@click.option("--device", default=None, type=click.Choice(["auto", "cuda", "cpu"]), help="auto: CUDA when there is a GPU.")
@click.option("--compile/--no-compile", "compile_", default=None)
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=None)
@click.option("--parallel", default=None, type=click.Choice(["auto", "ddp", "fsdp"]))
@click.option("--eval-every", default=None, type=int)
@click.option("--eval-batches", default=None, type=int)
@click.option("--save-every", default=None, type=int)
@click.option("--save-final/--no-save-final", default=None, help="Checkpoint at the end of the run (default: on).")
@click.option("--keep-last", default=None, type=int)
@click.option("--log-every", default=None, type=int)
@click.option("--num-workers", default=None, type=int, help="Dataloader workers per process.")
@click.option("--seed", default=None, type=int)
@click.option("--record-samples", is_flag=True, default=None,
              help="Log the seq_ids each rank trains on to RUN_DIR/samples/rank-<r>.jsonl.")
@click.option("--resume", type=click.Choice(["auto"]), is_flag=False, flag_value="auto", default=None,
              help="Continue from the newest valid checkpoint in --out, or start fresh when there is none "
                   "(`--resume` and `--resume auto` alike: what a requeued job needs).")
@click.option("--allow-data-change", is_flag=True, default=None,
              help="With --resume: continue on a --data other than the run's corpus (refused otherwise).")
def train_cmd(config_file, compile_, model_overrides, **options):
    """Pre-train a Lory MoE (or a baseline) on shards. Runs on CPU as one process, or on
    GPUs under `torchrun --nproc-per-node N -m cli train ...` (DDP/FSDP)."""
    from lorytrain.training.config import make_config, parse_overrides
    from lorytrain.training.distributed import shutdown_distributed
    from lorytrain.training.preemption import PREEMPTED_EXIT_CODE, Preempted, ignore_signals
    from lorytrain.training.trainer import Trainer

    options["compile"] = compile_
    options["resume"] = True if options["resume"] else None
    if model_overrides:
        options["model_overrides"] = parse_overrides(model_overrides)
    config = make_config(config_file, options)
    console = _console()
    try:
        trainer = Trainer(config, log=console.print)
        record = trainer.train()
    except Preempted as stop:  # every rank saved the same step: leave the group together
        ignore_signals()
        shutdown_distributed()
        if trainer.env.is_main:
            console.print(f"{stop}: checkpoint written; continue with `lory train ... --resume auto` "
                          f"(exit code {PREEMPTED_EXIT_CODE})")
        sys.exit(PREEMPTED_EXIT_CODE)
    except BaseException:
        shutdown_distributed(wait_for_all=False)
        raise
    shutdown_distributed()
    if trainer.env.is_main:
        summary = f"done: step {trainer.step}, {trainer.tokens:,} tokens"
        if "loss" in record:
            summary += f", last loss {record['loss']:.4f}"
        if "eval" in record:
            summary += f", eval loss {record['eval']['overall']['loss']:.4f} (ppl {record['eval']['overall']['ppl']:.1f})"
        console.print(f"{summary}; run folder {config.out}")


def _run_over_data_options(command):
    """Options shared by the commands that run a checkpoint over a shard folder."""
    options = [
        click.option("--checkpoint", default=None, help="Checkpoint folder or name (default: the run's latest)."),
        click.option("--batch-size", default=8, show_default=True, type=int),
        click.option("--max-batches", default=0, show_default=True, type=int, help="Stop after this many batches (0: all)."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@lory.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Shard folder (or URL) to evaluate on (e.g. the corpus's heldout/).")
@_run_over_data_options
@_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_cmd(run_dir, data, checkpoint, batch_size, max_batches, device, cache_dir, cache_limit, as_json):
    """Loss and perplexity of a run, overall and per domain, with causal segment routing
    exactly as in training."""
    import torch

    from lorytrain.evaluation import evaluate
    from lorytrain.runs import load_run

    device = _device(device)
    run = load_run(run_dir, checkpoint, device=device)
    dtype = torch.bfloat16 if device == "cuda" else None
    result = evaluate(run.model, data, batch_size=batch_size, device=device, max_batches=max_batches,
                      expected_tokenizer=run.tokenizer_sha256, autocast_dtype=dtype, cache_dir=cache_dir,
                      cache_limit=cache_limit)
    result["checkpoint"] = {"path": str(run.checkpoint), "step": run.state["step"], "tokens": run.state["tokens"]}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{run_dir} @ step {run.state['step']} on {data}")
    for column in ("domain", "loss", "ppl", "tokens"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for name, entry in [*result["domains"].items(), ("overall", result["overall"])]:
        table.add_row(name, f"{entry['loss']:.4f}", f"{entry['ppl']:.2f}", f"{entry['tokens']:,}")
    _console().print(table)


def _device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@lory.command("generate")
@click.argument("run_dir", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable; all are decoded as one batch).")
@click.option("--prompt-file", type=click.Path(dir_okay=False), default=None,
              help="A file of prompts, one per line (blank lines skipped).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--routing", default="prompt", show_default=True, type=click.Choice(["prompt", "segment", "causal"]),
              help="prompt: merge each MoE layer once from the prompt; segment: re-route every segment_len tokens; "
                   "causal: as segment, the first segment token by token (no token sees a later one, as scored by "
                   "lory benchmark and the export-hf model).")
@click.option("--temperature", default=0.8, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=0.95, show_default=True, type=float, help="1.0 = off.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint", default=None, help="Checkpoint folder or name (default: the run's latest).")
@click.option("--tokenizer", default=None, help="tokenizer.json when the run folder has no copy.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {prompt, completion}.")
def generate_cmd(run_dir, prompts, prompt_file, max_new_tokens, routing, temperature, top_k, top_p, seed,
                 checkpoint, tokenizer, device, as_json):
    """Continue prompts with a trained run (KV-cached, batched decoding)."""
    from pathlib import Path

    from lorydata.tokenizer import Tokenizer
    from lorytrain.errors import LoryTrainError
    from lorytrain.generation import SamplingConfig, generate_text
    from lorytrain.runs import load_run

    prompts = list(prompts)
    if prompt_file:
        try:
            prompts += [line for line in Path(prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise LoryTrainError(f"cannot read --prompt-file {prompt_file}: {exc}") from None
    if not prompts:
        raise LoryTrainError("give --prompt TEXT (repeatable) or --prompt-file F")
    run = load_run(run_dir, checkpoint, device=_device(device))
    path = tokenizer or run.tokenizer_path
    if path is None:
        raise LoryTrainError(f"{run_dir} holds no tokenizer.json; pass --tokenizer")
    tok = Tokenizer(path)
    if run.tokenizer_sha256 and tok.sha256 != run.tokenizer_sha256:
        raise LoryTrainError(f"tokenizer {path} is not the one the run was trained with")
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    completions = generate_text(run.model, tok, prompts, config, routing=routing)
    if as_json:
        click.echo(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)],
                              indent=2, ensure_ascii=False))
        return
    for prompt, completion in zip(prompts, completions, strict=True):
        click.echo(f"{prompt}{completion}")
        click.echo("-" * 40)


@lory.command("analyze")
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Shard folder with domains (e.g. the corpus's heldout/).")
@click.option("--out", default=None, help="Output folder (default: RUN_DIR/analysis).")
@_run_over_data_options
@click.option("--json", "as_json", is_flag=True, help="Print the whole analysis as JSON.")
def analyze_cmd(run_dir, data, out, checkpoint, batch_size, max_batches, device, as_json):
    """Expert use, per-domain routing weights, domain specialisation (MI) and routing divergence
    (Jensen-Shannon between domains) per layer, with domain × expert heatmaps (PNG), the run's
    training-time MoE diagnostics (training_diagnostics.png) and analysis.json."""
    from pathlib import Path

    from lorytrain.analysis import run_analysis

    out = out or str(Path(run_dir) / "analysis")
    result = run_analysis(run_dir, data, out, checkpoint=checkpoint, batch_size=batch_size,
                          max_batches=max_batches, device=_device(device))
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    _print_analysis(result, out)


def _print_analysis(result: dict, out: str) -> None:
    from rich.table import Table

    table = Table(title="routing per layer (MI in nats between domain and top-1 expert)")
    for column in ("layer", "expert use", "MI", "shuffled MI", "NMI", "domain JS", "shuffled JS"):
        table.add_column(column, justify="right")
    for layer in result["layers"]:
        spec, js = layer["specialisation"], layer["divergence"]
        table.add_row(str(layer["layer"]), f"{layer['expert_use']:.2f}", f"{spec['mi']:.3f}",
                      f"{spec['mi_shuffled']:.3f}", f"{spec['nmi']:.3f}", f"{js['js']:.4f}", f"{js['js_shuffled']:.4f}")
    console = _console()
    console.print(table)
    console.print("domain JS: mean Jensen-Shannon divergence (nats) between the domains' mean routing weights")
    console.print(f"heatmaps, training diagnostics and analysis.json in {out}")


def _split_beam_args(tokens: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Separate input paths from pass-through Beam flags (`--name=value` or `--name value`)."""
    inputs, flags = [], []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            has_value = "=" not in token and i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            flags.append(f"{token}={tokens[i + 1]}" if has_value else token)
            i += 2 if has_value else 1
        else:
            inputs.append(token)
            i += 1
    return inputs, flags


# ---- data half -------------------------------------------------------------------------
def _build_option(*decls: str, help: str = "", **kwargs):
    """A build-corpus option whose default is `BuildOptions`' own: click passes None for an
    option not given, and the dataclass fills it in, so the two never drift."""
    from pipelines.options import BuildOptions  # imports no Beam: cheap at start-up

    name = decls[0].removeprefix("--").replace("-", "_")
    default = BuildOptions.default(name)
    shown = f"[default: {default}]" if default is not None else ""
    return click.option(*decls, default=None, help=f"{help} {shown}".strip(), **kwargs)


@lory.command("build-corpus", context_settings={"ignore_unknown_options": True})
@click.argument("inputs", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_build_option("--text-field", help="Field holding the text (a dotted path reaches into objects and Parquet "
                                    "structs: meta.body).")
@_build_option("--domain-field", help="Field holding a domain label (dotted path, e.g. meta.pile_set_name); "
                                      "a non-string value is stored as JSON.")
@_build_option("--domain-from-path", metavar="parent|REGEX",
               help="Domain from each file's path: 'parent' (its folder's name) or a regex with a group, "
                    "e.g. 'corpus/([^/]+)/'; a non-empty --domain-field wins.")
@_build_option("--id-field", help="Field holding a document id (dotted path; default: content hash).")
@_build_option("--max-line-bytes", type=int,
               help="JSON lines longer than this are dead-lettered as line_too_long without being read whole.")
@_build_option("--max-json-depth", type=int, help="JSON nested deeper than this is dead-lettered as json_too_deep.")
@click.option("--strict", is_flag=True, default=None,
              help="Fail when an input file lost most of its records (or, with a domain option, most domains) "
                   "instead of warning.")
@_build_option("--tokenizer", help="tokenizer.json or folder (default: the bundled BPE-8192).")
@_build_option("--seq-len", type=int, help="Tokens per sequence.")
@_build_option("--tail", type=click.Choice(["drop", "pad"]),
              help="What to do with the last partial sequence.")
@_build_option("--order", type=click.Choice(["similarity", "random"]))
@_build_option("--embedder", help="Embedding model: a sentence-transformers or model2vec folder, 'static' (a "
                                  "static model distilled from the bundled MiniLM, ~70x faster on CPU) or "
                                  "'static-bpe' (the same over lory's own token ids), 'lsa' (LSA of TF-IDF over "
                                  "lory's token ids, fitted on this build's documents: orders like MiniLM at "
                                  "static-bpe's speed); default: the bundled MiniLM.")
@_build_option("--embed-backend", type=click.Choice(["torch", "onnx", "onnx-int8"]),
               help="Transformer embedders on CPU: ONNX Runtime (onnx-int8: ~2.5x torch).")
@_build_option("--embed-batch-size", type=int)
@_build_option("--embed-max-tokens", type=int, help="Embedder tokens per document.")
@_build_option("--embed-long", type=click.Choice(["start", "chunk-mean", "whole"]),
              help="Embed long documents from their start or as the mean over chunks.")
@_build_option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@_build_option("--index", help="FAISS factory string (default: chosen by corpus size).")
@_build_option("--k", type=int, help="Neighbours per document.")
@_build_option("--nprobe", type=int, help="IVF cells to search.")
@_build_option("--partitions", type=int,
              help="k-means cells walked in parallel (1 = one global walk); a cell over 1.5x the "
                   "mean is split.")
@_build_option("--heldout-fraction", type=float,
              help="Share of documents (by id hash) written to heldout/.")
@_build_option("--seed", type=int)
@_build_option("--rows-per-shard", type=int)
@_build_option("--min-chars", type=int)
@_build_option("--max-chars", type=int)
@_build_option("--buckets", type=int,
              help="Content-hash buckets of the documents stage (default: one per 16 MiB of input).")
@click.option("--runner", default=None, help="Beam runner (default: in-process FnApiRunner); dask: see --workers.")
@click.option("--dask-address", default=None, help="With --runner dask: tcp://host:port of a running Dask scheduler.")
@click.option("--workers", default=None, type=int,
              help="With --runner dask: worker processes of a local Dask cluster (default: one per core).")
@_build_option("--near-dedup", type=click.Choice(["on", "off"]),
              help="Drop near-duplicates (MinHash LSH on word shingles) before embedding.")
@_build_option("--near-dedup-threshold", type=float,
              help="Estimated Jaccard at or above which two documents are near-duplicates.")
@_build_option("--near-dedup-shingle", type=int, help="Words per shingle.")
@_build_option("--near-dedup-bands", type=int, help="LSH bands.")
@_build_option("--near-dedup-rows", type=int,
              help="MinHash values per band (bands × rows = permutations).")
@_build_option("--semantic-dedup", type=float, metavar="COS",
              help="Similarity order: drop kNN neighbours at cosine ≥ COS whose MinHash Jaccard confirms them.")
@_build_option("--semantic-dedup-jaccard", type=float,
              help="Estimated Jaccard that confirms a --semantic-dedup pair.")
@click.option("--overwrite", is_flag=True, help="Replace outputs built with other options.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def build_corpus_cmd(inputs, as_json, runner, dask_address, workers, **kwargs):
    """Build similarity-batched (or random) shards from text dumps INPUT... (files, folders,
    globs). Extra `--flag=value` options are passed to Beam (e.g. --direct_num_workers=2)."""
    from pipelines.build_corpus import build_corpus
    from pipelines.options import BuildOptions
    from pipelines.runner.session import LOCAL_RUNNER, runner_session

    paths, beam_args = _split_beam_args(inputs)
    given = {name: value for name, value in kwargs.items() if value is not None}
    console = _console()
    with runner_session(runner, dask_address, workers) as (runner, runner_args):
        options = BuildOptions(inputs=paths, runner=runner or LOCAL_RUNNER, beam_args=[*beam_args, *runner_args],
                               **given)
        summary = build_corpus(options, log=console.print)
    _print_build_summary(console, summary)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))


def _print_build_summary(console, summary) -> None:
    from rich.table import Table

    from lorydata.manifest import Manifest

    docs = summary.documents
    table = Table(title=f"corpus {summary.out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("records read", f"{docs.get('records_read', 0):,}")
    for reason, n in docs.get("dropped", {}).items():
        table.add_row(f"  dropped: {reason}", f"{n:,}")
    table.add_row("documents kept", f"{docs.get('documents_kept', 0):,}")
    table.add_row("utf-8 replacements", f"{docs.get('utf8_replacements', 0):,}")
    for split, info in summary.splits.items():
        table.add_row(
            f"{split}", f"{info['documents']:,} docs, {info['sequences']:,} seqs, {info['tokens']:,} tokens, "
            f"{info['shards']} shards"
        )
        metrics = Manifest.read(info["folder"]).order.get("metrics", {})
        if "adjacent_similarity" in metrics:
            table.add_row(f"  {split} order", f"adjacent similarity {metrics['adjacent_similarity']['mean']:.3f}, "
                                              f"break rate {metrics['break_rate']:.3f}")
    console.print(table)


@lory.command("inspect")
@click.argument("folder", type=click.Path())
@click.option("--show", "show", type=int, default=None, help="Decode sequence i back to text.")
@click.option("--tokenizer", default=None, help="Tokenizer for --show (default: the one in the manifest).")
@_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print summary and verification as one JSON object.")
def inspect_cmd(folder, show, tokenizer, cache_dir, cache_limit, as_json):
    """Summarise a shard folder (a local path or a URL such as s3://bucket/prefix/train), verify
    every shard (sha256, schema, rows), decode a sequence."""
    from lorydata.verify import inspect_folder

    report = inspect_folder(folder, show=show, tokenizer=tokenizer, cache_dir=cache_dir, cache_limit=cache_limit)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_inspect(report)
    if not report["verification"]["ok"]:
        sys.exit(1)


def _print_inspect(report: dict) -> None:
    console = _console()
    summary = report["summary"]
    console.print(f"[bold]{report['folder']}[/]: split {summary['split']}, {summary['sequences']:,} sequences × "
                  f"{summary['seq_len']} tokens in {summary['shards']} shards, order {summary['order']}")
    tok = summary["tokenizer"]
    console.print(f"tokenizer sha256 {tok['sha256'][:16]}…, vocab {tok['vocab_size']}, eos {tok['eos_id']}, "
                  f"pad {tok['pad_id']}")
    for key, value in summary["counts"].items():
        console.print(f"  {key}: {value}")
    verification = report["verification"]
    for check in verification["shards"]:
        if not check["ok"]:
            console.print(f"[red]BAD[/] {check['file']}: {check['error']}")
    status = "[green]all shards verified[/]" if verification["ok"] else f"[red]{len(verification['failed'])} bad shard(s)[/]"
    console.print(status)
    if "sequence" in report:
        seq = report["sequence"]
        console.print(f"\n[bold]sequence {seq['index']}[/] (seq_id {seq['seq_id']}, {seq['shard']}), "
                      f"documents at {seq['doc_starts']}, domains {seq['domains']}")
        click.echo(seq["text"])


@lory.command("export-corpus")
@click.argument("folder", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(["megatron", "olmo", "parquet"]),
              help="megatron: .bin/.idx indexed dataset; olmo: fixed-length token .npy files; parquet: zstd Parquet.")
@click.option("--rows-per-file", type=int, default=None,
              help="Sequences per output file, olmo and parquet (default: the shards' rows per shard).")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
def export_corpus_cmd(folder, out, fmt, rows_per_file, as_json):
    """Write shard FOLDER as another trainer's format into the new folder OUT, one lory sequence
    per sample, in seq_id order."""
    from lorydata.export import export_corpus

    summary = export_corpus(folder, out, fmt, rows_per_file=rows_per_file)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        click.echo(f"wrote {summary.sequences:,} sequences × {summary.seq_len} tokens as {fmt} to {summary.out} "
                   f"({len(summary.files)} files, {summary.seconds:.1f} s)")


@lory.command("train-tokenizer")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for tokenizer.json.")
@click.option("--vocab-size", default=8192, show_default=True, type=int)
@click.option("--text-field", default="text", show_default=True)
@click.option("--sample-chars", default=50_000_000, show_default=True, type=int,
              help="Characters of text sampled for training.")
@click.option("--seed", default=0, show_default=True, type=int)
def train_tokenizer_cmd(inputs, out, vocab_size, text_field, sample_chars, seed):
    """Train a byte-level BPE tokenizer on a sample of INPUT... (any supported format)."""
    from lorydata.documents import Document
    from lorydata.readers import ReaderConfig, read_inputs
    from lorydata.tokenizer import train_tokenizer

    records = read_inputs(list(inputs), ReaderConfig(text_field=text_field))
    texts = (r.text for r in records if isinstance(r, Document) and r.text.strip())
    tok = train_tokenizer(texts, out, vocab_size=vocab_size, sample_chars=sample_chars, seed=seed)
    ident = tok.identity()
    click.echo(f"wrote {ident.path} (vocab {ident.vocab_size}, eos {ident.eos_id}, pad {ident.pad_id}, "
               f"sha256 {ident.sha256[:16]}…)")


class _QuietImportNoise(logging.Filter):
    """Drops Beam's import-time warning about optional Google Cloud clients we never use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().addFilter(_QuietImportNoise())
    # Beam logs a worker's exception with its traceback before raising it; lory turns the
    # raised error into one line (`--debug` or LORY_DEBUG=1 shows Beam's logs too).
    if os.environ.get("LORY_DEBUG", "") in ("", "0"):
        for name in _BEAM_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _one_line(exc: BaseException) -> str:
    """The message of `exc` as one line. An error re-raised from a DataLoader worker carries
    the worker's traceback in its message: its last line is the error itself."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    lines = text.splitlines()
    return lines[0] if len(lines) == 1 else " ".join(line.strip() for line in lines if line.strip())


def _fail(message: str, code: int) -> None:
    if _DEBUG["on"]:
        traceback.print_exc()
    click.echo(message, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lory` console script.

    Every failure is one line on stderr: user errors (`LoryError`) exit with code 2, an
    unexpected error (a bug, or an OS error lory did not foresee) with 1 and Ctrl-C with 130;
    `lory --debug ...` or LORY_DEBUG=1 prints the traceback before the line. Click's own usage
    errors keep click's message and code.
    """
    _setup_logging()
    _DEBUG["on"] = os.environ.get("LORY_DEBUG", "") not in ("", "0")  # `--debug` may turn it on
    try:
        code = lory.main(args=argv, prog_name="lory", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of Ctrl-C (KeyboardInterrupt) and of EOF at a prompt
        _fail("interrupted", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LoryError as exc:
        _fail(f"error: {_one_line(exc)}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as exc:  # a full disk or a vanished folder where lory had no more specific message
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(f"error: {exc.strerror or _one_line(exc)}{where}; run with --debug for the traceback", 1)
    except Exception as exc:  # a bug: still one line, the traceback on request
        _fail(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (please report it; run with --debug "
              "for the traceback)", 1)
    # Without standalone mode click returns the exit code of `ctx.exit(n)` instead of exiting.
    if isinstance(code, int) and code:
        sys.exit(code)


# ---- evaluation and export -------------------------------------------------------------
@lory.command("benchmark")
@click.argument("run_dir", type=click.Path())
@click.option("--tasks", default="paper", show_default=True,
              help="paper, a group (commonsense, reading, closed_book_qa, classification) or task names, comma-separated.")
@click.option("--data-dir", required=True, type=click.Path(),
              help="Folder of DATA_DIR/<task>/test.jsonl (and train.jsonl for few-shot tasks); see README.")
@click.option("--compare", "compare_run", default=None, type=click.Path(), help="A second run, shown side by side.")
@click.option("--routing", default="causal", show_default=True, type=click.Choice(["causal", "prompt", "segment"]),
              help="causal: the scoring rule lm_eval --model hf reproduces on an export-hf folder; prompt, "
                   "segment: the paper's (see README).")
@click.option("--num-fewshot", default=None, type=int, help="Override every task's shot count.")
@click.option("--limit", default=None, type=int, help="Score only the first N examples of each task.")
@click.option("--checkpoint", default=None, help="Checkpoint folder or name (default: the run's latest).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--out", default=None, help="JSON report (default: RUN_DIR/benchmark.json).")
def benchmark_cmd(run_dir, tasks, data_dir, compare_run, routing, num_fewshot, limit, checkpoint, batch_size,
                  device, out):
    """Downstream tasks of the paper (lm-eval, in-context, local files) grouped like its Table 1."""
    from pathlib import Path

    from rich.table import Table

    from lorytrain.harness.benchmark import benchmark_run, compare, plot, select_tasks
    from lorytrain.harness.suite import table_rows, write_json

    names, skipped = select_tasks(tasks, data_dir)
    console = _console()
    if skipped:
        console.print(f"no local data for: {', '.join(skipped)} (skipped)")
    options = {"routing": routing, "device": _device(device), "batch_size": batch_size, "num_fewshot": num_fewshot,
               "limit": limit}
    result = benchmark_run(run_dir, names, data_dir, checkpoint=checkpoint, **options)
    other = benchmark_run(compare_run, names, data_dir, **options) if compare_run else None
    table = Table(title=f"{run_dir}" + (f" vs {compare_run}" if other else "") + f" ({routing} routing)")
    for column in ("task", "metric", Path(run_dir).name, *((Path(compare_run).name, "change") if other else ())):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in table_rows(result, other):
        table.add_row(*row)
    console.print(table)
    payload = {"result": result, "skipped": skipped}
    if other:
        payload.update(compare_result=other, change=compare(result, other))
    out = out or str(Path(run_dir) / "benchmark.json")
    write_json(out, payload)
    png = plot(result, Path(out).with_suffix(".png"), other,
               (Path(run_dir).name, Path(compare_run).name if compare_run else ""))
    console.print(f"wrote {out} and {png}")


@lory.command("export-hf")
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--checkpoint", default=None, help="Checkpoint folder or name (default: the run's latest).")
@click.option("--routing", default="causal", show_default=True, type=click.Choice(["causal", "segment", "prompt"]),
              help="The folder's routing mode: causal (no token sees a later one; scores as lory benchmark), "
                   "segment or prompt (the paper's training and generation rules).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty.")
def export_hf_cmd(run_dir, out, checkpoint, routing, overwrite):
    """Write a Hugging Face folder that AutoModelForCausalLM loads with trust_remote_code=True."""
    from lorytrain.export.hf import export_hf
    from lorytrain.runs import load_run

    run = load_run(run_dir, checkpoint)
    folder = export_hf(run.model, out, run.tokenizer_path, routing=routing, max_length=run.state.get("seq_len"),
                       source=f"{run_dir}, step {run.state['step']}", overwrite=overwrite)
    _console().print(f"wrote {folder} ({run.model.config.ffn}, step {run.state['step']})")


@lory.command("export-dense")
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--routing-from", required=True,
              help="Shard folder, text file or text whose mean routing weights merge the experts.")
@click.option("--domain", default=None, help="With a shard folder: only segments of this domain.")
@click.option("--eval-data", default=None, type=click.Path(), help="Shards to compare dense vs MoE perplexity on.")
@click.option("--checkpoint", default=None, help="Checkpoint folder or name (default: the run's latest).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--max-batches", default=0, show_default=True, type=int, help="Stop after this many batches (0: all).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_dense_cmd(run_dir, out, routing_from, domain, eval_data, checkpoint, batch_size, max_batches, overwrite,
                     as_json):
    """Merge every Lory layer's experts with averaged routing weights into a LlamaForCausalLM folder."""
    from lorytrain.export.dense import export_dense_run

    report = export_dense_run(run_dir, out, routing_from, domain=domain, checkpoint=checkpoint, eval_data=eval_data,
                              batch_size=batch_size, max_batches=max_batches, overwrite=overwrite)
    for warning in report.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console = _console()
    console.print(f"wrote {report['out']} (routing averaged over {report['routing']['segments']} segments of "
                  f"{report['routing']['source']})")
    if "perplexity" in report:
        from rich.table import Table

        table = Table(title=f"perplexity on {eval_data}")
        for column in ("domain", "MoE", "dense (merged)", "change"):
            table.add_column(column, justify="left" if column == "domain" else "right")
        for row in report["perplexity"]:
            change = 100 * (row["dense_ppl"] / row["moe_ppl"] - 1)
            table.add_row(row["domain"], f"{row['moe_ppl']:.2f}", f"{row['dense_ppl']:.2f}", f"{change:+.1f}%")
        console.print(table)


# ---- embedders ---------------------------------------------------------------------------
@lory.group("embedder")
def embedder_group() -> None:
    """Make embedding models for build-corpus --embedder."""


@embedder_group.command("distill")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dims", default=256, show_default=True, type=int, help="Dimensions of the token vectors (PCA).")
@click.option("--tokenizer", default=None, type=click.Path(),
              help="Index the table by this lory tokenizer's ids (BPE) instead of the source's own tokens.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def distill_cmd(source, out, dims, tokenizer, device):
    """Distil a static model (model2vec) from the sentence-transformers folder SOURCE into OUT, offline.

    OUT then works as `--embedder OUT`; with --tokenizer its table is indexed by that tokenizer's
    ids, so documents already tokenized for the shards embed without a second tokenization.
    """
    from pathlib import Path

    from lorydata.errors import LoryDataError
    from lorydata.static_embed import distill_static, distill_static_bpe

    if Path(out).exists() and any(Path(out).iterdir()):
        raise LoryDataError(f"{out} exists and is not empty")
    if tokenizer:
        folder = distill_static_bpe(source, out, tokenizer=tokenizer, dims=dims, device=device)
    else:
        folder = distill_static(source, out, dims=dims, device=device)
    _console().print(f"wrote {folder} (use it with --embedder {folder})")


if __name__ == "__main__":
    main()
