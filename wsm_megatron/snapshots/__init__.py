"""Snapshots of a rank's shard values: the ring (sliced over data parallelism) that the
trainer's online merge and ``wsm-tune`` merge from, and the loader that fills it from disk.

- ``values.py``: which tensors a merge averages (``shard_values``), extra state kept aside;
- ``slicing.py``: buckets, chunks and segments (index arithmetic of the DP slices);
- ``ring.py``: ``SnapshotRing`` (take, fence, merge into the live model, restore);
- ``loading.py``: checkpoints into the model and the ring, read once per DP group;
- ``memory.py``: where the ring lives and what it costs per rank and per node;
- ``plan.py``: the same cost from a config alone (``wsm-train --plan-memory``).
"""
