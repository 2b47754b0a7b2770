"""Chat templates: turn a conversation into the prompt text a chat model was trained on.

A GGUF model carries its Hugging Face chat template (Jinja2) in `tokenizer.chat_template`. It is
rendered here the way transformers' `apply_chat_template` does (same environment options, filters
and globals), so prompts match what the model saw in training. Templates come from untrusted
files, so they run in Jinja's immutable sandbox: no attribute tricks (`''.__class__`), no
mutating methods, bounded `range`.

Rendering is bounded too, since a template can loop, recurse or build strings without end: each
rendering gets a budget of loop iterations and calls (MAX_STEPS), seconds (MAX_SECONDS) and
characters, for its output and for any one value it builds (MAX_CHARS). The counting is compiled
into the template (every `for` iterates through `_BoundedEnvironment.counted`, every `~` result is
measured) and done in the sandbox's hooks (calls, filters, `*`, `**`, `+`, `%`). A template over
budget is refused with one line (ChatTemplateError); there is no silent fallback.

Models without a template get a plain fallback (see `ChatTemplate.render`).
"""
from __future__ import annotations

import contextvars
import copy
import functools
import json
import math
import numbers
import re
import time
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import NumallmError

__all__ = ["ChatTemplate", "ChatTemplateError"]

_OVERRIDE_HINT = "use --chat-template FILE to override"


class ChatTemplateError(NumallmError):
    """A chat template that does not compile, or that fails or refuses to render a conversation."""


class _TemplateRaised(Exception):
    """raise_exception() called by the template; carries the template's own message."""


# Budgets of one rendering: far above what real chat templates use (a few hundred steps, the
# conversation's size in characters), far below what would hang or exhaust memory.
MAX_SOURCE = 1 << 20        # bytes of template source
MAX_STEPS = 200_000         # loop iterations plus calls
MAX_SECONDS = 2.0
MAX_CHARS = 4 << 20         # characters of the output and of any one value built on the way


class _OverBudget(Exception):
    """The rendering ran past one of its budgets; says which."""


