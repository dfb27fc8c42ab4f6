"""The lm-eval backend against direct forward computations, and the suite end to end offline."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from lorydata.manifest import Manifest
from lorydata.pack import PackedSequence, PackStats
from lorydata.shards import ShuffledShardWriter
from lorydata.tokenizer import Tokenizer
from lorytrain.errors import LoryTrainError
from lorytrain.evaluation import evaluate
from lorytrain.generation import SamplingConfig, generate, generate_text
from lorytrain.harness.lm import LoryHarnessLM, cut_at_stop
from lorytrain.harness.suite import PAPER_SUITE, TASKS_DIR, check_data, load_spec, run_suite, task_manager
from lorytrain.harness.tasks.lory_tasks import macro_f1
from lorytrain.model import LoryLM, ModelConfig
from tests.lorytrain.harness_fixtures import EXAMPLES, write_suite, write_task

TEXT = ("git rebase replays commits on top of another base tip. It rewrites history, so never rebase "
        "commits that others have pulled; use git merge for shared branches instead.")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, segment_len=8,
                         ffn="lory", n_experts=4)
    model = LoryLM(config).eval()
    with torch.no_grad():  # sharp routers, so that what routing sees changes the logits
        for block in model.layers:
            block.ffn.routing.router.weight.mul_(40)
    return model


def lm_for(model, tok, **kwargs):
    return LoryHarnessLM(model=model, tokenizer=tok, **kwargs)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("routing", ["causal", "prompt", "segment"])
def test_loglikelihood_equals_a_direct_forward(model, tok, routing):
    pairs = [("git rebase replays", " commits on top of another base"), (TEXT[:120], " git merge"),
             ("It", " rewrites history, so never rebase commits that others have pulled"), ("", "git")]
    lm = lm_for(model, tok, routing=routing, batch_size=2)
    scores = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, scores, strict=True):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [tok.eos_id], tok.encode(continuation)
        ids = torch.tensor([ctx + cont])[:, :-1]
        # the paper's rules route on the context only; the causal rule needs no boundary
        lens = None if routing == "causal" else torch.tensor([len(ctx)])
        with torch.no_grad():
            logits = model(ids, routing=routing, prompt_lens=lens)
        logp = F.log_softmax(logits[0, len(ctx) - 1 :].double(), -1)
        target = torch.tensor(cont)
        assert logprob == pytest.approx(float(logp.gather(1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())
    # the routing mode matters for these sharp routers, so every mode is really exercised
    for other_routing in {"causal", "prompt", "segment"} - {routing}:
        other = lm_for(model, tok, routing=other_routing)
        assert other.loglikelihood(requests("loglikelihood", pairs[:1]))[0][0] != pytest.approx(scores[0][0], abs=1e-6)


def test_causal_scores_ignore_what_follows_the_continuation(model, tok):
    """Under the default rule a continuation's score depends on nothing after it: scoring a longer
    continuation gives its first tokens the same log-probabilities (what lm-eval's logits cache
    for `--model hf` assumes)."""
    lm = lm_for(model, tok)
    context = tok.encode("git rebase")
    longer = tok.encode(" replays commits on top of another base tip")
    for cut in (1, 3, 6):
        (short,), (whole,) = (lm._loglikelihood_tokens([(("", ""), context, longer[:n])]) for n in (cut, len(longer)))
        with torch.no_grad():
            logits = model(torch.tensor([context + longer])[:, :-1], routing="causal")
        logp = F.log_softmax(logits[0, len(context) - 1 :].double(), -1)
        expected = float(logp[:cut].gather(1, torch.tensor(longer[:cut])[:, None]).sum())
        assert short[0] == pytest.approx(expected, abs=1e-4)
        assert whole[0] < short[0]


def test_greedy_continuation_is_reported_as_greedy(model, tok):
    lm = lm_for(model, tok)
    context = tok.encode("git rebase")
    (continuation,) = generate(model, [context], SamplingConfig(max_new_tokens=5, temperature=0))
    altered = [*continuation[:-1], (continuation[-1] + 1) % tok.vocab_size]
    scores = lm._loglikelihood_tokens([(("", ""), context, continuation), (("", ""), context, altered)])
    assert [greedy for _, greedy in scores] == [True, False]


def write_one_sequence(folder, tok, tokens):
    """A shard folder holding the single sequence EOS + tokens (what `lory eval` scores)."""
    seq = np.array([tok.eos_id, *tokens], dtype=np.int32)
    writer = ShuffledShardWriter(folder, len(seq), 4, seed=0)
    writer.add_all([PackedSequence(seq, [0], ["git"], 0)])
    Manifest(seq_len=len(seq), tokenizer=tok.identity().to_dict(), shards=writer.finish(),
             counts=PackStats().to_dict(), order={"method": "given", "seed": 0, "metrics": {}}).write(folder)
    return folder


def test_rolling_loglikelihood_matches_lory_eval_on_one_full_sequence(model, tok, tmp_path):
    tokens = tok.encode(TEXT)
    assert len(tokens) > model.config.segment_len  # segment 0 is full in both passes
    folder = write_one_sequence(tmp_path / "one", tok, tokens)
    report = evaluate(model, folder, batch_size=1)
    assert report["overall"]["tokens"] == len(tokens)
    # the paper's rules score perplexity exactly as training and `lory eval` do
    lm = lm_for(model, tok, max_length=len(tokens) + 1, routing="segment")
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT,)]))
    assert rolling == pytest.approx(-report["overall"]["loss"] * len(tokens), rel=1e-5)
    # the causal rule differs only in how segment 0 routes
    (causal,) = lm_for(model, tok, max_length=len(tokens) + 1).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(TEXT,)]))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([[tok.eos_id, *tokens[:-1]]]), routing="causal")[0].double(), -1)
    assert causal == pytest.approx(float(logp.gather(1, torch.tensor(tokens)[:, None]).sum()), rel=1e-5)
    assert causal != pytest.approx(rolling, rel=1e-6)


def test_rolling_loglikelihood_sums_windows_of_the_training_length(model, tok):
    tokens = tok.encode(TEXT)
    window = 16
    lm = lm_for(model, tok, max_length=window, batch_size=3)
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT,)]))
    # direct: every token predicted once, each window's tokens from up to `window` tokens before them
    stream = [tok.eos_id, *tokens]
    expected, predicted = 0.0, 0
    while predicted < len(tokens):
        count = min(window, len(tokens) - predicted)
        end = predicted + count  # predict tokens[predicted:end] from the `window` stream tokens before each
        inputs = stream[max(0, end - window) : end]
        ids = torch.tensor([inputs])
        with torch.no_grad():
            logp = F.log_softmax(model(ids, routing="causal")[0].double(), -1)[-count:]
        targets = torch.tensor(tokens[predicted:end])
        expected += float(logp.gather(1, targets[:, None]).sum())
        predicted = end
    assert rolling == pytest.approx(expected, rel=1e-5)


def test_generate_until_honours_stop_strings(model, tok):
    lm = lm_for(model, tok, batch_size=2)
    contexts = ["git rebase", "In the beginning"]
    free = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 16}) for c in contexts]))
    expected = generate_text(model, tok, contexts, SamplingConfig(max_new_tokens=16, temperature=0), routing="causal")
    assert free == expected
    stops = [text[3:6] for text in free]
    assert all(stops)
    cut = lm.generate_until(requests("generate_until", [(c, {"until": [s, "never-there"], "max_gen_toks": 16})
                                                         for c, s in zip(contexts, stops, strict=True)]))
    for text, stop, result in zip(free, stops, cut, strict=True):
        assert result == text[: text.find(stop)]
        assert stop not in result


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("a, b. c", [".", ","]) == "a"
    assert cut_at_stop("abc", []) == "abc"


def test_macro_f1_averages_classes():
    assert macro_f1([(0, 0), (1, 1), (1, 0), (2, 2)]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_every_shipped_task_renders_its_documented_layout(tmp_path):
    write_suite(tmp_path)
    manager = task_manager(tmp_path)  # what `lm_eval --include_path ... --metadata` builds
    for name in PAPER_SUITE:
        spec = load_spec(name)
        task = manager.load([spec.task])["tasks"][spec.task]
        assert task.config.num_fewshot == spec.shots
        doc = task.test_docs()[0]
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        assert text != "" and target not in ("", None), name
        if name == "winogrande":  # partial scoring: the gold index picks the context, the target is shared
            assert text == 1 and task.doc_to_choice(doc)[text].endswith("the table"), text
            assert target == "was slippery."
        elif task.config.output_type == "multiple_choice":
            choices = task.doc_to_choice(doc)
            assert isinstance(target, int) and 0 <= target < len(choices), name
        else:
            assert isinstance(target, list) and target, name


@pytest.mark.slow  # indexing lm-eval's ~15k built-in tasks takes seconds
def test_task_names_never_collide_with_lm_evals_own():
    from lm_eval.tasks import TaskManager

    builtin = set(TaskManager().all_tasks)
    ours = {load_spec(name).task for name in PAPER_SUITE}
    assert ours == {f"lory_{name}" for name in PAPER_SUITE}
    assert not ours & builtin
    assert {"hellaswag", "piqa", "boolq"} <= builtin  # the bare names are lm-eval's (hub) tasks


def test_missing_files_are_named(tmp_path):
    spec = load_spec("sst2")
    with pytest.raises(LoryTrainError, match=r"test\.jsonl not found"):
        check_data(spec, tmp_path)
    write_task(tmp_path, "sst2", train=False)
    with pytest.raises(LoryTrainError, match="16 demonstrations"):
        check_data(spec, tmp_path)
    check_data(spec, tmp_path, num_fewshot=0)
    with pytest.raises(LoryTrainError, match="unknown task"):
        load_spec("mmlu")


def test_plain_lm_eval_loads_the_bundled_tasks_and_names_what_is_missing(model, tok, tmp_path):
    """No lory code between lm-eval and the YAMLs: `TaskManager(include_path=...)` + `--metadata`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir = str(TASKS_DIR)
    piqa = [{"goal": f"To fix commit {i}", "sol1": "use git commit --amend.", "sol2": "delete the repository.",
             "label": i % 2} for i in range(4)]
    write_task(tmp_path, "piqa", piqa, train=False)
    write_task(tmp_path, "sst2", [{"sentence": "a gripping film", "label": 1}])
    lm = lm_for(model, tok, batch_size=4, max_length=256)
    manager = TaskManager(include_path=tasks_dir, metadata={"data_dir": str(tmp_path)})
    output = simple_evaluate(model=lm, tasks=["lory_piqa", "lory_sst2"], task_manager=manager, bootstrap_iters=0)
    assert output["n-samples"]["lory_piqa"]["effective"] == 4
    assert output["n-shot"]["lory_sst2"] == 16
    assert {"acc,none", "acc_norm,none"} <= set(output["results"]["lory_piqa"])
    assert "f1,none" in output["results"]["lory_sst2"]
    # without the data folder, or without demonstrations, one message says what to pass
    with pytest.raises(ValueError, match="data_dir"):
        TaskManager(include_path=tasks_dir, include_defaults=False).load(["lory_piqa"])
    write_task(tmp_path, "sst2", train=False)
    (tmp_path / "sst2" / "train.jsonl").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="16 demonstrations"):
        task_manager(tmp_path).load(["lory_sst2"])


