"""Chat templates: turn a conversation into the prompt text a chat model was trained on.

A GGUF model carries its Hugging Face chat template (Jinja2) in `tokenizer.chat_template`. It is
rendered here the way transformers' `apply_chat_template` does (same environment options, filters
and globals), so prompts match what the model saw in training. Templates come from untrusted
files, so they run in Jinja's immutable sandbox: no attribute tricks (`''.__class__`), no
mutating methods, bounded `range`.

Models without a template get a plain fallback (see `ChatTemplate.render`).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import NumallmError

__all__ = ["ChatTemplate", "ChatTemplateError"]

_OVERRIDE_HINT = "use --chat-template FILE to override"


class ChatTemplateError(NumallmError):
    """A chat template that does not compile, or that fails or refuses to render a conversation."""


class _TemplateRaised(Exception):
    """raise_exception() called by the template; carries the template's own message."""


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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
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
            try:
                self._template = _environment().from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(
                    f"chat template of {name} does not compile: {_one_line(e.message or e)} "
                    f"(line {e.lineno}); {_OVERRIDE_HINT}") from None

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
        try:
            return template.render(**variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(
                f"chat template of {self.name} rejected the conversation: {e}; {_OVERRIDE_HINT}") from None
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure inside untrusted template code
            detail = _one_line(f"{e.__class__.__name__}: {e}")
            raise ChatTemplateError(
                f"chat template of {self.name} failed to render: {detail}; {_OVERRIDE_HINT}") from None
