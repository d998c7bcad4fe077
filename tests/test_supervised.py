"""Supervised tasks (tasks.register_supervised_task): JSONL, TSV and TFDS sources, the
mode token and EOS, metrics by name, mixtures with rates, the bundled local_title and
local_word, and bad input as one line each."""

import collections
import json

import numpy as np
import pytest
import seqio

import tasks
from tasks import metrics, supervised
from ul2 import assets, data
from ul2.assets import build_continue_task, build_word_task

EOS = 1
LENGTHS = {"inputs": 32, "targets": 16}
RECORDS = [{"inputs": f"What is {i} plus one?", "targets": str(i + 1), "id": i}
           for i in range(12)]


def _vocab():
  return seqio.SentencePieceVocabulary(str(assets.VOCAB_PATH), extra_ids=assets.EXTRA_IDS)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _examples(name, split="train", lengths=LENGTHS):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
  return list(ds.as_numpy_iterator())


@pytest.fixture
def jsonl(tmp_path):
  return {"train": _write_jsonl(tmp_path / "train.jsonl", RECORDS),
          "validation": _write_jsonl(tmp_path / "validation.jsonl", RECORDS[:4])}


@pytest.mark.parametrize("mode_token", ["[NLU]", "[S2S]", "[NLG]", None])
def test_inputs_start_with_the_mode_token_and_end_with_eos(jsonl, mode_token):
  tasks.register_supervised_task("sup_test", text_glob=jsonl, mode_token=mode_token,
                                 metrics=("accuracy",))
  vocab = _vocab()
  prefix = [] if mode_token is None else [vocab.tokenizer.piece_to_id(mode_token)]
  examples = _examples("sup_test")
  assert len(examples) == len(RECORDS)
  for ex, record in zip(examples, RECORDS):
    assert ex["inputs"].tolist() == prefix + vocab.encode(record["inputs"]) + [EOS]
    assert ex["targets"].tolist() == vocab.encode(record["targets"]) + [EOS]
    assert ex["inputs_pretokenized"].decode() == record["inputs"]
    assert ex["targets_pretokenized"].decode() == record["targets"]
  assert len(_examples("sup_test", "validation")) == 4
  assert supervised.mode_token_of(seqio.get_mixture_or_task("sup_test")) == mode_token


def test_truncation_keeps_the_mode_token_and_eos(tmp_path):
  text = " ".join(["word"] * 100)
  path = _write_jsonl(tmp_path / "long.jsonl", [{"inputs": text, "targets": text}])
  tasks.register_supervised_task("sup_long", text_glob=path, mode_token="[NLU]")
  (ex,) = _examples("sup_long", lengths={"inputs": 10, "targets": 6})
  nlu = _vocab().tokenizer.piece_to_id("[NLU]")
  assert len(ex["inputs"]) == 10 and ex["inputs"][0] == nlu and ex["inputs"][-1] == EOS
  assert len(ex["targets"]) == 6 and ex["targets"][-1] == EOS


def test_a_task_in_the_span_corruption_format(tmp_path):
  """Records written as an R-denoiser's example tokenise to its ids (`<extra_id_0>` is
  one id, the vocabulary's last: ul2.denoisers' sentinel 0), and `first_span` reads
  the answer back for the metrics."""
  path = _write_jsonl(tmp_path / "span.jsonl", [
      {"inputs": "The film was <extra_id_0> in 1996.", "targets": "<extra_id_0> produced"}])
  tasks.register_supervised_task("sup_span", text_glob=path, mode_token="[NLU]",
                                 metrics=("accuracy",), postprocess_fn=tasks.first_span)
  (ex,) = _examples("sup_span")
  vocab = _vocab()
  sentinel = vocab.vocab_size - 1
  assert ex["inputs"].tolist() == ([vocab.tokenizer.piece_to_id("[NLU]")]
                                   + vocab.encode("The film was") + [sentinel]
                                   + vocab.encode("in 1996.") + [EOS])
  assert ex["targets"].tolist() == [sentinel] + vocab.encode("produced") + [EOS]
  task = seqio.get_mixture_or_task("sup_span")
  decoded = vocab.decode(ex["targets"].tolist())
  assert decoded == "<extra_id_0> produced"
  assert [task.postprocess_fn(t, example=ex, is_target=False) for t in (decoded, "<extra_id_0> a <extra_id_1> b",
                                           "  plain ", "<extra_id_0>")] == [
      "produced", "a", "plain", ""]


