"""Builds the supervised task `local_word`: ``word_train.jsonl``, ``word_validation.jsonl``.

The task: restore the word removed from a passage of Python's documentation, e.g.

    {"inputs": "Assignment statements are used to (re)bind ____ to values and to
      modify attributes or items of mutable objects:",
     "targets": "names"}

Made from the bundled corpus only, with no download: each line of ``train.txt``
gives one training example and each line of ``validation.txt`` one validation
example (so no validation passage is in the pre-training text). A passage is the
line's first ``MAX_WORDS`` words; one of its words made only of letters (at least
``MIN_LETTERS``) is chosen at random (seeded: the build is deterministic) and
replaced by ``BLANK``; the target is the word as it was written.

Why this task: it needs knowledge of the language (which word fits here), which a
model pre-trained on ``train.txt`` brings and one trained from scratch must learn
from a few thousand one-word targets; it is scored by exact-match accuracy, and a
tiny model fine-tunes on it in about a minute on 2 CPU cores. Measured (README,
"Warm start and fine-tuning"): from the Quickstart's checkpoint the validation loss
is 0.56 nats below the best run from scratch, but the accuracy is not yet above the
answer "the" for either.

Usage (deterministic)::

    python -m ul2.assets.build_word_task
"""

from __future__ import annotations

import random
import re

from ul2.assets import line_tasks

MAX_WORDS = 48
MIN_LETTERS = 3
BLANK = "____"
SEED = 0
WORD = re.compile(r"[A-Za-z]+")


def example(line: str, rng: random.Random) -> dict[str, str] | None:
  """A passage of `line` with one word blanked, and that word; None if it has none."""
  words = line.split()[:MAX_WORDS]
  candidates = [i for i, w in enumerate(words)
                if len(w) >= MIN_LETTERS and WORD.fullmatch(w)]
  if not candidates:
    return None
  i = rng.choice(candidates)
  target, words[i] = words[i], BLANK
  return {"inputs": " ".join(words), "targets": target}


def examples(lines: list[str], seed: int = SEED) -> list[dict[str, str]]:
  rng = random.Random(seed)
  made = (example(line, rng) for line in lines if line.strip())
  return [e for e in made if e is not None]


def main() -> None:
  line_tasks.main(__doc__.split("\n\n")[0], "word", examples)


if __name__ == "__main__":
  main()
