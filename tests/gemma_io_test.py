"""Gemma-2 import/export against transformers' Gemma2ForCausalLM and the Kaggle orbax layout."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qdc_jax import sampling, sharding  # pylint: disable=g-import-not-at-top
from qdc_jax.models import configs, gemma_io
from qdc_jax.models import transformer as T

import tiny_gemma  # tests/tiny_gemma.py  # pylint: disable=g-bad-import-order

SEQ = 24  # longer than the sliding window (8), so local layers really are local


def _hf_config(**kw):
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0, max_position_embeddings=128,
              attn_implementation="eager", pad_token_id=0, bos_token_id=2, eos_token_id=1)
  base.update(kw)
  return transformers.Gemma2Config(**base)


def _random_hf_model(**kw):
  torch.manual_seed(0)
  model = transformers.Gemma2ForCausalLM(_hf_config(**kw)).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # stored around 0, applied as (1 + w): make them matter
        p.uniform_(-0.5, 0.5)
      else:  # larger than HF's 0.02 init so that both soft-caps bite
        p.normal_(0.0, 0.25)
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """A randomly initialised tiny Gemma-2, saved (single file and sharded) for import."""
  model = _random_hf_model()
  root = tmp_path_factory.mktemp("hf")
  model.save_pretrained(root / "single")
  model.save_pretrained(root / "sharded", max_shard_size="40KB")
  assert os.path.exists(root / "sharded" / "model.safetensors.index.json")
  return model, root


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


_FWD = {}


def _our_logits(cfg, params, tokens):
  if cfg not in _FWD:
    _FWD[cfg] = jax.jit(lambda p, x: T.Transformer(cfg).apply({"params": p}, x)[0])
  return np.asarray(_FWD[cfg](params, jnp.asarray(tokens)))


def _tokens(seed, batch=3):
  return np.random.default_rng(seed).integers(0, 128, (batch, SEQ)).astype(np.int32)


def _cfg_from_dir(path):
  with open(os.path.join(path, "config.json")) as fh:
    return gemma_io.config_from_hf(json.load(fh))


def test_config_from_hf(hf):
  cfg = _cfg_from_dir(hf[1] / "single")
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.d_ff) == (128, 64, 4, 4, 2, 16, 128)
  assert cfg.layer_pattern == ("local", "global") and cfg.sliding_window == 8
  assert (cfg.attn_softcap, cfg.final_softcap, cfg.query_pre_attn_scalar) == (5.0, 3.0, 24)
  assert cfg.tie_embeddings and cfg.rope_base == 10_000.0
  # The released 2B config.json maps onto our named config.
  hf_2b = _hf_config(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                     max_position_embeddings=8192)
  assert gemma_io.config_from_hf(hf_2b) == configs.get_model_config("gemma2_2b")


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_import_matches_hf_logits(hf, layout):
  model, root = hf
  cfg = _cfg_from_dir(root / layout)
  params = gemma_io.params_from_hf_safetensors(str(root / layout), cfg)
  tokens = _tokens(1)
  want = _hf_logits(model, tokens)
  np.testing.assert_allclose(_our_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)
  if layout == "single":
    # The test would not notice a missing attention soft-cap or window if they did not bite.
    for change in (dict(attn_softcap=None), dict(sliding_window=SEQ)):
      other = _our_logits(cfg.replace(**change), params, tokens)
      assert np.abs(other - want).max() > 1e-2, change


def test_export_loads_in_transformers_with_same_logits(hf, tmp_path):
  model, root = hf
  cfg, params = gemma_io.load_gemma(str(root / "single"))
  tokens = _tokens(2)
  files = gemma_io.params_to_hf_safetensors(params, cfg, str(tmp_path / "out"),
                                            max_shard_bytes=64 * 1024)
  assert any(f.endswith("model.safetensors.index.json") for f in files)
  reloaded = transformers.Gemma2ForCausalLM.from_pretrained(
      str(tmp_path / "out"), attn_implementation="eager", dtype=torch.float32).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens),
                             atol=1e-5, rtol=0)
  # Our own reader on the sharded export gives back the same tree, bit for bit.
  again = gemma_io.params_from_hf_safetensors(str(tmp_path / "out"), cfg)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_export_and_import(hf, tmp_path):
  _, root = hf
  cfg, params = gemma_io.load_gemma(str(root / "single"))
  gemma_io.params_to_hf_safetensors(params, cfg, str(tmp_path), dtype="bfloat16")
  cfg16, back = gemma_io.load_gemma(str(tmp_path))
  assert cfg16 == cfg  # dtype is ours to choose, not the file's
  bf16 = gemma_io.params_from_hf_safetensors(str(tmp_path), cfg.replace(param_dtype="bfloat16"))
  assert bf16["layer_0"]["attn"]["q"].dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(jnp.asarray(b).astype(jnp.bfloat16))), bf16, params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b, np.float32)), back, bf16)


def test_greedy_generation_matches_hf_generate(tmp_path):
  # Untied head: with a tied random table the argmax mostly repeats the input token, which
  # would make a weak test. This also covers importing `lm_head.weight`.
  model = _random_hf_model(tie_word_embeddings=False)
  model.save_pretrained(tmp_path)
  cfg, params = gemma_io.load_gemma(str(tmp_path))
  assert not cfg.tie_embeddings and params["lm_head"].shape == (64, 128)
  n_new = 12  # prompts of up to 15 + 12 tokens run well past the window of 8
  rng = np.random.default_rng(3)
  prompts = [[2] + list(rng.integers(3, 128, n)) for n in (4, 9, 14)]
  model.generation_config.eos_token_id = None  # never stop early on either side
  want = []
  with torch.no_grad():
    for p in prompts:
      out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n_new,
                           min_new_tokens=0, pad_token_id=0)
      want.append(out[0, len(p):].tolist())
  sp = sampling.SamplingParams(max_new_tokens=n_new, greedy=True, eos_id=-1, pad_id=0)
  toks, lens = sampling.pad_prompts(prompts, 0)
  got = jax.device_get(sampling.jit_sample(T.Transformer(cfg), sp)(
      params, toks, lens, jax.random.PRNGKey(0)))
  assert [list(map(int, row)) for row in got.tokens] == want


# ------------------------------------------------------------------------------ Kaggle


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x)))


_kaggle_tree = tiny_gemma.kaggle_tree
_save_orbax = tiny_gemma.save_orbax


def _check_kaggle_semantics(cfg, flat, params, fused):
  """Every leaf computes what the gemma library's einsum computes with the Kaggle array."""
  x = np.random.default_rng(9).normal(size=(5, cfg.d_model)).astype(np.float32)
  np.testing.assert_array_equal(params["embedding"], flat["embedder/input_embedding"])
  np.testing.assert_array_equal(params["final_norm"]["scale"], flat["final_norm/scale"])
  close = dict(rtol=1e-5, atol=1e-4)
  for i in range(cfg.num_layers):
    p, ours = f"layer_{i}/", params[f"layer_{i}"]
    a = {name: np.asarray(w) for name, w in ours["attn"].items()}
    if fused:  # gemma: 'BTD,SNDH->SBTNH'
      q, k, v = np.einsum("td,sndh->stnh", x, flat[p + "attn/qkv_einsum/w"])
    else:  # gemma: 'BTD,NDH->BTNH' and 'BSD,CKDH->CBSKH'
      q = np.einsum("td,ndh->tnh", x, flat[p + "attn/q_einsum/w"])
      k, v = np.einsum("sd,ckdh->cskh", x, flat[p + "attn/kv_einsum/w"])
    np.testing.assert_allclose(np.einsum("td,dnh->tnh", x, a["q"]), q, **close)
    np.testing.assert_allclose(np.einsum("td,dkh->tkh", x, a["k"]), k, **close)
    np.testing.assert_allclose(np.einsum("td,dkh->tkh", x, a["v"]), v, **close)
    enc = np.random.default_rng(i).normal(size=(5, cfg.num_heads, cfg.head_dim))
    np.testing.assert_allclose(np.einsum("tnh,nhd->td", enc, a["o"]),  # 'BTNH,NHD->BTD'
                               np.einsum("tnh,nhd->td", enc, flat[p + "attn/attn_vec_einsum/w"]),
                               **close)
    # gemma FeedForward (transposed gating): '...F,NHF->...NH', gelu(g0) * g1, '...H,HF->...F'.
    g = np.einsum("tf,nhf->tnh", x, flat[p + "mlp/gating_einsum/w"])
    want = np.einsum("th,hf->tf", _gelu(g[:, 0]) * g[:, 1], flat[p + "mlp/linear/w"])
    m = {name: np.asarray(w) for name, w in ours["mlp"].items()}
    got = (_gelu(x @ m["gate"]) * (x @ m["up"])) @ m["down"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    for o, kag in (("pre_attn_norm", "pre_attention_norm"),
                   ("post_attn_norm", "post_attention_norm"),
                   ("pre_mlp_norm", "pre_ffw_norm"), ("post_mlp_norm", "post_ffw_norm")):
      # Both store the scale around zero: copied, no +1.
      np.testing.assert_array_equal(ours[o]["scale"], flat[p + kag + "/scale"])


@pytest.mark.parametrize("fused,nested", [(True, False), (False, False), (False, True)])
def test_kaggle_import_puts_every_leaf_in_place(tmp_path, fused, nested):
  cfg = configs.get_model_config("lab_tiny", **({"num_kv_heads": 4} if fused else {}))
  flat, tree = _kaggle_tree(cfg, fused=fused, nested=nested)
  path = _save_orbax(tree, tmp_path / "kaggle")
  params = gemma_io.params_from_kaggle_orbax(path, cfg)
  abstract = nn.meta.unbox(gemma_io._abstract_params(cfg))  # pylint: disable=protected-access
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, abstract)
  _check_kaggle_semantics(cfg, flat, params, fused)
  if not fused and not nested:
    # load_gemma recognises lab_tiny from the stored shapes.
    cfg2, params2 = gemma_io.load_gemma(path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


# ---------------------------------------------------------------------------- errors


def test_mismatched_config_names_config_leaf_and_shapes(hf, tmp_path):
  _, root = hf
  cfg = _cfg_from_dir(root / "single")
  with pytest.raises(ValueError) as e:
    gemma_io.params_from_hf_safetensors(str(root / "single"), cfg.replace(d_model=32),
                                        config_name="tiny_d32")
  msg = str(e.value)
  assert "'tiny_d32'" in msg and "model.embed_tokens.weight" in msg
  assert "(128, 64)" in msg and "(128, 32)" in msg
  with pytest.raises(ValueError, match=r"model\.layers\.3\..*more layers"):
    gemma_io.params_from_hf_safetensors(str(root / "single"), cfg.replace(num_layers=3))
  with pytest.raises(ValueError, match="does not match"):
    gemma_io.load_gemma(str(root / "single"), config_name="lab_tiny")
  small = configs.get_model_config("lab_tiny")
  _, tree = _kaggle_tree(small, fused=False, nested=False)
  path = _save_orbax(tree, tmp_path / "kaggle")
  with pytest.raises(ValueError, match=r"'lab_tiny'.*\n.*embedder/input_embedding.*\(128, 64\)"
                                       r".*\(128, 32\)"):
    gemma_io.params_from_kaggle_orbax(path, small.replace(d_model=32), config_name="lab_tiny")


def test_missing_checkpoint_names_path_and_flag(tmp_path):
  cfg = configs.get_model_config("lab_tiny")
  missing = str(tmp_path / "nope")
  for fn in (gemma_io.params_from_hf_safetensors, gemma_io.params_from_kaggle_orbax):
    with pytest.raises(FileNotFoundError, match="nope.*--config.model.checkpoint="):
      fn(missing, cfg)
  with pytest.raises(FileNotFoundError, match="--config.model.checkpoint="):
    gemma_io.load_gemma(missing)


# -------------------------------------------------------------------------- sharding


def test_sharded_import_on_fake_mesh(hf, tmp_path):
  _, root = hf
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = sharding.make_mesh((1, 4, 2))
  cfg = _cfg_from_dir(root / "sharded")
  abstract = jax.eval_shape(T.Transformer(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
  shardings = sharding.logical_to_shardings(nn.get_partition_spec(abstract), mesh,
                                            sharding.DEFAULT_RULES)
  params = gemma_io.params_from_hf_safetensors(str(root / "sharded"), cfg, shardings=shardings)
  plain = gemma_io.params_from_hf_safetensors(str(root / "single"), cfg)
  q = params["layer_1"]["attn"]["q"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (64 // 4, 4 // 2, 16)
  assert params["layer_0"]["mlp"]["down"].sharding.spec == P("tensor", "fsdp")
  jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"),
               params, shardings)
  jax.tree.map(np.testing.assert_array_equal, params, plain)

  # The Kaggle path restores into the same target shardings.
  kcfg = configs.get_model_config("lab_tiny")
  flat, tree = _kaggle_tree(kcfg, fused=False, nested=False)
  kparams_plain = gemma_io.params_from_kaggle_orbax(_save_orbax(tree, tmp_path / "k"), kcfg)
  _, kparams = gemma_io.load_gemma(str(tmp_path / "k"), mesh=mesh)
  kv = kparams["layer_0"]["attn"]["k"]
  assert kv.sharding.spec == P("fsdp", "tensor", None)
  jax.tree.map(np.testing.assert_array_equal, kparams, kparams_plain)
