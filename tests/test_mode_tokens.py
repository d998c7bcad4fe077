"""Mode tokens as data: register_ul2_task(mode_tokens="paper" | "none" | {name: token}),
checked on real examples of the bundled corpus."""

import seqio
import pytest

import tasks
from ul2 import assets, denoisers

# Inputs bind (64 < 128): the S-denoiser's window is where a mode token's room shows.
LENGTHS = {"inputs": 64, "targets": 128}
NAMES = [d.name for d in denoisers.UL2_DENOISERS]


def _vocab():
  return seqio.SentencePieceVocabulary(str(assets.VOCAB_PATH), extra_ids=assets.EXTRA_IDS)


def _piece(token):
  return _vocab().tokenizer.piece_to_id(token)


def _examples(mode_tokens, n=250):
  name = tasks.register_ul2_task("mode_test", text_glob={"validation": str(
      assets.VALIDATION_TEXT)}, mode_tokens=mode_tokens)
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(LENGTHS, split="validation", shuffle=False, seed=0, num_epochs=1)
  examples = list(ds.take(n).as_numpy_iterator())
  assert len(examples) == n
  return examples


def _mode_ids():
  return {_piece(t) for t in assets.MODE_TOKENS}


def test_paper_puts_each_denoisers_own_token_first():
  examples = _examples("paper")
  for ex in examples:
    d = denoisers.UL2_DENOISERS[ex["denoiser"]]
    assert ex["inputs"][0] == _piece(d.mode_token)
  assert {int(ex["denoiser"]) for ex in examples} == set(range(len(NAMES)))


def test_none_puts_no_token_and_reserves_no_room():
  examples = _examples("none")
  mode_ids = _mode_ids()
  assert not any(mode_ids & set(ex["inputs"].tolist()) for ex in examples)
  s = NAMES.index("S")
  s_inputs = [len(ex["inputs"]) for ex in examples if ex["denoiser"] == s]
  # The whole inputs length is for text and EOS: S examples use it to the last token.
  assert max(s_inputs) == LENGTHS["inputs"]
  paper = [len(ex["inputs"]) for ex in _examples("paper") if ex["denoiser"] == s]
  assert max(paper) == LENGTHS["inputs"]  # Mode token, 62 tokens, EOS.
  vocab = _vocab()
  budgets = {p: {b.denoiser.name: b for b in denoisers.make_plan(
      tasks.with_mode_tokens(denoisers.UL2_DENOISERS, p), LENGTHS, vocab).budgets}
      for p in ("paper", "none")}
  assert budgets["none"]["S"].window == budgets["paper"]["S"].window + 1 == 64
  for name in NAMES:
    assert budgets["none"][name].window >= budgets["paper"][name].window


def test_a_per_denoiser_map_is_honoured():
  mapping = {"R1": "[S2S]", "R2": None, "X1": "[NLU]", "X2": "[NLU]", "X3": None,
             "X4": "[NLG]", "S": "[NLG]"}
  examples = _examples(mapping)
  mode_ids = _mode_ids()
  for ex in examples:
    token = mapping[NAMES[ex["denoiser"]]]
    if token is None:
      assert ex["inputs"][0] not in mode_ids
    else:
      assert ex["inputs"][0] == _piece(token)
  assert {NAMES[ex["denoiser"]] for ex in examples} == set(NAMES)


def test_bad_policies_are_one_line():
  with pytest.raises(ValueError, match="mode_tokens must be 'paper', 'none' or a mapping"):
    tasks.with_mode_tokens(denoisers.UL2_DENOISERS, "flan")
  with pytest.raises(ValueError, match=r"names denoiser 'R9', which is not in the mixture "
                     r"\(R1, R2, X1, X2, X3, X4, S\)"):
    tasks.with_mode_tokens(denoisers.UL2_DENOISERS, {n: None for n in NAMES} | {"R9": None})
  with pytest.raises(ValueError, match="gives no token for X4, S"):
    tasks.with_mode_tokens(denoisers.UL2_DENOISERS, {n: None for n in NAMES[:-2]})
  with pytest.raises(ValueError, match=r"mode_tokens\['S'\] must be a non-empty string"):
    tasks.with_mode_tokens(denoisers.UL2_DENOISERS, {n: None for n in NAMES} | {"S": ""})
