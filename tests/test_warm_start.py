"""Warm start (ul2.warm_start): a random Hugging Face T5, saved whole and sharded, and
an ul2 model_dir load onto a sharded mesh with logits equal to the source's; bad
paths and mismatched models are one line each."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from tasks import metrics
from ul2 import checkpoint, model_settings, sharding, warm_start
from ul2.model import ModelConfig
from model_testing import apply, hf_logits, padded_batch, random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CONFIG = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                 num_decoder_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                 eos_token_id=1)
CONFIG = ModelConfig(vocab_size=512, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                     num_encoder_layers=2, num_decoder_layers=3, activation="gelu",
                     dtype="float32")


def _mesh():
  return sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_CONFIG)).eval()
  whole = tmp_path_factory.mktemp("hf_whole")
  hf.save_pretrained(whole)
  sharded = tmp_path_factory.mktemp("hf_sharded")
  hf.save_pretrained(sharded, max_shard_size="100KB")
  return hf, whole, sharded


def test_saved_layouts_are_what_they_claim(hf_model):
  _, whole, sharded = hf_model
  assert (whole / "model.safetensors").is_file()
  assert not (whole / warm_start.HF_INDEX).exists()
  assert (sharded / warm_start.HF_INDEX).is_file()
  assert len(list(sharded.glob("model-*.safetensors"))) > 2


@pytest.mark.parametrize("layout", ["whole", "sharded"])
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hf_checkpoint_loads_sharded_with_equal_logits(hf_model, layout, scan):
  hf, whole, sharded = hf_model
  path = {"whole": whole, "sharded": sharded}[layout]
  source = warm_start.parse(str(path))
  assert source.kind == warm_start.HF
  config = warm_start.source_config(source, dtype="float32", scan_layers=scan,
                                     dropout_rate=0.0)
  assert config == dataclasses.replace(CONFIG, scan_layers=scan)
  mesh = _mesh()
  shardings = warm_start.param_shardings(config, mesh)
  params, source_config = warm_start.load_params(source, config, shardings)
  assert source_config == config
  # Every parameter sits on its target sharding; some are really split.
  placed = jax.tree.leaves(jax.tree.map(lambda p, s: p.sharding == s and p.dtype == np.float32,
                                        params, shardings))
  assert all(placed)
  embedding = params["token_embedder"]["embedding"]
  assert embedding.addressable_shards[0].data.shape != embedding.shape
  enc, dec = padded_batch(2, 512, 6)
  ours = np.asarray(apply(config, {"params": jax.device_get(params)}, enc, dec))
  np.testing.assert_allclose(ours, hf_logits(hf, enc, dec), atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads_as_float32(hf_model, tmp_path):
  hf, _, _ = hf_model
  hf.to(torch.bfloat16).save_pretrained(tmp_path)
  hf.to(torch.float32)
  params, _ = warm_start.load_params(str(tmp_path), CONFIG,
                                     warm_start.param_shardings(CONFIG, _mesh()))
  got = np.asarray(params["token_embedder"]["embedding"])
  expected = hf.shared.weight.detach().to(torch.bfloat16).float().numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)


def _model_dir(path, params, config, step=7):
  ckpt = checkpoint.Checkpointer(path, async_save=False)
  ckpt.save(step, params, {"count": np.zeros((), np.int32)}, {"batches_consumed": step})
  ckpt.close()
  model_settings.write(path, model_settings.ModelSettings(
      model=config, vocab_path="/unused.model", extra_ids=100,
      task_feature_lengths={"inputs": 16, "targets": 16}, mixture_or_task_name="local_ul2"))
  return path


def test_ul2_model_dir_round_trip(tmp_path):
  config = dataclasses.replace(CONFIG, activation="silu")
  first = random_params(config, seed=1)
  second = random_params(config, seed=2)
  _model_dir(tmp_path, first, config, step=3)
  _model_dir(tmp_path, second, config, step=9)
  mesh = _mesh()
  shardings = warm_start.param_shardings(config, mesh)
  for path, expected in ((str(tmp_path), second), (f"{tmp_path}@3", first)):
    source = warm_start.parse(path)
    assert source.kind == warm_start.UL2
    params, source_config = warm_start.load_params(source, config, shardings)
    assert source_config == config
    assert all(jax.tree.leaves(jax.tree.map(lambda p, s: p.sharding == s, params, shardings)))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
  with pytest.raises(ValueError, match=r"no checkpoint for step 4 .* there are steps \[3, 9\]"):
    warm_start.load_params(f"{tmp_path}@4", config, shardings)


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_missing_path_and_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    warm_start.parse(str(tmp_path / "nowhere"))
  assert "nowhere does not exist" in _one_line(e)
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError) as e:
    warm_start.parse(str(tmp_path))
  assert "is not a checkpoint" in _one_line(e)
  with pytest.raises(ValueError) as e:
    warm_start.parse(str(tmp_path / "notes.txt"))
  assert "not a directory" in _one_line(e)
  (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG | {"model_type": "t5"}))
  with pytest.raises(FileNotFoundError) as e:
    warm_start.load_params(str(tmp_path), CONFIG, warm_start.param_shardings(CONFIG, _mesh()))
  assert "no model.safetensors" in _one_line(e)


def test_t5_v1_0_where_gated_is_configured(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      HF_CONFIG | {"feed_forward_proj": "relu", "tie_word_embeddings": True}))
  with pytest.raises(ValueError) as e:
    warm_start.check_matches(str(tmp_path), CONFIG)
  message = _one_line(e)
  assert "feed_forward 'relu' (not gated: T5 v1.0) in the checkpoint, 'gated-gelu'" in message
  assert "tie_word_embeddings True in the checkpoint, False configured" in message
  with pytest.raises(ValueError, match="not gated"):
    warm_start.source_config(str(tmp_path))


def test_each_differing_field_is_named_with_both_values(hf_model):
  _, whole, _ = hf_model
  other = dataclasses.replace(CONFIG, d_model=64, num_heads=8, head_dim=16, d_ff=128,
                              num_decoder_layers=2, activation="silu", vocab_size=1024)
  with pytest.raises(ValueError) as e:
    warm_start.check_matches(str(whole), other)
  message = _one_line(e)
  for part in ("vocab_size 512 in the checkpoint, 1024 configured",
               "d_model 32 in the checkpoint, 64 configured", "num_heads 4", "head_dim 8",
               "d_ff 64", "num_decoder_layers 3", "feed_forward 'gated-gelu' in the "
               "checkpoint, 'gated-silu' configured"):
    assert part in message
  assert "num_encoder_layers" not in message


def test_a_model_vocabulary_larger_than_the_tokenizer_is_fine(hf_model):
  _, whole, _ = hf_model
  warm_start.check_matches(str(whole), CONFIG, vocabulary_size=500)  # 512 > 400 + 100.
  with pytest.raises(ValueError, match="vocabulary has 600 ids .* the model only 512"):
    warm_start.check_matches(str(whole), CONFIG, vocabulary_size=600)


# ------------------------------------------------------- `ul2 train --init_from=PATH`

import pathlib  # pylint: disable=wrong-import-position

from ul2 import main  # pylint: disable=wrong-import-position


def _assert_same_logits(exported, hf):
  """The export at `exported` gives `hf`'s logits (to 1e-4) on a padded batch."""
  again = transformers.T5ForConditionalGeneration.from_pretrained(exported).eval()
  enc, dec = padded_batch(2, 8100, 6)
  np.testing.assert_allclose(hf_logits(again, enc, dec), hf_logits(hf, enc, dec), atol=1e-4)

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = [f"--gin_file={REPO / 'gin' / 'runs' / 'local_tiny.gin'}",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", "--gin.BATCH_SIZE=8",
       "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=1", "--gin.loop.TrainConfig.eval_steps=2"]
