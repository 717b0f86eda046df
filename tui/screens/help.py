"""F1 / ?: the keys and what each mode does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen

HELP = """\
# llamachat

## Keys
| key | what it does |
|---|---|
| Enter | send the message |
| Ctrl+J (Shift+Enter in some terminals) | new line in the message |
| Esc | stop the reply (what it wrote so far stays, marked *stopped*); back to the message box |
| Ctrl+C | stop the reply; pressed twice, quit |
| Ctrl+R | regenerate the last reply |
| Ctrl+E | edit the last message: it goes back into the box, its reply is removed |
| Ctrl+N | new chat (the current one is saved) |
| Ctrl+O | saved chats: type to search them all, Up/Down and Enter open one (at the match); Tab to the list, then rename (r), delete (d), export to a Markdown file you name (e) |
| Ctrl+L | the model library: defaults, add, remove, set the default |
| Ctrl+B | show or hide the settings sidebar (hidden at first under 100 columns) |
| F2 / F3 | copy the last reply / its last code block to the clipboard (OSC 52) |
| Ctrl+P | command palette (rename or export this chat, copy, ...) |
| F1 (or ? outside the message box) | this help |
| Ctrl+Q | quit |

## Sidebar
Pick the model at the top (missing files are marked; loading shows a progress bar).
Sampling settings apply to the next reply; an invalid value shows why and is not used.
Changing **n_ctx** re-creates the context (press Enter in the field, or it happens at the
next reply); the chat is kept. Values start from the model's library defaults, and
command-line flags (`--temp 0` ...) win over those.

## Modes
- **chat**: the model's chat template (or the library's `chat_format`) and the system prompt.
- **instruct** (`--instruct --prompt-file alpaca`): each message is sent as an Alpaca
  instruction after the prompt file; a reply ends at end of text or the next `### Instruction:`.
- **interactive** (`-i -r "User:" -f chat-with-bob`): a transcript the prompt file opens; the
  model writes until the reverse prompt, then your line follows.

When a chat outgrows the context, the sidebar's policy (the library's `context_policy`) says
what happens: its oldest turns are left out (a line marks where the model's memory begins), the
app stops and asks, or the engine shifts the context (`--context-shift`: the older half is
dropped) and the reply goes on. Instruct and interactive transcripts stop at a full context
unless it shifts; the status line says which.

Press Esc to close.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        from textual.widgets import Markdown  # (imported when first shown, not at every start: see message_view)

        with VerticalScroll(id="help-box"):
            yield Markdown(HELP)
