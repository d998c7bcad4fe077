"""UL2's denoisers: specs, length budgets, span maths and the seqio preprocessor.

Statistics run the real preprocessor on thousands of examples. Documents are runs of
consecutive token ids, so a reconstructed example must be a run of consecutive ids
of exactly the window's length: that checks the order of every token.
"""

import collections
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from ul2 import assets
from ul2 import denoisers as D

LENGTHS = {"inputs": 512, "targets": 512}
EOS = 1


@pytest.fixture(scope="module")
def vocab():
  return seqio.SentencePieceVocabulary(str(assets.VOCAB_PATH), extra_ids=assets.EXTRA_IDS)


@pytest.fixture(scope="module")
def features(vocab):
  return {"inputs": seqio.Feature(vocab, add_eos=False),
          "targets": seqio.Feature(vocab, add_eos=False)}


@pytest.fixture(scope="module")
def plan(vocab):
  return D.make_plan(D.UL2_DENOISERS, LENGTHS, vocab)


def run(features, documents, denoisers=D.UL2_DENOISERS, lengths=None, seed=0, merge=False,
        separator=None):
  """The preprocessor's examples for `documents` (lists of ids), as numpy dicts.

  By default each document on its own (`merge_documents=False`), so that the tests
  can check one document's examples; `merge=True` is the task's default.
  """
  ds = tf.data.Dataset.from_generator(
      lambda: iter(documents), output_signature=tf.TensorSpec([None], tf.int32))
  ds = ds.map(lambda t: {"targets": t})
  with seqio.map_seed_manager(seed):
    ds = D.mixture_of_denoisers(ds, features, lengths or LENGTHS, denoisers=denoisers,
                                merge_documents=merge, document_separator=separator)
  return [{k: np.asarray(v) for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def consecutive_documents(n, length, seed=0):
  starts = np.random.default_rng(seed).integers(3, 8000 - length, size=n)
  return [np.arange(s, s + length, dtype=np.int32) for s in starts]


def reconstruct(example, d, mode_ids, first_sentinel=8000):
  """The window the example was made from: spans put back in place of sentinels."""
  inputs, targets = list(example["inputs"]), list(example["targets"])
  assert inputs[:len(mode_ids)] == list(mode_ids), "mode token first"
  assert inputs[-1] == EOS and targets[-1] == EOS
  body, target_body = inputs[len(mode_ids):-1], targets[:-1]
  if d.kind == D.PREFIX_LM:
    assert all(t < first_sentinel for t in inputs + targets), "no sentinel in S"
    return body + target_body, []
  in_sentinels = [t for t in body if t >= first_sentinel]
  out_sentinels = [t for t in target_body if t >= first_sentinel]
  assert in_sentinels == out_sentinels, "same sentinels, same order"
  assert in_sentinels == list(range(8099, 8099 - len(in_sentinels), -1)), (
      "sentinels count down from vocab_size - 1")
  assert target_body[0] == in_sentinels[0]
  spans, current = {}, None
  for t in target_body:
    if t >= first_sentinel:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  assert all(spans.values()), "no empty span"
  window = []
  for t in body:
    window.extend(spans[t] if t >= first_sentinel else [t])
  return window, [len(spans[s]) for s in in_sentinels]


def test_default_mixture_is_ul2s():
  by_name = {d.name: d for d in D.UL2_DENOISERS}
  assert list(by_name) == ["R1", "R2", "X1", "X2", "X3", "X4", "S"]
  expected = {"R1": (3, 0.15), "R2": (8, 0.15), "X1": (3, 0.5), "X2": (8, 0.5),
              "X3": (64, 0.15), "X4": (64, 0.5)}
  for name, (mu, r) in expected.items():
    d = by_name[name]
    assert (d.kind, d.mean_span_length, d.corruption_rate) == (D.SPAN_CORRUPTION, mu, r)
    assert d.mode_token == ("[NLU]" if name.startswith("R") else "[NLG]")
  assert by_name["S"].kind == D.PREFIX_LM and by_name["S"].mode_token == "[S2S]"
  weight = {g: sum(d.weight for d in D.UL2_DENOISERS if d.name.startswith(g)) for g in "RXS"}
  assert weight == pytest.approx({"R": 0.4, "X": 0.4, "S": 0.2})
  assert by_name["R1"].weight == by_name["R2"].weight
  assert len({by_name[f"X{i}"].weight for i in range(1, 5)}) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="A", kind="mlm", mean_span_length=3, corruption_rate=0.1), "kind"),
    (dict(name="A", mean_span_length=0.5, corruption_rate=0.1), "mean_span_length"),
    (dict(name="A", mean_span_length=3, corruption_rate=1.0), "corruption_rate"),
    (dict(name="A", kind="prefix_lm", corruption_rate=0.2), "prefix_lm"),
    (dict(name="A", mean_span_length=3, corruption_rate=0.1, weight=-1), "weight"),
])
def test_bad_denoisers_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    D.Denoiser(**kwargs)


