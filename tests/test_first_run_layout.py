"""An 80x24 terminal (issue 18, bug i): the chat gets the width (the sidebar starts hidden and
Ctrl+B shows it), the message box's placeholder fits, the help and the library fit the width."""

from __future__ import annotations

from tui_support import make_app, make_library, ready, wait_for

from llamachat.tui.screens.help import HelpScreen
from llamachat.tui.screens.library import LibraryScreen


async def test_80x24_gives_the_chat_the_width(tmp_path):
    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        screen = app.chat_screen
        box = screen.chat_input
        assert not screen.sidebar.display or screen.sidebar.region.width == 0
        assert screen.query_one("#chat-column").region.width >= 78
        # the placeholder is shown whole inside the box (its border and padding take 4 columns)
        assert len(str(box.placeholder)) <= box.region.width - 4
        await pilot.press("ctrl+b")
        await pilot.pause(0.1)
        assert screen.sidebar.region.width > 0
        assert screen.query_one("#chat-column").region.width >= 46
        await pilot.press("ctrl+b")
        await pilot.pause(0.1)
        assert screen.sidebar.region.width == 0

        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert app.screen.query_one("#help-box").region.width >= 76
        await pilot.press("escape")

        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen))
        await pilot.pause(0.1)
        # the table has the full width, the form sits under it
        table = app.screen.query_one("#library-table")
        form = app.screen.query_one("#library-form")
        assert table.region.width >= 76 and form.region.y > table.region.y


async def test_wide_terminal_keeps_the_sidebar(tmp_path):
    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=(140, 45)) as pilot:
        await ready(pilot, app)
        screen = app.chat_screen
        assert screen.sidebar.region.width == 34
        await pilot.press("ctrl+b")
        await pilot.pause(0.1)
        assert screen.sidebar.region.width == 0
