"""The project's own error type for mistakes a user can make (bad input, bad config, missing files).

Entry scripts catch `UserError` and print its message as one line, with no traceback; anything else
is a bug in this project and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""
