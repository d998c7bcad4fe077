"""The package, its bundled corpus and vocabulary, and the `ul2` command."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import ul2
from ul2 import assets


@pytest.fixture(scope="module")
def vocab():
  import seqio  # pylint: disable=import-outside-toplevel
  return seqio.SentencePieceVocabulary(str(assets.VOCAB_PATH), extra_ids=assets.EXTRA_IDS)


def test_package_imports():
  import ul2.main  # pylint: disable=import-outside-toplevel
  assert ul2.__name__ == "ul2"
  assert callable(ul2.main.main)


def test_vocabulary_has_t5_layout_and_100_sentinels(vocab):
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.extra_ids == 100
  assert vocab.vocab_size == 8000 + 100
  # The sentinels sit at the top: <extra_id_0> is the highest id.
  assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"
  assert vocab.decode([vocab.vocab_size - 100]) == "<extra_id_99>"


@pytest.mark.parametrize("token", assets.MODE_TOKENS)
def test_mode_tokens_are_single_pieces(vocab, token):
  token_id = vocab.tokenizer.piece_to_id(token)
  assert 2 < token_id < 8000
  assert vocab.decode([token_id]) == token
  # Encoded text: SentencePiece's dummy-prefix space piece, then the one mode id.
  space_id = vocab.tokenizer.piece_to_id("\u2581")
  assert vocab.encode(token) == [space_id, token_id]
  assert token_id in vocab.encode(f"{token} Some text.")


def test_vocabulary_round_trips_english(vocab):
  text = "The quick brown fox jumps over the lazy dog in Alberta."
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text
  assert len(ids) < len(text.split()) * 2  # Trained on English: mostly whole words.


@pytest.mark.parametrize("path", [assets.TRAIN_TEXT, assets.VALIDATION_TEXT])
def test_corpus_split_is_utf8_one_paragraph_per_line(path):
  raw = path.read_bytes()
  text = raw.decode("utf-8")  # Raises on invalid UTF-8.
  lines = text.splitlines()
  assert len(lines) > 100
  assert all(line.strip() for line in lines), "empty line"
  assert max(len(line.encode()) for line in lines) <= 4192
  assert sum(len(line.split()) for line in lines) > 20_000
  # No wiki markup left: links, templates, bold/italic quotes, references.
  assert not re.search(r"\[\[|\{\{[A-Za-z]|'''|<ref", text)


def test_corpus_splits_are_disjoint():
  train = set(assets.TRAIN_TEXT.read_text(encoding="utf-8").splitlines())
  validation = set(assets.VALIDATION_TEXT.read_text(encoding="utf-8").splitlines())
  assert len(train) > 10 * len(validation) > 0
  assert len(train & validation) < 0.01 * len(validation)


def test_cli_help_lists_the_verbs():
  out = subprocess.run([sys.executable, "-m", "ul2.main", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for verb in ("train", "eval", "inspect", "export", "plan"):
    assert verb in out


@pytest.mark.slow
def test_a_non_editable_install_finds_its_gin_files_and_assets(tmp_path):
  """`pip install .` (a wheel, not the checkout) carries the gin files, the corpus and
  the vocabulary; `ul2` resolves "gin/runs/local_tiny.gin" from any directory."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(tmp_path / "wheel"), str(repo)], check=True,
                 capture_output=True, cwd=tmp_path)
  (wheel,) = (tmp_path / "wheel").glob("ul2-*.whl")
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                  str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
  code = ("import ul2, pathlib; from ul2 import assets, main\n"
          "assert pathlib.Path(ul2.__file__).is_relative_to(pathlib.Path.cwd()), ul2.__file__\n"
          "main.parse_gin(['gin/runs/local_tiny.gin', 'gin/experiments/custom_mixture.gin'], [])\n"
          "assert main.DEFAULT_RUN.is_file() and assets.VOCAB_PATH.is_file()\n"
          "assert assets.TRAIN_TEXT.stat().st_size > 1_000_000\n"
          "import tasks; print('ok')\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path / "site", env=env)
  assert out.stdout.strip() == "ok", out.stderr[-2000:]
