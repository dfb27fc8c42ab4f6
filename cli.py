"""The `lory` command line: thin commands that parse options and call library functions."""

from __future__ import annotations

import sys

import click

from lorydata.errors import LoryError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lory")
def lory() -> None:
    """lory: similarity-batched pre-training of fully differentiable MoE language models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lory` console script.

    User errors (`LoryError`) print one line on stderr and exit with code 2; click's own usage
    errors keep click's message and code.
    """
    try:
        code = lory.main(args=argv, prog_name="lory", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LoryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    # Without standalone mode click returns the exit code of `ctx.exit(n)` instead of exiting.
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
