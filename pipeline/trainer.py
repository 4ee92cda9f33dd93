"""Training a DeepSeek-V3 with a pipeline schedule on a `pp x ep` mesh: parameters, one jitted step, checkpoints.

The step is one `jax.shard_map` over the mesh. Every rank embeds its share of the batch (the
batch is split over `ep`), runs the pipeline (`pipeline_step`; stages are MoE layers whose
experts are split over `ep`; the output head and the MTP modules run in the loss), takes the
embedding's gradient from the pipeline's input gradients (plus MTP's use of it), clips the
gradients by their global norm (summed over the ranks that hold distinct parameters), and
applies AdamW with warmup and cosine decay (optax) to its own parameters. Norm weights and the
router's bias are not decayed. DualPipe holds every stage twice (once per direction): the two
copies' gradients are summed, so both take the same update.

Checkpoints go to `{dir}/step_{n:08d}/` with `trainer_state.json`, and `restore` continues
from the latest. In a local directory they are the model's own safetensors format
(`model.save_pretrained`, gathered to the host) with the optimizer state beside it
(`optimizer.safetensors`). At a URL (`3fs://HOST:PORT/...` for the storage cluster) they are
the sharded train state (`storage.checkpoint`), written by every process in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import fsspec
import safetensors.numpy
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import model as model_lib
from model.layers.linear import use_fp8_training
from model.tokenizer import ByteTokenizer
from model.weight_writer import host_value
from pipeline import schedules
from pipeline.executor import layout_params, pipeline_step
from pipeline.model_stages import Partition
from pipeline.plan import make_plan
from storage import checkpoint as storage_checkpoint

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
TRAIN_STATE = "train_state"  # storage.checkpoint of {params, opt_state}, in checkpoints at URLs


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  preset: str = "demo"
  pp: int = 1
  ep: int = 1
  schedule: str = "1f1b"
  chunks: int = 2  # micro-batches per step
  micro_batch: int = 8  # sequences per micro-batch (split over ep)
  seq_len: int = 128
  steps: int = 200
  lr: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # global gradient norm limit; 0 turns clipping off
  mtp_weight: float = 0.3  # DeepSeek-V3's MTP lambda; 0 leaves the MTP modules untrained
  fp8: bool = False  # attention and dense-MLP projections compute in FP8 (`model.layers.linear.use_fp8_training`)
  seed: int = 0

  def check(self) -> None:
    """ValueError naming the setting that cannot work (or two that conflict)."""
    if self.preset not in model_lib.PRESETS:
      raise ValueError(f"preset must be one of {sorted(model_lib.PRESETS)}, got {self.preset!r}")
    if self.schedule not in schedules.SCHEDULES:
      raise ValueError(f"schedule must be one of {sorted(schedules.SCHEDULES)}, got {self.schedule!r}")
    for name in ("pp", "ep", "chunks", "micro_batch", "seq_len", "steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.micro_batch % self.ep:
      raise ValueError(f"micro_batch={self.micro_batch} does not split over ep={self.ep}")
    schedules.SCHEDULES[self.schedule](self.pp, self.chunks)  # ValueError for a schedule these do not fit
    if self.pp * self.ep > jax.device_count():
      raise ValueError(f"pp x ep = {self.pp} x {self.ep} needs {self.pp * self.ep} devices, there are "
                       f"{jax.device_count()}")
    depths = model_lib.PRESETS[self.preset].num_nextn_predict_layers if self.mtp_weight else 0
    if self.seq_len <= depths:
      raise ValueError(f"seq_len={self.seq_len} leaves MTP depth {depths} no position to predict; "
                       f"use seq_len > {depths} or mtp_weight=0")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
    if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
      raise ValueError("lr must be > 0, min_lr_ratio in [0, 1] and weight_decay >= 0")
    for name in ("clip_norm", "mtp_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def learning_rate(config: TrainConfig) -> optax.Schedule:
  """Step -> learning rate: linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`."""
  # Warm-up starts above zero so that the first step is not wasted.
  return optax.warmup_cosine_decay_schedule(config.lr / (config.warmup_steps + 1), config.lr, config.warmup_steps,
                                            config.steps,
                                            end_value=config.lr * config.min_lr_ratio)


def _decayed(params):
  """Weight decay applies to matrices (kernels, experts, embeddings, the router), not to norm weights or the router's bias."""
  return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) not in ("weight", "bias"),
                                          params)


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return optax.adamw(learning_rate(config), b1=0.9, b2=0.95, weight_decay=config.weight_decay, mask=_decayed)


class Trainer:
  """Builds the model, the mesh and the step; holds the sharded parameters and optimizer state."""

  def __init__(self, config: TrainConfig, *, model: model_lib.DeepseekV3 | None = None):
    config.check()
    self.config = config
    self.schedule = schedules.SCHEDULES[config.schedule](config.pp, config.chunks)
    self.plan = make_plan(self.schedule)
    self.num_stages = len(self.schedule.directions[0])
    self.model = model or model_lib.DeepseekV3(model_lib.PRESETS[config.preset], rngs=nnx.Rngs(config.seed))
    if config.fp8:
      use_fp8_training(self.model)  # before the partition takes the layers' structure
    self.partition = Partition(self.model, self.num_stages, ep_axis="ep" if config.ep > 1 else None,
                               mtp=config.mtp_weight > 0)
    if config.ep > 1 and self.model.config.n_routed_experts % config.ep:
      raise ValueError(f"{self.model.config.n_routed_experts} experts do not split over ep={config.ep}")
    devices = jax.devices()[:config.pp * config.ep] if jax.process_count() == 1 else jax.devices()
    self.mesh = jax.make_mesh((config.pp, config.ep), ("pp", "ep"), axis_types=(AxisType.Auto,) * 2,
                              devices=devices)
    self.tx = optimizer(config)
    self.step_count = 0
    self._place(*self.partition.split(self.model))
    abstract = jax.eval_shape(self.tx.init, self.params)
    # The optimizer's moments lie like the parameters; its counters are replicated.
    self.opt_specs = optax.tree_map_params(self.tx, lambda _, spec: spec, abstract, self.param_specs,
                                           transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    self.opt_state = jax.jit(self.tx.init, out_shardings=jax.tree.map(
        lambda spec: NamedSharding(self.mesh, spec), self.opt_specs, is_leaf=lambda x: isinstance(x, P)))(self.params)
    self._step = None

  def _specs(self, params):
    def spec(path, leaf):
      names = [getattr(k, "key", None) for k in path]
      expert = names[-1] in ("w_gate", "w_up", "w_down") and self.config.ep > 1
      if names[0] == "stages":  # [pp, phases, layers_per_stage, E, ...]
        return P("pp", None, None, "ep") if expert else P("pp")
      return P("ep") if expert else P()  # the MTP modules' experts: [E, ...]
    return jax.tree_util.tree_map_with_path(spec, params)

  def _place(self, pre, stages, post) -> None:
    params = {"pre": pre, "stages": layout_params(self.plan, stages), "post": post}
    self.param_specs = self._specs(params)
    self.params = jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a), NamedSharding(self.mesh, s)), params,
                               self.param_specs)

  def _build_step(self):
    config, plan, part = self.config, self.plan, self.partition
    mirrored = config.schedule == "dualpipe"
    param_specs, opt_specs = self.param_specs, self.opt_specs
    loss_fn = functools.partial(part.loss_fn, batch=(config.chunks * config.micro_batch, config.seq_len),
                                mtp_weight=config.mtp_weight)

    def local(params, opt_state, windows):
      tokens = windows[..., :-1]  # windows: [chunks, micro_batch / ep, seq + 1]
      hidden, pre_vjp = jax.vjp(lambda pre: jax.vmap(lambda t: part.pre_fn(pre, t))(tokens), params["pre"])
      chunks = jax.tree.map(lambda a: a[0], params["stages"])
      loss_params = params["post"]
      if part.mtp and config.mtp_weight:  # MTP embeds the next tokens
        loss_params = dict(loss_params, embed=params["pre"]["embed"])
      out = pipeline_step(plan, part.stage_fn, loss_fn, chunks, hidden, windows, loss_params=loss_params,
                          has_aux=True, axis_name="pp")
      (pre_grads,) = pre_vjp(out.input_grads)
      post_grads = dict(out.loss_param_grads)
      if "embed" in post_grads:
        pre_grads = dict(pre_grads, embed=jax.tree.map(jnp.add, pre_grads["embed"], post_grads.pop("embed")))
      stage_grads = out.grads
      if mirrored:  # rank r's chunk 0 is the stage rank P-1-r holds as chunk 1: sum the copies
        perm = [(r, config.pp - 1 - r) for r in range(config.pp)]
        stage_grads = jax.tree.map(lambda g: g + jax.lax.ppermute(g[::-1], "pp", perm), stage_grads)
      grads = {"pre": pre_grads, "stages": jax.tree.map(lambda g: g[None], stage_grads), "post": post_grads}
      norm = _global_norm(grads, param_specs, copies={"stages": 2 if mirrored else 1})
      if config.clip_norm:
        scale = config.clip_norm / jnp.maximum(norm, config.clip_norm)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      shares = jax.lax.psum((out.losses.sum(), out.aux["main"].sum(), out.aux["mtp"].sum(0)), "ep")
      metrics = dict(zip(("loss", "main", "mtp"), shares), grad_norm=norm)
      return optax.apply_updates(params, updates), opt_state, metrics

    windows_spec = P(None, "ep")  # also with ep = 1: the batch's types then vary over ep like the pipeline's buffers
    mapped = jax.shard_map(local, mesh=self.mesh, in_specs=(param_specs, opt_specs, windows_spec),
                           out_specs=(param_specs, opt_specs, P()))
    return jax.jit(mapped, donate_argnums=(0, 1)), windows_spec

  def step(self, windows: np.ndarray) -> dict:
    """One optimizer step on `[chunks * micro_batch, seq_len + 1]` token windows.

    Returns host floats: `loss` (main + mtp_weight * mean MTP), `main` (next-token cross
    entropy), `mtp` (a list, per MTP depth; empty without MTP), `grad_norm` (before clipping)
    and `lr` (the learning rate this step used).
    """
    c = self.config
    windows = np.asarray(windows, np.int32)
    if windows.shape != (c.chunks * c.micro_batch, c.seq_len + 1):
      raise ValueError(f"windows must be [chunks * micro_batch, seq_len + 1] = "
                       f"{[c.chunks * c.micro_batch, c.seq_len + 1]}, got {list(windows.shape)}")
    windows = windows.reshape(c.chunks, c.micro_batch, c.seq_len + 1)
    if self._step is None:
      self._step, self._windows_spec = self._build_step()
    placed = jax.device_put(windows, NamedSharding(self.mesh, self._windows_spec))
    lr = float(learning_rate(c)(self.step_count))
    self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, placed)
    self.step_count += 1
    metrics = jax.device_get(metrics)
    return {"loss": float(metrics["loss"]), "main": float(metrics["main"]),
            "mtp": [float(v) for v in metrics["mtp"]], "grad_norm": float(metrics["grad_norm"]), "lr": lr}

  def model_with_params(self) -> model_lib.DeepseekV3:
    """The model with the trained parameters (gathered to the host)."""
    host = jax.tree.map(host_value, self.params)
    stages = _stage_params(self.plan, host["stages"], self.num_stages)
    self.partition.merge(self.model, host["pre"], stages, host["post"])
    return self.model

  def save(self, directory: str) -> str:
    """Writes `{directory}/step_{n:08d}` (model, optimizer, trainer state); returns its path.

    A local directory gets the model's safetensors format (what serving loads). A URL
    (`3fs://HOST:PORT/...`, or any fsspec URL) gets the sharded train state instead
    (`storage.checkpoint`: each process writes its own shards, nothing is gathered).
    """
    if _is_url(directory):
      return self._save_sharded(directory)
    path = os.path.join(directory, f"step_{self.step_count:08d}")
    model_lib.save_pretrained(self.model_with_params(), path, overwrite=True)
    leaves = jax.tree.leaves(self.opt_state)
    host = [np.ascontiguousarray(host_value(leaf)) for leaf in leaves]
    if jax.process_index() == 0:
      safetensors.numpy.save_file({f"{i:05d}": a for i, a in enumerate(host)}, os.path.join(path, OPTIMIZER))
      ByteTokenizer().save_pretrained(path)  # the corpus is byte-tokenized: serving reads this
      with open(os.path.join(path, STATE), "w") as f:
        json.dump(self._state(), f, indent=2)
    return path

  def _state(self) -> dict:
    return {"step": self.step_count, "config": dataclasses.asdict(self.config)}

  def _save_sharded(self, directory: str) -> str:
    path = f"{directory.rstrip('/')}/step_{self.step_count:08d}"
    storage_checkpoint.save({"params": self.params, "opt_state": self.opt_state}, f"{path}/{TRAIN_STATE}")
    if jax.process_index() == 0:  # last: a step directory with this file is complete
      fs, root = fsspec.core.url_to_fs(path)
      fs.pipe_file(f"{root}/{STATE}", json.dumps(self._state(), indent=2).encode())
    return path

  def restore(self, directory: str) -> int:
    """Continues from the latest `step_*` in `directory` (0 if there is none); returns its step."""
    latest = latest_checkpoint(directory)
    if latest is None:
      return 0
    fs, root = fsspec.core.url_to_fs(latest)
    saved = json.loads(fs.cat_file(f"{root}/{STATE}"))
    if _is_url(directory):  # the sharded train state, straight onto this mesh
      state = storage_checkpoint.restore(f"{latest}/{TRAIN_STATE}", {"params": self.params, "opt_state": self.opt_state})
      self.params, self.opt_state = state["params"], state["opt_state"]
      self.step_count = int(saved["step"])
      return self.step_count
    loaded = model_lib.from_pretrained(latest, dtype=jnp.float32, mtp=self.model.config.num_nextn_predict_layers > 0)
    if self.config.fp8:
      use_fp8_training(loaded)  # like the model it replaces
    self._place(*self.partition.split(loaded))
    self.model = loaded
    arrays = safetensors.numpy.load_file(os.path.join(latest, OPTIMIZER))
    leaves, treedef = jax.tree.flatten(self.opt_state)
    if len(arrays) != len(leaves):
      raise ValueError(f"{latest}/{OPTIMIZER} holds {len(arrays)} tensors, this optimizer has {len(leaves)}")
    restored = [jax.device_put(arrays[f"{i:05d}"].astype(leaf.dtype), leaf.sharding) for i, leaf in enumerate(leaves)]
    self.opt_state = jax.tree.unflatten(treedef, restored)
    self.step_count = int(saved["step"])
    self._step = None
    return self.step_count


def _is_url(directory: str) -> bool:
  return "://" in directory


def latest_checkpoint(directory: str) -> str | None:
  """The `step_*` subdirectory (a local path or a URL, like `directory`) with the highest step that holds a complete trainer state, or None."""
  if _is_url(directory):
    fs, root = fsspec.core.url_to_fs(directory)
  else:  # a plain path, even one that fsspec would read as a chained URL ("a::b")
    fs, root = fsspec.filesystem("file"), os.path.abspath(directory)
  if not fs.isdir(root):
    return None
  steps = []
  for entry in fs.ls(root, detail=False):
    name = entry.rstrip("/").rsplit("/", 1)[-1]
    if re.fullmatch(r"step_(\d+)", name) and fs.exists(f"{root.rstrip('/')}/{name}/{STATE}"):
      steps.append((int(name[len("step_"):]), name))
  if not steps:
    return None
  name = max(steps)[1]
  return f"{directory.rstrip('/')}/{name}" if _is_url(directory) else os.path.join(directory, name)


def _stage_params(plan, rank_params, num_stages: int):
  """Per-rank chunks `[pp, phases, ...]` -> per-stage `[num_stages, ...]` (one copy of each)."""
  owner = {}
  for stages in plan.schedule.directions:
    for s, (r, phase) in enumerate(stages):
      owner.setdefault(s, (r, phase))
  return jax.tree.map(lambda a: np.stack([a[owner[s][0], owner[s][1]] for s in range(num_stages)]), rank_params)


def _global_norm(grads, specs, *, copies: dict[str, int]) -> jax.Array:
  """The L2 norm of every distinct parameter's gradient (inside shard_map): squares summed over the mesh axes each is sharded on.

  `copies[part]` counts how many ranks hold each of that part's parameters along a sharded axis
  (DualPipe's two copies of a stage), so they are counted once. One psum per set of axes.
  """
  by_axes: dict[tuple[str, ...], jax.Array] = {}
  for part, part_grads in grads.items():
    specs_flat = jax.tree.leaves(specs[part], is_leaf=lambda x: isinstance(x, P))
    for g, spec in zip(jax.tree.leaves(part_grads), specs_flat, strict=True):
      axes = tuple(a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,)))
      square = jnp.sum(jnp.square(g.astype(jnp.float32))) / copies.get(part, 1)
      by_axes[axes] = by_axes.get(axes, jnp.float32(0)) + square
  total = sum(jax.lax.psum(square, axes) if axes else square for axes, square in by_axes.items())
  return jnp.sqrt(total)