class _Budget:
    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _OverBudget(f"more than {MAX_STEPS} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"more than {MAX_SECONDS:g} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("template_budget", default=None)
_WIDE = re.compile(r"\d{8,}")   # a width or precision in a format string, e.g. "%099999999d"


def _sized(value: Any) -> Any:
    """`value` if it is within MAX_CHARS (strings, lists, dicts...), else _OverBudget."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_CHARS:
        raise _OverBudget(f"a value of over {MAX_CHARS} characters or items")
    return value


def _room(n: int) -> None:
    """_OverBudget when a value about to be built would have `n` characters or items."""
    if n > MAX_CHARS:
        raise _OverBudget(f"a value of over {MAX_CHARS} characters or items")


def _check_args(args: tuple, kwargs: dict) -> None:
    """Arguments that would make a string method or filter build something huge: a number over
    MAX_CHARS (`ljust(10**10)`, `center`, `indent`) or a format width as large."""
    for a in (*args, *kwargs.values()):
        _sized(a)
        if isinstance(a, numbers.Number) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            raise _OverBudget(f"an argument of {a} (over {MAX_CHARS})")
        if isinstance(a, str) and _WIDE.search(a):
            raise _OverBudget("a format width of over 8 digits")


def _bounded_filter(f: Callable) -> Callable:
    @functools.wraps(f)   # keeps jinja's pass_context/pass_environment marks
    def run(*args: Any, **kwargs: Any) -> Any:
        # checked even outside a rendering: jinja runs filters of constants while compiling
        budget = _budget.get()
        if budget is not None:
            budget.step()
        _check_args(args, kwargs)
        if f.__name__ == "do_replace" and len(args) >= 4 and isinstance(args[1], str):
            s, old, new = str(args[1]), str(args[2]), str(args[3])   # (eval_ctx, s, old, new)
            _room(len(s) + (s.count(old) if old else len(s) + 1) * len(new))
        return _sized(f(*args, **kwargs))
    return run


class _CountingCodeGenerator(CodeGenerator):
    """Compiles every `for` to iterate through environment.counted and every `~` to be measured."""

    def visit_For(self, node: jinja2.nodes.For, frame) -> None:
        node = copy.copy(node)
        node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("counted"), [node.iter],
                                      [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _CountingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    @staticmethod
    def counted(iterable: Any):
        budget = _budget.get()
        for item in iterable:
            if budget is not None:
                budget.step()
            yield item

    sized = staticmethod(_sized)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if _budget.get() is not None:
            if operator == "*":
                seq, n = (left, right) if isinstance(right, numbers.Integral) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, numbers.Integral):
                    _room(len(seq) * max(int(n), 0))
            elif operator == "**" and isinstance(left, numbers.Number) and isinstance(right, numbers.Number):
                if abs(left) > 1 and right > 0 and right * math.log2(abs(left)) > 4096:
                    raise _OverBudget(f"a power of over 4096 bits ({left} ** {right})")
            elif operator == "%" and isinstance(left, str):
                _check_args(right if isinstance(right, tuple) else (right,), {})
                _check_args((left,), {})
        return _sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:   # "{:>999999999}".format(1)
            _check_args((value.__self__,), {})
        return wrapped

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        budget = _budget.get()
        if budget is not None:
            budget.step()
            _check_args(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(_one_line(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; transformers replaces it with plain
    # json.dumps so tool schemas reach the model verbatim.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant spans with it (for
    training masks); for inference the body is just rendered."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _TemplateDict:
    """`dict` for templates: building dicts only, no access to the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore names, which could reach CPython internals (as in
    transformers)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


class ChatTemplate:
    """A compiled chat template, or the plain fallback when `source` is None or blank.

    bos_token / eos_token are the texts of the model's BOS/EOS tokens, exposed to the template as
    variables of the same names (many templates start with `{{ bos_token }}`: the caller must then
    not add a second BOS when tokenizing). `name` names the template in error messages.
    """

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", name: str = "model"):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        self.is_fallback = source is None or not source.strip()
        self._template: jinja2.Template | None = None
        if not self.is_fallback:
            if len(source) > MAX_SOURCE:
                raise ChatTemplateError(f"chat template of {name} is {len(source)} characters, over "
                                        f"the {MAX_SOURCE} allowed; {_OVERRIDE_HINT}")
            try:
                self._template = _environment().from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(
                    f"chat template of {name} does not compile: {_one_line(e.message or e)} "
                    f"(line {e.lineno}); {_OVERRIDE_HINT}") from None
            except (RecursionError, MemoryError) as e:   # absurd nesting in hostile source
                raise ChatTemplateError(f"chat template of {name} does not compile: nested too "
                                        f"deeply ({e.__class__.__name__}); {_OVERRIDE_HINT}") from None

    @classmethod
    def from_metadata(cls, meta: dict, token_text: Callable[[int], str], name: str | None = None,
                      source: str | None = None) -> "ChatTemplate":
        """The template of a GGUF model (`tokenizer.chat_template`), fallback when it has none.

        token_text(id) gives a token's text; used for BOS/EOS from tokenizer.ggml.bos_token_id /
        eos_token_id ("" when the id is absent or out of range). `source` (e.g. the text of
        --chat-template FILE) replaces the model's template but keeps its BOS/EOS texts.
        """
        def special(key: str) -> str:
            tid = meta.get(key)
            if tid is None:
                return ""
            try:
                return token_text(int(tid))
            except (IndexError, KeyError, ValueError):
                return ""

        if source is None:
            source = meta.get("tokenizer.chat_template")
            if not isinstance(source, str):
                source = None
        return cls(source, bos_token=special("tokenizer.ggml.bos_token_id"),
                   eos_token=special("tokenizer.ggml.eos_token_id"),
                   name=name or str(meta.get("general.name") or "model"))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for `messages` (dicts with "role" and "content").

        With a template: its rendering with variables messages, add_generation_prompt, bos_token,
        eos_token, tools=None, documents=None, plus kwargs (which override them), exactly as
        transformers' apply_chat_template(tokenize=False) would give.

        Fallback (no template, e.g. a base model such as stories260K): the text content of every
        message, in order, empty ones skipped, joined by "\\n"; no role names, no special tokens,
        no BOS, and add_generation_prompt adds nothing. So a single user message "Once upon a time"
        renders as exactly "Once upon a time" and a story model simply continues it.
        """
        template = self._template
        if template is None:
            texts = (_text_of(m.get("content")) for m in messages)
            return "\n".join(t for t in texts if t)
        variables: dict[str, Any] = {
            "messages": messages, "tools": None, "documents": None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token, "eos_token": self.eos_token,
        }
        variables.update(kwargs)
        token = _budget.set(_Budget())
        try:
            out, size = [], 0
            for chunk in template.generate(**variables):   # streamed, so the size is known early
                size += len(chunk)
                if size > MAX_CHARS:
                    raise _OverBudget(f"an output of over {MAX_CHARS} characters")
                out.append(chunk)
            return "".join(out)
        except _OverBudget as e:
            raise ChatTemplateError(f"chat template of {self.name} refused: rendering ran past its "
                                    f"budget ({e}), a runaway or hostile template; "
                                    f"{_OVERRIDE_HINT}") from None
        except _TemplateRaised as e:
            raise ChatTemplateError(
                f"chat template of {self.name} rejected the conversation: {e}; {_OVERRIDE_HINT}") from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure inside untrusted template code
            detail = _one_line(f"{e.__class__.__name__}: {e}")
            raise ChatTemplateError(
                f"chat template of {self.name} failed to render: {detail}; {_OVERRIDE_HINT}") from None
        finally:
            _budget.reset(token)
