"""The `ul2` command: one entry point, verbs as subcommands, T5X-style gin flags.

    ul2 train   --gin_file=gin/runs/local_tiny.gin --model_dir=DIR [--gin.NAME=VALUE ...]
    ul2 eval    --gin_file=... --model_dir=DIR [--step=N]
    ul2 inspect --task=NAME [--split=train] --num_examples=N --format=jsonl|text [--stats]
    ul2 export  --model_dir=DIR [--step=N] --output_dir=OUT [--max_shard_size=5GB]
                [--dtype=float32|bfloat16] [--overwrite]
    ul2 plan    --gin_file=... --num_devices=N --mesh=...
    ul2 infer   (--model_dir=DIR | --hf_dir=DIR) (--task=NAME | --input_file=F)
                --output_file=OUT.jsonl [--decode=greedy|sample|beam ...] [--score]

Each verb is one function below with the arguments it takes; the library modules
know nothing of gin or of this command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile
from typing import Callable, Sequence

from ul2 import quiet  # Before anything imports TensorFlow or JAX.


class UserError(Exception):
  """A problem with what the user asked for; printed as one line, exit code 2."""


Verb = Callable[[argparse.Namespace], int | None]
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Verb]] = {}


def verb(name: str, help_: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
  """Registers `fn(args)` as `ul2 <name>`, with `add_arguments(parser)` for its flags."""
  def register(fn: Verb) -> Verb:
    VERBS[name] = (help_, add_arguments, fn)
    return fn
  return register


def _gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file to parse (repeatable; later files override)")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="extra directory to resolve gin includes and files in")
  parser.epilog = "Gin overrides: --gin.NAME=VALUE (repeatable), e.g. --gin.TRAIN_STEPS=100"


def split_gin_overrides(extra: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` flags -> gin binding strings; anything else is an error."""
  bindings = []
  for arg in extra:
    if not arg.startswith("--gin."):
      raise UserError(f"unrecognised argument {arg!r}")
    name, sep, value = arg[len("--gin."):].partition("=")
    if not sep or not name:
      raise UserError(f"gin override {arg!r} must look like --gin.NAME=VALUE")
    bindings.append(f"{name} = {value}")
  return bindings


# --------------------------------------------------------------------------- gin

# The gin files ship inside the package (`gin/` in a checkout links here), so an
# installed ul2 finds "gin/runs/local_tiny.gin" and "runs/local_tiny.gin" anywhere.
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
GIN_DIR = PACKAGE_DIR / "gin"
DEFAULT_RUN = GIN_DIR / "runs" / "local_tiny.gin"


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files and `NAME = VALUE` bindings; any problem is a `UserError`."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  paths = list(search_paths)
  for f in gin_files:  # gin/runs/x.gin includes 'models/tiny.gin': search gin/.
    paths += [str(pathlib.Path(f).parent.parent), str(pathlib.Path(f).parent)]
  paths += [str(GIN_DIR), str(PACKAGE_DIR), os.getcwd()]
  for path in dict.fromkeys(paths):
    gin.add_config_file_search_path(path)
  for f in gin_files:
    if not any((pathlib.Path(p) / f).is_file() for p in paths) and not os.path.isfile(f):
      raise UserError(f"gin file {f!r} not found")
  # gin logs "Path not found" for every search path an include is not under.
  path_noise = logging.Filter()
  path_noise.filter = lambda record: not str(record.msg).startswith("Path not found")
  logging.getLogger().addFilter(path_noise)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings),
                                        finalize_config=False)
  except (ValueError, RuntimeError, ImportError, SyntaxError, KeyError, TypeError,
          IOError) as e:
    raise UserError(f"bad gin configuration: {_one_line(e)}") from e
  finally:
    logging.getLogger().removeFilter(path_noise)


