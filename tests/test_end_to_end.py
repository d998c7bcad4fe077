"""`ul2 train`, `ul2 eval` and `ul2 export` end to end, as a user runs them.

Real runs of the command on the bundled corpus (a few tiny steps each), in fresh
processes: the loss falls, per-denoiser losses are logged, a run interrupted and
resumed equals an uninterrupted one, and the export loads in `transformers` with
the same loss as ours.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

# Real `ul2` runs in fresh processes: the end-to-end tier.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = str(REPO / "gin" / "runs" / "local_tiny.gin")
# Small enough to be quick on 2 cores, big enough to learn something.
SMALL = ["--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
         "--gin.BATCH_SIZE=8"]


def ul2(*args, cache_dir=None, check=True):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  if cache_dir:  # Later processes reuse the first one's compiled steps.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  proc = subprocess.run([sys.executable, "-m", "ul2.main", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"ul2 {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def metrics(model_dir):
  """The complete lines of metrics.jsonl (a killed run may have torn the last)."""
  lines = (pathlib.Path(model_dir) / "metrics.jsonl").read_text().split("\n")[:-1]
  return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
  """A 60-step run with eval and checkpoints: the README's main job, shrunk."""
  model_dir = tmp_path_factory.mktemp("run")
  proc = ul2("train", f"--gin_file={RUN}", f"--model_dir={model_dir}", *SMALL,
             "--gin.TRAIN_STEPS=60", "--gin.LOG_PERIOD=10", "--gin.EVAL_PERIOD=60",
             "--gin.CHECKPOINT_PERIOD=30", "--gin.loop.TrainConfig.eval_steps=2",
             cache_dir=cache)
  return model_dir, proc.stdout


