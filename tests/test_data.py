"""Tasks, batches and `ul2 inspect`: local files, a local C4 TFDS directory, gin mixtures."""

import itertools
import json
import pathlib

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks
from ul2 import data
from ul2 import denoisers as D
from ul2 import main

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = {"inputs": 128, "targets": 128}
MODEL_KEYS = {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
              "encoder_positions", "decoder_positions", "decoder_denoiser_ids"}
S_ONLY = (D.Denoiser("S", kind=D.PREFIX_LM, mode_token="[S2S]"),)


@pytest.fixture
def registered():
  """Registers tasks for one test and removes them after."""
  names = []

  def register(name, **kwargs):
    names.append(tasks.register_ul2_task(name, **kwargs))
    return name

  yield register
  for name in names:
    seqio.TaskRegistry.remove(name)


def take(ds, n):
  it = data.as_numpy(ds)
  return [next(it) for _ in range(n)]


def test_batches_have_the_models_features_packed(registered):
  # Full windows fill most rows alone; examples of one document each pack.
  name = registered("test_per_document", merge_documents=False)
  batches = take(data.get_dataset(name, LENGTHS, "train", batch_size=4, shuffle=True,
                                  seed=0), 5)
  assert max(b["decoder_segment_ids"].max() for b in batches) > 1, "packed"
  batch = batches[0]
  assert set(batch) == MODEL_KEYS
  for key, value in batch.items():
    assert value.dtype == np.int32 and value.shape == (4, 128), key
  seg = batch["decoder_segment_ids"]
  ids = batch["decoder_denoiser_ids"]
  weights = batch["decoder_loss_weights"]
  assert (weights == (seg > 0)).all()
  num_denoisers = len(data.task_denoisers(name))
  for row in range(4):
    for s in set(seg[row][seg[row] > 0]):
      segment_ids = set(ids[row][seg[row] == s])
      assert len(segment_ids) == 1 and 0 <= segment_ids.pop() < num_denoisers
  # decoder inputs are the targets shifted right within each segment.
  first = batch["decoder_positions"] == 0
  assert (batch["decoder_input_tokens"][first] == 0).all()


def test_same_seed_same_batches_and_resume_by_skip():
  def batches(seed, skip=0):
    ds = data.get_dataset("local_ul2", LENGTHS, "train", batch_size=2, shuffle=True, seed=seed)
    return take(ds.skip(skip), 3)

  a, b, c = batches(7), batches(7), batches(8)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(a[0]["encoder_input_tokens"], c[0]["encoder_input_tokens"])
  resumed = batches(7, skip=2)[0]
  assert all(np.array_equal(a[2][k], resumed[k]) for k in resumed)


def _lines_of(batches, vocabulary):
  """The documents of unpacked S-denoiser batches: prefix + suffix, decoded."""
  lines = []
  for batch in batches:
    for inputs, targets in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
      ids = [t for t in inputs[1:] if t not in (0, 1)] + [t for t in targets if t not in (0, 1)]
      lines.append(vocabulary.decode(ids))
  return lines


def test_shards_are_disjoint_and_cover_the_data(tmp_path, registered):
  lines = [f"document number {i} says hello" for i in range(40)]
  (tmp_path / "a.txt").write_text("\n".join(lines[:25]) + "\n")
  (tmp_path / "b.txt").write_text("\n".join(lines[25:]) + "\n")
  name = registered("test_shards", text_glob=str(tmp_path / "*.txt"), denoisers=S_ONLY,
                    merge_documents=False)
  vocabulary = data._vocabulary(data.provider(name))  # pylint: disable=protected-access
  shards = []
  for shard_id in range(2):
    ds = data.get_dataset(name, {"inputs": 32, "targets": 32}, "train", batch_size=1,
                          shuffle=False, seed=0, pack=False, shard_id=shard_id, num_shards=2,
                          repeat=False)
    shards.append(_lines_of(data.as_numpy(ds), vocabulary))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(lines)


