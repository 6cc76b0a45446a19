"""Measure the best K-step timestep list of a few-step sampler on the digits domain.

Few-step samplers take an explicit list (``pipe(..., timesteps=[999, 499])``); DMD2 / SDXL-Lightning ship hand-picked
ones such as ``[999, 749, 499, 249]``. :func:`search_timesteps` is a generic, deterministic coarse-to-fine coordinate
search over strictly decreasing integer lists that minimises any ``score(timesteps) -> float``; :func:`digits_fd_score`
builds that score from the digits harness (:func:`lcm_kit.eval.metrics.evaluate_pipeline`): the Fréchet distance of
the pipeline's samples with that list.

    score = digits_fd_score(pipe, "consistency", num_per_digit=20, seed=100, guidance_scale=1.0)
    result = search_timesteps(score, num_steps=4)
    result.best, result.best_score, score.rows[tuple(result.best)]["accuracy"]
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

from diffusers.schedulers import scheduling_lcm as diffusers_scheduling_lcm
from diffusers.schedulers import scheduling_tcd as diffusers_scheduling_tcd
from tqdm.auto import tqdm

from ..schedulers import scheduling_lcm
from .classifier import DigitClassifier
from .metrics import SCHEDULERS, evaluate_pipeline, make_scheduler

# The loggers that warn, on every set_timesteps call, about a custom list off the distillation grid: diffusers'
# LCMScheduler / TCDScheduler and lcm-kit's ConsistencyScheduler. The search tries such lists on purpose.
CUSTOM_TIMESTEP_LOGGERS = (
    diffusers_scheduling_lcm.logger,
    diffusers_scheduling_tcd.logger,
    scheduling_lcm.logger,
)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}.")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}.")
    return int(value)


@dataclass
class TimestepSearch:
    """The result of :func:`search_timesteps`: the best list and its score, the evenly spaced list the search started
    from and its score, every evaluation in order (``(timesteps, score)``, no list twice) and the strides used (coarse
    first, then the refinement strides)."""

    best: list[int]
    best_score: float
    start: list[int]
    start_score: float
    history: list[tuple[list[int], float]] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)


def evenly_spaced_timesteps(num_steps: int, num_train_timesteps: int = 1000, first: int | None = None) -> list[int]:
    """``num_steps`` timesteps evenly spaced the "trailing" way from ``first`` (default ``num_train_timesteps - 1``):
    ``round(F - i * F / num_steps) - 1`` with ``F = first + 1``, e.g. ``[999, 499]`` for 2 steps and
    ``[999, 749, 499, 249]`` (DMD2's list) for 4."""
    num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 1)
    first = num_train_timesteps - 1 if first is None else _check_int("first", first, 0, num_train_timesteps - 1)
    num_steps = _check_int("num_steps", num_steps, 1, first + 1)
    top = first + 1
    return [int(round(top - i * top / num_steps)) - 1 for i in range(num_steps)]