def test_tsv_files_with_a_header_and_own_column_names(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text("id\tquestion\tanswer\n" + "".join(
      f"{r['id']}\t{r['inputs']}\t{r['targets']}\n" for r in RECORDS) + "\n")
  tasks.register_supervised_task("sup_tsv", text_glob=str(path), inputs_key="question",
                                 targets_key="answer", mode_token="[S2S]")
  examples = _examples("sup_tsv")
  assert [ex["targets_pretokenized"].decode() for ex in examples] == [
      r["targets"] for r in RECORDS]
  assert examples[3]["inputs_pretokenized"].decode() == RECORDS[3]["inputs"]


def test_a_file_line_without_the_fields_is_one_line_naming_file_and_line(tmp_path):
  good = {"inputs": "a", "targets": "b"}
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps({"inputs": "a", "answer": "b"}) + "\n")
  tasks.register_supervised_task("sup_bad", text_glob={"train": str(path)})
  with pytest.raises(ValueError) as e:
    data.check("sup_bad", LENGTHS, "train")
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{path}:3: no 'targets' field (it has ['answer', 'inputs'])")
  with pytest.raises(Exception, match=f"{path}:3: no 'targets' field"):
    _examples("sup_bad")
  for content, expected in (("[1, 2]\n", ":1: not a JSON object"),
                            ('{"inputs": "a", "targets": 3}\n', ":1: 'targets' is not a string"),
                            ("{oops\n", ":1: invalid JSON")):
    path.write_text(content)
    with pytest.raises(ValueError, match=expected):
      data.check("sup_bad", LENGTHS, "train")
  tsv = tmp_path / "bad.tsv"
  tsv.write_text("inputs\tlabel\nx\ty\n")
  tasks.register_supervised_task("sup_bad", text_glob=str(tsv))
  with pytest.raises(ValueError, match=r"bad.tsv:1: the header names no 'targets' column"):
    data.check("sup_bad", LENGTHS, "train")
  tsv.write_text("inputs\ttargets\nx\ty\nonly one field\n")
  with pytest.raises(ValueError, match=r"bad.tsv:3: 1 tab-separated fields, the header has 2"):
    data.check("sup_bad", LENGTHS, "train")


def test_unknown_metric_and_bad_mode_token_are_one_line(jsonl):
  with pytest.raises(ValueError) as e:
    tasks.register_supervised_task("sup_x", text_glob=jsonl, metrics=("accuracy", "f1"))
  assert str(e.value) == ("task sup_x: unknown metric 'f1'; known metrics: accuracy, bleu, "
                          "exact_match, rouge")
  with pytest.raises(ValueError) as e:
    tasks.register_supervised_task("sup_x", text_glob=jsonl, mode_token="NLU")
  assert str(e.value) == ("task sup_x: mode_token must be one of None, '[NLU]', '[S2S]', "
                          "'[NLG]', got 'NLU'")
  with pytest.raises(ValueError, match="give one of text_glob or tfds_name"):
    tasks.register_supervised_task("sup_x")
  with pytest.raises(ValueError, match=r"use .jsonl \(or .json\) or .tsv files"):
    tasks.register_supervised_task("sup_x", text_glob="/data/*.txt")
  assert "sup_x" not in seqio.TaskRegistry.names()


def test_metric_fns_come_from_the_registry(jsonl):
  tasks.register_supervised_task("sup_metrics", text_glob=jsonl,
                                 metrics=("exact_match", "rouge", "bleu"))
  task = seqio.get_mixture_or_task("sup_metrics")
  assert task.predict_metric_fns == [metrics.exact_match, metrics.rouge, metrics.bleu]


def test_metrics_on_known_values():
  targets = ["The cat sat.", "a dog", "Paris", "x"]
  predictions = ["the cat sat", "a dog", "London", "x"]
  assert metrics.accuracy(targets, predictions) == {"accuracy": 50.0}
  assert metrics.exact_match(targets, predictions) == {"exact_match": 75.0}  # SQuAD-normalised.
  assert metrics.normalize_answer("  The  Cat, sat! ") == "cat sat"
  rouge = metrics.rouge(["the cat sat on the mat"], ["the cat sat on a mat"])
  assert set(rouge) == {"rouge1", "rouge2", "rougeLsum"}
  assert rouge["rouge1"] == pytest.approx(100 * 5 / 6)  # 5 of 6 unigrams on both sides.
  assert rouge["rouge2"] == pytest.approx(100 * 3 / 5)
  assert metrics.rouge(["a b"], ["a b"])["rougeLsum"] == pytest.approx(100.0)
  import sacrebleu  # pylint: disable=import-outside-toplevel
  refs = ["the cat sat on the mat", "there is a dog in the garden"]
  hyps = ["the cat sat on a mat", "there is a dog in a garden"]
  assert metrics.bleu(refs, hyps)["bleu"] == pytest.approx(
      sacrebleu.corpus_bleu(hyps, [refs], tokenize="intl").score)
  assert metrics.bleu(refs, refs)["bleu"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.accuracy(["a", "b"], ["a"])


def test_a_mixture_of_supervised_tasks_follows_its_rates(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", [{"inputs": f"a {i}", "targets": "A"} for i in range(50)])
  b = _write_jsonl(tmp_path / "b.jsonl", [{"inputs": f"b {i}", "targets": "B"} for i in range(50)])
  tasks.register_supervised_task("sup_a", text_glob=a, mode_token="[NLU]", metrics=("accuracy",),
                                 shuffle_buffer_size=64)
  tasks.register_supervised_task("sup_b", text_glob=b, mode_token="[S2S]", metrics=("bleu",),
                                 shuffle_buffer_size=64)
  name = tasks.register_mixture("sup_mix", {"sup_a": 1.0, "sup_b": 3.0})
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name for t in mixture.tasks} == {"sup_a", "sup_b"}
  ds = mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=0, num_epochs=None)
  vocab = _vocab()
  counts = collections.Counter(vocab.decode(ex["targets"].tolist())
                               for ex in ds.take(800).as_numpy_iterator())
  assert counts["A"] + counts["B"] == 800
  assert counts["A"] / 800 == pytest.approx(0.25, abs=0.05)
  # The training pipeline takes it: no denoisers, model features in batches.
  assert data.task_denoisers(name) == ()
  batch = next(data.as_numpy(data.get_dataset(name, LENGTHS, "train", batch_size=4,
                                              shuffle=True, seed=0)))
  assert batch["encoder_input_tokens"].shape == (4, 32)
  assert not batch["decoder_denoiser_ids"].any()
  with pytest.raises(ValueError, match="unknown task 'sup_c'"):
    tasks.register_mixture("sup_mix", {"sup_a": 1.0, "sup_c": 1.0})
  with pytest.raises(ValueError, match="rates must be positive"):
    tasks.register_mixture("sup_mix", {"sup_a": 0.0})


def test_the_bundled_title_task():
  task = seqio.get_mixture_or_task("local_title")
  assert supervised.mode_token_of(task) == "[NLU]"
  assert task.predict_metric_fns == [metrics.accuracy]
  data.check("local_title", {"inputs": 128, "targets": 32}, "validation")
  records = {split: [json.loads(l) for l in path.read_text().splitlines()]
             for split, path in (("train", assets.TITLE_TRAIN),
                                 ("validation", assets.TITLE_VALIDATION))}
  assert len(records["train"]) > 400 and len(records["validation"]) > 100
  assert assets.TITLE_TRAIN.stat().st_size + assets.TITLE_VALIDATION.stat().st_size < 2e6
  titles = {split: {r["targets"] for r in rs} for split, rs in records.items()}
  assert titles["validation"] == titles["train"] and len(titles["train"]) > 20
  # Built from the bundled corpus: every paragraph is a corpus line, none in both splits.
  corpus = set(assets.TRAIN_TEXT.read_text().splitlines()) | set(
      assets.VALIDATION_TEXT.read_text().splitlines())
  inputs = {split: {r["inputs"] for r in rs} for split, rs in records.items()}
  assert inputs["train"] <= corpus and inputs["validation"] <= corpus
  assert not inputs["train"] & inputs["validation"]
  nlu = _vocab().tokenizer.piece_to_id("[NLU]")
  examples = _examples("local_title", "validation", {"inputs": 128, "targets": 32})
  assert len(examples) == len(records["validation"])
  assert all(ex["inputs"][0] == nlu and ex["inputs"][-1] == EOS for ex in examples)
  assert all(ex["targets"][-1] == EOS for ex in examples)


