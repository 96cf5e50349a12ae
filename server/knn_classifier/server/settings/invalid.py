"""What start-up prints for settings that do not validate: one line per problem, naming the
environment variable, and never the values given (pydantic's own text quotes them, secrets
included, and links to its documentation)."""

from __future__ import annotations

from pydantic import ValidationError


def describe(error: ValidationError) -> str:
    lines = ["invalid settings:"]
    for problem in error.errors(include_url=False, include_input=False):
        message = problem["msg"].removeprefix("Value error, ")
        names = [part.upper() for part in problem["loc"] if isinstance(part, str)]
        lines.append(f"  KNN_{'__'.join(names)}: {message}" if names else f"  {message}")
    return "\n".join(lines)
