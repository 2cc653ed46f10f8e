"""One line for the first problem pydantic found in a YAML document (policy.yaml, a
workflow file): the dotted key, what is wrong, a "did you mean" for a typo, and how many
more problems there are. The caller adds the file and line (``LineMap.line_for(loc)``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

Loc = tuple[str | int, ...]


def known_keys(root: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the model accepts at the mapping that contains ``loc``'s last key."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:  # a free-form key, such as an agent's name under `agents`
            if model is root:
                return []
            continue
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        nested = next((a for a in (annotation, *args)
                       if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def first_problem(
    exc: ValidationError, root: type[BaseModel], *, no_match_hint: str = "",
    plain_messages: bool = False, loc_of: Callable[[dict[str, Any]], Loc] | None = None,
) -> tuple[str, Loc]:
    """The message and location of the problem to report. ``plain_messages`` drops
    pydantic's "Value error, " prefix; ``loc_of`` may point an error at another key."""
    errors = exc.errors()
    # An unknown key usually explains a "missing" one (a typo): report it first.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc: Loc = tuple(loc_of(dict(err)) if loc_of else err["loc"])
    dotted = ".".join(map(str, loc)) or "(top level)"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), known_keys(root, loc), n=1)
        hint = f"did you mean {close[0]!r}?" if close else no_match_hint
        msg = f"{dotted}: unknown key{'; ' + hint if hint else ''}"
    elif err["type"] == "missing":
        msg = f"{dotted}: required key is missing"
    else:
        text = str(err["msg"])
        msg = f"{dotted}: {text.removeprefix('Value error, ') if plain_messages else text}"
    more = len(errors) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return msg, loc
