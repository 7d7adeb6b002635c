"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""


class LowbitError(ValueError):
    pass
