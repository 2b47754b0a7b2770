"""`numallm chat [MODEL]`: a streaming chat REPL with the model's chat template and history.

Ctrl-C while an answer streams stops that answer (the session goes on); at the prompt it says how
to quit. Ctrl-D or /bye ends the session. After each answer a line gives prompt and generation
speeds (tokens/s), the numbers engines are compared by.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs, speed_line

HELP = """commands:
  /reset          forget the conversation
  /stats          model, context use, speeds, memory
  /system TEXT    set the system prompt (and reset)
  /help           this text
  /bye            quit (or Ctrl-D)
Ctrl-C stops the current answer."""


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p, model_optional=True)
    add_sampling_args(p, n_predict=-1)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template to use instead of the model's")
    p.add_argument("--verbose-prompt", action="store_true",
                   help="print each rendered prompt (chat template applied) before the answer")
    p.set_defaults(func=run)


class _Interrupt:
    """SIGINT sets a flag while an answer streams, so generation stops between tokens."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.hit = False
        self.prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.prev)


class _PromptWaker:
    """Ctrl-C at the prompt, answered every time.

    input() waits in readline's select(), which returns on a signal only when the signal lands on
    the main thread while it waits. The kernel may hand a terminal's SIGINT to any thread that
    does not block it (the pool's workers are such threads), and one that arrives just before
    readline starts waiting finds no select() to interrupt: either way CPython only records it,
    and the prompt went on waiting for a key press, deaf to further Ctrl-Cs that took the same
    path. So while the prompt waits, a watcher thread reads each signal's byte from
    signal.set_wakeup_fd and, for a SIGINT, sends the main thread a no-op signal a few times:
    select() returns, CPython runs the recorded SIGINT handler and input() raises
    KeyboardInterrupt. Where the main thread got the SIGINT itself, the kicks change nothing."""

    KICK = getattr(signal, "SIGRTMIN", None)   # no-op handler below; nothing else uses it

    def __enter__(self):
        self.at_prompt = False
        self._thread = None
        if self.KICK is None:                      # no real-time signals: plain input()
            return self
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)          # a signal handler must never block on it
        self._prev_kick = signal.signal(self.KICK, lambda *_: None)
        self._prev_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="numallm-prompt-waker", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while True:
            try:
                data = os.read(self._r, 512)
            except OSError:
                return
            if not data:                          # __exit__ closed the write end
                return
            for _ in range(5 if signal.SIGINT in data else 0):
                time.sleep(0.05)
                if not self.at_prompt:
                    break
                signal.pthread_kill(main, self.KICK)

    def input(self, prompt: str) -> str:
        self.at_prompt = True
        try:
            return input(prompt)
        finally:
            self.at_prompt = False

    def __exit__(self, *exc):
        if self._thread is None:
            return
        signal.set_wakeup_fd(self._prev_fd)
        signal.signal(self.KICK, self._prev_kick)
        os.close(self._w)
        self._thread.join(timeout=1.0)
        os.close(self._r)


def run(args) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    llm = load_model(args, args.chat_template)
    kw = sampling_kwargs(args, llm.n_ctx)
    system = args.system
    # a template that cannot render a plain first turn is refused now, not at the first message
    llm.template.render(([{"role": "system", "content": system}] if system else [])
                        + [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    tpl = "fallback (the model has none)" if llm.template.is_fallback else "the model's"
    print(f"numallm chat: {llm.path} ({llm.args.arch}, {llm.n_ctx} ctx, {llm.pool.n_threads} threads, "
          f"{tpl} chat template). /help for commands.", file=sys.stderr)
    with _PromptWaker() as waker:
        return _session(llm, args, kw, system, waker)


def _session(llm, args, kw: dict, system: str | None, waker: "_PromptWaker") -> int:
    history: list[dict] = []
    last = None
    out = sys.stdout
    while True:
        try:
            line = waker.input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(use /bye or Ctrl-D to quit)")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/bye", "/exit", "/quit"):
            return 0
        if cmd == "/help":
            print(HELP)
            continue
        if cmd == "/reset":
            history.clear()
            llm.reset()
            print("(conversation reset)")
            continue
        if cmd.startswith("/system"):
            system = cmd[len("/system"):].strip() or None
            history.clear()
            print("(system prompt set; conversation reset)")
            continue
        if cmd == "/stats":
            print(stats(llm, last, history))
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd.split()[0]}; /help lists them")
            continue
        history.append({"role": "user", "content": line})
        sys_msg = [{"role": "system", "content": system}] if system else []
        want = llm.n_ctx if kw["max_tokens"] is None else kw["max_tokens"]   # None: no limit
        dropped = fit_history(llm, sys_msg, history, room=min(want, llm.n_ctx // 4))
        if dropped:
            print(f"(context full: dropped the {dropped} oldest messages)", file=sys.stderr)
        if not history:
            print(f"numallm: error: the message does not fit in the {llm.n_ctx}-token context; "
                  f"shorten it or restart with a larger -c", file=sys.stderr)
            continue
        messages = sys_msg + history
        answer = []
        if args.verbose_prompt:
            print(llm.template.render(messages, add_generation_prompt=True), file=sys.stderr)
        with _Interrupt() as intr:
            for chunk in llm.chat(messages, stream=True, **kw):
                out.write(chunk.text)
                out.flush()
                answer.append(chunk.text)
                last = chunk
                if intr.hit:
                    break
        reason = "interrupted" if intr.hit else (last.finish_reason if last else "")
        history.append({"role": "assistant", "content": "".join(answer)})
        out.write("\n")
        if last is not None:
            note = f" ({reason})" if reason not in ("stop", None) else ""
            print(speed_line(last.prompt_tokens, last.prompt_tps, last.generation_tokens,
                             last.generation_tps) + note, file=sys.stderr)


def fit_history(llm, sys_msg: list[dict], history: list[dict], room: int) -> int:
    """Drop the oldest turns until the prompt leaves `room` tokens for the answer (the whole
    history when even the last message does not fit). Returns how many messages were dropped."""
    dropped = 0
    while history and len(llm.chat_tokens(sys_msg + history)) + room > llm.n_ctx:
        n = 2 if len(history) > 2 else len(history)
        del history[:n]
        dropped += n
    return dropped


def stats(llm, last, history) -> str:
    import psutil

    from ..placement_check import check

    rss = psutil.Process().memory_info().rss
    lines = [f"model: {llm.path} ({llm.args.arch}, {llm.weight_bytes / 1e6:.1f} MB of weights)",
             f"context: {len(llm.cached)}/{llm.n_ctx} tokens, {len(history)} messages",
             f"threads: {llm.pool.n_threads}",
             f"memory: RSS {rss / 1e6:.1f} MB"]
    if last is not None:
        lines.append("last answer: " + speed_line(last.prompt_tokens, last.prompt_tps,
                                                  last.generation_tokens, last.generation_tps))
    # where the bytes are and where each layer ran, as observed (numallm.gpu.offload)
    lines.append("PROCESSOR  100% CPU" if llm.offload is None else llm.offload.summary(llm.model))
    lines.append(llm.placement.summary())
    # the plan the load applied: bytes per node as planned (numallm.placement.make_plan)
    lines += ["plan: " + llm.plan.lines()[0]] + llm.plan.lines()[1:]
    # the same page check as `numallm topo MODEL --verify`, WARNING lines included
    lines += check(llm.placement).lines()
    return "\n".join(lines)
