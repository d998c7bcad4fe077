"""Multi-process training on 127.0.0.1, through the launcher users run (launch/local.sh).

The comparison, and why it is a fair one. With P processes each process reads its
own data shard, so "2 processes" and "1 process" reading "their" data would train
on different batches and their losses could not be compared. The global batch is
therefore defined by the number of *data shards* (`TrainConfig.data_shards`, by
default one per process): process p reads a contiguous block of shards and the
global batch is the shards' batches concatenated in shard order. So:

* run A: 1 process x 8 devices, `data_shards=2`, 5 steps: it reads shards 0 and 1
  itself and trains on exactly the global batches the two processes assemble;
* run B: `launch/local.sh -n 2 -d 4`, 2 processes x 4 devices (shards 0 and 1,
  one each, joined with jax.make_array_from_process_local_data), 3 steps, with a
  checkpoint at step 3 written by both processes through orbax;
* run C: 1 process x 8 devices resumes B's model_dir to step 5. It takes the data
  sharding from the checkpoint, so it continues with the batches B would have seen.

Then B's losses are A's for steps 1-3 (1e-5 relative: the same arithmetic, only
the reduction order across processes differs), B's step-3 parameters are A's, and
C's steps 4-5 are A's steps 4-5. A separate test checks that the two shards are
disjoint slices of the corpus, token for token.
"""

import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

from ul2 import distributed
from ul2 import main

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
UL2 = REPO / ".venv" / "bin" / "ul2"
RUN = [f"--gin_file={REPO / 'gin' / 'runs' / 'local_tiny.gin'}",
       "--gin.BATCH_SIZE=8", "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=3",
       "--gin.EVAL_PERIOD=0", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}"]