def test_bad_documents_are_skipped_or_repaired(tmp_path, registered):
  (tmp_path / "docs.txt").write_bytes(
      b"good line one\n\n   \t \ncaf\xc3 broken \xff utf8 line\nlast good line\n")
  name = registered("test_bad_text", text_glob=str(tmp_path / "docs.txt"), denoisers=S_ONLY,
                    merge_documents=False)
  examples = data.examples(name, {"inputs": 64, "targets": 64}, num_examples=10, repeat=False)
  texts = [ex["inputs_text"].replace("[S2S]", "").strip() + " " + ex["targets_text"]
           for ex in examples]
  assert len(examples) == 3  # The empty and whitespace-only lines are skipped.
  assert "broken" in texts[1] and "utf8 line" in texts[1]

  records = [{"text": "a json document"}, {"text": "   "}, {"other": "no text"},
             {"text": 7}, "not an object", {"text": "another json document"}]
  lines = [json.dumps(r) for r in records] + ["{not json"]
  (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
  name = registered("test_jsonl", text_glob=str(tmp_path / "*.jsonl"), denoisers=S_ONLY,
                    merge_documents=False)
  examples = data.examples(name, {"inputs": 64, "targets": 64}, num_examples=10, repeat=False)
  assert len(examples) == 2


def test_unknown_names_and_missing_files_are_one_clear_error(tmp_path, registered):
  with pytest.raises(ValueError, match="unknown task or mixture 'local_ul3'; did you mean "
                                       "'local_ul2'"):
    data.get_dataset("local_ul3", LENGTHS, "train", 2, True, 0)
  name = registered("test_missing", text_glob=str(tmp_path / "nowhere" / "*.txt"))
  with pytest.raises(FileNotFoundError, match="no files match .*nowhere"):
    data.get_dataset(name, LENGTHS, "train", 2, True, 0)
  with pytest.raises(ValueError, match="split 'test'"):
    data.get_dataset("local_ul2", LENGTHS, "test", 2, True, 0)
  with pytest.raises(ValueError, match="denoiser X4"):
    data.get_dataset("local_ul2", {"inputs": 64, "targets": 16}, "train", 2, True, 0)


@pytest.mark.slow
def test_c4_ul2_reads_a_local_tfds_directory(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = tfds.builder(tasks.C4_TFDS_NAME, data_dir=tmp_path).info.features
  docs = [{"text": f"Document {i}. The quick brown fox jumps over the lazy dog {i} times.",
           "url": f"https://example.com/{i}", "timestamp": "2019-04-25T12:57:54Z",
           "content-length": "70", "content-type": "text/plain"} for i in range(60)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="c4", version="3.1.0", config="en", features=features, data_dir=tmp_path,
      split_datasets={"train": list(enumerate(docs)), "validation": list(enumerate(docs[:8]))})
  try:
    tasks.register_ul2_task("c4_ul2", tfds_name=tasks.C4_TFDS_NAME, tfds_data_dir=str(tmp_path))
    examples = data.examples("c4_ul2", {"inputs": 512, "targets": 512}, num_examples=60)
    assert len(examples) == 60
    text = " ".join(ex["inputs_text"] + ex["targets_text"] for ex in examples)
    assert "quick brown fox" in text
    (batch,) = take(data.get_dataset("c4_ul2", LENGTHS, "validation", batch_size=2,
                                     shuffle=True, seed=0), 1)
    assert set(batch) == MODEL_KEYS
  finally:
    tasks.register_ul2_task("c4_ul2", tfds_name=tasks.C4_TFDS_NAME)


def test_custom_mixture_from_gin():
  gin.clear_config()
  try:
    gin.parse_config_file(str(REPO / "gin" / "experiments" / "custom_mixture.gin"))
    with gin.config_scope("MIXTURE_OR_TASK_NAME"):
      name = gin.get_configurable("gin.macro")()
  finally:
    gin.clear_config()
  try:
    assert name == "local_custom"
    mixture = data.task_denoisers(name)
    assert [(d.name, d.kind, d.mean_span_length, d.corruption_rate, d.weight)
            for d in mixture] == [
                ("R", D.SPAN_CORRUPTION, 3, 0.15, 0.3), ("X", D.SPAN_CORRUPTION, 12, 0.4, 0.3),
                ("X_LONG", D.SPAN_CORRUPTION, 32, 0.25, 0.2), ("S", D.PREFIX_LM, None, None, 0.2)]
    examples = data.examples(name, LENGTHS, num_examples=40, seed=0)
    assert {ex["denoiser"] for ex in examples} == {"R", "X", "X_LONG", "S"}
  finally:
    seqio.TaskRegistry.remove(name)


def test_inspect_jsonl(capsys):
  assert main.main(["inspect", "--task=local_ul2", "--num_examples=20", "--format=jsonl"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 20
  vocabulary = data._vocabulary(data.provider("local_ul2"))  # pylint: disable=protected-access
  for line in lines:
    ex = json.loads(line)
    assert list(ex) == list(data.EXAMPLE_FIELDS)
    assert ex["inputs"][-1] == ex["targets"][-1] == 1
    assert ex["inputs"][0] == vocabulary.tokenizer.piece_to_id(ex["mode_token"])
    assert ex["inputs_text"] == vocabulary.decode(ex["inputs"])
    assert len(ex["inputs"]) <= 512 and len(ex["targets"]) <= 512


def test_inspect_text_shows_all_seven_denoisers(capsys):
  assert main.main(["inspect", "--task=local_ul2", "--num_examples=20", "--format=text"]) == 0
  out = capsys.readouterr().out
  headers = [line.split()[1] for line in out.splitlines() if line.startswith("#")]
  assert len(headers) == 20
  assert set(headers) == {"R1", "R2", "X1", "X2", "X3", "X4", "S"}
  assert "<extra_id_0>" in out and "[NLU]" in out and "[S2S]" in out


def test_inspect_errors_are_one_line(capsys):
  assert main.main(["inspect", "--task=c4_ul", "--num_examples=2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert err[0].startswith("ul2 inspect: error: unknown task or mixture 'c4_ul'; did you "
                           "mean 'c4_ul2'")


def test_a_corpus_with_no_text_is_a_clear_error(tmp_path):
  import tasks  # pylint: disable=import-outside-toplevel
  from ul2 import data  # pylint: disable=import-outside-toplevel
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n\t\n")
  name = tasks.register_ul2_task("empty_corpus_test", text_glob=str(empty))
  with pytest.raises(ValueError, match=r"empty_corpus_test: the train files .* hold no text"):
    data.get_dataset(name, {"inputs": 64, "targets": 64}, "train", batch_size=2,
                     shuffle=False, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("length, num_examples", [(128, 4000), (512, 3000)])
def test_packed_denoiser_ids_are_their_examples(length, num_examples):
  """Every packed segment is the next example, with that example's denoiser id on all of
  its weighted target tokens (seqio packs a feature by its non-zero values)."""
  lengths = {"inputs": length, "targets": length}
  examples = [{k: ex[k] for k in ("inputs", "targets", "denoiser")} for ex in
              itertools.islice(data.denoised("local_ul2", lengths, "train", 0, False),
                               num_examples)]
  rows = list(data.pack(data.examples_dataset(examples), lengths).as_numpy_iterator())
  assert len(rows) > 1000
  it = iter(examples)
  segments = 0
  for row in rows:
    weights, seg = row["decoder_loss_weights"], row["decoder_segment_ids"]
    assert (weights == (seg > 0)).all()
    for s in range(1, seg.max() + 1):
      ex = next(it)
      np.testing.assert_array_equal(row["decoder_target_tokens"][seg == s], ex["targets"])
      np.testing.assert_array_equal(
          row["encoder_input_tokens"][row["encoder_segment_ids"] == s], ex["inputs"])
      ids = row["decoder_denoiser_ids"][(seg == s) & (weights > 0)]
      assert (ids == ex["denoiser"]).all(), (s, ids, ex["denoiser"])
      segments += 1
  assert segments == num_examples and next(it, None) is None


UL2_MEAN_SPANS = {"R1": 3, "R2": 8, "X1": 3, "X2": 8, "X3": 64, "X4": 64}
UL2_RATES = {"R1": 0.15, "R2": 0.15, "X1": 0.5, "X2": 0.5, "X3": 0.15, "X4": 0.5}


@pytest.mark.slow
def test_stats_of_local_ul2_at_512_are_ul2s(capsys):
  """`ul2 inspect --stats` on the bundled corpus: full windows, spans of mean mu."""
  assert main.main(["inspect", "--task=local_ul2", "--num_examples=3000", "--stats",
                    "--format=jsonl"]) == 0
  rows = {row["denoiser"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
  assert list(rows) == ["R1", "R2", "X1", "X2", "X3", "X4", "S", "all"]
  assert rows["all"]["count"] == 3000
  for name, row in rows.items():
    assert set(row) == set(data.STATS_FIELDS)
    assert row["fill"] >= 0.9, name
    group_share = {"R": 0.2, "X": 0.1, "S": 0.2}.get(name[0])
    if group_share is not None:
      assert abs(row["share"] - group_share) < 0.03, name
  for name, mu in UL2_MEAN_SPANS.items():
    assert abs(rows[name]["corruption_rate"] / UL2_RATES[name] - 1) < 0.1, name
    if name == "X1":  # ~137 spans of 3 wanted, 100 sentinels: 100 spans of ~4.1.
      assert rows[name]["mean_span"] == pytest.approx(4.1, abs=0.1)
      assert 95 < rows[name]["spans"] <= 100
    else:
      assert abs(rows[name]["mean_span"] / mu - 1) < 0.1, name
  assert rows["S"]["spans"] is None and rows["S"]["mean_span"] is None
  # Full windows leave little to pack: one example a row.
  assert rows["all"]["examples_per_row"] < 1.05
  # S: a uniform split of a 511-token window. (Mode tokens: test_inspect_jsonl.)
  assert 240 < rows["S"]["inputs_length"] < 265


@pytest.mark.slow
def test_stats_per_document_are_unchanged(registered):
  """With merge_documents=False each paragraph (~115 tokens) is its own example, as before
  windows were joined: short examples, short spans for mu = 64."""
  name = registered("test_per_document_stats", merge_documents=False)
  rows = {row["denoiser"]: row for row in data.denoiser_stats(
      name, {"inputs": 512, "targets": 512}, num_examples=3000, seed=3)}
  # As measured before windows were joined (issue 12's table).
  fills = {"R1": 0.22, "R2": 0.22, "X1": 0.17, "X2": 0.14, "X3": 0.21, "X4": 0.13, "S": 0.25}
  for d, fill in fills.items():
    assert rows[d]["fill"] == pytest.approx(fill, abs=0.03), d
  assert rows["X3"]["mean_span"] == pytest.approx(18.6, rel=0.1)
  assert rows["X4"]["mean_span"] == pytest.approx(52.0, rel=0.1)
  assert rows["all"]["examples_per_row"] > 4


@pytest.mark.slow
def test_stats_text_table(capsys):
  assert main.main(["inspect", "--task=local_ul2", "--num_examples=200", "--stats",
                    "--inputs_length=128", "--targets_length=128"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("local_ul2 (train), inputs length 128, targets length 128")
  header = lines[2].split()
  assert header[:3] == ["denoiser", "count", "share"]
  body = {line.split()[0]: line.split() for line in lines[3:]}
  assert set(body) == {"R1", "R2", "X1", "X2", "X3", "X4", "S", "all"}
  assert body["all"][1] == "200" and body["S"][8] == "-"


def test_unigram_baseline_is_the_smoothed_target_frequencies():
  lengths = {"inputs": 128, "targets": 128}
  log_probs = data.unigram_log_probs("local_ul2", lengths, num_examples=300, seed=1)
  assert log_probs.shape == (8100,)
  assert np.exp(log_probs).sum() == pytest.approx(1.0)
  counts = np.full(8100, 0.5)
  for ex in data.examples("local_ul2", lengths, num_examples=300, seed=1):
    for t in ex["targets"]:
      counts[t] += 1
  np.testing.assert_allclose(log_probs, np.log(counts / counts.sum()))
  assert log_probs[1] > np.log(0.01)  # EOS ends every target.
