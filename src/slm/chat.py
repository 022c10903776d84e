"""Chat templates: render a conversation with the Jinja template a model directory ships
(`chat_template` in tokenizer_config.json, or chat_template.jinja), as transformers does."""

from __future__ import annotations

import json
import os
from pathlib import Path

from slm.errors import SlmError


def load_chat_template(model_dir: str | os.PathLike) -> str | None:
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise SlmError(f"{cfg}: not valid JSON ({e})") from None
        if isinstance(template, str):
            return template
    return None


def apply_chat_template(model_dir: str | os.PathLike, messages: list[dict], add_generation_prompt: bool = True) -> str:
    template = load_chat_template(model_dir)
    if template is None:
        raise SlmError(f"{model_dir}: this model has no chat template (tokenizer_config.json 'chat_template')")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise SlmError(f"chat template: {message}")

    # Rendered in a sandbox: a template is data that came with a model, not code we trust.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise SlmError(f"{model_dir}: cannot render chat template ({e})") from None