def test_three_kinds_of_task_end_to_end_through_simple_evaluate(model, tok, tmp_path):
    piqa = [{"goal": f"To fix commit {i}", "sol1": "use git commit --amend.", "sol2": "delete the repository.",
             "label": i % 2} for i in range(6)]
    write_task(tmp_path, "piqa", piqa, train=False)
    write_task(tmp_path, "nq", [EXAMPLES["nq"], {"question": "what does git rebase replay", "answer": ["commits"]}])
    write_task(tmp_path, "sst2", [{"sentence": s, "label": y} for s, y in
                                  [("a gripping film", 1), ("dull and slow", 0), ("great fun", 1)]])
    lm = lm_for(model, tok, batch_size=4, max_length=256)
    result = run_suite(lm, ["piqa", "nq", "sst2"], tmp_path)
    tasks = result["tasks"]
    assert [tasks[n]["samples"] for n in ("piqa", "nq", "sst2")] == [6, 2, 3]
    assert [tasks[n]["shots"] for n in ("piqa", "nq", "sst2")] == [0, 5, 16]
    assert set(tasks["sst2"]["metrics"]) >= {"acc", "f1"} and set(tasks["piqa"]["metrics"]) >= {"acc", "acc_norm"}
    # piqa (0-shot) by hand: the choice with the higher length-normalised log-likelihood wins
    correct = 0
    for doc in piqa:
        context = f"Question: {doc['goal']}\nAnswer:"
        scores = lm.loglikelihood(requests("loglikelihood", [(context, " " + doc["sol1"]), (context, " " + doc["sol2"])]))
        normed = [s / len(" " + doc[k]) for (s, _), k in zip(scores, ("sol1", "sol2"), strict=True)]
        correct += int(np.argmax(normed) == doc["label"])
    assert tasks["piqa"]["value"] == pytest.approx(correct / len(piqa))
    # nq: exact match of the greedy answer, cut at the first stop string
    assert tasks["nq"]["value"] in (0.0, 0.5, 1.0)
    assert result["groups"]["commonsense"] == tasks["piqa"]["value"]
    assert result["average"] == pytest.approx(sum(t["value"] for t in tasks.values()) / 3)
    assert math.isfinite(tasks["sst2"]["value"])
    json.dumps(result)  # the report is plain JSON


def test_harness_command_line_adds_the_tasks_and_warns_about_bare_names(capsys):
    from lorytrain.harness.__main__ import prepare

    argv = prepare(["run", "--model", "lory", "--tasks", "hellaswag,lory_piqa"])
    assert argv[-2:] == ["--include_path", str(TASKS_DIR)]
    assert "lory's local task is 'lory_hellaswag'" in capsys.readouterr().err
    assert prepare(["run", "--tasks=lory_piqa", "--include_path", "mine"]).count("--include_path") == 1
    assert capsys.readouterr().err == ""
