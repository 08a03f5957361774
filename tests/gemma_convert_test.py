"""`gemma_io convert`: Gemma-2 checkpoints (Kaggle orbax, HF safetensors) -> model directories."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax import model_io, sampling, sharding, storage, tokenizers
from qdc_jax.models import gemma_io
from qdc_jax.models import transformer as T

import tiny_gemma  # tests/tiny_gemma.py  # pylint: disable=g-bad-import-order
# pylint: disable-next=unused-import,g-bad-import-order
from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 40  # longer than lab_tiny's window (32), so the local layer really is local


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_gemma")
  return {"root": root, "tok": tiny_gemma.make_tokenizer(root / "tok"),
          "kaggle": tiny_gemma.make_kaggle_checkpoint(root / "kaggle"),
          # An -it style config.json: eos is [<eos>, <end_of_turn>].
          "hf": tiny_gemma.make_hf_checkpoint(root / "hf", eos_token_id=[1, 107])}


def _tokens(seed, vocab=tiny_gemma.TOKENIZER_PIECES):
  return np.random.default_rng(seed).integers(0, vocab, (2, SEQ)).astype(np.int32)


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, x: T.Transformer(cfg).apply({"params": p}, x)[0])(
      params, jnp.asarray(tokens)))


def _single_device(params):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def test_tiny_tokenizer_has_gemma_ids(world):
  tok = tokenizers.SentencePieceTokenizer(world["tok"])
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == tiny_gemma.TOKENIZER_PIECES
  assert tok.piece_to_id("<start_of_turn>") == 106 and tok.piece_to_id("<end_of_turn>") == 107
  ids = tok.encode("<start_of_turn>user\nHow many clips?<end_of_turn>\n")
  assert ids[0] == 106 and ids.count(107) == 1 and ids.count(108) == 2 and 3 not in ids


@pytest.mark.parametrize("fmt", ["kaggle", "hf"])
def test_converted_model_has_the_checkpoints_logits(world, tmp_path, fmt):
  src_tok = str(tmp_path / "src.model")
  shutil.copy(world["tok"], src_tok)
  out = tiny_gemma.convert(world[fmt], src_tok, tmp_path / "model")
  # Moved after conversion, and the source tokenizer gone: the directory carries its own.
  os.remove(src_tok)
  moved = str(tmp_path / "elsewhere" / "model")
  shutil.move(out, moved)
  mesh = sharding.make_mesh((-1, 1, 1))
  cfg, params, tok, meta, shardings = model_io.load_model(moved, mesh=mesh)
  assert meta["tokenizer"]["kind"] == "sentencepiece"
  with open(os.path.join(moved, "model.json")) as fh:
    assert json.load(fh)["tokenizer"]["path"] == "tokenizer.model"  # relative to the directory
  with open(os.path.join(moved, "tokenizer.model"), "rb") as a, open(world["tok"], "rb") as b:
    assert a.read() == b.read()
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert tok.model_path == os.path.join(moved, "tokenizer.model")
  assert meta["notes"]["format"] == fmt

  want_cfg, want_params = gemma_io.load_gemma(world[fmt])  # the existing import path
  assert cfg == want_cfg
  assert cfg.vocab_size == (tiny_gemma.KAGGLE_VOCAB if fmt == "kaggle" else tiny_gemma.HF_VOCAB)
  assert cfg.param_dtype == "float32"  # the stored dtype
  jax.tree.map(np.testing.assert_array_equal, _single_device(params), _single_device(want_params))
  tokens = _tokens(1)
  got = _logits(cfg, params, tokens)
  np.testing.assert_array_equal(got, _logits(want_cfg, want_params, tokens))
  if fmt == "hf":  # and transformers' reading of the same safetensors
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.Gemma2ForCausalLM.from_pretrained(
        world["hf"], attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
      ref = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # Not trivially equal: dropping the final soft-cap changes them.
    assert np.abs(_logits(cfg.replace(final_softcap=None), params, tokens) - ref).max() > 1e-2

  # Sampling from the directory as experiments do (the tokenizer from model.json).
  texts = sampling.generate_text(
      params, ["How many clips"], model=T.Transformer(cfg), tokenizer=tok,
      sp=sampling.SamplingParams(max_new_tokens=8, temperature=1.0), rng=jax.random.PRNGKey(0),
      mesh=mesh, param_shardings=shardings)
  assert len(texts) == 1 and isinstance(texts[0][0], str)


def test_dtype_kept_or_cast(world, tmp_path):
  bf16_ckpt = tiny_gemma.make_hf_checkpoint(tmp_path / "hf16", dtype="bfloat16")
  cfg = gemma_io.convert(bf16_ckpt, world["tok"], str(tmp_path / "m16"))
  assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "bfloat16")
  _, params, _, _, _ = model_io.load_model(str(tmp_path / "m16"))
  assert params["embedding"].dtype == jnp.bfloat16
  cfg = gemma_io.convert(world["kaggle"], world["tok"], str(tmp_path / "cast"), dtype="bfloat16")
  _, params, _, meta, _ = model_io.load_model(str(tmp_path / "cast"))
  assert meta["model"]["param_dtype"] == "bfloat16"
  _, want = gemma_io.load_gemma(world["kaggle"], overrides={"param_dtype": "bfloat16"})
  jax.tree.map(np.testing.assert_array_equal, _single_device(params), _single_device(want))


def test_convert_replaces_an_existing_model_directory(world, tmp_path):
  out = str(tmp_path / "model")
  tiny_gemma.convert(world["kaggle"], world["tok"], out)
  tiny_gemma.convert(world["hf"], world["tok"], out)
  cfg, _, _, meta, _ = model_io.load_model(out)
  assert meta["notes"]["format"] == "hf" and cfg.vocab_size == tiny_gemma.HF_VOCAB


def test_convert_to_gcs(world, gcs_bucket, gcs_server):  # noqa: F811
  out = f"{gcs_bucket}/models/tiny"
  storage.write_bytes(f"{gcs_bucket}/src/tokenizer.model", open(world["tok"], "rb").read())
  tiny_gemma.convert(world["kaggle"], f"{gcs_bucket}/src/tokenizer.model", out)
  names = gcs_server.object_names("test-bucket", "models/tiny/")
  assert "models/tiny/tokenizer.model" in names and "models/tiny/model.json" in names
  cfg, params, tok, _, _ = model_io.load_model(out)
  assert tok.model_path == f"{out}/tokenizer.model" and tok.piece_to_id("<end_of_turn>") == 107
  want_cfg, want = gemma_io.load_gemma(world["kaggle"])
  tokens = _tokens(2)
  np.testing.assert_array_equal(_logits(cfg, params, tokens), _logits(want_cfg, want, tokens))


def test_command_line_convert_and_sample(world, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  out = str(tmp_path / "model")
  cmd = [sys.executable, "-m", "qdc_jax.models.gemma_io"]
  common = [f"--checkpoint={world['kaggle']}", f"--tokenizer={world['tok']}"]
  run = subprocess.run(cmd + ["convert"] + common + [f"--out={out}", "--model=lab_tiny"],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"wrote {out}" in run.stdout
  cfg, _, tok, _, _ = model_io.load_model(out)
  assert cfg.vocab_size == tiny_gemma.KAGGLE_VOCAB and tok.vocab_size == 192
  # The sampling command (no subcommand) still works on the same checkpoint.
  run = subprocess.run(cmd + common + ["--prompt=How many clips", "--max_new_tokens=4"],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "--- 'How many clips'" in run.stdout


# ---------------------------------------------------------------------------- errors


def _convert_error(ckpt, tok, out, exc=ValueError):
  with pytest.raises(exc) as e:
    gemma_io.convert(ckpt, tok, str(out))
  assert not os.path.exists(os.path.join(out, "model.json"))  # nothing half-written
  msg = str(e.value)
  assert "--tokenizer=" in msg
  return msg


def test_tokenizer_larger_than_the_table(world, tmp_path):
  small = tiny_gemma.make_hf_checkpoint(tmp_path / "hf160", vocab=160)
  msg = _convert_error(small, world["tok"], tmp_path / "out")
  assert "192 pieces" in msg and "160 rows" in msg and "ids 160..191" in msg
  assert world["tok"] in msg and small in msg
  # One row per piece (HF) and rows past the tokenizer (Kaggle) are both fine.
  tok = tokenizers.SentencePieceTokenizer(world["tok"])
  for vocab in (192, 256):
    gemma_io.check_tokenizer(tok, tiny_gemma.model_config(vocab), world["kaggle"])


def test_special_ids_other_than_gemmas(world, tmp_path):
  # tokenizers_test's layout: pad 0, unk 1, bos 2, eos 3.
  other = tiny_gemma.make_tokenizer(tmp_path, name="other",
                                    ids=dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3))
  msg = _convert_error(world["kaggle"], other, tmp_path / "out")
  assert "its eos id is 3, Gemma's tokenizer says 1" in msg
  assert "pad id" not in msg and "bos id" not in msg
  no_pad = tiny_gemma.make_tokenizer(tmp_path, name="nopad",
                                     ids=dict(pad_id=-1, eos_id=1, bos_id=2, unk_id=0))
  assert "its pad id is -1, Gemma's tokenizer says 0" in _convert_error(
      world["kaggle"], no_pad, tmp_path / "out")


def test_turn_pieces_missing_or_misplaced(world, tmp_path):
  # chat_test's old layout: the turn pieces right after the specials, at 4 and 5.
  early = tiny_gemma.make_tokenizer(tmp_path, name="early", vocab_size=96,
                                    user_defined_symbols=tiny_gemma.TURN_PIECES + ["\n"])
  msg = _convert_error(world["hf"], early, tmp_path / "out")
  assert "its <start_of_turn> is id 4, Gemma's is 106" in msg
  assert "its <end_of_turn> is id 5, Gemma's is 107" in msg
  none = tiny_gemma.make_tokenizer(tmp_path, name="none", vocab_size=96,
                                   user_defined_symbols=["\n"])
  msg = _convert_error(world["hf"], none, tmp_path / "out")
  assert "no <start_of_turn> piece (Gemma's is id 106)" in msg
  assert "no <end_of_turn> piece (Gemma's is id 107)" in msg


def test_hf_config_ids_disagree_with_tokenizer(world, tmp_path):
  ckpt = tiny_gemma.make_hf_checkpoint(tmp_path / "hf", bos_token_id=5, eos_token_id=[6, 107])
  msg = _convert_error(ckpt, world["tok"], tmp_path / "out")
  cfg_json = os.path.join(ckpt, "config.json")
  assert f"its bos id is 2, {cfg_json} says 5" in msg
  assert f"its eos id is 1, {cfg_json} says one of [6, 107]" in msg


def test_missing_tokenizer_or_checkpoint(world, tmp_path):
  msg = _convert_error(world["kaggle"], str(tmp_path / "nope.model"), tmp_path / "out",
                       FileNotFoundError)
  assert "nope.model" in msg
  with pytest.raises(FileNotFoundError, match="nope_ckpt"):
    gemma_io.convert(str(tmp_path / "nope_ckpt"), world["tok"], str(tmp_path / "out"))
