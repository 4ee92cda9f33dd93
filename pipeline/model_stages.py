"""DeepSeek-V3 cut for the pipeline: embedding and dense layers before it, MoE layers as stages, head in the loss.

Pipeline stages must be alike (the executor stacks their parameters), so:
- *pre* (run on every pipeline rank, before the pipeline): the embedding and the first
  `first_k_dense_replace` dense layers; its gradient comes from the executor's input gradients;
- *stages*: the MoE layers, `layers_per_stage` each, dispatching over `ep` inside;
- *post* (the executor's loss parameters): the final norm, the output head and the MTP
  modules; the loss also reads the embedding (MTP embeds the next tokens), so the trainer
  passes it in with `post` and adds its gradient to the embedding's.
The MTP modules run in the loss, on the ranks holding a last stage, as DeepSeek-V3 places them
with the output head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.config import ModelConfig
from model.transformer import DeepseekV3


class Partition:
  """How one `DeepseekV3` splits into pre / `num_stages` stages / post, as pure parameter dicts.

  Args:
    model: the model (its structure is used; `split` reads its values).
    num_stages: pipeline stages; the MoE layers must split evenly into them.
    ep_axis: the mesh axis the experts are sharded over inside stages, or None.
    mtp: train the MTP modules (they join `post`); otherwise they are left out and unchanged.
  """

  def __init__(self, model: DeepseekV3, num_stages: int, *, ep_axis: str | None = "ep", mtp: bool = True):
    config: ModelConfig = model.config
    dense = config.first_k_dense_replace if config.n_routed_experts is not None else config.num_hidden_layers
    moe = config.num_hidden_layers - dense
    if any(not config.is_moe_layer(i) for i in range(dense, config.num_hidden_layers)):
      raise ValueError("pipeline stages need identical layers: moe_layer_freq must be 1")
    if moe == 0 or moe % num_stages:
      raise ValueError(f"{moe} MoE layers do not split into {num_stages} pipeline stages")
    self.config, self.num_stages, self.dense, self.per_stage, self.ep_axis = config, num_stages, dense, \
        moe // num_stages, ep_axis
    self.layer_def, _ = nnx.split(model.layers[dense])
    self.dense_def = nnx.split(model.layers[0])[0] if dense else None
    self.embed_def = nnx.split(model.embed_tokens)[0]
    self.norm_def = nnx.split(model.norm)[0]
    self.head_def = None if model.lm_head is None else nnx.split(model.lm_head)[0]
    self.mtp = mtp and len(model.mtp) > 0
    self.mtp_def = nnx.split(model.mtp[0])[0] if self.mtp else None

  def split(self, model: DeepseekV3):
    """`(pre, stages, post)`: stages' leaves are `[num_stages, layers_per_stage, ...]`."""
    state = lambda m: nnx.to_pure_dict(nnx.state(m))
    pre = {"embed": state(model.embed_tokens), "dense": [state(model.layers[i]) for i in range(self.dense)]}
    layers = [state(model.layers[i]) for i in range(self.dense, self.config.num_hidden_layers)]
    stack = lambda items: jax.tree.map(lambda *a: jnp.stack(a), *items)
    stages = stack([stack(layers[s * self.per_stage:(s + 1) * self.per_stage]) for s in range(self.num_stages)])
    post = {"norm": state(model.norm), "head": None if model.lm_head is None else state(model.lm_head),
            "mtp": [state(module) for module in model.mtp] if self.mtp else []}
    return pre, stages, post

  def merge(self, model: DeepseekV3, pre, stages, post) -> None:
    """Writes the parts back into `model` (host values; the inverse of `split`)."""
    nnx.update(model.embed_tokens, pre["embed"])
    for i, layer in enumerate(pre["dense"]):
      nnx.update(model.layers[i], layer)
    for s in range(self.num_stages):
      for j in range(self.per_stage):
        nnx.update(model.layers[self.dense + s * self.per_stage + j], jax.tree.map(lambda a: a[s, j], stages))
    nnx.update(model.norm, post["norm"])
    if model.lm_head is not None:
      nnx.update(model.lm_head, post["head"])
    for module, values in zip(model.mtp, post["mtp"]):
      nnx.update(module, values)

  def pre_fn(self, pre, tokens):
    """`tokens [b, s]` -> hidden `[b, s, H]` (embedding, then the dense layers)."""
    x = nnx.merge(self.embed_def, pre["embed"])(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for layer in pre["dense"]:
      x, _ = nnx.merge(self.dense_def, layer)(x, positions)
    return x

  def stage_fn(self, stage, x):
    """One pipeline stage: `layers_per_stage` MoE decoder layers on `[b, s, H]`."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    kwargs = {} if self.ep_axis is None else {"axis_name": self.ep_axis}
    for j in range(self.per_stage):
      x, _ = nnx.merge(self.layer_def, jax.tree.map(lambda a: a[j], stage))(x, positions, moe_kwargs=kwargs)
    return x

  def loss_fn(self, post, hidden, window, *, batch: tuple[int, int], mtp_weight: float = 0.0):
    """One micro-batch's share of the step's loss, and its parts (float32).

    Args:
      post: `split`'s post plus `"embed"` (the embedding's params, read by MTP).
      hidden: `[b, s, H]` the last stage's output.
      window: `[b, s + 1]` int32 token windows: inputs `window[:, :-1]`, targets `window[:, 1:]`.
      batch: `(sequences, seq_len)` of the whole step (every micro-batch and ep rank): each
        loss is a sum over this micro-batch's positions divided by the step's count, so the
        shares add up to the step's means.
      mtp_weight: DeepSeek-V3's lambda; the loss is `main + mtp_weight * mean_k mtp_k`.

    Returns:
      `(loss, {"main": [], "mtp": [D]})`, each the micro-batch's share.
    """
    if post["head"] is None:
      raise ValueError("tied embeddings are not supported by the pipeline cut yet")
    sequences, s = batch

    def cross_entropy(h, norm, shift):  # position i predicts window[:, i + shift]; s + 1 - shift positions
      valid = s + 1 - shift
      normed = nnx.merge(self.norm_def, norm)(h[:, :valid])  # every RMSNorm of width H is alike
      logits = nnx.merge(self.head_def, post["head"])(normed).astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, window[:, shift:])
      return ce.sum() / (sequences * valid)

    main = cross_entropy(hidden, post["norm"], 1)
    mtp = []
    if mtp_weight and post["mtp"]:
      embed = nnx.merge(self.embed_def, post["embed"])
      positions = jnp.broadcast_to(jnp.arange(s), hidden.shape[:2])
      kwargs = {} if self.ep_axis is None else {"axis_name": self.ep_axis}
      for k, values in enumerate(post["mtp"], start=1):
        # Depth k at position i: h^{k-1}_i with the embedding of token i + k; predicts token i + k + 1.
        module = nnx.merge(self.mtp_def, values)
        next_embeds = embed(jnp.pad(window[:, k:], ((0, 0), (0, k - 1))))  # [b, s, H], past the end padded
        hidden, _ = module(hidden, next_embeds, positions, moe_kwargs=kwargs)
        mtp.append(cross_entropy(hidden, values["shared_head_norm"], k + 1))
    mtp = jnp.stack(mtp) if mtp else jnp.zeros((0,), jnp.float32)
    loss = main + (mtp_weight * mtp.mean() if mtp.size else 0.0)
    return loss, {"main": main, "mtp": mtp}
