"""`ul2 export` from a checkpoint, a tensor at a time: shards and their index as
transformers' `save_pretrained` writes them, bfloat16 rounded as torch rounds, the
checkpoint's checksum verified before anything is committed, and the tokenizer's
special ids and sentinels taken from the task's vocabulary."""

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import sentencepiece as spm

from ul2 import assets, checkpoint, export, main, model_settings
from ul2.model import ModelConfig
from model_testing import apply, hf_logits, padded_batch, random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

CONFIG = ModelConfig(vocab_size=8192, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                     num_encoder_layers=2, num_decoder_layers=3, dtype="float32")
VARIANTS = {
    "listed": CONFIG,
    "tied_scanned_no_final_scale": dataclasses.replace(
        CONFIG, tie_word_embeddings=True, scan_layers=True, final_decoder_norm_scale=False),
}
SHARD = "300KB"  # The 1 MB embedding gets a shard of its own; the layers share some.


def _plain(params):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: np.asarray(x, np.float32), nn.unbox(params))


def _model_dir(path, cfg, extra_ids=100, vocab_path=assets.VOCAB_PATH):
  """A model_dir as `ul2 train` leaves it: steps 1 and 2 (random params), settings."""
  ckpt = checkpoint.Checkpointer(path, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _plain(random_params(cfg, seed=step)), {"c": np.zeros((), np.int32)},
              {"batches_consumed": step})
  ckpt.close()
  model_settings.write(path, model_settings.ModelSettings(
      model=cfg, vocab_path=str(vocab_path), extra_ids=extra_ids,
      task_feature_lengths={"inputs": 64, "targets": 64}, mixture_or_task_name="local_ul2"))
  return path


def _export(model_dir, out, *flags):
  return main.main(["export", f"--model_dir={model_dir}", f"--output_dir={out}", *flags])


def _weights(out):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  sd = {}
  for f in sorted(out.glob("model*.safetensors")):
    sd.update(load_file(str(f)))
  return sd


def _hf_logits(out, enc, dec):
  hf = transformers.T5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
  return hf_logits(hf, enc, dec), hf


def test_chunk_sums_add_up_to_the_fingerprint_of_the_leaf():
  x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
  whole = np.asarray(checkpoint._leaf_sums([x]))[0]  # pylint: disable=protected-access
  np.testing.assert_array_equal(checkpoint.chunk_sums(x), whole)
  np.testing.assert_array_equal(checkpoint.chunk_sums(x, block=8), whole)  # Blocks add up.
  by_slice = sum(checkpoint.chunk_sums(x[i], offset=i * 35) for i in range(3))
  np.testing.assert_array_equal(by_slice.astype(np.uint32), whole)
  assert not np.array_equal(checkpoint.chunk_sums(x[::-1]), whole)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sharded_export_is_what_save_pretrained_writes(variant, tmp_path):
  cfg = VARIANTS[variant]
  model_dir = _model_dir(tmp_path / "run", cfg)
  out = tmp_path / "hf"
  assert _export(model_dir, out, f"--max_shard_size={SHARD}") == 0
  names = sorted(p.name for p in out.glob("model*"))
  assert names[-1] == "model.safetensors.index.json" and len(names) >= 3
  assert names[0] == f"model-00001-of-{len(names) - 1:05d}.safetensors"
  # The old path's tensors, bit for bit.
  params = _plain(random_params(cfg, seed=2))
  want = export.to_hf_state_dict(params, cfg)
  got = _weights(out)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  # transformers loads the shards; its own save_pretrained shards them the same way.
  enc, dec = padded_batch(3, 8100, 5)
  theirs, hf = _hf_logits(out, enc, dec)
  np.testing.assert_allclose(np.asarray(apply(cfg, {"params": params}, enc, dec)), theirs,
                             atol=1e-4, rtol=1e-4)
  # transformers' own save_pretrained of what it loaded: the same index, up to the
  # numbering of the shards (v5 reverts its load-time weight conversions first, which
  # moves lm_head.weight ahead of shared.weight; `test_shards_split_as_huggingface_hub_splits`
  # pins the split itself on the state-dict order).
  hf.save_pretrained(tmp_path / "resaved", max_shard_size=SHARD)
  theirs_index = json.loads((tmp_path / "resaved" / "model.safetensors.index.json").read_text())
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert index["metadata"] == theirs_index["metadata"] == {
      "total_parameters": sum(v.size for v in want.values()),
      "total_size": 4 * sum(v.size for v in want.values())}
  groups = lambda weight_map: sorted(sorted(k for k, f in weight_map.items() if f == shard)
                                     for shard in set(weight_map.values()))
  assert groups(index["weight_map"]) == groups(theirs_index["weight_map"])
  assert sorted(set(index["weight_map"].values())) == sorted(
      set(theirs_index["weight_map"].values())) == names[:-1]


