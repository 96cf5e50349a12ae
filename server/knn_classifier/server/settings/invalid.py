"""What start-up prints for settings that do not validate: one line per problem, naming the
environment variable, and never the values given (pydantic's own text quotes them, secrets
included, and links to its documentation)."""

from __future__ import annotations

import re

from pydantic import ValidationError
from pydantic_settings import SettingsError

_UNPARSED_FIELD = re.compile(r'error parsing value for field "(\w+)"')


def describe(error: ValidationError | SettingsError) -> str:
    lines = ["invalid settings:"]
    if isinstance(error, SettingsError):  # a value given as JSON (a nested setting) that is not
        found = _UNPARSED_FIELD.search(str(error))
        name = f"KNN_{found.group(1).upper()}" if found else "a KNN_ variable"
        cause = f": {error.__cause__}" if error.__cause__ else ""  # JSON's error names no value
        lines.append(f"  {name}: not valid JSON{cause}")
        return "\n".join(lines)
    for problem in error.errors(include_url=False, include_input=False):
        message = problem["msg"].removeprefix("Value error, ")
        names = [part.upper() for part in problem["loc"] if isinstance(part, str)]
        lines.append(f"  KNN_{'__'.join(names)}: {message}" if names else f"  {message}")
    return "\n".join(lines)
