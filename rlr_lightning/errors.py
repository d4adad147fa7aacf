"""Error messages a user can act on: one line that names the option, the bad value and what is valid.

* :func:`quote_prompt` quotes a prompt (or caption) in a message: at most its first 80 characters, so a long
  prompt does not bury the message.
* :func:`short_config_error` turns jsonargparse's nested dumps (union subtypes, ``Namespace(...)`` values,
  several lines per level of nesting) into that one line, for ``rlr fit`` / ``rlr validate``.
* :func:`yaml_syntax_error` names a config file and the line where its YAML breaks (jsonargparse parses the
  file's text and reports only ``"<unicode string>", line N``).
* :func:`directory_problem` / :func:`image_file_problem` say, before a run starts, why an output path cannot
  be written, so that a long run does not fail at its end.

Only the standard library at import: the module is imported by light modules (the shapes world, the data).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

#: How many characters of a prompt an error message quotes.
PROMPT_QUOTE_LIMIT = 80


def quote_prompt(prompt: Any, limit: int = PROMPT_QUOTE_LIMIT) -> str:
    """``repr`` of a prompt cut to its first ``limit`` characters (and its length, when cut), for messages.

    Args:
        prompt: The prompt; anything else (a malformed value) is quoted by its ``repr``, cut the same way.
        limit: The most characters of the prompt quoted.
    """
    if isinstance(prompt, str):
        if len(prompt) <= limit:
            return repr(prompt)
        return f"{prompt[:limit]!r}... ({len(prompt)} characters)"
    text = repr(prompt)
    return (
        text if len(text) <= limit else f"{text[:limit]}... ({type(prompt).__name__}, {len(text)} characters)"
    )


# -- jsonargparse errors -----------------------------------------------------------------------------------

_UNION = "Does not validate against any of the Union subtypes"
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)'")
_GIVEN_CLASS_PATH = re.compile(r"(?:Given|Got) value: Namespace\(class_path='([^']+)'")
_GOT_IMPORT_PATH = re.compile(r"Got value: ([\w.]+)\s*$")
_SUBTYPES = re.compile(r"^Subtypes: \[(.*)\]$", re.M)
_EXPECTED = re.compile(r"^Expected a (.+?)\. Got value: (.*)$", re.S)
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_NOT_A_SUBCLASS = re.compile(
    r"^Import path (\S+) does not (?:correspond to a subclass of|implement protocol)"
)
_CLASS = re.compile(r"^<class '([\w.]+)'>$")
#: The most classes an error lists (Lightning exports some twenty callbacks).
_MAX_LISTED = 15
_BUILTIN_TYPES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "NoneType": "null",
}


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while err is not None and not any(err is seen for seen in chain):
        chain.append(err)
        err = (
            err.__cause__
            if err.__cause__ is not None
            else (None if err.__suppress_context__ else err.__context__)
        )
    return chain


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (a list of type names as jsonargparse prints it)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _describe_type(text: str) -> str:
    """A type as jsonargparse prints it (``<class 'int'>``, ``typing.Literal['a', 'b']``), in words."""
    text = text.strip()
    match = _CLASS.match(text)
    if match:
        name = match.group(1).rsplit(".", 1)[-1]
        return _BUILTIN_TYPES.get(name, f"a {name}")
    if text.startswith(("typing.Literal[", "Literal[")):
        values = [v.strip("'\"") for v in _split_top_level(text[text.index("[") + 1 : -1])]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    return text.replace("typing.", "")


def import_class(class_path: str) -> type | None:
    """The class a dotted ``class_path`` names, or ``None`` when it names none (no such module or attribute,
    or not a class)."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


def _init_options(cls: type) -> list[str]:
    """The ``init_args`` a class takes, following ``**kwargs`` up to its bases as jsonargparse does."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            break
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names += [p.name for p in params if p.kind in kinds and p.name != "self" and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


def _known_subclasses(base: type) -> list[str]:
    """The concrete subclasses of ``base`` its package exports (``rlr_lightning.estimators.RLR``, ...)."""
    package_name = base.__module__.rpartition(".")[0] or base.__module__
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        return []
    names = getattr(package, "__all__", None) or [n for n in dir(package) if not n.startswith("_")]
    found = []
    for name in names:
        obj = getattr(package, name, None)
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not inspect.isabstract(obj):
            found.append(f"{package_name}.{name}")
    return found


def _union_base(chain: list[BaseException]) -> type | None:
    """The first class among the outermost union's subtypes (``GradientEstimator`` for ``model.estimator``)."""
    for err in chain:
        match = _SUBTYPES.search(str(err))
        if match is None:
            continue
        for subtype in _split_top_level(match.group(1)):
            class_match = _CLASS.match(subtype)
            if class_match and class_match.group(1) not in ("NoneType", "builtins.NoneType"):
                cls = import_class(class_match.group(1))
                if cls is not None and cls.__module__ != "builtins":
                    return cls
        return None
    return None


def _key_of_class_path(config: Any, class_path: str) -> str | None:
    """The config key whose ``class_path`` is ``class_path``, if exactly one is."""
    try:
        keys = [
            key[: -len(".class_path")]
            for key, value in config.items()
            if key.endswith(".class_path") and value == class_path
        ]
    except (AttributeError, TypeError):
        return None
    return keys[0] if len(keys) == 1 else None