def test_bfloat16_export_rounds_to_nearest_even_as_torch(tmp_path):
  # Ties (1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6), carries, subnormals, inf, nan.
  special = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 - 2**-9, 3.4e38, 1e-40, -0.0, np.inf,
                      -np.inf, np.nan, 65504.5, -2.5e-3], np.float32)
  ours = export.convert(special, "bfloat16")
  theirs = torch.from_numpy(special).to(torch.bfloat16)
  number = ~np.isnan(special)  # NaN: both NaN (torch sets the sign bit, numpy not).
  np.testing.assert_array_equal(ours.view(np.int16)[number],
                                theirs.view(torch.int16).numpy()[number])
  assert np.isnan(ours[~number].astype(np.float32)).all() and theirs[~number].isnan().all()
  assert ours[0] == 1.0 and ours[1] == 1 + 2**-6

  model_dir = _model_dir(tmp_path / "run", CONFIG)
  out = tmp_path / "hf"
  assert _export(model_dir, out, "--dtype=bfloat16") == 0
  assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  params = _plain(random_params(CONFIG, seed=2))
  want = export.to_hf_state_dict(params, CONFIG)
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  got = load_file(str(out / "model.safetensors"))
  for key, value in want.items():
    assert got[key].dtype == torch.bfloat16
    assert torch.equal(got[key], torch.from_numpy(value).to(torch.bfloat16)), key
  # Logits: those of our model with bfloat16-rounded parameters.
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  enc, dec = padded_batch(3, 8100, 5)
  theirs, _ = _hf_logits(out, enc, dec)
  np.testing.assert_allclose(np.asarray(apply(CONFIG, {"params": rounded}, enc, dec)), theirs,
                             atol=1e-4, rtol=1e-4)


def _tamper(model_dir):
  """Step 3: step 2's values with one changed, carrying step 2's checksums (what a
  silent bit flip in storage restores as)."""
  ckpt = checkpoint.Checkpointer(model_dir, async_save=False)
  params = _plain(random_params(CONFIG, seed=2))
  params["encoder"]["encoder_norm"]["scale"][0] += 1.0
  ckpt.save(3, params, {"c": np.zeros((), np.int32)}, {"batches_consumed": 3})
  ckpt.close()
  meta2 = json.loads((model_dir / "checkpoints" / "2" / "meta" / "metadata").read_text())
  path = model_dir / "checkpoints" / "3" / "meta" / "metadata"
  record = json.loads(path.read_text())
  record["checksums"]["params"] = meta2["checksums"]["params"]
  path.write_text(json.dumps(record))


def test_values_that_fail_the_checksum_are_never_committed(tmp_path, capsys):
  model_dir = _model_dir(tmp_path / "run", CONFIG)
  _tamper(model_dir)
  out = tmp_path / "hf"
  out.mkdir()
  (out / "README.md").write_text("mine")
  assert _export(model_dir, out, "--step=3", "--overwrite") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "checkpoint step 3 is unreadable: its params do not match the " \
      "checksum saved with them" in err[0], err
  assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # Staging removed too.
  assert _export(model_dir, tmp_path / "new", "--step=3") == 2
  assert not (tmp_path / "new").exists()
  capsys.readouterr()
  # Without --step: a warning, and the newest good step (2) is exported.
  assert _export(model_dir, out, "--overwrite") == 0
  captured = capsys.readouterr()
  assert "warning: checkpoint step 3 is unreadable" in captured.err
  assert "ul2 export: step 2 of" in captured.out
  want = export.to_hf_state_dict(_plain(random_params(CONFIG, seed=2)), CONFIG)
  got = _weights(out)
  np.testing.assert_array_equal(got["encoder.final_layer_norm.weight"],
                                want["encoder.final_layer_norm.weight"])


