"""The one exception type a user may see: its message is printed as one line and the CLI exits with 2."""


def one_line(text) -> str:
    """Any message (an exception's text included) folded onto one line."""
    return " ".join(str(text).split())


class UserError(Exception):
    """Bad input or an environment that cannot do what was asked (not a bug in attn-export)."""
