"""Chat templates: render a conversation with the Jinja template a model directory ships
(`chat_template` in tokenizer_config.json, or chat_template.jinja), as transformers does."""

from __future__ import annotations

import functools
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
    return render_chat(template, messages, add_generation_prompt, where=str(model_dir))


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled once (compiling costs ~15 ms, more than rendering: the server renders
    one per request, `slm distill` and HumanEval one per prompt)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise SlmError(f"chat template: {message}")

    # Rendered in a sandbox: a template is data that came with a model, not code we trust.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, where: str = "") -> str:
    """Render `messages` with a chat template's text (as `load_chat_template` returns it)."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise SlmError(f"{where or 'chat template'}: cannot render chat template ({e})") from None
