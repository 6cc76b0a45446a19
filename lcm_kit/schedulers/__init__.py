"""Schedulers of lcm-kit (diffusers ``SchedulerMixin`` / ``ConfigMixin`` classes).

* ``ConsistencyScheduler`` (:mod:`.scheduling_lcm`): LCM multistep sampling in discrete VP time (exactly diffusers'
  ``LCMScheduler`` at ``gamma=1``), for latent consistency models.
* ``TrajectoryConsistencyScheduler`` (:mod:`.scheduling_tcd`): exactly diffusers' ``TCDScheduler`` (TCD models and
  TCD-LoRAs), with ``TCDScheduler.step``'s signature.
* ``CMMultistepScheduler`` (:mod:`.scheduling_cm`): multistep consistency sampling in EDM sigma space (CD / CT / iCT).
"""

from .scheduling_cm import CMMultistepScheduler, CMMultistepSchedulerOutput
from .scheduling_lcm import ConsistencyScheduler, ConsistencySchedulerOutput
from .scheduling_tcd import TrajectoryConsistencyScheduler, TrajectoryConsistencySchedulerOutput

__all__ = [
    "CMMultistepScheduler",
    "CMMultistepSchedulerOutput",
    "ConsistencyScheduler",
    "ConsistencySchedulerOutput",
    "TrajectoryConsistencyScheduler",
    "TrajectoryConsistencySchedulerOutput",
]
