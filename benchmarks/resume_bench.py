"""Time to the first new step of a resumed `ul2 train`, against the resume step (JSON lines).

    python benchmarks/resume_bench.py [--steps=3000] [--after=10] [--workdir=/tmp/ul2-resume-bench]

What is measured, on the bundled corpus at 128/128, batch 16 (`gin/runs/local_tiny.gin`
with a one-layer model, so that a real run reaches step N in minutes):

1. one uninterrupted `ul2 train` to N + `after` steps, logging every step, with a
   checkpoint (and its data position) at step N: the reference losses;
2. a copy of that model_dir with the checkpoints after N removed, resumed to
   N + `after`: the data position is restored (O(1));
3. the same with `data_state/N` removed too: the fallback replays N batches;
4. a fresh model_dir trained `after` steps: the "resume at step 0" baseline;
5. with `--fast_forward_to=T` (a step too far to train to here): a checkpoint at T
   made without training to it: step N's parameters and optimiser state saved as
   step T, with the input pipeline advanced T batches and its position saved, as
   `ul2 train` would have left them. Resumed both ways (position restored, replay);
   the two resumes' losses are compared with each other, there being no uninterrupted
   run to T.

Each line gives the wall time from starting the `ul2 train` process to the first new
step appearing in metrics.jsonl (process start, imports, compile and restore
included), and whether the losses of steps N+1..N+after are bit-identical to the
uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# A one-layer model: the input pipeline, not the model, is what a resume replays.
MODEL = ["--gin.model.ModelConfig.num_encoder_layers=1",
         "--gin.model.ModelConfig.num_decoder_layers=1", "--gin.model.ModelConfig.d_model=32",
         "--gin.model.ModelConfig.d_ff=64", "--gin.model.ModelConfig.num_heads=2"]


def _train(model_dir: pathlib.Path, train_steps: int, checkpoint_period: int,
           wait_for_step: int | None = None) -> dict:
  """Runs `ul2 train`; returns its wall time, and the time until `wait_for_step`
  appears in metrics.jsonl."""
  cmd = [sys.executable, "-m", "ul2.main", "train",
         f"--gin_file={REPO / 'gin' / 'runs' / 'local_tiny.gin'}", f"--model_dir={model_dir}",
         f"--gin.TRAIN_STEPS={train_steps}", f"--gin.CHECKPOINT_PERIOD={checkpoint_period}",
         "--gin.EVAL_PERIOD=0", "--gin.LOG_PERIOD=1", *MODEL]
  env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
  log = open(model_dir.parent / f"{model_dir.name}.log", "a")  # pylint: disable=consider-using-with
  start = time.perf_counter()
  process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
  first = None
  metrics = model_dir / "metrics.jsonl"
  while process.poll() is None:
    if first is None and wait_for_step is not None and metrics.exists():
      if any(json.loads(line).get("step") == wait_for_step
             for line in metrics.read_text().splitlines() if line.strip()):
        first = time.perf_counter() - start
    time.sleep(0.05)
  total = time.perf_counter() - start
  log.close()
  if process.returncode:
    raise SystemExit(f"ul2 train failed ({process.returncode}); see {log.name}")
  if first is None and wait_for_step is not None:
    first = total  # Appeared between the last poll and the exit.
  return {"first_new_step_s": None if first is None else round(first, 1),
          "process_s": round(total, 1)}


def _fast_forward(model_dir: pathlib.Path, from_step: int, to_step: int) -> None:
  """Saves step `from_step`'s state as step `to_step`, with the data position of
  `to_step` batches (see the module docstring, 5.), in this process."""
  from ul2 import quiet  # pylint: disable=import-outside-toplevel,unused-import  (first)
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import tasks  # pylint: disable=import-outside-toplevel,unused-import
  from ul2 import checkpoint, data, loop, main as cli, sharding  # pylint: disable=import-outside-toplevel
  bindings = [flag[len("--gin."):].replace("=", " = ", 1) for flag in MODEL]
  cli.parse_gin([str(cli.DEFAULT_RUN)], [f"MODEL_DIR = '{model_dir}'", *bindings])
  config = gin.get_configurable(loop.TrainConfig)()
  setup = loop.build(config, len(data.task_denoisers(config.mixture_or_task_name)))
  ckpt = checkpoint.Checkpointer(model_dir, async_save=False, keep=None)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
    abstract = loop._abstract_state(setup)  # pylint: disable=protected-access
    params, opt_state, meta = ckpt.restore(from_step, abstract.params, abstract.opt_state)
  meta = {k: v for k, v in meta.items() if k not in ("checksums", "step")}
  meta["batches_consumed"] = to_step
  shards = meta["data_shards"]
  stream = loop._Data(config, "train", shuffle=True, num_shards=shards).batches()  # pylint: disable=protected-access
  for _ in range(to_step):
    next(stream)
  settings = loop._data_settings(loop._meta(config, to_step, shards))  # pylint: disable=protected-access
  loop._DataPositions(model_dir).save(stream, to_step, settings, keep=[from_step, to_step])  # pylint: disable=protected-access
  ckpt.save(to_step, params, opt_state, meta)
  ckpt.close()


def _losses(model_dir: pathlib.Path, steps: range) -> dict[int, float]:
  out = {}
  for line in (model_dir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record.get("step") in steps and "loss" in record:
      out[record["step"]] = record["loss"]
  return out


def _resumable_copy(source: pathlib.Path, target: pathlib.Path, step: int,
                    keep_data_state: bool) -> None:
  """`source` as it was right after saving `step`: later checkpoints, data positions and
  metrics lines removed."""
  if target.exists():
    shutil.rmtree(target)
  shutil.copytree(source, target)
  for path in (target / "checkpoints").iterdir():
    if path.name.isdigit() and int(path.name) > step:
      shutil.rmtree(path)
  for path in (target / "data_state").iterdir():
    if path.name.isdigit() and (int(path.name) > step or not keep_data_state):
      shutil.rmtree(path)
  lines = [line for line in (target / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("step", 0) <= step]
  (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
  (target / "train.lock").unlink(missing_ok=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[3000],
                      help="resume steps N to measure (each makes its own run)")
  parser.add_argument("--after", type=int, default=10, help="steps run after the resume")
  parser.add_argument("--workdir", default="/tmp/ul2-resume-bench")
  parser.add_argument("--fast_forward_to", type=int, nargs="*", default=[],
                      help="steps T to resume at from a fast-forwarded checkpoint (5.)")
  parser.add_argument("--_fast_forward", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._fast_forward:  # pylint: disable=protected-access
    model_dir, from_step, to_step = args._fast_forward  # pylint: disable=protected-access
    _fast_forward(pathlib.Path(model_dir), int(from_step), int(to_step))
    return
  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)

  fresh = work / "fresh"
  shutil.rmtree(fresh, ignore_errors=True)
  print(json.dumps({"resume_step": 0, "how": "fresh start",
                    **_train(fresh, args.after, args.after, wait_for_step=1)}), flush=True)
  for n in args.steps:
    reference = work / f"uninterrupted_{n}"
    shutil.rmtree(reference, ignore_errors=True)
    made = _train(reference, n + args.after, n)
    window = range(n + 1, n + args.after + 1)
    want = _losses(reference, window)
    print(json.dumps({"resume_step": n, "how": "uninterrupted run to make the checkpoint",
                      "steps": n + args.after, **made}), flush=True)
    for how, keep in (("data position restored", True), ("replay fallback", False)):
      resumed = work / f"resumed_{n}_{'state' if keep else 'replay'}"
      _resumable_copy(reference, resumed, n, keep_data_state=keep)
      timing = _train(resumed, n + args.after, n, wait_for_step=n + 1)
      got = _losses(resumed, window)
      log = (work / f"{resumed.name}.log").read_text()
      print(json.dumps({"resume_step": n, "how": how, **timing,
                        "log_says": next((line for line in log.splitlines()
                                          if "resumed from step" in line), None),
                        "losses_identical": len(got) == args.after and got == want}),
            flush=True)
    for target in args.fast_forward_to:
      base = work / f"fast_forward_{target}"
      _resumable_copy(reference, base, n, keep_data_state=True)
      start = time.perf_counter()
      subprocess.run([sys.executable, __file__, "--_fast_forward", str(base), str(n),
                      str(target)], check=True, cwd=REPO,
                     env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"})
      print(json.dumps({"resume_step": target, "how": f"fast-forward from step {n}",
                        "process_s": round(time.perf_counter() - start, 1)}), flush=True)
      window = range(target + 1, target + args.after + 1)
      losses = {}
      for how, keep in (("data position restored", True), ("replay fallback", False)):
        resumed = work / f"resumed_{target}_{'state' if keep else 'replay'}"
        _resumable_copy(base, resumed, target, keep_data_state=keep)
        timing = _train(resumed, target + args.after, target, wait_for_step=target + 1)
        losses[how] = _losses(resumed, window)
        log = (work / f"{resumed.name}.log").read_text()
        print(json.dumps({"resume_step": target, "how": how + " (fast-forwarded checkpoint)",
                          **timing, "log_says": next((line for line in log.splitlines()
                                                      if "resumed from step" in line), None),
                          **({"losses_identical_to_the_other_resume":
                              len(losses[how]) == args.after
                              and losses[how] == losses["data position restored"]}
                             if not keep else {})}), flush=True)


if __name__ == "__main__":
  main()
