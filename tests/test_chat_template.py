"""Chat template rendering: real model templates, transformers-exact output, sandboxing, errors.

The exact expected strings were written from the templates and checked against transformers
5.23's render_jinja_template (run once in a throwaway venv; transformers is not a dependency).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from numallm.chat_template import ChatTemplate, ChatTemplateError
from numallm.errors import NumallmError

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
TEMPLATES = MODELS / "templates"

SYSTEM = {"role": "system", "content": "You are a pirate."}
TURNS = [
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Arr, ahoy!"},
    {"role": "user", "content": "Where is the treasure? ¿Dónde está?"},
]
CONVERSATION = [SYSTEM, *TURNS]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
FIREFUNCTION_KW = {"functions": '[{"name": "get_weather"}]', "datetime": "2024-07-26"}


@dataclass(frozen=True)
class Spec:
    marker: str                     # opens every user turn
    kwargs: dict = field(default_factory=dict)
    shows_system: bool = True       # False: the template refuses a system message
    honours_gen_prompt: bool = True  # some templates always open the assistant turn


LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
SPECS = {
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja": Spec("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", {"tools": [TOOL]}),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja": Spec("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
                                                                honours_gen_prompt=False),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": Spec("<|im_start|>user\n", {"tools": [TOOL]}),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": Spec("<|im_start|>user\n", {"tools": [TOOL]}),
    "Qwen-Qwen2.5-7B-Instruct.jinja": Spec("<|im_start|>user\n"),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": Spec("<｜User｜>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": Spec("<｜User｜>"),
    "fireworks-ai-llama-3-firefunction-v2.jinja": Spec(LLAMA3_USER, FIREFUNCTION_KW, honours_gen_prompt=False),
    "llama-cpp-deepseek-r1.jinja": Spec("<｜User｜>"),
    "meetkai-functionary-medium-v3.1.jinja": Spec(LLAMA3_USER),
    "meetkai-functionary-medium-v3.2.jinja": Spec(LLAMA3_USER),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": Spec(LLAMA3_USER),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": Spec(LLAMA3_USER),
    "meta-llama-Llama-3.3-70B-Instruct.jinja": Spec(LLAMA3_USER),
    "microsoft-Phi-3.5-mini-instruct.jinja": Spec("<|user|>\n"),
    # system text goes into the last [INST]; nothing follows [/INST] either way
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": Spec("[INST]", honours_gen_prompt=False),
    "google-gemma-2-2b-it.jinja": Spec("<start_of_turn>user\n", shows_system=False),
}


def _load(name: str) -> ChatTemplate:
    path = TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"test data {path} not present")
    return ChatTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>", name=name)


def _assert_in_order(text: str, parts: list[str]) -> None:
    pos = 0
    for part in parts:
        found = text.find(part, pos)
        assert found >= 0, f"{part!r} missing (or out of order) after offset {pos} in {text!r}"
        pos = found + len(part)


def _assert_one_line_error(exc: NumallmError, name: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and name in msg and "--chat-template FILE" in msg


def test_every_shipped_template_has_a_spec():
    if not TEMPLATES.is_dir():
        pytest.skip(f"test data {TEMPLATES} not present")
    assert sorted(p.name for p in TEMPLATES.glob("*.jinja")) == sorted(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_real_template_renders_conversation(name):
    spec = SPECS[name]
    tmpl = _load(name)
    assert not tmpl.is_fallback
    messages = CONVERSATION if spec.shows_system else TURNS
    out = tmpl.render(messages, add_generation_prompt=True, **spec.kwargs)
    _assert_in_order(out, [spec.marker, TURNS[0]["content"], TURNS[1]["content"], spec.marker, TURNS[2]["content"]])
    if spec.shows_system:
        assert SYSTEM["content"] in out
    if spec.honours_gen_prompt:
        # The generation prompt opens an assistant turn after the last user message.
        without = tmpl.render(messages, add_generation_prompt=False, **spec.kwargs)
        end = out.rindex(TURNS[2]["content"]) + len(TURNS[2]["content"])
        assert without[:end] == out[:end] and without != out


def test_gemma2_rejects_system_role_in_one_line():
    tmpl = _load("google-gemma-2-2b-it.jinja")
    with pytest.raises(ChatTemplateError) as ei:
        tmpl.render(CONVERSATION)
    _assert_one_line_error(ei.value, "google-gemma-2-2b-it.jinja")
    assert "System role not supported" in str(ei.value)


@pytest.mark.parametrize("name", ["google-gemma-2-2b-it.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja"])
def test_non_alternating_roles_are_rejected(name):
    tmpl = _load(name)
    with pytest.raises(ChatTemplateError) as ei:
        tmpl.render([TURNS[0], TURNS[0]])
    _assert_one_line_error(ei.value, name)
    assert "alternate" in str(ei.value)


def test_tool_use_template_without_tools_fails_in_one_line():
    # transformers fails the same way (TypeError iterating tools=None); we must not traceback.
    name = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja"
    with pytest.raises(ChatTemplateError) as ei:
        _load(name).render(CONVERSATION)
    _assert_one_line_error(ei.value, name)


QWEN_EXPECTED = (
    "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
    "<|im_start|>user\nHello there<|im_end|>\n"
    "<|im_start|>assistant\nArr, ahoy!<|im_end|>\n"
    "<|im_start|>user\nWhere is the treasure? ¿Dónde está?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

QWEN_TOOLS_EXPECTED = (
    "<|im_start|>system\nYou are a pirate.\n\n# Tools\n\nYou may call one or more functions to assist with"
    " the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city (°C)",'
    ' "parameters": {"type": "object", "properties": {"city": {"type": "string",'
    ' "description": "City name"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within"
    " <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nHello there<|im_end|>\n"
    "<|im_start|>assistant\nArr, ahoy!<|im_end|>\n"
    "<|im_start|>user\nWhere is the treasure? ¿Dónde está?<|im_end|>\n"
    "<|im_start|>assistant\n"
)

LLAMA31_EXPECTED = (
    "<s><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You are a pirate.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nArr, ahoy!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhere is the treasure? ¿Dónde está?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

LLAMA31_TOOLS_EXPECTED = (
    "<s><|start_header_id|>system<|end_header_id|>\n\n"
    "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You are a pirate.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call with its proper"
    " arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
    '{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n'
    '        "description": "Get the weather in a city (°C)",\n        "parameters": {\n'
    '            "type": "object",\n            "properties": {\n                "city": {\n'
    '                    "type": "string",\n                    "description": "City name"\n'
    '                }\n            },\n'
    '            "required": [\n                "city"\n            ]\n        }\n    }\n}\n\n'
    "Hello there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nArr, ahoy!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhere is the treasure? ¿Dónde está?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_qwen25_exact():
    tmpl = _load("Qwen-Qwen2.5-7B-Instruct.jinja")
    assert tmpl.render(CONVERSATION) == QWEN_EXPECTED
    # tojson as transformers: no HTML escaping, non-ASCII kept (jinja's own filter gives \u00b0).
    assert tmpl.render(CONVERSATION, tools=[TOOL]) == QWEN_TOOLS_EXPECTED


def test_llama31_exact():
    tmpl = _load("meta-llama-Llama-3.1-8B-Instruct.jinja")
    assert tmpl.render(CONVERSATION) == LLAMA31_EXPECTED
    # tojson(indent=4), tools moved into the first user message.
    assert tmpl.render(CONVERSATION, tools=[TOOL]) == LLAMA31_TOOLS_EXPECTED


def test_llama32_uses_strftime_now():
    tmpl = _load("meta-llama-Llama-3.2-3B-Instruct.jinja")
    before = datetime.now().strftime("%d %b %Y")
    out = tmpl.render(CONVERSATION)
    dates = {before, datetime.now().strftime("%d %b %Y")}  # in case midnight passed meanwhile
    assert any(f"Today Date: {d}\n" in out for d in dates)


def test_phi3_vocab_from_metadata():
    path = MODELS / "vocab" / "ggml-vocab-phi-3.gguf"
    if not path.is_file():
        pytest.skip(f"test data {path} not present")
    from numallm.gguf_file import GGUFFile

    meta = GGUFFile(path).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    tmpl = ChatTemplate.from_metadata(meta, lambda i: tokens[i])
    assert not tmpl.is_fallback
    assert (tmpl.bos_token, tmpl.eos_token) == ("<s>", "<|endoftext|>")
    # This template drops system messages and emits the assistant header after every user turn.
    assert tmpl.render(CONVERSATION) == (
        "<s><|user|>\nHello there<|end|>\n<|assistant|>\nArr, ahoy!<|end|>\n"
        "<|user|>\nWhere is the treasure? ¿Dónde está?<|end|>\n<|assistant|>\n")


def test_from_metadata_override_keeps_special_tokens():
    meta = {"tokenizer.chat_template": "{{ bos_token }}model", "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2}
    tmpl = ChatTemplate.from_metadata(meta, lambda i: ["<unk>", "<s>", "</s>"][i], name="--chat-template",
                                      source="{{ bos_token }}{{ messages[0].content }}{{ eos_token }}")
    assert tmpl.render(TURNS) == "<s>Hello there</s>"
    assert tmpl.name == "--chat-template"


def test_from_metadata_without_template_is_fallback():
    meta = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 99, "general.name": "tiny"}
    tmpl = ChatTemplate.from_metadata(meta, lambda i: ["<unk>", "<s>", "</s>"][i])
    assert tmpl.is_fallback and tmpl.bos_token == "<s>" and tmpl.eos_token == ""  # 99 out of range


def test_fallback_plain_text():
    tmpl = ChatTemplate(None)
    assert tmpl.is_fallback
    assert tmpl.render([{"role": "user", "content": "Once upon a time"}]) == "Once upon a time"
    assert tmpl.render(CONVERSATION, add_generation_prompt=False) == "\n".join(
        m["content"] for m in CONVERSATION)
    parts = [{"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": "cat"}]
    assert tmpl.render([{"role": "system", "content": ""}, {"role": "user", "content": parts}]) == "A cat"


def test_extra_kwargs_and_loop_controls():
    src = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
           "{{ m.content }}{% if loop.index > 2 %}{% break %}{% endif %}|{% endfor %}{{ greeting }}{{ tools }}")
    out = ChatTemplate(src).render(CONVERSATION, greeting="!", tools="T")
    assert out == "Hello there|Arr, ahoy!!T"


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__mro__ }}",
    "{% set x = [] %}{{ x.append(1) }}",          # immutable sandbox: no mutating methods
    "{% set ns = namespace(__dict__=1) %}",
    "{{ cycler.__init__.__globals__ }}",
])
def test_sandbox_blocks_escapes(src):
    with pytest.raises(ChatTemplateError) as ei:
        ChatTemplate(src, name="evil.jinja").render(CONVERSATION)
    _assert_one_line_error(ei.value, "evil.jinja")


def test_sandbox_hides_unsafe_attributes():
    # Plain access to an unsafe attribute renders as undefined (empty), never the real object.
    assert ChatTemplate("[{{ ''.__class__ }}]").render([]) == "[]"


def test_compile_error_is_one_line():
    with pytest.raises(ChatTemplateError) as ei:
        ChatTemplate("{% for m in messages %}\n{{ m.content }", name="broken.jinja")
    _assert_one_line_error(ei.value, "broken.jinja")
    assert "does not compile" in str(ei.value)


def test_raise_exception_message_reaches_user():
    tmpl = ChatTemplate("{{ raise_exception('Only\nuser roles') }}", name="strict")
    with pytest.raises(NumallmError, match="strict rejected the conversation: Only user roles"):
        tmpl.render(TURNS)


def test_generation_block_renders_body():
    src = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %};{% endfor %}"
    assert ChatTemplate(src).render(TURNS[:2]) == "Hello there;Arr, ahoy!;"
