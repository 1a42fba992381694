"""The one exception type a user can cause; the CLI prints its message and exits non-zero."""


class CwaError(Exception):
    """A problem with the user's input or environment, stated in one sentence."""


def argument_error(verb: str, exc: Exception) -> CwaError:
    """jsonargparse's multi-line message as one sentence naming the option (no usage dump)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("- Expected a <class 'NoneType'>")]
    text = " ".join(lines).replace('Parser key "', "option --").replace('":', ":", 1)
    return CwaError(f"{text.rstrip('.')} (see `cwa {verb} -h`).")
