"""One exception for problems the user can fix (bad config, missing file, no network...).

The CLIs catch it and print a single line `error: <message>` with a non-zero exit and no traceback.
Messages name the problem *and* the fix, e.g. "rank must be a positive integer, got 0: pass --rank 8".
"""


class UserError(Exception):
    pass
