"""Batched sampling with a KV cache: prefill + decode loop, all inside one jit.

Rows: prompt b's K samples are rows b*K .. b*K+K-1 of every output. Prompts of different
lengths share a batch: they are right-padded to P and prefilled once; the K rows of a prompt
share that one copy of its KV cache (slots past its length are masked) and write their own
tokens into N slots of their own (`transformer.init_shared_cache`), so a decode step reads
B*P + B*K*N cache slots, not B*K*(P+N).

Returned log-probs are those of the model's own distribution (temperature 1, no top-k/top-p
filtering) for the token that was chosen: what PPO ratios, KL penalties and scoring need.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Optional, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qdc_jax import metrics_log
from qdc_jax import sharding as sharding_lib
from qdc_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int
  num_samples: int = 1  # K samples per prompt
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  greedy: bool = False
  eos_id: int = 2
  pad_id: int = 0
  # More tokens that end a row (e.g. Gemma's <end_of_turn>, 107, besides <eos>).
  extra_stop_ids: tuple[int, ...] = ()
  # Ids >= this are never chosen (Kaggle Gemma tables have 128 rows past the tokenizer's
  # 256000); 0 = every id of the model's vocabulary.
  valid_vocab_size: int = 0
  # Token sequences that end a row once generated (stop strings, encoded; see generate_text).
  stop_sequences: tuple[tuple[int, ...], ...] = ()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.eos_id,) + tuple(self.extra_stop_ids)


class SampleOutput(NamedTuple):
  tokens: jax.Array  # [B*K, N] generated tokens, pad_id after the stop token
  lengths: jax.Array  # [B*K] generated tokens per row, EOS included when produced
  logprobs: jax.Array  # [B*K, N] log p(token) under the model, 0 after the stop


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Mask (to -inf) tokens outside the top-k and outside the top-p nucleus."""
  if top_k and top_k > 0:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p: the top token always stays.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)
  return logits_BxV


def choose_tokens(logits_BxV: jax.Array, keys_B: jax.Array, sp: SamplingParams) -> jax.Array:
  """One token per row; row b draws with its own key keys_B[b] (see `row_keys`)."""
  if sp.valid_vocab_size:
    ids = jnp.arange(logits_BxV.shape[-1])
    logits_BxV = jnp.where(ids < sp.valid_vocab_size, logits_BxV, -jnp.inf)
  if sp.greedy or sp.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  scaled = logits_BxV.astype(jnp.float32) / sp.temperature
  scaled = filter_logits(scaled, top_k=sp.top_k, top_p=sp.top_p)
  return gumbel_max(keys_B, scaled)


def gumbel_max(keys_B: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """For each row b, the token `jax.random.categorical(keys_B[b], logits_BxV[b])` draws (the
  same Gumbel noise, the same first-index tie-break), with the argmax as a max then a min over
  the indices that reach it: XLA:CPU lowers argmax to a variadic (value, index) reduction that
  cost ~10% of decode time (docs/benchmarks.md)."""
  v = logits_BxV.shape[-1]
  noise = jax.vmap(lambda k: jax.random.gumbel(k, (v,), logits_BxV.dtype))(keys_B)
  x = logits_BxV + noise
  m = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1).astype(jnp.int32)  # all-NaN rows: never past V


# What a given key samples. 2: one key per (prompt, sample, position) (`row_keys`), so a row's
# tokens do not depend on its batch or slot; 1 was one key per decode step for all rows.
# Settings fingerprints include it: a resumed run never mixes samples of two keyings.
SAMPLER_VERSION = 2


def prompt_keys(rng: jax.Array, num_prompts: int) -> jax.Array:
  """Key of prompt b in a call keyed by one `rng`: fold_in(rng, b)."""
  return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(num_prompts,
                                                                   dtype=jnp.int32))


def _is_key_batch(rng: jax.Array) -> bool:
  """One key ([2] raw or a scalar typed key) or a batch of them ([B, 2] / [B])?"""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return rng.ndim == (1 if typed else 2)


