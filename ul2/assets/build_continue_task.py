"""Builds the supervised task `local_continue`: ``continue_train.jsonl``, ``continue_validation.jsonl``.

The task: continue a passage of the bundled corpus with its next ``TARGET_WORDS``
words, e.g.

    {"inputs": "Actresses (Catalan: Actrius) is a 1997 Catalan language Spanish drama
      film [...] by Josep Maria Benet i Jornet. The film has no",
     "targets": "male actors, with all roles played by females. The film was produced"}

Made from the bundled corpus only, with no download: each line of ``train.txt``
with enough words gives one training example and each line of ``validation.txt``
one validation example (so no validation passage is in the pre-training text). The
cut is drawn at random (seeded: the build is deterministic) between
``MIN_PREFIX`` and ``MAX_PREFIX`` words in; the passage is the line up to the cut
and the target the next ``TARGET_WORDS`` words, as written.

Why this task: it is what UL2's S-denoiser trains (prefix language modelling, mode
token ``[S2S]``: UL2's mode switching), scored by ROUGE as T5 scores generation.
A model pre-trained on ``train.txt`` writes English from the first fine-tuning
steps; one trained from scratch on a few thousand targets writes function words
and commas.

Usage (deterministic)::

    python -m ul2.assets.build_continue_task
"""

from __future__ import annotations

import random

from ul2.assets import line_tasks

MIN_PREFIX = 8
MAX_PREFIX = 48
TARGET_WORDS = 12
SEED = 0


def example(line: str, rng: random.Random) -> dict[str, str] | None:
  """A passage cut from `line` and its next TARGET_WORDS words; None if too short."""
  words = line.split()
  if len(words) < MIN_PREFIX + TARGET_WORDS:
    return None
  cut = rng.randint(MIN_PREFIX, min(MAX_PREFIX, len(words) - TARGET_WORDS))
  return {"inputs": " ".join(words[:cut]),
          "targets": " ".join(words[cut:cut + TARGET_WORDS])}


def examples(lines: list[str], seed: int = SEED) -> list[dict[str, str]]:
  rng = random.Random(seed)
  made = (example(line, rng) for line in lines if line.strip())
  return [e for e in made if e is not None]


def main() -> None:
  line_tasks.main(__doc__.split("\n\n")[0], "continue", examples)


if __name__ == "__main__":
  main()
