"""The generation settings are declared once (sdlora/bases/generate.py `SETTINGS`): the web UI's
controls, its handlers and its HTTP API take their labels and bounds from there (issue 28), and
every number has an upper bound (issue 29: `generate --steps 1e9` ran until killed)."""

from __future__ import annotations

import inspect
import math

import pytest

from sdlora.bases.generate import MAX_STEPS, SETTINGS, GenerateSettings, check_numbers, label_of
from sdlora.cli import main
from sdlora.errors import SdloraError, flag
from sdlora.ui import handlers as h

# the Mix tab's control of each setting, by its elem_id
ELEM_IDS = {
    "prompt": "prompt",
    "negative_prompt": "negative",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "scheduler": "scheduler",
    "num_images": "num-images",
}
NUMBERS = [name for name, s in SETTINGS.items() if s.kind in ("whole", "number")]


@pytest.fixture(scope="module")
def controls(tmp_path_factory) -> dict:
    """The Mix tab's control of every generation setting, from the app as it is built."""
    from sdlora.ui.app import build_app

    root = tmp_path_factory.mktemp("form")
    app = build_app("tiny", root / "adapters", root / "datasets", root / "outputs", device="cpu")
    by_id = {getattr(b, "elem_id", None): b for b in app.blocks.values()}
    return {name: by_id[elem_id] for name, elem_id in ELEM_IDS.items()}


def past(setting, side: str) -> float:
    """The first value outside `setting`'s bounds on `side` ("low" or "high")."""
    step = 1 if setting.kind == "whole" else 1e-6 * max(1.0, abs(setting.maximum))
    return setting.minimum - step if side == "low" else setting.maximum + step


def test_every_generation_setting_is_declared_once_with_its_label():
    assert list(SETTINGS) == list(ELEM_IDS)  # the nine settings, in the forms' order
    for name, setting in SETTINGS.items():
        assert setting.label and setting.help, name
        assert label_of(name) == setting.label
        assert name in GenerateSettings.__dataclass_fields__
    assert SETTINGS["steps"].maximum == MAX_STEPS == 1000


def test_ui_and_library_agree_on_every_bound(controls):
    """Each control shows the library's label and offers exactly the library's range (reaching
    down to the form's own 0 = native size and -1 = random seed, nothing else)."""
    for name, setting in SETTINGS.items():
        control = controls[name]
        assert control.label.startswith(setting.label), (name, control.label)
        if setting.kind == "choice":
            assert [c[1] for c in control.choices] == list(setting.choices)
            continue
        if setting.kind == "text" or name == "seed":  # the seed box is text (issue 32)
            continue
        low, high = h.form_bounds(name)
        assert (control.minimum, control.maximum) == (low, high), name
        assert high == setting.maximum, name
        assert low == setting.minimum or low == h.FORM_FLOOR[name][0], name


@pytest.mark.parametrize("name", NUMBERS)
def test_library_and_ui_refuse_just_past_each_bound_and_take_the_bound(name):
    setting = SETTINGS[name]
    for side, bound in (("low", setting.minimum), ("high", setting.maximum)):
        with pytest.raises(SdloraError) as refused:
            check_numbers(GenerateSettings(prompt="x", **{name: past(setting, side)}))
        assert refused.value.setting == name and "\n" not in str(refused.value)
        check_numbers(GenerateSettings(prompt="x", **{name: bound}))  # the bound itself works
    # the UI's handlers (behind every tab and the HTTP API) refuse the same values, in the UI's
    # words: the setting's label in front, no command-line flag
    with pytest.raises(SdloraError) as refused:
        h.make_settings("x", **{name: past(setting, "high")})
    assert refused.value.setting == name
    from sdlora.ui.common import message

    assert message(refused.value).startswith(setting.label + " ")
    assert "--" not in message(refused.value)
    h.make_settings("x", **{name: setting.maximum})
    if name in h.FORM_FLOOR:  # the form's own 0 / -1 stands for the native size / a new seed
        made = h.make_settings("x", **{name: h.FORM_FLOOR[name][0]})
        assert getattr(made, name) is None if name != "seed" else made.seed >= 0
    elif setting.kind == "whole":
        with pytest.raises(SdloraError, match="whole number"):
            h.make_settings("x", **{name: setting.minimum + 0.5})


def test_form_values_that_are_not_numbers_are_refused_naming_the_setting():
    for name in NUMBERS:
        for bad in ("lots", float("nan"), math.inf):
            with pytest.raises(SdloraError) as refused:
                h.make_settings("x", **{name: bad})
            assert refused.value.setting == name, (name, bad)


def test_api_generate_takes_the_settings_of_the_list():
    from sdlora.ui.api import GENERATE

    params = list(GENERATE.parameters.values())
    names = [p.name for p in params]
    assert names == ["prompt", "adapters", *list(SETTINGS)[1:], "base"]
    fields = GenerateSettings.__dataclass_fields__
    for p in params:
        if p.name in SETTINGS and p.name != "prompt":
            assert p.default == fields[p.name].default, p.name
    assert params[0].default is inspect.Parameter.empty


def test_generate_refuses_steps_past_the_bound_before_loading_anything(tmp_path, capsys):
    """`generate --steps 1000000000` ran until killed; now one line, before the base loads."""
    out = tmp_path / "o.png"
    argv = ["generate", "--base", str(tmp_path / "no-such-base"), "--prompt", "x"]
    assert main([*argv, "--steps", "1000000000", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlora: --steps must be from 1 to 1000 (got 1000000000)"), err
    assert "\n" not in err and not out.exists()
    with pytest.raises(SdloraError) as refused:
        check_numbers(GenerateSettings(prompt="x", steps=10**9))
    assert refused.value.worded(flag).startswith("--steps must be from 1 to 1000")


def test_a_typed_value_out_of_range_reaches_the_handler(controls):
    """Gradio would refuse it with a toast over the page; the library's refusal shows beside
    the Generate button instead (`common.on`)."""
    for name in NUMBERS:
        control = controls[name]
        if name == "seed":  # text, exact at any length: any typed value reaches the handler
            assert control.preprocess("99" * 20) == "99" * 20
            continue
        beyond = control.maximum + 1
        assert control.preprocess(beyond) == pytest.approx(beyond), name


def test_generate_help_states_the_library_bounds(capsys) -> None:
    """`sdlora generate --help` writes its bounds out (importing the library for --help would
    load diffusers): each number setting's help says the library's own range."""
    from sdlora.bases.generate import SETTINGS
    from sdlora.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())

    def written(number: float) -> str:
        return f"{number:g}" if number < 1e6 else "2**64 - 1"

    for setting in SETTINGS.values():
        if setting.minimum is None:
            continue
        flag = "--" + setting.name.replace("_", "-")
        after = text.split(flag, 2)[2]  # past the usage line, at the option's own entry
        span = f"{written(setting.minimum)} to {written(setting.maximum)}"
        assert span in after[:200], (flag, span, after[:200])
