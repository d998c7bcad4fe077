"""Writes the two `local_word` variants in the R-denoiser's format that the README's
"Does pre-training pay?" measures (neither ships: neither paid in accuracy).

Each passage (64 words of a corpus line, at most 120 tokens; train.txt for train,
validation.txt for validation) loses one word, replaced by `<extra_id_0>`; the
target is `<extra_id_0> word`, so with `[NLU]` and EOS the example is an R1 example
with one span. The answer is:

* `copy`: a word of 3+ letters, not among train.txt's 100 most frequent (lower
  case), that the passage uses again; one such occurrence at random.
* `frequent`: one of train.txt's 8 most frequent words, the word drawn uniformly
  among those in the passage, then one of its occurrences.

It writes DIR/<variant>/{train,validation}.jsonl and DIR/<variant>.gin, which
registers the task (`postprocess_fn=tasks.first_span`) over gin/runs/finetune.gin:

    python benchmarks/word_variants.py /tmp/variants
    ul2 train --gin_file=/tmp/variants/copy.gin --model_dir=runs/copy \\
        --init_from=runs/local_tiny
"""

from __future__ import annotations

import collections
import json
import pathlib
import random
import re
import sys

import sentencepiece as spm

from ul2 import assets

MAX_WORDS, MIN_WORDS, MAX_TOKENS = 64, 16, 120
MIN_LETTERS, COMMON, FREQUENT = 3, 100, 8
SENTINEL = "<extra_id_0>"
WORD = re.compile(r"[A-Za-z]+")
REPO = pathlib.Path(__file__).resolve().parent.parent
GIN = """from __gin__ import dynamic_registration
import tasks
include '{finetune}'
MIXTURE_OR_TASK_NAME = @tasks.register_supervised_task()
tasks.register_supervised_task:
  name = 'word_{variant}'
  text_glob = {{'train': '{dir}/train.jsonl', 'validation': '{dir}/validation.jsonl'}}
  mode_token = '[NLU]'
  metrics = ['accuracy']
  postprocess_fn = @tasks.first_span
"""


def passages(line: str, tokenizer: spm.SentencePieceProcessor) -> list[list[str]]:
  words, out = line.split(), []
  for start in range(0, len(words), MAX_WORDS):
    passage = words[start:start + MAX_WORDS]
    while passage and len(tokenizer.encode(" ".join(passage))) > MAX_TOKENS:
      passage = passage[:-1]
    if len(passage) >= MIN_WORDS:
      out.append(passage)
  return out


def copy_answer(common: set[str]):
  """Chooses an occurrence of a word (3+ letters, not common) the passage uses again."""
  def answer(words: list[str], rng: random.Random) -> int | None:
    found = collections.Counter(WORD.findall(" ".join(words)))
    candidates = [i for i, w in enumerate(words)
                  if len(w) >= MIN_LETTERS and WORD.fullmatch(w) and w.lower() not in common
                  and found[w] >= 2]
    return rng.choice(candidates) if candidates else None
  return answer


def frequent_answer(top: list[str]):
  """Chooses one of the `top` words in the passage uniformly, then an occurrence."""
  def answer(words: list[str], rng: random.Random) -> int | None:
    present = sorted({w for w in words if w in top}, key=top.index)
    if not present:
      return None
    word = rng.choice(present)
    return rng.choice([i for i, w in enumerate(words) if w == word])
  return answer


def main(out_dir: str) -> None:
  tokenizer = spm.SentencePieceProcessor(model_file=str(assets.VOCAB_PATH))
  lines = {"train": assets.TRAIN_TEXT.read_text(encoding="utf-8").splitlines(),
           "validation": assets.VALIDATION_TEXT.read_text(encoding="utf-8").splitlines()}
  lower = collections.Counter(w.lower() for l in lines["train"] for w in WORD.findall(l))
  words = collections.Counter(w for l in lines["train"] for w in l.split())
  variants = {"copy": copy_answer({w for w, _ in lower.most_common(COMMON)}),
              "frequent": frequent_answer([w for w, _ in words.most_common(FREQUENT)])}
  for variant, answer in variants.items():
    directory = pathlib.Path(out_dir) / variant
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_lines in lines.items():
      rng, records = random.Random(0), []
      for passage in (p for l in split_lines for p in passages(l, tokenizer)):
        i = answer(passage, rng)
        if i is not None:
          records.append({"inputs": " ".join(passage[:i] + [SENTINEL] + passage[i + 1:]),
                          "targets": f"{SENTINEL} {passage[i]}"})
      (directory / f"{split}.jsonl").write_text(
          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
      top = collections.Counter(r["targets"] for r in records).most_common(1)[0]
      print(json.dumps({"variant": variant, "split": split, "examples": len(records),
                        "commonest": top[0], "share": round(top[1] / len(records), 3)}))
    (pathlib.Path(out_dir) / f"{variant}.gin").write_text(GIN.format(
        finetune=REPO / "gin" / "runs" / "finetune.gin", variant=variant,
        dir=directory.resolve()))


if __name__ == "__main__":
  main(sys.argv[1])
