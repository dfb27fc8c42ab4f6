"""Does vLLM serve an `export-dense` folder as transformers runs it? Greedy tokens must be equal.

Runs in vLLM's own environment (vLLM pins its own transformers; see README, "Serving an
export-dense model with vLLM"); it imports nothing from lory:

    python benchmarks/check_vllm.py runs/x-dense [--max-new-tokens 20] [--prompt TEXT ...]

Where vLLM is not installed it says so in one line and exits 0. Otherwise it generates greedily
with transformers (`LlamaForCausalLM`, float32) and with vLLM (`LLM`, float32, eager) from the
same token ids, prints both continuations, the largest difference between the two engines'
top-5 log-probabilities of the generated steps and between their log-probabilities of the
prompt tokens (teacher-forced), and exits 1 if any generated token differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = ("git rebase replays commits on top of", "In the beginning God created the heaven",
           "The function returns a list of")
# head sizes vLLM's CPU attention backend takes (vllm/v1/attention/backends/cpu_attn.py, 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def transformers_greedy(folder: Path, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list, list]:
    """Greedy new tokens, per-step log-probabilities and the prompt tokens' log-probabilities
    (teacher-forced: position i > 0 scored from tokens < i) of every prompt under transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, logprobs, prompt_logprobs = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, eos_token_id=None)
            tokens.append(out.sequences[0, len(prompt) :].tolist())
            logprobs.append([score[0].float().log_softmax(-1) for score in out.scores])
            forced = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
            prompt_logprobs.append([float(forced[i - 1, t]) for i, t in enumerate(prompt) if i])
    return tokens, logprobs, prompt_logprobs


def vllm_greedy(folder: Path, prompts: list[list[int]], steps: int, memory: float) -> tuple[list[list[int]], list, list]:
    """Greedy new tokens, per-step top-5 log-probabilities ({token: logprob}) and the prompt
    tokens' log-probabilities under vLLM."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # on the CPU backend gpu_memory_utilization is the share of host memory vLLM reserves
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=max(map(len, prompts)) + steps,
              gpu_memory_utilization=memory, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=steps, logprobs=5, prompt_logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outputs]
    prompt_logprobs = [[step[t].logprob for t, step in zip(p, o.prompt_logprobs, strict=True) if step]
                       for p, o in zip(prompts, outputs, strict=True)]
    return tokens, logprobs, prompt_logprobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="an `lory export-dense` folder (LlamaForCausalLM)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable; default: three built in)")
    parser.add_argument("--memory", type=float, default=0.05,
                        help="share of (GPU, or on the CPU backend host) memory vLLM may reserve")
    args = parser.parse_args(argv)
    try:
        import vllm
    except ImportError:
        print("vLLM is not installed in this environment: nothing checked (README: 'Serving an export-dense "
              "model with vLLM' sets up its own venv)")
        return 0
    from transformers import AutoTokenizer

    config = json.loads((args.folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim not in CPU_HEAD_SIZES:
        print(f"note: head size {head_dim} is not one of vLLM's CPU attention sizes {CPU_HEAD_SIZES}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in (args.prompt or PROMPTS)]
    hf_tokens, hf_logprobs, hf_forced = transformers_greedy(args.folder, prompts, args.max_new_tokens)
    vl_tokens, vl_logprobs, vl_forced = vllm_greedy(args.folder, prompts, args.max_new_tokens, args.memory)
    worst = forced = 0.0
    for prompt, ours, theirs, hf_steps, vl_steps in zip(prompts, hf_tokens, vl_tokens, hf_logprobs, vl_logprobs,
                                                       strict=True):
        for hf_step, vl_step in zip(hf_steps, vl_steps, strict=False):
            worst = max([worst, *(abs(float(hf_step[t]) - lp) for t, lp in vl_step.items())])
        print(f"{'same' if ours == theirs else 'DIFFERENT'}: {tokenizer.decode(prompt)!r} -> transformers "
              f"{tokenizer.decode(ours)!r} | vLLM {tokenizer.decode(theirs)!r}")
    for ours, theirs in zip(hf_forced, vl_forced, strict=True):
        forced = max([forced, *(abs(a - b) for a, b in zip(ours, theirs, strict=True))])
    equal = hf_tokens == vl_tokens
    print(f"vLLM {vllm.__version__}: greedy tokens {'equal' if equal else 'differ'} for {len(prompts)} prompts x "
          f"{args.max_new_tokens} tokens; top-5 log-probabilities differ by at most {worst:.2e}, the "
          f"{sum(map(len, hf_forced))} prompt tokens' log-probabilities by at most {forced:.2e}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