def test_mixture_validation():
  r = D.UL2_DENOISERS[0]
  with pytest.raises(ValueError, match="unique"):
    D.validate_mixture([r, r])
  with pytest.raises(ValueError, match="sum to 0"):
    D.validate_mixture([D.Denoiser("A", mean_span_length=3, corruption_rate=0.1, weight=0)])


def test_budgets_count_mode_token_eos_and_sentinels(plan):
  windows = {b.denoiser.name: b.window for b in plan.budgets}
  # Golden numbers at 512/512 (T5's helper, counting [mode] + EOS, ceil'd span count).
  assert windows == {"R1": 566, "R2": 587, "X1": 821, "X2": 907, "X3": 598, "X4": 1005,
                     "S": 511}
  for b in plan.budgets:
    assert b.inputs_length <= 512 and b.targets_length <= 512
    d = b.denoiser
    if d.kind == D.SPAN_CORRUPTION:  # The next window would not fit.
      i, t, _, _ = D._span_lengths(b.window + 1, d, 100, 1)  # pylint: disable=protected-access
      assert i > 512 or t > 512
      assert b.inputs_length == 1 + (b.window - b.noise_tokens) + b.max_spans + 1
      assert b.targets_length == b.noise_tokens + b.max_spans + 1
  assert plan.chunk_length == 1005 and plan.max_spans == 100


def test_x1_at_512_is_capped_at_100_sentinels(plan):
  x1 = {b.denoiser.name: b for b in plan.budgets}["X1"]
  uncapped = math.ceil(x1.noise_tokens / 3)
  assert uncapped > 100 and x1.sentinel_capped and x1.max_spans == 100
  assert {b.denoiser.name for b in plan.budgets if b.sentinel_capped} == {"X1"}


def test_length_error_names_the_denoiser_and_numbers(vocab):
  with pytest.raises(ValueError, match=r"denoiser X4: inputs length 64, targets length 16 "
                                       r"allow windows of at most 28 tokens.*64"):
    D.make_plan(D.UL2_DENOISERS, {"inputs": 64, "targets": 16}, vocab)
  with pytest.raises(ValueError, match=r"denoiser R1: inputs length 3, targets length 64"):
    D.make_plan(D.UL2_DENOISERS, {"inputs": 3, "targets": 64}, vocab)
  with pytest.raises(ValueError, match=r"denoiser S: inputs length 2"):
    D.make_plan(D.UL2_DENOISERS[-1:], {"inputs": 2, "targets": 64}, vocab)
  with pytest.raises(ValueError, match="feature lengths"):
    D.make_plan(D.UL2_DENOISERS, None, vocab)
  # The trainer's tiny lengths fit every default denoiser.
  D.make_plan(D.UL2_DENOISERS, {"inputs": 128, "targets": 128}, vocab)


@pytest.fixture(scope="module")
def mixture_examples(features):
  """10,000 full-window examples of the UL2 mixture (one per document)."""
  return run(features, consecutive_documents(10_000, 1005), seed=0)


