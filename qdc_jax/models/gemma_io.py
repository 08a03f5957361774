"""Gemma-2 checkpoints in and out of our parameter tree: Hugging Face safetensors and Kaggle orbax.

Import and sample, one command (HF directory with config.json, or a Kaggle/Flax orbax directory):

  python -m qdc_jax.models.gemma_io --checkpoint=/ckpts/gemma-2-2b \
      --tokenizer=/ckpts/gemma-2-2b/tokenizer.model --prompt="The capital of France is"

(`--config=gemma2_2b` picks a named config instead of reading config.json / inferring it,
`--mesh=1,1,8` shards over 8 devices, `--dtype=float32` keeps f32 weights, `--temperature=0.7`
samples instead of greedy, `--chat` wraps prompts in Gemma chat turns and stops at
<end_of_turn> for instruction-tuned checkpoints such as gemma-2-9b-it.) From Python:

  cfg, params = gemma_io.load_gemma("/ckpts/gemma-2-2b", mesh=mesh)   # format auto-detected
  run = sampling.jit_sample(transformer.Transformer(cfg), sp, mesh, rules, shardings)

Convert once into the model directory that every experiment loads (`model_io.load_model`;
give it as the config's model directory, e.g. --config.model_dir= / init_from= / policy=):

  python -m qdc_jax.models.gemma_io convert --checkpoint=/ckpts/gemma-2-2b \
      --tokenizer=/ckpts/gemma-2-2b/tokenizer.model --out=gs://bucket/models/gemma2_2b

Either format; `--model=gemma2_2b` names the config (default: config.json, or for Kaggle the
named config with the stored shapes), `--dtype=bfloat16` casts (default: the stored dtype,
so logits are the checkpoint's), `--mesh=1,1,8` loads sharded. The directory holds params/,
model.json and a copy of the tokenizer as tokenizer.model, which model.json names relative
to the directory, so it can be moved or copied to gs://. The tokenizer is checked first: it
may have fewer pieces than the table has rows (Kaggle: 256128 rows, 256000 pieces) but not
more, and its pad/eos/bos ids must be the checkpoint's (HF: config.json's; Kaggle: Gemma's
0/1/2) and <start_of_turn>/<end_of_turn> must be 106/107; otherwise it names the mismatch.
From Python: `gemma_io.convert(checkpoint, tokenizer, out)`.

Layouts, ours <- Hugging Face (torch Linear weights are [out, in]) <- Kaggle (gemma library):

  embedding [V, D]    <- model.embed_tokens.weight [V, D] <- embedder/input_embedding [V, D]
  attn/q [D, N, H]    <- q_proj.weight [N*H, D]           <- attn/q_einsum/w [N, D, H]
  attn/k, v [D, K, H] <- {k,v}_proj.weight [K*H, D]       <- attn/kv_einsum/w [2, K, D, H]
                                                             (N == K: qkv_einsum/w [3, N, D, H])
  attn/o [N, H, D]    <- o_proj.weight [D, N*H]           <- attn/attn_vec_einsum/w [N, H, D]
  mlp/gate, up [D, F] <- {gate,up}_proj.weight [F, D]     <- mlp/gating_einsum [2, F, D]
                                                             (Gemma-1 order: [2, D, F])
  mlp/down [F, D]     <- down_proj.weight [D, F]          <- mlp/linear [F, D]
  pre_attn_norm [D]   <- input_layernorm                  <- pre_attention_norm/scale
  post_attn_norm [D]  <- post_attention_layernorm         <- post_attention_norm/scale
  pre_mlp_norm [D]    <- pre_feedforward_layernorm        <- pre_ffw_norm/scale
  post_mlp_norm [D]   <- post_feedforward_layernorm       <- post_ffw_norm/scale
  final_norm [D]      <- model.norm.weight                <- final_norm/scale

Conventions checked against transformers' `modeling_gemma2.py` and the gemma library:
- RoPE: HF (`rotate_half`), the gemma library (`jnp.split(x, 2)`) and `transformer.apply_rope`
  all rotate the first half of a head against the second half, so q/k rows are copied as they
  are (the interleave permutation of HF's Llama conversion does not apply to Gemma).
- RMSNorm scales are stored around zero and applied as `(1 + scale)` in all three: no +1.
- HF's `gelu_pytorch_tanh` is `jax.nn.gelu` (tanh approximation); layer i is local iff i is even.
- Kaggle embedding tables have 256128 rows (HF: 256000); `load_gemma` adopts the stored count.

Loading never builds a whole host copy: safetensors files are memory-mapped and each device
shard is read by `jax.make_array_from_callback`; orbax restores each Kaggle leaf straight into
a sharding whose layout makes the transpose into ours shard-local.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from qdc_jax import sharding as sharding_lib
from qdc_jax.models import configs
from qdc_jax.models import transformer

PyTree = Any
Path = tuple[str, ...]

CHECKPOINT_FLAG = "--config.model.checkpoint"
_MAX_LISTED = 10
_NORMS = ("pre_attn_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm")


# ------------------------------------------------------------------------------ layouts


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """Where one of our leaves lives in a checkpoint: ours = reshape(src[index], view).T(perm)."""

  src: str  # key (HF) or normalised path (Kaggle) of the stored array
  src_shape: tuple[int, ...]  # stored shape the config implies
  perm: tuple[int, ...]  # our axis i is axis perm[i] of the view
  view: Optional[tuple[int, ...]] = None  # reshape after indexing (HF's fused head axes)
  index: Optional[int] = None  # entry of a stacked leading axis (Kaggle qkv / kv / gating)

  def view_shape(self) -> tuple[int, ...]:
    return self.view if self.view is not None else (
        self.src_shape[1:] if self.index is not None else self.src_shape)

  def our_shape(self) -> tuple[int, ...]:
    view = self.view_shape()
    return tuple(view[axis] for axis in self.perm)


def _hf_layout(cfg: transformer.ModelConfig) -> dict[Path, _Leaf]:
  d, n, k, h, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)
  out = {("embedding",): _Leaf("model.embed_tokens.weight", (v, d), (0, 1)),
         ("final_norm", "scale"): _Leaf("model.norm.weight", (d,), (0,))}
  if not cfg.tie_embeddings:
    out[("lm_head",)] = _Leaf("lm_head.weight", (v, d), (1, 0))
  hf_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm")
  for i in range(cfg.num_layers):
    p, layer = f"model.layers.{i}.", f"layer_{i}"
    out[(layer, "attn", "q")] = _Leaf(p + "self_attn.q_proj.weight", (n * h, d), (2, 0, 1),
                                      view=(n, h, d))
    for name in ("k", "v"):
      out[(layer, "attn", name)] = _Leaf(p + f"self_attn.{name}_proj.weight", (k * h, d),
                                         (2, 0, 1), view=(k, h, d))
    out[(layer, "attn", "o")] = _Leaf(p + "self_attn.o_proj.weight", (d, n * h), (1, 2, 0),
                                      view=(d, n, h))
    out[(layer, "mlp", "gate")] = _Leaf(p + "mlp.gate_proj.weight", (f, d), (1, 0))
    out[(layer, "mlp", "up")] = _Leaf(p + "mlp.up_proj.weight", (f, d), (1, 0))
    out[(layer, "mlp", "down")] = _Leaf(p + "mlp.down_proj.weight", (d, f), (1, 0))
    for ours, theirs in zip(_NORMS, hf_norms):
      out[(layer, ours, "scale")] = _Leaf(p + theirs + ".weight", (d,), (0,))
  return out


def _kaggle_layout(cfg: transformer.ModelConfig, *, fused_qkv: bool,
                   gating_transposed: bool) -> dict[Path, _Leaf]:
  d, n, k, h, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)
  out = {("embedding",): _Leaf("embedder/input_embedding", (v, d), (0, 1)),
         ("final_norm", "scale"): _Leaf("final_norm/scale", (d,), (0,))}
  kaggle_norms = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
  for i in range(cfg.num_layers):
    p, layer = f"layer_{i}/", f"layer_{i}"
    if fused_qkv:
      for j, name in enumerate("qkv"):
        out[(layer, "attn", name)] = _Leaf(p + "attn/qkv_einsum", (3, n, d, h), (1, 0, 2),
                                           index=j)
    else:
      out[(layer, "attn", "q")] = _Leaf(p + "attn/q_einsum", (n, d, h), (1, 0, 2))
      for j, name in enumerate("kv"):
        out[(layer, "attn", name)] = _Leaf(p + "attn/kv_einsum", (2, k, d, h), (1, 0, 2),
                                           index=j)
    out[(layer, "attn", "o")] = _Leaf(p + "attn/attn_vec_einsum", (n, h, d), (0, 1, 2))
    for j, name in enumerate(("gate", "up")):  # gating_einsum[0] is the gelu branch
      if gating_transposed:
        out[(layer, "mlp", name)] = _Leaf(p + "mlp/gating_einsum", (2, f, d), (1, 0), index=j)
      else:
        out[(layer, "mlp", name)] = _Leaf(p + "mlp/gating_einsum", (2, d, f), (0, 1), index=j)
    out[(layer, "mlp", "down")] = _Leaf(p + "mlp/linear", (f, d), (0, 1))
    for ours, theirs in zip(_NORMS, kaggle_norms):
      out[(layer, ours, "scale")] = _Leaf(p + theirs + "/scale", (d,), (0,))
  return out


# ------------------------------------------------------------------------- config helpers


def _label(cfg: transformer.ModelConfig, config_name: Optional[str]) -> str:
  """How errors name the config: the given name, a matching named config, or its shape."""
  if config_name:
    return f"config {config_name!r}"
  for name, named in configs.CONFIGS.items():
    if named == cfg:
      return f"config {name!r}"
  return (f"ModelConfig(vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, "
          f"num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, "
          f"num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, d_ff={cfg.d_ff})")


def _check_gemma2(cfg: transformer.ModelConfig, label: str) -> None:
  """Refuses configs whose features have no place in a Gemma-2 checkpoint."""
  want = dict(norm="rmsnorm", mlp="geglu", position="rope", post_norms=True, embed_scale=True,
              use_bias=False)
  bad = [f"{k}={getattr(cfg, k)!r} (Gemma-2 has {v!r})" for k, v in want.items()
         if getattr(cfg, k) != v]
  if bad:
    raise ValueError(f"{label} is not a Gemma-2 architecture: " + "; ".join(bad))


def _abstract_params(cfg: transformer.ModelConfig) -> PyTree:
  """Boxed (logical names kept) ShapeDtypeStructs of `Transformer(cfg)` params; no allocation."""
  model = transformer.Transformer(cfg)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]


def param_shardings(cfg: transformer.ModelConfig, mesh: jax.sharding.Mesh,
                    rules: Optional[Sequence] = None) -> PyTree:
  """NamedShardings of our params for `cfg` on `mesh` (DEFAULT_RULES unless given)."""
  specs = nn.get_partition_spec(_abstract_params(cfg))
  return sharding_lib.logical_to_shardings(specs, mesh, rules or sharding_lib.DEFAULT_RULES)


def _minimal_period(kinds: Sequence[str]) -> tuple[str, ...]:
  for p in range(1, len(kinds) + 1):
    if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
      return tuple(kinds[:p])
  return tuple(kinds)


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> transformer.ModelConfig:
  """Our `ModelConfig` for a Hugging Face Gemma-2 `config.json` dict (or a `Gemma2Config`).

  Args:
    hf_config: the parsed config.json, or an object with `to_dict()`.
    **overrides: ModelConfig fields to set afterwards (e.g. `param_dtype="bfloat16"`).

  Returns:
    The matching config; fields missing from the dict take Gemma2Config's defaults.

  Raises:
    ValueError: not a Gemma-2 config, or a feature our decoder does not implement.
  """
  d = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
  if d.get("model_type", "gemma2") != "gemma2":
    raise ValueError(f"config_from_hf reads Gemma-2 configs (model_type 'gemma2'), got "
                     f"model_type={d.get('model_type')!r}")
  act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
  problems = []
  if act not in ("gelu_pytorch_tanh", "gelu_new"):  # both are the tanh approximation
    problems.append(f"hidden_activation={act!r} (ours is the tanh-approximate gelu)")
  if d.get("attention_bias"):
    problems.append("attention_bias=True")
  if d.get("use_bidirectional_attention"):
    problems.append("use_bidirectional_attention=True")
  rope = d.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
    problems.append(f"rope scaling {rope or d.get('rope_scaling')} (only plain RoPE)")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size") if k not in d]
  if missing:
    problems.append(f"missing fields {missing}")
  if problems:
    raise ValueError("Unsupported Gemma-2 config: " + "; ".join(problems))
  layers, heads = d["num_hidden_layers"], d["num_attention_heads"]
  types = d.get("layer_types") or [  # Gemma2Config's default: even layers slide
      "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
  kinds = ["local" if t == "sliding_attention" else "global" for t in types]
  cfg = transformer.ModelConfig(
      vocab_size=d["vocab_size"], d_model=d["hidden_size"], num_layers=layers,
      num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads, d_ff=d["intermediate_size"],
      norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), mlp="geglu", position="rope",
      rope_base=float(rope.get("rope_theta", d.get("rope_theta", 10_000.0))),
      max_len=d.get("max_position_embeddings", 8192), post_norms=True,
      layer_pattern=_minimal_period(kinds),
      sliding_window=d.get("sliding_window", 4096) if "local" in kinds else None,
      attn_softcap=d.get("attn_logit_softcapping", 50.0),
      final_softcap=d.get("final_logit_softcapping", 30.0),
      query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256), embed_scale=True,
      tie_embeddings=d.get("tie_word_embeddings", True), use_bias=False)
  return cfg.replace(**overrides) if overrides else cfg


def hf_config_dict(cfg: transformer.ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The Hugging Face `config.json` of `cfg` (inverse of `config_from_hf`)."""
  _check_gemma2(cfg, _label(cfg, None))
  scalar = cfg.query_pre_attn_scalar or cfg.head_dim
  types = ["sliding_attention" if cfg.attention_kind(i) == "local" else "full_attention"
           for i in range(cfg.num_layers)]
  return {
      "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      # transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
      "rope_theta": cfg.rope_base,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
      "sliding_window": cfg.sliding_window, "layer_types": types,
      "attn_logit_softcapping": cfg.attn_softcap,
      "final_logit_softcapping": cfg.final_softcap,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      # Gemma's SentencePiece ids.
      "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
      "torch_dtype": dtype, "dtype": dtype,
  }


