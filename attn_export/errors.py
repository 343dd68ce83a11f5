"""The one exception type a user may see: its message is printed as one line and the CLI exits with 2."""


class UserError(Exception):
    """Bad input or an environment that cannot do what was asked (not a bug in attn-export)."""
