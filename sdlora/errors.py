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

    Advice that names other settings names them through placeholders (see `fill`): `{lr}` for
    a setting, `{+resume}` for running again with that switch on. "Try a lower {lr}" reads
    "Try a lower --lr" on the command line and "Try a lower Learning rate" in the web UI.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.message = message
        self.setting = setting

    def worded(self, name: Callable[[str], str], again: Callable[[str], str] | None = None) -> str:
        """The message with the setting named by `name(setting)` in front (as it is if none), and
        the settings it mentions filled in by `fill(message, name, again)`."""
        message = fill(self.message, name, again)
        if self.setting is None:
            return message
        return f"{name(self.setting)} {message}"

    def __str__(self) -> str:
        # the setting in front by its field name; the ones advice mentions as flags, the
        # library's words for them since its first messages
        message = fill(self.message, flag)
        return message if self.setting is None else f"{self.setting} {message}"


Naming = Callable[[str], str]


def fill(text: str, name: Naming, again: Naming | None = None) -> str:
    """`text` with each `{setting}` replaced by `name(setting)` and each `{+setting}` by
    `again(setting)`: the words for running again with that switch on (by default "run the
    same command with " + name(setting)). A setting is a field name (lower-case letters,
    digits and `_`); other text in braces stays as it is."""
    if again is None:

        def again(setting: str) -> str:
            return f"run the same command with {name(setting)}"

    out, at = [], 0
    while (start := text.find("{", at)) >= 0 and (end := text.find("}", start)) >= 0:
        inner = text[start + 1 : end]
        setting = inner.removeprefix("+")
        if _is_setting(setting):
            out += [text[at:start], again(setting) if inner != setting else name(setting)]
        else:
            out.append(text[at : end + 1])
        at = end + 1
    out.append(text[at:])
    return "".join(out)


def _is_setting(text: str) -> bool:
    return (
        text[:1].isalpha()
        and text.isascii()
        and text == text.lower()
        and text.replace("_", "").isalnum()
    )


# settings whose flag is not their name with dashes, e.g. a list's singular flag
# (new_tokens -> --new-token); the commands that declare such settings fill it in
FLAGS: dict[str, str] = {}


def flag(setting: str) -> str:
    """A setting's command-line flag: batch_size -> --batch-size."""
    return FLAGS.get(setting) or "--" + setting.replace("_", "-")
