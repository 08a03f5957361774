"""Batched sampling with a KV cache: prefill + decode loop, all inside one jit.

Rows: prompt b's K samples are rows b*K .. b*K+K-1 of every output. Prompts of different
lengths share a batch: they are right-padded to P and each row decodes from its own length
(`transformer` writes each token into the cache slot equal to its position, and masks slots
after it, so the padding that prefill wrote is never attended to and is overwritten).

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


def choose_tokens(logits_BxV: jax.Array, rng: jax.Array, sp: SamplingParams) -> jax.Array:
  if sp.valid_vocab_size:
    ids = jnp.arange(logits_BxV.shape[-1])
    logits_BxV = jnp.where(ids < sp.valid_vocab_size, logits_BxV, -jnp.inf)
  if sp.greedy or sp.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  scaled = logits_BxV.astype(jnp.float32) / sp.temperature
  scaled = filter_logits(scaled, top_k=sp.top_k, top_p=sp.top_p)
  return gumbel_max(rng, scaled)


def gumbel_max(rng: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """The tokens `jax.random.categorical(rng, logits, axis=-1)` draws (the same Gumbel noise,
  the same first-index tie-break), with the argmax as a max then a min over the indices that
  reach it: XLA:CPU lowers argmax to a variadic (value, index) reduction that cost ~10% of
  decode time (docs/benchmarks.md)."""
  x = logits_BxV + jax.random.gumbel(rng, logits_BxV.shape, logits_BxV.dtype)
  m = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1).astype(jnp.int32)  # all-NaN rows: never past V


def prefill(params, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array, *,
            model: transformer.Transformer, num_samples: int, cache_len: int):
  """Run the prompts once into a fresh cache of `cache_len` slots and copy it to the K sample
  rows. Returns (next-token logits [B*K, V], cache, first decode position [B*K])."""
  cfg = model.config
  b, p = prompts_BxP.shape
  cache = transformer.init_cache(cfg, b, cache_len)
  cache = nn.with_logical_constraint(cache, transformer.cache_logical_axes(cfg))
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
  logits, cache = model.apply({"params": params}, prompts_BxP, positions, cache=cache,
                              logits_index_B=prompt_lengths_B - 1)
  last = logits[:, 0]
  if num_samples > 1:
    cache = jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), cache)
    last = jnp.repeat(last, num_samples, axis=0)
  cache = nn.with_logical_constraint(cache, transformer.cache_logical_axes(cfg))
  return last, cache, jnp.repeat(prompt_lengths_B.astype(jnp.int32), num_samples)


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


def sample(params, prompts_BxP: jax.Array, prompt_lengths_B: jax.Array, rng: jax.Array, *,
           model: transformer.Transformer, sp: SamplingParams,
           hook: Optional[TokenHook] = None) -> SampleOutput:
  """Pure sampling function; jit it with `jit_sample` (or `jax.jit` + static config).

  `hook` (a `TokenHook`) may force tokens and end rows; without one every row samples freely
  until a stop token, a stop sequence or max_new_tokens."""
  cfg = model.config
  b, p = prompts_BxP.shape
  k, n = sp.num_samples, sp.max_new_tokens
  if cfg.position == "learned" and p + n > cfg.max_len:
    raise ValueError(f"Prompt length {p} + max_new_tokens {n} exceeds the learned position "
                     f"table ({cfg.max_len} rows); shorten one of them.")
  last, cache, start = prefill(params, prompts_BxP, prompt_lengths_B, model=model,
                               num_samples=k, cache_len=p + n)
  rows = b * k

  def cond(carry):
    return (carry["i"] < n) & ~jnp.all(carry["done"])

  def body(c):
    i, done = c["i"], c["done"]
    tok = choose_tokens(c["logits"], jax.random.fold_in(rng, i), sp)
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


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to (without) the first occurrence of any stop string."""
  cut = min((j for j in (text.find(s) for s in stop_strings if s) if j >= 0), default=-1)
  return text if cut < 0 else text[:cut]


_JITTED: dict = {}


def jit_sample(model: transformer.Transformer, sp: SamplingParams, mesh=None, rules=None,
               param_shardings=None, hook: Optional[TokenHook] = None):
  """Jitted `sample(params, prompts, lengths, rng)`; sharded over the data axes on a mesh.

  Cached per (model, sampling params, hook, mesh, rules, param shardings): loops that sample
  every round reuse one compiled sampler instead of re-tracing a fresh jit each call.
  """
  key = (model, sp, hook, mesh, None if rules is None else tuple(map(tuple, rules)),
         id(param_shardings))
  hit = _JITTED.get(key)
  if hit is not None and hit[0] is param_shardings:
    return hit[1]
  run = _build_sampler(model, sp, mesh, rules, param_shardings, hook)
  # The shardings object is kept alive with the entry, so its id cannot be reused.
  _JITTED[key] = (param_shardings, run)
  return run


