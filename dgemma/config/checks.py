"""The checks every config file shares: one error type, value tests and a bounded JSON reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DgemmaError

class ConfigError(DgemmaError, ValueError):
    """A config file or value that dgemma cannot use. The message names the file and the field."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def int_in(name: str, value, lo: int, hi: int) -> None:
    require(is_int(value) and lo <= value <= hi, f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def as_object(value, name: str) -> dict:
    """A JSON object, or {} for a missing (null) one."""
    if value is None:
        return {}
    require(isinstance(value, dict), f"{name} must be an object, got {type(value).__name__}")
    return value


def as_number(value, name: str) -> float:
    require(is_num(value), f"{name} must be a finite number, got {value!r}")
    return float(value)


# Upper bounds on sizes read from config.json: about ten times the released model's, yet small enough that a hostile

MAX_JSON_BYTES = 64 * 2**20  # configs and shard indexes are kilobytes


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config file "
                          f"(at most {MAX_JSON_BYTES // 2**20} MiB)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a config file (JSON nested too deeply)") from None
