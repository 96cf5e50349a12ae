"""The CLI's own failures: something the user can fix, printed as one line (exit status 1)."""


class CliError(Exception):
    pass
