"""Builds the supervised task `local_title`: ``title_train.jsonl``, ``title_validation.jsonl``.

The task: given a paragraph of Python's documentation from the bundled corpus, name
the help topic (article) it comes from, by its title, e.g.

    {"inputs": "Assignment statements are used to (re)bind names to values and to
      modify attributes or items of mutable objects: ...",
     "targets": "Assignment statements"}

Made from the bundled corpus only, with no download: the paragraphs are the lines
of ``train.txt`` and ``validation.txt``, and their titles come from the help topics
they were built from (``pydoc_data.topics`` of the running Python, which
``build_corpus.py`` read; each topic's first line is its title). Topics with fewer
than ``MIN_PARAGRAPHS`` paragraphs are left out. Within each title every ``VALIDATION_EVERY``-th
paragraph goes to validation, so every validation title is also a training one.

Why this task: a 2+2-layer, d_model 64 model learns it on 2 CPU cores in minutes
(many paragraphs name their topic's keywords), the answer is a short title scored
by accuracy, and knowing the corpus's language (pre-training on ``train.txt``,
which holds most of these paragraphs without their titles) should help.

Usage (deterministic; Python 3.11, whose help topics built the corpus)::

    python -m ul2.assets.build_title_task
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

from ul2.assets import build_corpus

MIN_PARAGRAPHS = 5
VALIDATION_EVERY = 5
HERE = pathlib.Path(__file__).parent


def titled_lines(corpus_lines: list[str]) -> dict[str, list[str]]:
  """Title -> the corpus lines of that help topic, in corpus order.

  A paragraph in several topics was kept once by build_corpus.py, in the first
  topic (by topic name); it is that topic's here too.
  """
  title_of: dict[str, str] = {}
  for title, paragraphs in build_corpus.pydoc_topics():
    for line in (l for para in paragraphs for l in build_corpus.split_long(para)):
      title_of.setdefault(line, title)
  by_title: dict[str, list[str]] = collections.defaultdict(list)
  for line in corpus_lines:
    if line in title_of:
      by_title[title_of[line]].append(line)
  return {t: lines for t, lines in by_title.items() if len(lines) >= MIN_PARAGRAPHS}


def split(by_title: dict[str, list[str]]) -> dict[str, list[dict[str, str]]]:
  out = {"train": [], "validation": []}
  for title in sorted(by_title):
    for i, line in enumerate(by_title[title]):
      which = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
      out[which].append({"inputs": line, "targets": title})
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus_dir", type=pathlib.Path, default=HERE)
  parser.add_argument("--output_dir", type=pathlib.Path, default=HERE)
  args = parser.parse_args()
  lines = []
  for name in ("train.txt", "validation.txt"):
    lines += (args.corpus_dir / name).read_text(encoding="utf-8").splitlines()
  by_title = titled_lines(lines)
  for which, records in split(by_title).items():
    path = args.output_dir / f"title_{which}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    print(f"{path}: {len(records)} examples of {len({r['targets'] for r in records})} "
          f"titles, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
