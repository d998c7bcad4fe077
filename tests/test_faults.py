"""Fault injection: each fault a run can meet, what the user sees, and that nothing
good is lost.

Checkpoint level (fast): flipped bytes, a truncated or garbage chunk, a missing
item and garbage metadata are each detected on restore (`checkpoint.Unreadable`),
and `restore_newest_good` falls back to the previous step. The lock refuses a
second writer and takes over a dead one's.

Run level (slow, real `ul2 train`): a corrupted newest checkpoint makes the run
resume exactly from the previous one (and set the bad one aside); SIGTERM saves
the current step, exits 0 and resumes exactly; a second `ul2 train` on the same
model_dir is refused; a `config.gin` that would run a command is never executed
by eval or export; a disk that fills mid-save ends the run in one line with the
earlier checkpoints intact.
"""

import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2 import assets
from ul2 import checkpoint
from ul2 import main
from ul2 import run_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = [f"--gin_file={REPO / 'gin' / 'runs' / 'local_tiny.gin'}",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", "--gin.BATCH_SIZE=8",
       "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=4"]


# --------------------------------------------------------------- checkpoint level

def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(32,)), jnp.bfloat16),
          "n": jnp.asarray(seed, jnp.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding), tree)


@pytest.fixture
def saved(tmp_path):
  """Steps 1 and 2 of a (params, opt_state, meta) checkpoint, synchronously."""
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _tree(step), _tree(10 + step), {"batches_consumed": step})
  ckpt.close()
  return tmp_path


def _largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(path, count=64):
  data = bytearray(path.read_bytes())
  rng = np.random.default_rng(0)
  for i in rng.choice(len(data), size=min(count, len(data)), replace=False):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _corrupt(step_dir, fault):
  if fault == "flipped bytes":
    _flip_bytes(_largest_file(step_dir / "params"))
  elif fault == "truncated chunk":
    path = _largest_file(step_dir / "params")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif fault == "random bytes":
    path = _largest_file(step_dir / "opt_state")
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
  elif fault == "missing opt_state":
    shutil.rmtree(step_dir / "opt_state")
  elif fault == "garbage metadata":
    (step_dir / "meta" / "metadata").write_text("not json {")
  else:
    raise ValueError(fault)


FAULTS = ["flipped bytes", "truncated chunk", "random bytes", "missing opt_state",
          "garbage metadata"]


def test_fingerprint_sees_one_flipped_bit_and_ignores_the_sharding():
  tree = _tree(0)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = {**tree, "w": jax.device_put(tree["w"], jax.NamedSharding(
      mesh, jax.sharding.PartitionSpec("x")))}
  assert checkpoint.fingerprint(sharded) == checkpoint.fingerprint(tree)
  bits = np.asarray(tree["w"]).view(np.uint32).copy()
  bits[17, 3] ^= 1 << 20
  flipped = {**tree, "w": jnp.asarray(bits.view(np.float32))}
  assert checkpoint.fingerprint(flipped) != checkpoint.fingerprint(tree)
  swapped = {**tree, "w": tree["w"][::-1]}
  assert checkpoint.fingerprint(swapped) != checkpoint.fingerprint(tree)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_corrupt_step_is_unreadable_and_the_previous_one_restores(saved, fault):
  _corrupt(saved / "checkpoints" / "2", fault)
  ckpt = checkpoint.Checkpointer(saved, read_only=True)
  with pytest.raises(checkpoint.Unreadable, match="checkpoint step 2 is unreadable"):
    ckpt.restore(2, _abstract(_tree(2)), _abstract(_tree(12)))
  warnings = []
  step, params, opt_state, meta = ckpt.restore_newest_good(
      _abstract(_tree(2)), _abstract(_tree(12)), warn=warnings.append)
  assert step == 1 and meta["batches_consumed"] == 1
  for got, want in zip(jax.tree.leaves((params, opt_state)),
                       jax.tree.leaves((_tree(1), _tree(11)))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint step 2 is "
                                                       "unreadable: ")
  assert "trying the previous checkpoint" in warnings[0]
  ckpt.close()


