"""benchmarks/rank_word.py's candidate builder and scoring (pure; no model)."""

import collections
import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "rank_word.py"
_SPEC = importlib.util.spec_from_file_location("rank_word", _PATH)
rank_word = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rank_word)

# A skewed answer distribution: "the" 80%, "of" 10%, then five words 2% each.
ANSWERS = ["the"] * 80 + ["of"] * 10 + [w for w in "abcde" for _ in range(2)]


def test_candidates_seeded_true_word_once_distractors_from_distribution():
  truths = ["the", "of", "zebra", "a"] * 250
  sets = rank_word.build_candidates(ANSWERS, truths, k=3, seed=0)
  assert sets == rank_word.build_candidates(ANSWERS, truths, k=3, seed=0)
  assert sets != rank_word.build_candidates(ANSWERS, truths, k=3, seed=1)
  distractors = collections.Counter()
  for truth, (candidates, at) in zip(truths, sets):
    assert len(candidates) == 3 and len(set(candidates)) == 3
    assert candidates[at] == truth and candidates.count(truth) == 1
    others = candidates[:at] + candidates[at + 1:]
    assert set(others) <= set(ANSWERS)
    if truth == "zebra":  # Not an answer: distractors follow the full distribution.
      distractors.update(others)
  # Two draws without replacement from {the .8, of .1, 5 x .02}: P(the) ~ .98,
  # P(of) ~ .51 of 250 sets; a rare word ~ .1.
  assert distractors["the"] > 235 and 110 < distractors["of"] < 180
  assert all(distractors[w] < 45 for w in "abcde")
  assert collections.Counter(at for _, at in sets).keys() == {0, 1, 2}


def test_prior_and_rank_accuracy():
  sets = [(["the", "b"], 0), (["a", "b"], 1), (["zebra", "of"], 0)]
  # Frequencies pick "the" (right), tie a/b (half), "of" (wrong).
  assert rank_word.prior_accuracy(ANSWERS, sets) == pytest.approx(50.0)
  scores = [-1.0, -2.0, -3.0, -3.0, -0.5, -4.0]  # right, a tie (wrong), right
  assert rank_word.rank_accuracy(scores, sets) == pytest.approx(200 / 3)
  with pytest.raises(ValueError, match="K=9"):
    rank_word.build_candidates(ANSWERS, ["x"], k=9)