def row_keys(rng: jax.Array, num_prompts: int, num_samples: int) -> jax.Array:
  """Key of row b*K + k: fold_in(key_b, k), where key_b is the prompt's key: `rng[b]` when
  `rng` holds one key per prompt, else fold_in(rng, b) (`prompt_keys`). Position i draws with
  fold_in(row key, i). A prompt passed with its own key samples the same tokens in any batch,
  any slot and next to any other prompts (how `generate_text` groups prompts by length)."""
  if _is_key_batch(rng):
    if rng.shape[0] != num_prompts:
      raise ValueError(f"{rng.shape[0]} prompt keys for {num_prompts} prompts")
    per_prompt = rng
  else:
    per_prompt = prompt_keys(rng, num_prompts)
  sample_ = jnp.tile(jnp.arange(num_samples, dtype=jnp.int32), num_prompts)
  return jax.vmap(jax.random.fold_in)(jnp.repeat(per_prompt, num_samples, axis=0), sample_)


def _at_position(keys_B: jax.Array, i) -> jax.Array:
  return jax.vmap(jax.random.fold_in)(keys_B, jnp.broadcast_to(i, keys_B.shape[:1]))


def prefill(params, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array, *,
            model: transformer.Transformer, num_samples: int, max_new_tokens: int):
  """Run the prompts once and build the decode cache of their K = `num_samples` rows each.

  The K rows of a prompt share one copy of its keys and values (`init_shared_cache`); each
  row owns `max_new_tokens` slots for what it generates. Returns (next-token logits
  [B*K, V], cache, first decode position [B*K])."""
  cfg = model.config
  b, p = prompts_BxP.shape
  cache = transformer.init_cache(cfg, b, p)
  cache = nn.with_logical_constraint(cache, transformer.cache_logical_axes(cfg))
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
  logits, cache = model.apply({"params": params}, prompts_BxP, positions, cache=cache,
                              logits_index_B=prompt_lengths_B - 1)
  start = jnp.repeat(prompt_lengths_B.astype(jnp.int32), num_samples)
  cache = transformer.init_shared_cache(cfg, cache, start, max_new_tokens)
  cache = nn.with_logical_constraint(cache, transformer.cache_logical_axes(cfg, True))
  return jnp.repeat(logits[:, 0], num_samples, axis=0), cache, start


