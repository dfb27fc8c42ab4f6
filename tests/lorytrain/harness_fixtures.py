"""Tiny jsonl files in the documented layout of every task of the paper's suite (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

# one scored example per task, in the layout its YAML documents; demonstrations are variations
EXAMPLES = {
    "boolq": {"passage": "Git stores snapshots of files.", "question": "does git store snapshots", "label": True},
    "piqa": {"goal": "To open a jar", "sol1": "twist the lid.", "sol2": "paint the lid.", "label": 0},
    "siqa": {"context": "Ann shared her lunch.", "question": "How would others feel?", "answerA": "grateful",
             "answerB": "angry", "answerC": "bored", "label": "1"},
    "hellaswag": {"ctx": "He opens the terminal and", "endings": ["types a command.", "eats it.", "sings.", "flies."],
                  "label": "0"},
    "winogrande": {"sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup",
                   "option2": "the table", "answer": "2"},
    "race_m": {"article": "Tom has a dog. It is brown.", "question": "What colour is the dog?",
               "options": ["brown", "black", "white", "red"], "answer": "A"},
    "race_h": {"article": "The commit was reverted on Monday.", "question": "When was it reverted?",
               "options": ["Sunday", "Monday", "Friday", "never"], "answer": "B"},
    "arc_e": {"question": "Which is a liquid?", "choices": {"text": ["ice", "water", "stone"], "label": ["A", "B", "C"]},
              "answerKey": "B"},
    "arc_c": {"question": "What pulls objects to Earth?",
              "choices": {"text": ["gravity", "light", "sound", "heat"], "label": ["1", "2", "3", "4"]},
              "answerKey": "1"},
    "nq": {"question": "who wrote the book of genesis", "answer": ["Moses", "moses"]},
    "triviaqa": {"question": "Which command records changes in git",
                 "answer": {"value": "commit", "aliases": ["commit", "git commit"]}},
    "agnews": {"text": "The team won the cup final on Sunday.", "label": 1},
    "amazon": {"title": "Great", "content": "Works as described.", "label": 1},
    "sst2": {"sentence": "a gripping, funny film", "label": 1},
    "yelp": {"text": "Cold food and rude staff.", "label": 0},
    "fever": {"claim": "Git was created by Linus Torvalds.", "label": "SUPPORTS"},
    "mrpc": {"sentence1": "He left early.", "sentence2": "He departed early.", "label": 1},
}


def demonstrations(name: str, count: int = 16) -> list[dict]:
    """`count` training examples of a task (the test example with varied label fields)."""
    out = []
    for i in range(count):
        doc = dict(EXAMPLES[name])
        if "label" in doc and isinstance(doc["label"], int) and not isinstance(doc["label"], bool):
            doc["label"] = i % (4 if name == "agnews" else 2)
        if name == "fever":
            doc["label"] = ("SUPPORTS", "REFUTES")[i % 2]
        out.append(doc)
    return out


def write_task(data_dir: Path, name: str, test_docs: list[dict] | None = None, train: bool = True) -> Path:
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    docs = test_docs if test_docs is not None else [EXAMPLES[name]]
    (folder / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    if train:
        (folder / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demonstrations(name)))
    return folder


def write_suite(data_dir: Path, names=None) -> Path:
    for name in names or EXAMPLES:
        write_task(data_dir, name)
    return data_dir