# A learning rate of 1e-9 (0 is refused): the step leaves the warm-started
# parameters as they came, to ~1e-9 of their scale (Adafactor's updates are relative).
FROZEN = ["--gin.optimizers.OptimizerConfig.learning_rate=1e-9"]


@pytest.mark.slow
def test_train_from_a_hugging_face_model_exports_its_logits(tmp_path, capsys):
  """A random T5 the size of gin/models/tiny.gin, warm-started by `ul2 train
  --init_from` (one step at learning rate 1e-9) and exported, gives its logits back."""
  torch.manual_seed(1)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=8192, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
      feed_forward_proj="gated-silu", tie_word_embeddings=False, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)).eval()
  hf.save_pretrained(tmp_path / "hf", max_shard_size="1MB")
  assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
  model_dir = tmp_path / "run"
  assert main.main(["train", *RUN, *FROZEN, f"--model_dir={model_dir}",
                    f"--init_from={tmp_path / 'hf'}", "--gin.TRAIN_STEPS=1",
                    "--gin.EVAL_PERIOD=0"]) == 0
  assert f"warm start: the parameters of {tmp_path / 'hf'} (step 0" in capsys.readouterr().out
  assert main.main(["export", f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'out'}"]) == 0
  _assert_same_logits(tmp_path / "out", hf)


@pytest.mark.slow
def test_a_warm_start_from_a_model_dir_evaluates_as_its_source_and_is_not_repeated(
    tmp_path, capsys):
  source, target = tmp_path / "source", tmp_path / "target"
  assert main.main(["train", *RUN, f"--model_dir={source}", "--gin.TRAIN_STEPS=3",
                    "--gin.EVAL_PERIOD=0"]) == 0
  capsys.readouterr()
  assert main.main(["eval", f"--model_dir={source}", "--eval_steps=2"]) == 0
  source_eval = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert main.main(["train", *RUN, *FROZEN, f"--model_dir={target}",
                    f"--init_from={source}@3", "--gin.TRAIN_STEPS=1", "--gin.EVAL_PERIOD=1"]) == 0
  evaluation = [json.loads(l) for l in (target / "metrics.jsonl").read_text().splitlines()
                if "eval/loss" in l]
  assert evaluation[0]["eval/loss"] == pytest.approx(source_eval["eval/loss"], rel=1e-6)
  capsys.readouterr()
  # A resume continues the run's own checkpoints; it does not warm-start again.
  assert main.main(["train", *RUN, f"--model_dir={target}", f"--init_from={source}@3",
                    "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=0"]) == 0
  out = capsys.readouterr().out
  assert "resumed from step 1" in out and "warm start" not in out


@pytest.mark.parametrize("case", ["missing", "not a checkpoint", "other model", "T5 v1.0"])
def test_train_with_a_bad_init_from_is_one_line(case, tmp_path, hf_model, capsys):
  v1_0 = tmp_path / "t5_v1_0"  # tiny.gin's shape, but T5 v1.0's ReLU feed-forward.
  v1_0.mkdir()
  (v1_0 / "config.json").write_text(json.dumps(dict(
      model_type="t5", vocab_size=8192, d_model=64, d_kv=16, d_ff=256, num_layers=2,
      num_heads=4, feed_forward_proj="relu", tie_word_embeddings=False)))
  path = {"missing": tmp_path / "nope", "not a checkpoint": tmp_path,
          "other model": hf_model[1], "T5 v1.0": v1_0}[case]
  assert main.main(["train", *RUN, f"--model_dir={tmp_path / 'run'}", f"--init_from={path}",
                    "--gin.TRAIN_STEPS=1"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("ul2 train: error: warm start"), err
  assert {"missing": "does not exist", "not a checkpoint": "is not a checkpoint",
          "other model": "the model does not match: ",
          "T5 v1.0": "the model does not match: feed_forward 'relu' (not gated: T5 v1.0) in "
                     "the checkpoint, 'gated-silu' configured"}[case] in err[0]


@pytest.mark.slow
def test_finetune_gin_trains_the_bundled_task_and_logs_its_metric(tmp_path, capsys):
  """gin/runs/finetune.gin, shrunk: the loss falls, the eval decodes the validation
  split and logs eval/local_continue/rouge*, and writes the predictions."""
  model_dir = tmp_path / "continue"
  assert main.main(["train", f"--gin_file={REPO / 'gin' / 'runs' / 'finetune.gin'}",
                    f"--model_dir={model_dir}", "--gin.TRAIN_STEPS=40", "--gin.EVAL_PERIOD=40",
                    "--gin.LOG_PERIOD=10", "--gin.CHECKPOINT_PERIOD=40",
                    "--gin.optimizers.OptimizerConfig.learning_rate=0.01"]) == 0
  records = [json.loads(l) for l in (model_dir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses[-1] < losses[0] - 1.0
  (evaluation,) = [r for r in records if "eval/loss" in r]
  assert "local_continue/rouge1" in capsys.readouterr().out
  predictions = [json.loads(l) for l in
                 (model_dir / "inference" / "local_continue-40.jsonl").read_text().splitlines()]
  assert len(predictions) == 306 and {"inputs", "targets", "prediction"} <= set(predictions[0])
  # The logged metrics are rouge-score's on these predictions.
  assert {k: evaluation[f"eval/local_continue/{k}"] for k in metrics.ROUGE_KEYS} == \
      pytest.approx(metrics.rouge([p["targets"] for p in predictions],
                                  [p["prediction"] for p in predictions]))


# ------------------------------------------- gin/models/from_hf.gin: the source's model

FROM_HF = f"--gin_file={REPO / 'gin' / 'models' / 'from_hf.gin'}"


@pytest.mark.slow
def test_from_hf_gin_takes_the_model_from_config_json(tmp_path):
  """A random T5 of another shape than tiny.gin's (2+3 layers, d_model 32, gated-GELU),
  trained for one frozen step with the model from its config.json, exports its logits."""
  torch.manual_seed(2)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      **HF_CONFIG | {"vocab_size": 8192})).eval()
  hf.save_pretrained(tmp_path / "hf")
  model_dir = tmp_path / "run"
  assert main.main(["train", *RUN, FROM_HF, *FROZEN, f"--model_dir={model_dir}",
                    f"--init_from={tmp_path / 'hf'}", "--gin.TRAIN_STEPS=1",
                    "--gin.EVAL_PERIOD=0", "--gin.warm_start.source_config.dtype='float32'",
                    "--gin.warm_start.source_config.dropout_rate=0.0"]) == 0
  written = model_settings.read(str(model_dir)).model
  assert (written.d_model, written.num_decoder_layers, written.activation) == (32, 3, "gelu")
  assert main.main(["export", f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'out'}"]) == 0
  _assert_same_logits(tmp_path / "out", hf)


@pytest.mark.parametrize("case", ["a field set otherwise", "no init_from"])
def test_from_hf_gin_errors_are_one_line(case, tmp_path, hf_model, capsys):
  finetune = f"--gin_file={REPO / 'gin' / 'runs' / 'finetune.gin'}"
  extra = {"a field set otherwise": [f"--init_from={hf_model[1]}",
                                     "--gin.warm_start.source_config.d_model=128",
                                     "--gin.warm_start.source_config.activation='silu'"],
           "no init_from": []}[case]
  assert main.main(["train", finetune, FROM_HF, f"--model_dir={tmp_path / 'run'}",
                    *extra]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("ul2 train: error: warm start"), err
  assert {"a field set otherwise": "the model does not match: d_model 32 in the checkpoint, "
                                   "128 configured; activation 'gelu' in the checkpoint, "
                                   "'silu' configured",
          "no init_from": "pass --init_from=PATH"}[case] in err[0]
  assert not (tmp_path / "run").exists()