def _metrics(model_dir):
  return [json.loads(line) for line in
          (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


def _ul2_command() -> str:
  return str(UL2) if UL2.exists() else "ul2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one, two, logs = root / "one_process", root / "two_processes", root / "logs"
  # A: the reference, 1 process x 8 devices (this pytest process), two data shards.
  assert main.main(["train", *RUN, f"--model_dir={one}", "--gin.TRAIN_STEPS=5",
                    "--gin.loop.TrainConfig.data_shards=2"]) == 0
  # B: 2 processes x 4 devices, started by the launcher.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["UL2"] = _ul2_command()
  result = subprocess.run(
      ["bash", str(LAUNCH / "local.sh"), "-n", "2", "-d", "4", "-l", str(logs), "--",
       *RUN, f"--model_dir={two}", "--gin.TRAIN_STEPS=3"],
      env=env, capture_output=True, text=True, timeout=420, check=False)
  assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
  b_metrics = _metrics(two)
  # C: 1 process x 8 devices resumes B.
  assert main.main(["train", *RUN, f"--model_dir={two}", "--gin.TRAIN_STEPS=5"]) == 0
  return {"one": one, "two": two, "logs": logs, "stdout": result.stdout,
          "b_metrics": b_metrics}


def _losses(records, steps):
  by_step = {r["step"]: r for r in records if "loss" in r}
  return np.array([by_step[s]["loss"] for s in steps])


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(runs):
  a = _metrics(runs["one"])
  b = runs["b_metrics"]
  assert [r["step"] for r in b] == [1, 2, 3]  # Only process 0 wrote, once per step.
  assert len(set(_losses(a, [1, 2, 3]))) == 3
  np.testing.assert_allclose(_losses(b, [1, 2, 3]), _losses(a, [1, 2, 3]), rtol=1e-5)
  for rb, ra in zip(b, a[:3]):  # Per denoiser too (those present in the step).
    per_denoiser = sorted(k for k in rb if k.startswith("loss/"))
    assert per_denoiser and per_denoiser == sorted(k for k in ra if k.startswith("loss/"))
    np.testing.assert_allclose([rb[k] for k in per_denoiser],
                               [ra[k] for k in per_denoiser], rtol=1e-5)
  assert (runs["logs"] / "process_1.log").exists()


@pytest.mark.slow
def test_checkpoint_written_by_two_processes_holds_the_same_state(runs):
  from ul2 import loop  # pylint: disable=import-outside-toplevel
  main.parse_gin([str(runs["two"] / "config.gin")], [])
  config = main.configured(loop.TrainConfig)
  b_params, b_step = loop.load_params(str(runs["two"]), config.model, step=3)
  a_params, _ = loop.load_params(str(runs["one"]), config.model, step=3)
  assert b_step == 3
  import jax  # pylint: disable=import-outside-toplevel
  for x, y in zip(jax.tree.leaves(b_params), jax.tree.leaves(a_params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  step_dir = runs["two"] / "checkpoints" / "3"
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  assert meta["process_count"] == 2 and meta["data_shards"] == 2
  # Both processes took part in writing it (orbax, one OCDBT store per process).
  assert {p.name for p in (step_dir / "params").glob("ocdbt.process_*")} == {
      "ocdbt.process_0", "ocdbt.process_1"}


@pytest.mark.slow
def test_one_process_resumes_two_processes_checkpoint_exactly(runs):
  c = [r for r in _metrics(runs["two"]) if r["step"] > 3]
  assert [r["step"] for r in c] == [4, 5]
  np.testing.assert_allclose(_losses(c, [4, 5]), _losses(_metrics(runs["one"]), [4, 5]),
                             rtol=1e-5)


@pytest.mark.slow
def test_processes_read_disjoint_shards_of_the_corpus():
  """Every token 8-gram a shard's examples contain comes from that shard's documents."""
  import seqio  # pylint: disable=import-outside-toplevel
  import tasks  # pylint: disable=import-outside-toplevel,unused-import
  from ul2 import data  # pylint: disable=import-outside-toplevel
  task = seqio.get_mixture_or_task("local_ul2")
  vocab = task.output_features["targets"].vocabulary
  ordinary = lambda t: 3 <= t < vocab.vocab_size - 100  # No pad/EOS/unk/sentinels.
  n = 8

  def ngrams(tokens):
    runs_, run = [], []
    for t in list(tokens) + [0]:
      if ordinary(int(t)):
        run.append(int(t))
      else:
        runs_.append(run)
        run = []
    return {tuple(r[i:i + n]) for r in runs_ for i in range(len(r) - n + 1)}

  def source_shard(shard):  # What seqio's Task.get_dataset gives shard `shard` of 2.
    src = task.source
    if src.supports_arbitrary_sharding or len(src.list_shards("train")) >= 2:
      return src.get_dataset(split="train", shuffle=False,
                             shard_info=seqio.ShardInfo(shard, 2))
    return src.get_dataset(split="train", shuffle=False).shard(2, shard)

  source, examples = [], []
  for shard in range(2):
    # Tokenised as the pipeline does (in TensorFlow), and joined as the denoisers join
    # the documents, so windows that cross a document boundary are found too.
    tokens = source_shard(shard).map(lambda ex: vocab.encode_tf(ex["text"]))
    source.append(ngrams(np.concatenate(list(tokens.as_numpy_iterator()))))
    ds = data.get_dataset("local_ul2", {"inputs": 64, "targets": 64}, split="train",
                          batch_size=8, shuffle=True, seed=0, pack=False, shard_id=shard,
                          num_shards=2, repeat=False)
    got = set()
    for i, batch in enumerate(data.as_numpy(ds)):
      for row in range(batch["encoder_input_tokens"].shape[0]):
        got |= ngrams(batch["encoder_input_tokens"][row][1:])  # [1:]: mode token.
        got |= ngrams(batch["decoder_target_tokens"][row])
      if i == 20:
        break
    examples.append(got)
  assert source[0] and source[1]
  for shard in range(2):
    assert examples[shard] and examples[shard] <= source[shard]
    assert examples[shard] - source[1 - shard]  # Text only this shard has.


def test_data_shards_of_processes_are_disjoint_and_cover():
  blocks = [list(distributed.process_data_shards(8, p, 4)) for p in range(4)]
  assert blocks == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert list(distributed.process_data_shards(2, 0, 1)) == [0, 1]
  with pytest.raises(ValueError, match="data_shards=3 must be a positive multiple of "
                                       "the 2 processes"):
    distributed.process_data_shards(3, 0, 2)


def test_process_spec_flags_then_environment():
  env = {"UL2_COORDINATOR_ADDRESS": "10.0.0.1:1234", "UL2_NUM_PROCESSES": "4",
         "UL2_PROCESS_ID": "3", "UL2_LOCAL_DEVICE_IDS": "0,1"}
  spec = distributed.resolve(environ=env)
  assert spec == distributed.ProcessSpec("10.0.0.1:1234", 4, 3, (0, 1))
  spec = distributed.resolve("host:99", 2, 1, environ=env)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ("host:99", 2, 1)
  assert not distributed.resolve(environ={}).explicit
  with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, 2\)"):
    distributed.resolve("host:1", 2, 2, environ={})
  with pytest.raises(ValueError, match="UL2_NUM_PROCESSES='two' is not an integer"):
    distributed.resolve(environ={"UL2_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="must be HOST:PORT"):
    distributed.resolve("localhost", 2, 0, environ={})


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir()))
def test_launch_scripts_pass_bash_n_and_shellcheck(script):
  path = str(LAUNCH / script)
  subprocess.run(["bash", "-n", path], check=True)
  try:
    result = subprocess.run(["shellcheck", path], capture_output=True, text=True,
                            check=False)
  except FileNotFoundError:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  assert result.returncode == 0, result.stdout