def test_mixture_frequencies_match_weights(mixture_examples):
  counts = collections.Counter(int(ex["denoiser"]) for ex in mixture_examples)
  assert len(mixture_examples) == 10_000
  for i, d in enumerate(D.UL2_DENOISERS):
    assert abs(counts[i] / 10_000 - d.weight) < 0.02, (d.name, counts[i])


def test_every_example_is_valid_and_reconstructs(mixture_examples, plan):
  stats = collections.defaultdict(lambda: collections.Counter())
  for ex in mixture_examples:
    i = int(ex["denoiser"])
    d, budget = plan.denoisers[i], plan.budgets[i]
    assert len(ex["inputs"]) <= 512 and len(ex["targets"]) <= 512
    window, span_lengths = reconstruct(ex, d, plan.mode_ids[i])
    # A full window of consecutive ids, in order.
    assert len(window) == budget.window
    assert window == list(range(window[0], window[0] + len(window)))
    s = stats[d.name]
    s["examples"] += 1
    s["tokens"] += len(window)
    s["noise"] += sum(span_lengths)
    s["spans"] += len(span_lengths)
    s["max_spans"] = max(s["max_spans"], len(span_lengths))
    if span_lengths and window[-1] == ex["targets"][-2]:
      s["span_at_end"] += 1
    if span_lengths and window[0] == ex["targets"][1]:
      s["span_at_start"] += 1
  for d in plan.denoisers:
    s = stats[d.name]
    assert s["examples"] > 700, d.name
    if d.kind == D.PREFIX_LM:
      continue
    rate = s["noise"] / s["tokens"]
    assert abs(rate / d.corruption_rate - 1) < 0.10, (d.name, rate)
    mean_span = s["noise"] / s["spans"]
    if d.name == "X1":  # The sentinel policy: 100 spans, same rate, longer spans.
      assert s["max_spans"] == 100 and s["spans"] == 100 * s["examples"]
      assert mean_span == pytest.approx(411 / 100)
    else:
      assert abs(mean_span / d.mean_span_length - 1) < 0.15, (d.name, mean_span)
  # X3 (1 or 2 spans of ~64 in 598 tokens) is not always the suffix (T5's trap).
  x3 = stats["X3"]
  assert x3["span_at_end"] < 0.1 * x3["examples"], x3
  assert x3["span_at_start"] > 0


def test_s_splits_at_random_points(mixture_examples):
  s_index = [d.name for d in D.UL2_DENOISERS].index("S")
  prefixes = [len(ex["inputs"]) - 2 for ex in mixture_examples if ex["denoiser"] == s_index]
  # Uniform over 1..510.
  assert min(prefixes) >= 1 and max(prefixes) <= 510
  assert abs(np.mean(prefixes) - 255.5) < 15
  assert len(set(prefixes)) > 300


def test_same_seed_same_examples(features):
  documents = consecutive_documents(300, 700, seed=3)
  a, b = run(features, documents, seed=5), run(features, documents, seed=5)
  c = run(features, documents, seed=6)
  assert len(a) == len(b) == len(c) == 300
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert sum(np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c)) < 30


@pytest.mark.parametrize("length", [1, 2, 3, 5, 17, 100])
def test_short_documents_make_valid_examples(features, plan, length):
  documents = consecutive_documents(400, length, seed=length)
  examples = run(features, documents, seed=length)
  assert len(examples) == 400
  seen = set()
  for ex, doc in zip(examples, documents):
    i = int(ex["denoiser"])
    seen.add(i)
    window, span_lengths = reconstruct(ex, plan.denoisers[i], plan.mode_ids[i])
    assert window == doc.tolist()  # The whole document, nothing else.
    if plan.denoisers[i].kind == D.SPAN_CORRUPTION:
      assert 1 <= sum(span_lengths) <= max(length - 1, 1)
  assert seen == set(range(7))
  if length == 1:  # All noise, or all target.
    for ex in examples:
      mode = plan.mode_ids[int(ex["denoiser"])][0]
      if int(ex["denoiser"]) == 6:
        assert ex["inputs"].tolist() == [mode, EOS]
      else:
        assert ex["inputs"].tolist() == [mode, 8099, EOS]


