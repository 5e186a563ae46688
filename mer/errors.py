"""The error a user can fix (bad input, missing files, a wrong setting)."""


class UserError(Exception):
    """A problem the user can fix: the scripts report it as one line and exit with code 2."""
