"""`mixtral chat`: the conversation object in-process, and the real command in a pseudo-terminal."""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from mixtral_cli.checkpoints.tokenizer import Tokenizer
from mixtral_cli.cli import ui
from mixtral_cli.cli.chat import Chat, Conversation, DoesNotFit, apply_setting, read_message
from mixtral_cli.engine.generate import Completion, Session
from mixtral_cli.errors import UserError
from mixtral_cli.settings import GenerationConfig, SamplingConfig

ROOT = Path(__file__).resolve().parent.parent


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def greedy(n: int = 12) -> GenerationConfig:
    return GenerationConfig(max_tokens=n, sampling=SamplingConfig(temperature=0))


def fresh_reply(engine, messages, n: int = 12, system: str | None = None) -> str:
    """The greedy reply to `messages` from an empty KV cache (no prefix reuse)."""
    ids = engine.tokenizer.encode_chat(messages, system=system)
    return "".join(Completion(Session(engine.model), engine.tokenizer, ids, greedy(n)))


@pytest.fixture(scope="module")
def tok(v1_tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(v1_tokenizer_path)


# -- the conversation object ---------------------------------------------------------------------
def test_prompt_ids_are_the_instruct_template_of_all_turns(tok):
    conv = Conversation(tok, system="Be brief.")
    conv.add_user("Hi there")
    conv.add_reply("Hello! How can I help?")
    conv.add_user("Name a colour.")
    expected = tok.encode_chat([user("Hi there"), assistant("Hello! How can I help?"), user("Name a colour.")],
                               system="Be brief.")
    assert conv.prompt_ids() == expected
    # the earlier turn really is in there: <s>[INST] Be brief.\n\nHi there [/INST] Hello! ...</s>[INST] ...
    assert tok.decode(expected).startswith("[INST] Be brief.\n\nHi there [/INST] Hello! How can I help?")
    assert expected.count(tok.eos_id) == 1
    with pytest.raises(ValueError):
        conv.add_user("two user messages in a row")


def test_fit_drops_oldest_turns_and_keeps_the_system_prompt(tok):
    conv = Conversation(tok, system="SYS")
    for i in range(4):
        conv.add_user(f"question number {i}")
        conv.add_reply(f"answer number {i}")
    conv.add_user("last question")
    keep = conv.messages[4:]  # turns 2, 3 and the open question
    need = len(tok.encode_chat(keep, system="SYS"))
    assert conv.fit(need + 10, 10) == 2
    assert conv.messages == keep
    assert conv.prompt_ids() == tok.encode_chat(keep, system="SYS")
    assert tok.decode(conv.prompt_ids()).startswith("[INST] SYS\n\nquestion number 2")
    assert conv.fit(need + 10, 10) == 0  # already fits: nothing more is dropped


def test_fit_refuses_a_message_that_alone_is_too_long_and_changes_nothing(tok):
    conv = Conversation(tok)
    conv.add_user("hello")
    conv.add_reply("hi")
    conv.add_user("word " * 50)
    before = [dict(m) for m in conv.messages]
    alone = len(tok.encode_chat([user("word " * 50)]))
    with pytest.raises(DoesNotFit) as info:
        conv.fit(alone + 3, 4)
    assert info.value.prompt_tokens == alone
    assert conv.messages == before
    assert conv.fit(alone + 4, 4) == 1  # exactly fits once the first turn goes


def test_set_validates_and_leaves_settings_alone_on_bad_values(tok):
    gen, conv = greedy(), Conversation(tok)
    for name, value in [("temp", "abc"), ("temp", "-1"), ("top_p", "0"), ("top_p", "1.5"), ("top_k", "2.5"),
                        ("min_p", "1"), ("seed", "x"), ("seed", str(2**64)), ("temp", "inf"), ("repeat_penalty", "0"),
                        ("max_tokens", "0"), ("max_tokens", ""), ("bogus", "1")]:
        with pytest.raises(UserError):
            apply_setting(gen, conv, name, value)
    assert gen == greedy()
    apply_setting(gen, conv, "temp", "0.5")
    apply_setting(gen, conv, "top-p", "0.9")
    apply_setting(gen, conv, "top_k", "5")
    apply_setting(gen, conv, "min_p", "0.1")
    apply_setting(gen, conv, "seed", "7")
    apply_setting(gen, conv, "max_tokens", "99")
    apply_setting(gen, conv, "system", "You are terse.")
    assert (gen.sampling.temperature, gen.sampling.top_p, gen.sampling.top_k, gen.sampling.min_p,
            gen.sampling.seed, gen.max_tokens) == (0.5, 0.9, 5, 0.1, 7, 99)
    assert conv.system == "You are terse."
    apply_setting(gen, conv, "seed", "random")
    apply_setting(gen, conv, "system", "")
    assert gen.sampling.seed is None and conv.system is None


def test_read_message_joins_a_fenced_block():
    class Lines:
        def __init__(self, *lines):
            self.lines = list(lines)

        def read(self, prompt):
            return self.lines.pop(0) if self.lines else None

    assert read_message(Lines("plain")) == "plain"
    assert read_message(Lines('"""one', "two", 'three"""')) == "one\ntwo\nthree"
    assert read_message(Lines('"""', "a", "", "b", '"""')) == "a\n\nb"
    assert read_message(Lines('"""inline"""')) == "inline"
    assert read_message(Lines('"""', "unterminated")) == "unterminated"
    assert read_message(Lines()) is None


def test_ctrl_c_at_the_prompt_clears_the_line_and_twice_exits(engine_fp32, monkeypatch, capsys):
    """Ctrl-C while reading a line (a KeyboardInterrupt from the reader, as readline raises it)."""
    from mixtral_cli.cli import chat as chat_mod

    script = ["/set temp 0.5", KeyboardInterrupt, "/set top_k 5", KeyboardInterrupt, KeyboardInterrupt, "/set temp 9"]

    class ScriptedReader:
        interactive = True

        def __init__(self) -> None:
            self.lines = list(script)

        def read(self, prompt):
            item = self.lines.pop(0)
            if item is KeyboardInterrupt:
                raise KeyboardInterrupt
            return item

        def close(self) -> None:
            pass

    gen = greedy()
    monkeypatch.setattr(chat_mod, "LineReader", ScriptedReader)
    chat_mod.chat_loop(engine_fp32, gen)
    err = capsys.readouterr().err
    # one Ctrl-C: a hint, and the chat goes on; a line in between disarms it; two in a row: exit
    assert err.count("(Ctrl-C again or Ctrl-D to exit)") == 2
    assert "temp = 0.5" in err and "top_k = 5" in err and "temp = 9" not in err
    assert gen.sampling.temperature == 0.5 and gen.sampling.top_k == 5


# -- the chat against the tiny model, in-process ---------------------------------------------------
def test_second_turn_reuses_the_cache_and_sees_the_first(engine_fp32, capsys):
    chat = Chat(engine_fp32, greedy())
    chat.handle("Hello, who are you?")
    a1 = chat.conv.messages[-1]["content"]
    assert a1 == fresh_reply(engine_fp32, [user("Hello, who are you?")])
    chat.handle("And what is two plus two?")
    turns = [user("Hello, who are you?"), assistant(a1), user("And what is two plus two?")]
    a2 = chat.conv.messages[-1]["content"]
    assert a2 == fresh_reply(engine_fp32, turns)
    assert a2 != fresh_reply(engine_fp32, turns[2:])  # the answer depends on the first turn
    prompt2 = engine_fp32.tokenizer.encode_chat(turns)
    assert chat.last.prompt_tokens == len(prompt2)
    assert chat.last.prefill_tokens < len(prompt2) - 10  # only the new tokens were computed
    out = capsys.readouterr()
    assert out.out == a1 + "\n" + a2 + "\n"
    assert out.err.count("tokens · experts hit") == 2


def test_regen_and_clear(engine_fp32, capsys):
    chat = Chat(engine_fp32, greedy())
    chat.handle("/regen")
    assert "error: there is no reply to regenerate" in capsys.readouterr().err
    chat.handle("Tell me a joke.")
    first = list(chat.conv.messages)
    chat.handle("/regen")
    assert chat.conv.messages == first  # greedy: the same reply again, not a second copy
    assert chat.last.prefill_tokens == 1  # the prompt was still cached
    chat.handle("/set temp 1.5")
    chat.handle("/set seed 3")
    chat.handle("/regen")
    assert len(chat.conv.messages) == 2 and chat.conv.messages[1] != first[1]
    chat.handle("/clear")
    assert chat.conv.messages == [] and chat.session.cached == []
    err = capsys.readouterr().err
    assert "temp = 1.5" in err and "conversation cleared" in err


def test_commands_errors_are_one_line_and_the_chat_goes_on(engine_fp32, capsys):
    chat = Chat(engine_fp32, greedy())
    for line in ["/nope", "/set temp hot", "/set top_k -1", "/set"]:
        chat.handle(line)
    err = capsys.readouterr().err
    assert "error: unknown command /nope (/help lists the commands)" in err
    assert "error: 'hot' is not a number" in err and "error: top-k must be >= 0, got -1" in err
    assert "Traceback" not in err and chat.gen == greedy() and chat.running
    chat.handle("/help")
    assert "/regen" in capsys.readouterr().err
    chat.handle("/stats")
    assert "hit rate" in capsys.readouterr().err
    chat.handle("/bye")
    assert not chat.running


def test_interrupted_reply_is_kept_and_the_cache_stays_consistent(engine_fp32, monkeypatch, capsys):
    real_stream = ui.stream

    def stop_after_three(pieces):
        for i, piece in enumerate(real_stream(pieces)):
            if i == 3:
                raise KeyboardInterrupt
            yield piece

    chat = Chat(engine_fp32, greedy(20))
    monkeypatch.setattr(ui, "stream", stop_after_three)
    chat.handle("Write a long story.")
    monkeypatch.setattr(ui, "stream", real_stream)
    partial = chat.conv.messages[-1]["content"]
    assert partial and partial == fresh_reply(engine_fp32, [user("Write a long story.")], 20)[: len(partial)]
    assert chat.last.completion_tokens < 20 and chat.last_finish == "stopped"
    assert "partial reply is kept" in capsys.readouterr().err
    chat.gen.max_tokens = 12
    chat.handle("Shorter, please.")
    turns = [user("Write a long story."), assistant(partial), user("Shorter, please.")]
    assert chat.conv.messages[-1]["content"] == fresh_reply(engine_fp32, turns)
    assert chat.last.prefill_tokens < chat.last.prompt_tokens


def test_overflow_drops_oldest_turns_with_a_notice(engine_fp32, capsys):
    chat = Chat(engine_fp32, greedy())  # 12 tokens reserved for the reply in the 256-token context
    long = " ".join(f"item{j}" for j in range(20))  # ~60 tokens per message
    for i in range(4):
        chat.handle(f"Message {i}: {long}")
    err = capsys.readouterr().err
    assert "dropped 1 oldest turn to fit the 256-token context" in err
    assert chat.conv.messages[0]["content"].startswith("Message 1:")
    assert 256 - 12 - 80 < chat.last.prompt_tokens <= 256 - 12  # the last prompt fit with its reply reserve
    turns = chat.conv.turns
    chat.handle("word " * 250)  # alone more than the 244 tokens left for a prompt
    err = capsys.readouterr().err
    assert "more than the 256-token context; the message was not sent" in err
    assert chat.conv.turns == turns and not chat.conv.awaiting_reply


# -- the real command ------------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r\n", "\n")


def chat_env(home: Path, history: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MIXTRAL_HISTORY", "XDG_CACHE_HOME")}
    env |= {"HOME": str(home), "HF_HUB_OFFLINE": "1", "TERM": "dumb", "PYTHONPATH": str(ROOT)}
    if not history:
        env["MIXTRAL_HISTORY"] = "0"
    return env


def chat_args(ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixtral_cli", "chat", "-m", str(ckpt), "--temp", "0", "--device", "cpu", *extra]


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal: \x03 sends SIGINT


class Terminal:
    """A process on a pseudo-terminal: type keys, wait for patterns in what it prints."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                     start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.fd = master
        self.raw = ""
        self.pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.closed = False

    @property
    def text(self) -> str:
        return clean(self.raw)

    def _pump(self, timeout: float) -> None:
        if self.closed:
            time.sleep(min(timeout, 0.05))
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the process closed the terminal
            data = b""
        if not data:
            self.closed = True
        self.raw += self._decoder.decode(data)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait for `pattern` after the previous match; move past it."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or (self.closed and self.proc.poll() is not None):
                raise AssertionError(f"{pattern!r} not seen; output after the last match:\n{self.text[self.pos:]}")
            self._pump(0.1)

    def wait_for_more(self, chars: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.text) - self.pos < chars:
            assert time.monotonic() < deadline, f"no output after:\n{self.text}"
            self._pump(0.1)

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def line(self, text: str) -> None:
        self.send(text + "\r")

    def reply(self) -> re.Match:
        """Wait for the end of a reply (its stats line) and the next prompt."""
        m = self.expect(r"(\d+) tokens · experts hit \d+%")
        self.expect(">>> ")
        return m

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._pump(0.1)
        try:
            return self.proc.wait(timeout=1)
        finally:
            os.close(self.fd)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def terminal():
    started: list[Terminal] = []

    def start(args: list[str], env: dict[str, str]) -> Terminal:
        t = Terminal(args, env)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def test_two_turns_in_a_terminal_with_history_and_slash_commands(tiny_ckpt, engine_fp32, terminal, tmp_path):
    u1, u2 = "Hello, who are you?", "And what is two plus two?"
    a1 = fresh_reply(engine_fp32, [user(u1)])
    a2 = fresh_reply(engine_fp32, [user(u1), assistant(a1), user(u2)])
    t = terminal(chat_args(tiny_ckpt, "-n", "12", "-c", "256", "--dtype", "float32"), chat_env(tmp_path, history=True))
    t.expect("/help for commands")
    t.expect(">>> ")
    t.line(u1)
    t.expect(re.escape(u1) + "\n")
    t.expect(re.escape(clean(a1)) + "\n")
    assert t.reply().group(1) == "12"
    t.line(u2)
    t.expect(re.escape(clean(a2)) + "\n")  # answered with the first turn in its prompt
    t.reply()
    t.line("/stats")
    m = t.expect(r"\((\d+) of (\d+) computed\)")
    assert int(m.group(1)) < int(m.group(2)) - 10  # the first turn came from the KV cache
    t.expect(">>> ")
    t.line("/help")
    t.expect("/regen")
    t.expect(">>> ")
    t.line("/set temp 0.5")
    t.expect("temp = 0.5")
    t.expect(">>> ")
    t.line("/set top_p 7")
    t.expect(r"error: top-p must be in \(0, 1\], got 7.0")
    t.expect(">>> ")
    t.line("/set temp 0.25")
    t.expect("temp = 0.25")
    t.expect(">>> ")
    t.send("\x1b[A\x1b[A\x1b[A\r")  # arrow up three times: back to "/set temp 0.5"
    t.expect("temp = 0.5")
    t.expect(">>> ")
    t.line("/bogus")
    t.expect(r"error: unknown command /bogus")
    t.expect(">>> ")
    t.line("/exit")
    assert t.exit_code() == 0
    history = (tmp_path / ".cache" / "mixtral" / "history").read_text()
    assert u1 in history and "/set temp 0.25" in history


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tiny_ckpt, terminal, tmp_path):
    from tiny import long_context_copy

    # a greedy reply in a 16k context that cannot end by itself before the Ctrl-C reaches it
    ckpt = long_context_copy(tiny_ckpt, tmp_path / "long")
    t = terminal(chat_args(ckpt, "-n", "12", "-c", "16384"), chat_env(tmp_path))
    t.expect(">>> ")
    t.line("/set max_tokens 16000")
    t.expect("max_tokens = 16000")
    t.expect(">>> ")
    t.line("Tell me a very long story.")
    t.expect("story.\n")
    t.wait_for_more(40)  # the reply is streaming
    assert t.proc.poll() is None
    t.send("\x03")
    m = t.expect(r"(\d+) tokens · experts hit")
    assert int(m.group(1)) < 16000
    t.expect("stopped; the partial reply is kept")
    t.expect(">>> ")
    t.line("/set max_tokens 12")
    t.expect(">>> ")
    t.line("What happened next?")
    assert t.reply().group(1) == "12"
    t.line("/stats")
    t.expect(r"2 turns")  # the story (partial) and its follow-up
    t.expect(">>> ")
    t.line("/exit")
    assert t.exit_code() == 0


def test_context_overflow_notice_and_ctrl_d(tiny_ckpt, terminal, tmp_path):
    t = terminal(chat_args(tiny_ckpt, "-n", "12", "-c", "64"), chat_env(tmp_path))
    t.expect(">>> ")
    for i in range(4):
        t.line(f"Message {i} here.")
        t.reply()
    assert re.search(r"dropped 1 oldest turn to fit the 64-token context", t.text)
    t.line("word " * 80)
    t.expect(r"more than the 64-token context; the message was not sent")
    t.expect(">>> ")
    t.line("Still there?")
    t.reply()
    t.send("\x04")  # Ctrl-D
    assert t.exit_code() == 0


def test_piped_stdin_prints_only_the_replies(tiny_ckpt, engine_fp32, tmp_path):
    u1, u2 = "Hello, who are you?", "Multi\nline"
    a1 = fresh_reply(engine_fp32, [user(u1)])
    a2 = fresh_reply(engine_fp32, [user(u1), assistant(a1), user(u2)])
    stdin = f'{u1}\n/set temp x\n"""\nMulti\nline\n"""\n/stats\n'
    proc = subprocess.run(chat_args(tiny_ckpt, "-n", "12", "-c", "256", "--dtype", "float32"),
                          input=stdin.encode(), capture_output=True, env=chat_env(tmp_path), cwd=ROOT, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert out == a1 + "\n" + a2 + "\n"
    assert err.count("tokens · experts hit") == 2
    assert "error: 'x' is not a number" in err and "hit rate" in err
    assert ">>>" not in out + err


# -- /json ------------------------------------------------------------------------------------------
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def test_json_toggle_holds_replies_to_json_and_back(engine_fp32, capsys, tmp_path):
    import json

    import jsonschema

    chat = Chat(engine_fp32, GenerationConfig(max_tokens=60, sampling=SamplingConfig(temperature=0.8, seed=5)))
    chat.handle("Who are you?")
    with pytest.raises(ValueError):  # the tiny model writes no JSON of itself
        json.loads(chat.conv.messages[-1]["content"])
    chat.handle("/json")
    assert "json on: replies are any JSON object" in capsys.readouterr().err
    chat.handle("Who are you, as JSON?")
    assert chat.last_finish == "stop"
    assert isinstance(json.loads(chat.conv.messages[-1]["content"]), dict)
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    for arg in (json.dumps(PERSON), str(tmp_path / "person.json")):
        chat.handle(f"/json {arg}")
        chat.handle("Describe a person.")
        assert chat.last_finish == "stop"
        jsonschema.validate(json.loads(chat.conv.messages[-1]["content"]), PERSON)
    chat.handle("/set")
    err = capsys.readouterr().err
    assert f"json on: replies are JSON under the schema in {tmp_path / 'person.json'}" in err
    table = " ".join(err.split())
    assert re.search(r"json JSON under the schema in .*\(/json\)", table), table
    # a bad schema is one line, and the mode stays as it was
    for bad, needle in [('{"type": "foo"}', "error: /json: Invalid type: foo"),
                        ('{"type": ', "error: /json: not valid JSON"),
                        (str(tmp_path / "missing.json"), "error: /json: no such file")]:
        chat.handle(f"/json {bad}")
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert chat.json_label.endswith("person.json") and chat.gen.grammar is not None
    chat.handle("/json off")
    assert "json off" in capsys.readouterr().err and chat.gen.grammar is None
    chat.handle("/set")
    assert re.search(r"json\s+off \(/json\)", capsys.readouterr().err)
    chat.handle("/help")
    assert "/json [SCHEMA|FILE|off]" in capsys.readouterr().err
    assert chat.running


def test_json_reply_cut_at_max_tokens_says_so(engine_fp32, capsys):
    chat = Chat(engine_fp32, GenerationConfig(max_tokens=4, sampling=SamplingConfig(temperature=0.8, seed=1)))
    chat.handle('/json {"type": "object", "required": ["essay"], "properties": {"essay": {"type": "string", "minLength": 100}}}')
    chat.handle("Write an essay.")
    assert chat.last_finish == "length"
    assert "the JSON reply was cut at max_tokens (4)" in capsys.readouterr().err


def test_piped_json_mode(tiny_ckpt, tmp_path):
    import json

    stdin = '/json {"type": "object", "required": ["n"], "additionalProperties": false, "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}\nHi\n'
    proc = subprocess.run(chat_args(tiny_ckpt, "-n", "40", "--temp", "0.9", "-s", "2"), input=stdin.encode(),
                          capture_output=True, env=chat_env(tmp_path), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    reply = json.loads(proc.stdout.decode())
    assert set(reply) == {"n"} and 0 <= reply["n"] <= 9
