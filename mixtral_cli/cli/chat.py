"""`mixtral chat`: the conversation, the slash commands and the read-reply loop.

One long-lived `Session` serves the whole conversation: each turn's prompt is the full Instruct
template of the conversation so far, and `Session.prefill` reuses the cached common prefix, so a
new turn only computes the tokens after the previous reply.

Interrupt rules: Ctrl-C during a reply stops it; the part already shown stays in the conversation
(a reply stopped before any text drops its user message too). Ctrl-C at the prompt clears the line;
a second Ctrl-C in a row, Ctrl-D, `/exit` or `/bye` ends the chat (exit code 0).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints.tokenizer import Tokenizer
from ..engine.generate import Completion, GenerationStats, Session
from ..engine.loader import Engine
from ..errors import UserError
from ..settings import GenerationConfig
from ..sizes import format_bytes
from . import ui

PROMPT = ">>> "
CONTINUE = "... "
FENCE = '"""'

HELP = [
    ("/help", "show this help"),
    ("/exit, /bye", "end the chat (also Ctrl-D, or Ctrl-C twice at the prompt)"),
    ("/clear", "forget the conversation and empty the KV cache (settings stay)"),
    ("/regen", "drop the last reply and generate it again"),
    ("/set NAME VALUE", "temp, top_p, top_k, min_p, repeat_penalty, seed (or 'random'), max_tokens, "
                        "system (no value clears it); '/set' alone lists them"),
    ("/json [SCHEMA|FILE|off]", "replies as JSON: '/json' any JSON object, '/json {...}' or '/json FILE' valid "
                                "under that JSON Schema, '/json off' free text again ('/set' shows which)"),
    ("/stats", "expert cache hits and misses, prefetch accuracy, bytes moved, last reply speeds"),
    (f'{FENCE} ... {FENCE}', "multi-line message: start and end it with a line of three double quotes"),
    ("Ctrl-C", "stop the reply; the part shown is kept (/regen redoes it); at the prompt: clear the line"),
    ("context", "when the conversation outgrows the context, the oldest turns are dropped (the system "
                "prompt stays); up to max_tokens (at most half the context) is kept free for the reply"),
]


class DoesNotFit(Exception):
    """Even the last user message alone leaves no room for the reply."""

    def __init__(self, prompt_tokens: int, reserve: int, ctx: int) -> None:
        super().__init__(f"the message needs {prompt_tokens} tokens plus {reserve} for the reply, "
                         f"more than the {ctx}-token context")
        self.prompt_tokens, self.reserve, self.ctx = prompt_tokens, reserve, ctx


