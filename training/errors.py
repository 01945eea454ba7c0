"""The project's own error type for mistakes a user can make (bad input, bad config, missing files).

Entry scripts catch `UserError` and print its message as one line, with no traceback; anything else
is a bug in this project and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what to do."""


# The end of every refusal of a checkpoint that another version of the code wrote (a parameter tree or a saved model
# spec this code does not build): one wording, so the advice cannot drift between the places that detect it.
OTHER_VERSION = "it was written by another version of the code; sample or resume it with that version"
