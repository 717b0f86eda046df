"""Every sampling setting reaches the real sampler from every entry point: a Llama API keyword
(llama-cpp-python's name), a command-line flag of the one-shot command (`llamachat -p ...
--top-k ...`), and a model library entry's default (models.toml, used when no flag is given).

Two kinds of evidence, both on the real SmolLM2 file:
- the `Sampler` the engine built for that generation (runtime.generation.generate's, recorded): its
  parameters are exactly the ones asked for, every other setting at its default, and the state
  derived from them (penalty window, mirostat's tau and eta, the random stream's seed);
- the text: llama.cpp's own continuation for a `sampled` reference case (../shared/reference),
  reproduced token for token when its settings come in through that entry point.

The app's sidebar is the fourth entry point; its tests live with the app's (tests/test_tui_*).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from llamachat.runtime.params import SamplingParams
from llamachat.runtime.generation.sampling import Mirostat, MirostatV2, Sampler

pytestmark = pytest.mark.real_model

PROMPT = "Once upon a time"

# One case per setting: the settings it changes (names of runtime.params.SETTINGS) and values
# none of which is the default. Mirostat's tau and eta only act with mirostat on, so their cases
# switch it on too.
CASES = {
    "temp": {"temp": 1.3},
    "top_k": {"top_k": 7},
    "top_p": {"top_p": 0.6},
    "min_p": {"min_p": 0.2},
    "typical_p": {"typical_p": 0.7},
    "repeat_penalty": {"repeat_penalty": 1.25},
    "repeat_last_n": {"repeat_penalty": 1.25, "repeat_last_n": 16},
    "presence_penalty": {"presence_penalty": 0.4},
    "frequency_penalty": {"frequency_penalty": 0.3},
    "mirostat": {"mirostat": 1},
    "mirostat_tau": {"mirostat": 2, "mirostat_tau": 3.5},
    "mirostat_eta": {"mirostat": 2, "mirostat_eta": 0.25},
    "seed": {"seed": 4242},
}

# setting -> the Llama keyword (llama-cpp-python's name)
API_KEYWORD = {"temp": "temperature", "mirostat": "mirostat_mode"}

# setting -> the flag as a llama.cpp user types it
CLI_FLAG = {
    "temp": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p", "typical_p": "--typical",
    "repeat_penalty": "--repeat-penalty", "repeat_last_n": "--repeat-last-n",
    "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty", "mirostat": "--mirostat",
    "mirostat_tau": "--mirostat-ent", "mirostat_eta": "--mirostat-lr", "seed": "--seed",
}


def api_kwargs(settings: dict) -> dict:
    return {API_KEYWORD.get(name, name): value for name, value in settings.items()}


def cli_flags(settings: dict) -> list[str]:
    return [arg for name, value in settings.items() for arg in (CLI_FLAG[name], str(value))]


def check_sampler_state(sampler: Sampler, settings: dict) -> None:
    """The sampler holds exactly `settings` (the rest at llama.cpp's defaults) and what it derived."""
    p = sampler.params
    assert p == SamplingParams(**settings).updated(logit_bias=p.logit_bias, ignore_eos=p.ignore_eos)
    assert p.logit_bias == () and p.ignore_eos is False
    pen = sampler.penalties
    assert (pen.repeat, pen.last_n) == (np.float32(p.repeat_penalty), p.repeat_last_n)
    assert (pen.present, pen.freq) == (np.float32(p.presence_penalty), np.float32(p.frequency_penalty))
    kind = {0: type(None), 1: Mirostat, 2: MirostatV2}[p.mirostat]
    assert type(sampler.mirostat) is kind
    if sampler.mirostat is not None:
        assert (sampler.mirostat.tau, sampler.mirostat.eta) == (np.float32(p.mirostat_tau), np.float32(p.mirostat_eta))
        assert sampler.mirostat.rng is sampler.rng
    if "seed" in settings:
        assert sampler.seed == settings["seed"] == sampler.rng.seed


@pytest.fixture
def built_samplers(monkeypatch):
    """Every Sampler the engine builds during the test, in order."""
    import llamachat.runtime.generation.generate as generate

    built = []

    class Recorded(Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(generate, "Sampler", Recorded)
    return built


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from llamachat.runtime.generation.llama_api import Llama

    with Llama(model_path=str(smollm2_path), n_ctx=512) as llm:
        yield llm


def run_cli(capsys, *argv) -> str:
    """The one-shot command in this process (so its Sampler can be recorded): its stdout."""
    from llamachat.tui.cli import main

    code = main([*argv, "--no-tui"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def add_to_library(path, name: str, settings: dict) -> None:
    from llamachat.model_store.library import Library

    Library.load().add(path, name=name, settings=settings)


# --- the Sampler built for the generation -----------------------------------------------------------


@pytest.mark.parametrize("setting", CASES)
def test_api_completion_keyword_reaches_the_sampler(llm, built_samplers, setting):
    llm(PROMPT, max_tokens=1, **api_kwargs(CASES[setting]))
    [sampler] = built_samplers
    check_sampler_state(sampler, CASES[setting])


@pytest.mark.parametrize("setting", CASES)
def test_api_chat_keyword_reaches_the_sampler(llm, built_samplers, setting):
    settings = {"temp": 0.2, **CASES[setting]}  # the chat method's own default temperature
    llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=1, **api_kwargs(CASES[setting]))
    [sampler] = built_samplers
    check_sampler_state(sampler, settings)


@pytest.mark.parametrize("setting", CASES)
def test_cli_flag_reaches_the_sampler(smollm2_path, built_samplers, capsys, setting):
    run_cli(capsys, "-m", str(smollm2_path), "-p", PROMPT, "-n", "1", *cli_flags(CASES[setting]))
    [sampler] = built_samplers
    check_sampler_state(sampler, CASES[setting])


@pytest.mark.parametrize("setting", CASES)
def test_library_default_reaches_the_sampler(smollm2_path, built_samplers, capsys, setting):
    add_to_library(smollm2_path, "smol", CASES[setting])
    run_cli(capsys, "-m", "smol", "-p", PROMPT, "-n", "1")
    [sampler] = built_samplers
    check_sampler_state(sampler, CASES[setting])


def test_a_flag_wins_over_the_library_default_and_the_rest_of_the_entry_stays(smollm2_path, built_samplers, capsys):
    add_to_library(smollm2_path, "smol", {"top_k": 7, "min_p": 0.2})
    run_cli(capsys, "-p", PROMPT, "-n", "1", "--top-k", "3")  # no -m: the library's default model
    [sampler] = built_samplers
    check_sampler_state(sampler, {"top_k": 3, "min_p": 0.2})


# --- llama.cpp's text through each entry point -----------------------------------------------------


def _reference_cases():
    """The `sampled` cases of the first prompt (one per sampler setting of the reference)."""
    import json

    from conftest import REFERENCE_DIR

    ref = REFERENCE_DIR / "smollm2.json"
    cases = json.loads(ref.read_text())["sampled"] if ref.is_file() else []
    first = [i for i, c in enumerate(cases) if c["prompt"] == cases[0]["prompt"]]
    return [pytest.param(i, id=cases[i]["name"]) for i in first] or [pytest.param(0, id="no-reference")]


def _case_settings(case) -> dict:
    """The reference case's settings that differ from llama.cpp's defaults, by setting name."""
    p = case["params"]
    settings = {"temp": p["temp"], "top_k": p["top_k"], "top_p": p["top_p"], "min_p": p["min_p"],
                "typical_p": p["typical_p"], "repeat_penalty": p["repeat_penalty"],
                "repeat_last_n": p["repeat_last_n"], "presence_penalty": p["presence_penalty"],
                "frequency_penalty": p["frequency_penalty"], "mirostat": p["mirostat"],
                "mirostat_tau": p["mirostat_tau"], "mirostat_eta": p["mirostat_eta"]}
    defaults = SamplingParams()
    return {k: v for k, v in settings.items() if getattr(defaults, k) != v}


def _expected(case) -> str:
    # llama-completion prints "\n\n" after the generated text; the reference keeps it
    assert case["continuation"].endswith("\n\n") and not case["ended_with_eos"]
    return case["continuation"][:-2]


@pytest.mark.parametrize("index", _reference_cases())
def test_api_keywords_give_llama_cpps_sampled_text(llm, reference, index):
    case = reference["sampled"][index]
    llm.reset()
    out = llm(case["prompt"], max_tokens=case["n_predict"], seed=case["seed"], **api_kwargs(_case_settings(case)))
    assert out["choices"][0]["text"] == _expected(case)


@pytest.mark.parametrize("index", _reference_cases())
def test_cli_flags_give_llama_cpps_sampled_text(smollm2_path, reference, index):
    case = reference["sampled"][index]
    exe = os.path.join(os.path.dirname(sys.executable), "llamachat")
    argv = [exe, "-m", str(smollm2_path), "-p", case["prompt"], "-n", str(case["n_predict"]),
            "--seed", str(case["seed"]), *cli_flags(_case_settings(case)), "--no-tui"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == _expected(case)


@pytest.mark.parametrize("index", _reference_cases())
def test_library_defaults_give_llama_cpps_sampled_text(smollm2_path, reference, capsys, index):
    case = reference["sampled"][index]
    add_to_library(smollm2_path, "smol", {**_case_settings(case), "seed": case["seed"]})
    out = run_cli(capsys, "-m", "smol", "-p", case["prompt"], "-n", str(case["n_predict"]))
    assert out == _expected(case)
