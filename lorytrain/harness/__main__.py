"""`python -m lorytrain.harness ARGS…`: lm-eval's own command line with the `lory` model registered
and the bundled tasks on the include path, e.g.
`python -m lorytrain.harness run --model lory --model_args run=runs/x --tasks lory_hellaswag
--metadata '{"data_dir": "evaldata"}'`."""

import sys

from lm_eval.__main__ import cli_evaluate

import lorytrain.harness.lm  # noqa: F401  (registers the `lory` model)
from lorytrain.harness.suite import PAPER_SUITE, TASKS_DIR


def prepare(argv: list[str]) -> list[str]:
    """Add the bundled tasks' folder as --include_path (unless one is given) and warn about bare
    task names, which are lm-eval's own hub tasks, not lory's local ones."""
    argv = list(argv)
    names = []
    for i, arg in enumerate(argv):
        if arg == "--tasks" and i + 1 < len(argv):
            names += argv[i + 1].split(",")
        elif arg.startswith("--tasks="):
            names += arg.split("=", 1)[1].split(",")
    for name in (n.strip() for n in names):
        if name in PAPER_SUITE:
            print(f"warning: '{name}' is lm-eval's own task (downloads its data); lory's local task is "
                  f"'lory_{name}'", file=sys.stderr)
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if names and not given:
        argv += ["--include_path", str(TASKS_DIR)]
    return argv


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *prepare(sys.argv[1:])]
    cli_evaluate()
