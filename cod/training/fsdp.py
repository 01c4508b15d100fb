"""Fully sharded data parallel training (FSDP2: per-parameter sharding with DTensors).

`FSDP2Strategy` is Lightning's ModelParallelStrategy with the whole world as the data-parallel mesh (CoD uses no
tensor parallelism), so one YAML line works on any number of nodes and on CPU processes over gloo.
`shard(module, mesh)` is the sharding plan CoDTrainingModule.configure_model applies: every transformer block,
the condition codec and the rest of the denoiser, the objective's heads, and the EMA copy sharded exactly like
the denoiser (so the EMA update is a local lerp on each rank).

Lightning's FSDPStrategy (FSDP1, flat parameters) is not supported: its flattening would put the EMA copy and
the denoiser's parameters into different shard layouts.
"""
from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None,
                 **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank holds one data shard
        super().setup_environment()


def shard(module, mesh) -> None:
    """Apply FSDP2 to a CoDTrainingModule over the mesh's data-parallel dimension."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError("CoD shards with FSDP2 only: use cod.training.fsdp.FSDP2Strategy or "
                         "ModelParallelStrategy(tensor_parallel_size=1)")
    dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for net in (module.denoiser, module.ema.module):
        for block in net.blocks:
            fully_shard(block, mesh=dp)
            if hasattr(block, "channel_major"):  # the per-pixel stage calls blocks through this method, not forward:
                register_fsdp_forward_method(block, "channel_major")  # it must gather their parameters too
        fully_shard(net.y_embedder, mesh=dp)
        fully_shard(net, mesh=dp)
    fully_shard(module.objective, mesh=dp)
