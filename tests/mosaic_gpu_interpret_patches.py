"""Test-only fixes for two Mosaic GPU interpreter bugs in JAX 0.10.2 (see ../shared/reference/feasibility.md §1).

1. wgmma on a transposed shared-memory ref (`plgpu.transpose_ref(b_smem, (1, 0))`, the only form
   of fp8 wgmma the hardware accepts: B must be K-major) crashes the interpreter with
   "'TransposeTransform' object has no attribute 'indices'". The replacement reads each operand
   through its non-transpose transforms and transposes the numpy value (and multiplies in
   float32: numpy's float8 matmul is an element-wise loop that made each tile take seconds).
   It also takes A from registers (the interpreter passes the values in place of a shared-memory
   key), which the original does not.
2. A kernel that allocates barriers hangs under `shard_map` on more than one device: the
   end-of-kernel "no barrier remains allocated" check is global over the simulated devices.
3. `plgpu.load(ref, idx, layout=...)` (how a kernel reads a 64-row scale vector straight into
   the WGMMA row layout) is not interpreted: it falls through to "arithmetic" and fails an
   assertion. The interpreter reads it as a plain `ref[idx]` (layouts do not exist there).
   Likewise `plgpu.layout_cast` (a register layout for a loop carry) has no CPU rule; there it
   is the identity.

`apply()` installs both, once, only on the JAX version they were written for; the real lowering
(`lowering_platforms=("cuda",)`) is never touched.
"""

from __future__ import annotations

import jax
import numpy as np

PATCHED_JAX_VERSION = "0.10.2"
_applied = False


def apply() -> bool:
  """Installs the patches on JAX 0.10.2; returns whether they are active."""
  global _applied
  if _applied:
    return True
  if jax.__version__ != PATCHED_JAX_VERSION:
    return False  # a newer JAX: check whether the bugs are fixed before porting these
  from jax._src.pallas.mosaic.interpret import utils as interpret_utils
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.state import types as state_types

  def without_transpose(transforms):
    """The operand's slicing transforms, and the permutation of a trailing transpose (or None)."""
    transforms = list(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms)))
    permutation = None
    while transforms and isinstance(transforms[-1], state_types.TransposeTransform):
      permutation = tuple(transforms.pop().permutation)
    return tuple(transforms), permutation

  def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
            acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
            source_info=None):
    memory = gpu_callbacks._get_shared_memory()
    global_thread = memory.get_global_thread_id(int(device_id), int(thread_id))
    logging_info = interpret_utils.GPULoggingInfo(
        device_id=int(device_id), grid_point_coords=tuple(int(c) for c in grid_point_coords),
        thread_id=int(thread_id), source_info=source_info)

    def operand(key, transforms):
      transforms, permutation = without_transpose(transforms)
      value, _, _ = memory.get_buffer_content(gpu_callbacks.HostAllocationKey.from_array(key),
                                              interpret_utils.to_range(transforms), global_thread,
                                              logging_info=logging_info)
      return value if permutation is None else np.transpose(value, permutation)

    if np.ndim(a_allocation_key_as_array) == 2:  # A from registers (P in attention's P.V): its values
      a = np.asarray(a_allocation_key_as_array)
    else:
      a = operand(a_allocation_key_as_array, a_transforms)
    b = operand(b_allocation_key_as_array, b_transforms)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
    acc_range = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    acc, _, _ = memory.get_buffer_content(acc_key, acc_range, global_thread, logging_info=logging_info)
    # Widen before the product: numpy's matmul on ml_dtypes' float8 runs an element-wise loop
    # (seconds per tile); float8 values and their products are exact in float32.
    product = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
    memory.store_buffer_content(acc_key, acc_range, acc + product, global_thread, logging_info=logging_info)
    return token

  gpu_callbacks.wgmma = wgmma

  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
  from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
  from jax._src.state import primitives as state_primitives
  interpreter = jaxpr_interpret.JaxprInterpreter
  original_interpret = interpreter.interpret

  def interpret(self, jaxpr, token, *args):
    if any(eqn.primitive is gpu_primitives.load_p for eqn in jaxpr.eqns):
      eqns = [eqn.replace(primitive=state_primitives.get_p, params={"tree": eqn.params["tree"]})
              if eqn.primitive is gpu_primitives.load_p else eqn for eqn in jaxpr.eqns]
      jaxpr = jaxpr.replace(eqns=eqns)
    return original_interpret(self, jaxpr, token, *args)

  interpreter.interpret = interpret
  original_arithmetic = interpreter._interpret_arithmetic_primitive

  def arithmetic(self, eqn, get_invals):
    if eqn.primitive is gpu_core.layout_cast_p:
      return get_invals()[0]
    return original_arithmetic(self, eqn, get_invals)

  interpreter._interpret_arithmetic_primitive = arithmetic
  gpu_callbacks._assert_no_barriers_allocated = lambda token: token
  _applied = True
  return True
