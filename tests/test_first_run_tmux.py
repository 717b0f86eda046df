"""What a tmux run of the first five minutes showed (issue 18, "Done when"): at 80x24 the status
line lost its end (the "Esc stops" hint and the dropped-turns mark) while a reply was being
written; after the first reply of a fresh install it said 0.3 tok/s, the kernels' compile time
counted as generation."""

from __future__ import annotations

import re
import time

from tui_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, templated_factory, wait_for
from tui_fake_engine import FakeLlama

from llamachat.tui.compile_progress import WATCH


def status_line(app) -> str:
    """The status line as drawn: what the terminal shows, cut where the widget ends."""
    status = app.chat_screen.query_one("#status")
    return status.render_line(0).text


async def test_status_line_at_80_columns_keeps_esc_stops_and_the_meter(tmp_path):
    make_library(tmp_path)
    words = " ".join(f"w{i}" for i in range(30))
    # the fifth reply holds after 3 tokens until stopped: it is being written when looked at
    script = FakeScript(replies=[words] * 5)
    app, _ = make_app(["-c", "128", "-n", "16", "--system", "Be brief."], script=script, model="alpha")
    app.engine._factory = templated_factory(script)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        for i in range(4):
            await send(pilot, app, f"question {i} " + words)
            await reply_done(pilot, app)
        assert app.conv.memory_start > 0  # the chat outgrew n_ctx 128: the oldest turns are left out
        script.hold_after = 3
        await send(pilot, app, "one more " + words)
        await wait_for(pilot, lambda: app.engine.n_tokens() > 0 and app.generating)
        app.update_status()
        await pilot.pause(0.1)
        shown = status_line(app)
        assert "Esc stops" in shown and "oldest" in shown and "ctx " in shown, shown
        assert shown.rstrip().endswith("Esc stops"), shown  # nothing cut after it
        await pilot.press("escape")
        await reply_done(pilot, app)
        # the full line, everything in it, where there is room
        await pilot.resize_terminal(140, 45)
        await wait_for(pilot, lambda: status_line(app).rstrip().endswith("(full: stop) · oldest turns dropped │ chat"))


# a first run's compile as the engine counts it (the 0.3 tok/s seen in tmux came from minutes of
# compiling); the fake sleeps only a second of it, so the test stays short
COMPILE_SECONDS = 60.0
SLEPT_SECONDS = 1.0


class CompilingFake(FakeLlama):
    """The fake engine as a first run's real one: after the first token numba compiles the
    decoding kernels (the compile watch hears of it), and the engine's own eval time counts
    those seconds in."""

    def _generate(self, prompt, reply, n_predict, stops, seed):
        gen = super()._generate(prompt, reply, n_predict, stops, seed)
        yield next(gen)
        WATCH._started(None)
        time.sleep(SLEPT_SECONDS)
        WATCH._ended()
        yield from gen
        self.last_stats["eval_ms"] += COMPILE_SECONDS * 1000


async def test_first_reply_rate_leaves_out_the_compile(tmp_path):
    make_library(tmp_path)
    words = " ".join(f"w{i}" for i in range(40))
    script = FakeScript(replies=[words], delay=0.02)  # 40 tokens of 20 ms after the compile
    app, _ = make_app(script=script)
    app.engine._factory = lambda path, **kw: CompilingFake(path, script=script, **kw)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "What is the capital of France?")
        await reply_done(pilot, app)
        # the engine's figure: 40 tokens in 0.4 s of decoding + 60 s of compiling = 0.66 tok/s;
        # after the compile the tokens came at up to 50 a second (at 14 under a load of 18)
        engine_rate = 40 / (0.4 + COMPILE_SECONDS)
        shown = re.search(r"([0-9.]+|–) tok/s", app.status_text()).group(1)
        assert shown == "–" or float(shown) > 5 * engine_rate, app.status_text()


async def test_paragraphs_of_a_reply_are_apart(tmp_path):
    """A story's two paragraphs ran together on screen (no line between them), so the reply
    read as one block; the last block has no margin, so a message ends at its text."""
    from tui_support import views
    from textual.widgets import Markdown

    make_library(tmp_path)
    script = FakeScript(replies=["The dragon woke up.\n\nOne day it cooked a meal.\n\n- eggs\n- bread"])
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Tell me a story.")
        await reply_done(pilot, app)
        await pilot.pause(0.1)
        blocks = list(views(app, "assistant")[-1].query_one(Markdown).children)
        assert [type(b).__name__ for b in blocks] == ["MarkdownParagraph", "MarkdownParagraph", "MarkdownBulletList"]
        for above, below in zip(blocks, blocks[1:]):
            assert below.region.y == above.region.bottom + 1  # one empty line between blocks
        message = views(app, "assistant")[-1]
        assert message.region.bottom == blocks[-1].region.bottom + (message.region.bottom - message.content_region.bottom)


async def test_saved_chats_at_80_columns_show_title_date_and_size(tmp_path):
    """At 80x24 the saved-chats dialog took 80% of the width and showed the title, the model and
    two letters of the mode: when a chat was last used and how long it is were off the edge."""
    from textual.widgets import DataTable

    from llamachat.tui.screens.chats import ChatsScreen

    make_library(tmp_path)
    app, _ = make_app(script=FakeScript(replies=["Paris."]), store_path=tmp_path / "c.db")
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "What is the capital of France, the country in western Europe?")
        await reply_done(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.query_one(DataTable).row_count == 1)
        await pilot.pause(0.1)
        table = app.screen.query_one(DataTable)
        shown = table.content_region.width
        needed = 0
        for column in table.ordered_columns:
            needed += column.get_render_width(table)
            if str(column.label) in ("updated", "messages"):
                assert needed <= shown, (str(column.label), needed, shown)


async def test_footer_at_80_columns_shows_help_and_quit(tmp_path):
    """At 80 columns the footer's last keys (f1 Help, ^q Quit) were drawn past the edge and
    under the command palette's "^p palette"."""
    from textual.widgets import Footer

    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        await pilot.pause(0.1)
        footer = app.chat_screen.query_one(Footer)
        shown = _footer_keys(footer)
        assert {"f1", "^q", "^o", "^b"} <= set(shown)
        spans = sorted((r.x, r.right) for r in shown.values())
        assert spans[-1][1] <= 80  # inside the screen
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # none over another
        await pilot.resize_terminal(140, 45)
        await wait_for(pilot, lambda: not footer.compact and footer.show_command_palette)


def _footer_keys(footer) -> dict:
    return {k.key_display: k.region for k in footer.query("FooterKey") if k.display}


async def test_footer_after_a_resize_to_80_columns_shows_help_and_quit(tmp_path):
    """Made narrower while running, the footer kept its "^p palette" key (Footer shows a change
    of it only at its next bindings update), drawn over f1 Help and ^q Quit."""
    from textual.widgets import Footer

    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=(120, 35)) as pilot:
        await ready(pilot, app)
        footer = app.chat_screen.query_one(Footer)
        await wait_for(pilot, lambda: "^p" in _footer_keys(footer))
        await pilot.resize_terminal(80, 24)
        await wait_for(pilot, lambda: "^p" not in _footer_keys(footer))
        await pilot.pause(0.1)
        shown = _footer_keys(footer)
        assert {"f1", "^q"} <= set(shown) and max(r.right for r in shown.values()) <= 80
        await pilot.resize_terminal(120, 35)
        await wait_for(pilot, lambda: "^p" in _footer_keys(footer))


async def test_footer_is_not_rebuilt_for_the_keys_it_shows(tmp_path):
    """Footer made all its key widgets again (and styled them) on every bindings update, nine
    times while the chat screen first showed, mostly for the same keys; it now does so only when
    what it shows changes."""
    from textual.widgets import Footer

    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=(120, 35)) as pilot:
        await ready(pilot, app)
        footer = app.chat_screen.query_one(Footer)
        await pilot.pause(0.2)
        before = list(footer.query("FooterKey"))
        for _ in range(3):
            app.chat_screen.refresh_bindings()
            await pilot.pause(0.05)
        assert list(footer.query("FooterKey")) == before  # the same widgets: not composed again
        app.chat_screen.query_one("#setting-temp").focus()  # a field's own keys may show: that may rebuild it
        app.chat_screen.chat_input.focus()
        await pilot.pause(0.2)
        assert {k.key_display for k in footer.query("FooterKey")} >= {"^n", "f1", "^q"}


async def test_ctrl_q_while_the_engine_is_prepared_quits_at_once(tmp_path):
    """Ctrl+Q during a first run's compile (the model load) did nothing until the compile was
    over, minutes on a busy machine: the load is no longer waited for."""
    make_library(tmp_path)
    load_seconds = 8.0
    app, _ = make_app(script=FakeScript(replies=["Paris."], load_delay=load_seconds))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.loading)
        t0 = time.monotonic()
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app.return_code is not None, timeout=load_seconds)
        assert time.monotonic() - t0 < load_seconds / 2 and app.left_a_load
