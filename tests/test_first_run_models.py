"""The model in use (issue 18, bugs d and f): the sidebar's picker always shows the model that
answers, "(no model)" means no model, and a default model whose file is gone does not stop
the app from opening."""

from __future__ import annotations

from tui_support import SIZE, make_app, make_library, notifications, ready, wait_for

from textual.widgets import Select

from llamachat.tui.screens.library import LibraryScreen


def picker(app):
    return app.chat_screen.sidebar.query_one("#model-select", Select)


async def test_use_in_chat_from_the_library_moves_the_picker(tmp_path):
    make_library(tmp_path)
    app, script = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert picker(app).value == "alpha"
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen))
        app.screen.selected = "beta"
        app.screen.action_use_model()
        await wait_for(pilot, lambda: not isinstance(app.screen, LibraryScreen))
        await wait_for(pilot, lambda: app.entry.name == "beta" and app.engine.loaded and not app.loading)
        await pilot.pause(0.1)
        assert picker(app).value == "beta"
        assert app.entry.name == "beta"  # and a picker refill did not switch back


async def test_no_model_in_the_picker_means_no_model(tmp_path):
    make_library(tmp_path)
    app, script = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        picker(app).clear()  # what choosing "(no model)" does
        await wait_for(pilot, lambda: app.entry is None)
        assert "no model" in app.status_text()
        n_calls = len(script.calls)
        app.chat_screen.chat_input.text = "hello?"
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert len(script.calls) == n_calls  # nobody answered
        assert any("No model" in n for n in notifications(app))
        assert app.chat_screen.chat_input.text == "hello?"  # the message is not lost


async def test_a_default_model_whose_file_is_gone_opens_the_library(tmp_path):
    from llamachat.tui.app import ChatApp, startup_model
    from llamachat.tui.cli import build_main_parser

    from tui_support import FakeScript

    lib = make_library(tmp_path)
    assert lib.default_name == "alpha"
    (tmp_path / "alpha.gguf").unlink()
    args = build_main_parser().parse_args([])
    entry, problem = startup_model(args)
    assert entry is None and "alpha" in problem and "alpha.gguf" in problem
    script = FakeScript()
    app = ChatApp(args, entry=entry, start_problem=problem, llama_factory=script.factory)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen))
        await wait_for(pilot, lambda: any("alpha.gguf" in n for n in notifications(app)), timeout=5)
        # the library screen puts another model in use
        app.screen.selected = "beta"
        app.screen.action_use_model()
        await wait_for(pilot, lambda: app.entry is not None and app.engine.loaded and not app.loading)
        assert app.entry.name == "beta" and picker(app).value == "beta"


async def test_the_load_started_before_the_screen_is_taken_over_not_repeated(tmp_path):
    """run() starts loading the model before Textual starts up (ChatApp.start_loading_now); the
    chat screen, once composed, waits for that load instead of starting another."""
    import threading

    make_library(tmp_path)
    app, script = make_app()
    calls, release = [], threading.Event()
    factory = script.factory

    def slow_factory(model_path, **kwargs):
        calls.append(model_path)
        release.wait(10)  # still loading when the screen is composed
        return factory(model_path, **kwargs)

    app.engine._factory = slow_factory
    app.start_loading_now()
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.loading)
        assert "loading" in app.status_text()
        release.set()
        await ready(pilot, app)
        assert len(calls) == 1 and app.engine.loaded and "ctx " in app.status_text()
        app.chat_screen.chat_input.text = "What is the capital of France?"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(script.calls) == 1 and not app.generating)
    assert len(calls) == 1