def configured(cls):
  """Calls the gin-configured constructor of `cls`; gin errors become `UserError`s."""
  import gin  # pylint: disable=import-outside-toplevel
  try:
    return gin.get_configurable(cls)()
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(_one_line(e)) from e


def _train_config(args: argparse.Namespace, default_files: Sequence[str] = ()):
  from ul2 import loop  # pylint: disable=import-outside-toplevel
  files = args.gin_file or list(default_files)
  bindings = split_gin_overrides(args.extra)
  if getattr(args, "model_dir", None):
    bindings.append(f"MODEL_DIR = {str(args.model_dir)!r}")
  if getattr(args, "init_from", None):
    bindings += [f"INIT_FROM = {str(args.init_from)!r}",
                 f"loop.TrainConfig.init_from = {str(args.init_from)!r}"]
  parse_gin(files, bindings, args.gin_search_path)
  config = configured(loop.TrainConfig)
  return config


def _denoiser_names(task_name: str) -> list[str]:
  import tasks  # pylint: disable=import-outside-toplevel,unused-import  (registers tasks)
  from ul2 import data  # pylint: disable=import-outside-toplevel
  try:
    return [d.name for d in data.task_denoisers(task_name)]
  except (ValueError, KeyError) as e:
    raise UserError(_one_line(e)) from e


def _train_arguments(parser: argparse.ArgumentParser) -> None:
  _gin_arguments(parser)
  parser.add_argument("--model_dir", help="output directory (sets the MODEL_DIR macro)")
  parser.add_argument("--init_from", help="start from these parameters: an ul2 model_dir "
                      "(DIR or DIR@STEP) or a Hugging Face T5 directory (sets "
                      "loop.TrainConfig.init_from and the INIT_FROM macro)")
  _process_arguments(parser)


def _process_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "multi-process", "default: UL2_COORDINATOR_ADDRESS / UL2_NUM_PROCESSES / "
      "UL2_PROCESS_ID, else JAX's cluster detection (TPU VM, SLURM), else one process")
  group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
  group.add_argument("--num_processes", type=int, help="number of processes")
  group.add_argument("--process_id", type=int, help="this process's index")


@verb("train", "train a model from gin files (resumes from --model_dir)", _train_arguments)
def _train(args: argparse.Namespace) -> int:
  _initialize_distributed(args)
  import gin  # pylint: disable=import-outside-toplevel
  from ul2 import loop  # pylint: disable=import-outside-toplevel
  config = _train_config(args, default_files=[str(DEFAULT_RUN)])
  _denoiser_names(config.mixture_or_task_name)  # An unknown task is one line, early.
  print(f"ul2 train: {config.mixture_or_task_name}, {config.train_steps} steps of "
        f"{config.batch_size} x {dict(config.task_feature_lengths)} -> {config.model_dir}",
        flush=True)
  try:
    outcome = _checked(loop.train, config, operative_config=gin.operative_config_str())
  except loop.Diverged as e:
    if os.environ.get("UL2_TRACEBACK"):
      raise
    raise UserError(str(e)) from e
  del outcome  # Finished, or saved on SIGTERM: both end well.
  return 0


def _initialize_distributed(args: argparse.Namespace) -> None:
  """Joins a multi-process run (before any JAX computation); see ul2.distributed."""
  from ul2 import distributed  # pylint: disable=import-outside-toplevel
  _checked(distributed.initialize, args.coordinator_address, args.num_processes,
           args.process_id)


def _checked(fn, *args, **kwargs):
  """Runs `fn`; a ValueError (our validation errors) becomes a one-line UserError.

  Set UL2_TRACEBACK=1 to see the full traceback instead.
  """
  try:
    return fn(*args, **kwargs)
  except (ValueError, FileNotFoundError) as e:
    if os.environ.get("UL2_TRACEBACK"):
      raise
    raise UserError(_one_line(e)) from e


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="a `ul2 train` model_dir")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the newest that "
                      "restores and verifies)")
  parser.add_argument("--eval_steps", type=int, help="batches (default: the run's)")
  parser.add_argument("--split", help="default: the run's eval split")
  _process_arguments(parser)


