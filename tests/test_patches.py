"""patches/: the registry patch applies to the installed ESPnet's file and registers flash_mha."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import espnet2

PATCH = Path(__file__).resolve().parents[1] / "patches" / "espnet-registry-flash_mha.patch"
REGISTRY = Path(espnet2.__file__).parent / "asr" / "state_spaces" / "registry.py"


def test_registry_patch_applies_to_a_copy_of_the_installed_file(tmp_path):
    target = tmp_path / "espnet2" / "asr" / "state_spaces" / "registry.py"
    target.parent.mkdir(parents=True)
    shutil.copy(REGISTRY, target)
    subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=tmp_path, check=True)
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    spec = importlib.util.spec_from_file_location("patched_registry", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.layer["flash_mha"] == "espnet_mha.layer.FlashMultiHeadedAttention"
    assert module.layer["mha"] == "espnet2.asr.state_spaces.attention.MultiHeadedAttention"
    subprocess.run(["git", "apply", "-R", str(PATCH)], cwd=tmp_path, check=True)
    assert target.read_text() == REGISTRY.read_text()
