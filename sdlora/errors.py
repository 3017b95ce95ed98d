"""The one exception type users see: a message that names the file or argument and what to do."""


class SdloraError(Exception):
    """A user-facing error. The CLI prints `sdlora: <message>` on one line and exits with code 2."""
