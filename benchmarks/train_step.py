r"""Train-step throughput and MFU of the qdc_jax train step against a plain PyTorch twin.

For each model: tokens/s of the jitted `qdc_jax.train.train_step` (AdamW + global-norm
clipping, f32, one-device mesh), its MFU against the f32 matmul peak measured in this run, and
the tokens/s of a PyTorch implementation of the same architecture (written below, eager,
f32, same batch, same AdamW + clipping), started from the same initial weights. The first
step's loss and gradient norm of both are compared, to check that the two compute the same
function.

Model FLOPs per step (PaLM appendix B convention, no causal discount, no recompute):
  6 * N * tokens + 12 * num_layers * seq_len * (num_heads * head_dim) * tokens
with N = non-embedding parameters + vocab * d_model (the tied output matmul), i.e. every
parameter except the token/position tables, plus the output projection.

  python benchmarks/train_step.py                       # all three models
  python benchmarks/train_step.py --models=bench_d512 --out=/tmp/x.json
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/train_step.py

Not a test; prints a markdown table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

DEFAULT_SHAPES = {  # model -> (batch, seq_len)
    "lab_tiny": (32, 128),
    "bench_d512": (16, 256),
    "gpt2_125m": (4, 128),
}

OPT = types.SimpleNamespace(lr=3e-4, warmup_steps=100, total_steps=10_000, final_lr_ratio=0.1,
                            b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


# ----------------------------------------------------------------------------- FLOPs


def flops_per_step(cfg, n_params_total: int, batch: int, seq: int) -> dict:
  emb = cfg.vocab_size * cfg.d_model
  pos = cfg.max_len * cfg.d_model if cfg.position == "learned" else 0
  # Tied: the table is counted once, for the output matmul (its lookup is free).
  # Untied: the lm_head is a normal parameter and the lookup table is excluded.
  n_matmul = n_params_total - pos - (0 if cfg.tie_embeddings else emb)
  tokens = batch * seq
  dense = 6.0 * n_matmul * tokens
  attn = 12.0 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim * tokens
  return {"n_params_total": n_params_total, "n_nonembedding": n_params_total - emb - pos,
          "n_flops_params": n_matmul, "dense_flops": dense, "attn_flops": attn,
          "flops": dense + attn, "tokens": tokens}


# ----------------------------------------------------------------------------- data


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int64).astype(np.int32)
  return {"inputs": toks[:, :-1].copy(), "targets": toks[:, 1:].copy(),
          "loss_mask": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "segment_ids": np.ones((batch, seq), np.int32)}


# ----------------------------------------------------------------------------- JAX


def setup_jax(cfg, batch_np: dict, args):
  """Compiled, warmed-up JAX train step.

  Returns (one_step, info, numpy copy of the initial params, first-step metrics, check):
  `one_step()` runs one blocking step, `check()` asserts the state stayed finite.
  """
  import jax
  from qdc_jax import optim, sharding, train
  from qdc_jax.models import transformer

  b, t = batch_np["inputs"].shape
  model = transformer.Transformer(cfg)
  tx = optim.make_optimizer(OPT)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  state, shardings = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                              seq_len=t, mesh=mesh, rules=rules)
  params0 = jax.device_get(state["params"])  # before the first step donates them
  n_params = transformer.count_params(state["params"])
  step = train.jit_train_step(functools.partial(train.train_step, model=model, tx=tx),
                              shardings, mesh, rules)
  batch = sharding.put_batch(batch_np, mesh, rules)
  rng = jax.random.PRNGKey(1)

  t0 = time.perf_counter()
  state, metrics = step(state, batch, rng)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  first = {k: float(v) for k, v in jax.device_get(metrics).items()}
  for _ in range(args.warmup):
    state, metrics = step(state, batch, rng)
  jax.block_until_ready(state)

  holder = [state]

  def one():
    s, _ = step(holder[0], batch, rng)  # the old state is donated
    jax.block_until_ready(s)
    holder[0] = s

  def check():
    assert not bool(jax.device_get(holder[0]["nonfinite"])), "JAX train step went non-finite"

  info = {"compile_plus_first_s": compile_s, "n_params": n_params}
  return one, info, params0, first, check


# ----------------------------------------------------------------------------- PyTorch


def build_torch_model(cfg):
  """A plain PyTorch module with the architecture of `qdc_jax.models.transformer`."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  neg = -2.3819763e38

  class Norm(nn.Module):

    def __init__(self):
      super().__init__()
      if cfg.norm == "rmsnorm":
        self.scale = nn.Parameter(torch.zeros(d))  # Gemma: x * (1 + scale)
      else:
        self.scale = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
      if cfg.norm == "rmsnorm":
        return F.rms_norm(x, (d,), 1.0 + self.scale, cfg.norm_eps)
      return F.layer_norm(x, (d,), self.scale, self.bias, cfg.norm_eps)

  def rope(x, cos, sin):  # x: B,N,T,H; rotate first half against second half
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Attention(nn.Module):

    def __init__(self, kind):
      super().__init__()
      self.kind = kind
      self.q = nn.Linear(d, n * h, bias=cfg.use_bias)
      self.k = nn.Linear(d, k * h, bias=cfg.use_bias)
      self.v = nn.Linear(d, k * h, bias=cfg.use_bias)
      self.o = nn.Linear(n * h, d, bias=cfg.use_bias)

    def forward(self, x, cos, sin, masks):
      bsz, t, _ = x.shape
      q = self.q(x).view(bsz, t, n, h).transpose(1, 2)
      kk = self.k(x).view(bsz, t, k, h).transpose(1, 2)
      v = self.v(x).view(bsz, t, k, h).transpose(1, 2)
      if cfg.position == "rope":
        q, kk = rope(q, cos, sin), rope(kk, cos, sin)
      mask = masks[self.kind]
      if cfg.attn_softcap is None:  # fused SDPA kernel where the architecture allows it
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, scale=cfg.query_scale,
                                             enable_gqa=k != n)
      else:
        q = (q * cfg.query_scale).view(bsz, k, n // k, t, h)
        logits = torch.matmul(q, kk.unsqueeze(2).transpose(-1, -2))  # B,K,G,T,S
        logits = cfg.attn_softcap * torch.tanh(logits / cfg.attn_softcap)
        logits = logits.masked_fill(~mask, neg)
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs, v.unsqueeze(2)).view(bsz, n, t, h)
      return self.o(out.transpose(1, 2).reshape(bsz, t, n * h))

  class Mlp(nn.Module):

    def __init__(self):
      super().__init__()
      self.up = nn.Linear(d, f, bias=cfg.use_bias)
      if cfg.mlp == "geglu":
        self.gate = nn.Linear(d, f, bias=False)
      self.down = nn.Linear(f, d, bias=cfg.use_bias)

    def forward(self, x):
      hid = self.up(x)
      if cfg.mlp == "geglu":
        hid = F.gelu(self.gate(x), approximate="tanh") * hid
      else:
        hid = F.gelu(hid, approximate="tanh")
      return self.down(hid)

  class Block(nn.Module):

    def __init__(self, kind):
      super().__init__()
      self.pre_attn_norm, self.attn = Norm(), Attention(kind)
      self.pre_mlp_norm, self.mlp = Norm(), Mlp()
      if cfg.post_norms:
        self.post_attn_norm, self.post_mlp_norm = Norm(), Norm()

    def forward(self, x, cos, sin, masks):
      y = self.attn(self.pre_attn_norm(x), cos, sin, masks)
      if cfg.post_norms:
        y = self.post_attn_norm(y)
      x = x + y
      y = self.mlp(self.pre_mlp_norm(x))
      if cfg.post_norms:
        y = self.post_mlp_norm(y)
      return x + y

  class LM(nn.Module):

    def __init__(self):
      super().__init__()
      self.embedding = nn.Embedding(cfg.vocab_size, d)
      if cfg.position == "learned":
        self.pos_embedding = nn.Embedding(cfg.max_len, d)
      self.layers = nn.ModuleList(Block(cfg.attention_kind(i)) for i in range(cfg.num_layers))
      self.final_norm = Norm()
      if not cfg.tie_embeddings:
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)

    def forward(self, tokens):
      t = tokens.shape[1]
      x = self.embedding(tokens)
      if cfg.embed_scale:
        x = x * math.sqrt(d)
      pos = torch.arange(t)
      if cfg.position == "learned":
        x = x + self.pos_embedding(pos)[None]
      cos = sin = None
      if cfg.position == "rope":
        freq = cfg.rope_base ** (-torch.arange(h // 2, dtype=torch.float32) * 2.0 / h)
        angle = pos.float()[:, None] * freq  # T, H/2
        cos, sin = torch.cos(angle), torch.sin(angle)
      causal = pos[:, None] >= pos[None, :]
      masks = {"global": causal}
      if "local" in cfg.layer_pattern:
        masks["local"] = causal & (pos[:, None] - pos[None, :] < cfg.sliding_window)
      for layer in self.layers:
        x = layer(x, cos, sin, masks)
      x = self.final_norm(x)
      if cfg.tie_embeddings:
        logits = x @ self.embedding.weight.t()
      else:
        logits = self.lm_head(x)
      if cfg.final_softcap is not None:
        logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
      return logits

  return LM()


def load_jax_params(tmodel, cfg, params) -> None:
  """Copy a qdc_jax parameter tree into the PyTorch twin (same initial weights)."""
  import torch
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  sd = {}
  a = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731

  def norm(prefix, p):
    sd[prefix + ".scale"] = a(p["scale"])
    if "bias" in p:
      sd[prefix + ".bias"] = a(p["bias"])

  sd["embedding.weight"] = a(params["embedding"])
  if "pos_embedding" in params:
    sd["pos_embedding.weight"] = a(params["pos_embedding"])
  if "lm_head" in params:
    sd["lm_head.weight"] = a(params["lm_head"]).t()
  norm("final_norm", params["final_norm"])
  for i in range(cfg.num_layers):
    p, pre = params[f"layer_{i}"], f"layers.{i}."
    for name in ("pre_attn_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm"):
      if name in p:
        norm(pre + name, p[name])
    at = p["attn"]
    sd[pre + "attn.q.weight"] = a(at["q"]).reshape(d, n * h).t()
    sd[pre + "attn.k.weight"] = a(at["k"]).reshape(d, k * h).t()
    sd[pre + "attn.v.weight"] = a(at["v"]).reshape(d, k * h).t()
    sd[pre + "attn.o.weight"] = a(at["o"]).reshape(n * h, d).t()
    for name in ("q", "k", "v"):
      if name + "_bias" in at:
        sd[pre + f"attn.{name}.bias"] = a(at[name + "_bias"]).reshape(-1)
    if "o_bias" in at:
      sd[pre + "attn.o.bias"] = a(at["o_bias"])
    m = p["mlp"]
    sd[pre + "mlp.up.weight"] = a(m["up"]).t()
    sd[pre + "mlp.down.weight"] = a(m["down"]).t()
    if "gate" in m:
      sd[pre + "mlp.gate.weight"] = a(m["gate"]).t()
    if "up_bias" in m:
      sd[pre + "mlp.up.bias"] = a(m["up_bias"])
    if "down_bias" in m:
      sd[pre + "mlp.down.bias"] = a(m["down_bias"])
  tmodel.load_state_dict({kk: v.contiguous() for kk, v in sd.items()}, strict=True)


def setup_torch(cfg, batch_np: dict, params0, args):
  """Warmed-up PyTorch train step: returns (one_step, info, first-step metrics)."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  model = build_torch_model(cfg)
  load_jax_params(model, cfg, params0)
  decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices and tables
  no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms and biases
  groups = [{"params": decay, "weight_decay": OPT.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
  adam_kw = dict(lr=OPT.lr, betas=(OPT.b1, OPT.b2), eps=OPT.eps)
  try:
    opt = torch.optim.AdamW(groups, fused=True, **adam_kw)
    impl = "fused"
  except (RuntimeError, TypeError, ValueError):
    opt = torch.optim.AdamW(groups, foreach=True, **adam_kw)
    impl = "foreach"

  def lr_factor(step):  # the optax warmup + cosine schedule, as a multiplier of lr
    if step < OPT.warmup_steps:
      return step / max(1, OPT.warmup_steps)
    frac = min(1.0, (step - OPT.warmup_steps) / max(1, OPT.total_steps - OPT.warmup_steps))
    return OPT.final_lr_ratio + (1 - OPT.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
  inputs = torch.from_numpy(batch_np["inputs"]).long()
  targets = torch.from_numpy(batch_np["targets"]).long()
  mask = torch.from_numpy(batch_np["loss_mask"]).float()

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(inputs)
    nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                          reduction="none").view_as(mask)
    denom = mask.sum().clamp_min(1.0)
    loss = (nll * mask).sum() / denom
    with torch.no_grad():
      acc = ((logits.argmax(-1) == targets).float() * mask).sum() / denom
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip, foreach=True)
    if torch.isfinite(loss) and torch.isfinite(gnorm):  # the JAX step's non-finite guard
      opt.step()
    sched.step()
    return {"loss": loss.item(), "grad_norm": gnorm.item(), "accuracy": acc.item()}

  t0 = time.perf_counter()
  first = step()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  info = {"first_step_s": first_s, "adamw": impl, "threads": torch.get_num_threads()}
  return step, info, first


class TorchWorker:
  """The PyTorch side in its own (spawned) process, driven one step at a time over a pipe.

  Keeps torch's OpenMP/MKL threads and allocator out of the JAX process (and vice versa);
  while one side runs, the other is blocked on a pipe read. Without `model` it only offers
  the matmul peak. Also a peak object: `measure(repeats)` / `last`, like MatmulPeak.
  """

  def __init__(self, args, model=None, shape=None, params_path=None):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_torch_worker_main, daemon=True,
                            args=(child, vars(args), model, shape, params_path))
    self.proc.start()
    msg = self.conn.recv()
    if msg[0] == "error":
      raise RuntimeError("torch worker failed:\n" + msg[1])
    _, self.info, self.first = msg

  def _ask(self, cmd, arg=None):
    self.conn.send((cmd, arg))
    return self.conn.recv()

  def step(self):
    self._ask("step")

  def measure(self, repeats):
    self.last = self._ask("peak", repeats)
    return self.last

  def close(self):
    self.conn.send(("stop", None))
    self.proc.join(timeout=30)


def _save_params(params, path):
  flat = {}

  def walk(prefix, tree):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(prefix + k + "/", v)
      else:
        flat[prefix + k] = np.asarray(v)
  walk("", params)
  np.savez(path, **flat)


def _load_params(path):
  out = {}
  with np.load(path) as z:
    for key in z.files:
      node = out
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = z[key]
  return out


def _torch_worker_main(conn, args_dict, model, shape, params_path):
  try:
    import torch
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.torch_threads)
    peak = _common.MatmulPeak("torch", args.peak_n)
    step, info, first = None, {}, {}
    if model:
      from qdc_jax.models import configs
      cfg = configs.get_model_config(model)
      batch_np = make_batch(cfg.vocab_size, *shape)
      step, info, first = setup_torch(cfg, batch_np, _load_params(params_path), args)
    info["threads"] = torch.get_num_threads()
    conn.send(("ready", info, first))
  except Exception:  # report to the parent instead of hanging it
    conn.send(("error", traceback.format_exc()))
    return
  while True:
    cmd, arg = conn.recv()
    if cmd == "step":
      step()
      conn.send(None)
    elif cmd == "peak":
      conn.send(peak.measure(arg))
    else:
      return


def time_interleaved(fns: dict, peaks: dict, args) -> tuple[dict, dict]:
  """Rounds of: one timed call of each step function (JAX, then Torch), then a short matmul
  peak measurement of each library, so that steps and peaks see the same machine load.

  A short idle pause before each timed call lets spinning thread pools settle. Runs
  >= min_repeats rounds, then more while within budget_s * len(fns), up to max_repeats.
  Returns ({name: [seconds per step]}, {lib: [median GFLOP/s of the peak matmul]}).
  """
  times = {k: [] for k in fns}
  peak_rates = {k: [] for k in peaks}
  start = time.perf_counter()
  while True:
    for k, fn in fns.items():
      time.sleep(args.pause_s)
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
    for k, peak in peaks.items():
      if args.round_peak_repeats > 0:
        time.sleep(args.pause_s)
        peak_rates[k].append(peak.measure(args.round_peak_repeats)["median_gflops"])
    n = len(times["jax"])
    if n >= args.max_repeats or (n >= args.min_repeats and
                                 time.perf_counter() - start > args.budget_s * len(fns)):
      return times, peak_rates


# ----------------------------------------------------------------------------- main


def bench_model(name, shape, peaks, args) -> dict:
  from qdc_jax.models import configs

  cfg = configs.get_model_config(name)
  b, t = shape
  batch_np = make_batch(cfg.vocab_size, b, t)
  load0 = _common.load_average()[0]
  jone, jinfo, params0, jfirst, jcheck = setup_jax(cfg, batch_np, args)
  fns = {"jax": jone}
  worker = None
  peaks = {"jax": peaks["jax"]}
  if not args.skip_torch and args.torch_in_process:
    tone, tinfo, tfirst = setup_torch(cfg, batch_np, params0, args)
    fns["torch"] = tone
    peaks["torch"] = _common.MatmulPeak("torch", args.peak_n)
  elif not args.skip_torch:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "params.npz")
      _save_params(params0, path)
      worker = TorchWorker(args, name, shape, path)
    tinfo, tfirst = worker.info, worker.first
    fns["torch"] = worker.step
    peaks["torch"] = worker
  del params0
  try:
    times, rates = time_interleaved(fns, peaks, args)
  finally:
    if worker is not None:
      worker.close()
  jcheck()
  jres = dict(_common.summarize(times["jax"]), **jinfo)
  fl = flops_per_step(cfg, jres["n_params"], b, t)
  jt = np.asarray(times["jax"])
  row = {"model": name, "batch": b, "seq": t, **fl, "rounds": len(jt), "jax": jres,
         "jax_first_step": jfirst, "load1_start": load0, "step_times": times,
         "round_peak_gflops": rates}
  row["jax_step_ms"] = 1e3 * jres["median_s"]
  row["jax_best_ms"] = 1e3 * jres["min_s"]
  row["jax_tok_s"] = fl["tokens"] / jres["median_s"]
  row["jax_gflops"] = fl["flops"] / jres["median_s"] / 1e9
  if not rates["jax"]:  # --round_peak_repeats=0: use the peaks measured before the models
    rates = {k: [p.last["median_gflops"]] * len(jt) for k, p in peaks.items()}
    row["round_peak_gflops"] = rates
  row["jax_peak_gflops"] = float(np.median(rates["jax"]))
  # MFU: median over rounds of (model FLOP/s of the step) / (jnp.dot peak of the same round).
  row["jax_mfu"] = float(np.median(fl["flops"] / jt / 1e9 / np.asarray(rates["jax"])))
  if not args.skip_torch:
    tt = np.asarray(times["torch"])
    tres = dict(_common.summarize(times["torch"]), **tinfo)
    row.update(torch=tres, torch_first_step=tfirst)
    row["torch_step_ms"] = 1e3 * tres["median_s"]
    row["torch_best_ms"] = 1e3 * tres["min_s"]
    row["torch_tok_s"] = fl["tokens"] / tres["median_s"]
    row["torch_gflops"] = fl["flops"] / tres["median_s"] / 1e9
    row["torch_peak_gflops"] = float(np.median(rates["torch"]))
    row["torch_mfu"] = float(np.median(fl["flops"] / tt / 1e9 / np.asarray(rates["torch"])))
    row["ratio"] = row["jax_tok_s"] / row["torch_tok_s"]
    # Median over rounds of the paired ratio (each round ran JAX and Torch back to back).
    row["ratio_paired"] = float(np.median(tt / jt))
    # Fastest step of each: the least-disturbed estimate on a shared, noisy machine.
    row["ratio_best"] = float(tt.min() / jt.min())
    row["loss_diff"] = abs(jfirst["loss"] - tfirst["loss"])
    row["gnorm_rel_diff"] = abs(jfirst["grad_norm"] - tfirst["grad_norm"]) / max(
        1e-12, abs(jfirst["grad_norm"]))
  row["load1_end"] = _common.load_average()[0]
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="lab_tiny,bench_d512,gpt2_125m",
                  help="comma-separated names from qdc_jax.models.configs")
  ap.add_argument("--shapes", default="",
                  help="override shapes, e.g. 'bench_d512=16x256,gpt2_125m=4x128'")
  ap.add_argument("--out", default="/tmp/qdc_bench/train_step.json", help="JSON output path")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  ap.add_argument("--min_repeats", type=int, default=3, help="minimum timed rounds per model")
  ap.add_argument("--max_repeats", type=int, default=30)
  ap.add_argument("--budget_s", type=float, default=10.0,
                  help="timing budget per model and framework (more rounds after "
                       "min_repeats while within it)")
  ap.add_argument("--peak_n", type=int, default=2048, help="size of the peak matmul")
  ap.add_argument("--peak_repeats", type=int, default=20,
                  help="calls of the peak matmul before and after the models")
  ap.add_argument("--round_peak_repeats", type=int, default=5,
                  help="calls of the peak matmul in every timing round (0: none; MFU then "
                       "uses the peak measured before the models)")
  ap.add_argument("--torch_threads", type=int, default=2)
  ap.add_argument("--pause_s", type=float, default=0.2,
                  help="idle pause before each timed call (spinning thread pools settle)")
  ap.add_argument("--skip_torch", action="store_true")
  ap.add_argument("--torch_in_process", action="store_true",
                  help="run PyTorch in the JAX process instead of a separate worker process")
  args = ap.parse_args(argv)

  import jax

  shapes = dict(DEFAULT_SHAPES)
  for item in filter(None, args.shapes.split(",")):
    name, bt = item.split("=")
    shapes[name] = tuple(int(x) for x in bt.lower().split("x"))
  info = _common.machine_info()
  print(f"# train_step benchmark  {info['date']}  load {info['loadavg_1_5_15']}  "
        f"cpu {info['cpu']} x{info['cores']}  XLA_FLAGS={info['xla_flags']!r}")
  print(f"# jax backend {jax.default_backend()} devices {jax.devices()}; torch "
        f"{'in this process' if args.torch_in_process else 'in a worker process'}, "
        f"{args.torch_threads} threads", flush=True)

  peak_objs = {"jax": _common.MatmulPeak("jax", args.peak_n)}
  if not args.skip_torch:
    if args.torch_in_process:
      import torch
      torch.set_num_threads(args.torch_threads)
      peak_objs["torch"] = _common.MatmulPeak("torch", args.peak_n)
    else:
      peak_objs["torch"] = TorchWorker(args)  # peak only
  peaks = {f"{k}_before": p.measure(args.peak_repeats) for k, p in peak_objs.items()}

  rows = []
  for name in filter(None, args.models.split(",")):
    row = bench_model(name, shapes[name], peak_objs, args)
    rows.append(row)
    print(f"# {name}: jax {row['jax_step_ms']:.1f} ms/step"
          + (f", torch {row['torch_step_ms']:.1f} ms/step" if "torch_step_ms" in row else "")
          + f"  (load {row['load1_start']:.2f} -> {row['load1_end']:.2f})", flush=True)
  peaks.update({f"{k}_after": p.measure(args.peak_repeats) for k, p in peak_objs.items()})
  if isinstance(peak_objs.get("torch"), TorchWorker):
    peak_objs["torch"].close()

  n = args.peak_n
  print(f"\nf32 matmul peak ({n}x{n} @ {n}x{n}; GFLOP/s, median of {args.peak_repeats} calls "
        f"before / after the models; per model: median over rounds of a {args.round_peak_repeats}"
        f"-call median):")
  peak_rows = []
  for lib, label in (("jax", "jax (jnp.dot, jit)"),
                     ("torch", f"torch.matmul ({args.torch_threads} threads)")):
    if f"{lib}_before" not in peaks:
      continue
    r = {"lib": label, "before": peaks[f"{lib}_before"]["median_gflops"],
         "after": peaks[f"{lib}_after"]["median_gflops"],
         "best": max(peaks[f"{lib}_before"]["best_gflops"],
                     peaks[f"{lib}_after"]["best_gflops"])}
    for row in rows:
      r[row["model"]] = row.get(f"{lib}_peak_gflops")
    peak_rows.append(r)
  print(_common.format_table(peak_rows, [
      ("lib", "library", ""), ("before", "before", ".1f"), ("after", "after", ".1f"),
      ("best", "best single call", ".1f")] + [(row["model"], f"during {row['model']}", ".1f")
                                               for row in rows]))
  print("\nTrain step (f32, AdamW + clip; median step time over interleaved rounds; MFU = "
        "model FLOP/s / same-round matmul peak, median over rounds):")
  print(_common.format_table(rows, [
      ("model", "model", ""), ("batch", "B", "d"), ("seq", "T", "d"),
      ("n_flops_params", "N (FLOP params)", ",d"), ("flops", "FLOP/step", ".3e"),
      ("jax_step_ms", "JAX ms/step", ".1f"), ("jax_tok_s", "JAX tok/s", ",.0f"),
      ("jax_mfu", "JAX MFU", ".1%"), ("torch_step_ms", "Torch ms/step", ".1f"),
      ("torch_tok_s", "Torch tok/s", ",.0f"), ("torch_mfu", "Torch MFU (torch peak)", ".1%"),
      ("ratio", "JAX/Torch", ".2f"), ("ratio_paired", "paired", ".2f"),
      ("rounds", "rounds", "d")]))
  print("\nFastest step of each (least disturbed by other load) and the step-1 parity check "
        "(same initial weights and batch):")
  print(_common.format_table(rows, [
      ("model", "model", ""), ("jax_best_ms", "JAX best ms", ".1f"),
      ("torch_best_ms", "Torch best ms", ".1f"), ("ratio_best", "JAX/Torch (best)", ".2f"),
      ("loss_diff", "|loss JAX - Torch| step 1", ".1e"),
      ("gnorm_rel_diff", "grad-norm rel. diff step 1", ".1e")]))
  payload = {"benchmark": "train_step", "machine": info, "load_end": _common.load_average(),
             "args": vars(args), "optimizer": vars(OPT), "peaks": peaks, "rows": rows,
             "flops_formula": "6*(params - position table [- untied input table])*tokens + "
                              "12*layers*seq*(heads*head_dim)*tokens"}
  _common.write_json(args.out, payload)


if __name__ == "__main__":
  main()
