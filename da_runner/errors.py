"""Errors that are the user's to fix (bad config, missing files, bad checkpoint).

The CLI prints them as one short message without a traceback; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in the message."""
