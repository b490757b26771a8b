"""Configuration dataclasses are the schema: each field carries its default, its help text, its
bounds and, where the two training stages differ, stage 1's default. The command-line flags of
the experiments are generated from these fields (``experiments/flags.py``), and
:func:`from_values` builds a configuration back from parsed flags, refusing a field that has no
value (a renamed flag cannot be skipped silently).

    @dataclass
    class MyConfig:
        weight: float = option(2.5, "A loss weight.", stage1=3.0, lower_bound=0.0)

    for_stage(MyConfig, 1).weight == 3.0
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Optional, Sequence

__all__ = ["CACHE_DIR", "ConfigError", "option", "is_option", "option_fields", "field_type", "stage_default", "for_stage",
           "from_values", "to_dict"]


# Default root of run outputs (snapshots, visuals, evaluations): the repository's cachedir/ for a
# checkout (an editable install), or $UMR_CACHE_DIR.
CACHE_DIR = os.environ.get("UMR_CACHE_DIR") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                            "cachedir")


class ConfigError(ValueError):
    """A configuration that cannot be built from the values given (a missing or unknown field)."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, stage1: Any = dataclasses.MISSING,
           stages: Sequence[int] = (1, 2), lower_bound: Optional[float] = None, choices: Optional[Sequence[str]] = None,
           flag: bool = True, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with what a command-line flag needs.

    Args:
        default: the default (stage 2's where ``stage1`` is given).
        help: the flag's help text: what the option does.
        stage1: stage 1's default, where it differs.
        stages: the training stages that have this option (its flag is defined only for them).
        lower_bound: smallest accepted value (numbers).
        choices: accepted values (strings): an enum flag.
        flag: False for a field that is not a flag of its own (set from other flags or in code).
    """
    metadata = {"help": help, "stage1": stage1, "stages": tuple(stages), "lower_bound": lower_bound,
                "choices": tuple(choices) if choices else None, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_option(f: dataclasses.Field) -> bool:
    return "help" in f.metadata


def option_fields(cls, stage: Optional[int] = None) -> list:
    """The fields of ``cls`` that are flags (of ``stage``, if given)."""
    return [f for f in dataclasses.fields(cls)
            if is_option(f) and f.metadata["flag"] and (stage is None or stage in f.metadata["stages"])]


def stage_default(f: dataclasses.Field, stage: Optional[int] = None) -> Any:
    """The field's default for ``stage`` (stage 1's where it has one)."""
    if stage == 1 and f.metadata.get("stage1", dataclasses.MISSING) is not dataclasses.MISSING:
        return f.metadata["stage1"]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ConfigError(f"{f.name} has no default")


def field_type(cls, f: dataclasses.Field):
    """The field's type with ``Optional[...]`` removed, as a class (bool, int, float, str, ...)."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def for_stage(cls, stage: int, **overrides):
    """``cls`` with ``stage``'s defaults, then ``overrides``."""
    values = {f.name: stage_default(f, stage) for f in dataclasses.fields(cls) if is_option(f) and f.init}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    values.update(overrides)
    return cls(**values)


def from_values(cls, values: Any, stage: Optional[int] = None, **overrides):
    """``cls`` from parsed flags (an absl FlagValues or a mapping): every flag field of ``stage``
    must have a value; fields of the other stage take ``stage``'s defaults; ``overrides`` (e.g.
    fields that are not flags) are passed as they are."""
    get = values.get if isinstance(values, Mapping) else (lambda name, default=None: getattr(values, name, default))
    has = (lambda name: name in values) if isinstance(values, Mapping) else (lambda name: hasattr(values, name))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not is_option(f) or not f.init or f.name in overrides:
            continue
        wanted = f.metadata["flag"] and (stage is None or stage in f.metadata["stages"])
        if wanted:
            if not has(f.name):
                raise ConfigError(f"{cls.__name__}.{f.name} has no flag --{f.name} among the parsed flags")
            kwargs[f.name] = get(f.name)
        else:
            kwargs[f.name] = stage_default(f, stage)
    kwargs.update(overrides)
    return cls(**kwargs)


def to_dict(config) -> dict:
    """A configuration (nested dataclasses) as a JSON-able dict."""
    return dataclasses.asdict(config)
