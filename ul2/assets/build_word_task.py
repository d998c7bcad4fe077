"""Builds the supervised task `local_word`: ``word_train.jsonl``, ``word_validation.jsonl``.

The task: restore the common word removed from a passage of the corpus, e.g.

    {"inputs": "The film had first screened ____ the same location in 1998.",
     "targets": "at"}

where the removed word is one of ``WORDS``, the eight most frequent words of
``train.txt`` (as written: "The" and "the" are both "the"'s). Made from the bundled
corpus only, with no download: a passage is a line's first ``MAX_WORDS`` words; one
of the ``WORDS`` it holds is chosen uniformly, then one of its places, and replaced
by ``BLANK`` (seeded: the build is deterministic). Validation examples come from
``validation.txt`` (every line that holds one of the words: text pre-training never
saw); training examples are ``TRAIN_EXAMPLES`` of the lines of ``train.txt``, drawn
at random: a few labels, as downstream tasks have.

Why this task: which of eight function words fits a gap is syntax, which a model
pre-trained on the corpus has learnt from millions of tokens and one trained from
scratch must learn from a few hundred one-word targets; it is scored by accuracy,
and a tiny model fine-tunes on it in about a minute on 2 CPU cores. (`local_title`,
naming a paragraph's help topic, is keyword matching: a model from scratch learns it
as well as a pre-trained one at this scale.)

Usage (deterministic)::

    python -m ul2.assets.build_word_task
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

WORDS = ("the", "of", "and", "in", "to", "a", "is", "for")
MAX_WORDS = 48
BLANK = "____"
TRAIN_EXAMPLES = 500
SEED = 0
HERE = pathlib.Path(__file__).parent


def example(line: str, rng: random.Random) -> dict[str, str] | None:
  """A passage of `line` with one of `WORDS` blanked, and that word as written; None
  if the passage holds none of them."""
  words = line.split()[:MAX_WORDS]
  places: dict[str, list[int]] = {}
  for i, word in enumerate(words):
    if word.lower() in WORDS:
      places.setdefault(word.lower(), []).append(i)
  if not places:
    return None
  i = rng.choice(places[rng.choice(sorted(places))])
  target, words[i] = words[i], BLANK
  return {"inputs": " ".join(words), "targets": target}


def examples(lines: list[str], seed: int = SEED) -> list[dict[str, str]]:
  rng = random.Random(seed)
  made = (example(line, rng) for line in lines)
  return [e for e in made if e is not None]


def sample(records: list[dict[str, str]], n: int | None, seed: int = SEED
           ) -> list[dict[str, str]]:
  """`n` of `records` drawn at random, in their order (all of them for None)."""
  if n is None or n >= len(records):
    return records
  return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--corpus_dir", type=pathlib.Path, default=HERE)
  parser.add_argument("--output_dir", type=pathlib.Path, default=HERE)
  parser.add_argument("--train_examples", type=int, default=TRAIN_EXAMPLES)
  args = parser.parse_args()
  for which, name, n in (("train", "train.txt", args.train_examples),
                         ("validation", "validation.txt", None)):
    lines = (args.corpus_dir / name).read_text(encoding="utf-8").splitlines()
    records = sample(examples(lines), n)
    path = args.output_dir / f"word_{which}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    print(f"{path}: {len(records)} examples, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
