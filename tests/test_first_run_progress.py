"""Progress a person watches (issue 18, bug q): the pull's one bar never runs backwards across
its stages; bench's table stays aligned with a long model name."""

from __future__ import annotations

import re

from llamachat.model_store.pull import OverallProgress
from llamachat.tui.cli import main

from test_model import tiny_metadata, write_tiny


def test_overall_pull_progress_never_goes_back():
    overall = OverallProgress()
    seen = []
    # what a pull reports: the download, then the unpack starting again at 0, a verify, the install
    for stage, total in (("download", 90), ("extract", 100), ("verify", 100), ("install", 100)):
        for done in range(0, total + 1, 10):
            seen.append(overall(stage, done, total))
    assert seen == sorted(seen) and seen[-1] == 1.0
    # the download ended at 60 %, and the unpack's first report does not pull that back
    assert OverallProgress()("extract", 0, 100) == 0.6
    # a stage reported again after a later one (a second try) does not go back either
    assert overall("download", 10, 90) == 1.0


async def test_first_run_bar_follows_the_overall_figure(tmp_path):
    from tui_support import SIZE, wait_for
    from textual.widgets import ProgressBar

    from llamachat.tui.app import ChatApp
    from llamachat.tui.screens.first_run import FirstRunScreen

    import threading

    step = threading.Event()
    go_on = threading.Event()
    shown = []

    def puller(key, progress):
        for stage, done, total in (("download", 81, 100), ("extract", 10, 100)):
            progress(stage, done, total)
            step.set()
            go_on.wait(10)
            go_on.clear()
        raise RuntimeError("stopped by the test")

    from llamachat.tui.cli import build_main_parser

    app = ChatApp(build_main_parser().parse_args([]), puller=puller)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FirstRunScreen))
        await pilot.pause(0.2)
        await pilot.click("#pull")
        for _ in range(2):
            await wait_for(pilot, step.is_set)
            step.clear()
            await pilot.pause(0.5)  # the screen's 0.2 s timer draws it
            shown.append(app.screen.query_one("#pull-progress", ProgressBar).progress)
            go_on.set()
    assert shown[0] < shown[1], shown  # 81 % of the download, then 10 % of the unpack: forward


def test_bench_table_is_aligned_with_a_long_model_name(tmp_path, capsys):
    long_name = "a-model-with-a-rather-long-name-that-goes-on"
    path = write_tiny(tmp_path / "tiny.gguf", metadata=dict(tiny_metadata(), **{"general.name": long_name}))
    assert main(["bench", "-m", str(path), "-p", "4", "-n", "2", "-r", "1", "-t", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(lines) == 4 and long_name in lines[2]
    bars = [[m.start() for m in re.finditer(r"\|", line)] for line in lines]
    assert all(b == bars[0] for b in bars), "\n".join(lines)


class _Terminal:
    """A stderr that is a terminal of 80 columns, keeping what was written."""

    encoding = "utf-8"

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True

    def fileno(self):
        raise OSError("not a real terminal")  # the line falls back to 80 columns


def _fake_pull(tmp_path):
    """model_store.pull.pull as a first pull reports it (download, the unpack starting again at 0,
    the install), registering a small file, without the network."""
    from llamachat.model_store.library import Library

    def pull(key, progress):
        for stage, total in (("download", 93_000_000), ("extract", 98_000_000), ("install", 98_000_000)):
            for done in range(0, total + 1, total // 20):
                progress(stage, done, total)
        path = write_tiny(tmp_path / "pulled.gguf")
        lib = Library.load()
        lib.add(path, name="smollm2-135m-instruct")
        lib.set_default("smollm2-135m-instruct")
        return lib.models["smollm2-135m-instruct"]

    return pull


def test_cli_pull_draws_one_line_that_never_goes_back(tmp_path, monkeypatch, capsys):
    """`llamachat pull` on a terminal drew three rich bars, one per stage (download, extract,
    install), each starting at 0 %: now one line, redrawn in place, whose figure only grows."""
    import llamachat.model_store.pull as pull_mod
    from llamachat.tui.commands import pull as pull_cmd

    monkeypatch.setattr(pull_mod, "pull", _fake_pull(tmp_path))
    monkeypatch.setattr(pull_cmd.PullLine, "INTERVAL", 0.0)  # every report drawn: the fake reports at once
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    assert main(["pull"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Pulled smollm2-135m-instruct into ") and "It is the default model." in out
    assert "\n" not in err.text  # one line, redrawn with \r: no second or third bar below it
    frames = [f for f in err.text.split("\r\x1b[K") if f]
    assert len(frames) > 20 and err.text.endswith("\r\x1b[K")  # cleared at the end, leaving the sentence
    assert all(len(f) <= 79 and f.startswith("smollm2-135m-instruct [") for f in frames), frames[:3]
    percents = [int(re.search(r"\] +(\d+)% ", f).group(1)) for f in frames]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    stages = [re.search(r"% (\w+) ", f).group(1) for f in frames]
    assert stages[0] == "downloading" and "unpacking" in stages and stages[-1] == "installing"


def test_cli_pull_not_on_a_terminal_says_only_the_final_sentence(tmp_path, monkeypatch, capsys):
    import llamachat.model_store.pull as pull_mod

    monkeypatch.setattr(pull_mod, "pull", _fake_pull(tmp_path))
    assert main(["pull"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1 and out.startswith("Pulled smollm2-135m-instruct")
