"""The watcher's pin on the run's checkpoints (:func:`wsm_megatron.training.retention.write_pin`):
what its window holds and what it has still to read, so that our trainer's retention keeps
them. The only file the watcher writes under the run's root; released when it stops."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from pathlib import Path

from wsm_megatron.training.retention import release_pin, write_pin


class WatchPin:
    """Rank 0's pin, owned by the watcher's ``--output`` (one pin per watcher)."""

    def __init__(self, root: Path, output: Path, say: Callable[[str], None]) -> None:
        digest = hashlib.sha1(str(output.resolve()).encode()).hexdigest()[:12]
        self.root, self.owner, self.say = root, f"wsm-watch-{digest}", say
        self.pinned: tuple[int, ...] | None = None
        self._failed = False

    def write(self, iterations: Collection[int]) -> None:
        """Pin ``iterations`` (replacing the last pin); a folder it cannot write is one
        warning (the watcher goes on without protecting its window)."""
        wanted = tuple(sorted(set(iterations)))
        if wanted == (self.pinned or ()) or self._failed:
            return
        if not wanted:
            self.release()
            return
        try:
            write_pin(self.root, self.owner, wanted)
            self.pinned = wanted
        except OSError as err:
            self._failed = True
            self.say(f"warning: cannot pin checkpoints under {self.root} ({err}); retention "
                     "may delete what the window needs")  # fmt: skip

    def release(self) -> None:
        if self.pinned is not None:
            release_pin(self.root, self.owner)
            self.pinned = None
