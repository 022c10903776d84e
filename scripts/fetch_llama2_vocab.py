"""Fetch the exact LLaMA-2 vocabulary for the tokenizer tests, from PyPI (no model hub needed).

The llama-cpp-python==0.3.36 source distribution carries llama.cpp's vocabulary-only GGUF of
LLaMA-2's tokenizer with its reference tokenisations. This downloads the sdist (76 MB) once and
keeps just those three files in the slm cache, where `slm.assets.llama2_vocab_gguf()` finds them.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from slm.assets import LLAMA2_VOCAB_NAME
from slm.paths import cache_dir

SDIST = "llama-cpp-python==0.3.36"
INNER = "vendor/llama.cpp/models/" + LLAMA2_VOCAB_NAME


def main() -> int:
    dest = cache_dir() / "assets"
    if all((dest / (LLAMA2_VOCAB_NAME + s)).is_file() for s in ("", ".inp", ".out")):
        print(f"fetch_llama2_vocab: already in {dest}")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, SDIST], check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            for suffix in (".inp", ".out", ""):  # the .gguf last: its presence means all three are there
                member = next(m for m in tar.getmembers() if m.name.endswith(INNER + suffix))
                data = tar.extractfile(member).read()
                part = dest / (LLAMA2_VOCAB_NAME + suffix + ".part")
                part.write_bytes(data)
                part.replace(dest / (LLAMA2_VOCAB_NAME + suffix))
    print(f"fetch_llama2_vocab: wrote {dest / LLAMA2_VOCAB_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
