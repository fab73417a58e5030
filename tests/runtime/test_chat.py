"""Chat templates are rendered in Jinja's sandbox; template failures are GenerationErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import GenerationError
from runtime.chat import load_chat_template, render_chat, special_tokens

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode"}]


def test_renders_like_transformers() -> None:
    out = render_chat(CHATML, MESSAGES, {"bos_token": "<s>"})
    assert out == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi ünïcode<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not render_chat(CHATML, MESSAGES, {"bos_token": ""}, add_generation_prompt=False).endswith("assistant\n")
    assert render_chat("{{ messages | tojson }}", MESSAGES[:1], {}) == json.dumps(MESSAGES[:1])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",  # a plain sandbox renders this as '' silently; ours refuses
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_template_reaching_for_python_internals_is_refused(template: str) -> None:
    with pytest.raises(GenerationError) as info:
        render_chat(template, MESSAGES, {})
    assert str(info.value).startswith(
        "the artifact's chat template tried to reach Python internals; the sandbox refused it | got access to attribute"
    )


def test_immutable_sandbox_refuses_mutation_and_raise_exception_fails_cleanly() -> None:
    with pytest.raises(GenerationError, match="chat template"):
        render_chat("{% set x = [] %}{{ x.append(1) }}", MESSAGES, {})
    with pytest.raises(GenerationError) as info:
        render_chat("{{ raise_exception('only user and assistant roles') }}", MESSAGES, {})
    assert str(info.value) == (
        "the artifact's chat template failed to render | got TemplateError: only user and assistant roles"
        " | check the messages, or fix tokenizer/chat_template.jinja"
    )


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], [{"role": "user"}]])
def test_malformed_messages(messages: object) -> None:
    with pytest.raises(GenerationError, match="chat message"):
        render_chat(CHATML, messages, {})  # type: ignore[arg-type]


def test_template_sources(tmp_path: Path) -> None:
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
         "bos_token": {"content": "<s>"}, "eos_token": "</s>", "model_max_length": 5}))
    assert load_chat_template(tmp_path) == "D"
    assert special_tokens(tmp_path) == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"
