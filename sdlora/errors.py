"""The one exception type users see: a message that names the file or setting and what to do."""

from __future__ import annotations

from collections.abc import Callable


class SdloraError(Exception):
    """A user-facing error. The CLI prints `sdlora: <message>` on one line and exits with code 2.

    `setting` names the option the message is about, in the library's words (a field name such
    as "width" or "batch_size"); `message` then reads after that option's name ("must be at
    least 1 (got 0)"). Each front end names the option its own way through `worded`: the command
    line as `--batch-size`, the web UI as the label of its control. Without a front end the field
    name stands in front.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.message = message
        self.setting = setting

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with the setting named by `name(setting)` in front (as it is if none)."""
        if self.setting is None:
            return self.message
        return f"{name(self.setting)} {self.message}"

    def __str__(self) -> str:
        return self.worded(lambda setting: setting)


def flag(setting: str) -> str:
    """A setting's command-line flag: batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")
