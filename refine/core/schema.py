"""Typed configs shared by both stages: choice fields as ``StrEnum``, one-line errors, and loading a dict into a
dataclass schema.

A ``StrEnum`` member equals its string (``Loss.kld == "kld"``, same hash, same JSON), so code and on-disk records
keep reading plain strings, while OmegaConf rejects any other value when the config is composed. ``Checked`` does
the same for a dataclass built directly in Python (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import typing
from enum import StrEnum, auto

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from refine.core.errors import InputError

T = typing.TypeVar("T")


class Dtype(StrEnum):
    """A model's weights/compute dtype (``refine.core.forward.DTYPES``)."""
    float32 = auto()
    bfloat16 = auto()
    float16 = auto()


def not_one_of(key: str, value: object, choices: typing.Iterable) -> str:
    return f"bad config: {key}={value!r} is not one of {' | '.join(str(c) for c in choices)}"


class Checked:
    """Base of the config dataclasses: on construction, a choice field given as a string becomes its ``StrEnum``
    member, and any other string is an ``InputError`` naming the valid ones."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):   # type: ignore[arg-type]
            kind, value = hints.get(f.name), getattr(self, f.name)
            if isinstance(kind, type) and issubclass(kind, StrEnum) and not isinstance(value, kind):
                if value not in set(kind):
                    raise InputError(not_one_of(f"{type(self).__name__}.{f.name}", value, kind))
                setattr(self, f.name, kind(value))


def one_line(e: OmegaConfBaseException) -> str:
    """An OmegaConf error as one ``bad config: ...`` line: a bad choice names its key, value and the choices."""
    node, key = getattr(e, "child_node", None), getattr(e, "full_key", None)
    kind = getattr(node, "enum_type", None)
    if kind is not None and key:
        return not_one_of(key, getattr(e, "value", None), kind)
    msg = str(e).splitlines()[0]
    return f"bad config: {msg}" + (f" (key: {key})" if key and key not in msg else "")


def find_omegaconf_error(e: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error at the root of ``e`` (Hydra wraps them), or None."""
    while e is not None and not isinstance(e, OmegaConfBaseException):
        e = e.__cause__ or e.__context__
    return e


def to_typed(schema: type[T], cfg: typing.Any) -> T:
    """``cfg`` (a composed DictConfig or a plain dict) merged onto ``schema``'s defaults and resolved: unknown keys,
    wrong types and bad choices are one ``InputError`` line."""
    if OmegaConf.is_config(cfg):   # as plain data: Hydra lets `+key=` add a key to a typed node, which would pass
        cfg = OmegaConf.to_container(cfg, resolve=False)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise InputError(one_line(e)) from None
