"""`slm train` and `slm export`.

Every field of `slm.train.recipes.TrainConfig` is a flag (`max_steps` -> `--max-steps`); a flag
left out takes the recipe's value (or, with --resume, the run's saved value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from slm.train.recipes import RECIPES, TrainConfig

# Flags whose name is not just the field name.
_FLAG_NAMES = {"model": "--config"}


def _field_type(f: dataclasses.Field):
    t = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return typ
    return str


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or continue a model (alone or under torchrun)",
        description="Train a model on a prepared data directory. Defaults are AMD-Llama-135m's recipe "
        "(--recipe amd-pretrain); --recipe amd-code continues --init-from at lr 3e-4 -> 3e-5. Every option "
        "overrides the recipe; the resolved config is saved to OUT/train_config.json. Under "
        "`torchrun --nproc-per-node N [--nnodes M ...] -m slm train ...` it trains data-parallel (--parallel "
        "ddp|fsdp). Checkpoints go to OUT/checkpoints/, metrics to OUT/metrics.jsonl.",
    )
    defaults = TrainConfig()
    choices = {"recipe": sorted(RECIPES), "parallel": ["ddp", "fsdp"], "dtype": ["auto", "fp32", "bf16"]}
    for f in dataclasses.fields(TrainConfig):
        flag = _FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        typ = _field_type(f)
        help_text = f.metadata["help"]
        default = getattr(defaults, f.name)
        if default not in (None, "", False) and f.name != "recipe":
            help_text += f" [amd-pretrain: {default}]"
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in choices:
            p.add_argument(flag, dest=f.name, choices=choices[f.name], default=None, help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(typ, "NAME" if f.name in ("model", "device") else "DIR")
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=help_text, metavar=metavar)
    p.add_argument("--resume", action="store_true",
                   help="continue OUT from its newest complete checkpoint that matches its checksums (starts fresh "
                   "if it has none); refused if OUT/train_config.json was edited in a field that changes the run")
    p.add_argument("--json", action="store_true", help="no progress bar; print a JSON summary at the end")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "export",
        help="write a training checkpoint as a model directory, or a model as a GGUF file",
        description="Export the newest complete checkpoint of RUN_DIR (or the given checkpoint directory) "
        "as a Hugging Face model directory with the run's tokenizer (loadable by slm and transformers); "
        "with --format gguf, a run or a model directory as one GGUF file for llama.cpp and Ollama.",
    )
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT", help="a run or checkpoint directory (gguf: or a model directory)")
    p.add_argument("--out", required=True, metavar="OUT", help="model directory (hf: new, empty or one slm wrote) or .gguf file to write (replaced atomically)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a model directory (default); gguf: one file")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0", "q4_0"], default="f32",
                   help="gguf tensor type (default f32; q4_0 keeps the embeddings/lm_head in q8_0; norms stay f32)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (default: the copy kept in the run directory)")
    p.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slm.train.loop import CONFIG_FILE, train
    from slm.train.recipes import load_config, merge_for_resume, resolve

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for key in ("data", "out", "init_from"):  # the saved config must not depend on the working directory
        if overrides[key]:
            overrides[key] = os.path.abspath(overrides[key])
    saved = Path(overrides["out"]) / CONFIG_FILE if overrides["out"] else None
    if args.resume and saved is not None and saved.is_file():
        cfg = merge_for_resume(load_config(saved), overrides, str(saved))
    else:
        recipe = overrides.pop("recipe") or "amd-pretrain"
        cfg = resolve(recipe, **overrides)
    progress = not args.json and sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0
    result = train(cfg, resume=args.resume, show_progress=progress,
                   log=(lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr)))
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({
            "run_dir": str(result.run_dir), "step": result.step, "stopped_by": result.stopped_by,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "tokens": result.tokens, "seconds": round(result.seconds, 3),
        }))
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from slm.gguf_export import export_gguf

        out = export_gguf(args.path, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer)
    else:
        from slm.train.export import export

        out = export(args.path, args.out, tokenizer_dir=args.tokenizer)
    print(f"wrote {out}", file=sys.stderr)
    return 0
