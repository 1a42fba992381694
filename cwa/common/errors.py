"""The one exception type a user can cause; the CLI prints its message and exits non-zero."""

import re


class CwaError(Exception):
    """A problem with the user's input or environment, stated in one sentence."""


def cwa_cause(exc: BaseException) -> CwaError | None:
    """The CwaError behind ``exc``, when one is in its chain of causes: jsonargparse wraps an error raised by
    a class it instantiates (``probes must be at least 1``) in its own union-type messages."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CwaError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def argument_error(verb: str, exc: Exception) -> CwaError:
    """jsonargparse's multi-line message as one sentence naming the option (no usage dump).

    An option that takes a short name or a class (``--perturbation``, ``--controls``, ``--model.metric``'s
    kind of union) gets ``unknown perturbation 'shuffle' for --perturbation: use zero, sign_flip, ... or a
    class_path``, with the names read from the option's ``Literal`` and the noun from its base class.
    """
    text = str(exc)
    key = re.match(r'Parser key "([^"]+)"', text)
    given = re.findall(r"(?:Given|Got) value: (.*)$", text, flags=re.MULTILINE)
    if key and given:
        choice = _unknown_choice(key.group(1), given[-1].strip(), text)
        if choice:
            return CwaError(f"{choice} (see `cwa {verb} -h`).")
    nested = re.search(
        r"class_path '[\w.]+\.(\w+)':\s*Parser key \"(\w+)\":\s*Expected a <class '(\w+)'>\. Got value: (\S+)",
        text,
    )
    if key and nested:
        cls, option, kind, value = nested.groups()
        return CwaError(f"--{key.group(1)}.{option} of {cls} expects a {kind}, not {value!r} (see `cwa {verb} -h`).")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("- Expected a <class 'NoneType'>")]
    text = " ".join(lines).replace('Parser key "', "option --").replace('":', ":", 1)
    return CwaError(f"{text.rstrip('.')} (see `cwa {verb} -h`).")


def _unknown_choice(key: str, given: str, text: str) -> str | None:
    """The sentence for a value that is neither one of a union's short names nor a class, or None."""
    names = re.search(r"Literal\[([^\]]*)\]", text)
    base = re.search(r"<class '[\w.]+\.(\w+)'>", text)
    if not (names and base and "import path" in text):
        return None
    choices = [n.strip().strip("'\"") for n in names.group(1).split(",")]
    if given.strip("[]'\" ") in choices:  # a known name: the error is about something else
        return None
    listed = ", ".join(choices)
    return f"unknown {base.group(1).lower()} {given!r} for --{key}: use {listed} or a class_path"
