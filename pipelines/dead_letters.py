"""Dead letters: the records a step drops, one JSON object per line, counted as they go.

Every step writes its own files (`pipelines.layout.dead_letter_file`, a name prefix per step),
so no two workers ever write one file and a step added later adds its reasons by writing
files of its own.
"""

from __future__ import annotations

from lorydata.documents import DeadLetter
from pipelines import fileio
from pipelines.runner.beam import count


def drop(letter: DeadLetter, letters: list[DeadLetter]) -> None:
    """Count `letter` under `dropped.<reason>` and keep it for the step's file."""
    count(f"dropped.{letter.reason}")
    letters.append(letter)


def write(path: str, letters: list[DeadLetter]) -> None:
    """One dead-letter file (JSON lines); nothing is written for no letters."""
    if letters:
        fileio.write_bytes(path, "".join(letter.to_json() + "\n" for letter in letters).encode())
