"""`ul2 plan`: its numbers are the real ones, on the tiny config.

* FLOPs: XLA's count of the compiled step and `model.flops_per_token` agree.
* Memory: the plan (compiled on abstract shapes, nothing allocated) predicts the
  memory that running the step really takes. "Really" is measured, not compiled
  again: a fresh process runs one step and reads its peak resident memory
  (VmHWM, reset through /proc/self/clear_refs just before the step is given its
  state), with glibc told to mmap every large block, so that freed buffers leave
  the process and the peak is the peak of live buffers.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ul2 import main
from ul2 import plan as plan_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_RUN = str(REPO / "gin" / "runs" / "local_tiny.gin")


def test_parse_bytes_and_mesh():
  assert plan_lib.parse_bytes("32GiB") == 32 * 2**30
  assert plan_lib.parse_bytes("80 GB") == 80 * 10**9
  assert plan_lib.parse_bytes("1.5MiB") == 3 * 2**19
  with pytest.raises(ValueError, match="memory size '32 parsecs'"):
    plan_lib.parse_bytes("32 parsecs")
  assert plan_lib.parse_mesh("1,-1,4").tensor == 4
  with pytest.raises(ValueError, match="three sizes"):
    plan_lib.parse_mesh("8,1")


def test_plan_of_the_tiny_run(capsys):
  """The CLI end to end: JSON, FLOPs against the formula, the verdict."""
  code = main.main(["plan", f"--gin_file={TINY_RUN}", "--num_devices=8", "--mesh=1,8,1",
                    "--memory_per_device=16MiB", "--format=json"])
  assert code == 0
  result = json.loads(capsys.readouterr().out)
  assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # "auto" resolved for this mesh: the batch is split, so no loops over examples.
  assert (result["attention_impl"], result["loss_impl"]) == ("xla", "logits")
  assert result["param_count"] > 1e6
  # FSDP: each device holds an eighth of the parameters.
  assert result["param_bytes"] == pytest.approx(result["param_bytes_total"] / 8, rel=0.02)
  # XLA's count of the whole step vs the formula (which leaves out norms, softmax,
  # the loss and the optimiser: a few percent on this tiny model).
  assert result["flops_xla"] == pytest.approx(result["flops_formula"], rel=0.05)
  # The compiled, partitioned program does its share of that on each device.
  assert result["flops_compiled_per_device"] * 8 == pytest.approx(result["flops_xla"],
                                                                   rel=0.05)
  assert result["memory_bytes"] > 16 * 2**20 and result["fits"] is False
  assert result["verdict"].startswith("DOES NOT FIT")


def test_plan_errors_are_one_line(capsys):
  assert main.main(["plan", f"--gin_file={TINY_RUN}", "--num_devices=8",
                    "--mesh=3,1,1"]) == 2
  assert "does not divide 8 devices" in capsys.readouterr().err
  assert main.main(["plan", f"--gin_file={TINY_RUN}", "--num_devices=8",
                    "--memory_per_device=lots"]) == 2
  assert "memory size 'lots'" in capsys.readouterr().err


MEASURE = r"""
import json, os, sys, time
from ul2 import plan
plan.simulate_devices(int(sys.argv[1]))
import jax, numpy as np
import flax.linen as nn
from ul2 import features, loop, main, sharding

def rss():
  status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
  return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024

main.parse_gin([sys.argv[2]], ["MODEL_DIR = '/nonexistent'"] + sys.argv[4:])
config = main.configured(loop.TrainConfig)
n = int(sys.argv[1])
p = plan.make_plan(config, n, plan.parse_mesh(sys.argv[3]))

# The real thing: the state from its jitted initialiser, a batch, the step.
setup = loop.build(config, 7, sharding.make_mesh(plan.parse_mesh(sys.argv[3]),
                                                 jax.devices()[:n]))
lengths = config.task_feature_lengths
batch = {k: np.ones(shape, np.int32)
         for k, shape in features.batch_shapes(config.batch_size, lengths).items()}
with jax.set_mesh(setup.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
  def run_once():
    state = setup.init(jax.random.key(0))
    global_batch = loop.global_batch(batch, setup.batch_sharding)
    jax.block_until_ready((state, global_batch))
    return state, global_batch
  state, global_batch = run_once()
  jax.block_until_ready(setup.train_step(state, global_batch, jax.random.key(1)))  # Warm.
  del state, global_batch
  time.sleep(0.2)
  before, _ = rss()
  state, global_batch = run_once()
  placed = sum(s.data.nbytes for x in jax.tree.leaves((state, global_batch))
               for s in x.addressable_shards if s.device == jax.devices()[0])
  open("/proc/self/clear_refs", "w").write("5")  # Reset the peak (VmHWM).
  out = setup.train_step(state, global_batch, jax.random.key(1))
  jax.block_until_ready(out)
  _, peak = rss()
print(json.dumps({"plan_per_device": p.memory_bytes, "plan_arguments": p.argument_bytes,
                  "measured_total": peak - before, "placed_on_device_0": placed}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("num_devices,mesh", [(8, "1,8,1")])
def test_plan_memory_matches_a_real_step(num_devices, mesh, tmp_path):
  if not os.path.exists("/proc/self/clear_refs"):
    pytest.skip("needs Linux /proc to measure peak memory")
  env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  result = subprocess.run(
      [sys.executable, "-c", MEASURE, str(num_devices), TINY_RUN, mesh,
       "BATCH_SIZE = 32"],
      env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads(result.stdout.strip().splitlines()[-1])
  # What the plan says the arguments take is what the real state + batch take.
  assert m["placed_on_device_0"] == pytest.approx(m["plan_arguments"], rel=0.02)
  # The process's real peak while the step runs, all devices together (they share
  # the host's memory here), against the plan's per-device total times devices.
  assert m["measured_total"] == pytest.approx(m["plan_per_device"] * num_devices, rel=0.10)


@pytest.mark.slow
def test_the_plan_command_simulates_its_devices_in_a_fresh_process(tmp_path):
  """`ul2 plan` sets the device count after start-up has imported TensorFlow (which
  imports part of JAX) but before JAX starts a backend."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "ul2.main", "plan", f"--gin_file={TINY_RUN}", "--num_devices=16",
       "--mesh=16,1,1", "--format=json"],
      env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)["num_devices"] == 16
  assert result.stderr == ""
