"""Seconds from launching the Textual app to the model shown ready, as a person sees it.

Each run starts `llamachat` (plus any arguments after --) in a detached tmux session of the
given size and reads the screen every 20 ms until the status line shows the context meter
("ctx N/M") with no "loading": the model is loaded and a message would be answered. Then it
presses Ctrl+Q and waits for the app to end. The first run may compile kernels (a first run or
a format's first use); the figures to compare are the warm runs after it.

    python bench/app_start.py --runs 5                 # the library's default model
    python bench/app_start.py --runs 5 -- -m FILE.gguf

Needs tmux. Prints each run's seconds, then the median and range of all runs but the first.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

SESSION = "llamachat-app-start"


def tmux(*args: str, check: bool = True) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check).stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-t", SESSION, check=False)


def is_ready(text: str) -> bool:
    """The status line (the screen's last lines) shows the context meter and no load in progress."""
    tail = "\n".join(text.splitlines()[-3:])
    return "ctx " in tail and "loading" not in tail


def one_run(command: list[str], width: int, height: int, timeout: float) -> tuple[float | None, float | None]:
    """(seconds to the first screen the app draws, seconds to the model shown ready)."""
    tmux("kill-session", "-t", SESSION, check=False)
    start = time.perf_counter()
    tmux("new-session", "-d", "-s", SESSION, "-x", str(width), "-y", str(height), shlex.join(command))
    shown = ready = None
    while time.perf_counter() - start < timeout:
        text = screen()
        if shown is None and ("ctx " in text or "loading" in text):  # the status line is drawn
            shown = time.perf_counter() - start
        if is_ready(text):
            ready = time.perf_counter() - start
            break
        time.sleep(0.02)
    tmux("send-keys", "-t", SESSION, "C-q", check=False)
    end = time.perf_counter() + 30
    while time.perf_counter() < end and subprocess.run(["tmux", "has-session", "-t", SESSION],
                                                       capture_output=True).returncode == 0:
        time.sleep(0.05)
    tmux("kill-session", "-t", SESSION, check=False)
    return shown, ready


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="120x35", help="the terminal's columns x lines (default 120x35)")
    ap.add_argument("--llamachat", default=shutil.which("llamachat") or "llamachat", help="the llamachat command")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one run's model")
    ap.add_argument("args", nargs="*", help="arguments for llamachat (after --)")
    a = ap.parse_args()
    if shutil.which("tmux") is None:
        print("error: this benchmark needs tmux (it reads the app's screen as a person would): install tmux", file=sys.stderr)
        return 2
    try:
        width, height = (int(v) for v in a.size.lower().split("x"))
    except ValueError:
        print(f"error: --size {a.size!r}: expected COLUMNSxLINES, e.g. 120x35", file=sys.stderr)
        return 2
    command = [a.llamachat, *a.args]
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        # with it, Python compiles every llamachat module at every launch of an editable install
        # (pip leaves an installed copy's bytecode compiled): about 0.1 s that no user pays
        print("PYTHONDONTWRITEBYTECODE is set: the runs unset it, so that launches after the first use "
              "compiled bytecode, as an installed llamachat does")
        command = ["env", "-u", "PYTHONDONTWRITEBYTECODE", *command]
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    times, screens = [], []
    for i in range(a.runs):
        shown, t = one_run(command, width, height, a.timeout)
        if t is None:
            print(f"run {i + 1}: not ready within {a.timeout:g} s; the screen:\n{screen()}", file=sys.stderr)
            return 1
        times.append(t)
        screens.append(shown if shown is not None else t)
        print(f"run {i + 1}: screen drawn {screens[-1]:.2f} s, model ready {t:.2f} s after launch"
              + (" (may include compiling)" if i == 0 else ""), flush=True)
    warm, drawn = (times[1:], screens[1:]) if len(times) > 1 else (times, screens)
    print(f"warm runs: ready median {statistics.median(warm):.2f} s ({min(warm):.2f}-{max(warm):.2f}), screen drawn "
          f"median {statistics.median(drawn):.2f} s; load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
