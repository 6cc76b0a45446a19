"""Argument parsing every lcm-kit command line shares: a parser without prefix abbreviations that shows defaults,
and checked argparse types (ranges, NaN and inf refused, devices this machine has)."""

from __future__ import annotations

import argparse
import math
import sys

import torch

MAX_SEED = 2**63 - 1  # eval adds the image index to the seed; torch seeds are 64-bit


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their layout (they are module docstrings); every flag's help ends with its default.
    Not appended to a ``None`` default (the help text says what happens without the flag) or to a help text that
    already states its default."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        if isinstance(action.default, (list, tuple)):  # as typed on the command line, not as a Python list
            shown = " ".join(map(str, action.default)).replace("%", "%%")
            return f"{action.help} (default: {shown})"
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for lcm-kit: no prefix abbreviations (``--hub_tok`` must not mean
    ``--hub_token``, and a typo must not silently pick a flag) and :class:`HelpFormatter` (defaults shown) unless a
    more specific formatter is asked for."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        self._refuse_unknown_flags(argv)
        return super().parse_known_args(argv, namespace)

    def _refuse_unknown_flags(self, argv: list[str]) -> None:
        # argparse reports a missing required flag before an unknown one, so `--pretrained_teacher x` (an
        # abbreviation) would read "--pretrained_teacher_model is required"; name the unknown flag first.
        if any(isinstance(action, argparse._SubParsersAction) for action in self._actions):
            return  # the sub-command's own parser checks its flags
        known = self._option_string_actions
        for token in argv:
            if token == "--":
                break
            flag = token.partition("=")[0]
            if " " in flag:  # argparse reads a token with a space as a value (`--train_args "--flag 1"`)
                continue
            if flag.startswith("--") and len(flag) > 2 and flag not in known:
                longer = sorted(option for option in known if option.startswith(flag))
                hint = f" (abbreviations are not accepted: did you mean {' or '.join(longer)}?)" if longer else ""
                self.error(f"unrecognized arguments: {flag}{hint}")


def int_range(low: int, high: int | None = None, multiple_of: int = 1):
    """An argparse ``type``: an integer in ``[low, high]`` (and a multiple of ``multiple_of``)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if multiple_of > 1:
        allowed += f" that is a multiple of {multiple_of}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high) or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def float_range(low: float | None = None, high: float | None = None, low_inclusive: bool = True,
                high_inclusive: bool = True):
    """An argparse ``type``: a finite number >= ``low`` (> ``low`` if not ``low_inclusive``), <= ``high`` (< if not
    ``high_inclusive``); ``None`` bounds are open. NaN and inf are refused (``float("nan")`` parses, and every
    comparison with it is False)."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        bounds.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    allowed = "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        above = low is None or (value >= low if low_inclusive else value > low)
        below = high is None or (value <= high if high_inclusive else value < high)
        if not math.isfinite(value) or not above or not below:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse ``type``: ``auto`` or a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:<index> or mps, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), 0 to {count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here (use auto or cpu)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:<index> or mps, got {text!r}")
    return text
