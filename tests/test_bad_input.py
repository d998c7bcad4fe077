"""Bad input, as a user gives it, answered in one line (exit 2) and before anything
is written: config values of the wrong type, vocabularies the model cannot use,
corpus files that are not text, a resume under another model, export targets.

Every case runs the command in-process (`ul2.main.main`) and fails before a step
is compiled, so the table is quick.
"""

import pathlib

import numpy as np
import pytest
import sentencepiece as spm

from ul2 import assets
from ul2 import checkpoint
from ul2 import main
from ul2 import model_settings
from ul2.model import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = [f"--gin_file={REPO / 'gin' / 'runs' / 'local_tiny.gin'}",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", "--gin.BATCH_SIZE=8",
       "--gin.TRAIN_STEPS=2"]


def _task(tmp_path, name, **bindings):
  """A gin file that registers (and trains on) a task of one's own, as a user writes
  it (see gin/experiments/custom_mixture.gin), as a --gin_file flag."""
  path = tmp_path / f"{name}.gin"
  path.write_text("from __gin__ import dynamic_registration\nimport tasks\n"
                  "MIXTURE_OR_TASK_NAME = @tasks.register_ul2_task()\n"
                  f"tasks.register_ul2_task.name = {name!r}\n"
                  + "".join(f"tasks.register_ul2_task.{k} = {v!r}\n"
                            for k, v in bindings.items()))
  return [f"--gin_file={path}"]


def _corpus(tmp_path, name, content: bytes):
  directory = tmp_path / name
  directory.mkdir()
  (directory / "a.txt").write_text("A first document of plain text.\n")
  (directory / name).write_bytes(content)
  return str(directory / "*")


def _tiny_vocab(tmp_path):
  prefix = tmp_path / "chars"
  spm.SentencePieceTrainer.train(input=str(assets.VALIDATION_TEXT), model_prefix=str(prefix),
                                 vocab_size=60, model_type="char", minloglevel=2, pad_id=0,
                                 eos_id=1, unk_id=2, bos_id=-1)
  return str(prefix) + ".model"


def _cases(tmp_path):
  """(flags, message) per case; built lazily, each in its own directory."""
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_text('{"title": "no text field"}\nnot json\n[1, 2]\n')
  os_dir = tmp_path / "corpus_with_dir"
  (os_dir / "sub.txt").mkdir(parents=True)
  (os_dir / "a.txt").write_text("plain text\n")
  garbage_vocab = tmp_path / "garbage.model"
  garbage_vocab.write_bytes(np.random.default_rng(0).bytes(4000))
  return {
      "steps not a number": (["--gin.TRAIN_STEPS='abc'"],
                             "train_steps must be an integer, got 'abc'"),
      "fractional steps": (["--gin.TRAIN_STEPS=2.5"], "train_steps must be an integer, got 2.5"),
      "float batch size": (["--gin.BATCH_SIZE=7.0"], "batch_size must be an integer, got 7.0"),
      "negative eval period": (["--gin.EVAL_PERIOD=-1"], "eval_period must be non-negative"),
      "lengths without targets": (["--gin.TASK_FEATURE_LENGTHS={'inputs': 64}"],
                                  "task_feature_lengths must map 'inputs' and 'targets'"),
      "vocabulary not SentencePiece": (
          _task(tmp_path, "bad_vocab", vocab_path=str(garbage_vocab)),
          f"vocabulary {garbage_vocab} is not a SentencePiece model"),
      "vocabulary of 60 characters": (
          _task(tmp_path, "tiny_vocab", vocab_path=_tiny_vocab(tmp_path), extra_ids=100),
          "cannot spell denoiser R1's mode token '[NLU]'"),
      "vocabulary larger than the model": (
          ["--gin.model.ModelConfig.vocab_size=1000"],
          "has 8100 ids (extra ids included), more than the model's vocab_size 1000"),
      "binary file in the corpus": (
          _task(tmp_path, "binary", text_glob=_corpus(tmp_path, "model.bin", bytes(range(256)) * 64)),
          "model.bin is a binary file, not text"),
      "JSONL without a usable line": (
          _task(tmp_path, "no_jsonl", text_glob=str(jsonl)),
          "bad.jsonl has no line that is a JSON object with a string 'text'"),
      "directory matching the glob": (
          _task(tmp_path, "with_dir", text_glob=str(os_dir / "*.txt")),
          "sub.txt matches the task's files but is a directory"),
      "no files": (_task(tmp_path, "no_files", text_glob=str(tmp_path / "nothing*.txt")),
                   "no files match"),
  }


CASES = ["steps not a number", "fractional steps", "float batch size", "negative eval period",
         "lengths without targets", "vocabulary not SentencePiece", "vocabulary of 60 characters",
         "vocabulary larger than the model", "binary file in the corpus",
         "JSONL without a usable line", "directory matching the glob", "no files"]


def _one_error(capsys, verb):
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith(f"ul2 {verb}: error: "), err
  return err[0]


@pytest.mark.parametrize("case", CASES)
def test_train_answers_bad_input_in_one_line_and_writes_nothing(case, tmp_path, capsys):
  flags, message = _cases(tmp_path)[case]
  model_dir = tmp_path / "run"
  assert main.main(["train", *RUN, f"--model_dir={model_dir}", *flags]) == 2
  line = _one_error(capsys, "train")
  assert message in line, line
  assert not (model_dir / "config.gin").exists() and not (model_dir / "checkpoints").exists()


