"""One exception type for bad input, so the CLI and notebooks can show it as a single clear line.

Every check in `marl_utils` that rejects user input raises `MarlInputError` with a message that says
(1) what was wrong and (2) how to fix it, and raises it before any long work starts.
"""


class MarlInputError(ValueError):
    """Bad input from the user: a wrong path, a mismatched adapter, an impossible setting."""
