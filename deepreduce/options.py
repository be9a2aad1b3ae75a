"""Declared, validated options of sparsifiers and codecs.

Every configurable component lists its options as :class:`Option` objects, so the
same declaration parses spec strings (``"bloom:fpr=1e-3,policy=p2"``), checks keyword
arguments, and prints help in ``deepreduce codecs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str = ""
    choices: Sequence[Any] | None = None
    check: Callable[[Any], bool] | None = None
    check_text: str = ""

    def coerce(self, owner: str, raw: Any) -> Any:
        if raw is None and self.default is None:
            return None
        try:
            if self.type is bool and isinstance(raw, str):
                lowered = raw.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                value = lowered in ("1", "true", "yes")
            elif self.type is int and isinstance(raw, (str, float)):
                number = float(raw)  # accepts "1e3" as well as "1000"
                if not number.is_integer():
                    raise ValueError(raw)
                value = int(number)
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{owner}: option {self.name!r} must be {self.type.__name__}, got {raw!r}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{owner}: option {self.name!r} must be one of {list(self.choices)}, got {value!r}"
            )
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{owner}: option {self.name!r} {self.check_text}, got {value!r}")
        return value


def resolve_options(owner: str, declared: Sequence[Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Coerce and validate ``given`` against ``declared``; fill defaults; reject unknown names."""
    names = {p.name: p for p in declared}
    unknown = sorted(set(given) - set(names))
    if unknown:
        accepted = ", ".join(sorted(names)) or "none"
        raise ConfigError(f"{owner}: unknown option(s) {unknown}; accepted: {accepted}")
    return {
        p.name: p.coerce(owner, given[p.name]) if p.name in given else p.default for p in declared
    }


def format_options(values: Mapping[str, Any], declared: Sequence[Option]) -> str:
    """``k=v`` pairs of the options that differ from their defaults, in declaration order."""
    parts = []
    for param in declared:
        value = values.get(param.name, param.default)
        if value != param.default:
            parts.append(f"{param.name}={value!r}" if isinstance(value, str) and "," in value else f"{param.name}={value}")
    return ",".join(parts)


def positive(value: Any) -> bool:
    return value > 0


def probability(value: Any) -> bool:
    return 0.0 < value < 1.0
