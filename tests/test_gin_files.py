"""Every run and experiment gin file parses into the config it promises."""

import dataclasses

import gin
import pytest

from ul2 import data, loop, main

UL2 = ["R1", "R2", "X1", "X2", "X3", "X4", "S"]


def config(*files, bindings=("MODEL_DIR = '/tmp/unused'",)):
  main.parse_gin(list(files), list(bindings))
  return gin.get_configurable(loop.TrainConfig)()


def test_local_tiny():
  c = config("gin/runs/local_tiny.gin")
  assert c.mixture_or_task_name == "local_ul2"
  assert dict(c.task_feature_lengths) == {"inputs": 128, "targets": 128}
  assert (c.train_steps, c.batch_size, c.model.vocab_size) == (2000, 16, 8192)
  assert c.optimizer.learning_rate == 0.05
  assert [d.name for d in data.task_denoisers(c.mixture_or_task_name)] == UL2


def test_pretrain_ul2_is_the_papers_run():
  c = config("gin/runs/pretrain_ul2.gin")
  assert c.mixture_or_task_name == "c4_ul2"
  assert dict(c.task_feature_lengths) == {"inputs": 512, "targets": 512}
  assert c.batch_size == 1024 and c.loss.z_loss == 1e-4
  assert (c.optimizer.name, c.optimizer.schedule) == ("adafactor", "rsqrt")
  m = c.model
  assert (m.num_encoder_layers, m.num_decoder_layers, m.d_model, m.d_ff) == (32, 32, 4096, 16384)
  assert (m.num_heads, m.head_dim, m.vocab_size, m.activation, m.dtype) == (
      16, 256, 32128, "silu", "bfloat16")
  assert [d.name for d in data.task_denoisers("c4_ul2")] == UL2


def test_custom_mixture_on_top_of_local_tiny():
  c = config("gin/runs/local_tiny.gin", "gin/experiments/custom_mixture.gin")
  assert c.mixture_or_task_name == "local_custom"
  assert [d.name for d in data.task_denoisers("local_custom")] == ["R", "X", "X_LONG", "S"]


def test_overrides_use_t5x_macro_names():
  c = config("gin/runs/local_tiny.gin", bindings=[
      "MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 7", "BATCH_SIZE = 4", "RANDOM_SEED = 9",
      "CHECKPOINT_PERIOD = 2", "EVAL_PERIOD = 3", "LOG_PERIOD = 1",
      "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 16}"])
  assert (c.model_dir, c.train_steps, c.batch_size, c.random_seed) == ("/tmp/x", 7, 4, 9)
  assert (c.checkpoint_period, c.eval_period, c.log_period) == (2, 3, 1)
  assert dict(c.task_feature_lengths) == {"inputs": 32, "targets": 16}


def test_model_dir_is_required():
  main.parse_gin(["gin/runs/local_tiny.gin"], [])
  with pytest.raises(main.UserError, match="model_dir"):
    main.configured(loop.TrainConfig)


def test_continue_ul2_is_flan_ul2s_continued_pre_training():
  c = config("gin/runs/continue_ul2.gin", bindings=[
      "MODEL_DIR = '/tmp/unused'", "INIT_FROM = '/tmp/ul2'"])
  assert c.mixture_or_task_name == "c4_ul2_no_mode"
  assert (c.train_steps, c.batch_size) == (100_000, 1024)
  assert dict(c.task_feature_lengths) == {"inputs": 512, "targets": 512}
  assert (c.model.num_encoder_layers, c.model.d_model, c.model.vocab_size) == (32, 4096, 32128)
  denoisers = data.task_denoisers(c.mixture_or_task_name)
  assert [d.name for d in denoisers] == UL2  # The same mixture ...
  assert all(d.mode_token is None for d in denoisers)  # ... without mode tokens.
  assert [d.mode_token for d in data.task_denoisers("c4_ul2")] == [
      "[NLU]", "[NLU]", "[NLG]", "[NLG]", "[NLG]", "[NLG]", "[S2S]"]
  assert c.init_from == "/tmp/ul2"
