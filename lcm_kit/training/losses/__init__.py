"""Training objectives as small callables, one file each: hyper-parameters in ``__init__``, ``__call__`` returns the
per-sample loss (NVlabs EDM's ``training/loss.py`` style; preconditioning lives in :mod:`lcm_kit.precond`).

* :class:`LCMDistillationLoss` (:mod:`.lcm`): latent consistency distillation of a guided teacher (LCM, PCM or TCD
  target times);
* :class:`ConsistencyLoss` (:mod:`.cm`): CD / CT / iCT in EDM sigma space, with their curricula;
* :class:`EDMDenoisingLoss` (:mod:`.edm`): EDM's diffusion loss (a teacher for CD, a start for CT).
"""

from .cm import MODES as CM_MODES
from .cm import ConsistencyLoss, ConsistencyLossOutput, LPIPSDistance
from .edm import EDMDenoisingLoss
from .lcm import LCMDistillationConfig, LCMDistillationLoss, LCMDistillationOutput, sample_skip_timesteps

__all__ = [
    "CM_MODES",
    "ConsistencyLoss",
    "ConsistencyLossOutput",
    "EDMDenoisingLoss",
    "LCMDistillationConfig",
    "LCMDistillationLoss",
    "LCMDistillationOutput",
    "LPIPSDistance",
    "sample_skip_timesteps",
]
