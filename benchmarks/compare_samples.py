"""Do two lm-eval runs score every choice alike? Compares `--log_samples` files request by request.

    lm_eval run --model hf --model_args pretrained=runs/x-hf,trust_remote_code=True \
        --include_path lorytrain/harness/tasks --tasks lory_piqa --metadata '{"data_dir": "runs/toy-tasks"}' \
        --log_samples --output_path runs/eval-hf
    python -m lorytrain.harness run --model lory --model_args run=runs/x --tasks lory_piqa \
        --metadata '{"data_dir": "runs/toy-tasks"}' --log_samples --output_path runs/eval-lory
    python benchmarks/compare_samples.py runs/eval-hf/*/samples_lory_piqa_*.jsonl runs/eval-lory/*/samples_lory_piqa_*.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys


def responses(path: str) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of every choice (loglikelihood tasks)."""
    out = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            sample = json.loads(line)
            out[sample["doc_id"]] = [float(resp[0][0]) for resp in sample["resps"]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    first, second = responses(args.first), responses(args.second)
    if first.keys() != second.keys():
        print(f"the files hold different documents ({len(first)} vs {len(second)})")
        return 1
    diffs = [abs(a - b) for doc in first for a, b in zip(first[doc], second[doc], strict=True)]
    picks = sum(max(range(len(first[d])), key=first[d].__getitem__) == max(range(len(second[d])), key=second[d].__getitem__)
                for d in first)
    worst = max(diffs)
    print(f"{len(first)} documents, {len(diffs)} choices: log-likelihoods differ by at most {worst:.2e} "
          f"(mean {sum(diffs) / len(diffs):.2e}); same highest-scoring choice in {picks}/{len(first)}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
