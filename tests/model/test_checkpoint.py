"""model.from_pretrained / save_pretrained on DeepSeek's safetensors format: round trips, bf16, FP8, a mesh, bad files."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import expert_parallel as ep
import fp8
import model
from model import hf_names, weight_reader
from model.safetensors_files import CheckpointFiles, read_header

CFG = model.ModelConfig.preset("tiny")
L = CFG.num_hidden_layers


@pytest.fixture(scope="module")
def net():
  return model.DeepseekV3(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def saved(net, tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  model.save_pretrained(net, path, max_shard_bytes=1_500_000)  # several shards
  return path


def _tokens(seed, shape=(2, 24)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size, jnp.int32)


def _flat(m):
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(m))}


def _weight_map(path):
  return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def test_round_trip_is_bitwise_and_in_deepseeks_layout(net, saved):
  weight_map = _weight_map(saved)
  assert len(set(weight_map.values())) > 1  # sharded
  files = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))
  assert files == sorted(set(weight_map.values()))
  # DeepSeek's names and layouts: Linear weights [out, in], experts one tensor each, MTP at layer L.
  with CheckpointFiles(saved) as ckpt:
    q_b = ckpt.read("model.layers.1.self_attn.q_b_proj.weight")
    np.testing.assert_array_equal(q_b, np.asarray(net.layers[1].self_attn.q_b_proj.kernel[...]).T)
    np.testing.assert_array_equal(ckpt.read("model.layers.2.mlp.experts.5.down_proj.weight"),
                                  np.asarray(net.layers[2].mlp.w_down[...][5]))
    np.testing.assert_array_equal(ckpt.read(f"model.layers.{L}.embed_tokens.weight"),
                                  np.asarray(net.embed_tokens.embedding[...]))
    np.testing.assert_array_equal(ckpt.read(f"model.layers.{L}.shared_head.head.weight"),
                                  np.asarray(net.lm_head.kernel[...]).T)
    assert f"model.layers.{L}.eh_proj.weight" in ckpt and f"model.layers.{L}.mlp.gate.e_score_correction_bias" in ckpt
  assert model.ModelConfig.from_hf(saved) == CFG
  loaded = model.from_pretrained(saved, dtype=jnp.float32)
  want, got = _flat(net), _flat(loaded)
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  tokens = _tokens(1)
  np.testing.assert_array_equal(loaded(tokens), net(tokens))
  np.testing.assert_array_equal(loaded.loss(tokens).loss, net.loss(tokens).loss)


def test_bf16_load_rounds_each_weight(net, saved):
  loaded = model.from_pretrained(saved, dtype=jnp.bfloat16)
  want, got = _flat(net), _flat(loaded)
  for path in want:
    expected_dtype = np.float32 if path[-1] == "bias" else ml_dtypes.bfloat16  # the score bias stays f32
    assert got[path].dtype == expected_dtype, path
    np.testing.assert_array_equal(got[path], want[path].astype(expected_dtype), err_msg=str(path))
  assert loaded(_tokens(2)).dtype == jnp.float32


def test_mesh_places_experts_over_ep_and_reads_each_tensor_once(net, saved, monkeypatch):
  reads = []
  original = CheckpointFiles.read
  monkeypatch.setattr(CheckpointFiles, "read", lambda self, name, index=None: reads.append(name) or
                      original(self, name, index))
  mesh = jax.make_mesh((2, 4), ("dp", "ep"), axis_types=(AxisType.Auto,) * 2)
  loaded = model.from_pretrained(saved, dtype=jnp.float32, mesh=mesh)
  w_up = loaded.layers[1].mlp.w_up[...]
  assert w_up.sharding.spec == P("ep") and loaded.layers[1].mlp.gate[...].sharding.spec == P()
  for shard in w_up.addressable_shards:  # device shard i holds experts [2i, 2i + 2) of its ep rank
    experts = range(*shard.index[0].indices(CFG.n_routed_experts))
    assert len(experts) == 2
    np.testing.assert_array_equal(shard.data, np.asarray(net.layers[1].mlp.w_up[...])[shard.index])
  # Replicated tensors are read once for all 8 devices, each expert once for its 2 devices.
  assert len(reads) == len(set(reads))
  tokens = _tokens(3)
  np.testing.assert_allclose(loaded(tokens), net(tokens), rtol=1e-5, atol=1e-5)
  moved = model.DeepseekV3(CFG, rngs=nnx.Rngs(0))
  model.shard_model(moved, mesh)
  assert moved.layers[2].mlp.w_down[...].sharding.spec == P("ep")


def test_fp8_checkpoint_holds_deepseeks_format_and_loads_dequantized(net, tmp_path):
  path = tmp_path / "fp8"
  model.save_pretrained(net, path, fp8=True)
  config = json.loads((path / "config.json").read_text())
  assert config["quantization_config"]["weight_block_size"] == [128, 128]
  headers = {}
  for file in set(_weight_map(path).values()):
    headers.update(read_header(str(path / file)))
  quantized = {n for n in headers if hf_names.is_quantizable(n)}
  assert "model.layers.0.self_attn.kv_b_proj.weight" in quantized
  assert "model.layers.1.mlp.experts.7.up_proj.weight" in quantized and "model.layers.0.mlp.down_proj.weight" in quantized
  for name, info in headers.items():
    if name in quantized:
      assert info.dtype == "F8_E4M3", name
      scale = headers[name + "_scale_inv"]
      assert scale.dtype == "F32" and scale.shape == tuple(-(-n // 128) for n in info.shape)
    elif not name.endswith("_scale_inv"):
      assert info.dtype == "F32", name  # embeddings, norms, the gate, heads, eh_proj stay
  loaded = model.from_pretrained(path, dtype=jnp.float32)
  kernel = np.asarray(net.layers[1].self_attn.kv_b_proj.kernel[...])
  np.testing.assert_array_equal(loaded.layers[1].self_attn.kv_b_proj.kernel[...],
                                np.asarray(fp8.dequantize(*fp8.quantize_per_block(kernel.T))).T)
  experts = net.layers[3].mlp.w_gate[...]
  np.testing.assert_array_equal(loaded.layers[3].mlp.w_gate[...], fp8.dequantize(*fp8.quantize_per_block(experts)))
  np.testing.assert_array_equal(loaded.embed_tokens.embedding[...], net.embed_tokens.embedding[...])


def test_fp8_slices_dequantize_across_block_edges(tmp_path):
  weight = np.random.default_rng(0).normal(size=(300, 260)).astype(np.float32)
  data, scale = (np.asarray(a) for a in fp8.quantize_per_block(weight))
  name = "model.layers.0.mlp.down_proj.weight"
  _write_fp8(tmp_path / "model.safetensors", {name: data, name + "_scale_inv": scale})
  full = np.asarray(fp8.dequantize(data, scale))
  with CheckpointFiles(tmp_path) as files:
    for rows, cols in [(slice(0, 300), slice(0, 260)), (slice(100, 300), slice(5, 200)), (slice(127, 129), slice(255, 260))]:
      for dtype in (np.float32, ml_dtypes.bfloat16):
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), dtype)
        weight_reader._read_into(out, files, name, (rows, cols))
        np.testing.assert_array_equal(out, full[rows, cols].astype(dtype))


def _write_fp8(file, arrays):
  specs = {name: safetensors.TensorSpec(dtype=a.dtype.name, shape=a.shape, data_ptr=a.ctypes.data,
                                        data_len=a.nbytes) for name, a in arrays.items()}
  safetensors.serialize_file(specs, str(file), {"format": "pt"})


def test_checkpoint_without_mtp_layers(net, saved, tmp_path, caplog):
  path = tmp_path / "no_mtp"
  path.mkdir()
  weight_map = {n: f for n, f in _weight_map(saved).items() if not n.startswith(f"model.layers.{L}.")}
  for file in set(weight_map.values()):
    os.symlink(saved / file, path / file)
  (path / "config.json").write_text((saved / "config.json").read_text())
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  loaded = model.from_pretrained(path, dtype=jnp.float32)  # transformers' checkpoints carry no MTP
  assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
  np.testing.assert_array_equal(loaded(_tokens(4)), net(_tokens(4)))
  with pytest.raises(ValueError, match=rf"tensor model\.layers\.{L}\.\S+ is missing"):
    model.from_pretrained(path, dtype=jnp.float32, mtp=True)
  with caplog.at_level("WARNING"):
    assert len(model.from_pretrained(saved, dtype=jnp.float32, mtp=False).mtp) == 0
  unused = sum(1 for n in _weight_map(saved) if n.startswith(f"model.layers.{L}."))
  assert f"{unused} checkpoint tensors are not part of this model" in caplog.text  # said, not dropped silently
  with pytest.raises(ValueError, match="mtp must be"):
    model.from_pretrained(saved, mtp="yes")


def _copy_with(saved, dst, edit):
  """A copy of the checkpoint whose shard holding the edited tensor is rewritten by `edit(tensors)`."""
  dst.mkdir()
  weight_map = _weight_map(saved)
  for file in set(weight_map.values()):
    tensors = safetensors.numpy.load_file(str(saved / file))
    changed = edit(dict(tensors))
    if changed is None:
      os.symlink(saved / file, dst / file)
    else:
      safetensors.numpy.save_file(changed, str(dst / file), metadata={"format": "pt"})
  for name in ("config.json", "model.safetensors.index.json"):
    (dst / name).write_text((saved / name).read_text())
  return weight_map


TARGET = "model.layers.2.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("case, edit, message", [
    ("missing", lambda t: {k: v for k, v in t.items() if k != TARGET} if TARGET in t else None,
     "is missing from"),
    ("shape", lambda t: {**t, TARGET: t[TARGET][:-1]} if TARGET in t else None, r"has shape \(255, 128\)"),
    ("dtype", lambda t: {**t, TARGET: t[TARGET].astype(np.int32)} if TARGET in t else None, "has dtype I32"),
])
def test_bad_tensor_names_tensor_and_file(saved, tmp_path, case, edit, message):
  weight_map = _copy_with(saved, tmp_path / case, edit)
  with pytest.raises(ValueError, match=message) as err:
    model.from_pretrained(tmp_path / case)
  assert TARGET in str(err.value) and weight_map[TARGET] in str(err.value)


def test_corrupt_fp8_header_names_tensor_and_file(tmp_path):
  name = "model.layers.0.mlp.down_proj.weight"
  data, scale = (np.asarray(a) for a in fp8.quantize_per_block(np.ones((256, 128), np.float32)))
  _write_fp8(tmp_path / "model.safetensors", {name: data, name + "_scale_inv": scale})
  raw = (tmp_path / "model.safetensors").read_bytes()
  assert raw.count(b'"shape":[256,128]') == 1
  (tmp_path / "model.safetensors").write_bytes(raw.replace(b'"shape":[256,128]', b'"shape":[256,129]'))  # > its bytes
  with pytest.raises(ValueError, match=f"tensor {name} in .*model.safetensors has a corrupt header entry"):
    CheckpointFiles(tmp_path)


def test_truncated_file_and_unlisted_tensor_are_named(saved, tmp_path):
  path = tmp_path / "cut"
  weight_map = _copy_with(saved, path, lambda t: None)
  file = weight_map[TARGET]
  (path / file).unlink()
  data = (saved / file).read_bytes()
  name = max(read_header(str(saved / file)).items(), key=lambda item: item[1].end)[0]  # the last tensor
  (path / file).write_bytes(data[:-100])
  with pytest.raises(ValueError, match=f"tensor {name} in .*{file} is truncated.*1 tensor"):
    model.from_pretrained(path)
  (path / file).write_bytes(data[:20])  # cut inside the header
  with pytest.raises(ValueError, match=f"{file} is truncated"):
    model.from_pretrained(path)
  (path / file).unlink()
  with pytest.raises(ValueError, match=f"tensor .* is missing: .*index.json puts it in .*{file}, which does not exist"):
    model.from_pretrained(path)
  index = {n: f for n, f in weight_map.items() if n != "model.norm.weight"}
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
  (path / file).write_bytes(data)
  with pytest.raises(ValueError, match="tensor model.norm.weight is missing: .*index.json does not list it"):
    model.from_pretrained(path)


def test_save_replaces_atomically_keeping_other_files(net, tmp_path):
  path = tmp_path / "ckpt"
  model.save_pretrained(net, path, max_shard_bytes=4_000_000)
  (path / "tokenizer.json").write_text("{}")
  other = model.DeepseekV3(CFG, rngs=nnx.Rngs(1))
  model.save_pretrained(other, path, overwrite=True)  # one shard now: the old shard files must not linger
  assert (path / "tokenizer.json").read_text() == "{}"
  assert sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) == ["model-00001-of-00001.safetensors"]
  np.testing.assert_array_equal(model.from_pretrained(path, dtype=jnp.float32).norm.weight[...],
                                other.norm.weight[...])
  assert os.stat(path).st_mode & 0o055 == 0o055 & ~_umask()  # group and others may read it (mkdtemp's is 0700)
  for entry in os.listdir(path):  # and its files (safetensors creates them 0600)
    assert os.stat(path / entry).st_mode & 0o044 == 0o044 & ~_umask(), entry
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging or old directory left


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_save_refuses_to_clobber_and_rejects_other_quantizations(net, saved, tmp_path):
  with pytest.raises(ValueError, match="not empty"):
    model.save_pretrained(net, saved)
  path = tmp_path / "int4"
  _copy_with(saved, path, lambda t: None)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
  with pytest.raises(ValueError, match="quantization_config"):
    model.from_pretrained(path)
  assert not [p for p in os.listdir(saved.parent) if ".partial-" in p]  # no staging directory left behind


def test_fp8_weights_stay_as_stored_and_run_fp8_gemms(net, tmp_path):
  path = tmp_path / "fp8"
  model.save_pretrained(net, path, fp8=True)
  keep = model.from_pretrained(path, dtype=jnp.float32, fp8_weights=True)
  deq = model.from_pretrained(path, dtype=jnp.float32)
  with CheckpointFiles(path) as files:  # the stored bytes and scales, untouched
    name = "model.layers.1.self_attn.q_b_proj.weight"
    np.testing.assert_array_equal(keep.layers[1].self_attn.q_b_proj.weight[...], files.read(name))
    np.testing.assert_array_equal(keep.layers[1].self_attn.q_b_proj.weight_scale_inv[...],
                                  files.read(name + "_scale_inv"))
    np.testing.assert_array_equal(keep.layers[2].mlp.w_down_scale_inv[...][6],
                                  files.read("model.layers.2.mlp.experts.6.down_proj.weight_scale_inv"))
  # An FP8 projection is x, quantized per token, times the stored weight: equal to the float
  # product of both dequantized, up to f32 summation order.
  x = jax.random.normal(jax.random.key(5), (3, 7, CFG.q_lora_rank), jnp.float32)
  layer = keep.layers[1].self_attn.q_b_proj
  x_dq = fp8.dequantize(*fp8.quantize_per_token(x.reshape(-1, x.shape[-1]))).reshape(x.shape)
  np.testing.assert_allclose(layer(x), x_dq @ deq.layers[1].self_attn.q_b_proj.kernel[...], rtol=1e-5, atol=1e-5)
  # Layers with stored FP8 weights differ from dequantized ones only by activation quantization.
  hidden = jax.random.normal(jax.random.key(6), (2, 16, CFG.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  for i in (0, 2):
    want, _ = deq.layers[i](hidden, positions)
    got, _ = keep.layers[i](hidden, positions)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05, i
  # Saving writes them back byte for byte; a float checkpoint cannot feed FP8 layers.
  model.save_pretrained(keep, tmp_path / "again")
  assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
  for file in set(_weight_map(path).values()):
    assert (tmp_path / "again" / file).read_bytes() == (path / file).read_bytes()
  model.save_pretrained(net, tmp_path / "float")
  with pytest.raises(ValueError, match="fp8_weights=True needs an FP8 checkpoint"):
    model.from_pretrained(tmp_path / "float", fp8_weights=True)
  # On an ep mesh the block scales go with their experts.
  mesh = jax.make_mesh((8,), ("ep",), axis_types=(AxisType.Auto,))
  placed = model.from_pretrained(path, dtype=jnp.float32, fp8_weights=True, mesh=mesh)
  scales = placed.layers[1].mlp.w_up_scale_inv[...]
  assert scales.sharding.spec == P("ep") and placed.layers[1].mlp.w_up[...].sharding.spec == P("ep")
  for shard in scales.addressable_shards:
    np.testing.assert_array_equal(shard.data, np.asarray(keep.layers[1].mlp.w_up_scale_inv[...])[shard.index])


def test_fp8_weights_with_sizes_the_expert_gemms_cannot_take():
  config = model.ModelConfig.from_hf({**CFG.to_hf(), "moe_intermediate_size": 96})
  net = model.DeepseekV3(config, rngs=nnx.Rngs(0), fp8_weights=True)
  layer = net.layers[1]
  assert not layer.fp8_experts_fit
  x = jax.random.normal(jax.random.key(2), (2, 5, CFG.hidden_size), jnp.float32)
  out, _ = layer.feed_forward(x, {})  # ragged_dot on the dequantized experts, not the FP8 GEMMs (which raise)
  params = layer.mlp.params()
  dense = {k: (fp8.dequantize(v, params[k + "_scale_inv"]) if k + "_scale_inv" in params else v)
           for k, v in params.items() if not k.endswith("_scale_inv")}
  want = ep.moe_forward(dense, x.reshape(-1, CFG.hidden_size), layer.mlp.config).out
  # Only the shared experts' FP8 GEMM (its per-token activation quantization) differs.
  assert fp8.calc_diff(out.reshape(-1, CFG.hidden_size), want) < 3e-3
  assert np.isfinite(np.asarray(net(_tokens(7)))).all()
