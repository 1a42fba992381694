"""Sharded tensors in plain torch: FSDP2 sharding, global coordinates of local row shards, and the few
collectives fit-sensitivity needs (each one call per tensor, never per batch per weight). No Lightning.

Two layouts exist:

* replicated (single process, DDP): every rank holds whole tensors; accumulators are summed once at the
  end with one ``all_reduce`` per tensor.
* sharded (FSDP2 ``fully_shard``, which cwa applies under Lightning's ``ModelParallelStrategy``): every
  rank holds rows ``offset .. offset + local_rows`` of each parameter (``Shard(0)``) and the accumulator
  for exactly those rows. Backward already sums gradients over ranks (reduce-scatter), so accumulators
  are never reduced again; only counters are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cwa.common.errors import CwaError


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes Hugging Face lists in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        # Fall back to the children of the longest ModuleList (decoder layers in every HF causal LM).
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


def apply_fsdp2(model: nn.Module, device_type: str) -> None:
    """Shard ``model`` over all processes with FSDP2: one unit per decoder layer, then the root.

    cwa uses no tensor parallelism, so the mesh is one data-parallel dimension over the whole world
    (whatever ``data_parallel_size`` / ``tensor_parallel_size`` the strategy was given). Gradients are
    reduce-scattered as plain sums (no averaging over ranks): every rank's loss is already a token-weighted
    share of the calibration loss, and gloo has no pre-multiplied or averaging reduce-scatter.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world, _ = world_and_rank()
    mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (checked by duck typing: no import of torch.distributed.tensor)."""
    return callable(getattr(tensor, "to_local", None)) and hasattr(tensor, "placements")


def shard_rows(param: Tensor) -> tuple[int, int]:
    """(first global row, number of rows) of this rank's shard of ``param`` (whole tensor if unsharded)."""
    if not is_dtensor(param):
        return 0, (param.shape[0] if param.dim() else 1)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in param.placements:
        if not isinstance(placement, Replicate) and not (isinstance(placement, Shard) and placement.dim == 0):
            raise CwaError(f"cannot score a tensor sharded as {param.placements}: cwa supports row (Shard(0)) shards.")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return (int(offset[0]), int(shape[0])) if len(shape) else (0, 1)


def global_flat_index(param: Tensor, local_index: Tensor) -> Tensor:
    """Flat indices into the whole tensor of flat indices into this rank's row shard."""
    first_row, _ = shard_rows(param)
    row_size = math.prod(param.shape[1:]) if param.dim() > 1 else 1
    return local_index + first_row * row_size


def local_slice(param: Tensor, full: Tensor) -> Tensor:
    """This rank's rows of ``full`` (a tensor shaped like the whole ``param``)."""
    if not is_dtensor(param):
        return full
    first_row, rows = shard_rows(param)
    return full.narrow(0, first_row, rows) if full.dim() else full


def full_tensor(local: Tensor, like: Tensor) -> Tensor:
    """The whole tensor assembled from every rank's row shard ``local`` of a tensor laid out like ``like``
    (a collective: every rank calls it, every rank receives the result, one tensor at a time)."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    stride = torch.empty(like.shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=stride).full_tensor()


def all_reduce_sum(tensor: Tensor) -> None:
    """Sum ``tensor`` in place over all processes (nothing to do in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (small Python objects and CPU tensors only)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def local_of(tensor: Tensor) -> Tensor:
    """This rank's local part of a DTensor; a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor
