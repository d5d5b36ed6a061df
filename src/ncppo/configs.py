"""Typed config dataclasses <-> command-line flags <-> YAML files.

One dataclass per command: each field is a YAML key (`snake_case` or `kebab-case`) and a flag
(`--kebab-case`), with its help text in `field(metadata={"help": ...})` and, where the values are
a fixed set, `metadata={"choices": [...]}`. Precedence: dataclass default < YAML file < flag.
Unknown YAML keys and invalid values fail before any work, naming the key or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the flag."""


# Names every `--model` (and YAML `model:`) takes besides hub ids and folders: folders shipped with
# ncppo, relative to the package. `toy`: the toy world's tiny SD pipeline (./toy for a folder of that name).
MODEL_ALIASES = {"toy": ("toy", "assets", "base")}


def resolve_model(value):
    """The folder a `--model` alias names (`toy`: the shipped toy base), else `value` unchanged."""
    if isinstance(value, str) and value in MODEL_ALIASES:
        return str(Path(__file__).parent.joinpath(*MODEL_ALIASES[value]))
    return value


def option(default, help: str, **meta):
    """A config field with its --help text (and optional `choices`); list defaults are copied."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X`, `X | None`, `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_list(inner):
    def parse(text: str):
        return [inner(x.strip()) for x in str(text).split(",") if x.strip()]

    parse.__name__ = f"comma-separated {getattr(inner, '__name__', 'value')} list"
    return parse


def _converter(tp):
    tp, optional = _base_type(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (str,))[0]
        conv = _parse_list(inner)
    elif tp in (int, float, str):
        conv = tp
    elif tp is bool:
        conv = _parse_bool
    else:
        conv = str
    if optional:
        inner_conv = conv

        def conv(text):  # noqa: F811 - "none"/"null" means None for optional fields
            if isinstance(text, str) and text.strip().lower() in ("none", "null", ""):
                return None
            return inner_conv(text)

    return conv


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass `cls`; defaults are shown in --help, not applied here
    (they are applied by `config_from_args`, after the YAML file)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        base, _ = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata.get("help", "")
        if f.name == "model":
            help_text += f" ({', '.join(MODEL_ALIASES)} = the tiny SD pipeline shipped with ncppo)"
        if required:
            help_text += " (required)"
        elif not re.search(r"\bdefault", help_text, re.IGNORECASE):  # else the help states its default itself
            help_text += f" (default: {'none' if shown == '' else shown})"
        help_text = help_text.replace("%%", "%").replace("%", "%%")  # argparse %-formats help: "~30%" broke it
        kwargs: dict[str, Any] = dict(help=help_text, default=argparse.SUPPRESS, dest=f.name)
        if base is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs.update(type=_converter(tp))
            if "choices" in f.metadata:  # argparse then shows {a,b,...} as the metavar
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        parser.add_argument(flag(f.name), **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls, values: dict[str, Any], source: str = "config"):
    """Instantiate `cls` from a {field: value} dict, converting strings and naming bad keys."""
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r} ({flag(key)}); see --help for the valid ones")
        tp = hints[key]
        base, optional = _base_type(tp)
        try:
            if value is None and optional:
                pass
            elif typing.get_origin(base) in (list, tuple):
                if isinstance(value, str):
                    value = _converter(tp)(value)
                else:
                    inner = (typing.get_args(base) or (str,))[0]
                    value = [inner(v) for v in value]
            elif base is bool:
                value = _parse_bool(value)
            elif base in (int, float, str):
                if base is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"not an integer: {value}")
                value = base(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{flag(key)}: invalid value {value!r} ({err})") from None
        choices = names[key].metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag(key)}: {value!r} is not one of {list(choices)}")
        kwargs[key] = resolve_model(value) if key == "model" else value
    missing = [n for n, f in names.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing required " + ", ".join(flag(m) for m in missing))
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_from_args(cls, args: argparse.Namespace, config_path: str | Path | None = None):
    """Merge dataclass defaults, the YAML file at `config_path` and the flags given in `args`."""
    values: dict[str, Any] = {}
    if config_path:
        values.update(load_yaml(config_path))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return build_config(cls, values, source=f"--config {config_path}" if config_path else "flags")