def test_a_truncated_chunk_is_one_line_and_the_previous_step_exports(tmp_path, capsys):
  model_dir = _model_dir(tmp_path / "run", CONFIG)
  params_dir = model_dir / "checkpoints" / "2" / "params"
  largest = max((p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  out = tmp_path / "hf"
  assert _export(model_dir, out, "--step=2") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "checkpoint step 2 is unreadable: " in err[0], err
  assert not out.exists()
  assert _export(model_dir, out) == 0
  captured = capsys.readouterr()
  assert "warning: checkpoint step 2 is unreadable" in captured.err
  assert "ul2 export: step 1 of" in captured.out


def test_overwrite_replaces_every_weight_file_of_the_previous_export(tmp_path):
  model_dir = _model_dir(tmp_path / "run", CONFIG)
  out = tmp_path / "hf"
  assert _export(model_dir, out, f"--max_shard_size={SHARD}") == 0
  (out / "README.md").write_text("mine")
  assert _export(model_dir, out, "--overwrite", "--step=1") == 0
  assert sorted(p.name for p in out.iterdir()) == [
      "README.md", "config.json", "generation_config.json", "model.safetensors",
      "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
  want = export.to_hf_state_dict(_plain(random_params(CONFIG, seed=1)), CONFIG)
  np.testing.assert_array_equal(_weights(out)["shared.weight"], want["shared.weight"])


@pytest.mark.parametrize("size", ["5GB", "200MB", "1.5gb", " 300 KB ", "2TB", "10KB"])
def test_sizes_parse_as_huggingface_hub_does(size):
  from huggingface_hub.serialization._base import parse_size_to_int  # pylint: disable=import-outside-toplevel
  assert export.parse_size(size) == parse_size_to_int(size)


@pytest.mark.parametrize("size", ["5XB", "GB", "five GB", "0MB", "-1GB", "5G"])
def test_bad_sizes_are_one_line_errors(size):
  with pytest.raises(ValueError) as e:
    export.parse_size(size)
  assert "\n" not in str(e.value) and repr(size) in str(e.value)


def test_shards_split_as_huggingface_hub_splits(tmp_path):
  tensors = export.hf_tensors(CONFIG)
  for limit, dtype in ((300_000, "float32"), (100_000, "bfloat16"), (10**10, "float32")):
    ours = export.split_into_shards(tensors, limit, dtype)
    fake = {t.key: torch.empty(t.shape, dtype=getattr(torch, dtype)) for t in tensors}
    split = huggingface_hub.split_torch_state_dict_into_shards(
        fake, filename_pattern="model{suffix}.safetensors", max_shard_size=limit)
    want = list(split.filename_to_tensors.values())
    assert [[t.key for t in shard] for shard in ours] == want
    assert export.shard_filenames(len(ours)) == list(split.filename_to_tensors)


def _vocab_with_eos_2(tmp_path):
  prefix = tmp_path / "chars"
  spm.SentencePieceTrainer.train(input=str(assets.VALIDATION_TEXT), model_prefix=str(prefix),
                                 vocab_size=60, model_type="char", minloglevel=2, pad_id=0,
                                 unk_id=1, eos_id=2, bos_id=-1, pad_piece="[PAD]",
                                 eos_piece="[EOS]", unk_piece="[UNK]")
  return str(prefix) + ".model"


def test_tokenizer_ids_and_sentinels_come_from_the_task_vocabulary(tmp_path):
  """A task registered with extra_ids=50 (and here a vocabulary whose EOS is 2) trains
  with 50 sentinels counting down from its top; the export says the same."""
  tasks = pytest.importorskip("tasks")
  from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  name = tasks.register_ul2_task("export_test_50_sentinels", vocab_path=_vocab_with_eos_2(
      tmp_path), extra_ids=50)
  vocab = data.task_vocabulary(name)
  # What `ul2 train` records of the task's vocabulary (loop._write_records).
  model_dir = _model_dir(tmp_path / "run", CONFIG, extra_ids=vocab.extra_ids,
                         vocab_path=vocab.sentencepiece_model_file)
  out = tmp_path / "hf"
  assert _export(model_dir, out) == 0
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert vocab.extra_ids == 50 and vocab.vocab_size == len(tokenizer) == 110
  assert [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(50)] == list(
      range(109, 59, -1))
  assert tokenizer.convert_tokens_to_ids("<extra_id_50>") == tokenizer.unk_token_id
  assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocab.vocab_size - 1 == 109
  assert tokenizer.convert_tokens_to_ids("<extra_id_49>") == 60
  assert tokenizer.convert_ids_to_tokens([109, 60]) == ["<extra_id_0>", "<extra_id_49>"]
  assert (vocab.decode([109]), vocab.decode([60])) == ("<extra_id_0>", "<extra_id_49>")
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 2, 1)
  assert vocab.eos_id == 2
  text = "the cat sat"
  assert tokenizer(text).input_ids == vocab.encode(text) + [vocab.eos_id]
  hf_config = json.loads((out / "config.json").read_text())
  assert (hf_config["eos_token_id"], hf_config["pad_token_id"],
          hf_config["decoder_start_token_id"]) == (2, 0, 0)
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["eos_token_id"] == 2


def test_ul2_export_does_not_import_tensorflow(tmp_path):
  """The export never needs it; importing it at start-up (to silence it) was ~650 MB
  of the process's RSS, more than the export's own peak."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  model_dir = _model_dir(tmp_path / "run", CONFIG)
  code = ("import sys; from ul2 import main; "
          f"assert main.main(['export', '--model_dir={model_dir}', "
          f"'--output_dir={tmp_path / 'hf'}']) == 0; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-500:]
  assert result.stderr == "", result.stderr[-500:]
