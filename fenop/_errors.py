"""InputError: the base of the errors that say a user's input cannot be used.

A store, a configuration, a checkpoint, a mesh, a device or an argument that fenop
refuses raises a subclass of :class:`InputError` (itself a ``ValueError``) whose
message names the input and the problem. The ``fenop`` command reports these in one
line with exit status 2; any other exception is a fault of fenop's and keeps its
traceback.
"""


class InputError(ValueError):
    """Input that fenop cannot use; the message names it and says why."""