def test_flipped_value_bits_are_caught_by_the_checksum(saved):
  """Bytes flipped where orbax cannot notice (the stored values themselves) restore
  without an error from orbax; the checksum still refuses them."""
  ckpt = checkpoint.Checkpointer(saved, async_save=False)
  meta = json.loads((saved / "checkpoints" / "2" / "meta" / "metadata").read_text())
  tampered = _tree(2)
  tampered["w"] = tampered["w"].at[0, 0].add(1.0)  # What a silent flip restores as.
  ckpt.save(3, tampered, _tree(12), {"batches_consumed": 2})
  ckpt.wait()
  # Give step 3 step 2's checksums: its values now differ from what they promise.
  meta3 = saved / "checkpoints" / "3" / "meta" / "metadata"
  record = json.loads(meta3.read_text())
  record["checksums"]["params"] = meta["checksums"]["params"]
  meta3.write_text(json.dumps(record))
  with pytest.raises(checkpoint.Unreadable, match="params do not match the checksum"):
    ckpt.restore(3, _abstract(_tree(2)), _abstract(_tree(12)))
  ckpt.close()


def test_no_good_checkpoint_is_an_error_naming_each_step(saved):
  for step in (1, 2):
    _corrupt(saved / "checkpoints" / str(step), "garbage metadata")
  ckpt = checkpoint.Checkpointer(saved, read_only=True)
  with pytest.raises(checkpoint.Unreadable, match="no checkpoint in .* is readable "
                     r"\(step 2: JSONDecodeError: .*; step 1: JSONDecodeError: "):
    ckpt.restore_newest_good(_abstract(_tree(2)), _abstract(_tree(12)), warn=lambda m: None)
  ckpt.close()


def _holder(model_dir):
  """A process holding `model_dir`'s lock until killed."""
  code = (f"from ul2 import run_lock; import time\n"
          f"with run_lock.hold({str(model_dir)!r}):\n  print('held', flush=True); "
          "time.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          cwd=REPO)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(run_lock.LockHeld, match=f"already being trained by pid {proc.pid} "
                       "on host "):
      with run_lock.hold(tmp_path):
        pass
  finally:
    proc.kill()  # kill -9: no clean-up; the kernel drops its flock.
    proc.wait()
  warnings = []
  with run_lock.hold(tmp_path, warn=warnings.append):
    assert json.loads((tmp_path / run_lock.FILENAME).read_text())["pid"] == os.getpid()
  assert len(warnings) == 1 and f"left by pid {proc.pid}" in warnings[0]
  assert "no longer running" in warnings[0]
  with run_lock.hold(tmp_path, warn=warnings.append):  # A clean exit leaves no holder.
    pass
  assert len(warnings) == 1


# ---------------------------------------------------------------------- run level

def _metrics(model_dir):
  lines = (pathlib.Path(model_dir) / "metrics.jsonl").read_text().split("\n")[:-1]
  return [json.loads(line) for line in lines]


def _losses(model_dir):
  return {r["step"]: r["loss"] for r in _metrics(model_dir) if "loss" in r}