def test_empty_documents_make_no_example_and_long_ones_are_chunked(features, plan):
  documents = [np.zeros([0], np.int32), np.arange(10, 4010, dtype=np.int32),
               np.zeros([0], np.int32)]
  examples = run(features, documents)
  assert len(examples) == math.ceil(4000 / plan.chunk_length) == 4
  chunks = [range(10 + k * 1000, 10 + (k + 1) * 1000) for k in range(4)]  # 1000 each.
  for ex, chunk in zip(examples, chunks):
    i = int(ex["denoiser"])
    window, _ = reconstruct(ex, plan.denoisers[i], plan.mode_ids[i])
    assert window == list(range(window[0], window[0] + len(window)))
    assert window[0] in chunk and window[-1] in chunk
    assert len(window) == min(1000, plan.budgets[i].window)


def test_custom_mixture_and_no_mode_token(features, vocab):
  mixture = (D.Denoiser("Y", mean_span_length=20, corruption_rate=0.3, weight=1),
             D.Denoiser("P", kind=D.PREFIX_LM, weight=3))
  examples = run(features, consecutive_documents(2000, 300), denoisers=mixture,
                 lengths={"inputs": 256, "targets": 128})
  counts = collections.Counter(int(ex["denoiser"]) for ex in examples)
  assert abs(counts[1] / 2000 - 0.75) < 0.03
  for ex in examples:
    d = mixture[int(ex["denoiser"])]
    window, _ = reconstruct(ex, d, ())
    assert window == list(range(window[0], window[0] + len(window)))
    assert len(ex["inputs"]) <= 256 and len(ex["targets"]) <= 128


def test_random_composition_and_span_layout():
  rng = np.random.default_rng(0)
  b, k = 500, 40
  bits = tf.constant(rng.integers(-2**31, 2**31 - 1, size=(b, 2 * k + 1)), tf.int32)
  noise = tf.constant(rng.integers(1, 200, size=b), tf.int32)
  nonnoise = tf.constant(rng.integers(0, 300, size=b), tf.int32)
  spans = tf.minimum(tf.minimum(noise, nonnoise + 1),
                     tf.constant(rng.integers(1, k + 1, size=b), tf.int32))
  parts = D.random_composition(noise, spans, bits[:, :k]).numpy()
  assert (parts >= 0).all() and (parts.sum(axis=1) == noise.numpy()).all()
  start, length = (x.numpy() for x in D.span_layout(noise, nonnoise, spans, bits))
  m = (noise + nonnoise).numpy()
  mask = D.noise_mask_from_spans(tf.constant(start), tf.constant(length), 600).numpy()
  for row in range(b):
    n = spans.numpy()[row]
    s, ln = start[row, :n], length[row, :n]
    assert (ln >= 1).all() and ln.sum() == noise.numpy()[row] and (length[row, n:] == 0).all()
    assert (np.diff(s) > ln[:-1]).all(), "inner gaps are non-empty"
    assert s[0] >= 0 and s[-1] + ln[-1] <= m[row]
    assert mask[row].sum() == ln.sum() and not mask[row, m[row]:].any()


def test_random_bits_depend_only_on_seed_and_counter():
  seeds = tf.constant([[1, 2], [1, 2], [1, 3]], tf.int64)
  a = D.random_bits(seeds, tf.constant([0, 1, 0]), 64).numpy()
  b = D.random_bits(seeds[::-1], tf.constant([0, 1, 0])[::-1], 64).numpy()[::-1]
  assert np.array_equal(a, b)
  assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
  bits = np.unpackbits(a.view(np.uint8))
  assert abs(bits.mean() - 0.5) < 0.02