def _build_sampler(model, sp, mesh, rules, param_shardings, hook):
  fn = functools.partial(sample, model=model, sp=sp, hook=hook)
  if mesh is None:
    return jax.jit(fn)
  rules = rules or sharding_lib.DEFAULT_RULES
  batch2 = sharding_lib.batch_sharding(mesh, rules, 2)
  batch1 = sharding_lib.batch_sharding(mesh, rules, 1)
  rep = sharding_lib.replicated(mesh)
  jitted = jax.jit(fn, in_shardings=(param_shardings, batch2, batch1, rep),
                   out_shardings=SampleOutput(batch2, batch1, batch2))

  def run(params, prompts, lengths, rng):
    with sharding_lib.activation_rules(mesh, rules):
      return jitted(params, prompts, lengths, rng)
  return run


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16,
                min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad token lists to a shared length (rounded up to `multiple`, to limit recompiles).

  Rows are padded up to a multiple of `min_rows` with copies of the last prompt (so a batch
  divides the data axes); callers drop outputs beyond len(prompts).
  """
  if not prompts:
    raise ValueError("pad_prompts needs at least one prompt")
  if any(len(x) == 0 for x in prompts):
    raise ValueError("Every prompt needs at least one token (e.g. BOS)")
  rows = list(prompts) + [prompts[-1]] * ((-len(prompts)) % max(1, min_rows))
  p = max(len(x) for x in rows)
  p = -(-p // multiple) * multiple
  out = np.full((len(rows), p), pad_id, np.int32)
  for i, x in enumerate(rows):
    out[i, :len(x)] = x
  return out, np.asarray([len(x) for x in rows], np.int32)


def generate_text(params, prompts: Sequence[str], *, model: transformer.Transformer, tokenizer,
                  sp: SamplingParams, rng: jax.Array, batch_size: int = 64, mesh=None,
                  rules=None, param_shardings=None, pad_multiple: int = 16,
                  fixed_batch: bool = False, stop_strings: Sequence[str] = (),
                  hook: Optional[TokenHook] = None) -> list[list[str]]:
  """Host convenience: K completions (text) for each prompt string.

  Prompts are encoded with BOS, grouped into batches of `batch_size` prompts (one sampler
  call each, K rows per prompt), and decoded up to EOS. Loops that call this every round keep
  one compiled shape with `fixed_batch=True` (always `batch_size` rows) and a coarse
  `pad_multiple` for the prompt length.

  `stop_strings` end a row when generated (base models, which would otherwise run on and
  invent the next "Question:"): decoding stops on the device once a row's tokens end with a
  stop string's encoding, and each text is cut before the first stop string, so a stop
  string that tokenises differently in context still ends the text exactly there.
  """
  # Model vocabularies are often padded past the tokenizer's; never sample those ids.
  stop_strings = tuple(s for s in stop_strings if s)
  sp = dataclasses.replace(sp, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                           valid_vocab_size=sp.valid_vocab_size or tokenizer.vocab_size,
                           stop_sequences=tuple(sp.stop_sequences) + tuple(
                               tuple(tokenizer.encode(s)) for s in stop_strings))
  if mesh is not None:
    rules = rules or sharding_lib.DEFAULT_RULES
  run = jit_sample(model, sp, mesh, rules, param_shardings, hook)
  min_rows = 1
  if mesh is not None:
    min_rows = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  if not prompts:
    return []
  encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
  if not fixed_batch:
    batch_size = max(1, min(batch_size, len(encoded)))
  out: list[list[str]] = []
  progress = _Progress(len(encoded) * sp.num_samples, batch_size * sp.num_samples)
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    # A fixed row count per call keeps one compiled shape for all full batches.
    toks, lens = pad_prompts(chunk + [chunk[-1]] * (batch_size - len(chunk)),
                             tokenizer.pad_id, multiple=pad_multiple, min_rows=min_rows)
    if mesh is not None:  # every process holds the whole batch: build global arrays
      toks, lens = sharding_lib.put_global(toks, mesh, rules), sharding_lib.put_global(
          lens, mesh, rules)
    res = sharding_lib.to_host(run(params, toks, lens, jax.random.fold_in(rng, start)))
    for i in range(len(chunk)):
      rows = range(i * sp.num_samples, (i + 1) * sp.num_samples)
      out.append([truncate_at_stop(tokenizer.decode(res.tokens[r, :res.lengths[r]]),
                                   stop_strings) for r in rows])
    progress.update(len(chunk) * sp.num_samples)
  return out


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
