"""Secrets never reach a file, a log, a card or a tracker: which argument names and values are secret, and masking
them in saved arguments, command lines, free text and log records.

Values are masked wherever they show up, whatever the flag's spelling: a trainer's parser remembers the value of
every flag that names (or abbreviates) a secret (:func:`remember_secret`), and :func:`redact_text` masks remembered
values as well as Hugging Face token-shaped strings (``hf_...``). :class:`SecretFilter` does the same for log
records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
#: Argument names treated as secrets: a credential word as a whole ``_``-separated part (``hub_token``,
#: ``wandb_api_key``, ``password``), but not ``tokenizer_name`` or ``max_tokens``.
_SECRET_NAME = re.compile(
    r"(^|_)(token|secret|password|passwd|api_key|apikey|access_key|secret_key|credentials?|auth)($|_)", re.I
)
#: Hugging Face user access tokens (and similar bearer strings) wherever they show up.
_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
_REMEMBERED: set[str] = set()


def remember_secret(value: str) -> None:
    """Mask ``value`` in everything :func:`redact_text` sees from now on (values shorter than 4 characters are too
    common to mask safely and are not accepted as secrets)."""
    if isinstance(value, str) and len(value) >= 4:
        _REMEMBERED.add(value)


def forget_secrets() -> None:
    _REMEMBERED.clear()


def is_secret_name(name: str) -> bool:
    """True for argument names that hold credentials (``hub_token``, ``report_api_key``, ``password``...)."""
    return bool(_SECRET_NAME.search(name.lstrip("-").replace("-", "_")))


def redact_text(text: str) -> str:
    """Mask remembered secret values and Hugging Face token-shaped strings (``hf_...``) in free text."""
    for value in sorted(_REMEMBERED, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _TOKEN_VALUE.sub(REDACTED, text)


def _to_plain(value: Any) -> Any:
    """JSON-able copy: paths and other objects become strings; token-shaped strings are masked."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return redact_text(os.fspath(value))
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if is_secret_name(str(k)) else _to_plain(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_plain(v) for v in value]
    return redact_text(str(value))


def args_for_saving(args: Any) -> dict:
    """The training arguments as a JSON-able dict with every secret-looking field dropped.

    ``args``: an ``argparse.Namespace``, a dataclass instance or a mapping. Fields named like credentials
    (see :func:`is_secret_name`) are removed; any other value that looks like a Hugging Face token is masked.
    """
    if isinstance(args, Mapping):
        items = dict(args)
    elif dataclasses.is_dataclass(args) and not isinstance(args, type):
        items = {field.name: getattr(args, field.name) for field in dataclasses.fields(args)}
    elif hasattr(args, "__dict__"):
        items = dict(vars(args))
    else:
        raise TypeError(f"args must be an argparse.Namespace, a dataclass or a mapping, got {type(args).__name__}")
    return {str(k): _to_plain(v) for k, v in items.items() if not is_secret_name(str(k))}


def write_training_args(args: Any, output_dir: str | os.PathLike, filename: str = "training_args.json") -> Path:
    """Write :func:`args_for_saving` as JSON into ``output_dir`` (the secret-free record of a run)."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(args_for_saving(args), indent=2, sort_keys=True) + "\n")
    return path


def redact_command(command: str | Sequence[str]) -> str:
    """A shell-quoted command line with the values of secret flags (``--hub_token X``, ``--hub_token=X``) and any
    token-shaped string replaced by ``<redacted>``."""
    if isinstance(command, str):
        try:
            parts = shlex.split(command)
        except ValueError:  # unbalanced quotes: fall back to whitespace, still redacting
            parts = command.split()
    else:
        parts = [str(part) for part in command]
    redacted, hide_next = [], False
    for part in parts:
        if hide_next:
            redacted.append(REDACTED)
            hide_next = False
            continue
        if part.startswith("-") and is_secret_name(part.split("=", 1)[0]):
            if "=" in part:
                redacted.append(part.split("=", 1)[0] + "=" + REDACTED)
            else:
                redacted.append(part)
                hide_next = True
            continue
        redacted.append(redact_text(part))
    return shlex.join(redacted)


def training_command(argv: Sequence[str] | None = None, launcher: str = "accelerate launch") -> str:
    """The command that started this run (``sys.argv`` by default), secrets redacted, ready for a model card."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
    command = redact_command(argv)
    return f"{launcher} {command}" if launcher else command


class SecretFilter(logging.Filter):
    """Masks secrets in every record a handler emits (attach it to the handlers, so child loggers are covered)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
