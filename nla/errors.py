"""The one user-facing error type.

Every refusal the user can act on is an `NLAError` whose message is one line naming the
problem and the fix; the CLI prints it and exits 2. Anything else is a bug and keeps its
traceback.
"""


class NLAError(RuntimeError):
    """A user-facing error: one line that names the problem and the fix."""
