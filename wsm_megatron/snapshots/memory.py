"""Where a snapshot ring lives and what it costs: per rank, per GPU and per node, checked before
anything is allocated."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist

GIB = 2**30


def ring_device(setting: str, compute: torch.device, need: int, share: float) -> torch.device:
    """``merge.snapshot_device``: ``gpu`` (the compute device), ``cpu`` (host memory, pinned
    on a GPU machine) or ``auto``: the GPU when ``need`` bytes fit ``share`` of its free
    memory, else host memory; host memory on a machine without a GPU."""
    cuda = compute.type == "cuda"
    if setting == "gpu":
        if not cuda:
            raise ValueError("merge.snapshot_device: 'gpu' needs a GPU; use 'auto' or 'cpu'")
        return compute
    if setting == "cpu" or not cuda:
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(compute)
    return compute if need <= share * free else torch.device("cpu")


@dataclass(frozen=True)
class RingMemory:
    """What the rings of a job hold: this rank, the largest rank, the fullest node."""

    rank_bytes: int
    largest_rank_bytes: int
    node_host_bytes: int
    """Host-memory rings summed over the ranks of the node that holds the most."""
    node: str
    node_ranks: int

    def describe(self, capacity: int, where: str) -> str:
        per = self.rank_bytes / capacity / GIB
        return (
            f"ring {capacity} snapshots x {per:.3g} GiB = {self.rank_bytes / GIB:.3g} GiB per "
            f"rank in {where}; node {self.node}: {self.node_host_bytes / GIB:.3g} GiB of host "
            f"memory over {self.node_ranks} rank(s)"
        )


def gather_ring_memory(rank_bytes: int, in_host_memory: bool) -> RingMemory:
    """Every rank's ring, summed per node (one small all-gather at start-up)."""
    mine = (socket.gethostname(), rank_bytes, rank_bytes if in_host_memory else 0)
    rows = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
    per_node: dict[str, list[int]] = {}
    for host, _, host_bytes in rows:
        per_node.setdefault(host, []).append(host_bytes)
    node = max(per_node, key=lambda h: (sum(per_node[h]), h == mine[0]))
    return RingMemory(
        rank_bytes=rank_bytes,
        largest_rank_bytes=max(r[1] for r in rows),
        node_host_bytes=sum(per_node[node]),
        node=node,
        node_ranks=len(per_node[node]),
    )


def check_ring_memory(
    memory: RingMemory, capacity: int, rank_budget_gb: float, node_budget_gb: float | None
) -> None:
    """Refuse a ring above ``merge.snapshot_memory_gb`` on any rank or above
    ``merge.node_memory_gb`` (default: half the node's memory) of host memory on any node."""
    if memory.largest_rank_bytes > rank_budget_gb * GIB:
        raise ValueError(
            f"merge.snapshot_memory_gb: the online merge's ring of {capacity} snapshots needs "
            f"{memory.largest_rank_bytes / GIB:.3g} GiB on the largest rank, above the "
            f"{rank_budget_gb:g} GiB allowed (raise it, or merge fewer checkpoints)"
        )
    node_budget = node_budget_gb * GIB if node_budget_gb else psutil.virtual_memory().total / 2
    if memory.node_host_bytes > node_budget:
        raise ValueError(
            f"merge.node_memory_gb: the online merge's rings need "
            f"{memory.node_host_bytes / GIB:.3g} GiB of host memory on node {memory.node} "
            f"({memory.node_ranks} ranks), above the {node_budget / GIB:.3g} GiB allowed "
            "(raise it, shard the ring over more data-parallel ranks, or merge fewer "
            "checkpoints)"
        )
