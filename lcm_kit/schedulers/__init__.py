"""Schedulers of lcm-kit (diffusers ``SchedulerMixin`` / ``ConfigMixin`` classes).

* ``ConsistencyScheduler``: LCM multistep sampling in discrete VP time (exactly diffusers' ``LCMScheduler`` at
  ``gamma=1``), for latent consistency models.
* ``CMMultistepScheduler``: multistep consistency sampling in EDM sigma space (CD / CT / iCT models).
"""

from .scheduling_cm_multistep import CMMultistepScheduler, CMMultistepSchedulerOutput
from .scheduling_consistency import ConsistencyScheduler, ConsistencySchedulerOutput

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput", "CMMultistepScheduler", "CMMultistepSchedulerOutput"]
