"""``wsm-watch``: a sidecar that follows a live run's checkpoint folder and scores, for each new
complete checkpoint, the checkpoint alone and every WSM merge whose window ends at it.

``watch(config, WatchOptions(...))`` runs in every process of its own launch; see :mod:`.api`.
"""

from wsm_megatron.watch.api import WatchOptions, watch

__all__ = ["WatchOptions", "watch"]
