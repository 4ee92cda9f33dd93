"""ExpertLoad and count_expert_tokens, eager and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from balancer import ExpertLoad, count_expert_tokens


def test_count_expert_tokens_matches_bincount_and_skips_minus_one():
  rng = np.random.default_rng(0)
  topk_idx = rng.integers(-1, 6, size=(3, 50, 4))
  expected = np.stack([np.bincount(layer[layer >= 0], minlength=6) for layer in topk_idx])
  np.testing.assert_array_equal(count_expert_tokens(topk_idx, 6), expected)
  np.testing.assert_array_equal(jax.jit(count_expert_tokens, static_argnums=1)(topk_idx, 6), expected)
  np.testing.assert_array_equal(count_expert_tokens(topk_idx[0], 6), expected[0])


@pytest.mark.parametrize("shape", [(3, 0, 2), (0, 2), (3, 5, 0)])
def test_count_expert_tokens_with_no_tokens_is_zeros(shape):
  np.testing.assert_array_equal(count_expert_tokens(np.zeros(shape, np.int32), 4), np.zeros(shape[:-2] + (4,)))


@pytest.mark.parametrize("topk_idx,message", [
    (np.array([[0, 6]]), "topk_idx holds 1 values above 5"),
    (np.array([[0, -2]]), "topk_idx holds 1 values below -1"),
    (np.array([[2**32 + 1, 0]]), "topk_idx holds 1 values above 5"),  # must not wrap to 1 in int32
    (np.array([[0.0, 1.0]]), "topk_idx must be an int array"),
    (np.array([0, 1]), "topk_idx must be \\[..., num_tokens, num_topk\\]"),
])
def test_count_expert_tokens_rejects_bad_ids(topk_idx, message):
  with pytest.raises(ValueError, match=message):
    count_expert_tokens(topk_idx, 6)


def test_window_is_the_mean_of_the_last_steps_and_wraps():
  tracker = ExpertLoad.create(1, 3, window=2)
  np.testing.assert_array_equal(tracker.loads(), [[0, 0, 0]])
  update = jax.jit(ExpertLoad.update)
  for step_counts in ([[3, 0, 0]], [[1, 1, 0]], [[0, 0, 5]]):
    tracker = update(tracker, jnp.array(step_counts, jnp.int32))
  np.testing.assert_allclose(tracker.loads(), [[0.5, 0.5, 2.5]])  # the first step fell out
  assert int(tracker.num_updates) == 3


def test_ema_is_bias_corrected():
  tracker = ExpertLoad.create(2, 2, decay=0.9)
  tracker = tracker.update(jnp.array([[10, 0], [4, 4]]))
  np.testing.assert_allclose(tracker.loads(), [[10, 0], [4, 4]], rtol=1e-6)  # not 0.1x
  for _ in range(50):
    tracker = tracker.update(jnp.array([[0, 10], [4, 4]]))
  np.testing.assert_allclose(tracker.loads()[1], [4, 4], rtol=1e-5)
  assert tracker.loads()[0, 1] > 9.9 and tracker.loads()[0, 0] < 0.1


def test_tracker_is_a_pytree_that_jit_carries_through_a_scan():
  tracker = ExpertLoad.create(2, 4, window=3)
  counts = jnp.arange(5 * 2 * 4, dtype=jnp.int32).reshape(5, 2, 4)

  @jax.jit
  def run(tracker, counts):
    return jax.lax.scan(lambda t, c: (t.update(c), None), tracker, counts)[0]

  np.testing.assert_allclose(run(tracker, counts).loads(), np.asarray(counts[2:]).mean(0))


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of decay"),
    (dict(decay=0.9, window=4), "exactly one of decay"),
    (dict(decay=1.0), "decay must lie in"),
    (dict(window=0), "window must be a positive integer"),
    (dict(decay=[0.5]), "decay must be a float"),
    (dict(decay="0.5"), "decay must be a float"),
])
def test_create_rejects_bad_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ExpertLoad.create(2, 4, **kwargs)


def test_update_takes_lists():
  tracker = ExpertLoad.create(1, 2, window=2).update([[1, 2]])
  np.testing.assert_array_equal(tracker.loads(), [[1, 2]])


@pytest.mark.parametrize("counts,message", [
    (jnp.zeros((4, 2), jnp.int32), "counts must be \\[num_layers, num_experts\\] = \\(2, 4\\)"),
    (jnp.zeros((2, 4), jnp.float32), "counts must be an int array"),
    (np.full((2, 4), -1), "counts holds 8 values below 0"),
    (np.full((2, 4), 2**31), "counts holds 8 values above 2147483647"),  # would wrap in int32
])
def test_update_rejects_bad_counts(counts, message):
  with pytest.raises(ValueError, match=message):
    ExpertLoad.create(2, 4, window=2).update(counts)


def test_counts_summed_over_an_expert_parallel_mesh_match_the_global_count():
  # Each of 8 devices counts its own tokens; a psum gives what one device would count for all.
  mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:8]), ("ep",))
  topk_idx = np.random.default_rng(4).integers(-1, 16, size=(2, 8 * 32, 4)).astype(np.int32)  # [L, T, K]

  @jax.jit
  def step(tracker, topk_idx):
    def local(idx):
      return jax.lax.psum(count_expert_tokens(idx, 16), "ep")
    counts = jax.shard_map(local, mesh=mesh, in_specs=jax.P(None, "ep"), out_specs=jax.P())(topk_idx)
    return tracker.update(counts)

  tracker = step(ExpertLoad.create(2, 16, decay=0.5), topk_idx)
  np.testing.assert_array_equal(tracker.loads(), count_expert_tokens(topk_idx, 16))