def test_mode_token_missing_from_the_vocabulary_is_encoded(vocab, features):
  assert D.mode_token_ids(vocab, "[NLU]") == (vocab.tokenizer.piece_to_id("[NLU]"),)
  encoded = D.mode_token_ids(vocab, "[PARAPHRASE]")
  assert len(encoded) > 1 and encoded == tuple(vocab.encode("[PARAPHRASE]"))
  mixture = (D.Denoiser("P", mean_span_length=3, corruption_rate=0.15,
                        mode_token="[PARAPHRASE]"),)
  plan = D.make_plan(mixture, {"inputs": 64, "targets": 64}, vocab)
  assert plan.budgets[0].inputs_length <= 64
  examples = run(features, consecutive_documents(50, plan.budgets[0].window),
                 denoisers=mixture, lengths={"inputs": 64, "targets": 64})
  assert len(examples) == 50
  for ex in examples:
    assert len(ex["inputs"]) <= 64
    window, _ = reconstruct(ex, mixture[0], encoded)
    assert len(window) == plan.budgets[0].window


def stream_documents(n, seed=0, max_length=300):
  """Documents of 1..max_length tokens that continue one another: joined, they are one
  run of consecutive ids (wrapping inside 3..7999)."""
  lengths = np.random.default_rng(seed).integers(1, max_length + 1, size=n)
  stream = 3 + np.arange(lengths.sum()) % 7997
  return np.split(stream.astype(np.int32), np.cumsum(lengths)[:-1]), stream


def _consecutive(window):
  return all((b - a) % 7997 == 1 for a, b in zip(window, window[1:]))


@pytest.mark.parametrize("separator", [None, EOS])
def test_merged_windows_tile_the_stream_with_full_budgets(features, plan, separator):
  documents, stream = stream_documents(1000, seed=1)
  examples = run(features, documents, seed=2, merge=True, separator=separator)
  windows, short = [], 0
  for ex in examples:
    i = int(ex["denoiser"])
    window, _ = reconstruct(ex, plan.denoisers[i], plan.mode_ids[i])
    assert len(ex["inputs"]) <= 512 and len(ex["targets"]) <= 512
    assert len(window) <= plan.budgets[i].window
    short += len(window) < plan.budgets[i].window
    windows.extend(window)
  if separator is None:
    assert windows == stream.tolist()  # Nothing lost, repeated or reordered.
  else:  # The separator after every document.
    assert windows == [t for doc in documents for t in doc.tolist() + [separator]]
  # Full budgets, but for the last window of each batch of 128 documents.
  assert short <= math.ceil(1000 / 128)
  assert len(examples) > 8 * short


def test_merged_windows_keep_rates_spans_and_shares(features, plan):
  """On documents of 1..300 tokens, as on the bundled corpus: the rates and mean spans
  of a full window (per-document examples would get X3 spans of ~20)."""
  documents, _ = stream_documents(25_000, seed=3)
  examples = run(features, documents, seed=4, merge=True)
  counts, noise, tokens, spans = (collections.Counter() for _ in range(4))
  for ex in examples:
    i = int(ex["denoiser"])
    window, span_lengths = reconstruct(ex, plan.denoisers[i], plan.mode_ids[i])
    assert _consecutive(window)
    counts[i] += 1
    tokens[i] += len(window)
    noise[i] += sum(span_lengths)
    spans[i] += len(span_lengths)
  total = sum(counts.values())
  assert total > 5000
  for i, d in enumerate(plan.denoisers):
    assert abs(counts[i] / total - d.weight) < 0.02, (d.name, counts[i] / total)
    if d.kind == D.PREFIX_LM:
      continue
    assert abs(noise[i] / tokens[i] / d.corruption_rate - 1) < 0.05, d.name
    mean_span = noise[i] / spans[i]
    if d.name == "X1":
      assert mean_span == pytest.approx(4.1, abs=0.05)  # 100 sentinels for ~137 spans.
    else:
      assert abs(mean_span / d.mean_span_length - 1) < 0.1, (d.name, mean_span)


def test_merged_windows_are_deterministic_per_seed(features):
  documents, _ = stream_documents(300, seed=5)
  a, b = run(features, documents, seed=5, merge=True), run(features, documents, seed=5, merge=True)
  c = run(features, documents, seed=6, merge=True)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert [int(x["denoiser"]) for x in a] != [int(z["denoiser"]) for z in c]
