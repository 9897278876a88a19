"""The one error type the host side raises for bad input; the CLI prints it as one line."""


class ExportError(Exception):
    """Bad input or a failed check: the message says what was wrong and what to do."""
