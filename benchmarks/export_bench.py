"""Peak host memory of `ul2 export`, above the process's baseline (JSON lines).

    python benchmarks/export_bench.py --model_dir=DIR --output_dir=OUT [--max_shard_size=200MB]
        [--dtype=float32|bfloat16] [--whole]

The baseline is the resident set size once JAX, orbax and the exporter are imported and
the CPU backend is up, just before the export starts; a thread samples the RSS every
5 ms while it runs (and `ru_maxrss` bounds it from above). `--whole` measures the path
that restores the parameters whole and writes one file (`loop.load_params` +
`export.save_hf`, as `ul2 export` did before it streamed); run it with PYTHONPATH at
an older checkout to measure that checkout's code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time

import psutil


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--max_shard_size", default="5GB")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--whole", action="store_true")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel,unused-import
  from ul2 import export, loop, main as ul2_main, model_settings  # pylint: disable=import-outside-toplevel
  jax.numpy.zeros(1).block_until_ready()
  process = psutil.Process()
  baseline = process.memory_info().rss
  peak, done = [baseline], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], process.memory_info().rss)
      time.sleep(0.005)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  start = time.perf_counter()
  if args.whole:
    settings = model_settings.read(args.model_dir)
    params, _ = loop.load_params(args.model_dir, settings.model)
    export.save_hf(params, settings.model, settings.vocab_path, args.output_dir)
    del params
  else:
    code = ul2_main.main(["export", f"--model_dir={args.model_dir}",
                          f"--output_dir={args.output_dir}", "--overwrite",
                          f"--max_shard_size={args.max_shard_size}", f"--dtype={args.dtype}"])
    assert code == 0, code
  seconds = time.perf_counter() - start
  done.set()
  sampler.join()
  files = [f for f in os.listdir(args.output_dir) if f.startswith("model")]
  print(json.dumps({
      "path": "whole (restore all, one file)" if args.whole else "streaming",
      "max_shard_size": None if args.whole else args.max_shard_size, "dtype": args.dtype,
      "baseline_rss_gb": round(baseline / 1e9, 3), "peak_rss_gb": round(peak[0] / 1e9, 3),
      "peak_above_baseline_gb": round((peak[0] - baseline) / 1e9, 3),
      "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
      "weight_files": len(files), "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
  main()