def test_training_lowers_the_loss_and_logs_each_denoiser(trained):
  model_dir, stdout = trained
  records = metrics(model_dir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
  assert train[0]["loss"] > 7.5               # ~ln(8192) = 9.0 at the start ...
  assert train[-1]["loss"] < train[0]["loss"] - 1.0   # ... and clearly falling.
  for r in train:
    assert r["tokens_per_second"] > 0 and r["learning_rate"] == pytest.approx(0.05)
  denoisers = {"R1", "R2", "X1", "X2", "X3", "X4", "S"}
  seen = {k.split("/", 1)[1] for r in train for k in r if k.startswith("loss/")}
  assert seen == denoisers
  for name in denoisers:
    per = [r[f"loss/{name}"] for r in train if f"loss/{name}" in r]
    assert per[-1] < per[0], name
  evals = [r for r in records if "eval/loss" in r]
  assert len(evals) == 1 and evals[0]["step"] == 60 and evals[0]["eval/loss"] < 8.0
  assert any(k.startswith("eval/loss/") for k in evals[0])
  # The baseline to judge a small run by: a unigram model of the same targets.
  assert 4.0 < evals[0]["eval/unigram_cross_entropy"] < 9.0
  assert "a unigram model of the targets" in stdout
  # The operative config, TensorBoard events and checkpoints are there.
  config = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 60" in config and "ModelConfig" in config
  assert list((model_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
  steps = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [30, 60]
  assert "step 60/60" in stdout and "R1" in stdout


@pytest.mark.slow
def test_the_quickstart_run_learns_more_than_word_frequencies(tmp_path, cache):
  """The README's main job, cut to its first 300 steps (the learning rate is constant,
  so they are the same steps): its validation cross-entropy is already well below a
  unigram model's of the same targets (the whole run ends more than 1 nat below)."""
  proc = ul2("train", f"--gin_file={RUN}", f"--model_dir={tmp_path}", "--gin.TRAIN_STEPS=300",
             "--gin.EVAL_PERIOD=300", "--gin.CHECKPOINT_PERIOD=300", cache_dir=cache)
  (evaluation,) = [r for r in metrics(tmp_path) if "eval/loss" in r]
  margin = evaluation["eval/unigram_cross_entropy"] - evaluation["eval/cross_entropy"]
  assert margin > 0.75, evaluation
  assert "nats better" in proc.stdout


def test_rerun_of_a_finished_run_does_nothing(trained, cache):
  model_dir, _ = trained
  proc = ul2("train", f"--gin_file={RUN}", f"--model_dir={model_dir}", *SMALL,
             "--gin.TRAIN_STEPS=60", cache_dir=cache)
  assert "nothing to do" in proc.stdout


def test_exact_resume_after_a_new_process(tmp_path, cache):
  args = [f"--gin_file={RUN}", *SMALL, "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0",
          "--gin.CHECKPOINT_PERIOD=3"]
  ul2("train", *args, f"--model_dir={tmp_path / 'straight'}", "--gin.TRAIN_STEPS=6",
      cache_dir=cache)
  ul2("train", *args, f"--model_dir={tmp_path / 'resumed'}", "--gin.TRAIN_STEPS=3",
      cache_dir=cache)
  proc = ul2("train", *args, f"--model_dir={tmp_path / 'resumed'}", "--gin.TRAIN_STEPS=6",
             cache_dir=cache)
  assert "resumed from step 3" in proc.stdout
  straight = [r["loss"] for r in metrics(tmp_path / "straight")]
  resumed = [r["loss"] for r in metrics(tmp_path / "resumed")]
  assert len(straight) == 6 and straight == resumed  # Bit for bit.

  from ul2 import loop, model  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  from ul2 import main  # pylint: disable=import-outside-toplevel
  main.parse_gin([str(tmp_path / "straight" / "config.gin")], [])
  config = gin.get_configurable(model.ModelConfig)()
  a, _ = loop.load_params(str(tmp_path / "straight"), config)
  b, _ = loop.load_params(str(tmp_path / "resumed"), config)
  import jax  # pylint: disable=import-outside-toplevel
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exact_resume_after_a_kill(tmp_path, cache):
  """SIGKILL mid-run (maybe mid-save); the rerun recomputes the lost steps exactly."""
  model_dir = tmp_path / "killed"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  args = [sys.executable, "-m", "ul2.main", "train", f"--gin_file={RUN}", *SMALL,
          f"--model_dir={model_dir}", "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0",
          "--gin.CHECKPOINT_PERIOD=5", "--gin.TRAIN_STEPS=100000"]
  proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  checkpoints = model_dir / "checkpoints"
  deadline = time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None:
      logged = [r["step"] for r in metrics(model_dir)] if (
          model_dir / "metrics.jsonl").exists() else []
      if (checkpoints / "5").is_dir() and logged and logged[-1] >= 7:
        break
      time.sleep(0.05)
  finally:
    proc.kill()
    proc.wait()
  before = {r["step"]: r["loss"] for r in metrics(model_dir)}
  killed_at = max(before)
  assert killed_at >= 7
  ul2("train", *args[4:-1], f"--gin.TRAIN_STEPS={killed_at + 2}", cache_dir=cache)
  records = metrics(model_dir)[len(before):]  # What the resumed process logged.
  resumed_from = records[0]["step"] - 1
  assert resumed_from % 5 == 0 and resumed_from < killed_at
  assert [r["step"] for r in records] == list(range(resumed_from + 1, killed_at + 3))
  for r in records:
    if r["step"] in before:  # Computed before the kill and again after it.
      assert r["loss"] == before[r["step"]], r["step"]


def test_eval_verb_reports_the_checkpoint(trained, cache):
  model_dir, _ = trained
  proc = ul2("eval", f"--model_dir={model_dir}", "--eval_steps=2",
             cache_dir=cache)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["step"] == 60
  evals = [r for r in metrics(model_dir) if "eval/loss" in r]
  assert result["eval/loss"] == pytest.approx(evals[0]["eval/loss"], rel=1e-5)


def test_export_loads_in_transformers_with_our_loss(trained, tmp_path):
  model_dir, _ = trained
  out = tmp_path / "hf"
  ul2("export", f"--model_dir={model_dir}", f"--output_dir={out}")
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 8099
  texts = ["[NLU] The history of <extra_id_0> is long.", "[S2S] Python is a language"]
  targets = ["<extra_id_0> Alberta", "for programming."]
  enc = tokenizer(texts, return_tensors="pt", padding=True)
  labels = tokenizer(targets, return_tensors="pt", padding=True).input_ids
  labels[labels == tokenizer.pad_token_id] = -100
  with torch.no_grad():
    hf_out = hf(**enc, labels=labels)

  import gin  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ul2 import loop, main, model, trainer  # pylint: disable=import-outside-toplevel
  main.parse_gin([str(model_dir / "config.gin")], [])
  config = gin.get_configurable(model.ModelConfig)()
  params, step = loop.load_params(str(model_dir), config)
  assert step == 60
  target_tokens = np.where(labels.numpy() < 0, 0, labels.numpy())
  decoder_inputs = np.pad(target_tokens[:, :-1], ((0, 0), (1, 0)))
  logits = model.Transformer(config).apply(
      {"params": params}, encoder_input_tokens=enc.input_ids.numpy(),
      decoder_input_tokens=decoder_inputs)
  np.testing.assert_allclose(np.asarray(logits), hf_out.logits.numpy(), atol=1e-4)
  sums = trainer.loss_sums(logits, {"decoder_target_tokens": jnp.asarray(target_tokens),
                                    "decoder_loss_weights": jnp.asarray(target_tokens > 0)},
                           z_loss=0.0, num_denoisers=1)
  assert float(sums["loss"] / sums["tokens"]) == pytest.approx(float(hf_out.loss), rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--gin.model.ModelConfig.d_modle=64"], "d_modle"),
    (["--gin.MIXTURE_OR_TASK_NAME='local_ul3'"], "local_ul2"),
    (["--gin.BATCH_SIZE=7"], "not divisible"),
    (["--gin_file=gin/runs/nope.gin"], "not found"),
    (["--gin.TRAIN_STEPS"], "--gin.NAME=VALUE"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
  proc = ul2("train", f"--model_dir={tmp_path}", *args, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("ul2 train: error:")]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_unwritable_model_dir_is_one_clear_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = ul2("train", f"--model_dir={blocker / 'sub'}", *SMALL, check=False)
  assert proc.returncode == 2
  assert "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_a_diverging_run_stops_and_keeps_its_good_checkpoint(tmp_path, capsys):
  """Resumed with a learning rate of 1e6, the run diverges: it stops with one line
  naming the last good checkpoint, saves nothing of the diverged state, exits 2."""
  from ul2 import main  # pylint: disable=import-outside-toplevel
  args = ["train", f"--gin_file={RUN}", f"--model_dir={tmp_path}", *SMALL,
          "--gin.LOG_PERIOD=5", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=10"]
  assert main.main([*args, "--gin.TRAIN_STEPS=10"]) == 0
  capsys.readouterr()
  assert main.main([*args, "--gin.TRAIN_STEPS=30",
                    "--gin.optimizers.OptimizerConfig.learning_rate=1e6"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ul2 train: error: the loss or the gradient "
                                             "norm is not finite by step 15"), err
  assert "The last good checkpoint is step 10" in err[0]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [10]
  assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path) if r["step"] <= 10)
