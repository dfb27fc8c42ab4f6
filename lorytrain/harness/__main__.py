"""`python -m lorytrain.harness ARGS…`: lm-eval's own command line with the `lory` model registered,
e.g. `python -m lorytrain.harness run --model lory --model_args run=runs/x --tasks hellaswag`."""

from lm_eval.__main__ import cli_evaluate

import lorytrain.harness.lm  # noqa: F401  (registers the `lory` model)

if __name__ == "__main__":
    cli_evaluate()