def refinement_strides(coarse_stride: int, rounds: int) -> list[int]:
    """``[coarse_stride, coarse_stride // 2, ...]``: ``rounds`` halvings after the coarse stride, stopping at 1
    (e.g. 50, 3 rounds: ``[50, 25, 12, 6]``)."""
    strides = [_check_int("coarse_stride", coarse_stride, 1)]
    for _ in range(_check_int("rounds", rounds, 0)):
        if strides[-1] == 1:
            break
        strides.append(strides[-1] // 2)
    return strides


def search_timesteps(
    score: Callable[[list[int]], float],
    num_steps: int,
    num_train_timesteps: int = 1000,
    first: int | None = None,
    search_first: bool = False,
    coarse_stride: int = 50,
    rounds: int = 3,
    sweeps: int = 2,
    progress: bool = True,
) -> TimestepSearch:
    """Search the strictly decreasing ``num_steps``-long list of integers in ``[0, num_train_timesteps - 1]`` that
    minimises ``score(list[int]) -> float``.

    Coarse-to-fine coordinate search, deterministic: start from :func:`evenly_spaced_timesteps`; then, position by
    position, try the coarse grid ``num_train_timesteps - 1 - m * coarse_stride`` inside the interval the neighbours
    allow (the list stays strictly decreasing) and keep the best, then try ``best +- s`` for each refinement stride
    ``s`` of :func:`refinement_strides` (``rounds`` halvings, e.g. 50 -> 25 -> 12 -> 6). A candidate replaces the
    current value only when it scores strictly lower (ties keep the current one). The sweep over positions is repeated
    up to ``sweeps`` times; a position is searched again only when the list changed elsewhere since its last search,
    and the search stops early when a sweep changes nothing.

    The first timestep stays at ``first`` (default ``num_train_timesteps - 1``: sampling starts from pure noise)
    unless ``search_first`` (then it is searched like the others, at most ``num_train_timesteps - 1``); with
    ``num_steps=1`` and a fixed first timestep there is nothing to search: one evaluation. Scores are cached, so no
    list is scored twice; a tqdm bar counts the evaluations. A score that is NaN or infinite raises a ValueError
    naming the list.

    Returns a :class:`TimestepSearch`."""
    if not callable(score):
        raise TypeError(f"score must be a callable taking a list of timesteps, got {type(score).__name__}.")
    start = evenly_spaced_timesteps(num_steps, num_train_timesteps, first)
    strides = refinement_strides(coarse_stride, rounds)
    sweeps = _check_int("sweeps", sweeps, 1)
    last = num_train_timesteps - 1
    cache: dict[tuple[int, ...], float] = {}
    history: list[tuple[list[int], float]] = []
    bar = tqdm(desc=f"tuning {num_steps}-step timesteps", unit="eval", disable=not progress, dynamic_ncols=True)

    def evaluate(timesteps: tuple[int, ...]) -> float:
        if timesteps not in cache:
            value = score(list(timesteps))
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"score({list(timesteps)}) must return a number, got {value!r}.") from None
            if not math.isfinite(value):  # NaN compares False with everything: it would never lose, or always win
                raise ValueError(f"score({list(timesteps)}) returned {value}; scores must be finite numbers.")
            cache[timesteps] = value
            history.append((list(timesteps), value))
            bar.update(1)
            bar.set_postfix(best=f"{min(cache.values()):.4g}")
        return cache[timesteps]

    def search_position(current: list[int], i: int) -> list[int]:
        high = current[i - 1] - 1 if i > 0 else last
        low = current[i + 1] + 1 if i + 1 < len(current) else 0
        best, best_value = current, evaluate(tuple(current))

        def try_value(t: int) -> None:
            nonlocal best, best_value
            if low <= t <= high and t != best[i]:
                candidate = best[:i] + [t] + best[i + 1 :]
                value = evaluate(tuple(candidate))
                if value < best_value:
                    best, best_value = candidate, value

        for t in range(last, low - 1, -strides[0]):  # the coarse grid, anchored at the last training timestep
            if t <= high:
                try_value(t)
        for stride in strides[1:]:  # refinement around the best so far
            center = best[i]
            try_value(center + stride)
            try_value(center - stride)
        return best

    try:
        current = list(start)
        evaluate(tuple(current))
        positions = range(0 if search_first else 1, num_steps)
        searched_at: dict[int, tuple[int, ...]] = {}  # the list each position was last searched in (and left at)
        for _ in range(sweeps):
            before = tuple(current)
            for i in positions:
                if searched_at.get(i) == tuple(current):
                    continue  # nothing changed elsewhere since this position was searched
                current = search_position(current, i)
                searched_at[i] = tuple(current)
            if tuple(current) == before:
                break
    finally:
        bar.close()
    return TimestepSearch(best=current, best_score=cache[tuple(current)], start=start, start_score=cache[tuple(start)],
                          history=history, strides=strides)


@contextmanager
def quiet_custom_timestep_warnings():
    """Raise the schedulers' loggers in :data:`CUSTOM_TIMESTEP_LOGGERS` to ERROR for the block and restore their
    levels afterwards: a search tries lists off the distillation grid on purpose, and LCMScheduler, TCDScheduler and
    ConsistencyScheduler warn about each one on every call."""
    levels = [logger.level for logger in CUSTOM_TIMESTEP_LOGGERS]
    for logger in CUSTOM_TIMESTEP_LOGGERS:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(CUSTOM_TIMESTEP_LOGGERS, levels):
            logger.setLevel(level)


