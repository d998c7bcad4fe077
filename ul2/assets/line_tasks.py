"""The shared part of the scripts that build a supervised task from the corpus's lines
(`build_word_task.py`, `build_continue_task.py`): each line of ``train.txt`` gives
training examples and each line of ``validation.txt`` validation ones, written as
``<stem>_train.jsonl`` and ``<stem>_validation.jsonl`` (one JSON object a line)."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Callable

HERE = pathlib.Path(__file__).parent
SPLITS = (("train", "train.txt"), ("validation", "validation.txt"))


def main(description: str, stem: str,
         examples: Callable[[list[str]], list[dict[str, str]]]) -> None:
  """The command line of a builder: `examples(lines)` for each split's lines."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--corpus_dir", type=pathlib.Path, default=HERE)
  parser.add_argument("--output_dir", type=pathlib.Path, default=HERE)
  args = parser.parse_args()
  for which, name in SPLITS:
    lines = (args.corpus_dir / name).read_text(encoding="utf-8").splitlines()
    records = examples(lines)
    path = args.output_dir / f"{stem}_{which}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    print(f"{path}: {len(records)} examples, {path.stat().st_size / 1e6:.2f} MB")
