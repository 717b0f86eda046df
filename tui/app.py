"""The Textual chat app (`llamachat` on a terminal): `run(args)` is its entry point.

The app owns the conversation (conversation.py), the engine (engine_worker.Engine), the saved
chats (chat_store.ChatStore) and the settings; the screens only show them. The engine runs in
`@work(thread=True)` workers: loading a model and generating a reply never run on the UI
thread. A reply's text goes into a StreamBuffer that a 0.1 s UI timer drains into the message
being written, so the screen gets a handful of updates per second however fast tokens come.
Workers report back with messages (ReplyDone, LoadDone), and so do the screens (ChatScreen.Ready
and StopPressed, LibraryScreen.Changed) or they `dismiss(result)` (the library's "Use in chat",
the first run's pulled model, the dialogs); every failure becomes a notification, never a
traceback.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.message import Message as TextualMessage
from textual.screen import Screen
from textual.widgets import Static

from llamachat.model_store.library import DEFAULT_RESUME_BUDGET_MIB, quality_text
from llamachat.runtime.errors import UserError

from . import conversation as conv_mod
from .chat_store import ChatStore
from .compile_progress import WATCH
from .conversation import CHAT, INSTRUCT, INTERACTIVE, Conversation, Message
from .engine_worker import Engine, GenerationResult, StreamBuffer, describe_error, quant_name
from .screens.chat import ChatScreen
from .screens.chats import ChatsScreen
from .screens.confirm import ConfirmScreen
from .screens.first_run import FirstRunScreen
from .screens.help import HelpScreen
from .screens.library import LibraryScreen
from .widgets.chat_input import ChatInput
from .widgets.message_view import MessageView
from .widgets.resume_budget import ResumeBudget
from .widgets.sidebar import Sidebar

# How often streamed text reaches the screen. Text comes by this timer, not by a message per
# piece, for two reasons: the tick bounds the Markdown re-renders to ten a second however fast a
# backend streams (a remote server sends hundreds of pieces a second; each render runs on the UI
# thread and holds the GIL the engine's worker thread needs between its kernels); and the same
# tick shows what changes with no event to post it: the load's progress fraction, the kernel
# compile notice and the live tok/s and context count. Workers still report their ends by
# messages (ReplyDone, LoadDone).
DRAIN_SECONDS = 0.1


def _same_place(a, b) -> bool:
    """Two library entries for the same model: the same file, or the same server and model."""
    if a.remote or b.remote:
        return a.remote and b.remote and (a.base_url, a.model) == (b.base_url, b.model)
    return a.path == b.path


def _while_screen_exists(method):
    """A worker's report or a timer tick can arrive while the app is closing and its widgets
    are already gone; there is nothing left to update then, so that is not an error."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except NoMatches:
            self.log.warning(f"{method.__name__}: the chat screen's widgets are gone (closing)")
            return None

    return wrapper


class ReplyDone(TextualMessage):
    def __init__(self, result: GenerationResult):
        super().__init__()
        self.result = result


class LoadDone(TextualMessage):
    def __init__(self, entry, error: str | None, reason: str, kwargs: dict, seq: int):
        super().__init__()
        self.entry = entry
        self.error = error
        self.reason = reason
        self.kwargs = kwargs  # what the model was loaded with
        self.seq = seq


class _LoadJob:
    """A model load running in its own thread (ChatApp._spawn_load): what it loads, its outcome
    (error: None when it loaded), and `wait` for the app's event loop."""

    def __init__(self, entry, kwargs: dict):
        self.entry, self.kwargs = entry, kwargs
        self.error: str | None = "the load did not finish"
        self._done = threading.Event()
        self._wake = None  # set by `wait`: wakes the event loop waiting for this load

    def finish(self) -> None:  # (the load's thread, at its end)
        self._done.set()
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:  # the app quit while this loaded (its loop is closed): nobody waits
                pass

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(finished.set)
        if not self._done.is_set():  # (set before _wake was: finish() has not called it)
            await finished.wait()


class ChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "llamachat"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True),
                # over the message box's copy: during a reply Ctrl+C stops it, as in a terminal;
                # otherwise it copies a selection, and pressed twice it quits
                Binding("ctrl+c", "interrupt", "Stop / quit", show=False, priority=True)]
    QUIT_AGAIN_SECONDS = 3.0  # a second Ctrl+C within this long quits

    def __init__(self, args=None, *, entry=None, llama_factory=None, store_path=None,
                 library_loader=None, puller=None, start_problem: str | None = None):
        super().__init__()
        self.start_problem = start_problem  # why the library's default model could not be used
        self.args = args
        self.entry = entry  # the library ModelEntry in use (None: first run)
        self.engine = Engine(llama_factory)
        self._library_loader = library_loader
        self._puller = puller
        self.store_path = store_path
        self.store: ChatStore | None = None
        self.settings = conv_mod.merged_settings(args, entry.settings if entry else None)
        self.conv = Conversation.from_args(args, system_prompt=self.settings["system_prompt"]) if args is not None else Conversation(system_prompt=self.settings["system_prompt"])
        self.logit_bias = conv_mod.parse_logit_bias(getattr(args, "logit_bias", None))
        self.chat_id: int | None = None
        self.buffer = StreamBuffer()
        self.reply_view: MessageView | None = None
        self.generating = False
        self.loading = False
        self.load_fraction: float | None = None
        self.last_tps: float | None = None
        self._compiles_before_reply = 0
        self.left_a_load = False  # quit while a model was loading (run() does not wait for it)
        self._load_thread: threading.Thread | None = None
        self._early_load: _LoadJob | None = None  # the load start_loading_now began, until _start_load takes it
        self.loaded_settings: dict = {}  # the load-time settings of the model now in the engine
        self._pending_reply = False  # a reply to start once the load in progress ends
        self._live: tuple[float, int] | None = None  # (time, n_tokens) at the reply's first text
        self._load_seq = 0  # only the newest load's report counts (a quick second switch wins)
        self._last_interrupt = 0.0  # when Ctrl+C last stopped a reply or asked to quit
        # the context meter outside a reply: what this conversation fills (None: unknown);
        # the engine's own count is the previous conversation's until the next reply
        self.ctx_used: int | None = 0

    # -- start and stop ---------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        self._chat_screen = ChatScreen(id="chat", settings=self.settings)
        return self._chat_screen

    @property
    def chat_screen(self) -> ChatScreen:
        return self._chat_screen

    @on(ChatScreen.Ready)
    def chat_screen_ready(self) -> None:
        """Once the chat screen is composed: open the chats, show settings, load the model."""
        try:
            self.store = ChatStore(self.store_path)
        except UserError as err:
            self.store = None
            self.notify(f"{err}; chats will not be saved this time", severity="error", title="Saved chats")
        self.set_interval(DRAIN_SECONDS, self._drain)
        self._setup_resume()
        self.refresh_models()
        self.chat_screen.sidebar.show_settings(self.settings)
        self._rebuild_views()
        if self.entry is None and self.start_problem:
            # the library has models but the default cannot be used: the library screen fixes that
            self.notify(f"{self.start_problem}. Pick or fix a model here, then Ctrl+T uses it in the chat.",
                        severity="error", title="Default model", timeout=20)
            self.push_screen(LibraryScreen(self.load_library), self._library_closed)
        elif self.entry is None:
            self.push_screen(FirstRunScreen(self._puller), self._first_run_closed)
        else:
            self._start_load(self.entry, reason="start")
        sidebar = self.chat_screen.sidebar
        if self.loading:  # its fields once the model is ready (on_load_done), or in BUILD_AFTER s
            self.set_timer(sidebar.BUILD_AFTER, sidebar.build)
        else:
            sidebar.build()
        self.update_status()

    async def action_quit(self) -> None:
        """Stop the reply in progress, wait for the worker, keep what it wrote, then exit with 0."""
        self.engine.cancel()
        workers = [w for w in self.workers if w.group in ("engine", "pull") and not w.is_finished]
        # a model load is not waited for: on a first run it compiles the kernels for minutes, and
        # Ctrl+Q did nothing until it ended; run() ends the process without it (numba writes each
        # cache file whole, so the kernels compiled so far are kept)
        loads = [w for w in workers if w.name == "_load_worker"]
        workers = [w for w in workers if w not in loads]
        self.left_a_load = bool(loads)
        if workers:
            # a reply stops within a token; a model load or a download cannot be interrupted
            self.notify("Stopping…" if self.generating else "Waiting for the model load or download to finish…", timeout=5)
            await self.workers.wait_for_complete(workers)
        if self.generating:
            # the worker's ReplyDone would arrive after the app has gone: file the partial reply now
            results = [w.result for w in workers if isinstance(w.result, GenerationResult)]
            self._finish_reply(results[-1] if results else GenerationResult(cancelled=True))
        if self.engine.resume is not None and not loads:  # (a load holds the engine; it has no context yet)
            await self.workers.wait_for_complete([self._save_state_worker()])  # this chat's context, for next time
        if self.store is not None:
            self.store.close()
        self.exit(0)

    async def action_interrupt(self) -> None:
        now = time.monotonic()
        if now - self._last_interrupt <= self.QUIT_AGAIN_SECONDS:
            await self.action_quit()  # the second press: also while a stopping reply winds down
            return
        if self.generating:
            self.action_stop()
            self._last_interrupt = now
            self.notify("Reply stopped. Ctrl+C again (or Ctrl+Q) quits.", timeout=self.QUIT_AGAIN_SECONDS)
            return
        selected = getattr(self.focused, "selected_text", "")
        if selected:
            self.copy_to_clipboard(selected)
            return
        self._last_interrupt = now
        self.notify("Press Ctrl+C again (or Ctrl+Q) to quit.", timeout=self.QUIT_AGAIN_SECONDS)

    # -- a bug must not end in a traceback on the user's screen ----------------------------

    quiet_crashes = False  # run() turns this on; tests keep Textual's loud failure
    crash_message: str | None = None

    def _fatal_error(self) -> None:
        if not self.quiet_crashes:
            return super()._fatal_error()
        import traceback

        from llamachat.model_store.paths import data_dir

        error = self._exception
        where = data_dir() / "crash.log"
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            with open(where, "a", encoding="utf-8") as log:
                log.write(time.strftime("\n--- %Y-%m-%d %H:%M:%S ---\n"))
                log.write("".join(traceback.format_exception(error)) if error else "unknown error\n")
            detail = f"; details in {where}"
        except OSError:
            detail = ""
        what = f"{error.__class__.__name__}: {error}" if error is not None else "unknown"
        self.crash_message = f"internal error ({what}){detail}"
        self.engine.cancel()
        self._close_messages_no_wait()

    # -- status -----------------------------------------------------------------------------

    def _show_mode(self) -> None:
        conv = self.conv
        if conv.mode == CHAT:
            text = "mode: chat (the model's template" + (f", {self.settings['chat_format']}" if self.settings.get("chat_format") else "") + ")"
        elif conv.mode == INSTRUCT:
            text = f"mode: instruct ({conv.preamble_name or 'no prompt file'})"
        else:
            rp = ", ".join(repr(r) for r in conv.reverse_prompts) or "none"
            text = f"mode: interactive ({conv.preamble_name or 'no prompt'}; reverse prompt {rp})"
        try:
            self.chat_screen.sidebar.show_mode(text, system_prompt=conv.mode == CHAT)
        except NoMatches:  # the chat screen is not composed yet or already gone
            pass

    def status_text(self, width: int | None = None) -> str:
        """The status line; with `width`, the version that fits it: at 80 columns the whole line
        does not, and what is cut must not be "Esc stops" or the context meter. The least
        needed goes first: the mode, the quant, the policy, the long words, the rate."""
        name = self.entry.name if self.entry else "no model"
        loading = ctx = rate = quant = None
        cut = bool(self.conv.memory_start)
        if self.loading:
            pct = f" {self.load_fraction * 100:.0f}%" if self.load_fraction is not None else ""
            loading = f"loading{pct}"
        elif self.engine.loaded:
            quant = quant_name(self.engine.metadata()) or None
            rate = self._rate_text()
            used = self.ctx_used
            if self.generating and self._live is not None and not getattr(self.entry, "remote", False):
                used = self.engine.n_tokens()  # live; before the first text the engine still holds the last reply
            ctx = f"ctx {'?' if used is None else used}/{self._context_size()}"
        # what a reply that fills the context does: stop, or shift it (the policy "shift");
        # before a reply, the policies drop-oldest and ask act on the turns (a line marks the cut)
        policy = "shift" if self._context_policy() == "shift" else "stop"
        preparing = bool(self.loading and WATCH.status())

        def line(mode=True, has_quant=True, full=True, long_words=True, has_rate=True) -> str:
            parts = [name]
            if loading:
                parts.append(loading + (" · preparing the engine" if preparing and long_words else ""))
            if quant and has_quant:
                parts.append(quant)
            if rate and has_rate:
                parts.append(rate)
            if ctx:
                parts.append(ctx + (f" (full: {policy})" if full else "")
                             + ((" · oldest turns dropped" if long_words else " · oldest dropped") if cut else ""))
            if self.generating:
                parts.append("writing… Esc stops" if long_words else "Esc stops")
            if mode:
                parts.append(self.conv.mode)
            return " │ ".join(parts)

        text = line()
        if width is None:
            return text
        left_out: dict = {}
        for step in ("mode", "has_quant", "full", "long_words", "has_rate"):
            if len(text) <= width:
                break
            left_out[step] = False
            text = line(**left_out)
        return text if len(text) <= width else text[: max(width - 1, 0)] + "…"

    def _context_policy(self) -> str:
        """What happens when the chat outgrows the context: the setting context_policy (sidebar,
        library, --context-policy; --context-shift is "shift"). Instruct and interactive
        transcripts have no turns to leave out: there a full context stops the reply ("stop")
        unless the policy is shift."""
        policy = self.settings.get("context_policy") or "drop-oldest"
        return policy if policy == "shift" or self.conv.mode == CHAT else "stop"

    def _context_size(self) -> int:
        """The model's n_ctx; for a remote server that does not tell its own, the n_ctx setting."""
        return self.engine.n_ctx() or (self.settings["n_ctx"] if getattr(self.entry, "remote", False) else 0)

    def _overflow(self, policy: str) -> int | None:
        """The tokens the next request needs with room for the reply, if more than n_ctx."""
        return conv_mod.context_overflow(self.conv, self.engine.count_tokens, self._context_size(), policy,
                                         self.settings.get("n_predict"))

    def _fit_context(self, policy: str | None = None) -> bool:
        """Leave the oldest turns out of the request until it fits (conversation.fit_context);
        True if the model's memory now starts later than before."""
        return conv_mod.fit_context(self.conv, self.engine.count_tokens, self._context_size(),
                                    policy or self._context_policy(), self.settings.get("n_predict"))

    def _refit_context(self) -> None:
        """The chat, the model, n_ctx or the policy changed: work out again where the model's
        memory begins (a chat reopened, a larger context remembering more), show it, and set the
        meter to what the chat fills at its next reply. With "ask" a cut the user chose stays."""
        if self._context_policy() in ("drop-oldest", "shift"):
            self.conv.memory_start = 0
            self._fit_context()
        self._show_memory_start()
        self.ctx_used = self._conversation_tokens()
        self.update_status()

    @_while_screen_exists
    def _show_memory_start(self) -> None:
        """A line in the chat above the first message the model still sees."""
        for old in self.chat_screen.messages.query(".memory-start"):
            old.remove()
        start = self.conv.memory_start
        views = self._views()
        if self.conv.mode != CHAT or start <= 0 or start >= len(views):
            return
        line = Static(f"⋯ the model no longer sees the messages above: the chat outgrew its context "
                      f"({self._context_size() or '?'} tokens) ⋯", classes="memory-start")
        self.chat_screen.messages.mount(line, before=views[start])

    @_while_screen_exists
    def _show_engine_notice(self) -> None:
        """The backend's one-time notice (the model's chat template was refused, a built-in
        format is used instead), as a line in the chat."""
        notice = self.engine.take_notice()
        if notice:
            self.chat_screen.messages.mount(Static(f"⚠ {notice}", classes="engine-notice-line"))

    def _live_rate(self) -> float | None:
        """Tokens a second of the reply being written, since its first text or since numba last
        compiled during it (a first reply compiles the decoding kernels after its first token:
        counted in, those seconds made the rate 0.3 tok/s instead of 20)."""
        if self._live is None:
            return None
        t0, n0 = self._live
        elapsed = time.monotonic() - t0
        made = self.engine.n_tokens() - n0
        return made / elapsed if elapsed > 0.5 and made > 0 else None

    def _rate_text(self) -> str:
        live = self._live_rate() if self.generating else None
        if live:
            return f"{live:.1f} tok/s"
        return f"{self.last_tps:.1f} tok/s" if self.last_tps else "– tok/s"

    def update_status(self) -> None:
        try:
            self.chat_screen.set_status(self.status_text)
        except NoMatches:
            pass

    @_while_screen_exists
    def _drain(self) -> None:
        text = self.buffer.drain()
        if text and self.reply_view is not None:
            if self._live is None or WATCH.last > self._live[0]:  # first text, or a compile since: start again
                self._live = (time.monotonic(), self.engine.n_tokens())
            self.reply_view.append(text)
        if self.loading:
            self.chat_screen.sidebar.show_progress(self.load_fraction or 0.0)
        if self.loading or self.generating:
            self.chat_screen.show_notice(WATCH.status())
            self.update_status()

    # -- models -----------------------------------------------------------------------------

    def load_library(self):
        if self._library_loader is not None:
            return self._library_loader()
        from llamachat.model_store.library import Library

        return Library.load()

    @_while_screen_exists
    def refresh_models(self) -> None:
        options: list[tuple[str, str]] = []
        quality: dict[str, str] = {}
        try:
            lib = self.load_library()
            for entry in lib.models.values():
                label = entry.name + ("  (missing)" if entry.missing else "") + ("  ★" if entry.name == lib.default_name else "")
                options.append((label, entry.name))
                quality[entry.name] = quality_text(entry.quality)
        except UserError as err:
            self.notify(str(err), severity="error", title="Model library")
        if self.entry is not None and not any(v == self.entry.name for _, v in options):
            options.append((self.entry.name + "  (file)", self.entry.name))
        self.chat_screen.sidebar.show_models(options, self.entry.name if self.entry else None, quality)

    def library_changed(self) -> None:
        """The library screen changed models.toml: refresh the picker and, if the model in use
        got new defaults, start from them (a context change reloads at the next reply)."""
        self.refresh_models()
        if self.entry is None or getattr(self.entry, "adhoc", False):
            return
        try:
            fresh = self.load_library().models.get(self.entry.name)
        except UserError:
            return
        if fresh is None or fresh.missing or (fresh.settings == self.entry.settings and _same_place(fresh, self.entry)):
            return
        self.entry = fresh
        self.settings = conv_mod.merged_settings(self.args, fresh.settings)
        if self.conv.mode == CHAT:
            self.conv.system_prompt = self.settings["system_prompt"]
        self.chat_screen.sidebar.show_settings(self.settings)
        self.notify(f"The sidebar now shows {fresh.name}'s new defaults.", title="Model library")

    @_while_screen_exists
    def switch_model(self, name: str) -> None:
        if self.entry is not None and name == self.entry.name and (self.engine.loaded or self.loading):
            return  # also what the picker reports when the app fills it in
        try:
            entry = self.load_library().resolve(name)
        except UserError as err:
            self.notify(str(err), severity="error", title="Cannot switch model")
            self.refresh_models()
            return
        if self.generating:
            self.engine.cancel()
        self.entry = entry
        self.settings = conv_mod.merged_settings(self.args, entry.settings)
        if self.conv.mode == CHAT and not self.conv.messages:
            self.conv.system_prompt = self.settings["system_prompt"]
        self.chat_screen.sidebar.show_settings(self.settings)
        self.refresh_models()  # the picker shows the new model, however the switch came
        self._start_load(entry, reason="switch")

    @_while_screen_exists
    def unload_model(self) -> None:
        """"(no model)" in the picker: stop any reply, release the model; sending then says why not."""
        if self.entry is None:
            return
        self.engine.cancel()
        self.entry = None
        self._load_seq += 1  # a load still running reports to nobody
        self.loading = False
        self._pending_reply = False
        self.chat_screen.sidebar.show_progress(None)
        self._unload_worker()
        self.notify("No model: pick one in the sidebar or the library (Ctrl+L) to chat again.", title="Model")
        self.update_status()

    @work(thread=True, exit_on_error=False, group="engine")
    def _unload_worker(self) -> None:
        self.engine.close()  # waits for the reply in progress to stop (within a token)

    def _load_settings(self) -> dict:
        return conv_mod.load_kwargs(self.settings, self.args)

    def _start_load(self, entry, reason: str) -> None:
        kwargs = self._load_settings()
        job, self._early_load = self._early_load, None
        if job is None or reason != "start" or job.entry is not entry or job.kwargs != kwargs:
            WATCH.reset()  # count this load's compiles (a first run, another format's first use)
            job = None
        self.loading = True
        self.load_fraction = 0.0 if job is None else self.load_fraction
        self.chat_screen.sidebar.show_progress(self.load_fraction)
        self.update_status()
        self._load_seq += 1
        self._load_worker(job or self._spawn_load(entry, kwargs), reason, self._load_seq)

    def start_loading_now(self) -> None:
        """Start loading the model the app opens with before Textual starts up (run() calls
        this): the load then runs beside the first layout, and the chat screen takes it over
        once composed (`_start_load`) instead of starting it then, a quarter of a second later."""
        if self.entry is None or getattr(self.entry, "remote", False) or self._early_load is not None:
            return
        WATCH.reset()
        self._early_load = self._spawn_load(self.entry, self._load_settings())

    def _spawn_load(self, entry, kwargs: dict) -> "_LoadJob":
        """Load `entry` in a daemon thread of its own, not in a thread worker: Textual's exit
        waits for its worker threads, so Ctrl+Q during a first run's compile (minutes) would
        not end the app until the compile did; run() ends the process without this thread."""
        job = _LoadJob(entry, kwargs)

        def progress(fraction: float) -> None:
            self.load_fraction = float(fraction)  # read by the UI timer

        def load() -> None:
            try:
                self.engine.load_entry(entry, progress=progress, defer_warm=True, **kwargs)
                job.error = None
            except BaseException as err:  # noqa: BLE001 - shown as a notification
                job.error = describe_error(err)
            finally:
                job.finish()

        self._load_thread = threading.Thread(target=load, name="llamachat-load", daemon=True)
        self._load_thread.start()
        return job

    @work(exit_on_error=False, group="engine")
    async def _load_worker(self, job: "_LoadJob", reason: str, seq: int) -> None:
        """Wait for a load's thread (`_spawn_load`), then report it with LoadDone."""
        await job.wait()
        self.post_message(LoadDone(job.entry, job.error, reason, job.kwargs, seq))

    @_while_screen_exists
    def on_load_done(self, message: LoadDone) -> None:
        if message.seq != self._load_seq:
            return  # a newer load is on its way; its report is the one that counts
        self.loading = False
        self.load_fraction = None
        self.chat_screen.sidebar.show_progress(None)
        self.chat_screen.show_notice(None)
        compiled, seconds = WATCH.summary()
        if compiled and seconds > 1 and not message.error:
            self.notify(f"The engine is ready for this CPU ({compiled} kernels compiled in {seconds:.0f} s, kept for "
                        "next time).", title="First run", timeout=6)
        if message.error:
            self.notify(message.error, severity="error", title="Model not loaded", timeout=10)
            self._pending_reply = False
        else:
            self.loaded_settings = dict(message.kwargs)
            self._refit_context()
            self._show_engine_notice()
            if message.reason == "n_ctx":
                self.notify(f"Ready with n_ctx={self.engine.n_ctx()}; the chat is kept.", title="Context")
            elif message.reason == "switch":
                self.notify(f"Loaded {message.entry.name}.", title="Model")
            if message.entry is self.entry:
                self.last_tps = None
            if self._pending_reply:
                self._pending_reply = False
                self.start_reply()
            elif not self.conv.user_speaks_first() and not self.generating:
                self.start_reply()
            if not self.generating:  # (a reply loads the kernels itself)
                self.engine.warm_up_later()
        self.update_status()
        self.call_after_refresh(self.chat_screen.sidebar.build)  # (after the status shows the model ready)

    # -- settings ---------------------------------------------------------------------------

    @on(Sidebar.SettingChanged)
    @_while_screen_exists
    def setting_changed(self, event: Sidebar.SettingChanged) -> None:
        if self.settings.get(event.name) == event.value and not (event.name == "n_ctx" and event.submitted):
            return
        self.settings[event.name] = event.value
        if event.name == "seed":
            self.engine.pending_seed = event.value  # llama.cpp seeds once; a new seed applies from the next reply
        if event.name == "n_ctx" and event.submitted:
            self._maybe_recreate_context()
        if event.name == "context_policy" and not self.generating:
            self._refit_context()

    def _load_changes(self) -> list[str]:
        """Load-time settings that differ from the model now loaded (seed and context shift are
        applied per reply)."""
        now, then = self._load_settings(), self.loaded_settings
        return [k for k in now if k not in ("seed", "context_shift") and now[k] != then.get(k)]

    def _maybe_recreate_context(self) -> bool:
        """Re-create the context if a load-time setting changed; True if a load started."""
        if self.entry is None or self.loading or self.generating or not self.engine.loaded:
            return False
        changed = self._load_changes()
        if not changed:
            return False
        if changed == ["n_ctx"]:
            self.notify(f"Re-creating the context with n_ctx={self.settings['n_ctx']}…", title="Context")
        else:
            self.notify(f"Reloading {self.entry.name} for the new {', '.join(changed)}…", title="Model")
        self._start_load(self.entry, reason="n_ctx")
        return True

    @on(Sidebar.ModelChosen)
    @_while_screen_exists
    def model_chosen(self, event: Sidebar.ModelChosen) -> None:
        if event.name is None:
            self.unload_model()
        else:
            self.switch_model(event.name)

    @on(Sidebar.SystemPromptChanged)
    def system_prompt_changed(self, event: Sidebar.SystemPromptChanged) -> None:
        if event.text == self.settings.get("system_prompt"):
            return
        self.settings["system_prompt"] = event.text
        self.conv.system_prompt = event.text

    # -- the conversation -------------------------------------------------------------------

    @on(ChatInput.Submitted)
    def message_submitted(self, event: ChatInput.Submitted) -> None:
        if self.send(event.text):
            event.chat_input.clear()

    def send(self, text: str) -> bool:
        """Add the user's message and start the reply; False (with a notice) if not now."""
        if self.generating:
            self.notify("A reply is being written: wait for it or press Esc to stop it.", severity="warning")
            return False
        if self.entry is None or not (self.engine.loaded or self.loading):
            self.notify("No model is loaded: pick one in the sidebar or the library (Ctrl+L).", severity="warning")
            return False
        text = text.rstrip("\n")
        if not text.strip():
            return False
        self.conv.messages.append(Message("user", text))
        self.chat_screen.add_message(MessageView("user", text, markdown=False))
        self.save_chat()
        self.start_reply()
        return True

    def start_reply(self, asked: bool = False) -> None:
        if self.loading:
            self._pending_reply = True
            self.notify("The reply starts once the model has loaded.", timeout=3)
            return
        if not self.engine.loaded:
            self.notify("No model is loaded: pick one in the sidebar.", severity="error")
            return
        if self._maybe_recreate_context():
            self._pending_reply = True
            return
        if not asked and self._context_policy() == "ask":
            need = self._overflow("ask")
            if need is not None:
                self._ask_context_full(need)
                return
        if self._fit_context():
            self._show_memory_start()
            self.notify("This chat no longer fits in the model's context: the oldest turns are left out "
                        "(a line in the chat marks where its memory begins).", title="Context", timeout=8)
        request = self.conv.request()
        self.ctx_used = self.engine.count_tokens(request)  # the meter until the engine's own count runs
        sampling = conv_mod.call_kwargs(self.settings, self.args)
        self.buffer.drain()
        name = self.entry.name if self.entry else "Assistant"
        self.reply_view = self.chat_screen.add_message(MessageView("assistant", name_label=name, streaming=True,
                                                                   markdown=self._markdown_replies()))
        self.chat_screen.messages.anchor()
        self.generating = True
        self._live = None
        self._compiles_before_reply = WATCH.done
        self.chat_screen.set_generating(True)
        self.update_status()
        self._generate_worker(request, sampling, self._context_policy() == "shift", self.chat_id)

    def _ask_context_full(self, need: int) -> None:
        """The "ask" policy: the next request does not fit; the user drops the oldest turns,
        starts a new chat with the message, or cancels (the message goes back into the box)."""
        from .screens.context_full import ContextFullScreen

        def answered(choice: str | None) -> None:
            if choice == "drop":
                if self._fit_context("drop-oldest"):
                    self._show_memory_start()
                self.start_reply(asked=True)
            elif choice == "new" and self.conv.messages and self.conv.messages[-1].role == "user":
                text = self.conv.messages.pop().content
                self.save_chat()
                self.action_new_chat()
                self.send(text)
            else:
                self._take_back_failed_message()
                self.ctx_used = self._conversation_tokens()
                self.update_status()

        self.push_screen(ContextFullScreen(need, self._context_size()), answered)

    @work(thread=True, exit_on_error=False, group="engine")
    def _generate_worker(self, request, sampling: dict, context_shift: bool = False, chat_id: int | None = None) -> None:
        try:
            result = self.engine.generate(request, sampling, self.buffer.push, self.logit_bias, context_shift=context_shift,
                                          chat_key=chat_id)
        except BaseException as err:  # noqa: BLE001 - generate never raises; belt and braces
            result = GenerationResult(error=describe_error(err))
        self.post_message(ReplyDone(result))
        return result  # read by action_quit, which cannot wait for ReplyDone

    @_while_screen_exists
    def on_reply_done(self, message: ReplyDone) -> None:
        if self.generating:  # not already filed by action_quit
            self._finish_reply(message.result)

    def _finish_reply(self, result: GenerationResult) -> None:
        view = self.reply_view
        rest = self.buffer.drain()
        if view is not None and rest:
            view.append(rest)
        self.reply_view = None
        self.generating = False
        self.chat_screen.set_generating(False)
        self.chat_screen.show_notice(None)
        if result.error and not result.text:
            if view is not None:
                view.remove()
            self._take_back_failed_message()
            self.notify(result.error, severity="error", title="No reply", timeout=10)
        else:
            msg = self.conv.reply_message(result.text, result.stop_reason, result.cancelled, result.stop_text)
            self.conv.messages.append(msg)
            if view is not None:
                view.finish(self.conv.display_text(msg), stopped=msg.stopped, note=msg.note)
            if result.error:
                self.notify(result.error, severity="error", title="Reply cut short", timeout=10)
            if result.stop_reason == "context_full":
                self.notify(f"The context is full ({result.n_ctx} tokens), so the reply stopped. "
                            "Start a new chat (Ctrl+N), raise n_ctx in the sidebar, or pick \"shift the context\" there.",
                            severity="warning", title="Context full", timeout=10)
            shifts = result.stats.get("context_shifts") or 0
            if shifts:
                self.notify(f"The context filled up {shifts} time{'s' if shifts > 1 else ''} during this reply; "
                            "older tokens were dropped (context shift) and the reply went on.", title="Context shifted", timeout=8)
            tps = result.tokens_per_second
            if WATCH.done != self._compiles_before_reply:
                tps = self._live_rate()  # the engine's figure counts the compiling in
                self.last_tps = tps
            if tps:
                self.last_tps = tps
            self.ctx_used = result.n_tokens
            self.save_chat()
        self._show_engine_notice()
        self.update_status()
        if self.engine.loaded and self.entry is not None and not self.loading:
            self._maybe_recreate_context()

    def _conversation_tokens(self) -> int | None:
        """The context this conversation will fill at its next reply (0 when it is empty)."""
        if not self.conv.messages:
            return 0
        return self.engine.count_tokens(self.conv.request())

    def _take_back_failed_message(self) -> None:
        """A turn that got no reply leaves the conversation; its text goes back into the box."""
        if not self.conv.messages or self.conv.messages[-1].role != "user":
            return
        text = self.conv.messages.pop().content
        users = [v for v in self._views() if v.role == "user"]
        if users:
            users[-1].remove()
        box = self.chat_screen.chat_input
        if not box.text.strip():
            box.text = text
        self.save_chat()

    def action_stop(self) -> None:
        if self.generating:
            self.engine.cancel()

    def _views(self) -> list[MessageView]:
        return [v for v in self.chat_screen.messages.query(MessageView) if v.role in ("user", "assistant")]

    def action_regenerate(self) -> None:
        if self.generating or self.loading:
            self.notify("Wait for the current reply or load to finish (Esc stops a reply).", severity="warning")
            return
        if not self.conv.messages:
            self.notify("Nothing to regenerate yet.")
            return
        views = self._views()
        if self.conv.messages[-1].role == "assistant":
            self.conv.messages.pop()
            if views and views[-1].role == "assistant":
                views[-1].remove()
        self.start_reply()

    def action_edit_last(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        idx = max((i for i, m in enumerate(self.conv.messages) if m.role == "user"), default=None)
        if idx is None:
            self.notify("No message to edit yet.")
            return
        text = self.conv.messages[idx].content
        n_remove = len(self.conv.messages) - idx
        del self.conv.messages[idx:]
        for view in self._views()[-n_remove:]:
            view.remove()
        self.ctx_used = self._conversation_tokens()
        self.update_status()
        self.save_chat()
        box = self.chat_screen.chat_input
        box.text = text
        box.focus()
        box.move_cursor(box.document.end)
        self.notify("Your last message is back in the box: edit it and press Enter.", timeout=4)

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        self._leave_chat()
        self.conv = Conversation(mode=self.conv.mode, preamble=self.conv.preamble, preamble_name=self.conv.preamble_name,
                                 reverse_prompts=list(self.conv.reverse_prompts), system_prompt=self.settings["system_prompt"])
        self.chat_id = None
        self.ctx_used = 0
        self._rebuild_views()
        self.chat_screen.chat_input.focus()
        self.notify("New chat.", timeout=2)
        if self.engine.loaded and not self.loading and not self.conv.user_speaks_first():
            self.start_reply()
        self.update_status()

    def _markdown_replies(self) -> bool:
        """Chat and instruct replies are Markdown; an interactive transcript is shown as written,
        and so is what the user typed (Markdown would join its lines into one paragraph)."""
        return self.conv.mode != INTERACTIVE

    def _rebuild_views(self) -> None:
        screen = self.chat_screen
        screen.clear_messages()
        if self.conv.mode != CHAT and self.conv.preamble.strip():
            screen.add_message(MessageView("preamble", self.conv.preamble.strip(), name_label=f"Prompt ({self.conv.preamble_name})",
                                           markdown=False))
        name = self.entry.name if self.entry else "Assistant"
        for msg in self.conv.messages:
            screen.add_message(MessageView(msg.role, self.conv.display_text(msg), name_label="You" if msg.role == "user" else name,
                                           stopped=msg.stopped, note=msg.note,
                                           markdown=self._markdown_replies() and msg.role != "user"))
        screen.messages.anchor()
        self._show_memory_start()
        self._show_mode()

    # -- saved chats ------------------------------------------------------------------------

    def save_chat(self) -> None:
        if self.store is None or not self.conv.messages:
            return
        try:
            self.chat_id = self.store.save(self.conv, self.entry.name if self.entry else "", self.chat_id)
        except UserError as err:
            self.notify(str(err), severity="error", title="Chat not saved")

    def action_chats(self) -> None:
        if self.store is None:
            self.notify("Saved chats are not available (the database could not be opened).", severity="error")
            return

        def opened(choice: tuple[int, int | None] | None) -> None:
            if choice is not None:
                self.open_chat(*choice)

        self.push_screen(ChatsScreen(), opened)

    def open_chat(self, chat_id: int, at_message: int | None = None) -> None:
        """Show a saved chat; at_message (its index, from a search): scrolled to that message."""
        if self.generating:
            self.notify("Stop the reply first (Esc).", severity="warning")
            return
        try:
            conv, model = self.store.load(chat_id)
        except UserError as err:
            self.notify(str(err), severity="error")
            return
        self._leave_chat()
        self.conv = conv
        self.chat_id = chat_id
        if conv.mode == CHAT:
            self.settings["system_prompt"] = conv.system_prompt
            self.chat_screen.sidebar.show_settings(self.settings)
        self._rebuild_views()
        self._refit_context()
        if at_message is not None:
            self.chat_screen.show_message(at_message)
        if self.entry is not None and model and model != self.entry.name:
            self.notify(f"This chat was held with {model}; it continues with {self.entry.name} (pick another in the sidebar).", timeout=6)
        self.update_status()

    def delete_chat(self, chat_id: int) -> None:
        self.store.delete(chat_id)
        self.engine.forget_state(chat_id)
        if chat_id == self.chat_id:
            self.chat_id = None

    def _chat_for(self, chat_id: int | None):
        """(conversation, model, id) of a saved chat, or of the one on screen (saved first)."""
        if chat_id is None or chat_id == self.chat_id:
            if not self.conv.messages:
                raise UserError("this chat is empty: nothing to export or rename yet")
            self.save_chat()
            return self.conv, (self.entry.name if self.entry else ""), self.chat_id
        conv, model = self.store.load(chat_id)
        return conv, model, chat_id

    def export_chat(self, chat_id: int | None = None, path: Path | str | None = None, overwrite: bool = False) -> Path:
        """Write a chat (default: the current one) as Markdown to `path` (default: the data
        dir's exports/); ExportExists if that file is there and overwrite is False."""
        from .chat_store import default_export_path, export_markdown

        conv, model, chat_id = self._chat_for(chat_id)
        return export_markdown(conv, model, path or default_export_path(conv, chat_id), overwrite=overwrite)

    def ask_export(self, chat_id: int | None = None) -> None:
        """Ask where to export a chat (the default path filled in); ask again before replacing a file."""
        from .chat_store import ExportExists, default_export_path
        from .screens.prompt import PromptScreen

        try:
            conv, _, saved_id = self._chat_for(chat_id)
        except UserError as err:
            self.notify(str(err), severity="error")
            return

        def write(path: str, overwrite: bool) -> None:
            try:
                written = self.export_chat(saved_id if saved_id is not None else chat_id, path, overwrite=overwrite)
            except ExportExists:
                self.push_screen(ConfirmScreen(f"{path} already exists. Replace it?", yes="Replace"),
                                 lambda yes: write(path, True) if yes else None)
                return
            except UserError as err:
                self.notify(str(err), severity="error", title="Chat not exported")
                return
            self.notify(f"Exported to {written}", title="Chat exported")

        def chosen(path: str | None) -> None:
            if path and path.strip():
                write(path.strip(), False)

        self.push_screen(PromptScreen("Export this chat as Markdown to:", str(default_export_path(conv, saved_id)),
                                      ok="Export"), chosen)

    def rename_chat(self, chat_id: int | None, title: str) -> None:
        """Give a chat (default: the one on screen) the user's title; empty: made from its text."""
        if chat_id is None or chat_id == self.chat_id:
            self.conv.name = " ".join(title.split())
            self.save_chat()
        elif self.store is not None:
            self.store.rename(chat_id, title)

    def ask_rename(self, chat_id: int | None = None, done=None) -> None:
        from .screens.prompt import PromptScreen

        try:
            conv, _, _ = self._chat_for(chat_id)
        except UserError as err:
            self.notify(str(err), severity="error")
            return

        def chosen(title: str | None) -> None:
            if title is None:
                return
            try:
                self.rename_chat(chat_id, title)
            except UserError as err:
                self.notify(str(err), severity="error", title="Chat not renamed")
                return
            if done is not None:
                done()

        self.push_screen(PromptScreen("New title for this chat (empty: from its first message):", conv.title(),
                                      ok="Rename"), chosen)

    def action_copy_reply(self) -> None:
        """The last reply to the clipboard (OSC 52: the terminal puts it there, also over ssh)."""
        reply = next((m for m in reversed(self.conv.messages) if m.role == "assistant"), None)
        if reply is None or not reply.content.strip():
            self.notify("No reply to copy yet.", severity="warning")
            return
        text = self.conv.display_text(reply)
        self.copy_to_clipboard(text)
        self.notify(f"Copied the last reply ({len(text)} characters).", title="Clipboard", timeout=3)

    def action_copy_code(self) -> None:
        """The last fenced code block of the chat's replies to the clipboard."""
        for msg in reversed(self.conv.messages):
            if msg.role != "assistant":
                continue
            code = last_code_block(msg.content)
            if code is not None:
                self.copy_to_clipboard(code)
                lines = code.count("\n") + 1
                self.notify(f"Copied the last code block ({lines} line{'s' if lines != 1 else ''}).", title="Clipboard", timeout=3)
                return
        self.notify("No code block in the replies yet.", severity="warning")

    def action_export(self) -> None:
        self.ask_export(None)

    def action_rename(self) -> None:
        self.ask_rename(None)

    # -- instant resume (tui/resume.py): a chat's context saved when it is left -------------

    def _setup_resume(self) -> None:
        """Saved contexts live beside the chat database, within models.toml's budget."""
        from .resume import ResumeStates, folder_beside

        if self.store is None:
            return
        try:
            mib = int(getattr(self.load_library(), "resume_budget_mib", DEFAULT_RESUME_BUDGET_MIB))
        except UserError:
            mib = DEFAULT_RESUME_BUDGET_MIB
        self.engine.resume = ResumeStates(folder_beside(self.store.path), mib << 20)
        self._show_resume_usage()

    @_while_screen_exists
    def _show_resume_usage(self) -> None:
        resume = self.engine.resume
        if resume is not None:
            self.chat_screen.sidebar.show_resume(resume.budget_bytes >> 20, resume.used_bytes(), len(resume.files()))

    def _leave_chat(self) -> None:
        """The chat on screen is being left: its context is saved (in the engine's thread)."""
        if self.engine.resume is not None and self.engine.loaded:
            self._save_state_worker()

    @work(thread=True, exit_on_error=False, group="engine")
    def _save_state_worker(self, evict_only: bool = False) -> None:
        if evict_only:
            self.engine.resume.evict()
        else:
            self.engine.save_state()
        self.call_from_thread(self._show_resume_usage)

    @on(ResumeBudget.Changed)
    def resume_budget_changed(self, event: ResumeBudget.Changed) -> None:
        if self.engine.resume is None:
            self.notify("Saved chats are not available, so contexts are not saved either.", severity="error")
            return
        try:
            from llamachat.model_store.library import Library

            Library.load().set_resume_budget(event.mib)
        except UserError as err:
            self.notify(str(err), severity="error", title="Budget not saved")
            return
        self.engine.resume.budget_bytes = event.mib << 20
        self.notify(f"Saved contexts may use {event.mib} MiB." if event.mib else
                    "Contexts are no longer saved.", title="Saved contexts", timeout=3)
        self._save_state_worker(evict_only=True)

    # -- other screens ----------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_library(self) -> None:
        if not isinstance(self.screen, LibraryScreen):
            self.push_screen(LibraryScreen(self.load_library), self._library_closed)

    def _library_closed(self, name: str | None) -> None:
        """The library screen closed; with a model name: "Use in chat" for that model."""
        if name is not None:
            self.switch_model(name)

    @on(LibraryScreen.Changed)
    def _library_screen_changed(self) -> None:
        self.library_changed()

    @on(ChatScreen.StopPressed)
    def _stop_pressed(self) -> None:
        self.action_stop()

    async def _first_run_closed(self, entry) -> None:
        """The first-run screen closed: with the pulled model, or None when the user quit."""
        if entry is None:
            await self.action_quit()
        else:
            self.first_run_done(entry)

    def first_run_done(self, entry) -> None:
        self.notify(f"{entry.name} is ready.", title="Model downloaded")
        self.entry = entry
        self.settings = conv_mod.merged_settings(self.args, entry.settings)
        if self.conv.mode == CHAT and not self.conv.messages:  # the chat opened before there was a model
            self.conv.system_prompt = self.settings["system_prompt"]
        self.chat_screen.sidebar.show_settings(self.settings)
        self.refresh_models()
        self._start_load(entry, reason="start")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New chat", "Start a new conversation (the current one is saved)", self.action_new_chat)
        yield SystemCommand("Saved chats", "Open, delete or export saved chats", self.action_chats)
        yield SystemCommand("Export chat", "Write this chat as Markdown to a file you choose", self.action_export)
        yield SystemCommand("Rename chat", "Give this chat a title of your own", self.action_rename)
        yield SystemCommand("Copy last reply", "Put the last reply on the clipboard (F2)", self.action_copy_reply)
        yield SystemCommand("Copy last code block", "Put the last fenced code block on the clipboard (F3)", self.action_copy_code)
        yield SystemCommand("Regenerate", "Write the last reply again", self.action_regenerate)
        yield SystemCommand("Edit last message", "Put the last message back in the box", self.action_edit_last)
        yield SystemCommand("Stop", "Stop the reply being written", self.action_stop)
        yield SystemCommand("Model library", "Models, their defaults, the default model", self.action_library)
        yield SystemCommand("Help", "Keys and modes", self.action_help)


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n(.*?)(?:^ {0,3}\1[`~]*[ \t]*$|\Z)", re.M | re.S)


def last_code_block(text: str) -> str | None:
    """The body of the last fenced code block in Markdown text (an unclosed fence runs to the
    end, as a reply cut short leaves it), without its fences; None if there is none."""
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    return blocks[-1].rstrip("\n") if blocks else None


def startup_model(args):
    """(entry, problem): the model to open with. A model named with -m must be usable (its
    error is one line before anything starts); the library's default whose file is gone is not
    fatal: the app opens without a model and says why (problem), so its library can fix it."""
    from llamachat.model_store.library import Library

    lib = Library.load()
    if args.model is not None:
        return conv_mod.resolve_model(args.model), None
    if lib.default_name is None and not lib.models:
        return None, None  # first run: the app offers to pull the default model
    try:
        return conv_mod.resolve_model(lib.default_name or next(iter(lib.models))), None
    except UserError as err:
        return None, str(err)


def run(args) -> int:
    """Resolve the model (errors are one line before anything starts), then run the app."""
    entry, problem = startup_model(args)
    # validate flags, the prompt file and the logit bias before the screen changes
    conv_mod.merged_settings(args, entry.settings if entry else None)
    Conversation.from_args(args)
    conv_mod.parse_logit_bias(getattr(args, "logit_bias", None))
    app = ChatApp(args, entry=entry, start_problem=problem)
    app.quiet_crashes = True
    app.start_loading_now()
    app.run()
    if app.crash_message:
        raise UserError(app.crash_message, exit_code=1)
    load = app._load_thread
    if load is not None and load.is_alive():  # (Ctrl+Q during a load, or a quit before the screen took the early load over)
        # a daemon thread, but it could still be compiling while the interpreter shuts down
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(app.return_code or 0)
    return app.return_code or 0
