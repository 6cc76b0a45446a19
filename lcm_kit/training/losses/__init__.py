"""Training objectives as small callables, one file each: hyper-parameters in ``__init__``, ``__call__`` returns the
per-sample loss (NVlabs EDM's ``training/loss.py`` style; preconditioning lives in :mod:`lcm_kit.precond`).

* :class:`LCMDistillationLoss` (:mod:`.lcm`): latent consistency distillation of a guided teacher (LCM, PCM or TCD
  target times);
* :class:`ConsistencyLoss` (:mod:`.cm`): CD / CT / iCT in EDM sigma space, with their curricula;
* :class:`ECTLoss` (:mod:`.ect`): Easy Consistency Tuning from a diffusion model's weights, in EDM sigma space;
* :class:`SCMLoss` (:mod:`.scm`): continuous-time sCT / sCD in TrigFlow time (a JVP tangent);
* :class:`EDMDenoisingLoss` (:mod:`.edm`): EDM's diffusion loss (a teacher for CD, a start for CT and ECT).
"""

from .cm import MODES as DISCRETE_CM_MODES
from .cm import ConsistencyLoss, ConsistencyLossOutput, LPIPSDistance
from .ect import ECTLoss, ECTLossOutput
from .edm import EDMDenoisingLoss
from .lcm import LCMDistillationConfig, LCMDistillationLoss, LCMDistillationOutput, sample_skip_timesteps
from .scm import SCM_MODES, SCMLoss, SCMLossOutput

# Every mode of train_consistency: discrete CD / CT / iCT, ECT and the continuous-time sCT / sCD.
CM_MODES = (*DISCRETE_CM_MODES, "ect", *SCM_MODES)

__all__ = [
    "CM_MODES",
    "DISCRETE_CM_MODES",
    "ConsistencyLoss",
    "ConsistencyLossOutput",
    "ECTLoss",
    "ECTLossOutput",
    "EDMDenoisingLoss",
    "LCMDistillationConfig",
    "LCMDistillationLoss",
    "LCMDistillationOutput",
    "LPIPSDistance",
    "SCM_MODES",
    "SCMLoss",
    "SCMLossOutput",
    "sample_skip_timesteps",
]
