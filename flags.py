"""Command-line flags declared once, as dataclass fields.

    flag(help, default, ...) -> dataclasses.field     a field that is also a flag
    flag_fields(cls), flag_name(field)                 the flag fields of a dataclass, a field's flag
    add_flags(parser, cls, ...)                        one argparse argument per flag field
    parsed_value(field, value)                         a parsed flag's value as the field holds it

A field's metadata holds its flag's help text, type and choices, and the parser is generated from
the fields, so a setting is one field and its default is written once. The training flags
(train_config.TrainConfig) and the augmentation flags (augment.AugmentationConfig) are both built
here. This module imports no other project module: both of those build on it.
"""
import dataclasses


def flag(help, default=None, *, required=False, kind=None, choices=None, action=None, const=None, name=None,
         metavar=None):
    """A dataclass field that is also a command-line flag.

    Args:
      help: help text; ``%(default)s`` shows argparse's default, ``{default}`` the field's (for flags
        whose argparse default is None, see add_flags), other ``{name}`` fields what add_flags is given.
      default: the field's (and the flag's) default.
      required: the flag must be given (the field then has no default).
      kind: the argparse type (int, float; None = str), or "binary" for a 0/1 flag stored as bool.
      choices, action, metavar: passed to argparse.
      const: the value of the flag given bare (``--flag`` without a value).
      name: the flag's name when it is not the field's (``--<name>``).
    """
    metadata = {"help": help, "kind": kind, "choices": choices, "action": action, "required": required,
                "const": const, "name": name, "metavar": metavar}
    if required:
        return dataclasses.field(metadata={"flag": metadata})
    return dataclasses.field(default=default, metadata={"flag": metadata})


def flag_fields(cls):
    """The fields of the dataclass ``cls`` that are flags, in declaration order."""
    return [field for field in dataclasses.fields(cls) if "flag" in field.metadata]


def flag_name(field):
    """The flag of a field, without its dashes (also the argparse namespace attribute)."""
    return field.metadata["flag"]["name"] or field.name


def parsed_value(field, value):
    """A parsed flag's value as the field holds it: a 0/1 flag as bool."""
    return bool(value) if field.metadata["flag"]["kind"] == "binary" else value


def add_flags(parser, cls, exclude=(), overrides=False, **help_values):
    """Add one argument per flag field of the dataclass ``cls`` to ``parser`` (or an argument group).

    Args:
      exclude: names of fields whose flags are left out.
      overrides: the flags override values that come from elsewhere (a file): their argparse default
        is None, meaning "not given", and their help shows the field's default through ``{default}``.
      help_values: the values of the other ``{name}`` fields in the help texts.
    """
    for field in flag_fields(cls):
        if field.name in exclude:
            continue
        spec = field.metadata["flag"]
        binary = spec["kind"] == "binary"
        options = {"help": spec["help"].format(default=field.default, **help_values)}
        if spec["action"]:
            options["action"] = spec["action"]
        else:
            options["type"] = int if binary else spec["kind"]
            options["choices"] = (0, 1) if binary else spec["choices"]
            if spec["metavar"]:
                options["metavar"] = spec["metavar"]
            if spec["const"] is not None:
                options.update(nargs="?", const=spec["const"])
            if spec["required"]:
                options["required"] = True
            elif overrides:
                options["default"] = None
            else:
                options["default"] = int(field.default) if binary else field.default
        parser.add_argument(f"--{flag_name(field)}", **options)
    return parser
