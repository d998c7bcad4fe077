"""`ul2 infer` and the decoding behind it: greedy and beam search equal to transformers'
`generate` on an exported model, beam search with a length penalty equal to a brute
force over every sequence, reproducible sampling, scoring equal to transformers'
loss, and the command's files, model_dirs, tasks and one-line errors."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2 import assets, checkpoint, decoding, export, main, model_settings
from ul2.model import ModelConfig
from model_testing import apply, random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Equal stack depths: transformers' generate sizes its decoder cache by num_layers.
CONFIG = ModelConfig(vocab_size=8192, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                     num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
LENGTH = 12
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello",
         "Python's help topics and about a hundred Wikipedia articles, one paragraph a line.",
         "A short one."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  params = random_params(CONFIG, seed=2)
  out = tmp_path_factory.mktemp("hf")
  export.save_hf(params, CONFIG, assets.VOCAB_PATH, out)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  return params, out, hf


def _inputs(seed=3):
  """4 rows of different lengths (20, 6, 15, 11), 0-padded."""
  enc = np.random.default_rng(seed).integers(3, 8100, (4, 20)).astype(np.int32)
  for row, length in ((1, 6), (2, 15), (3, 11)):
    enc[row, length:] = 0
  return enc


def _until_eos(row, eos):
  row = list(row)
  return row[:row.index(eos) + 1] if eos in row else row


def _eos_choices(params):
  """EOS 1 and the three tokens greedy decoding emits most: rows and beams then end
  at different steps."""
  tokens = np.asarray(decoding.generate(params, CONFIG, _inputs(), max_decode_length=LENGTH))
  values, counts = np.unique(tokens, return_counts=True)
  return [1] + [int(v) for v in values[np.argsort(-counts, kind="stable")[:3]]]


def _hf_generate(hf, enc, eos, **kwargs):
  with torch.no_grad():
    return hf.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                       attention_mask=torch.tensor(enc != 0), max_new_tokens=LENGTH,
                       eos_token_id=eos, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True, **kwargs)


def test_greedy_ids_and_scores_equal_transformers(exported):
  params, _, hf = exported
  enc = _inputs()
  ended_early = 0
  for eos in _eos_choices(params):
    tokens, logprobs = decoding.sample(params, CONFIG, enc, max_decode_length=LENGTH,
                                       eos_id=eos)
    out = _hf_generate(hf, enc, eos, do_sample=False, num_beams=1)
    steps = hf.compute_transition_scores(out.sequences, out.scores,
                                         normalize_logits=True).numpy()
    for row in range(len(enc)):
      theirs = _until_eos(out.sequences[row, 1:].tolist(), eos)
      assert _until_eos(np.asarray(tokens)[row].tolist(), eos) == theirs
      np.testing.assert_allclose(logprobs[row], steps[row, :len(theirs)].sum(), atol=1e-4)
      ended_early += len(theirs) < LENGTH
  assert ended_early >= 1  # A row stopped at EOS.


def test_beam_search_with_no_length_penalty_equals_transformers(exported):
  params, _, hf = exported
  enc = _inputs()
  ended_early = 0
  for eos in _eos_choices(params):
    tokens, scores, logprobs = decoding.beam_search(
        params, CONFIG, enc, num_beams=4, max_decode_length=LENGTH, alpha=0.0, eos_id=eos)
    out = _hf_generate(hf, enc, eos, do_sample=False, num_beams=4, num_return_sequences=4,
                       length_penalty=0.0, early_stopping=False)
    theirs = out.sequences[:, 1:].numpy().reshape(4, 4, -1)
    for row, beam in itertools.product(range(4), range(4)):
      ours = _until_eos(np.asarray(tokens)[row, beam].tolist(), eos)
      assert ours == _until_eos(theirs[row, beam].tolist(), eos), (eos, row, beam)
      assert not np.asarray(tokens)[row, beam, len(ours):].any()
      ended_early += len(ours) < LENGTH
    np.testing.assert_allclose(scores, out.sequences_scores.numpy().reshape(4, 4), atol=1e-4)
    np.testing.assert_array_equal(scores, logprobs)  # alpha 0: the sum of log-probs.
  assert ended_early >= 2  # Beams that ended at EOS before the last step.


def _teacher_forced_logprobs(params, config, enc_row, seqs, length):
  """Summed log-probabilities of each sequence, from one full (uncached) forward pass."""
  dec = np.zeros((len(seqs), length), np.int32)
  for i, seq in enumerate(seqs):
    dec[i, 1:len(seq)] = seq[:-1]
  enc = np.repeat(enc_row[None], len(seqs), axis=0)
  logits = np.asarray(apply(config, {"params": params}, enc, dec), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return [float(sum(logp[i, j, t] for j, t in enumerate(seq))) for i, seq in enumerate(seqs)]


@pytest.mark.parametrize("width", [1000, 4 * 8192 + 3])
def test_top_k_equals_lax_top_k_with_ties(width):
  rng = np.random.default_rng(width)
  x = rng.integers(-6, 6, (5, width)).astype(np.float32)  # Many ties.
  x[1] = decoding.NEG_INF
  x[2, -7:] = 50.0  # The best entries in the last, partial block.
  x[3] = rng.standard_normal(width)
  for k in (1, 8, 9):
    ours, theirs = decoding.top_k(x, k), jax.lax.top_k(x, k)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


@pytest.mark.parametrize("width", [7, 1000, 32128])
def test_argmax_and_token_log_softmax_equal_jax(width):
  rng = np.random.default_rng(width)
  x = rng.integers(-6, 6, (7, width)).astype(np.float32)  # Many ties.
  x[1] = -np.inf
  x[2, -1] = 50.0  # The maximum in the last (padded) slab.
  x[3] = rng.standard_normal(width)
  x[4, width // 2:] = np.nan  # NaN counts as the maximum, as in jnp.argmax.
  x[5, 3 % width] = np.inf
  index, top = jax.jit(decoding.argmax)(x)
  np.testing.assert_array_equal(index, jnp.argmax(x, axis=-1))
  np.testing.assert_array_equal(top[:, 0], jnp.max(x, axis=-1))
  tokens = np.asarray(index)[[0, 2, 3, 6]]
  rows = x[[0, 2, 3, 6]]
  ours = decoding.token_log_softmax(rows, tokens)
  theirs = jnp.take_along_axis(jax.nn.log_softmax(rows, axis=-1), tokens[:, None], axis=-1)[:, 0]
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("alpha", [0.6, 3.0])
def test_beam_search_with_length_penalty_equals_brute_force(alpha):
  # Vocabulary 4 (pad 0, EOS 1, 2, 3), 3 steps: 40 hypotheses, [EOS], [a, EOS] and
  # [a, b, c] (the last unfinished at the length limit). 36 beams hold every prefix
  # and every candidate, so beam search must return exactly the 36 best.
  cfg = ModelConfig(vocab_size=4, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                    num_encoder_layers=1, num_decoder_layers=2, dtype="float32")
  params = random_params(cfg, seed=7)
  enc = np.asarray([[2, 3, 3, 2, 1], [3, 2, 1, 0, 0]], np.int32)
  tokens, scores, logprobs = decoding.beam_search(params, cfg, enc, num_beams=36,
                                                  max_decode_length=3, alpha=alpha)
  non_eos = (0, 2, 3)
  hypotheses = ([(1,)] + [(a, 1) for a in non_eos]
                + [(a, b, c) for a in non_eos for b in non_eos for c in range(4)])
  assert len(hypotheses) == 40
  for row in range(2):
    logprob = _teacher_forced_logprobs(params, cfg, enc[row], hypotheses, 3)
    ranked = sorted(((lp / ((5 + len(h)) / 6) ** alpha, lp, h)
                     for h, lp in zip(hypotheses, logprob)), reverse=True)[:36]
    got = [tuple(np.asarray(tokens)[row, i, :len(h)].tolist()) for i, (_, _, h) in
           enumerate(ranked)]
    assert got == [h for _, _, h in ranked]
    np.testing.assert_allclose(scores[row], [s for s, _, _ in ranked], atol=1e-4)
    np.testing.assert_allclose(logprobs[row], [lp for _, lp, _ in ranked], atol=1e-4)
    lengths = {len(h) for _, _, h in ranked[:10]}
    assert len(lengths) > 1 or alpha < 1  # A strong penalty mixes lengths at the top.


def test_sampling_is_reproducible_per_row_and_filters(exported):
  params, _, _ = exported
  enc = _inputs()
  keys = jax.random.split(jax.random.key(5), 4)
  run = lambda k, **kw: np.asarray(decoding.sample(
      params, CONFIG, enc, max_decode_length=LENGTH, temperature=1.0, rng=k, **kw)[0])
  first = run(keys)
  np.testing.assert_array_equal(first, run(keys))
  assert not np.array_equal(first, run(jax.random.split(jax.random.key(6), 4)))
  # A row's draws depend on its own key only, not on the rest of the batch.
  alone = np.asarray(decoding.sample(params, CONFIG, enc[2:3], max_decode_length=LENGTH,
                                     temperature=1.0, rng=keys[2:3])[0])
  np.testing.assert_array_equal(alone[0], first[2])
  greedy = np.asarray(decoding.generate(params, CONFIG, enc, max_decode_length=LENGTH))
  np.testing.assert_array_equal(run(keys, top_k=1), greedy)
  np.testing.assert_array_equal(run(keys, top_p=1e-6), greedy)


def _targets():
  tgt = np.random.default_rng(4).integers(3, 8100, (4, 9)).astype(np.int32)
  for row, length in enumerate((9, 3, 6, 1)):
    tgt[row, length - 1] = 1
    tgt[row, length:] = 0
  return tgt


def test_score_equals_transformers_loss_times_target_length(exported):
  params, _, hf = exported
  enc, tgt = _inputs(), _targets()
  ours = np.asarray(decoding.score(params, CONFIG, enc, tgt))
  for row in range(4):
    labels = tgt[row][tgt[row] > 0]
    mask = enc[row] > 0
    with torch.no_grad():
      loss = hf(input_ids=torch.tensor(enc[row][mask][None], dtype=torch.long),
                labels=torch.tensor(labels[None], dtype=torch.long)).loss.item()
    np.testing.assert_allclose(ours[row], -loss * len(labels), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------
# The command.


def _infer(*args):
  return main.main(["infer", *map(str, args)])


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("in") / "in.jsonl"
  path.write_text("".join(json.dumps({"inputs": t, "targets": t.split()[0]}) + "\n"
                          for t in TEXTS))
  return path


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_command_equals_transformers_generate(exported, inputs_file, tmp_path, capsys,
                                              decode):
  _, hf_dir, hf = exported
  out = tmp_path / "out.jsonl"
  assert _infer("--hf_dir", hf_dir, "--input_file", inputs_file, "--output_file", out,
                f"--decode={decode}", "--num_beams=4", "--length_penalty=0",
                f"--max_decode_length={LENGTH}", "--batch_size=2") == 0
  assert "tokens/s" in capsys.readouterr().out
  lines = _lines(out)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  vocab = pytest.importorskip("seqio").SentencePieceVocabulary(
      str(hf_dir / "spiece.model"), extra_ids=100)
  assert [r["inputs"] for r in lines] == TEXTS
  for r in lines:
    assert r["input_ids"] == tokenizer(r["inputs"]).input_ids
    assert r["targets"] == r["inputs"].split()[0]
    beams = {"num_beams": 4, "length_penalty": 0.0} if decode == "beam" else {}
    theirs = _hf_generate(hf, np.asarray([r["input_ids"]]), 1, do_sample=False, **beams)
    ids = _until_eos(theirs.sequences[0, 1:].tolist(), 1)
    assert r["prediction_ids"] == ids
    # The text is the training vocabulary's (seqio's) decoding: unlike the HF
    # tokenizer's, it keeps sentinels and shows <unk> and the ids that pad the
    # vocabulary to 8192 (which random weights emit) as "⁇".
    assert r["prediction"] == vocab.decode(ids)
    if decode == "beam":
      assert abs(r["score"] - theirs.sequences_scores.item()) < 1e-4
      assert r["beam_score"] == r["score"]


@pytest.mark.slow
def test_command_scores_targets(exported, inputs_file, tmp_path):
  _, hf_dir, hf = exported
  out = tmp_path / "scores.jsonl"
  assert _infer("--hf_dir", hf_dir, "--input_file", inputs_file, "--output_file", out,
                "--score") == 0
  for r in _lines(out):
    assert "prediction" not in r and r["target_ids"][-1] == 1
    with torch.no_grad():
      loss = hf(input_ids=torch.tensor([r["input_ids"]]),
                labels=torch.tensor([r["target_ids"]])).loss.item()
    assert abs(r["score"] + loss * len(r["target_ids"])) < 1e-4


@pytest.mark.slow
def test_command_sampling_is_reproducible(exported, tmp_path):
  _, hf_dir, _ = exported
  path = tmp_path / "in.txt"
  path.write_text("".join(t + "\n" for t in TEXTS))
  runs = {}
  for name, seed, batch in (("a", 1, 1), ("b", 1, 16), ("c", 2, 1)):
    runs[name] = tmp_path / f"{name}.jsonl"
    assert _infer("--hf_dir", hf_dir, "--input_file", path, "--output_file", runs[name],
                  "--decode=sample", "--temperature=1.5", "--top_k=50", f"--seed={seed}",
                  f"--batch_size={batch}", f"--max_decode_length={LENGTH}") == 0
  ids = {k: [r["prediction_ids"] for r in _lines(v)] for k, v in runs.items()}
  assert ids["a"] == ids["b"] != ids["c"]


def _model_dir(tmp_path, params, cfg=CONFIG, lengths=None):
  """A model_dir as `ul2 train` leaves it: a checkpoint and model_config.json."""
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, params, {"count": np.zeros((), np.int32)}, {"batches_consumed": 5})
  ckpt.close()
  model_settings.write(tmp_path, model_settings.ModelSettings(
      model=cfg, vocab_path=str(assets.VOCAB_PATH), extra_ids=assets.EXTRA_IDS,
      task_feature_lengths=lengths or {"inputs": 64, "targets": 64},
      mixture_or_task_name="local_ul2"))
  return tmp_path


@pytest.mark.slow
def test_command_reads_a_model_dir_and_a_task(exported, tmp_path, capsys):
  params, hf_dir, _ = exported
  model_dir = _model_dir(tmp_path / "run", params)
  settings = model_settings.read(model_dir)
  assert settings.model == CONFIG and settings.vocab_path == str(assets.VOCAB_PATH)
  (model_dir / "config.gin").write_text("import os\nos.system.command = 'touch /tmp/x'\n")
  text = tmp_path / "in.txt"
  text.write_text("".join(t + "\n" for t in TEXTS))
  outs = {}
  for name, source in (("dir", ["--model_dir", model_dir]), ("hf", ["--hf_dir", hf_dir])):
    outs[name] = tmp_path / f"{name}.jsonl"
    assert _infer(*source, "--input_file", text, "--output_file", outs[name],
                  f"--max_decode_length={LENGTH}") == 0
  assert _lines(outs["dir"]) == _lines(outs["hf"])
  assert "step 5" in capsys.readouterr().out

  out = tmp_path / "task.jsonl"
  assert _infer("--model_dir", model_dir, "--task=local_ul2", "--split=validation",
                "--num_examples=3", "--output_file", out, "--batch_size=8",
                f"--max_decode_length={LENGTH}") == 0
  lines = _lines(out)
  assert len(lines) == 3 and all(r["target_ids"][-1] == 1 for r in lines)
  assert all(len(r["input_ids"]) <= 64 for r in lines)
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert metrics["task"] == "local_ul2" and 0.0 <= metrics["exact_match"] <= 1.0


def _one_error(capsys, code=2):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize("content,flags,message", [
    ("first\n\nthird\n", [], "in.txt:2: empty input line"),
    ('{"inputs": "a"}\n{"inputs": "b"\n', [], "in.jsonl:2: invalid JSON"),
    ('{"inputs": "a"}\n{"text": "b"}\n', [], "in.jsonl:2: no 'inputs' key"),
    ('{"inputs": "a"}\n', ["--score"], "in.jsonl:1: no 'targets' key"),
    ('{"inputs": "a"}\n', ["--decode=beam", "--num_beams=9000"],
     "--num_beams=9000 must be between 1 and the vocabulary size (8192)"),
    ('{"inputs": "a"}\n', ["--decode=beem"], "unknown --decode='beem'"),
])
def test_bad_input_is_one_line(exported, tmp_path, capsys, content, flags, message):
  _, hf_dir, _ = exported
  path = tmp_path / ("in.txt" if content.startswith("first") else "in.jsonl")
  path.write_text(content)
  assert _infer("--hf_dir", hf_dir, "--input_file", path, "--output_file",
                tmp_path / "out.jsonl", *flags) == 2
  line = _one_error(capsys)
  assert line.startswith("ul2 infer: error: ") and message in line


def test_model_dir_without_settings_says_how_to_proceed(tmp_path, capsys):
  (tmp_path / "config.gin").write_text("")
  (tmp_path / "in.txt").write_text("hello\n")
  assert _infer("--model_dir", tmp_path, "--input_file", tmp_path / "in.txt",
                "--output_file", tmp_path / "out.jsonl") == 2
  line = _one_error(capsys)
  assert "model_config.json not found" in line and "--hf_dir" in line


@pytest.mark.slow
def test_long_inputs_are_truncated_with_one_warning(exported, tmp_path, capsys):
  params, _, _ = exported
  model_dir = _model_dir(tmp_path / "run", params, lengths={"inputs": 16, "targets": 4})
  (tmp_path / "in.txt").write_text("short\n" + "many words " * 20 + "\n" + "more " * 30 + "\n")
  out = tmp_path / "out.jsonl"
  assert _infer("--model_dir", model_dir, "--input_file", tmp_path / "in.txt",
                "--output_file", out) == 0
  warning = _one_error(capsys)
  assert "warning: 2 of 3 inputs were longer than the model takes (16 input tokens" in warning
  lengths = [len(r["input_ids"]) for r in _lines(out)]
  assert lengths[0] < 16 and lengths[1:] == [16, 16]
  assert all(r["input_ids"][-1] == 1 and len(r["prediction_ids"]) <= 4 for r in _lines(out))


@pytest.mark.slow
def test_train_writes_model_settings_that_infer_reads(tmp_path, capsys):
  run = str(assets.ASSETS_DIR.parents[1] / "gin" / "runs" / "local_tiny.gin")
  assert main.main(["train", f"--gin_file={run}", f"--model_dir={tmp_path}",
                    "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.CHECKPOINT_PERIOD=2",
                    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}"]) == 0
  settings = model_settings.read(tmp_path)
  assert settings.task_feature_lengths == {"inputs": 64, "targets": 64}
  assert settings.mixture_or_task_name == "local_ul2" and settings.extra_ids == 100
  (tmp_path / "in.txt").write_text("hello world\n")
  assert _infer("--model_dir", tmp_path, "--input_file", tmp_path / "in.txt",
                "--output_file", tmp_path / "out.jsonl", "--decode=beam") == 0
  (line,) = _lines(tmp_path / "out.jsonl")
  assert 1 <= len(line["prediction_ids"]) <= 64


def test_dataclass_fields_round_trip(tmp_path):
  cfg = dataclasses.replace(CONFIG, scan_layers=True, activation="gelu")
  settings = model_settings.ModelSettings(cfg, "/v.model", 100, {"inputs": 8, "targets": 4},
                                          "t")
  model_settings.write(tmp_path, settings)
  assert model_settings.read(tmp_path) == settings


def test_encoder_in_pieces_equals_the_whole_batch(exported, monkeypatch):
  params = exported[0]
  whole = decoding._encode(params, CONFIG, _inputs())[3]
  monkeypatch.setattr(decoding, "ENCODE_ROWS", 1)  # 4 pieces of one row, rows in order.
  np.testing.assert_allclose(decoding._encode(params, CONFIG, _inputs())[3], whole, rtol=1e-5, atol=1e-5)


def test_cpu_device_per_core_keeps_a_count_the_user_set():
  from ul2 import infer  # pylint: disable=import-outside-toplevel
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
  cores = infer.cpu_device_per_core(environ)
  if cores is not None:  # None on a one-core machine.
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {infer.CPU_DEVICES_FLAG}={cores}"
  user = {"XLA_FLAGS": f"{infer.CPU_DEVICES_FLAG}=3"}
  assert infer.cpu_device_per_core(user) is None and user["XLA_FLAGS"] == f"{infer.CPU_DEVICES_FLAG}=3"