@dataclass
class Conversation:
    """Alternating user/assistant messages (user first) plus an optional system prompt."""

    tokenizer: Tokenizer
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def turns(self) -> int:
        """User messages held (a turn is a user message and its reply)."""
        return sum(m["role"] == "user" for m in self.messages)

    @property
    def awaiting_reply(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "user"

    def add_user(self, text: str) -> None:
        if self.awaiting_reply:
            raise ValueError("the last user message has no reply yet")
        self.messages.append({"role": "user", "content": text})

    def add_reply(self, text: str) -> None:
        if not self.awaiting_reply:
            raise ValueError("a reply needs a user message to answer")
        self.messages.append({"role": "assistant", "content": text})

    def pop_user(self) -> str:
        if not self.awaiting_reply:
            raise ValueError("the last message is not a user message")
        return self.messages.pop()["content"]

    def pop_reply(self) -> str | None:
        """Remove and return the last reply (None if the last message is not a reply)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return None
        return self.messages.pop()["content"]

    def clear(self) -> None:
        self.messages.clear()

    def prompt_ids(self) -> list[int]:
        """The Instruct-template ids that ask for the reply to the last user message."""
        return self.tokenizer.encode_chat(self.messages, system=self.system)

    def fit(self, ctx: int, reserve: int) -> int:
        """Drop the oldest turns until prompt + `reserve` tokens fit `ctx`; return how many were dropped.

        Raises DoesNotFit (and changes nothing) if the last user message alone is too long.
        """
        start = 0
        while True:
            ids = self.tokenizer.encode_chat(self.messages[start:], system=self.system)
            if len(ids) + reserve <= ctx:
                break
            if start + 1 >= len(self.messages):
                raise DoesNotFit(len(ids), reserve, ctx)
            start += 2
        del self.messages[:start]
        return start // 2


# -- /set ----------------------------------------------------------------------------------------
def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"'{value}' is not a number") from None


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"'{value}' is not a whole number") from None


def _seed(value: str) -> int | None:
    return None if value.lower() in ("random", "none") else _int(value)


# name -> (field of SamplingConfig, parser); max_tokens and system are handled apart
SAMPLING_SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp": ("temperature", _float),
    "top_p": ("top_p", _float),
    "top_k": ("top_k", _int),
    "min_p": ("min_p", _float),
    "repeat_penalty": ("repeat_penalty", _float),
    "seed": ("seed", _seed),
}
ALIASES = {"temperature": "temp", "n": "max_tokens", "repeat": "repeat_penalty"}
SETTINGS = [*SAMPLING_SETTINGS, "max_tokens", "system"]


def apply_setting(gen: GenerationConfig, conv: Conversation, name: str, value: str) -> str:
    """Validate and apply `/set name value`; return a short confirmation. Bad input: UserError."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key == "system":
        conv.system = value or None
        return f"system prompt set ({len(value)} characters)" if value else "system prompt cleared"
    if not value:
        raise UserError(f"/set {key} needs a value", hint=f"for example: /set {key} {_current(gen, conv, key) or 1}")
    if key == "max_tokens":
        candidate = dataclasses.replace(gen, max_tokens=_int(value))
    elif key in SAMPLING_SETTINGS:
        attr, parse = SAMPLING_SETTINGS[key]
        candidate = dataclasses.replace(gen, sampling=dataclasses.replace(gen.sampling, **{attr: parse(value)}))
    else:
        raise UserError(f"unknown setting '{name}'", hint="one of " + ", ".join(SETTINGS))
    candidate.validate()
    gen.max_tokens, gen.sampling = candidate.max_tokens, candidate.sampling
    return f"{key} = {_current(gen, conv, key)}"


def _current(gen: GenerationConfig, conv: Conversation, key: str) -> str:
    if key == "system":
        return repr(conv.system) if conv.system else "(none)"
    if key == "max_tokens":
        return str(gen.max_tokens)
    value = getattr(gen.sampling, SAMPLING_SETTINGS[key][0])
    return "random" if value is None else str(value)


# -- the chat ------------------------------------------------------------------------------------
class Chat:
    """Conversation state plus the engine it talks to; `handle(line)` is one line of user input."""

    def __init__(self, engine: Engine, gen: GenerationConfig, system: str | None = None) -> None:
        self.engine = engine
        self.gen = gen
        self.session = Session(engine.model)
        self.conv = Conversation(engine.tokenizer, system or None)
        self.last: GenerationStats | None = None
        self.last_finish: str | None = None
        self.json_label: str | None = None  # what /json holds replies to (None: free text)
        self.running = True

    @property
    def ctx(self) -> int:
        return self.engine.model.max_len

    @property
    def reserve(self) -> int:
        """Tokens kept free for the reply: max_tokens, but at most half the context."""
        return max(1, min(self.gen.max_tokens, self.ctx // 2))

    # one line of input -------------------------------------------------------------------------
    def handle(self, text: str) -> None:
        """A slash command or a message to answer."""
        if text.startswith("/"):
            self.command(text)
        elif text.strip():
            self.ask(text)

    def ask(self, text: str) -> None:
        self.conv.add_user(text)
        if self._fit():
            self._reply()
        else:
            self.conv.pop_user()

    def command(self, line: str) -> None:
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        try:
            if name in ("/exit", "/bye", "/quit"):
                self.running = False
            elif name in ("/help", "/?"):
                ui.chat_table("commands", HELP)
            elif name == "/clear":
                self.conv.clear()
                self.session.reset()
                ui.chat_info("conversation cleared")
            elif name == "/regen":
                self.regen()
            elif name == "/set":
                self.set(arg)
            elif name == "/json":
                self.json(arg)
            elif name == "/stats":
                ui.chat_table("stats", self.stats_rows())
            else:
                raise UserError(f"unknown command {name}", hint="/help lists the commands")
        except UserError as e:
            ui.error_line(e.message, e.hint)

    def recover(self) -> None:
        """After a Ctrl-C outside the streaming loop: a message still waiting for its reply is dropped."""
        ui.err.print()
        if self.conv.awaiting_reply:
            self.conv.pop_user()

    def set(self, arg: str) -> None:
        if not arg:
            ui.chat_table("settings", [(k, _current(self.gen, self.conv, k)) for k in SETTINGS]
                          + [("json", f"{self.json_label or 'off'} (/json)")])
            return
        name, _, value = arg.partition(" ")
        ui.chat_info(apply_setting(self.gen, self.conv, name, value.strip()))

    def json(self, arg: str) -> None:
        """`/json`: replies held to any JSON object; `/json SCHEMA` (inline JSON or a file): to that
        schema; `/json off`: free text. A bad schema leaves the mode as it was."""
        from .structured import build, object_spec, schema_spec

        if arg.lower() in ("off", "none", "text"):
            self.gen.grammar, self.json_label = None, None
            ui.chat_info("json off: replies are free text")
            return
        spec = schema_spec(arg, "/json") if arg and arg.lower() != "on" else object_spec("/json")
        grammar = build(spec)
        grammar.check(self.engine.tokenizer)
        self.gen.grammar, self.json_label = grammar, spec.label
        ui.chat_info(f"json on: replies are {spec.label}")

    def regen(self) -> None:
        reply = self.conv.pop_reply()
        if reply is None:
            raise UserError("there is no reply to regenerate")
        if self._fit():
            self._reply()
        else:
            self.conv.add_reply(reply)

    # generation --------------------------------------------------------------------------------
    def _fit(self) -> bool:
        """Make the conversation fit the context; False (with a message) if the last message cannot."""
        try:
            dropped = self.conv.fit(self.ctx, self.reserve)
        except DoesNotFit as e:
            ui.error_line(f"{e}; the message was not sent",
                          hint="shorten it, lower max_tokens with /set, or raise -c/--ctx-size")
            return False
        if dropped:
            ui.notice(f"dropped {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the {self.ctx}-token context")
        return True

    def _reply(self) -> None:
        """Stream the reply to the last user message and record it (Ctrl-C keeps the part shown)."""
        stats = self.engine.experts.stats
        hits, misses = stats.hits, stats.misses
        completion = Completion(self.session, self.engine.tokenizer, self.conv.prompt_ids(), self.gen)
        stopped = False
        try:
            for _ in ui.stream(completion):
                pass
        except KeyboardInterrupt:
            stopped = True
        ui.end_stream(completion.text)
        text = completion.text
        if text.strip():
            self.conv.add_reply(text)
        else:
            self.conv.pop_user()
        uses = stats.hits + stats.misses - hits - misses
        self.last, self.last_finish = completion.stats, "stopped" if stopped else completion.finish_reason
        if completion.stats.completion_tokens:
            s = completion.stats
            ui.stats_line(s.prefill_tokens_per_s, s.decode_tokens_per_s, s.completion_tokens,
                          (stats.hits - hits) / uses if uses else None)
        if stopped:
            ui.notice("stopped; the partial reply is kept (/regen redoes it)" if text.strip()
                      else "stopped before any reply; the message was dropped")
        elif not text.strip():
            ui.notice("the model gave an empty reply; the message was dropped")
        elif completion.finish_reason == "length" and completion.stats.completion_tokens < self.gen.max_tokens:
            ui.notice(f"the reply reached the end of the {self.ctx}-token context")
        elif completion.finish_reason == "length" and self.gen.grammar is not None:
            ui.notice(f"the JSON reply was cut at max_tokens ({self.gen.max_tokens}) before it was complete "
                      "(raise it with /set max_tokens N)")

    def stats_rows(self) -> list[tuple[str, str]]:
        s = self.engine.experts.stats
        rate = f"{s.hit_rate:.1%}" if s.hit_rate is not None else "n/a"
        acc = s.prefetch_accuracy
        rows = [
            ("expert cache", f"{s.hits} hits, {s.misses} misses, hit rate {rate} ({s.slots_per_layer} slots per layer)"),
            ("prefetch", f"accuracy {acc:.1%} ({s.prefetch_hits} of {s.prefetches} prefetched experts used)"
             if acc is not None else "no prefetches"),
            ("moved to device", f"{format_bytes(s.bytes_to_device)} (compute waited {s.stall_s:.2f} s)"
             + (f"; {s.cpu_experts} missed experts computed on the CPU" if s.cpu_experts else "")),
            ("context", f"{len(self.session.cached)} of {self.ctx} tokens cached, {self.conv.turns} turn{'s' if self.conv.turns != 1 else ''}"),
        ]
        if self.last is not None:
            last = self.last
            rows.append(("last reply", f"{last.completion_tokens} tokens ({self.last_finish}), "
                                       f"prompt {last.prefill_tokens_per_s:.1f} tok/s "
                                       f"({last.prefill_tokens} of {last.prompt_tokens} computed), "
                                       f"gen {last.decode_tokens_per_s:.1f} tok/s"))
        return rows


# -- reading input -------------------------------------------------------------------------------
def history_path() -> Path | None:
    """$MIXTRAL_HISTORY: unset -> ~/.cache/mixtral/history, '0' or '' -> no file, else a path."""
    value = os.environ.get("MIXTRAL_HISTORY")
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "mixtral" / "history"
    return None if value in ("", "0") else Path(value).expanduser()


class LineReader:
    """Lines from stdin: with readline editing and history on a terminal, plain lines from a pipe."""

    def __init__(self) -> None:
        self.interactive = sys.stdin.isatty()
        self._readline = None
        self._history: Path | None = None
        if self.interactive and sys.stdout.isatty():
            try:
                import readline
            except ImportError:  # platforms without GNU readline / libedit
                readline = None
            self._readline = readline
            self._history = history_path() if readline else None
            if self._history is not None:
                readline.set_history_length(1000)
                try:
                    readline.read_history_file(self._history)
                except OSError:
                    pass

    def read(self, prompt: str) -> str | None:
        """One line without its newline; None at end of input. Ctrl-C raises KeyboardInterrupt."""
        if self._readline is not None:
            try:
                return input(prompt)
            except EOFError:
                return None
        if self.interactive:
            ui.err.file.write(prompt)
            ui.err.file.flush()
        line = sys.stdin.readline()
        return line.rstrip("\n").removesuffix("\r") if line else None

    def close(self) -> None:
        if self._history is not None and self._readline is not None:
            try:
                self._history.parent.mkdir(parents=True, exist_ok=True)
                self._readline.write_history_file(self._history)
            except OSError:
                pass


def read_message(reader: LineReader) -> str | None:
    """A line, or a `\"\"\"`-fenced block of lines (the fences may share a line with text)."""
    line = reader.read(PROMPT)
    if line is None or not line.lstrip().startswith(FENCE):
        return line
    first = line.lstrip()[len(FENCE):]
    if first.endswith(FENCE):
        return first[: -len(FENCE)]
    lines = [first] if first else []
    while True:
        more = reader.read(CONTINUE)
        if more is None:
            break
        if more.rstrip().endswith(FENCE):
            last = more.rstrip()[: -len(FENCE)]
            if last:
                lines.append(last)
            break
        lines.append(more)
    return "\n".join(lines)


def chat_loop(engine: Engine, gen: GenerationConfig, system: str | None = None) -> None:
    """Read messages and commands until /exit, Ctrl-D or a second Ctrl-C at the prompt."""
    chat = Chat(engine, gen, system)
    reader = LineReader()
    if reader.interactive:
        ui.chat_info(f"chat · {chat.ctx}-token context · /help for commands · Ctrl-D or /bye to exit")
    armed = False  # one Ctrl-C at the prompt was pressed
    try:
        while chat.running:
            try:
                line = read_message(reader)
            except KeyboardInterrupt:
                ui.err.print()
                if armed:
                    break
                armed = True
                ui.chat_info("(Ctrl-C again or Ctrl-D to exit)")
                continue
            armed = False
            if line is None:
                if reader.interactive:
                    ui.err.print()
                break
            try:
                chat.handle(line)
            except KeyboardInterrupt:  # outside the reply itself (e.g. while encoding): nothing to keep
                chat.recover()
    finally:
        reader.close()
