"""Hostile numbers and names from the user (issue 17, items 3 and 4): one rule, runtime.params,
wherever a setting enters (flags, models.toml, `models set`, the sidebar), and one sentence for
an unknown name (chat format, quant type, subcommand, setting)."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamachat.model_store.library import Library
from llamachat.runtime.errors import ConfigError
from llamachat.runtime.params import SETTINGS, check_setting
from llamachat.tui.cli import main

from test_library import make_gguf, write_config

NUMERIC = [name for name, s in SETTINGS.items() if s.type is not str]
FLOAT_FLAGS = {  # flag -> setting, the float-valued sampling flags of llama.cpp's main
    "--temp": "temp", "--top-p": "top_p", "--min-p": "min_p", "--typical": "typical_p",
    "--repeat-penalty": "repeat_penalty", "--presence-penalty": "presence_penalty",
    "--frequency-penalty": "frequency_penalty", "--mirostat-lr": "mirostat_eta", "--mirostat-ent": "mirostat_tau",
}


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", math.nan, math.inf, -math.inf])
def test_no_setting_takes_nan_or_infinity(name, value):
    with pytest.raises(ValueError) as err:
        check_setting(name, value)
    assert str(err.value).startswith(f"{name} must be ")


@pytest.mark.parametrize("flag,name", sorted(FLOAT_FLAGS.items()))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_flags_refuse_nan_and_infinity_before_anything_loads(capsys, tmp_path, flag, name, value):
    # `--temp -inf` would read -inf as an unknown flag (argparse); `--temp=-inf` is the value
    code, out, err = cli(capsys, "-m", str(tmp_path / "never-opened.gguf"), "-p", "x", f"{flag}={value}", "--no-tui")
    assert code == 2 and out == ""
    assert err.startswith(f"llamachat: {flag}: {name} must be ") and len(err.splitlines()) == 1
    assert "never-opened" not in err  # refused as the flag was read


def test_models_toml_with_nan_is_refused_naming_file_model_and_field(tmp_path):
    gguf = make_gguf(tmp_path / "a.gguf")
    file = write_config(f'[models.mine]\npath = "{gguf}"\ntemp = nan\n')
    with pytest.raises(ConfigError) as err:
        Library.load()
    assert str(err.value).startswith(f"{file}: model 'mine': temp must be a finite number")
    file = write_config(f'[models.mine]\npath = "{gguf}"\ntop_p = inf\n')
    with pytest.raises(ConfigError, match="model 'mine': top_p must be a finite number"):
        Library.load()


@pytest.mark.parametrize("assignment", ["temp=nan", "temp=inf", "top_p=-inf", "repeat_penalty=nan", "seed=1e30",
                                        "top_k=99999999999999999999", "chat_format=\"chatlm\""])
def test_models_set_never_writes_a_bad_number(capsys, tmp_path, assignment):
    gguf = make_gguf(tmp_path / "a.gguf")
    assert main(["models", "add", str(gguf), "--name", "m"]) == 0
    capsys.readouterr()
    before = Library.load().file.read_text()
    code, out, err = cli(capsys, "models", "set", "m", assignment)
    assert code == 2 and err.startswith("llamachat: model 'm': ") and len(err.splitlines()) == 1
    after = Library.load().file.read_text()
    assert after == before and "nan" not in after and "inf" not in after


async def test_sidebar_refuses_nan_with_the_same_sentence():
    from textual.app import App

    from llamachat.tui.widgets.sidebar import Sidebar

    changes = []

    class Host(App):
        def compose(self):
            yield Sidebar()

        def on_sidebar_setting_changed(self, event):
            changes.append((event.name, event.value))

    app = Host()
    async with app.run_test() as pilot:
        sidebar = app.query_one(Sidebar)
        for text in ("nan", "inf", "-Infinity", "1e999"):
            sidebar.query_one("#setting-temp").value = text
            await pilot.pause(0.05)
            assert "temp must be a finite number" in str(sidebar.query_one("#error-temp").render())
            assert sidebar.query_one("#setting-temp").has_class("-invalid")
        sidebar.query_one("#setting-temp").value = "0.5"
        await pilot.pause(0.05)
    assert changes == [("temp", 0.5)]  # only the finite value reached the app


@pytest.mark.parametrize("argv,expected", [
    (["modles", "list"], "unknown command 'modles' (did you mean 'models'?); commands: inspect,"),
    (["imprt", "x"], "unknown command 'imprt' (did you mean 'import'?)"),
    (["models", "lsit"], "invalid choice 'lsit' (did you mean 'list'?); choose from list, show"),
    (["-m", "x.gguf", "-p", "x", "--chat-format", "chatlm"], "--chat-format: chat_format must be one of chatml, llama-2"),
    (["quantize", "a.gguf", "b.gguf", "Q4_KM"], "unknown quantization type 'Q4_KM' (did you mean 'Q4_K_M'?); valid types: Q4_0"),
    (["import", "a", "--bogus"], "unrecognized arguments: --bogus"),
    (["-m", "x.gguf", "--temp", "warm"], "--temp: temp must be a number, got 'warm'"),
])
def test_unknown_names_are_one_sentence_with_the_choices(capsys, argv, expected):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("llamachat: ") and expected in err
    assert len(err.splitlines()) == 1 and "usage:" not in err


def test_mistyped_subcommand_in_a_real_process():
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "modles", "list"], capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t0 < 30
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("llamachat: unknown command 'modles' (did you mean 'models'?)")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# ---- fuzz: any value for any setting is either a finite in-range value of the setting's type,
# or one short sentence naming the setting
_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(1 << 80), max_value=1 << 80),
    st.text(max_size=30), st.sampled_from(["nan", "-nan", "inf", "+Infinity", "1e309", "0x10", " 7 ", "1_000", "", "٣"]),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=200, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(SETTINGS)), value=_values)
def test_fuzz_one_rule_for_every_setting(name, value):
    setting = SETTINGS[name]
    try:
        checked = check_setting(name, value)
    except ValueError as err:
        message = str(err)
        assert message.startswith(f"{name} ") and "\n" not in message and len(message) < 400
        return
    assert type(checked) is setting.type
    if setting.type is not str:
        assert math.isfinite(checked)
        assert setting.low is None or checked >= setting.low
        assert setting.high is None or checked <= setting.high
        assert check_setting(name, checked) == checked  # what was accepted passes again (models.toml round trip)
