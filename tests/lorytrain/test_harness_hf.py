"""One scoring rule everywhere: lm-eval's own `--model hf` on an `export-hf` folder scores what
`--model lory` scores on the model itself (default routing on both sides)."""

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from lorydata.tokenizer import Tokenizer
from lorytrain.export.hf import export_hf
from lorytrain.harness.lm import LoryHarnessLM
from lorytrain.harness.suite import TASKS_DIR
from lorytrain.model import LoryLM, ModelConfig
from tests.lorytrain.harness_fixtures import write_task

MAX_LENGTH = 48
KINDS = {"lory": {"ffn": "lory"}, "prefix": {"ffn": "prefix"},
         "expert-choice-segment": {"ffn": "expert-choice", "ec_level": "segment"}}
TEXT = ("git rebase replays commits on top of another base tip. It rewrites history, so never rebase "
        "commits that others have pulled; use git merge for shared branches instead.")
PAIRS = [("git rebase replays", " commits on top of another base"),  # crosses the 8-token segments
         ("git rebase replays", " commits"), ("git rebase replays", " history"),  # shared context, as in MC tasks
         (TEXT[:150], " git merge"), ("It", " rewrites history, so never rebase commits that others have pulled"),
         ("", "git")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def sharp_model(tok, kind):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, segment_len=8,
                         n_experts=4, **KINDS[kind])
    model = LoryLM(config).eval()
    with torch.no_grad():  # sharp routers: any difference in what routing sees shows in the scores
        for block in model.layers:
            block.ffn.routing.router.weight.mul_(40)
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, tok, tmp_path_factory):
    """(lory backend, lm-eval's HF backend on the export) of one tiny MoE."""
    model = sharp_model(tok, request.param)
    folder = export_hf(model, tmp_path_factory.mktemp("hf") / "model", tok.path, max_length=MAX_LENGTH)
    lory = LoryHarnessLM(model=model, tokenizer=tok, batch_size=4, max_length=MAX_LENGTH)
    hf = HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=3)
    return lory, hf


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_model_hf_loglikelihoods_equal_model_lory(pair):
    lory, hf = pair
    assert hf.max_length == lory.max_length == MAX_LENGTH
    ours, theirs = (lm.loglikelihood(requests("loglikelihood", PAIRS)) for lm in (lory, hf))
    for (mine, greedy_mine), (other, greedy_other) in zip(ours, theirs, strict=True):
        assert abs(mine - other) <= 1e-4
        assert greedy_mine == greedy_other


def test_model_hf_rolling_loglikelihood_equals_model_lory(pair):
    lory, hf = pair
    texts = [(TEXT,), (TEXT * 3,)]  # the second one spans several windows of MAX_LENGTH
    ours, theirs = (lm.loglikelihood_rolling(requests("loglikelihood_rolling", texts)) for lm in (lory, hf))
    assert ours == pytest.approx(theirs, abs=1e-3)  # sums over hundreds of tokens


def test_model_hf_generation_equals_model_lory(pair):
    lory, hf = pair
    args = [("git rebase", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
            ("In the beginning God created", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})]
    assert lory.generate_until(requests("generate_until", args)) == hf.generate_until(requests("generate_until", args))


def test_the_paper_prompt_rule_is_what_model_hf_cannot_reproduce(tok, pair):
    """The check above is sensitive: routing on the context only (lory's routing=prompt) changes
    the scores, and `--model hf` has no way to know where a context ends."""
    lory, hf = pair
    prompt_rule = LoryHarnessLM(model=lory.model, tokenizer=tok, routing="prompt", max_length=MAX_LENGTH)
    ours, theirs = (lm.loglikelihood(requests("loglikelihood", PAIRS)) for lm in (prompt_rule, hf))
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True)) > 1e-3


def test_simple_evaluate_gives_both_backends_the_same_metrics(pair, tmp_path):
    lory, hf = pair
    piqa = [{"goal": f"To fix commit {i}", "sol1": "use git commit --amend.", "sol2": "delete the repository.",
             "label": i % 2} for i in range(4)]
    write_task(tmp_path, "piqa", piqa, train=False)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(tmp_path)})
    results = [simple_evaluate(model=lm, tasks=["lory_piqa"], task_manager=manager, bootstrap_iters=0,
                               log_samples=True)
               for lm in (lory, hf)]
    # every choice's log-likelihood, sample by sample
    scores = [[float(resp[0][0]) for sample in out["samples"]["lory_piqa"] for resp in sample["resps"]]
              for out in results]
    assert len(scores[0]) == 2 * len(piqa)
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert results[0]["results"]["lory_piqa"][metric] == results[1]["results"]["lory_piqa"][metric]


@pytest.mark.slow
def test_lm_eval_command_line_on_the_export_scores_as_model_lory(tok, tmp_path):
    """lm-eval's own command line, nothing of lory in between: `lm_eval run --model hf
    --include_path lorytrain/harness/tasks --metadata '{"data_dir": …}'` on an export-hf folder."""
    import json
    import os
    import subprocess
    import sys

    model = sharp_model(tok, "lory")
    folder = export_hf(model, tmp_path / "hf", tok.path, max_length=MAX_LENGTH)
    piqa = [{"goal": f"To undo commit {i}", "sol1": "git revert it.", "sol2": "unplug the disk.", "label": i % 2}
            for i in range(3)]
    write_task(tmp_path / "data", "piqa", piqa, train=False)
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={folder},trust_remote_code=True", "--include_path", str(TASKS_DIR),
               "--tasks", "lory_piqa", "--metadata", json.dumps({"data_dir": str(tmp_path / "data")}),
               "--device", "cpu", "--batch_size", "2", "--log_samples", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (samples,) = (tmp_path / "out").rglob("samples_lory_piqa_*.jsonl")
    theirs = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        theirs[sample["doc_id"]] = [float(resp[0][0]) for resp in sample["resps"]]
    lory = LoryHarnessLM(model=model, tokenizer=tok, max_length=MAX_LENGTH)
    for doc_id, doc in enumerate(piqa):
        context = f"Question: {doc['goal']}\nAnswer:"
        ours = lory.loglikelihood(requests("loglikelihood", [(context, " " + doc["sol1"]), (context, " " + doc["sol2"])]))
        assert [score for score, _ in ours] == pytest.approx(theirs[doc_id], abs=1e-4)
