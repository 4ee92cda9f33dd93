"""Against an independent implementation: Hugging Face transformers' DeepseekV3 (CPU torch), both ways, in f32.

A tiny random transformers model is saved with its own `save_pretrained`, loaded here, and the
logits on a batch of prompts compared; then this model's `save_pretrained` output is loaded by
transformers and compared the same way. Weights are drawn at unit scale (not transformers'
0.02 init), so attention, routing and every norm weight matter to the logits.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import model

torch = pytest.importorskip("torch", reason="the test extra's CPU torch is not installed (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers (the test extra) is not installed")

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24,
            qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
            norm_topk_prob=True, max_position_embeddings=256,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
VARIANTS = {
    "v3": {},
    "no_q_lora": {"q_lora_rank": None},  # V2-Lite's q projection
    "rope_halves": {"rope_interleave": False},  # rotate_half pairs
    "no_yarn": {"rope_scaling": None, "rope_theta": 5000.0},
}


def _random_hf_model(overrides, seed=0):
  config = transformers.DeepseekV3Config(**{**BASE, **overrides})
  torch.manual_seed(seed)
  net = transformers.DeepseekV3ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    for name, b in net.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.2 * torch.rand_like(b))  # the bias changes which experts win, not their weights
  return net


def _prompts(seed, batch=3, length=40):
  return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (batch, length))


def _hf_logits(net, tokens):
  with torch.no_grad():
    return net(torch.tensor(tokens)).logits.float().numpy()


def _assert_close(got, want):
  # rtol ~1e-4 relative to the logits' scale; measured differences are ~1e-6 of it.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_checkpoint_loads_with_equal_logits(variant, tmp_path):
  net = _random_hf_model(VARIANTS[variant])
  net.save_pretrained(tmp_path / "hf")
  ours = model.from_pretrained(tmp_path / "hf", dtype=jnp.float32)  # transformers saves no MTP layers
  assert ours.config.rope_interleave == VARIANTS[variant].get("rope_interleave", True)
  tokens = _prompts(1)
  _assert_close(np.asarray(ours(jnp.asarray(tokens, jnp.int32))), _hf_logits(net, tokens))


def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
  ours = model.from_pretrained(_saved(tmp_path), dtype=jnp.float32)
  model.save_pretrained(ours, tmp_path / "ours")
  theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
  tokens = _prompts(2, batch=2, length=64)
  _assert_close(_hf_logits(theirs, tokens), np.asarray(ours(jnp.asarray(tokens, jnp.int32))))


def _saved(tmp_path):
  net = _random_hf_model({}, seed=3)
  net.save_pretrained(tmp_path / "hf")
  return tmp_path / "hf"


def test_bf16_checkpoint_as_published_loads_with_equal_logits(tmp_path):
  # DeepSeek's and transformers' published checkpoints store BF16: read through safetensors' numpy BF16.
  net = _random_hf_model({}, seed=5).to(torch.bfloat16)
  net.save_pretrained(tmp_path / "bf16")
  # The reference: transformers' own load of the bf16 files, in f32 (a fresh model, so its rotary
  # tables are not the bf16-rounded buffers of `net`).
  net = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
  ours = model.from_pretrained(tmp_path / "bf16", dtype=jnp.float32)
  tokens = _prompts(4)
  _assert_close(np.asarray(ours(jnp.asarray(tokens, jnp.int32))), _hf_logits(net, tokens))
  assert ours.layers[1].mlp.w_up[...].dtype == jnp.float32
