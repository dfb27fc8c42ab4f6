"""Dead letters: the records a step drops, one JSON object per line, counted as they go.

Every step writes its own files (`pipelines.layout.dead_letter_file`, a name prefix per step),
so no two workers ever write one file and a step added later adds its reasons by writing
files of its own. They are committed with the partition that dropped them.
"""

from __future__ import annotations

from lorydata.documents import DeadLetter
from pipelines import fileio
from pipelines.commits import Commit


def drop(letter: DeadLetter, letters: list[DeadLetter], out: Commit) -> None:
    """Count `letter` under `dropped.<reason>` and keep it for the step's file."""
    out.count(f"dropped.{letter.reason}")
    letters.append(letter)


def encode(letters: list[DeadLetter]) -> bytes:
    return "".join(letter.to_json() + "\n" for letter in letters).encode()


def write(out: Commit | None, path: str, letters: list[DeadLetter]) -> None:
    """One dead-letter file (JSON lines), committed with the partition (`out`; None: a file
    the driver writes); nothing for no letters."""
    if letters and out is not None:
        out.write_bytes(path, encode(letters))
    elif letters:
        fileio.write_bytes(path, encode(letters))
