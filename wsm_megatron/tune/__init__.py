"""``wsm-tune``: every candidate merge (duration x schedule) scored in memory at the run's layout.

``tune(config, TuneOptions(...))`` runs in every process of a launch; see :mod:`.api`.
"""

from wsm_megatron.tune.api import TuneOptions, tune
from wsm_megatron.tune.candidates import Candidate, TuneGrid

__all__ = ["Candidate", "TuneGrid", "TuneOptions", "tune"]