def test_the_title_task_script_rebuilds_the_shipped_files(tmp_path, monkeypatch):
  from ul2.assets import build_title_task  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr("sys.argv", ["build_title_task", "--output_dir", str(tmp_path)])
  build_title_task.main()
  for path in (assets.TITLE_TRAIN, assets.TITLE_VALIDATION):
    assert (tmp_path / path.name).read_text() == path.read_text()


def test_the_bundled_word_task():
  task = seqio.get_mixture_or_task("local_word")
  assert supervised.mode_token_of(task) == "[NLU]"
  assert task.predict_metric_fns == [metrics.accuracy]
  records = {split: [json.loads(l) for l in path.read_text().splitlines()]
             for split, path in (("train", assets.WORD_TRAIN),
                                 ("validation", assets.WORD_VALIDATION))}
  assert len(records["train"]) > 5000 and len(records["validation"]) > 300
  assert assets.WORD_TRAIN.stat().st_size + assets.WORD_VALIDATION.stat().st_size < 2e6
  # Each input is a corpus line's first words with one word blanked: training ones
  # from train.txt, validation ones from validation.txt (text pre-training never saw).
  for split, text in (("train", assets.TRAIN_TEXT), ("validation", assets.VALIDATION_TEXT)):
    lines = {" ".join(l.split()[:build_word_task.MAX_WORDS]) for l in text.read_text().splitlines()}
    for r in records[split]:
      assert r["inputs"].split().count(build_word_task.BLANK) == 1
      assert r["targets"].isalpha() and len(r["targets"]) >= build_word_task.MIN_LETTERS
      assert r["inputs"].replace(build_word_task.BLANK, r["targets"], 1) in lines
  examples = _examples("local_word", "validation", {"inputs": 128, "targets": 8})
  assert len(examples) == len(records["validation"])
  nlu = _vocab().tokenizer.piece_to_id("[NLU]")
  assert all(ex["inputs"][0] == nlu and ex["inputs"][-1] == EOS for ex in examples)


def test_the_word_task_script_rebuilds_the_shipped_files(tmp_path, monkeypatch):
  monkeypatch.setattr("sys.argv", ["build_word_task", "--output_dir", str(tmp_path)])
  build_word_task.main()
  for path in (assets.WORD_TRAIN, assets.WORD_VALIDATION):
    assert (tmp_path / path.name).read_text() == path.read_text()


def test_the_bundled_continue_task():
  task = seqio.get_mixture_or_task("local_continue")
  assert supervised.mode_token_of(task) == "[S2S]"
  assert task.predict_metric_fns == [metrics.rouge]
  records = {split: [json.loads(l) for l in path.read_text().splitlines()]
             for split, path in (("train", assets.CONTINUE_TRAIN),
                                 ("validation", assets.CONTINUE_VALIDATION))}
  assert (len(records["train"]), len(records["validation"])) == (4730, 306)
  # Each example is a corpus line cut after 8 to 48 words, and its next 12 words:
  # training ones from train.txt, validation ones from validation.txt.
  for split, text in (("train", assets.TRAIN_TEXT), ("validation", assets.VALIDATION_TEXT)):
    lines = {" ".join(l.split()) for l in text.read_text().splitlines()}
    for r in records[split]:
      prefix, target = r["inputs"].split(), r["targets"].split()
      assert 8 <= len(prefix) <= 48 and len(target) == build_continue_task.TARGET_WORDS
      assert any(l.startswith(" ".join(prefix + target)) for l in lines
                 if l.startswith(" ".join(prefix[:3])))
  examples = _examples("local_continue", "validation", {"inputs": 128, "targets": 48})
  assert len(examples) == len(records["validation"])
  s2s = _vocab().tokenizer.piece_to_id("[S2S]")
  assert all(ex["inputs"][0] == s2s and ex["inputs"][-1] == EOS for ex in examples)
  assert all(ex["targets"][-1] == EOS for ex in examples)  # 48 tokens fit every target.


