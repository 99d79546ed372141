"""Command-line flags generated from a config dataclass, so the two never drift apart.

Each field becomes `--field-name` with the field's type and default; its help text is the
field's `metadata['help']` (plain text; `metadata` may also give `metavar` and `choices`).
Supported annotations: int, float, str, bool (a --x / --no-x pair), `X | None` (default
None), and list[str] / list[int] / list[float] (one or more values). A field without a
default is a required flag. `args_to_config` builds the dataclass back from the parsed
namespace.
"""

import argparse
from dataclasses import MISSING, Field, fields, is_dataclass
import types
import typing
from typing import Any, TypeVar

T = TypeVar('T')
SCALARS = (int, float, str)


def _scalar(annotation: Any) -> tuple[Any, bool, bool]:
    """(scalar type, optional, is list) of a supported annotation; TypeError otherwise."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f'unsupported annotation {annotation!r}')
        annotation, optional = members[0], True
        origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if item not in SCALARS:
            raise TypeError(f'unsupported list item type {item!r}')
        return item, optional, True
    if annotation is bool or annotation in SCALARS:
        return annotation, optional, False
    raise TypeError(f'unsupported annotation {annotation!r}')


def _default(field: Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                            exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls` (see the module docstring)."""
    if not is_dataclass(cls):
        raise TypeError(f'{cls!r} is not a dataclass')
    hints = typing.get_type_hints(cls)
    for field in fields(cls):
        if field.name in exclude:
            continue
        kind, optional, many = _scalar(hints[field.name])
        flag = '--' + field.name.replace('_', '-')
        default = _default(field)
        text = field.metadata.get('help', '')
        if default is MISSING:
            options: dict[str, Any] = {'required': True}
        else:
            options = {'default': default}
            if default is not None and not isinstance(default, bool) and text:
                text += f' (default {default})'
        options['help'] = text.replace('%', '%%')      # argparse formats help with %
        if kind is bool and not many:
            options['action'] = argparse.BooleanOptionalAction
        else:
            options['type'] = kind
            if many:
                options['nargs'] = '+'
            if field.metadata.get('metavar'):
                options['metavar'] = field.metadata['metavar']
            if field.metadata.get('choices'):
                options['choices'] = field.metadata['choices']
        if optional and default is MISSING:
            raise TypeError(f'{cls.__name__}.{field.name}: an optional field needs a default')
        parser.add_argument(flag, **options)


def args_to_config(args: argparse.Namespace, cls: type[T], **overrides: Any) -> T:
    """The dataclass `cls` from the parsed flags of `add_dataclass_arguments` (fields the
    namespace lacks keep their defaults; `overrides` win)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
