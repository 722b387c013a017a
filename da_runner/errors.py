"""Errors that are the user's to fix (bad config, missing files, bad checkpoint).

The CLI prints them as one short message without a traceback; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in the message."""


class MissingDataError(UserError):
    """Dataset files that are not where the data config looks for them."""


def missing_data_message(root, missing: dict, hints=()) -> str:
    """One message naming every missing path of every dataset ({dataset: [paths]}), then `hints`
    on how to get them."""
    lines = [f"dataset files not found under data.root={root}. Missing:"]
    for name, paths in missing.items():
        lines += [f"  {p}   ({name})" for p in paths]
    return "\n".join([*lines, *hints])