# ----------------------------------------------------------------------- shared plumbing


def _require(path: str, what: str = "Gemma checkpoint") -> str:
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = os.fspath(path) if path is not None else ""
  if not path or not epath.Path(path).exists():
    raise FileNotFoundError(
        f"{what} not found: {path!r}. Set {CHECKPOINT_FLAG}=/path/to/checkpoint: a Hugging Face "
        f"directory (config.json + model.safetensors or model.safetensors.index.json) or a "
        f"Kaggle/Flax orbax checkpoint directory.")
  return path


def _flat_targets(cfg: transformer.ModelConfig, shardings: Optional[PyTree]
                  ) -> tuple[dict[Path, jax.ShapeDtypeStruct], dict[Path, jax.sharding.Sharding]]:
  abstract = traverse_util.flatten_dict(nn.meta.unbox(_abstract_params(cfg)))
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return abstract, {p: device for p in abstract}
  if isinstance(shardings, Mapping) and set(shardings) == {"params"}:
    shardings = shardings["params"]
  flat = traverse_util.flatten_dict(nn.meta.unbox(dict(shardings)))
  if set(flat) != set(abstract):
    diff = sorted("/".join(p) for p in set(flat) ^ set(abstract))[:_MAX_LISTED]
    raise ValueError(f"shardings do not have the structure of the params of "
                     f"{_label(cfg, None)}; differing leaves: {diff}")
  return abstract, flat