def accepts_custom_timesteps(scheduler) -> bool:
    """Whether a scheduler's ``set_timesteps`` takes a ``timesteps`` list (DDIMScheduler's does not)."""
    return "timesteps" in inspect.signature(scheduler.set_timesteps).parameters


class DigitsFDScore:
    """``score(timesteps) -> FD``: the digits harness' Fréchet distance of ``pipe`` sampled with ``scheduler`` and that
    timestep list (see :func:`digits_fd_score`). Every row :func:`~lcm_kit.eval.metrics.evaluate_pipeline` returned
    is kept in ``rows``, keyed by the timesteps as a tuple (accuracy, FD, seconds, ...)."""

    def __init__(self, pipe, scheduler: str, num_per_digit: int, seed: int, guidance_scale: float,
                 classifier: DigitClassifier | None = None, scheduler_config: dict | None = None,
                 batch_size: int = 100, **call_kwargs):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
        if "timesteps" in call_kwargs or "num_inference_steps" in call_kwargs:
            raise ValueError("call_kwargs must not hold timesteps / num_inference_steps: the search sets them.")
        built = make_scheduler(scheduler, pipe.scheduler.config, **(scheduler_config or {})) or pipe.scheduler
        if not accepts_custom_timesteps(built):
            raise ValueError(
                f"scheduler {scheduler!r} ({type(built).__name__}) takes no custom timesteps list in set_timesteps, "
                "so there is nothing to tune; use dpmsolver (a teacher), consistency / lcm (LCM models and LoRAs) or "
                "tcd (PCM / TCD LoRAs)."
            )
        self.pipe, self.scheduler, self.num_per_digit, self.seed = pipe, scheduler, num_per_digit, seed
        self.guidance_scale, self.classifier, self.batch_size = guidance_scale, classifier, batch_size
        self.scheduler_config = dict(scheduler_config or {})
        self.call_kwargs = call_kwargs
        self.rows: dict[tuple[int, ...], dict] = {}

    def __call__(self, timesteps: Sequence[int]) -> float:
        timesteps = [int(t) for t in timesteps]
        # Lists off the distillation grid are what the search tries: the schedulers' warning about them (one per
        # call) is silenced here and the loggers restored after each evaluation.
        with quiet_custom_timestep_warnings():
            row = evaluate_pipeline(
                self.pipe, self.scheduler, num_inference_steps=len(timesteps), guidance_scale=self.guidance_scale,
                num_per_digit=self.num_per_digit, seed=self.seed, name=f"{self.scheduler} {timesteps}",
                classifier=self.classifier, batch_size=self.batch_size, scheduler_config=self.scheduler_config,
                timesteps=timesteps, **self.call_kwargs,
            )
        row["timesteps"] = timesteps
        self.rows[tuple(timesteps)] = row
        return row["fd"]


def digits_fd_score(pipe, scheduler: str, num_per_digit: int, seed: int, guidance_scale: float,
                    classifier: DigitClassifier | None = None, scheduler_config: dict | None = None,
                    **call_kwargs) -> DigitsFDScore:
    """A ``score(timesteps) -> FD`` for :func:`search_timesteps`: ``evaluate_pipeline(pipe, scheduler,
    num_inference_steps=len(timesteps), guidance_scale, num_per_digit, seed, classifier, scheduler_config,
    timesteps=timesteps, **call_kwargs)["fd"]`` (``call_kwargs`` go to the pipeline call, e.g. ``eta`` for ``tcd``;
    ``batch_size`` to :func:`~lcm_kit.eval.metrics.evaluate_pipeline`). The same seeds for every list, so lists are
    compared on the same noise. Raises a ValueError for a scheduler whose ``set_timesteps`` takes no ``timesteps``
    (``ddim``)."""
    return DigitsFDScore(pipe, scheduler, num_per_digit, seed, guidance_scale, classifier=classifier,
                         scheduler_config=scheduler_config, **call_kwargs)
