"""Schedulers of lcm-kit (diffusers ``SchedulerMixin`` / ``ConfigMixin`` classes).

* ``ConsistencyScheduler`` (:mod:`.scheduling_lcm`): LCM multistep sampling in discrete VP time (exactly diffusers'
  ``LCMScheduler`` at ``gamma=1``), for latent consistency models.
* ``CMMultistepScheduler`` (:mod:`.scheduling_cm`): multistep consistency sampling in EDM sigma space (CD / CT / iCT).
"""

from .scheduling_cm import CMMultistepScheduler, CMMultistepSchedulerOutput
from .scheduling_lcm import ConsistencyScheduler, ConsistencySchedulerOutput

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput", "CMMultistepScheduler", "CMMultistepSchedulerOutput"]