def short_config_error(err: BaseException, config: Any = None) -> str | None:
    """One line for an error jsonargparse raised while parsing or instantiating a config, or ``None`` when
    ``err`` is not such an error (its message is then already the library's own).

    The line names the option (``--model.estimator.init_args.zo_mode``), the value given and what is valid:
    the allowed values of a typed option, the options a class takes, or the classes a class path may name.

    Args:
        err: The error, as raised (its ``__cause__`` chain leads to the failing value).
        config: The parsed config, to name the option of an error raised while instantiating a class (the
            error names only the class).
    """
    chain = _chain(err)
    texts = [str(e).strip() for e in chain]
    if not any(_UNION in t or _PARSER_KEY.match(t) or _CLASS_PATH.match(t) for t in texts):
        return None
    option, last_key, class_path, class_since_key = None, None, None, False
    for text in texts:
        key_match, class_match = _PARSER_KEY.match(text), _CLASS_PATH.match(text)
        if key_match and key_match.group(1) != last_key:
            key = key_match.group(1)
            option = key if option is None else f"{option}{'.init_args' if class_since_key else ''}.{key}"
            last_key, class_since_key = key, False
        if class_match:
            class_path, class_since_key = class_match.group(1), True
    if class_path is None:  # an error raised by a class's __init__: the union names the class it was given
        given = next((m.group(1) for m in map(_GIVEN_CLASS_PATH.search, texts) if m), None)
        if given is not None:
            class_path = given
            if option is None and config is not None:
                option = _key_of_class_path(config, given)
    flag = f"--{option}" if option else (class_path or "the config")
    leaf = texts[-1]
    # jsonargparse's own wording for a value of a nested union: describe every alternative, not the first.
    nested_union = next((t for t in reversed(texts) if t.startswith(_UNION)), None)

    not_accepted = _NOT_ACCEPTED.match(leaf)
    if not_accepted:
        name = not_accepted.group(1)
        if class_path is None:
            return f"{flag}: no option {name!r}"
        options = _class_options(class_path)
        close = difflib.get_close_matches(name, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (
            f"{flag}.init_args.{name}: {class_path} has no option {name!r}{hint}; "
            f"its options: {', '.join(options) or 'none'}"
        )

    expected = _EXPECTED.match(leaf)
    if expected:
        value = expected.group(2).strip()
        if nested_union is not None and texts.index(nested_union) > max(
            (i for i, t in enumerate(texts) if _PARSER_KEY.match(t)), default=-1
        ):
            subtypes = _SUBTYPES.search(nested_union)
            valid = (
                " or ".join(_describe_type(t) for t in _split_top_level(subtypes.group(1)))
                if subtypes
                else ""
            )
        else:
            valid = _describe_type(expected.group(1))
        return f"{flag} {value}: expected {valid}"

    base = _union_base(chain)
    known = _known_subclasses(base) if base is not None else []
    listed = ", ".join(known[:_MAX_LISTED]) + (
        f" and {len(known) - _MAX_LISTED} more" if len(known) > _MAX_LISTED else ""
    )
    valid_classes = f"; {base.__name__} classes: {listed}" if base is not None and known else ""
    not_a_subclass = _NOT_A_SUBCLASS.match(leaf)
    if not_a_subclass and base is not None:
        return f"{flag} {not_a_subclass.group(1)}: not a {base.__name__}{valid_classes}"
    if class_path is None and isinstance(
        chain[-1], (ImportError, AttributeError)
    ):  # e.g. an optimizer callable
        class_path = next((m.group(1) for m in map(_GOT_IMPORT_PATH.search, texts) if m), None)
    if class_path is not None and isinstance(chain[-1], (ImportError, AttributeError)):
        # Suggest by class name: the package part of every candidate is alike.
        by_name = {path.rpartition(".")[2]: path for path in known}
        close = difflib.get_close_matches(class_path.rpartition(".")[2], list(by_name), n=1)
        hint = f" (did you mean {by_name[close[0]]}?)" if close else ""
        return f"{flag} {class_path}: no such class ({leaf.splitlines()[0]}){hint}{valid_classes}"
    if class_path is not None:
        if _UNION in leaf or _PARSER_KEY.match(leaf):  # no error of the class's own: the last readable line
            leaf = next(
                (t for t in reversed(texts) if not (t.startswith(_UNION) or _PARSER_KEY.match(t))), leaf
            )
        return f"{flag} {class_path}: {leaf}"
    first_line = next((line.strip(" -") for line in leaf.splitlines() if line.strip(" -")), leaf)
    return f"{flag}: {first_line}"


def _class_options(class_path: str) -> list[str]:
    cls = import_class(class_path)
    return _init_options(cls) if cls is not None else []


def yaml_syntax_error(path: str | os.PathLike) -> str | None:
    """Where a config file's YAML breaks (``--config FILE, line N, column M: ...``), or ``None`` if it parses.

    Only syntax errors: a file that cannot be read, or YAML that parses into something jsonargparse refuses,
    is left to jsonargparse's own message.
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        yaml.safe_load(text)
    except (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.composer.ComposerError) as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        context = ""
        if (
            err.context
            and err.context_mark is not None
            and (mark is None or err.context_mark.line != mark.line)
        ):
            context = f" ({err.context} at line {err.context_mark.line + 1})"
        return f"--config {path}, {where}: not valid YAML: {err.problem}{context}"
    except yaml.YAMLError:
        return None
    return None


# -- output paths ------------------------------------------------------------------------------------------


def directory_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used (created if need be, then written) as a directory, or ``None`` if it can.

    Remote locations (``s3://...``) are not checked: only their writer knows.
    """
    if "://" in str(path):
        return None
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why an image cannot be written to ``path`` (a directory, an unknown format, an unwritable place)."""
    from PIL import Image

    target = Path(path).expanduser()
    if target.is_dir():
        return f"{target} is a directory; give a file name such as {target / 'samples.png'}"
    Image.init()
    extensions = Image.registered_extensions()
    if target.suffix.lower() not in extensions:
        common = ", ".join(e for e in (".png", ".jpg", ".webp") if e in extensions)
        return f"{target.name!r} has no image file extension PIL can write (e.g. {common})"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{target} is not writable"
    return directory_problem(target.parent)