@verb("eval", "evaluate a checkpoint on the validation split", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
  """The run's settings come from DIR/model_config.json: config.gin is never executed."""
  _initialize_distributed(args)
  import jax  # pylint: disable=import-outside-toplevel
  from ul2 import loop, metrics, model_settings  # pylint: disable=import-outside-toplevel
  if args.extra:
    raise UserError(f"unrecognised argument {args.extra[0]!r} (ul2 eval takes the run's "
                    "settings from DIR/model_config.json, not from gin)")
  settings = _checked(model_settings.read, args.model_dir)
  config = _checked(loop.eval_config, args.model_dir, settings, eval_steps=args.eval_steps,
                    split=args.split)
  names = _denoiser_names(config.mixture_or_task_name)
  result, step = _checked(loop.evaluate_checkpoint, config, names, args.step)
  print(json.dumps({"step": step, **result}), flush=True)
  try:
    writer = metrics.MetricsWriter(config.model_dir, enabled=jax.process_index() == 0)
    writer.write(step, result, kind="eval")
    writer.close()
  except OSError as e:
    print(f"ul2 eval: warning: could not record the result in {config.model_dir}: "
          f"{e.strerror or e}", file=sys.stderr)
  return 0


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
  _gin_arguments(parser)
  parser.add_argument("--task", help="task or mixture (default: MIXTURE_OR_TASK_NAME from "
                      "the gin files, else local_ul2)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--num_examples", type=int, default=20)
  parser.add_argument("--format", choices=("text", "jsonl"), default="text")
  parser.add_argument("--stats", action="store_true",
                      help="instead of the examples, one row per denoiser: share, lengths, "
                      "window fill, corruption rate, spans, and how the examples pack")
  # Seed 3: the first 20 local_ul2 train examples show all seven denoisers.
  parser.add_argument("--seed", type=int, default=3,
                      help="seeds the denoisers (the examples are not shuffled)")
  parser.add_argument("--inputs_length", type=int,
                      help="default: TASK_FEATURE_LENGTHS from the gin files, else 512")
  parser.add_argument("--targets_length", type=int,
                      help="default: TASK_FEATURE_LENGTHS from the gin files, else 512")


@verb("inspect", "print what the denoisers make of a task's examples", _inspect_arguments)
def _inspect(args: argparse.Namespace) -> int:
  import gin  # pylint: disable=import-outside-toplevel
  import tasks  # pylint: disable=import-outside-toplevel,unused-import  (registers tasks)
  from ul2 import data  # pylint: disable=import-outside-toplevel

  def gin_macro(name: str, default):
    """The evaluated macro (so `@tasks.register_ul2_task()` registers its task)."""
    try:
      with gin.config_scope(name):
        return gin.get_configurable("gin.macro")()
    except TypeError as e:
      if "missing 1 required positional argument: 'value'" in str(e):
        return default
      raise UserError(f"gin macro {name}: {_one_line(e)}") from e

  bindings = split_gin_overrides(args.extra)
  task, lengths = args.task, {}
  if args.gin_file or bindings:
    parse_gin(args.gin_file, bindings, args.gin_search_path)
    task = task or _checked(gin_macro, "MIXTURE_OR_TASK_NAME", None)
    lengths = dict(gin_macro("TASK_FEATURE_LENGTHS", {}) or {})
  task = task or "local_ul2"
  lengths = {"inputs": args.inputs_length or lengths.get("inputs", 512),
             "targets": args.targets_length or lengths.get("targets", 512)}
  if args.num_examples < 1:
    raise UserError(f"--num_examples must be positive, got {args.num_examples}")
  if args.stats:
    rows = _checked(data.denoiser_stats, task, lengths, split=args.split,
                    num_examples=args.num_examples, seed=args.seed)
    if args.format == "jsonl":
      for row in rows:
        print(json.dumps(row))
    else:
      print(f"{task} ({args.split}), inputs length {lengths['inputs']}, targets length "
            f"{lengths['targets']}, seed {args.seed}: {rows[-1]['count']} examples\n")
      print(_stats_table(rows))
    return 0
  examples = _checked(data.examples, task, lengths, split=args.split,
                      num_examples=args.num_examples, seed=args.seed)
  if args.format == "jsonl":
    for ex in examples:
      print(json.dumps({k: ex[k] for k in data.EXAMPLE_FIELDS}, ensure_ascii=False))
    return 0
  print(f"{task} ({args.split}), inputs length {lengths['inputs']}, targets length "
        f"{lengths['targets']}, seed {args.seed}: {len(examples)} examples before packing. "
        "Sentinels show as <extra_id_N>; both sides end with EOS (not shown).\n")
  for i, ex in enumerate(examples, 1):
    print(f"#{i}  {ex['about']}")
    print(f"  inputs  ({len(ex['inputs'])} ids): {ex['inputs_text']}")
    print(f"  targets ({len(ex['targets'])} ids): {ex['targets_text']}\n")
  counts = {}
  for ex in examples:
    counts[ex["denoiser"]] = counts.get(ex["denoiser"], 0) + 1
  names = [d.name for d in data.task_denoisers(task)]
  print("denoisers: " + ", ".join(f"{n} {counts.get(n, 0)}" for n in names))
  return 0


def _stats_table(rows: Sequence[dict]) -> str:
  """`ul2 inspect --stats` rows as an aligned text table ("-": not applicable)."""
  columns = [("denoiser", "denoiser", "{}"), ("count", "count", "{}"), ("share", "share", "{:.1%}"),
             ("inputs", "inputs_length", "{:.1f}"), ("targets", "targets_length", "{:.1f}"),
             ("fill", "fill", "{:.3f}"), ("rate", "corruption_rate", "{:.3f}"),
             ("spans", "spans", "{:.1f}"), ("mean span", "mean_span", "{:.2f}"),
             ("ex/row", "examples_per_row", "{:.2f}"),
             ("inputs pad", "inputs_padding", "{:.1%}"),
             ("targets pad", "targets_padding", "{:.1%}")]
  table = [[header for header, _, _ in columns]]
  for row in rows:
    table.append(["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in columns])
  widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
  return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                              for i, (cell, w) in enumerate(zip(line, widths)))
                    for line in table)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="a `ul2 train` model_dir")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the newest that "
                      "restores and verifies)")
  parser.add_argument("--output_dir", required=True,
                      help="where to write the Hugging Face T5 model and tokenizer")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the model files in a non-empty --output_dir")
  parser.add_argument("--max_shard_size", default="5GB",
                      help="largest safetensors file, in decimal units as transformers' "
                      "save_pretrained (5GB, 200MB); bigger models are sharded with "
                      "model.safetensors.index.json")
  parser.add_argument("--dtype", default="float32",
                      help="float32 or bfloat16 (rounded to nearest even)")


