"""The kind of error a user can act on: bad input (a configuration, a dataset, an image, a file) or a run that went
wrong (a diverging loss). Its message says what went wrong and what to do; the recipes show it as the one line
``error: <message>`` (:func:`ncl_hub.cli.run_recipe`), a traceback only when asked for. Any other exception is a
bug or a case ncl_hub does not handle, and says so."""
__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message names the problem and what to do about it (see the module docstring)."""