class TokenHook(Protocol):
  """What a sampling variant plugs into the one decode loop (`sample(..., hook=)`).

  A hook is a frozen (hashable) dataclass: it keys the compiled-sampler cache. Each step it
  sees the token the sampler chose for every row and may replace it (forced tokens get
  log-prob 0 and never stop a row) or end rows, keeping its own per-row state. RCRL's
  label-forcing sampler (`rl.rcrl.StepRule`) is one.
  """

  def init(self, rows: int) -> Any:
    """Per-row state before the first decode step (a pytree of [rows] arrays)."""

  def __call__(self, state: Any, chosen_B: jax.Array, done_B: jax.Array, sp: SamplingParams
               ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """(token [B], forced [B] bool, ends [B] bool, new state) for one step; rows already
    `done_B` are padded by the loop whatever the hook returns."""


def _check_positions(cfg, p: int, n: int) -> None:
  if cfg.position == "learned" and p + n > cfg.max_len:
    raise ValueError(f"Prompt length {p} + max_new_tokens {n} exceeds the learned position "
                     f"table ({cfg.max_len} rows); shorten one of them.")


def sample(params, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array, rng: jax.Array, *,
           model: transformer.Transformer, sp: SamplingParams,
           hook: Optional[TokenHook] = None) -> SampleOutput:
  """Pure sampling function; jit it with `jit_sample` (or `jax.jit` + static config).

  `rng` is one key, or one key per prompt ([B] keys; see `row_keys`). `hook` (a
  `TokenHook`) may force tokens and end rows; without one every row samples freely until a
  stop token, a stop sequence or max_new_tokens."""
  cfg = model.config
  b, p = prompts_BxP.shape
  k, n = sp.num_samples, sp.max_new_tokens
  _check_positions(cfg, p, n)
  last, cache, start = prefill(params, prompts_BxP, prompt_lengths_B, model=model,
                               num_samples=k, max_new_tokens=n)
  rows = b * k
  keys = row_keys(rng, b, k)

  def cond(carry):
    return (carry["i"] < n) & ~jnp.all(carry["done"])

  def body(c):
    i, done = c["i"], c["done"]
    tok = choose_tokens(c["logits"], _at_position(keys, i), sp)
    forced = ends = jnp.zeros_like(done)
    hook_state = c["hook"]
    if hook is not None:
      tok, forced, ends, hook_state = hook(hook_state, tok, done, sp)
    logp = jnp.take_along_axis(jax.nn.log_softmax(c["logits"].astype(jnp.float32), -1),
                               tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, sp.pad_id, tok)
    logp = jnp.where(done | forced, 0.0, logp)
    tokens = jax.lax.dynamic_update_slice(c["tokens"], tok[:, None], (0, i))
    stop = jnp.isin(tok, jnp.asarray(sp.stop_ids, jnp.int32)) | _ends_with_stop(
        tokens, i, sp.stop_sequences)
    logits, cache = model.apply({"params": params}, tok[:, None], (start + i)[:, None],
                                cache=c["cache"])
    return {"i": i + 1, "tokens": tokens,
            "logps": jax.lax.dynamic_update_slice(c["logps"], logp[:, None], (0, i)),
            "lengths": c["lengths"] + (~done).astype(jnp.int32),
            "done": done | (~forced & stop) | ends, "hook": hook_state,
            "logits": logits[:, 0], "cache": cache}

  init = {"i": jnp.zeros((), jnp.int32), "tokens": jnp.full((rows, n), sp.pad_id, jnp.int32),
          "logps": jnp.zeros((rows, n), jnp.float32), "lengths": jnp.zeros((rows,), jnp.int32),
          "done": jnp.zeros((rows,), jnp.bool_),
          "hook": None if hook is None else hook.init(rows), "logits": last, "cache": cache}
  out = jax.lax.while_loop(cond, body, init)
  return SampleOutput(out["tokens"], out["lengths"], out["logps"])


def _ends_with_stop(tokens_BxN: jax.Array, i: jax.Array, stops) -> jax.Array:
  """Rows whose generated tokens [.., i] end with one of the `stops` token sequences."""
  hit = jnp.zeros(tokens_BxN.shape[:1], jnp.bool_)
  for seq in stops:
    n = len(seq)
    if not n or n > tokens_BxN.shape[1]:
      continue
    start = jnp.maximum(i + 1 - n, 0)
    tail = jax.lax.dynamic_slice_in_dim(tokens_BxN, start, n, axis=1)
    hit = hit | ((i + 1 >= n) & jnp.all(tail == jnp.asarray(seq, jnp.int32)[None], axis=1))
  return hit


def sample_stream(params, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array, rng: jax.Array,
                  *, model: transformer.Transformer, sp: SamplingParams, slots: int,
                  refill: int = 0) -> SampleOutput:
  """`sample` by continuous batching: the B*K rows stream through `slots` decode rows.

  The prompts are prefilled once into a bank (one cache row per prompt). `slots` rows decode
  together; when a row stops, its slot takes the next pending (prompt, sample) by copying
  that prompt's cache row and last logits from the bank (up to `refill` slots per step, 0 =
  slots // 8 + 1), so a step is never spent on finished rows while work is pending. Every
  decision is made on the device, inside the one jitted loop: no host work per step, and on
  several hosts every process computes the same refills. Randomness is per (prompt, sample,
  position) (`row_keys`), as in `sample`: for the same key the two return the same tokens.
  Rows, outputs and padding as `sample`'s; no TokenHook.
  """
  cfg = model.config
  b, p = prompts_BxP.shape
  k, n = sp.num_samples, sp.max_new_tokens
  jobs = b * k
  s = max(1, min(slots, jobs))
  r = max(1, min(refill or s // 8 + 1, s))
  _check_positions(cfg, p, n)
  # The bank: each prompt's cache once (prefix), and each slot's own generated-token slots.
  bank_logits, bank, _ = prefill(params, prompts_BxP, prompt_lengths_B, model=model,
                                 num_samples=1, max_new_tokens=n)
  keys = row_keys(rng, b, k)
  job = jnp.arange(s, dtype=jnp.int32)
  axes = transformer.cache_logical_axes(cfg, True)
  cache = _map_shared_cache(lambda x: x[job // k], lambda x: jnp.zeros((s,) + x.shape[1:],
                                                                       x.dtype), bank)
  cache = nn.with_logical_constraint(cache, axes)
  stops = jnp.asarray(sp.stop_ids, jnp.int32)
  ends = jax.vmap(lambda t, i: _ends_with_stop(t[None], i, sp.stop_sequences)[0])

  def cond(c):
    return jnp.any(c["live"])

  def body(c):
    job, i, live = c["job"], c["i"], c["live"]
    tok = choose_tokens(c["logits"], _at_position(keys[job], i), sp)
    logp = jnp.take_along_axis(jax.nn.log_softmax(c["logits"].astype(jnp.float32), -1),
                               tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(live, tok, sp.pad_id)
    slot = jnp.arange(s)
    hist = c["hist"].at[slot, jnp.minimum(i, n - 1)].set(tok)
    dest = jnp.where(live, job, jobs)  # rows not live write nowhere (dropped)
    finished = live & (jnp.isin(tok, stops) | ends(hist, i) | (i + 1 >= n))
    start = c["cache"]["prefix_lengths"]  # each slot's first decode position
    logits, cache = model.apply({"params": params}, tok[:, None], (start + i)[:, None],
                                cache=c["cache"])
    out = {"tokens": c["tokens"].at[dest, i].set(tok, mode="drop"),
           "logps": c["logps"].at[dest, i].set(logp, mode="drop"),
           "lengths": c["lengths"].at[jnp.where(finished, job, jobs)].set(i + 1, mode="drop")}
    live = live & ~finished
    # Refill: the first `r` free slots take the next pending jobs.
    free_slots = jnp.nonzero(~live, size=r, fill_value=s)[0]
    new_job = c["next"] + jnp.arange(r, dtype=jnp.int32)
    take = (free_slots < s) & (new_job < jobs)
    where = jnp.where(take, free_slots, s)  # s: out of range, dropped
    src = jnp.minimum(new_job, jobs - 1) // k
    # A new job's prompt cache comes from the bank; its generated-token slots need no reset
    # (slot j is written at step j before any query can attend to it).
    cache = _map_shared_cache(lambda x, y: x.at[where].set(y[src], mode="drop"),
                              lambda x, y: x, cache, bank)
    cache = nn.with_logical_constraint(cache, axes)
    return {**out, "cache": cache,
            "logits": logits[:, 0].at[where].set(bank_logits[src], mode="drop"),
            "job": job.at[where].set(new_job, mode="drop"),
            "i": (i + 1).at[where].set(0, mode="drop"),
            "live": live.at[where].set(True, mode="drop"),
            "hist": hist.at[where].set(sp.pad_id, mode="drop"),
            "next": c["next"] + jnp.sum(take, dtype=jnp.int32)}

  init = {"tokens": jnp.full((jobs, n), sp.pad_id, jnp.int32),
          "logps": jnp.zeros((jobs, n), jnp.float32), "lengths": jnp.zeros((jobs,), jnp.int32),
          "cache": cache, "logits": bank_logits[job // k],
          "job": job, "i": jnp.zeros((s,), jnp.int32), "live": jnp.ones((s,), jnp.bool_),
          "hist": jnp.full((s, n), sp.pad_id, jnp.int32), "next": jnp.asarray(s, jnp.int32)}
  out = jax.lax.while_loop(cond, body, init)
  return SampleOutput(out["tokens"], out["lengths"], out["logps"])


_PER_PROMPT = ("prefix_k", "prefix_v", "prefix_lengths")


def _map_shared_cache(per_prompt, own, *trees):
  """Map a shared cache tree (`transformer.init_shared_cache`): `per_prompt` on the leaves
  that hold a prompt's cache and length, `own` on each row's generated-token slots."""
  def f(path, *xs):
    return (per_prompt if path[-1].key in _PER_PROMPT else own)(*xs)
  return jax.tree_util.tree_map_with_path(f, *trees)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to (without) the first occurrence of any stop string."""
  cut = min((j for j in (text.find(s) for s in stop_strings if s) if j >= 0), default=-1)
  return text if cut < 0 else text[:cut]


_JITTED: dict = {}


def jit_sample(model: transformer.Transformer, sp: SamplingParams, mesh=None, rules=None,
               param_shardings=None, hook: Optional[TokenHook] = None, slots: int = 0,
               refill: int = 0):
  """Jitted `sample(params, prompts, lengths, rng)`; sharded over the data axes on a mesh.
  With `slots` > 0 (and no hook) it is `sample_stream` with that many decode rows: the same
  tokens for the same key, without decoding rows that already stopped.

  Cached per (model, sampling params, hook, slots, mesh, rules, param shardings), the
  shardings compared by value: loops that sample every round, and an evaluation of trained
  params that sit where the initial ones did, reuse one compiled sampler.
  """
  if slots and hook is not None:
    raise ValueError("A TokenHook runs in the plain sampler only; use slots=0 with a hook.")
  key = (model, sp, hook, slots, refill, mesh,
         None if rules is None else tuple(map(tuple, rules)),
         sharding_lib.shardings_key(param_shardings))
  run = _JITTED.get(key)
  if run is None:
    if slots:
      fn = functools.partial(sample_stream, model=model, sp=sp, slots=slots, refill=refill)
    else:
      fn = functools.partial(sample, model=model, sp=sp, hook=hook)
    run = _JITTED[key] = _build_sampler(fn, mesh, rules, param_shardings)
  return run


def _build_sampler(fn, mesh, rules, param_shardings):
  if mesh is None:
    return jax.jit(fn)
  rules = rules or sharding_lib.DEFAULT_RULES
  batch2 = sharding_lib.batch_sharding(mesh, rules, 2)
  batch1 = sharding_lib.batch_sharding(mesh, rules, 1)
  return sharding_lib.jit_sharded(
      fn, mesh, rules, in_shardings=(param_shardings, batch2, batch1,
                                     sharding_lib.replicated(mesh)),
      out_shardings=SampleOutput(batch2, batch1, batch2))


def bucket_length(n: int, multiple: int) -> int:
  """The shortest prompt bucket that holds `n` tokens: `multiple` x (1, 2, 3, 4, 6, 8, 12, ...).

  Every distinct prompt length is one more compile of the sampler (seconds on CPU, minutes
  for a large model on a pod); geometric buckets keep a run to a few shapes while padding at
  most half of the prompt."""
  b = max(1, multiple)
  while b < n:
    if b >= 2 * multiple and b * 3 // 2 >= n:
      return b * 3 // 2
    b *= 2
  return b


def padded_length(n: int, multiple: int, max_length: Optional[int] = None) -> int:
  """The prompt width for a longest prompt of `n` tokens: its `bucket_length`, capped at
  `max_length` but never below `n` rounded up to `multiple`."""
  p = bucket_length(n, multiple)
  if max_length is not None:
    p = max(min(p, max_length), -(-n // multiple) * multiple)
  return p


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16,
                min_rows: int = 1, max_length: Optional[int] = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists to a shared length: the `bucket_length` of the longest (capped at
  `max_length`, never below the longest rounded up to `multiple`), to limit recompiles.

  Rows are padded up to a multiple of `min_rows` with copies of the last prompt (so a batch
  divides the data axes); callers drop outputs beyond len(prompts).
  """
  if not prompts:
    raise ValueError("pad_prompts needs at least one prompt")
  if any(len(x) == 0 for x in prompts):
    raise ValueError("Every prompt needs at least one token (e.g. BOS)")
  rows = list(prompts) + [prompts[-1]] * ((-len(prompts)) % max(1, min_rows))
  p = padded_length(max(len(x) for x in rows), multiple, max_length)
  out = np.full((len(rows), p), pad_id, np.int32)
  for i, x in enumerate(rows):
    out[i, :len(x)] = x
  return out, np.asarray([len(x) for x in rows], np.int32)


def generate_text(params, prompts: Sequence[str], *, model: transformer.Transformer, tokenizer,
                  sp: SamplingParams, rng: jax.Array, batch_size: int = 64, mesh=None,
                  rules=None, param_shardings=None, pad_multiple: int = 16,
                  fixed_batch: bool = False, stop_strings: Sequence[str] = (),
                  hook: Optional[TokenHook] = None, slots: int = 0,
                  group_by_length: bool = False) -> list[list[str]]:
  """Host convenience: K completions (text) for each prompt string.

  Prompts are encoded with BOS, grouped into batches of `batch_size` prompts (one sampler
  call each, K rows per prompt), and decoded up to EOS. Loops that call this every round keep
  one compiled shape with `fixed_batch=True` (always `batch_size` rows); prompt lengths are
  padded to geometric buckets of `pad_multiple` (`bucket_length`).

  `group_by_length` (opt-in) gives each length bucket its own calls instead, so a short
  prompt is not padded to the longest of its batch (the prefill and every decode step's
  prompt attention cost what the padding holds); each call holds a power of two prompts, at
  most `batch_size`, so shapes stay few. Every prompt is keyed as in plain batching
  (`fold_in(fold_in(rng, first index of its batch), index in it)`), so both give the same
  texts for the same key, up to float rounding across padded shapes (a near-tie can flip a
  token, likelier in bf16; the tests compare f32 exactly). It costs more decode loops (one
  per group) and more compiled shapes (seconds each on CPU, which SPARQ's lab rounds and
  the smoke runs do not win back; docs/benchmarks.md): it pays on CPU for large one-off
  calls over prompts of mixed lengths (1.1-1.25x on the verification workload). On an
  accelerator, where a step of a few rows costs what a step of many does, leave it off.

  `stop_strings` end a row when generated (base models, which would otherwise run on and
  invent the next "Question:"): decoding stops on the device once a row's tokens end with a
  stop string's encoding, and each text is cut before the first stop string, so a stop
  string that tokenises differently in context still ends the text exactly there.

  `slots` > 0 streams each call's rows through that many decode rows (`sample_stream`): the
  same texts for the same key, faster when lengths vary (a row that stops frees its slot).
  """
  # Model vocabularies are often padded past the tokenizer's; never sample those ids.
  stop_strings = tuple(s for s in stop_strings if s)
  sp = dataclasses.replace(sp, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                           valid_vocab_size=sp.valid_vocab_size or tokenizer.vocab_size,
                           stop_sequences=tuple(sp.stop_sequences) + tuple(
                               tuple(tokenizer.encode(s)) for s in stop_strings))
  if mesh is not None:
    rules = rules or sharding_lib.DEFAULT_RULES
  min_rows = 1
  if mesh is not None:
    min_rows = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  if not prompts:
    return []
  if slots:  # slots are sharded like rows: a multiple of the data axes
    slots = -(-slots // min_rows) * min_rows
  run = jit_sample(model, sp, mesh, rules, param_shardings, hook, slots=slots)
  encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
  # A learned position table bounds prompt + new tokens; buckets never pad past it.
  max_prompt = (model.config.max_len - sp.max_new_tokens
                if model.config.position == "learned" else None)
  if not fixed_batch:
    batch_size = max(1, min(batch_size, len(encoded)))
  keys = _batched_prompt_keys(rng, len(encoded), batch_size)
  if group_by_length:
    calls = length_groups([len(e) for e in encoded], batch_size, pad_multiple, max_prompt)
  else:
    calls = [(list(range(i, min(i + batch_size, len(encoded)))), batch_size)
             for i in range(0, len(encoded), batch_size)]
  out: list[Optional[list[str]]] = [None] * len(encoded)
  progress = _Progress(len(encoded) * sp.num_samples, batch_size * sp.num_samples)
  for idx, res in sample_calls(run, params, encoded, keys, calls, pad_id=tokenizer.pad_id,
                               pad_multiple=pad_multiple, min_rows=min_rows,
                               max_length=max_prompt, mesh=mesh, rules=rules):
    for n, i in enumerate(idx):
      rows = range(n * sp.num_samples, (n + 1) * sp.num_samples)
      out[i] = [truncate_at_stop(tokenizer.decode(res.tokens[r, :res.lengths[r]]),
                                 stop_strings) for r in rows]
    progress.update(len(idx) * sp.num_samples)
  return out


def sample_calls(run, params, encoded: Sequence[Sequence[int]], keys: jax.Array, calls, *,
                 pad_id: int, pad_multiple: int = 16, min_rows: int = 1,
                 max_length: Optional[int] = None, mesh=None, rules=None):
  """Run a jitted sampler (`jit_sample`) over token prompts in the given calls.

  `calls`: (prompt indices, prompt rows) per call (`length_groups`, or plain batches);
  `keys`: one key per prompt. Yields (indices, host `SampleOutput` whose first
  len(indices) * K rows are theirs) per call, in order; every process makes the same calls.
  """
  for idx, width in calls:
    # Rows past the group repeat its last prompt (a fixed count keeps few compiled shapes).
    padded = list(idx) + [idx[-1]] * (width - len(idx))
    toks, lens = pad_prompts([encoded[i] for i in padded], pad_id, multiple=pad_multiple,
                             min_rows=min_rows, max_length=max_length)
    call_keys = keys[np.asarray(padded + [idx[-1]] * (len(toks) - len(padded)))]
    if mesh is not None:  # every process holds the whole batch: build global arrays
      toks, lens = sharding_lib.put_global(toks, mesh, rules), sharding_lib.put_global(
          lens, mesh, rules)
    yield idx, sharding_lib.to_host(run(params, toks, lens, call_keys))


def _batched_prompt_keys(rng: jax.Array, num_prompts: int, batch_size: int) -> jax.Array:
  """Prompt j's key when the prompts go in batches of `batch_size`, each keyed
  fold_in(rng, its first index): fold_in(fold_in(rng, j - j % batch_size), j % batch_size)."""
  j = jnp.arange(num_prompts, dtype=jnp.int32)
  first = j - j % batch_size
  return jax.vmap(lambda f, o: jax.random.fold_in(jax.random.fold_in(rng, f), o))(
      first, j - first)


def length_groups(lengths: Sequence[int], batch_size: int, multiple: int,
                  max_length: Optional[int] = None) -> list[tuple[list[int], int]]:
  """Sampler calls for prompts of these token lengths, one length bucket per call.

  Returns (prompt indices, prompt rows of the call) per call: the prompts of one
  `bucket_length` bucket in order, at most `batch_size` per call, in a call of the next
  power of two rows (at most `batch_size`) so a run compiles few shapes."""
  buckets: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    buckets.setdefault(padded_length(n, multiple, max_length), []).append(i)
  calls = []
  for p in sorted(buckets):
    idx = buckets[p]
    for i in range(0, len(idx), batch_size):
      part = idx[i:i + batch_size]
      calls.append((part, min(batch_size, 1 << (len(part) - 1).bit_length())))
  return calls


class _Progress:
  """Console progress of a long sampling call: rollouts done of total, rollouts/s, ETA.

  Logged by process 0 after a sampler call when `every_s` have passed since the last line,
  and after the last call; a call that is one sampler call says nothing."""

  def __init__(self, total: int, per_call: int, every_s: float = 10.0):
    self.total, self.done, self.every_s = total, 0, every_s
    self.t0 = self.last = time.perf_counter()
    self.quiet = total <= per_call  # one call: nothing to report between calls

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.quiet or now - self.last < self.every_s and self.done < self.total:
      return
    self.last = now
    rate = self.done / max(now - self.t0, 1e-9)
    if jax.process_index() == 0:
      logging.info("sampling: %d/%d rollouts | %.1f rollouts/s | ETA %s", self.done,
                   self.total, rate, metrics_log.format_duration(
                       (self.total - self.done) / max(rate, 1e-9)))
