"""Schedulers of lcm-kit (diffusers ``SchedulerMixin`` / ``ConfigMixin`` classes)."""

from .scheduling_consistency import ConsistencyScheduler, ConsistencySchedulerOutput

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput"]
