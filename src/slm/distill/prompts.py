"""Prompts for distillation: requests the target will answer, built from a corpus.

For code, a source tree (default: the Python standard library) gives every function that has a
docstring. Each becomes two prompts: a request in the target's chat template, worded as the
HumanEval harness words its requests (`slm.eval.humaneval_generate.CHAT_INSTRUCTION`), so the
draft learns what the target says when asked to write code; and the function's signature and
docstring as plain text to continue. A plain text file gives text continuations.

No HumanEval problem may reach the training data: any function whose signature + docstring,
or whose docstring alone, matches one of HumanEval's 164 prompts (whitespace ignored) is dropped.
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slm.chat import apply_chat_template, load_chat_template
from slm.errors import SlmError
from slm.eval.humaneval import read_problems
from slm.eval.humaneval_generate import CHAT_INSTRUCTION


@dataclass(frozen=True)
class Prompt:
    text: str  # what the target is given (already in its chat template when kind == "chat")
    kind: str  # "chat" or "continue"
    source: str  # file:line it came from


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def humaneval_keys(problems_path: str | os.PathLike | None = None) -> tuple[set[str], set[str]]:
    """(whole prompts, docstrings) of every HumanEval problem, whitespace removed."""
    prompts, docs = set(), set()
    for p in read_problems(problems_path).values():
        prompts.add(_squash(p.prompt))
        for node in ast.walk(ast.parse(p.prompt)):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                docs.add(_squash(ast.get_docstring(node)))
    return prompts, docs


def is_humaneval(text: str, keys: tuple[set[str], set[str]]) -> bool:
    """True if `text` holds a HumanEval prompt or docstring, or is part of a prompt (a helper
    function a prompt defines), whitespace ignored."""
    s = _squash(text)
    prompts, docs = keys
    return (any(k in s for k in prompts) or any(k in s for k in docs if len(k) >= 40)
            or (len(s) >= 40 and any(s in k for k in prompts)))


def default_source() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stub(source: str, node: ast.FunctionDef) -> str:
    """A function's signature and docstring, as HumanEval's prompts are: no body."""
    lines = source.splitlines()
    body = node.body[0]  # the docstring expression
    return "\n".join(lines[node.lineno - 1 : body.end_lineno]) + "\n"


def functions(root: Path, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(stub, where) for every function with a docstring under `root` (tests directories skipped),
    files in a random order (seeded), so that taking the first few samples the whole tree."""
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "idlelib"} & set(p.relative_to(root).parts))
    random.Random(seed).shuffle(files)
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # not our corpus's problem: skip what does not parse
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and node.col_offset == 0:
                doc = ast.get_docstring(node)
                if len(doc) >= 30 and not node.name.startswith("_"):
                    yield _stub(source, node), f"{path}:{node.lineno}"


def text_chunks(path: Path, chars: int = 600) -> Iterator[tuple[str, str]]:
    text = path.read_text(encoding="utf-8", errors="replace")
    for i in range(0, max(len(text) - chars // 2, 1), chars):
        yield text[i : i + chars], f"{path}:{i}"


def build_prompts(
    model_dir: str | os.PathLike | None,
    sources: list[str | os.PathLike] | None = None,
    limit: int = 2000,
    seed: int = 0,
    problems_path: str | os.PathLike | None = None,
) -> list[Prompt]:
    """Up to `limit` prompts (shuffled): chat requests and plain continuations of the functions
    in `sources` (directories of .py files; default the standard library) and continuations of
    plain text files. Chat requests need the target's chat template (model_dir)."""
    keys = humaneval_keys(problems_path)
    chat = model_dir is not None and load_chat_template(model_dir) is not None
    out: list[Prompt] = []
    for src in sources or [default_source()]:
        src = Path(src)
        if not src.exists():
            raise SlmError(f"--prompts {src}: no such file or directory")
        items = functions(src, seed) if src.is_dir() else text_chunks(src)
        for text, where in items:
            if is_humaneval(text, keys):
                continue
            if src.is_dir() and chat:
                request = apply_chat_template(model_dir, [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=text)}])
                out.append(Prompt(request, "chat", where))
            out.append(Prompt(text, "continue", where))
            if len(out) >= 4 * limit:  # enough to sample from
                break
    if not out:
        raise SlmError(f"no prompts found in {[str(s) for s in sources or [default_source()]]}")
    random.Random(seed).shuffle(out)
    return out[:limit]
