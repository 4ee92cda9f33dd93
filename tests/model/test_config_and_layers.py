"""ModelConfig from Hugging Face config.json files, and the first layers: RMSNorm and YaRN RoPE."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, YarnScaling
from model.layers import RMSNorm, RotaryEmbedding, apply_rotary, softmax_scale, yarn_inv_freq

# DeepSeek-V3's config.json (the fields this model reads, plus two it ignores).
V3 = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
      "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
      "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
      "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
      "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
      "first_k_dense_replace": 3, "moe_layer_freq": 1, "rope_theta": 10000,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},
      "max_position_embeddings": 163840, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6,
      "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# DeepSeek-V2-Lite's: no q LoRA, softmax routing without groups, no MTP key.
V2_LITE = {"vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
           "num_hidden_layers": 27, "num_attention_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
           "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
           "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "rope_theta": 10000,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def test_reads_v3_and_v2_lite_config_files(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(V3))
  v3 = ModelConfig.from_hf(tmp_path)
  assert v3.qk_head_dim == 192 and v3.rope_scaling == YarnScaling(40.0, 4096, 32, 1, 1.0, 1.0)
  assert [v3.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
  gate = v3.gate_config()
  assert (gate.n_group, gate.topk_group, gate.scoring_func) == (8, 4, "sigmoid") and v3.uses_score_bias
  assert ModelConfig.from_hf(v3.to_hf()) == v3 and hash(v3)  # round trip; hashable (a static jit argument)
  lite = ModelConfig.from_hf(V2_LITE)
  assert lite.q_lora_rank is None and lite.num_nextn_predict_layers == 0 and not lite.uses_score_bias
  assert lite.gate_config().n_group == 1 and lite.gate_config().scoring_func == "softmax"
  assert ModelConfig.preset("tiny").num_hidden_layers == 4


def test_reads_transformers_5_rope_parameters():
  legacy = ModelConfig.from_hf(V3)
  v5 = {k: v for k, v in V3.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = {**V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
  assert ModelConfig.from_hf(v5) == legacy
  plain = ModelConfig.from_hf({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
  assert plain.rope_scaling is None and plain.rope_theta == 5e5
  assert not ModelConfig.from_hf({**V3, "rope_interleave": False}).rope_interleave
  for bad, match in [({"rope_theta": 1.0}, "conflicts"), ({"rope_parameters": {"rope_type": "yarn", "factor": 4,
                                                                               "attention_factor": 2.0}},
                                                        "attention_factor"),
                     ({"rope_parameters": "yarn"}, "rope_parameters must be a dict"),
                     ({"rope_interleave": "yes"}, "rope_interleave")]:
    with pytest.raises(ValueError, match=match):
      ModelConfig.from_hf({**v5, **bad})


def test_rope_halves_are_interleaved_pairs_reordered():
  x = jax.random.normal(jax.random.key(4), (2, 5, 3, 8), jnp.float32)
  angles = jax.random.uniform(jax.random.key(5), (2, 5, 4)) * 6
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  order = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> halves layout
  np.testing.assert_allclose(apply_rotary(x[..., order], cos, sin, interleaved=False),
                             apply_rotary(x, cos, sin)[..., order], rtol=1e-6)


@pytest.mark.parametrize("change, match", [
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "sinkhorn"}, "topk_method"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "YaRN"),
    ({"rope_scaling": {"type": "yarn", "factor": 2, "alpha": 1}}, "unknown keys"),
    ({"n_group": 3}, "n_group"),
    ({"first_k_dense_replace": 99}, "first_k_dense_replace"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_bad_config_names_the_field(change, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_hf({**V3, **change})
  with pytest.raises(ValueError, match="lacks"):
    ModelConfig.from_hf({k: v for k, v in V3.items() if k != "kv_lora_rank"})
  with pytest.raises(ValueError, match="unknown preset"):
    ModelConfig.preset("huge")


def test_rmsnorm():
  x = jax.random.normal(jax.random.key(0), (3, 5, 64), jnp.float32) * 3
  norm = RMSNorm(64, eps=1e-6)
  norm.weight[...] = jnp.linspace(0.5, 1.5, 64)
  x64 = np.asarray(x, np.float64)
  want = np.linspace(0.5, 1.5, 64) * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(norm(x), want, rtol=1e-5)
  assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_yarn_frequencies_and_scale_at_deepseek_v3():
  cfg = ModelConfig.from_hf(V3)
  inv_freq, multiplier = yarn_inv_freq(64, 10000.0, cfg.rope_scaling)
  plain = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
  # Dimensions turning more than beta_fast=32 times over 4096 positions keep their frequency
  # (index <= floor(10.47) = 10), fewer than beta_slow=1 times are divided by 40 (index >= 23).
  np.testing.assert_allclose(inv_freq[:11], plain[:11], rtol=1e-6)
  np.testing.assert_allclose(inv_freq[23:], plain[23:] / 40, rtol=1e-6)
  assert (np.diff(inv_freq) < 0).all() and multiplier == 1.0  # mscale == mscale_all_dim
  mscale = 0.1 * math.log(40) + 1
  assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)  # 0.1352...
  assert softmax_scale(ModelConfig.from_hf({**V3, "rope_scaling": None})) == pytest.approx(192 ** -0.5)


def test_rotary_is_deepseeks_complex_rotation_of_interleaved_pairs():
  cfg = ModelConfig.preset("tiny")
  rope = RotaryEmbedding(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 7, 3, cfg.qk_rope_head_dim), jnp.float32)
  positions = jnp.asarray(np.random.default_rng(0).integers(0, cfg.max_position_embeddings, (2, 7)))
  got = np.asarray(rope(x, positions))
  inv_freq, multiplier = yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
  xc = np.asarray(x[..., 0::2], np.float64) + 1j * np.asarray(x[..., 1::2], np.float64)
  angle = np.asarray(positions)[..., None, None] * inv_freq.astype(np.float64)
  want = xc * np.exp(1j * angle) * multiplier
  np.testing.assert_allclose(got[..., 0::2], want.real, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(got[..., 1::2], want.imag, rtol=2e-4, atol=2e-5)
  # Scores depend on the relative position only.
  q, k = x[0, 0, 0], x[0, 1, 0]
  score = lambda pq, pk: float(jnp.dot(rope(q[None, None], jnp.array([pq]))[0, 0],
                                       rope(k[None, None], jnp.array([pk]))[0, 0]))
  assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)
  assert apply_rotary(x.astype(jnp.bfloat16), rope.cos[positions], rope.sin[positions]).dtype == jnp.bfloat16