@verb("export", "export a checkpoint to Hugging Face T5 format", _export_arguments)
def _export(args: argparse.Namespace) -> int:
  """The model comes from DIR/model_config.json: config.gin is never executed.

  DIR and OUT may be local or on an object store (`gs://...`); an object-store OUT
  is written to a local temporary directory first, then uploaded file by file.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  from ul2 import export, metrics, model_settings  # pylint: disable=import-outside-toplevel
  if args.extra:
    raise UserError(f"unrecognised argument {args.extra[0]!r}")
  out = epath.Path(args.output_dir)
  if out.exists() and not out.is_dir():
    raise UserError(f"--output_dir {out} is a file, not a directory")
  if out.is_dir() and any(out.iterdir()) and not args.overwrite:
    raise UserError(f"--output_dir {out} is not empty; pass --overwrite to replace the "
                    "model files in it")
  _checked(export.parse_size, args.max_shard_size)
  _checked(export.check_dtype, args.dtype)
  settings = _checked(model_settings.read, args.model_dir)
  tokens = _checked(export.token_ids, settings.vocab_path, settings.extra_ids)

  def export_to(directory):
    return _checked(export.export_checkpoint, args.model_dir, directory, settings.model,
                    settings.vocab_path, tokens=tokens, step=args.step,
                    max_shard_size=args.max_shard_size, dtype=args.dtype, warn=metrics.warn)

  if "://" in os.fspath(out):
    with tempfile.TemporaryDirectory(prefix="ul2-export-") as local:
      step = export_to(pathlib.Path(local))
      out.mkdir(parents=True, exist_ok=True)
      for path in sorted(epath.Path(local).iterdir()):
        path.copy(out / path.name, overwrite=True)
  else:
    step = export_to(out)
  print(f"ul2 export: step {step} of {args.model_dir} -> {out} in {args.dtype} "
        "(transformers.T5ForConditionalGeneration / AutoTokenizer format)")
  return 0


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
  _gin_arguments(parser)
  parser.add_argument("--num_devices", type=int, required=True,
                      help="devices to plan for (simulated CPU devices)")
  parser.add_argument("--mesh", help="D,F,T: sizes of the (data, fsdp, tensor) mesh axes, "
                      "one may be -1 (default: the gin file's sharding.MeshConfig)")
  parser.add_argument("--memory_per_device", default="32GiB",
                      help="device memory to judge against, e.g. 32GiB (TPU v4), 80GiB")
  parser.add_argument("--format", choices=("table", "json"), default="table")


@verb("plan", "compile the train step on abstract shapes; report memory and FLOPs",
      _plan_arguments)
def _plan(args: argparse.Namespace) -> int:
  from ul2 import plan  # pylint: disable=import-outside-toplevel  (jax-free until run)
  try:
    plan.simulate_devices(args.num_devices)  # Before JAX is imported.
    memory = plan.parse_bytes(args.memory_per_device)
    mesh = plan.parse_mesh(args.mesh) if args.mesh else None
  except ValueError as e:
    raise UserError(_one_line(e)) from e
  bindings = split_gin_overrides(args.extra)
  bindings.insert(0, "MODEL_DIR = '/nonexistent/ul2-plan'")  # Required, never written.
  parse_gin(args.gin_file or [str(DEFAULT_RUN)], bindings, args.gin_search_path)
  from ul2 import loop  # pylint: disable=import-outside-toplevel
  config = configured(loop.TrainConfig)
  result = _checked(plan.make_plan, config, args.num_devices, mesh, memory,
                    num_denoisers=plan.num_denoisers(config.mixture_or_task_name))
  print(json.dumps(result.to_json(), indent=1) if args.format == "json"
        else plan.format_plan(result))
  return 0


def _infer_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", help="a `ul2 train` model_dir (reads model_config.json)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  parser.add_argument("--hf_dir", help="a Hugging Face T5 directory, instead of --model_dir")
  parser.add_argument("--task", help="a registered task: decode its --split")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--num_examples", type=int, help="with --task: the first N only")
  parser.add_argument("--input_file", help="F.jsonl (one object a line) or F.txt (one "
                      "input a line), instead of --task")
  parser.add_argument("--input_key", default="inputs", help="JSONL field of the input")
  parser.add_argument("--target_key", default="targets", help="JSONL field of the targets")
  parser.add_argument("--output_file", required=True, help="OUT.jsonl, one object an input")
  parser.add_argument("--mode_token", help="prepended to every input, e.g. [NLG]")
  parser.add_argument("--max_decode_length", type=int,
                      help="output tokens, EOS included (default: the targets length)")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--decode", default="greedy", help="greedy, sample or beam")
  parser.add_argument("--num_beams", type=int, default=4)
  parser.add_argument("--length_penalty", type=float, default=0.6,
                      help="beam search alpha: scores are logprob / ((5 + len) / 6)**alpha")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0, help="0: off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--score", action="store_true",
                      help="write the targets' log-likelihood instead of decoding")
  parser.add_argument("--dtype", help="activations: float32 or bfloat16 (default: the "
                      "training run's; float32 for --hf_dir)")


@verb("infer", "decode or score inputs with a checkpoint or a Hugging Face model",
      _infer_arguments)
def _infer(args: argparse.Namespace) -> int:
  import dataclasses  # pylint: disable=import-outside-toplevel
  from ul2 import infer  # pylint: disable=import-outside-toplevel
  infer.cpu_device_per_core()  # Before JAX starts: on CPU, the batch split over the cores.
  if args.extra:
    raise UserError(f"unrecognised argument {args.extra[0]!r}")
  if bool(args.model_dir) == bool(args.hf_dir):
    raise UserError("give one of --model_dir or --hf_dir")
  if bool(args.task) == bool(args.input_file):
    raise UserError("give one of --task or --input_file")
  options = infer.Options(
      decode=args.decode, num_beams=args.num_beams, length_penalty=args.length_penalty,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
      batch_size=args.batch_size, score=args.score)
  texts = None
  if args.input_file:  # Bad input fails before the model loads.
    texts = _checked(infer.read_file, args.input_file, args.input_key, args.target_key,
                     need_targets=args.score)
  model = _checked(infer.load_model, model_dir=args.model_dir, step=args.step,
                   hf_dir=args.hf_dir, dtype=args.dtype)
  options = dataclasses.replace(
      options, max_decode_length=args.max_decode_length or model.max_targets_length)
  _checked(options.check, model.config.vocab_size)
  task = None
  if texts is not None:
    examples, cut = _checked(infer.tokenize, texts, model, options, args.mode_token)
  else:
    examples, cut, task = _checked(infer.task_examples, args.task, args.split, model,
                                   options, args.mode_token, args.num_examples)
  if cut:
    print(f"ul2 infer: warning: {cut} of {len(examples)} inputs were longer than the model "
          f"takes ({model.max_inputs_length} input tokens, {options.max_decode_length} "
          "target tokens) and were truncated", file=sys.stderr)
  results, stats = _checked(infer.run, model, examples, options,
                            infer.ProgressBar(sys.stderr))
  infer.write_jsonl(results, args.output_file)
  what = "scored" if options.score else "generated"
  print(f"ul2 infer: {stats.examples} examples from {model.source}, {stats.tokens} tokens "
        f"{what} in {stats.seconds:.1f} s ({stats.tokens_per_second:,.0f} tokens/s) "
        f"-> {args.output_file}")
  if args.task:
    print(json.dumps({"task": args.task, "split": args.split,
                      **infer.task_metrics(task, results, options.score)}))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ul2", description="UL2 Mixture-of-Denoisers pre-training in JAX/Flax.")
  sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
  for name, (help_, add_arguments, _) in VERBS.items():
    add_arguments(sub.add_parser(name, help=help_, description=help_))
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one verb. What goes wrong is one line on stderr: exit 2 for bad input, 1 for
  anything else (its root cause), 130 for Ctrl-C; UL2_TRACEBACK=1 shows tracebacks."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args, extra = build_parser().parse_known_args(argv)
  args.extra = extra
  verbose = bool(os.environ.get("UL2_TRACEBACK"))
  quiet.startup(verbose, tensorflow=args.verb != "export")
  try:
    return VERBS[args.verb][2](args) or 0
  except UserError as e:
    print(f"ul2 {args.verb}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"ul2 {args.verb}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if verbose:
      raise
    print(f"ul2 {args.verb}: error: {quiet.root_cause(e)} (UL2_TRACEBACK=1 shows where)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
