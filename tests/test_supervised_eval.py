"""Supervised evaluation (ul2.supervised_eval) on the bundled local_title task with a tiny
random model: greedy predictions, the task's metrics, the predictions file."""

import json

import jax
import numpy as np
import pytest

from ul2 import assets, decoding, infer, sharding, supervised_eval
from ul2.model import ModelConfig
from model_testing import random_params

# gin/models/tiny.gin.
CONFIG = ModelConfig(vocab_size=8192, d_model=64, num_heads=4, head_dim=16, d_ff=256,
                     num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
LENGTHS = {"inputs": 32, "targets": 8}
NUM_EXAMPLES = 20


@pytest.fixture(scope="module")
def model():
  mesh = sharding.make_mesh(sharding.MeshConfig())
  params = random_params(CONFIG, seed=3)
  # A louder EOS logit: some predictions end early, so their lengths differ.
  params["decoder"]["logits_dense"]["kernel"][:, 1] *= 4
  return infer.place_params(params, CONFIG, mesh), mesh


def test_decodes_scores_and_writes_the_predictions(model, tmp_path):
  params, mesh = model
  evaluator = supervised_eval.SupervisedEvaluator("local_title", LENGTHS, batch_size=16,
                                                  num_examples=NUM_EXAMPLES)
  assert evaluator.tasks == ["local_title"]
  metrics = evaluator(params, CONFIG, mesh, step=7, model_dir=tmp_path)
  assert set(metrics) == {"eval/local_title/accuracy"}
  path = tmp_path / "inference" / "local_title-7.jsonl"
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  records = [json.loads(l) for l in assets.TITLE_VALIDATION.read_text().splitlines()]
  assert len(lines) == NUM_EXAMPLES
  assert [l["inputs"] for l in lines] == [r["inputs"] for r in records[:NUM_EXAMPLES]]
  assert [l["targets"] for l in lines] == [r["targets"] for r in records[:NUM_EXAMPLES]]
  # The metric is the task's accuracy of exactly these predictions.
  assert metrics["eval/local_title/accuracy"] == pytest.approx(
      100 * np.mean([l["prediction"] == l["targets"] for l in lines]))
  assert all(1 <= len(l["prediction_ids"]) <= LENGTHS["targets"] for l in lines)
  assert len({len(l["prediction_ids"]) for l in lines}) > 1
  assert any(l["prediction_ids"][-1] == 1 for l in lines)


@pytest.mark.slow
def test_predictions_are_greedy_decoding_and_the_evaluator_is_reusable(model, tmp_path):
  params, mesh = model
  evaluator = supervised_eval.SupervisedEvaluator("local_title", LENGTHS, batch_size=16,
                                                  num_examples=NUM_EXAMPLES)
  metrics = evaluator(params, CONFIG, mesh, step=7, model_dir=tmp_path)
  first = json.loads((tmp_path / "inference" / "local_title-7.jsonl").read_text()
                     .splitlines()[0])
  # Greedy decoding of the [NLU]-prefixed, EOS-ended inputs, up to the targets length.
  assert 1 <= len(first["prediction_ids"]) <= LENGTHS["targets"]
  vocab = infer.vocabulary(str(assets.VOCAB_PATH), assets.EXTRA_IDS)
  ids = infer.mode_token_ids(vocab, "[NLU]") + tuple(vocab.encode(first["inputs"]))
  ids = ids[:LENGTHS["inputs"] - 1] + (1,)
  row = np.zeros((1, infer.bucket(len(ids), LENGTHS["inputs"])), np.int32)
  row[0, :len(ids)] = ids
  expected = np.asarray(decoding.generate(jax.device_get(params), CONFIG, row,
                                          max_decode_length=LENGTHS["targets"]))[0]
  assert first["prediction_ids"] == expected[:len(first["prediction_ids"])].tolist()
  assert first["prediction"] == vocab.decode(first["prediction_ids"])
  # The same parameters give the same metrics again (the evaluator is reusable).
  assert evaluator(params, CONFIG, mesh, step=8, model_dir=None) == metrics
  assert not (tmp_path / "inference" / "local_title-8.jsonl").exists()


def test_pre_training_tasks_have_nothing_to_evaluate(model):
  params, mesh = model
  evaluator = supervised_eval.SupervisedEvaluator("local_ul2", LENGTHS, batch_size=4)
  assert evaluator.tasks == []
  assert evaluator(params, CONFIG, mesh, step=0) == {}


def test_an_unknown_task_is_one_line():
  with pytest.raises(ValueError, match="unknown task or mixture 'local_titel'; did you mean "
                     "'local_title'"):
    supervised_eval.SupervisedEvaluator("local_titel", LENGTHS, batch_size=4)