def test_a_jsonl_file_warns_once_about_its_skipped_lines(tmp_path, capsys):
  import tasks  # pylint: disable=import-outside-toplevel
  path = tmp_path / "mixed.jsonl"
  path.write_text('{"text": "kept"}\nnot json\n{"text": 3}\n{"text": "kept too"}\n')
  for _ in range(3):  # Three epochs.
    assert list(tasks._jsonl_texts(str(path).encode(), b"text")) == ["kept", "kept too"]  # pylint: disable=protected-access
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"warning: {path}: skipped 2 lines that are not JSON objects with a "
                 "string 'text'"]


@pytest.fixture
def model_dir(tmp_path):
  """A model_dir as `ul2 train` leaves it (settings and a checkpoint step)."""
  directory = tmp_path / "trained"
  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  ckpt.save(2, {"w": np.zeros(3, np.float32)}, {"c": np.zeros((), np.int32)},
            {"batches_consumed": 2})
  ckpt.close()
  config = ModelConfig(vocab_size=8192, d_model=64, num_heads=4, head_dim=16, d_ff=256,
                       num_encoder_layers=2, num_decoder_layers=2)
  model_settings.write(directory, model_settings.ModelSettings(
      model=config, vocab_path=str(assets.VOCAB_PATH), extra_ids=100,
      task_feature_lengths={"inputs": 64, "targets": 64}, mixture_or_task_name="local_ul2"))
  (directory / "config.gin").write_text("# the first run's config\n")
  return directory


def test_a_resume_under_another_model_names_the_fields_and_keeps_config_gin(model_dir, capsys):
  assert main.main(["train", *RUN, f"--model_dir={model_dir}",
                    "--gin.model.ModelConfig.d_model=32",
                    "--gin.model.ModelConfig.num_decoder_layers=3"]) == 2
  line = _one_error(capsys, "train")
  assert ("holds checkpoints of another model: d_model 64 (checkpoint) vs 32 (config); "
          "num_decoder_layers 2 (checkpoint) vs 3 (config)") in line, line
  assert len(line) < 400
  assert (model_dir / "config.gin").read_text() == "# the first run's config\n"
  assert not (model_dir / "train.lock").read_text()  # Released.


@pytest.mark.parametrize("case", ["output is a file", "output not empty", "not a model_dir",
                                  "no settings", "gin flag", "unknown step", "bad shard size",
                                  "zero shard size", "bad dtype", "settings vocab missing"])
def test_export_answers_bad_input_in_one_line(case, model_dir, tmp_path, capsys):
  out = tmp_path / "out"
  args = {"output is a file": lambda: out.write_text("x"),
          "output not empty": lambda: (out.mkdir(), (out / "keep.txt").write_text("x")),
          "no settings": lambda: (model_dir / model_settings.FILENAME).unlink(),
          "settings vocab missing": lambda: (model_dir / model_settings.FILENAME).write_text(
              (model_dir / model_settings.FILENAME).read_text().replace(
                  str(assets.VOCAB_PATH), str(tmp_path / "gone.model")))}
  args.get(case, lambda: None)()
  source = tmp_path / "missing" if case == "not a model_dir" else model_dir
  extra = {"gin flag": ["--gin.TRAIN_STEPS=3"], "unknown step": ["--step=7"],
           "bad shard size": ["--max_shard_size=5XB"], "zero shard size": ["--max_shard_size=0MB"],
           "bad dtype": ["--dtype=float16"]}.get(case, [])
  assert main.main(["export", f"--model_dir={source}", f"--output_dir={out}", *extra]) == 2
  line = _one_error(capsys, "export")
  assert {"output is a file": "is a file, not a directory",
          "output not empty": "is not empty; pass --overwrite",
          "not a model_dir": "is not a directory",
          "no settings": "model_config.json not found",
          "gin flag": "unrecognised argument '--gin.TRAIN_STEPS=3'",
          "unknown step": "no checkpoint for step 7",
          "bad shard size": "max_shard_size '5XB' is not a size like 5GB or 200MB",
          "zero shard size": "max_shard_size '0MB' must be positive",
          "bad dtype": "dtype 'float16' is not one of float32, bfloat16",
          "settings vocab missing": "gone.model cannot be read"}[case] in line, line
  if case == "output not empty":
    assert (out / "keep.txt").read_text() == "x"
  elif case != "output is a file":
    assert not out.exists()  # Nothing written.


def test_eval_takes_no_gin(model_dir, capsys):
  assert main.main(["eval", f"--model_dir={model_dir}", "--gin.loop.TrainConfig.eval_steps=2"]) == 2
  assert "takes the run's settings from DIR/model_config.json" in _one_error(capsys, "eval")


def test_settings_file_that_is_not_json_is_one_line(model_dir, capsys):
  (model_dir / model_settings.FILENAME).write_text("{not json")
  assert main.main(["eval", f"--model_dir={model_dir}"]) == 2
  assert "is not a valid model settings file" in _one_error(capsys, "eval")
