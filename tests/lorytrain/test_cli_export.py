"""`lory benchmark`, `lory export-hf` and `lory export-dense` on a tiny trained run."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import cli
from lorydata.dataset import ShardDataset
from lorytrain.evaluation import evaluate
from lorytrain.export.dense import average_routing, merge_to_dense
from lorytrain.runs import load_run
from tests.lorytrain.harness_fixtures import write_task
from tests.lorytrain.runkit import train_tiny_run


@pytest.fixture(scope="module")
def lory_run(text_shards, tmp_path_factory):
    train, _ = text_shards
    out = tmp_path_factory.mktemp("export_run") / "run"
    return train_tiny_run(train, out, ffn="lory", experts=4)


def invoke(*args):
    return CliRunner().invoke(cli.lory, [str(a) for a in args], catch_exceptions=False)


def heldout_ids(heldout, rows=2):
    return torch.stack([s["input_ids"] for _, s in zip(range(rows), ShardDataset(heldout, shuffle=False, epochs=1,
                                                                                   even=False), strict=False)])


def test_export_hf_command(lory_run, text_shards, tmp_path):
    _, heldout = text_shards
    result = invoke("export-hf", lory_run, tmp_path / "hf")
    assert result.exit_code == 0, result.output
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    run = load_run(lory_run)
    assert (hf.config.routing, hf.config.max_position_embeddings) == ("causal", run.state["seq_len"])
    assert f"step {run.state['step']}" in (tmp_path / "hf" / "README.md").read_text()
    ids = heldout_ids(heldout)
    with torch.no_grad():
        assert (run.model(ids, routing="causal") - hf(ids).logits).abs().max() <= 1e-4
    assert invoke("export-hf", lory_run, tmp_path / "paper", "--routing", "segment").exit_code == 0
    paper = AutoModelForCausalLM.from_pretrained(tmp_path / "paper", trust_remote_code=True).eval()
    with torch.no_grad():  # the paper's rule routes exactly as training and `lory eval`
        assert (run.model(ids) - paper(ids).logits).abs().max() <= 1e-4


def test_export_dense_command_reports_domain_perplexity(lory_run, text_shards, tmp_path):
    _, heldout = text_shards
    limit = ("--max-batches", 2)  # 16 held-out sequences keep it quick
    result = invoke("export-dense", lory_run, tmp_path / "git", "--routing-from", heldout, "--domain", "git",
                    "--eval-data", heldout, *limit, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert [row["domain"] for row in report["perplexity"]] == ["git", "overall"]
    # the tiny test model's heads of 16 are below what vLLM's CPU backend takes: said once
    assert result.output.count("warning: head size 16 (d_model 32 / 2 heads)") == 1
    assert "n_heads=1" in report["warnings"][0]
    run = load_run(lory_run)
    average = average_routing(run.model, heldout, domain="git", max_batches=2)
    assert report["routing"]["segments"] == average.segments
    dense = merge_to_dense(run.model, average.weights)
    git = evaluate(dense, heldout, max_batches=2)["domains"]["git"]["ppl"]
    moe = evaluate(run.model, heldout, max_batches=2)["domains"]["git"]["ppl"]
    assert report["perplexity"][0]["dense_ppl"] == pytest.approx(git, rel=1e-6)
    assert report["perplexity"][0]["moe_ppl"] == pytest.approx(moe, rel=1e-6)
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "git").eval()
    ids = heldout_ids(heldout)
    with torch.no_grad():
        assert (dense(ids) - llama(ids).logits).abs().max() <= 1e-4
    assert json.loads((tmp_path / "git" / "lory_export.json").read_text())["routing"]["source"].endswith("domain git")
    # the table form
    table = invoke("export-dense", lory_run, tmp_path / "git", "--routing-from", heldout, "--domain", "git",
                   "--eval-data", heldout, *limit, "--overwrite")
    assert table.exit_code == 0 and "dense (merged)" in table.output


@pytest.mark.slow
def test_benchmark_command_compares_two_runs(lory_run, tmp_path):
    data = tmp_path / "data"
    write_task(data, "piqa", [{"goal": f"To undo commit {i}", "sol1": "git revert it.", "sol2": "unplug it.",
                               "label": i % 2} for i in range(4)], train=False)
    write_task(data, "boolq", [{"passage": "Git is a VCS.", "question": "is git a vcs", "label": 1}], train=False)
    out = tmp_path / "bench.json"
    result = invoke("benchmark", lory_run, "--tasks", "paper", "--data-dir", data, "--compare", lory_run,
                    "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "commonsense reasoning avg" in result.output and "no local data for" in result.output
    payload = json.loads(out.read_text())
    assert set(payload["result"]["tasks"]) == {"piqa", "boolq"}
    assert "nq" in payload["skipped"]
    assert payload["change"]["tasks"] == {"piqa": 0.0, "boolq": 0.0}  # a run against itself
    assert out.with_suffix(".png").stat().st_size > 0


def test_lm_eval_builds_the_model_from_its_argument_string(lory_run):
    from lorytrain.harness.lm import LoryHarnessLM

    lm = LoryHarnessLM.create_from_arg_string(f"run={lory_run},routing=segment,dtype=float32",
                                              {"batch_size": 4, "max_batch_size": None, "device": None})
    assert (lm.routing, lm.batch_size, lm.max_length) == ("segment", 4, 64)
    assert lm.eot_token_id == lm.tokenizer.eos_id
    # batch_size in both --model_args and lm-eval's own options: the model argument wins
    lm = LoryHarnessLM.create_from_arg_string(f"run={lory_run},batch_size=2", {"batch_size": 16, "device": "cpu"})
    assert lm.batch_size == 2


@pytest.mark.parametrize("args, message", [
    (["benchmark", "{run}", "--data-dir", "{tmp}/nowhere"], "is not a folder"),
    (["benchmark", "{run}", "--tasks", "mmlu", "--data-dir", "{tmp}"], "unknown task 'mmlu'"),
    (["benchmark", "{run}", "--tasks", "piqa", "--data-dir", "{tmp}"], "no {tmp}/piqa/test.jsonl"),
    (["export-dense", "{run}", "{tmp}/d", "--routing-from", "{heldout}", "--domain", "klingon"],
     "domain 'klingon' is not in"),
    (["export-hf", "{tmp}/no-run", "{tmp}/x"], "run folder not found"),
])
def test_bad_input_is_one_line(args, message, lory_run, text_shards, tmp_path, capsys):
    fill = {"run": lory_run, "tmp": tmp_path, "heldout": text_shards[1]}
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(**fill) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message.format(**fill) in err[-1]
