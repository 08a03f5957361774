"""Named model configurations.

Published shapes: Gemma-2 from the Gemma-2 report / released checkpoints (vocabulary of the
Hugging Face release, 256000 rows; Kaggle Flax checkpoints pad the table to 256128, pass
`vocab_size=256128` for those), GPT-2 small from the GPT-2 release.
"""

from __future__ import annotations

from qdc_jax.models.transformer import ModelConfig

_GEMMA2 = dict(norm="rmsnorm", mlp="geglu", position="rope", post_norms=True,
               layer_pattern=("local", "global"), sliding_window=4096, attn_softcap=50.0,
               final_softcap=30.0, embed_scale=True, tie_embeddings=True, use_bias=False,
               vocab_size=256_000, max_len=8192)

_GPT2 = dict(norm="layernorm", norm_eps=1e-5, mlp="gelu", position="learned", post_norms=False,
             layer_pattern=("global",), sliding_window=None, attn_softcap=None,
             final_softcap=None, embed_scale=False, tie_embeddings=True, use_bias=True)

CONFIGS: dict[str, ModelConfig] = {
    "gemma2_2b": ModelConfig(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                             head_dim=256, d_ff=9216, query_pre_attn_scalar=256, **_GEMMA2),
    "gemma2_9b": ModelConfig(d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8,
                             head_dim=256, d_ff=14336, query_pre_attn_scalar=256, **_GEMMA2),
    "gemma2_27b": ModelConfig(d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16,
                              head_dim=128, d_ff=36864, query_pre_attn_scalar=144, **_GEMMA2),
    "gpt2_125m": ModelConfig(vocab_size=50257, d_model=768, num_layers=12, num_heads=12,
                             num_kv_heads=12, head_dim=64, d_ff=3072, max_len=1024, **_GPT2),
    # Tiny Gemma-architecture models for the arithmetic lab (char vocabulary, 2 CPU cores).
    # Window 32 < lab sequence lengths, so local layers really are local.
    "lab_tiny": ModelConfig(d_model=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, d_ff=256,
                            **{**_GEMMA2, "vocab_size": 128, "sliding_window": 32,
                               "max_len": 512}),
    "lab_small": ModelConfig(d_model=256, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=64, d_ff=1024,
                             **{**_GEMMA2, "vocab_size": 128, "sliding_window": 64,
                                "max_len": 512}),
    # The shipped lab models (qdc_jax/assets): small enough to train in minutes on 2 cores.
    "lab_student": ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                               head_dim=32, d_ff=512,
                               **{**_GEMMA2, "vocab_size": 128, "sliding_window": 64,
                                  "max_len": 1024}),
    "lab_generator": ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                 head_dim=32, d_ff=512,
                                 **{**_GEMMA2, "vocab_size": 128, "sliding_window": 128,
                                    "max_len": 1024}),
    # The d=512 8-layer model of the throughput benchmark.
    "bench_d512": ModelConfig(d_model=512, num_layers=8, num_heads=8,
                              num_kv_heads=8, head_dim=64, d_ff=2048,
                              **{**_GEMMA2, "vocab_size": 256, "sliding_window": 128,
                                 "max_len": 1024}),
    "gpt2_tiny": ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=16, d_ff=256, max_len=256, **_GPT2),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
  """Named config with field overrides; unknown names list the valid ones."""
  if name not in CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
  cfg = CONFIGS[name]
  unknown = set(overrides) - set(cfg.__dataclass_fields__)
  if unknown:
    raise ValueError(f"Unknown ModelConfig field(s) {sorted(unknown)}; valid fields: "
                     f"{sorted(cfg.__dataclass_fields__)}")
  return cfg.replace(**overrides) if overrides else cfg
