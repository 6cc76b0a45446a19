"""Bad samples: the error that names one, and the count of those skipped with ``skip_bad_samples``."""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing import context as mp_context

import torch.utils.data

logger = logging.getLogger("lcm_kit.training.data")


class BadSampleError(ValueError):
    """A sample that cannot be decoded or preprocessed. The message names the sample (index or key), its file
    and its shard; ``sample`` holds that name and ``__cause__`` the library's original error."""

    def __init__(self, message: str, sample: str | None = None):
        # One positional argument suffices: torch rebuilds a worker's exception from its message alone.
        super().__init__(message)
        self.sample = sample


class BadShardError(ValueError):
    """A webdataset shard that is not a readable tar archive (empty, not a tar, truncated); ``shard`` names it."""

    def __init__(self, message: str, shard: str | None = None):
        super().__init__(message)
        self.shard = shard


#: Count slots: one for the main process, then one per DataLoader worker id (ids beyond share slots).
_SLOTS = 64


class SkippedSamples:
    """The count of samples skipped by one process and all its DataLoader workers, and the warning per sample.

    The count lives in shared memory created before the workers start, one slot per writer (the main process,
    each worker id), so no lock is needed and it works whatever the workers' start method: every warning shows the
    process's running total, and :attr:`count` in the main process includes the workers' skips. A bad sample counts
    each time it is met (once per epoch)."""

    def __init__(self, start: int = 0):
        self._slots = multiprocessing.RawArray("q", _SLOTS + 1)
        self._slots[0] = start
        #: index -> (message, name) of the samples this process found unreadable (not shared: a cache of reads).
        self.known_bad: dict = {}

    def __getstate__(self):
        # Shared memory pickles only while a worker process is being started; any other copy starts a count of
        # its own from the current total.
        if mp_context.get_spawning_popen() is not None:
            return {"slots": self._slots}
        return {"start": self.count}

    def __setstate__(self, state):
        if "slots" in state:
            self._slots = state["slots"]
            self.known_bad = {}
        else:
            self.__init__(state["start"])

    @property
    def count(self) -> int:
        return sum(self._slots)

    def add(self, error: BaseException, outcome: str) -> int:
        """Count one skipped sample and log a warning naming it (``error``'s message) and what happens instead."""
        info = torch.utils.data.get_worker_info()
        self._slots[0 if info is None else 1 + info.id % _SLOTS] += 1
        total = self.count
        logger.warning("skip_bad_samples: skipped %s; %s (%d bad sample(s) skipped so far by this process)",
                       error, outcome, total)
        return total