def test_the_continue_task_script_rebuilds_the_shipped_files(tmp_path, monkeypatch):
  monkeypatch.setattr("sys.argv", ["build_continue_task", "--output_dir", str(tmp_path)])
  build_continue_task.main()
  for path in (assets.CONTINUE_TRAIN, assets.CONTINUE_VALIDATION):
    assert (tmp_path / path.name).read_text() == path.read_text()


def test_a_tfds_source(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = tfds.features.FeaturesDict({"question": tfds.features.Text(),
                                         "answer": tfds.features.Text()})
  rows = [{"question": r["inputs"], "answer": r["targets"]} for r in RECORDS]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="sup_qa", version="1.0.0", features=features, data_dir=tmp_path,
      split_datasets={"train": list(enumerate(rows)), "validation": list(enumerate(rows[:3]))})
  tasks.register_supervised_task("sup_tfds", tfds_name="sup_qa:1.0.0",
                                 tfds_data_dir=str(tmp_path), inputs_key="question",
                                 targets_key="answer", mode_token="[NLU]")
  examples = _examples("sup_tfds", "validation")
  vocab = _vocab()
  assert sorted(ex["targets_pretokenized"].decode() for ex in examples) == ["1", "2", "3"]
  for ex in examples:
    assert ex["inputs"][0] == vocab.tokenizer.piece_to_id("[NLU]")
    assert ex["inputs"][1:-1].tolist() == vocab.encode(ex["inputs_pretokenized"].decode())
  np.testing.assert_array_equal(examples[0]["targets"][-1:], [EOS])


def test_registered_from_gin(jsonl):
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  try:
    gin.parse_config(f"""
from __gin__ import dynamic_registration
import tasks
MIXTURE_OR_TASK_NAME = @tasks.register_supervised_task()
tasks.register_supervised_task:
  name = 'sup_gin'
  text_glob = {{'train': '{jsonl["train"]}', 'validation': '{jsonl["validation"]}'}}
  mode_token = '[S2S]'
  metrics = ['rouge', 'bleu']
""")
    with gin.config_scope("MIXTURE_OR_TASK_NAME"):
      name = gin.get_configurable("gin.macro")()
  finally:
    gin.clear_config()
  assert name == "sup_gin"
  task = seqio.get_mixture_or_task("sup_gin")
  assert supervised.mode_token_of(task) == "[S2S]"
  assert task.predict_metric_fns == [metrics.rouge, metrics.bleu]
  assert len(_examples("sup_gin", "validation")) == 4


@pytest.mark.parametrize("case", ["a line without the fields", "an unknown metric"])
def test_ul2_train_on_a_bad_supervised_task_is_one_line(case, jsonl, tmp_path, capsys):
  """Through the command: a task registered from gin with a file line that lacks the
  targets, or with an unknown metric, stops `ul2 train` with one line, before training."""
  import pathlib  # pylint: disable=import-outside-toplevel
  from ul2 import main  # pylint: disable=import-outside-toplevel
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"inputs": "a", "targets": "b"}) + "\n"
                 + json.dumps({"inputs": "a", "answer": "b"}) + "\n")
  train, metric = {"a line without the fields": (str(bad), "accuracy"),
                   "an unknown metric": (jsonl["train"], "f1")}[case]
  runs = pathlib.Path(__file__).resolve().parents[1] / "gin" / "runs"
  gin_file = tmp_path / "bad_task.gin"
  gin_file.write_text(f"""
from __gin__ import dynamic_registration
import tasks
include '{runs / "finetune.gin"}'
MIXTURE_OR_TASK_NAME = @tasks.register_supervised_task()
tasks.register_supervised_task:
  name = 'sup_cli'
  text_glob = {{'train': '{train}', 'validation': '{jsonl["validation"]}'}}
  metrics = ['{metric}']
""")
  assert main.main(["train", f"--gin_file={gin_file}",
                    f"--model_dir={tmp_path / 'run'}"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("ul2 train: error: "), err
  assert {"a line without the fields": f"{bad}:2: no 'targets' field (it has ['answer', "
                                       "'inputs'])",
          "an unknown metric": "task sup_cli: unknown metric 'f1'; known metrics: accuracy, "
                               "bleu, exact_match, rouge"}[case] in err[0]
