"""Sampler tests against naive references: a no-cache decode and a full forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdc_jax import sampling, sharding
from qdc_jax.models import configs
from qdc_jax.models import transformer as T

EOS, PAD = 2, 0


def _model(num_layers=2, **kw):
  # Window 6 is shorter than prompt + generation (up to 30), so local layers are exercised
  # past their window both in prefill and in decode.
  cfg = configs.get_model_config("lab_tiny", sliding_window=6, num_layers=num_layers, **kw)
  model = T.Transformer(cfg)
  params = T.nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
                           ["params"])
  # Make EOS likely enough that some rows stop early and others run to the limit.
  params["embedding"] = params["embedding"].at[EOS].mul(3.0)
  return model, params


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(4, 100, n)) for n in lengths]


_JITTED = {}
_FULL = 32  # every prompt + generation fits; causal attention ignores the right padding


def _forward(model, params, seq):
  """Logits of a whole sequence without a cache (one compile: fixed padded length)."""
  if id(model) not in _JITTED:
    _JITTED[id(model)] = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  fwd = _JITTED[id(model)]
  padded = np.zeros((1, _FULL), np.int32)
  padded[0, :len(seq)] = seq
  return fwd(params, padded)[0, :len(seq)]


def _naive_greedy(model, params, prompt, n, eos):
  """Recompute the whole prefix every step; no cache."""
  seq, out = list(prompt), []
  for _ in range(n):
    logits = _forward(model, params, seq)
    tok = int(jnp.argmax(logits[-1]))
    out.append(tok)
    seq.append(tok)
    if tok == eos:
      break
  return out


def test_greedy_equals_naive_decode_with_mixed_prompt_lengths():
  model, params = _model()
  prompts = _prompts([3, 11, 7, 1])
  n = 20
  # Random weights rarely pick a given EOS greedily, so use as EOS the generated token whose
  # first occurrence varies most across rows: rows then stop at different steps.
  free = [_naive_greedy(model, params, p, n, eos=-1) for p in prompts]
  stop_at = lambda t: tuple(g.index(t) + 1 if t in g else n for g in free)
  eos = max(sorted({t for g in free for t in g}), key=lambda t: len(set(stop_at(t))))
  assert len(set(stop_at(eos))) > 1
  toks, lens = sampling.pad_prompts(prompts, PAD, multiple=4)
  sp = sampling.SamplingParams(max_new_tokens=n, greedy=True, num_samples=2, eos_id=eos,
                               pad_id=PAD)
  out = jax.device_get(sampling.jit_sample(model, sp)(params, toks, lens,
                                                      jax.random.PRNGKey(0)))
  for b, prompt in enumerate(prompts):
    ref = _naive_greedy(model, params, prompt, n, eos)
    assert len(ref) == stop_at(eos)[b]
    for k in range(2):
      row = b * 2 + k
      assert out.lengths[row] == len(ref)
      assert list(out.tokens[row, :len(ref)]) == ref
      assert np.all(out.tokens[row, len(ref):] == PAD)
      assert np.all(out.logprobs[row, len(ref):] == 0.0)


@pytest.mark.parametrize("multiple", [1, 4, 16, 64])
def test_prompt_buckets_are_the_shortest_geometric_bucket(multiple):
  # Reference: the bucket set written out, multiple x (1, 2, 3, 4, 6, 8, 12, ...).
  buckets = sorted({multiple * 2 ** k for k in range(14)}
                   | {multiple * 3 * 2 ** k for k in range(13)})
  for n in range(1, 3000):
    assert sampling.bucket_length(n, multiple) == min(b for b in buckets if b >= n), n
  # Capped (a learned position table), never below the longest rounded up to `multiple`.
  toks, lens = sampling.pad_prompts([[5] * 37], PAD, multiple=multiple, max_length=40)
  assert toks.shape[1] == max(min(sampling.bucket_length(37, multiple), 40),
                              -(-37 // multiple) * multiple)
  assert list(lens) == [37]


def test_padding_to_a_longer_bucket_changes_no_token():
  model, params = _model()
  prompts = _prompts([3, 11, 7, 1], seed=2)
  sp = sampling.SamplingParams(max_new_tokens=12, num_samples=2, eos_id=EOS, pad_id=PAD)
  run = sampling.jit_sample(model, sp)
  outs = []
  for width in (12, 24):
    toks, lens = sampling.pad_prompts(prompts, PAD, multiple=width)
    assert toks.shape[1] == width
    outs.append(jax.device_get(run(params, toks, lens, jax.random.PRNGKey(5))))
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_array_equal(outs[0].lengths, outs[1].lengths)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.3, top_p=0.8)])
def test_logprobs_equal_full_forward(kw):
  model, params = _model()
  prompts = _prompts([5, 9, 2], seed=1)
  toks, lens = sampling.pad_prompts(prompts, PAD, multiple=8)
  sp = sampling.SamplingParams(max_new_tokens=16, num_samples=4, eos_id=EOS, pad_id=PAD, **kw)
  out = jax.device_get(sampling.jit_sample(model, sp)(params, toks, lens,
                                                      jax.random.PRNGKey(3)))
  for row in range(len(prompts) * 4):
    prompt, n = prompts[row // 4], int(out.lengths[row])
    gen = list(out.tokens[row, :n])
    assert EOS not in gen[:-1]
    logits = _forward(model, params, prompt + gen)[None]
    logp = jax.nn.log_softmax(logits[0], -1)
    ref = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(gen)]
    np.testing.assert_allclose(out.logprobs[row, :n], ref, atol=1e-5)
    if kw.get("top_k"):
      # Each sampled token was among the top-k of its step's distribution.
      for i, t in enumerate(gen):
        top = np.argsort(-np.asarray(logits[0, len(prompt) - 1 + i]))[:kw["top_k"]]
        assert t in top
  # K samples of one prompt are not copies of each other.
  assert len({tuple(out.tokens[r]) for r in range(4)}) > 1


def test_samples_of_a_prompt_share_one_copy_of_its_cache():
  # The K rows of a prompt read its keys/values from one [B, K, P, H] copy and own N slots
  # each: B*P + B*K*N cache slots per layer instead of B*K*(P+N). Decoding from that cache
  # gives the logits of decoding from a full copy per row (the cache layout before sharing),
  # with mixed prompt lengths and a window (6) shorter than the prompts.
  model, params = _model()
  cfg = model.config
  prompts = _prompts([3, 11, 7], seed=6)
  toks, lens = sampling.pad_prompts(prompts, PAD, multiple=12)
  b, p, k, n = 3, 12, 4, 5
  last, cache, start = sampling.prefill(params, toks, lens, model=model, num_samples=k,
                                        max_new_tokens=n)
  layer = cache["layer_0"]
  assert layer["prefix_k"].shape == (b, cfg.num_kv_heads, p, cfg.head_dim)
  assert layer["k"].shape == (b * k, cfg.num_kv_heads, n, cfg.head_dim)
  np.testing.assert_array_equal(cache["prefix_lengths"], np.repeat(lens, k))

  full = T.init_cache(cfg, b, p + n)
  pos = jnp.broadcast_to(jnp.arange(p)[None], (b, p))
  ref_logits, full = model.apply({"params": params}, toks, pos, cache=full,
                                 logits_index_B=lens - 1)
  full = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), full)
  np.testing.assert_allclose(last, np.repeat(ref_logits[:, 0], k, axis=0), atol=1e-5)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (b * k, n), 4, 100)
  for i in range(n):
    step = (start + i)[:, None]
    got, cache = model.apply({"params": params}, tokens[:, i:i + 1], step, cache=cache)
    want, full = model.apply({"params": params}, tokens[:, i:i + 1], step, cache=full)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_filter_logits_against_sorted_reference():
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.75)))[0]
  # Sorted probs 0.4, 0.3, 0.15, ...: mass before 0.15 is 0.7 < 0.75, before 0.1 it is 0.85.
  assert kept.tolist() == [False, True, False, True, True]
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=2)))[0]
  assert kept.tolist() == [False, True, False, True, False]


# The plain sampler, the stream sampler; and both with scan_layers (4 layers = 2 scanned
# local/global pairs, decoding from the same shared cache): on a mesh, the tokens, lengths and
# log-probs of the single-device unrolled sampler for the same key.
@pytest.mark.parametrize("slots,scan", [(0, False), (4, False), (0, True), (4, True)])
def test_sharded_sampling_matches_single_device(slots, scan):
  model, params = _model(num_layers=4 if scan else 2)
  prompts = _prompts([4, 6, 3, 8], seed=2)
  toks, lens = sampling.pad_prompts(prompts, PAD, multiple=8)
  sp = sampling.SamplingParams(max_new_tokens=12, num_samples=2, eos_id=EOS, pad_id=PAD,
                               temperature=0.8)
  rng = jax.random.PRNGKey(7)
  single = jax.device_get(sampling.jit_sample(model, sp)(params, toks, lens, rng))
  mesh = sharding.make_mesh((4, 1, 2))
  rules = sharding.DEFAULT_RULES
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  shardings = sharding.logical_to_shardings(T.nn.get_partition_spec(abstract), mesh, rules)
  sharded_params = jax.device_put(params, shardings["params"])
  if scan:
    model = T.Transformer(model.config.replace(scan_layers=True))
  run = sampling.jit_sample(model, sp, mesh, rules, shardings["params"], slots=slots)
  out = run(sharded_params, toks, lens, rng)
  assert out.tokens.sharding.spec[0] == ("data", "fsdp")
  out = jax.device_get(out)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)


def test_valid_vocab_and_extra_stop_ids():
  model, params = _model()
  prompts = _prompts([5, 3], seed=4)
  toks, lens = sampling.pad_prompts(prompts, PAD, multiple=8)
  sp = sampling.SamplingParams(max_new_tokens=16, num_samples=8, eos_id=EOS, pad_id=PAD,
                               temperature=2.0, valid_vocab_size=40)
  out = jax.device_get(sampling.jit_sample(model, sp)(params, toks, lens,
                                                      jax.random.PRNGKey(0)))
  gen = [t for r in range(16) for t in out.tokens[r, :out.lengths[r]]]
  assert max(gen) < 40 and len(set(gen)) > 10
  # Every row stops at the first of its tokens that is in the stop set.
  stops = (EOS, 7, 11)
  sp2 = sampling.SamplingParams(max_new_tokens=16, num_samples=8, eos_id=EOS, pad_id=PAD,
                                temperature=2.0, valid_vocab_size=40, extra_stop_ids=(7, 11))
  out2 = jax.device_get(sampling.jit_sample(model, sp2)(params, toks, lens,
                                                        jax.random.PRNGKey(0)))
  stopped = 0
  for r in range(16):
    row = list(out2.tokens[r, :out2.lengths[r]])
    assert not any(t in stops for t in row[:-1])
    stopped += row[-1] in stops
  assert stopped > 0


def test_stop_strings_end_rows_on_device_and_cut_text():
  """A model that always continues "ab" -> "c" -> ... : a stop string ends the row early on
  the device (fewer tokens) and the returned text stops before it."""
  from qdc_jax import tokenizers
  tok = tokenizers.make_tokenizer("char", alphabet="abcdefgh")
  cfg = configs.get_model_config("lab_tiny", vocab_size=tok.vocab_size + 2)
  model = T.Transformer(cfg)
  params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"]
  sp = sampling.SamplingParams(max_new_tokens=24, greedy=True)
  [[free]] = sampling.generate_text(params, ["ab"], model=model, tokenizer=tok, sp=sp,
                                    rng=jax.random.PRNGKey(0))
  assert len(free) >= 6, free  # runs on without a stop string
  stop = free[2:4]
  [[cut]] = sampling.generate_text(params, ["ab"], model=model, tokenizer=tok, sp=sp,
                                   rng=jax.random.PRNGKey(0), stop_strings=[stop])
  assert cut == free[:free.find(stop)]
  # On the device: the row stops right after the stop sequence's last token.
  ids = tuple(tok.encode(stop))
  enc = np.asarray([tok.encode("ab", add_bos=True)], np.int32)
  out = sampling.jit_sample(model, dataclasses.replace(
      sp, eos_id=tok.eos_id, pad_id=tok.pad_id, stop_sequences=(ids,)))(
          params, enc, np.asarray([enc.shape[1]], np.int32), jax.random.PRNGKey(0))
  gen = tok.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]))
  assert gen.endswith(stop) and gen.find(stop) == len(gen) - len(stop), (gen, stop)
  assert int(out.lengths[0]) < 24


def test_generate_text_with_slots_returns_the_same_texts_in_batches():
  # Keys are per (prompt, sample, position) within a call: the texts do not depend on
  # streaming, and a stop string still cuts each text.
  from qdc_jax import tokenizers
  tok = tokenizers.make_tokenizer("char", alphabet="abcdefgh")
  cfg = configs.get_model_config("lab_tiny", vocab_size=tok.vocab_size + 2, num_layers=2)
  model = T.Transformer(cfg)
  params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, 8), jnp.int32))["params"]
  sp = sampling.SamplingParams(max_new_tokens=12, num_samples=3, temperature=1.0)
  prompts = ["ab", "cde", "h", "gg", "abcdefg"]
  kw = dict(model=model, tokenizer=tok, sp=sp, rng=jax.random.PRNGKey(9), batch_size=2,
            stop_strings=["ee"])
  plain = sampling.generate_text(params, prompts, **kw)
  assert sampling.generate_text(params, prompts, slots=4, **kw) == plain
  assert len({t for row in plain for t in row}) > 5 and not any("ee" in t for r in plain
                                                                 for t in r)


def _reference_keys_texts(params, prompts, *, model, tokenizer, sp, rng, batch_size):
  """generate_text's contract written out: prompt j alone in a call of its own, keyed
  fold_in(fold_in(rng, first index of its batch of `batch_size`), its index in the batch)."""
  run = sampling.jit_sample(model, dataclasses.replace(
      sp, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      valid_vocab_size=tokenizer.vocab_size))
  out = []
  for j, text in enumerate(prompts):
    toks, lens = sampling.pad_prompts([tokenizer.encode(text, add_bos=True)], tokenizer.pad_id)
    key = jax.random.fold_in(jax.random.fold_in(rng, j - j % batch_size), j % batch_size)
    res = jax.device_get(run(params, toks, lens, key[None]))
    out.append([tokenizer.decode(res.tokens[r, :res.lengths[r]]) for r in range(sp.num_samples)])
  return out


@pytest.mark.parametrize("fixed_batch,where", [(False, ""), (True, ""), (False, "mesh"),
                                               (True, "slots")])
@pytest.mark.parametrize("sp_kw", [dict(greedy=True), dict(temperature=1.0)])
def test_grouping_by_length_returns_the_texts_of_plain_batches(fixed_batch, where, sp_kw):
  # Prompts of very different lengths (several buckets of 4) in batches of 3: grouping them
  # by length changes which prompts share a call and how far each is padded, not what any
  # prompt samples. The reference samples each prompt alone with the key of its batch slot.
  from qdc_jax import tokenizers
  tok = tokenizers.make_tokenizer("char", alphabet="abcdefgh")
  cfg = configs.get_model_config("lab_tiny", vocab_size=tok.vocab_size + 2, num_layers=2)
  model = T.Transformer(cfg)
  params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, 8), jnp.int32))["params"]
  sp = sampling.SamplingParams(max_new_tokens=10, num_samples=2, **sp_kw)
  prompts = ["abcdefgh" * 3, "a", "cde", "hhgg" * 4, "b", "abcdefg", "ggg" * 7]
  kw = dict(model=model, tokenizer=tok, sp=sp, rng=jax.random.PRNGKey(3), batch_size=3,
            pad_multiple=4, fixed_batch=fixed_batch)
  if where == "slots":
    kw["slots"] = 4
  if where == "mesh":  # 4 data rows per call: calls of 1 or 2 prompts are padded with copies
    mesh = sharding.make_mesh((4, 1, 2))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    shardings = sharding.logical_to_shardings(T.nn.get_partition_spec(abstract), mesh,
                                              sharding.DEFAULT_RULES)["params"]
    params = jax.device_put(T.nn.meta.unbox(params), shardings)
    kw.update(mesh=mesh, param_shardings=shardings)
  plain = sampling.generate_text(params, prompts, group_by_length=False, **kw)
  grouped = sampling.generate_text(params, prompts, group_by_length=True, **kw)
  assert grouped == plain
  ref = _reference_keys_texts(params, prompts, model=model, tokenizer=tok, sp=sp,
                              rng=jax.random.PRNGKey(3), batch_size=3)
  assert plain == ref
  if not sp_kw.get("greedy"):
    assert len({t for row in plain for t in row}) > 7


def test_length_groups_cover_every_prompt_once_in_one_bucket_per_call():
  rng = np.random.default_rng(0)
  lengths = list(rng.integers(1, 300, 200))
  calls = sampling.length_groups(lengths, batch_size=24, multiple=16, max_length=256)
  seen = sorted(i for idx, _ in calls for i in idx)
  assert seen == list(range(200))
  for idx, width in calls:
    assert 1 <= len(idx) <= width <= 24 and idx == sorted(idx)
    assert width == 24 or width & (width - 1) == 0  # a power of two unless capped
    p = {sampling.pad_prompts([[1] * lengths[i]], 0, multiple=16, max_length=256)[0].shape[1]
         for i in idx}
    assert len(p) == 1, p  # each prompt's own padded length, shared by its call
  assert len(calls) < 40


def test_per_prompt_keys_sample_what_the_batch_key_samples():
  model, params = _model()
  prompts = _prompts([4, 9, 2], seed=3)
  sp = sampling.SamplingParams(max_new_tokens=8, num_samples=3, temperature=1.0, eos_id=EOS,
                               pad_id=PAD)
  run = sampling.jit_sample(model, sp)
  toks, lens = sampling.pad_prompts(prompts, PAD)
  rng = jax.random.PRNGKey(11)
  one = jax.device_get(run(params, toks, lens, rng))
  per = jax.device_get(run(params, toks, lens, sampling.prompt_keys(rng, 3)))
  np.testing.assert_array_equal(one.tokens, per.tokens)
  # Reversed prompts with their keys reversed: each prompt's rows come back unchanged.
  rev = jax.device_get(run(params, toks[::-1], lens[::-1], sampling.prompt_keys(rng, 3)[::-1]))
  np.testing.assert_array_equal(rev.tokens.reshape(3, 3, -1)[::-1],
                                one.tokens.reshape(3, 3, -1))
  with pytest.raises(ValueError, match="2 prompt keys for 3 prompts"):
    run(params, toks, lens, sampling.prompt_keys(rng, 2))


def test_gumbel_max_draws_what_jax_random_categorical_draws():
  # The independent reference: jax.random.categorical with the same key, on logits with
  # masked (-inf) entries, large and tiny scales, and a small and a Gemma-like vocabulary.
  fn = jax.jit(sampling.gumbel_max)
  for v, scale in ((7, 1.0), (128, 5.0), (1000, 0.01)):
    for seed in range(20):
      key = jax.random.PRNGKey(seed)
      logits = scale * jax.random.normal(jax.random.PRNGKey(1000 + seed), (16, v))
      logits = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(2000 + seed), 0.3, (16, v)),
                         -jnp.inf, logits).at[:, 0].set(0.0)  # at least one finite entry
      keys = jax.random.split(key, 16)  # one key per row, as the sampler keys its rows
      want = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits)
      np.testing.assert_array_equal(np.asarray(fn(keys, logits)), np.asarray(want))


def test_row_keys_are_per_prompt_sample_and_position():
  # Independent reference: the fold_in chain written out for each row.
  rng = jax.random.PRNGKey(7)
  keys = sampling.row_keys(rng, 3, 2)
  for row in range(6):
    want = jax.random.fold_in(jax.random.fold_in(rng, row // 2), row % 2)
    np.testing.assert_array_equal(np.asarray(keys[row]), np.asarray(want))
  assert len({tuple(np.asarray(k)) for k in keys}) == 6


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=1.0),
                                dict(temperature=0.8, top_k=5)])
@pytest.mark.parametrize("slots,refill", [(2, 1), (5, 2), (64, 0)])
def test_stream_sampler_gives_the_plain_samplers_tokens(kw, slots, refill):
  # Continuous batching changes which rows decode together, not what any row samples:
  # the same tokens, lengths and log-probs as the plain sampler for the same key, with rows
  # that stop at different steps (EOS likely, a stop sequence) so slots are refilled.
  model, params = _model()
  prompts = _prompts([3, 11, 7, 1, 5], seed=4)
  toks, lens = sampling.pad_prompts(prompts, PAD, multiple=4)
  sp = sampling.SamplingParams(max_new_tokens=14, num_samples=3, eos_id=EOS, pad_id=PAD,
                               stop_sequences=((17, 17),), **kw)
  plain = jax.device_get(sampling.jit_sample(model, sp)(params, toks, lens,
                                                        jax.random.PRNGKey(11)))
  stream = jax.device_get(sampling.jit_sample(model, sp, slots=slots, refill=refill)(
      params, toks, lens, jax.random.PRNGKey(11)))
  if not kw.get("greedy"):
    assert len(set(plain.lengths.tolist())) > 2  # rows really stop at different steps
  np.testing.assert_array_equal(stream.tokens, plain.tokens)
  np.testing.assert_array_equal(stream.lengths, plain.lengths)
  np.testing.assert_allclose(stream.logprobs, plain.logprobs, atol=1e-5)


def test_sampling_progress_lines(caplog):
  caplog.set_level("INFO")
  p = sampling._Progress(total=40, per_call=16, every_s=0.0)  # pylint: disable=protected-access
  for n in (16, 16, 8):
    p.update(n)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sampling:")]
  assert [l.split(" | ")[0] for l in lines] == ["sampling: 16/40 rollouts",
                                               "sampling: 32/40 rollouts",
                                               "sampling: 40/40 rollouts"]
  assert all("rollouts/s" in l and "ETA" in l for l in lines)
  assert lines[-1].endswith("ETA 0m00s")
  caplog.clear()
  one = sampling._Progress(total=16, per_call=16, every_s=0.0)  # pylint: disable=protected-access
  one.update(16)  # a single call says nothing
  assert not [r for r in caplog.records if r.getMessage().startswith("sampling:")]