def _raise_mismatch(problems: list[str], path: str, label: str) -> None:
  if not problems:
    return
  more = len(problems) - _MAX_LISTED
  listing = "\n  ".join(problems[:_MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")
  raise ValueError(
      f"Checkpoint {path} does not fit {label}:\n  {listing}\nPick the config that matches the "
      f"checkpoint (--config.model.name=...), or let load_gemma infer it (config_name=None).")


def _shape_problems(layout: dict[Path, _Leaf], stored: Mapping[str, tuple[int, ...]],
                    abstract: Mapping[Path, Any], label: str) -> list[str]:
  problems, seen = [], set()
  for path, leaf in layout.items():
    if leaf.src in seen:
      continue
    seen.add(leaf.src)
    ours = f"our {'/'.join(path)} {tuple(abstract[path].shape)}"
    if leaf.src not in stored:
      problems.append(f"{leaf.src}: missing from the checkpoint ({label} expects shape "
                      f"{leaf.src_shape}, {ours})")
    elif tuple(stored[leaf.src]) != leaf.src_shape:
      problems.append(f"{leaf.src}: checkpoint has shape {tuple(stored[leaf.src])}, {label} "
                      f"expects shape {leaf.src_shape} ({ours})")
  return problems


# ----------------------------------------------------------------------- HF safetensors

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _StTensor:
  file: str
  dtype: str
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `file`

  def memmap(self) -> np.ndarray:
    """The tensor as a read-only memory map: slicing it reads only the pages it touches."""
    # safetensors' own numpy backend cannot return bfloat16 (TypeError in 0.8), and Gemma-2
    # ships bf16; the format is a JSON header + raw little-endian bytes, so map it directly.
    if math.prod(self.shape) == 0:
      return np.zeros(self.shape, _ST_DTYPES[self.dtype])
    return np.memmap(self.file, dtype=_ST_DTYPES[self.dtype], mode="r", offset=self.offset,
                     shape=self.shape)


def _read_st_header(file: str) -> dict[str, _StTensor]:
  with open(file, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
  out = {}
  for key, meta in header.items():
    if key == "__metadata__":
      continue
    if meta["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {key} has unsupported dtype {meta['dtype']}")
    out[key] = _StTensor(file, meta["dtype"], tuple(meta["shape"]), 8 + n + meta["data_offsets"][0])
  return out


def _safetensors_index(path_or_dir: str) -> dict[str, _StTensor]:
  """Every tensor of a safetensors checkpoint (one file, a dir, or a sharded dir + index)."""
  path = _require(path_or_dir)
  if os.path.isfile(path):
    files = [path]
  else:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as fh:
        weight_map = json.load(fh)["weight_map"]
      files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    elif os.path.exists(os.path.join(path, "model.safetensors")):
      files = [os.path.join(path, "model.safetensors")]
    else:
      files = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(
          f"No safetensors files in {path} (expected model.safetensors or "
          f"model.safetensors.index.json). Set {CHECKPOINT_FLAG}= to a Hugging Face Gemma-2 "
          f"checkpoint directory.")
  tensors = {}
  for f in files:
    tensors.update(_read_st_header(_require(f, "safetensors shard listed in the index")))
  return tensors


def _hf_reader(tensor: _StTensor, leaf: _Leaf, dtype: np.dtype) -> Callable:
  """`make_array_from_callback` callback: our-layout index -> that block, read lazily."""
  def read(index: tuple[slice, ...]) -> np.ndarray:
    view = tensor.memmap().reshape(leaf.view_shape())  # a view: nothing is read yet
    src = [slice(None)] * view.ndim
    for i, axis in enumerate(leaf.perm):
      src[axis] = index[i]
    return np.ascontiguousarray(view[tuple(src)].transpose(leaf.perm), dtype=dtype)
  return read


def params_from_hf_safetensors(path_or_dir: str, cfg: transformer.ModelConfig, *,
                               shardings: Optional[PyTree] = None,
                               config_name: Optional[str] = None) -> PyTree:
  """Reads a Hugging Face Gemma-2 checkpoint into our params, straight into `shardings`.

  Args:
    path_or_dir: a `.safetensors` file, or a directory with `model.safetensors`, or one with
      `model.safetensors.index.json` and its shards.
    cfg: the config to load into (e.g. `config_from_hf(config.json)`).
    shardings: tree of `jax.sharding.Sharding` like the params (e.g. from `param_shardings`);
      None puts every leaf on the first local device.
    config_name: how errors name `cfg`.

  Returns:
    Nested dict of `jax.Array` in `cfg.param_dtype`, each process holding only its shards.

  Raises:
    FileNotFoundError: the path or a listed shard does not exist.
    ValueError: a tensor is missing, has the wrong shape, or the checkpoint has more layers.
  """
  label = _label(cfg, config_name)
  _check_gemma2(cfg, label)
  tensors = _safetensors_index(path_or_dir)
  abstract, target = _flat_targets(cfg, shardings)
  layout = _hf_layout(cfg)
  problems = _shape_problems(layout, {k: t.shape for k, t in tensors.items()}, abstract, label)
  used = {leaf.src for leaf in layout.values()}
  ignorable = {"lm_head.weight"}  # tied copy written by some exporters
  extra = sorted(k for k in tensors if k not in used and k not in ignorable
                 and not k.endswith("rotary_emb.inv_freq"))
  problems += [f"{k}: in the checkpoint {tensors[k].shape} but not in {label} (more layers?)"
               for k in extra]
  _raise_mismatch(problems, path_or_dir, label)
  dtype = np.dtype(cfg.param_dtype)
  flat = {}
  for path, leaf in layout.items():
    flat[path] = jax.make_array_from_callback(
        tuple(abstract[path].shape), target[path], _hf_reader(tensors[leaf.src], leaf, dtype),
        dtype=dtype)
  return traverse_util.unflatten_dict(flat)


def params_to_hf_safetensors(params: PyTree, cfg: transformer.ModelConfig, out_dir: str, *,
                             dtype: Optional[str] = None,
                             max_shard_bytes: Optional[int] = None,
                             extra_config: Optional[Mapping[str, Any]] = None) -> list[str]:
  """Writes `params` as a Hugging Face Gemma-2 checkpoint (`Gemma2ForCausalLM.from_pretrained`).

  Tensors are gathered and written one at a time, so the host holds one tensor, not the model.
  Every process must call this (gathering sharded arrays is collective); process 0 writes.

  Args:
    params: our parameter tree for `cfg` (arrays of any sharding, or numpy).
    cfg: its config.
    out_dir: created if needed; receives config.json and model.safetensors (or shards +
      model.safetensors.index.json when `max_shard_bytes` splits them).
    dtype: dtype to write ('bfloat16', 'float32', ...); None keeps `cfg.param_dtype`.
    max_shard_bytes: split into files of at most this many bytes (a tensor is never split).
    extra_config: entries merged into config.json (e.g. other special-token ids).

  Returns:
    Paths of the files written (empty on processes other than 0).
  """
  label = _label(cfg, None)
  _check_gemma2(cfg, label)
  flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
  layout = _hf_layout(cfg)
  problems = [f"our {'/'.join(p)}: missing from params" for p in layout if p not in flat]
  problems += [f"our {'/'.join(p)}: params have {tuple(np.shape(flat[p]))}, {label} expects "
               f"{layout[p].our_shape()}" for p in layout
               if p in flat and tuple(np.shape(flat[p])) != layout[p].our_shape()]
  if problems:
    raise ValueError(f"params do not fit {label}: " + "; ".join(problems[:_MAX_LISTED]))
  np_dtype = np.dtype(dtype or cfg.param_dtype)
  st_dtype = _ST_NAMES[np_dtype]
  entries = [(leaf.src, path, leaf) for path, leaf in layout.items()]
  sizes = [math.prod(leaf.src_shape) * np_dtype.itemsize for _, _, leaf in entries]
  groups: list[list[int]] = [[]]
  budget = max_shard_bytes or float("inf")
  for i, size in enumerate(sizes):
    if groups[-1] and sum(sizes[j] for j in groups[-1]) + size > budget:
      groups.append([])
    groups[-1].append(i)
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors" for g in range(len(groups))])
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, group in zip(names, groups):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i in group:
      key, _, leaf = entries[i]
      header[key] = {"dtype": st_dtype, "shape": list(leaf.src_shape),
                     "data_offsets": [offset, offset + sizes[i]]}
      offset += sizes[i]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
    fh = open(os.path.join(out_dir, name), "wb") if writer else None
    try:
      if fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
      for i in group:
        key, path, leaf = entries[i]
        ours = sharding_lib.to_host(flat[path])  # collective: every process runs it
        view = ours.transpose(np.argsort(leaf.perm))
        if fh:
          fh.write(np.ascontiguousarray(view.reshape(leaf.src_shape), dtype=np_dtype).tobytes())
    finally:
      if fh:
        fh.close()
    written.append(os.path.join(out_dir, name))
  if not writer:
    return []
  if len(groups) > 1:
    weight_map = {entries[i][0]: name for name, group in zip(names, groups) for i in group}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
      json.dump(index, fh, indent=2)
    written.append(fh.name)
  config = hf_config_dict(cfg, str(np_dtype))
  config.update(extra_config or {})
  with open(os.path.join(out_dir, "config.json"), "w") as fh:
    json.dump(config, fh, indent=2)
  written.append(fh.name)
  return written


# ------------------------------------------------------------------------- Kaggle orbax


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_array_meta(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (dict, list, tuple))


def _kaggle_name(path: tuple) -> str:
  """Normalised name of a stored leaf, the same for the released and the nested layouts.

  Released (flat) checkpoints key by `'transformer/layer_0/attn/q_einsum'` -> {'w': ...};
  `gemma.gm.ckpts.save_params` nests `{'layer_0': {'attn': {'q_einsum': {'w': ...}}}}` and
  drops the 'w' under `mlp`. Both become 'layer_0/attn/q_einsum'.
  """
  name = "/".join(_key_str(k) for k in path)
  for prefix in ("params/", "transformer/"):
    if name.startswith(prefix):
      name = name[len(prefix):]
  return name[:-2] if name.endswith("/w") else name


def _kaggle_metadata(ckpt_dir: str) -> PyTree:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta = ocp.StandardCheckpointer().metadata(ckpt_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if tree is None:
    raise ValueError(f"{ckpt_dir} has no orbax item metadata: not a Kaggle/Flax Gemma "
                     f"checkpoint directory (set {CHECKPOINT_FLAG}= to one).")
  return tree


def _kaggle_stored(ckpt_dir: str) -> tuple[PyTree, dict[str, tuple[tuple, Any]]]:
  """(metadata tree, {normalised name: (shape, dtype)})."""
  tree = _kaggle_metadata(ckpt_dir)
  stored = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_meta)[0]:
    if _is_array_meta(leaf):
      stored[_kaggle_name(path)] = (tuple(leaf.shape), leaf.dtype)
  return tree, stored


def _source_sharding(target: jax.sharding.Sharding, leaf: _Leaf) -> jax.sharding.Sharding:
  """Sharding of a stored Kaggle leaf under which slicing + transposing into ours is local."""
  if isinstance(target, NamedSharding):
    spec = list(target.spec) + [None] * (len(leaf.perm) - len(target.spec))
    src = [None] * len(leaf.perm)
    for i, axis in enumerate(leaf.perm):
      src[axis] = spec[i]
    if leaf.index is not None:
      src = [None] + src
    return NamedSharding(target.mesh, P(*src))
  if len(target.device_set) == 1:
    return target
  raise TypeError(f"Kaggle import needs NamedShardings (or single-device ones), got {target}")


@functools.lru_cache(maxsize=None)
def _converter(index: Optional[int], perm: tuple[int, ...], out: jax.sharding.Sharding):
  def convert(x):
    return jnp.transpose(x if index is None else x[index], perm)
  return jax.jit(convert, out_shardings=out)


def params_from_kaggle_orbax(ckpt_dir: str, cfg: transformer.ModelConfig, *,
                             shardings: Optional[PyTree] = None,
                             config_name: Optional[str] = None) -> PyTree:
  """Restores a Kaggle/Flax Gemma(-2) orbax checkpoint into our params and shardings.

  Orbax reads each stored array straight into a sharding laid out so that the slice/transpose
  into our layout moves no data between devices; each stored array is freed once converted,
  so the peak is about one model plus one leaf.

  Args:
    ckpt_dir: the orbax checkpoint directory (released flat layout, or the nested one of
      `gemma.gm.ckpts.save_params`); `q_einsum` + `kv_einsum` and fused `qkv_einsum` both work.
    cfg: the config to load into; Kaggle tables have 256128 vocabulary rows.
    shardings: tree of NamedShardings like the params; None: first local device.
    config_name: how errors name `cfg`.

  Returns:
    Nested dict of `jax.Array` in `cfg.param_dtype`.

  Raises:
    FileNotFoundError: `ckpt_dir` does not exist.
    ValueError: missing or extra arrays, or shapes that do not fit `cfg`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  label = _label(cfg, config_name)
  _check_gemma2(cfg, label)
  ckpt_dir = _require(ckpt_dir)
  tree, stored = _kaggle_stored(ckpt_dir)
  gating = stored.get("layer_0/mlp/gating_einsum", ((),))[0]
  # [2, F, D] is Gemma-2's order; [2, D, F] Gemma-1's. With F == D the two are identical in
  # shape and we assume Gemma-2.
  transposed = not (gating == (2, cfg.d_model, cfg.d_ff) and cfg.d_model != cfg.d_ff)
  layout = _kaggle_layout(cfg, fused_qkv="layer_0/attn/qkv_einsum" in stored,
                          gating_transposed=transposed)
  abstract, target = _flat_targets(cfg, shardings)
  problems = _shape_problems(layout, {k: v[0] for k, v in stored.items()}, abstract, label)
  used = {leaf.src for leaf in layout.values()}
  problems += [f"{k}: in the checkpoint {v[0]} but not in {label}" for k, v in stored.items()
               if k not in used]
  _raise_mismatch(problems, ckpt_dir, label)

  dtype = jnp.dtype(cfg.param_dtype)
  src_sharding = {}
  for path, leaf in layout.items():
    src_sharding.setdefault(leaf.src, _source_sharding(target[path], leaf))

  def restore_target(path, meta):
    if not _is_array_meta(meta):
      return meta
    name = _kaggle_name(path)
    return jax.ShapeDtypeStruct(tuple(meta.shape), dtype, sharding=src_sharding[name])

  want = jax.tree_util.tree_map_with_path(restore_target, tree, is_leaf=_is_array_meta)
  restored = ocp.StandardCheckpointer().restore(ckpt_dir, want)
  arrays = {_kaggle_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
  uses: dict[str, int] = {}
  for leaf in layout.values():
    uses[leaf.src] = uses.get(leaf.src, 0) + 1
  flat = {}
  for path, leaf in layout.items():
    src = arrays[leaf.src]
    identity = leaf.index is None and leaf.perm == tuple(range(len(leaf.perm)))
    if identity and src.sharding == target[path]:
      flat[path] = src
      uses[leaf.src] += 1  # handed over, never delete it
    else:
      flat[path] = _converter(leaf.index, leaf.perm, target[path])(src)
    uses[leaf.src] -= 1
    if uses[leaf.src] == 0:
      src.delete()  # keep the peak at ~one model + one leaf
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------- one call


def _detect_format(path: str) -> str:
  if path.endswith(".safetensors"):
    return "hf"
  if not os.path.exists(path):
    return "kaggle"  # not local (gs://...): only orbax reads those
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
      return "hf"
    if names & {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint"}:
      return "kaggle"
  raise ValueError(f"Cannot tell the format of {path}: no *.safetensors and no orbax metadata. "
                   f"Pass format='hf' or format='kaggle', or point {CHECKPOINT_FLAG}= at the "
                   f"checkpoint directory itself.")


_COMPARED = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "d_ff", "norm_eps", "rope_base", "layer_pattern", "sliding_window", "attn_softcap",
             "final_softcap", "query_pre_attn_scalar", "tie_embeddings")


def _infer_kaggle_config(stored: Mapping[str, tuple], path: str, **overrides
                         ) -> transformer.ModelConfig:
  """The named Gemma config whose shapes match a Kaggle checkpoint (softcaps etc. are not
  stored, so they come from the named config)."""
  try:
    v, d = stored["embedder/input_embedding"][0]
    layers = 1 + max(int(k.split("/")[0][6:]) for k in stored if k.startswith("layer_"))
    f = stored["layer_0/mlp/linear"][0][0]
    n, h, _ = stored["layer_0/attn/attn_vec_einsum"][0]
    fused = "layer_0/attn/qkv_einsum" in stored
    k = n if fused else stored["layer_0/attn/kv_einsum"][0][1]
  except (KeyError, ValueError, IndexError) as e:
    raise ValueError(f"{path} does not look like a Gemma checkpoint ({e!r} missing); pass "
                     f"config_name=") from e
  shape = dict(d_model=d, num_layers=layers, num_heads=n, num_kv_heads=k, head_dim=h, d_ff=f)
  for name, cfg in configs.CONFIGS.items():
    if all(getattr(cfg, a) == b for a, b in shape.items()) and cfg.norm == "rmsnorm":
      return cfg.replace(vocab_size=v, **overrides)
  raise ValueError(f"No named config matches the Kaggle checkpoint {path} ({shape}, "
                   f"vocab {v}); pass config_name= (see qdc_jax.models.configs).")


def _format(path: str, format: str) -> str:  # pylint: disable=redefined-builtin
  fmt = _detect_format(path) if format == "auto" else format
  if fmt not in ("hf", "kaggle"):
    raise ValueError(f"format={format!r}; choose 'auto', 'hf' or 'kaggle'")
  return fmt


def _hf_json(path: str) -> str:
  return os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")


def _resolve_config(path: str, fmt: str, config_name: Optional[str],
                    overrides: dict[str, Any]) -> transformer.ModelConfig:
  """The config `load_gemma` loads `path` into (see its `config_name`)."""
  if fmt == "hf":
    hf_json = _hf_json(path)
    from_file = None
    if os.path.exists(hf_json):
      with open(hf_json) as fh:
        from_file = config_from_hf(json.load(fh), **overrides)
    if config_name:
      cfg = configs.get_model_config(config_name, **overrides)
      if from_file is not None:
        diff = [f"{a}={getattr(cfg, a)!r} vs {getattr(from_file, a)!r}" for a in _COMPARED
                if a not in overrides and getattr(cfg, a) != getattr(from_file, a)]
        if diff:
          raise ValueError(f"config {config_name!r} does not match {hf_json}: "
                           + "; ".join(diff) + ". Use config_name=None to follow config.json.")
    elif from_file is None:
      raise FileNotFoundError(f"{hf_json} not found: pass config_name= or add the Hugging Face "
                              f"config.json next to the weights ({CHECKPOINT_FLAG}={path}).")
    else:
      cfg = from_file
  else:
    _, stored = _kaggle_stored(path)
    if config_name:
      cfg = configs.get_model_config(config_name, **overrides)
    else:
      cfg = _infer_kaggle_config(stored, path, **overrides)
    table = stored.get("embedder/input_embedding")
    if table and "vocab_size" not in overrides:
      cfg = cfg.replace(vocab_size=table[0][0])
  return cfg


def load_gemma(path: str, *, config_name: Optional[str] = None, format: str = "auto",
               mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[Sequence] = None,
               overrides: Optional[Mapping[str, Any]] = None
               ) -> tuple[transformer.ModelConfig, PyTree]:
  """Config and params of a Gemma-2 checkpoint in one call, sharded over `mesh` if given.

  Args:
    path: HF directory / .safetensors file, or a Kaggle orbax directory.
    config_name: a name in `configs.CONFIGS`; None reads the HF config.json, or for Kaggle
      picks the named config with the stored shapes. For HF, a name whose fields disagree
      with config.json raises. For Kaggle the vocabulary size always comes from the stored
      table (256128 rows, padded).
    format: 'auto', 'hf' or 'kaggle'.
    mesh: shard with `rules` (default `sharding.DEFAULT_RULES`); None: one device.
    rules: logical-axis rules for `mesh`.
    overrides: ModelConfig fields to set, e.g. {'param_dtype': 'bfloat16', 'dtype': 'bfloat16'}.

  Returns:
    (cfg, params).
  """
  path = _require(path)
  fmt = _format(path, format)
  cfg = _resolve_config(path, fmt, config_name, dict(overrides or {}))
  shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
  load = params_from_hf_safetensors if fmt == "hf" else params_from_kaggle_orbax
  return cfg, load(path, cfg, shardings=shardings, config_name=config_name)


# ------------------------------------------------------------------------------ convert

# Gemma's SentencePiece ids, the ones every Gemma(-2) checkpoint was trained with. HF's
# config.json repeats pad/eos/bos (eos may be a list: the -it models add <end_of_turn>);
# Kaggle checkpoints carry no ids. `chat` looks the turn pieces up by name, so a tokenizer
# with them elsewhere would feed the model a different token than it was tuned on.
GEMMA_SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2}
GEMMA_TURN_IDS = {"<start_of_turn>": 106, "<end_of_turn>": 107}


def _expected_ids(path: str, fmt: str) -> tuple[dict[str, tuple[int, ...]], str]:
  """({'pad'|'eos'|'bos': allowed ids}, where they come from) for a checkpoint."""
  want = {name: (i,) for name, i in GEMMA_SPECIAL_IDS.items()}
  if fmt != "hf" or not os.path.exists(_hf_json(path)):
    return want, "Gemma's tokenizer"
  with open(_hf_json(path)) as fh:
    hf = json.load(fh)
  for name in want:
    ids = hf.get(f"{name}_token_id")
    if ids is not None:
      want[name] = tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)
  return want, _hf_json(path)


def check_tokenizer(tok: Any, cfg: transformer.ModelConfig, checkpoint: str, *,
                    format: str = "auto") -> None:  # pylint: disable=redefined-builtin
  """Refuses a tokenizer whose ids do not fit the checkpoint.

  Fine: a table with rows past the tokenizer (Kaggle: 256128 rows, 256000 pieces). Refused:
  more pieces than rows, and pad/eos/bos ids other than the checkpoint's (HF: its config.json;
  Kaggle: Gemma's 0/1/2), and `<start_of_turn>` / `<end_of_turn>` missing or not at 106 / 107.

  Args:
    tok: a `tokenizers.SentencePieceTokenizer`.
    cfg: the config the checkpoint loads into (its `vocab_size` is the table's rows).
    checkpoint: the checkpoint path (HF: config.json is read next to it).
    format: 'auto', 'hf' or 'kaggle'.

  Raises:
    ValueError: every mismatch listed, and the fix.
  """
  fmt = _format(checkpoint, format)
  sp = tok.processor
  problems = []
  if tok.vocab_size > cfg.vocab_size:
    problems.append(f"it has {tok.vocab_size} pieces but the checkpoint's embedding table has "
                    f"{cfg.vocab_size} rows: ids {cfg.vocab_size}..{tok.vocab_size - 1} would "
                    f"index past the table")
  want, source = _expected_ids(checkpoint, fmt)
  have = {"pad": sp.pad_id(), "eos": sp.eos_id(), "bos": sp.bos_id()}  # -1: no such piece
  for name, ids in want.items():
    if have[name] not in ids:
      expected = ids[0] if len(ids) == 1 else f"one of {list(ids)}"
      problems.append(f"its {name} id is {have[name]}, {source} says {expected}")
  for piece, want_id in GEMMA_TURN_IDS.items():
    got = sp.piece_to_id(piece)
    if sp.id_to_piece(got) != piece:
      problems.append(f"it has no {piece} piece (Gemma's is id {want_id})")
    elif got != want_id:
      problems.append(f"its {piece} is id {got}, Gemma's is {want_id}")
  if problems:
    raise ValueError(
        f"Tokenizer {tok.model_path} does not fit the checkpoint {checkpoint}:\n  "
        + "\n  ".join(problems) + "\nPass --tokenizer= the tokenizer.model that ships with "
        "this checkpoint (Gemma-2's: 256000 pieces; pad 0, eos 1, bos 2, <start_of_turn> 106, "
        "<end_of_turn> 107), not another model's.")


def _stored_dtype(path: str, fmt: str) -> str:
  """The embedding table's stored dtype if float32 / bfloat16, else float32 (lossless)."""
  if fmt == "hf":
    table = _safetensors_index(path).get("model.embed_tokens.weight")
    name = np.dtype(_ST_DTYPES[table.dtype]).name if table else "float32"
  else:
    table = _kaggle_stored(path)[1].get("embedder/input_embedding")
    name = np.dtype(table[1]).name if table else "float32"
  return name if name in ("float32", "bfloat16") else "float32"


def convert(checkpoint: str, tokenizer: str, out: str, *, config_name: Optional[str] = None,
            format: str = "auto", dtype: Optional[str] = None,  # pylint: disable=redefined-builtin
            mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[Sequence] = None
            ) -> transformer.ModelConfig:
  """Writes a Gemma-2 checkpoint as a `model_io` model directory that experiments load.

  `out` (local or gs://) receives params/ (orbax), a copy of the tokenizer as
  `tokenizer.model`, and model.json naming it relative to the directory, so the directory
  can be moved. Call on every process (the writes are collective).

  Args:
    checkpoint: HF directory / .safetensors file, or a Kaggle orbax directory.
    tokenizer: that checkpoint's SentencePiece tokenizer.model (local or gs://).
    out: the model directory to write; an existing one is replaced.
    config_name: as `load_gemma` (None: config.json, or inferred from Kaggle shapes).
    format: 'auto', 'hf' or 'kaggle'.
    dtype: param and activation dtype written to model.json; None keeps the stored dtype
      (float32 or bfloat16), so the converted model's logits are the checkpoint's.
    mesh, rules: load sharded (for models larger than one device); None: one device.

  Returns:
    The config written to model.json.

  Raises:
    FileNotFoundError: no checkpoint or tokenizer at the path.
    ValueError: as `load_gemma`, or a tokenizer that does not fit (`check_tokenizer`).
  """
  from qdc_jax import model_io, storage, tokenizers  # pylint: disable=g-import-not-at-top
  checkpoint = _require(checkpoint)
  fmt = _format(checkpoint, format)
  if not tokenizer or not storage.exists(tokenizer) or storage.path(tokenizer).is_dir():
    raise FileNotFoundError(f"Tokenizer not found: {tokenizer!r}. Pass --tokenizer= the "
                            f"checkpoint's SentencePiece tokenizer.model.")
  dtype = dtype or _stored_dtype(checkpoint, fmt)
  cfg = _resolve_config(checkpoint, fmt, config_name, {"dtype": dtype, "param_dtype": dtype})
  tok = tokenizers.SentencePieceTokenizer(tokenizer)
  check_tokenizer(tok, cfg, checkpoint, format=fmt)  # before the (slow) weights
  shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
  load = params_from_hf_safetensors if fmt == "hf" else params_from_kaggle_orbax
  params = load(checkpoint, cfg, shardings=shardings, config_name=config_name)
  # save_model copies the tokenizer into `out` after un-committing any model there.
  notes = {"converted_from": checkpoint, "format": fmt, "tokenizer_from": tokenizer,
           "tokenizer_pieces": tok.vocab_size, "embedding_rows": cfg.vocab_size,
           "config": _label(cfg, config_name), "by": "python -m qdc_jax.models.gemma_io convert"}
  model_io.save_model(out, cfg, params, notes=notes,
                      tokenizer={"kind": "sentencepiece", "path": tokenizer})
  return cfg


# ---------------------------------------------------------------------------------- sizes


def param_bytes(cfg: transformer.ModelConfig, bytes_per_param: int) -> int:
  """Bytes of the parameters of `cfg` at `bytes_per_param` (2 = bf16, 4 = f32)."""
  return transformer.count_params(_abstract_params(cfg)) * bytes_per_param


def kv_cache_bytes_per_token(cfg: transformer.ModelConfig, bytes_per_elem: int) -> int:
  """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * bytes."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bytes_per_elem


# ----------------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from qdc_jax import sampling, tokenizers  # pylint: disable=g-import-not-at-top
  global CHECKPOINT_FLAG  # errors should name the flag this command line actually has
  CHECKPOINT_FLAG = "--checkpoint"
  f = flags.FLAGS
  command = argv[1] if len(argv) > 1 else "sample"
  if command not in ("sample", "convert") or len(argv) > 2:
    raise app.UsageError(f"Unknown command {' '.join(argv[1:])!r}: give 'convert' "
                         f"(--out=MODEL_DIR) or nothing / 'sample' (--prompt=...).")
  if f.model and f.config and f.model != f.config:
    raise app.UsageError(f"--model={f.model} and --config={f.config}: give one of them.")
  config_name = f.model or f.config or None
  mesh = None
  if f.mesh:
    mesh = sharding_lib.make_mesh(tuple(int(x) for x in f.mesh.split(",")))
  if command == "convert":
    if not f.out:
      raise app.UsageError("convert needs --out=MODEL_DIR (local or gs://).")
    cfg = convert(f.checkpoint, f.tokenizer, f.out, config_name=config_name,
                  dtype=f.dtype or None, mesh=mesh)
    from qdc_jax import model_io  # pylint: disable=g-import-not-at-top
    print(f"wrote {f.out}: {_label(cfg, config_name)}, {cfg.param_dtype}, tokenizer "
          f"{model_io.TOKENIZER_FILE}")
    return
  dtype = f.dtype or "bfloat16"
  cfg, params = load_gemma(f.checkpoint, config_name=config_name, mesh=mesh,
                           overrides={"dtype": dtype, "param_dtype": dtype})
  tok = tokenizers.SentencePieceTokenizer(f.tokenizer)
  from qdc_jax import chat  # pylint: disable=g-import-not-at-top
  # -it models: wrap prompts in chat turns and stop at <end_of_turn> as well as <eos>.
  texts = [chat.user_prompt(p) if f.chat else p for p in f.prompt]
  sp = sampling.SamplingParams(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                               top_k=f.top_k, greedy=f.temperature == 0.0,
                               eos_id=tok.eos_id if f.eos_id < 0 else f.eos_id,
                               pad_id=tok.pad_id,
                               extra_stop_ids=chat.chat_stop_ids(tok) if f.chat else (),
                               # Kaggle tables have 128 padding rows past the tokenizer's.
                               valid_vocab_size=tok.vocab_size)
  rows = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  prompts, lengths = sampling.pad_prompts([tok.encode(t, add_bos=True) for t in texts],
                                          tok.pad_id, min_rows=rows)
  shardings = jax.tree.map(lambda x: x.sharding, params) if mesh is not None else None
  run = sampling.jit_sample(transformer.Transformer(cfg), sp, mesh,
                            sharding_lib.DEFAULT_RULES if mesh is not None else None, shardings)
  if mesh is not None:  # every process holds the whole batch: global arrays in, numpy out
    prompts, lengths = (sharding_lib.put_global(x, mesh, sharding_lib.DEFAULT_RULES)
                        for x in (prompts, lengths))
  out = sharding_lib.to_host(run(params, prompts, lengths, jax.random.PRNGKey(f.seed)))
  for i, prompt in enumerate(f.prompt):
    text = tok.decode([int(t) for t in out.tokens[i, :out.lengths[i]]])
    print(f"--- {prompt!r}\n" + (chat.parse_model_reply(text) if f.chat else prompt + text))

if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("checkpoint", None, "HF Gemma-2 dir/.safetensors or Kaggle orbax dir.",
                      required=True)
  flags.DEFINE_string("tokenizer", None, "The checkpoint's SentencePiece tokenizer.model.",
                      required=True)
  flags.DEFINE_multi_string("prompt", ["The meaning of life is"], "Prompt(s); repeatable.")
  flags.DEFINE_string("config", "", "Named config (default: config.json / inferred).")
  flags.DEFINE_string("model", "", "Same as --config (e.g. gemma2_2b).")
  flags.DEFINE_string("out", "", "convert: the model directory to write (local or gs://).")
  flags.DEFINE_string("dtype", "", "Param and activation dtype; default: bfloat16 to sample, "
                      "the stored one (float32 / bfloat16) to convert.")
  flags.DEFINE_string("mesh", "", "Mesh shape data,fsdp,tensor, e.g. 1,1,8; empty: 1 device.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "0 = off.")
  flags.DEFINE_integer("eos_id", -1, "Stop token; -1: the tokenizer's EOS (instruction-tuned "
                       "models end turns with <end_of_turn> = 107).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("chat", False, "Instruction-tuned (-it) model: wrap each prompt in a Gemma "
                    "user turn and stop at <end_of_turn>.")
  app.run(_main)
