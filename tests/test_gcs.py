"""A model_dir on `gs://`: every file of a run goes through `etils.epath` (orbax's
arrays through TensorStore), here against a GCS emulator that the fixture starts
(`tests/gcs_emulator.py` says how each client is pointed at it).

Quick: metrics.jsonl and TensorBoard events on an object store (no appends there)
keep whole lines across a reopen and a torn write; `--init_from` finds an ul2
model_dir there. Slow: `ul2 train` on
gs://bucket/run is killed (SIGTERM), its newest checkpoint is damaged, and the
resume sets that step aside, restores the one before with its data position, and
finishes with the losses of the same run on local disk, bit for bit; `ul2 eval` and
`ul2 export` of the gs:// run equal those of the local run.
"""

import json
import os
import pathlib
import re
import signal
import threading
import time

import pytest
from etils import epath

import gcs_emulator
from ul2 import main
from ul2 import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = [f"--gin_file={REPO / 'gin' / 'runs' / 'local_tiny.gin'}",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", "--gin.BATCH_SIZE=8",
       "--gin.LOG_PERIOD=1", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=2"]


@pytest.fixture(scope="module")
def bucket():
  with gcs_emulator.Emulator() as emulator:
    name = emulator.create_bucket("ul2-test")
    with emulator.pointed_at():
      yield name


def _records(model_dir):
  path = epath.Path(model_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(model_dir):
  return {r["step"]: r["loss"] for r in _records(model_dir) if "loss" in r}


def _events(logdir):
  """(tag, step, value) of every scalar in the TensorBoard event files of `logdir`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for path in sorted(epath.Path(logdir).glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):  # TFRecord: length, crc, payload, crc.
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_metrics_on_an_object_store_keep_whole_lines_across_reopens(bucket):
  model_dir = epath.Path(bucket) / "metrics"
  writer = metrics.MetricsWriter(model_dir)
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": 2.25})
  writer.close()
  path = model_dir / "metrics.jsonl"
  path.write_text(path.read_text() + '{"step": 3, "lo')  # Killed mid-write.
  writer = metrics.MetricsWriter(model_dir)  # The resume.
  writer.write(3, {"loss": 2.0})
  writer.write(3, {"eval/loss": 2.125}, kind="eval")
  writer.close()
  assert _records(model_dir) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25},
                                 {"step": 3, "loss": 2.0}, {"step": 3, "eval/loss": 2.125}]
  # One event file per writer (run), each uploaded whole at every flush.
  assert sorted(_events(model_dir / "tensorboard" / "train")) == [
      ("loss", 1, 2.5), ("loss", 2, 2.25), ("loss", 3, 2.0)]
  assert _events(model_dir / "tensorboard" / "eval") == [("loss", 3, 2.125)]


def test_init_from_takes_a_model_dir_on_gs(bucket):
  from ul2 import warm_start  # pylint: disable=import-outside-toplevel
  (epath.Path(bucket) / "source" / "model_config.json").write_text("{}")
  assert warm_start.parse(f"{bucket}/source@4") == warm_start.Source(
      f"{bucket}/source", warm_start.UL2, 4)
  with pytest.raises(FileNotFoundError, match=f"warm start: {bucket}/nothing does not exist"):
    warm_start.parse(f"{bucket}/nothing")


def _sigterm_at(model_dir, step, timeout=600):
  """SIGTERM to this process (as a pod's preemption) once `step` is logged."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and not any(r["step"] >= step for r in _records(model_dir)):
    time.sleep(0.05)
  os.kill(os.getpid(), signal.SIGTERM)


def _steps(model_dir):
  return sorted(int(p.name) for p in (epath.Path(model_dir) / "checkpoints").iterdir()
                if p.name.isdigit())


def _last_json(out):
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_kill_resume_eval_and_export_on_gs_equal_the_local_run(bucket, tmp_path,
                                                                      capsys):
  local = tmp_path / "local"
  assert main.main(["train", *RUN, f"--model_dir={local}", "--gin.TRAIN_STEPS=12"]) == 0
  remote = f"{bucket}/run"
  capsys.readouterr()

  killer = threading.Thread(target=_sigterm_at, args=(remote, 3), daemon=True)
  killer.start()
  assert main.main(["train", *RUN, f"--model_dir={remote}", "--gin.TRAIN_STEPS=100000"]) == 0
  killer.join()
  out = capsys.readouterr()
  saved = int(re.search(r"preempted \(SIGTERM\): saved step (\d+)", out.out).group(1))
  assert 3 <= saved < 12, out.out
  assert f"note: {remote} is on an object store, which has no file locks" in out.err
  steps = _steps(remote)
  assert steps[-1] == saved and len(steps) <= 3  # Rotated (keep 3) on the object store.
  assert (epath.Path(remote) / "data_state" / str(saved) / "shard-00000").is_dir()

  # The newest checkpoint lost an item: the resume sets it aside and restores the one
  # before it, data position included.
  (epath.Path(remote) / "checkpoints" / str(saved) / "opt_state").rmtree()
  previous = steps[-2]
  assert main.main(["train", *RUN, f"--model_dir={remote}", "--gin.TRAIN_STEPS=12"]) == 0
  out = capsys.readouterr()
  assert f"checkpoint step {saved} is unreadable" in out.err
  assert f"moved unreadable checkpoint step {saved} to {remote}/checkpoints.unreadable/" in out.out
  assert (f"resumed from step {previous} in {remote}/checkpoints (its data position "
          "restored)") in out.out
  assert _losses(remote) == _losses(local)  # Steps 1-12, bit for bit.
  assert _steps(remote)[-1] == 12
  logged = {s: l for tag, s, l in _events(f"{remote}/tensorboard/train") if tag == "loss"}
  assert logged.keys() == _losses(local).keys()
  # gin wraps a long value onto a continuation line: join those, since the two
  # model_dir paths differ in length.
  unwrapped = lambda text: re.sub(r" \\\n +", " ", text)
  assert unwrapped((epath.Path(remote) / "config.gin").read_text()) == unwrapped(
      (local / "config.gin").read_text()).replace(str(local), remote)

  assert main.main(["eval", f"--model_dir={remote}", "--eval_steps=1"]) == 0
  remote_eval = _last_json(capsys.readouterr().out)
  assert main.main(["eval", f"--model_dir={local}", "--eval_steps=1"]) == 0
  assert remote_eval == _last_json(capsys.readouterr().out) and remote_eval["step"] == 12
  assert _records(remote)[-1]["eval/loss"] == remote_eval["eval/loss"]

  assert main.main(["export", f"--model_dir={remote}", f"--output_dir={bucket}/hf"]) == 0
  assert main.main(["export", f"--model_dir={local}", f"--output_dir={tmp_path / 'hf'}"]) == 0
  names = sorted(p.name for p in (tmp_path / "hf").iterdir())
  assert "model.safetensors" in names
  assert sorted(p.name for p in epath.Path(f"{bucket}/hf").iterdir()) == names
  for name in names:
    assert (epath.Path(f"{bucket}/hf") / name).read_bytes() == (tmp_path / "hf" / name
                                                                ).read_bytes(), name