def _steps(model_dir):
  return sorted(int(p.name) for p in (pathlib.Path(model_dir) / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """8 steps, checkpoints at 4 and 8, every loss logged: the reference."""
  model_dir = tmp_path_factory.mktemp("straight")
  assert main.main(["train", *RUN, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8"]) == 0
  return model_dir


def _copy(model_dir, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(model_dir, target)
  return target


@pytest.mark.slow
# Each fault is detected at checkpoint level above; a run meets one of each kind:
# bad values, a bad chunk, a missing item.
@pytest.mark.parametrize("fault", ["flipped bytes", "truncated chunk", "missing opt_state"])
def test_training_resumes_exactly_from_the_step_before_a_corrupt_one(
    straight, tmp_path, capsys, fault):
  model_dir = _copy(straight, tmp_path)
  _corrupt(model_dir / "checkpoints" / "8", fault)
  capsys.readouterr()
  # Rerun to step 8 after "losing" the logs of steps 5-8: they are recomputed.
  (model_dir / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in _metrics(straight) if r["step"] <= 4))
  assert main.main(["train", *RUN, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8"]) == 0
  out = capsys.readouterr()
  warnings = [l for l in out.err.splitlines() if "warning" in l]
  assert len(warnings) == 1 and "checkpoint step 8 is unreadable" in warnings[0], out.err
  assert "resumed from step 4" in out.out
  assert "moved unreadable checkpoint step 8" in out.out
  assert _losses(model_dir) == _losses(straight)  # Steps 5-8 again, bit for bit.
  assert _steps(model_dir) == [4, 8]
  assert [p.name.split(".")[0] for p in (model_dir / "checkpoints.unreadable").iterdir()] == ["8"]
  # And the new step 8 holds the same parameters as the reference's.
  from ul2 import loop, model_settings  # pylint: disable=import-outside-toplevel
  config = model_settings.read(model_dir).model
  a, _ = loop.load_params(str(model_dir), config)
  b, _ = loop.load_params(str(straight), config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_eval_and_export_fall_back_or_name_the_bad_step(straight, tmp_path, capsys):
  model_dir = _copy(straight, tmp_path)
  _corrupt(model_dir / "checkpoints" / "8", "flipped bytes")
  capsys.readouterr()
  assert main.main(["export", f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'hf'}"]) == 0
  out = capsys.readouterr()
  assert "step 4 of" in out.out and "checkpoint step 8 is unreadable" in out.err
  assert main.main(["export", f"--model_dir={model_dir}", "--step=8",
                    f"--output_dir={tmp_path / 'hf8'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ul2 export: error: checkpoint step 8 is "
                                             "unreadable: "), err
  assert main.main(["eval", f"--model_dir={model_dir}", "--step=8", "--eval_steps=1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "checkpoint step 8 is unreadable" in err[0]


@pytest.mark.slow
def test_a_config_gin_that_would_run_a_command_is_never_executed(straight, tmp_path, capsys):
  model_dir = _copy(straight, tmp_path)
  marker = tmp_path / "pwned"
  (model_dir / "config.gin").write_text(
      "from __gin__ import dynamic_registration\nimport os\n"
      f"MIXTURE_OR_TASK_NAME = @os.system()\nos.system.command = 'touch {marker}'\n")
  assert main.main(["eval", f"--model_dir={model_dir}", "--eval_steps=1"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 8
  assert main.main(["export", f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'hf'}"]) == 0
  assert not marker.exists()


def _ul2_train(model_dir, *args, preexec_fn=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.Popen([sys.executable, "-m", "ul2.main", "train", *RUN,
                           f"--model_dir={model_dir}", *args], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec_fn)


def _wait_for_step(model_dir, proc, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    if path.exists() and any(r["step"] >= step for r in _metrics(model_dir)):
      return
    time.sleep(0.05)
  raise AssertionError(f"no step {step}: {proc.poll()} {proc.communicate()}")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_resume_is_exact(straight, tmp_path, capsys):
  model_dir = tmp_path / "preempted"
  proc = _ul2_train(model_dir, "--gin.TRAIN_STEPS=100000")
  try:
    _wait_for_step(model_dir, proc, 2)
    # A second `ul2 train` on the same model_dir is refused, naming the holder.
    assert main.main(["train", *RUN, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is already being trained by pid {proc.pid} on host" in err[0]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  saved = max(_steps(model_dir))  # The step it was at (and periodic ones before).
  assert f"preempted (SIGTERM): saved step {saved}" in out and saved >= 2
  assert max(_losses(model_dir)) == saved
  assert "Traceback" not in err
  if saved < 8:
    assert main.main(["train", *RUN, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8"]) == 0
    assert f"resumed from step {saved}" in capsys.readouterr().out
  reference = _losses(straight)
  assert {s: l for s, l in _losses(model_dir).items() if s <= 8} == reference


def _limit_file_size(limit):
  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes past it fail (EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_keeps_the_earlier_checkpoints(straight, tmp_path):
  """No more room for the step-8 checkpoint (files capped below its size, as a disk
  that fills up): one line, a non-zero exit, steps 1-4 intact and resumable."""
  model_dir = _copy(straight, tmp_path)
  shutil.rmtree(model_dir / "checkpoints" / "8")
  largest = max(p.stat().st_size for p in (model_dir / "checkpoints" / "4").rglob("*")
                if p.is_file())
  env_cache = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  try:
    proc = _ul2_train(model_dir, "--gin.TRAIN_STEPS=8",
                      preexec_fn=_limit_file_size(largest // 2))
    out, err = proc.communicate(timeout=300)
  finally:
    if env_cache is not None:
      os.environ["JAX_COMPILATION_CACHE_DIR"] = env_cache
  assert proc.returncode != 0, (out[-2000:], err[-3000:])
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("ul2 train: error: "), err[-3000:]
  assert "File too large" in lines[0]
  assert _steps(model_dir) == [4]
  assert main.main(["train", *RUN, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8"]) == 0
  assert _losses(model_dir) == _losses(straight)


@pytest.mark.slow
def test_eval_on_storage_it_cannot_write_prints_its_result_then_warns(straight, tmp_path,
                                                                      capsys):
  model_dir = _copy(straight, tmp_path)
  (model_dir / "metrics.jsonl").unlink()
  (model_dir / "metrics.jsonl").mkdir()  # Writing it fails, as on read-only storage.
  capsys.readouterr()
  assert main.main(["eval", f"--model_dir={model_dir}", "--eval_steps=1"]) == 0
  out = capsys.readouterr()
  result = json.loads(out.out.strip().splitlines()[-1])
  assert result["step"] == 8 and np.isfinite(result["eval/loss"])
  (warning,) = out.err.strip().splitlines()
  assert warning.startswith("ul2 eval: warning: could not record the result in ")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_on_both(tmp_path):
  """JAX's preemption service: the process that gets SIGTERM tells the other; both
  stop at the same step, write its checkpoint together and exit 0; the resume on one
  process continues with the losses of an uninterrupted run."""
  model_dir = tmp_path / "two"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["UL2"] = str(REPO / ".venv" / "bin" / "ul2") if (REPO / ".venv" / "bin" / "ul2").exists() \
      else "ul2"
  launcher = subprocess.Popen(
      ["bash", str(REPO / "launch" / "local.sh"), "-n", "2", "-d", "4", "-l",
       str(tmp_path / "logs"), "--", *RUN, f"--model_dir={model_dir}",
       "--gin.TRAIN_STEPS=100000", "--gin.loop.TrainConfig.data_shards=2"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  try:
    _wait_for_step(model_dir, launcher, 2, timeout=400)
    workers = subprocess.run(["pgrep", "-f", f"model_dir={model_dir}"], capture_output=True,
                             text=True).stdout.split()
    ul2_pids = [int(p) for p in workers if int(p) != launcher.pid]
    assert len(ul2_pids) == 2, workers
    os.kill(max(ul2_pids), signal.SIGTERM)  # Process 1 only (started last).
    out, err = launcher.communicate(timeout=180)
  finally:
    launcher.kill()
  assert launcher.returncode == 0, (out[-2000:], err[-2000:])
  saved = max(_steps(model_dir))
  assert f"preempted (SIGTERM): saved step {saved}" in out
  assert max(_losses(model_dir)) == saved
  meta = json.loads((model_dir / "checkpoints" / str(saved) / "meta" / "metadata").read_text())
  assert meta["process_count"] == 2 and meta["step"] == saved
  # The same global batches on one process: data_shards=2 (see test_multihost).
  one = ["train", *RUN, "--gin.TRAIN_STEPS=8", "--gin.loop.TrainConfig.data_shards=2"]
  if saved < 8:
    assert main.main([*one, f"--model_dir={model_dir}"]) == 0
  assert main.main([*one, f"--model_dir={tmp_path / 'reference'}"]) == 0
  losses = _losses(model_dir)
  reference = _losses(tmp_path / "reference")
  np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                             [reference[s] for s in range(1, 9)], rtol=1e-5)


def test_a_step_that_cannot_fit_is_one_line_before_it_runs():
  from ul2 import compiler  # pylint: disable=import-outside-toplevel
  step = jax.jit(lambda x: (jnp.sin(x) @ x.T).sum())
  x = jnp.ones((512, 512))
  need = compiler.memory_bytes(step.lower(x).compile())
  assert need >= x.nbytes
  assert float(compiler.compile_fitting(step, x, limit=(need, 1))(x)) == pytest.approx(
      float(step(x)))
  with pytest.raises(ValueError, match=r"the train step needs 0\.00 GiB per device, more "
                     r"than the 0\.00 GiB each of the 2 device\(s\) has; lower BATCH_SIZE"):
    compiler.compile_fitting(step, x, limit=(need, 2))
  available, sharing = compiler.device_memory()
  assert available > 2**30 and sharing == jax.local_device_count()  # CPU: the host's RAM.


@pytest.mark.slow
def test_resume_restores_the_data_position_or_replays_it_with_the_same_losses(
    straight, tmp_path, capsys):
  """A checkpoint's data position (each shard's tf.data iterator) is restored in O(1);
  without a readable one the stream is replayed. Both give the uninterrupted run's
  losses, bit for bit."""
  assert sorted(p.name for p in (straight / "data_state").iterdir()) == ["4", "8"]
  assert (straight / "data_state" / "4" / "shard-00000").is_dir()
  cases = {"restored": lambda d: None,  # (A missing one: the JSONL test below.)
           "corrupt": lambda d: _flip_bytes(_largest_file(d / "data_state" / "4"))}
  for name, damage in cases.items():
    model_dir = _copy(straight, tmp_path / name)
    shutil.rmtree(model_dir / "checkpoints" / "8")
    damage(model_dir)
    (model_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _metrics(straight) if r["step"] <= 4))
    capsys.readouterr()
    assert main.main(["train", *RUN, f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=8"]) == 0
    out = capsys.readouterr()
    expected = ("its data position restored" if name == "restored"
                else "replaying 4 batches of data")
    assert f"resumed from step 4 in {model_dir / 'checkpoints'} ({expected})" in out.out, name
    assert ("the data position saved with step 4 is unreadable" in out.err) == (
        name == "corrupt"), out.err
    assert _losses(model_dir) == _losses(straight), name


@pytest.mark.slow
def test_a_source_tf_data_cannot_checkpoint_falls_back_to_replay(tmp_path, capsys):
  """JSONL files are read by a Python generator, whose position tf.data cannot save:
  one warning, and the resume replays the stream, exactly."""
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in
                            assets.TRAIN_TEXT.read_text().splitlines()[:400]))
  task = tmp_path / "task.gin"
  task.write_text("from __gin__ import dynamic_registration\nimport tasks\n"
                  "MIXTURE_OR_TASK_NAME = @tasks.register_ul2_task()\n"
                  "tasks.register_ul2_task.name = 'jsonl_resume'\n"
                  f"tasks.register_ul2_task.text_glob = {str(corpus)!r}\n")
  args = ["train", *RUN, f"--gin_file={task}", "--gin.CHECKPOINT_PERIOD=2"]
  assert main.main([*args, f"--model_dir={tmp_path / 'a'}", "--gin.TRAIN_STEPS=4"]) == 0
  assert main.main([*args, f"--model_dir={tmp_path / 'b'}", "--gin.TRAIN_STEPS=2"]) == 0
  err = capsys.readouterr().err
  assert err.count("warning: the input pipeline's position cannot be saved") == 2, err
  assert main.main([*args, f"--model_dir={tmp_path / 'b'}", "--gin.TRAIN_STEPS=4"]) == 0
  assert "(replaying 2 batches of data)" in capsys.readouterr().out
  assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
