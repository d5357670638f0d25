"""The distribution installs one import name, `longbow`, and its client half imports without torch.

The wheel is built from this checkout (no build isolation: the venv has setuptools and grpcio-tools) and
its file list is read; then the client is imported from the wheel's own tree in a fresh interpreter that
cannot see the repository and refuses to import torch or any other server-only dependency.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("torch", "ray", "transformers", "numpy", "deepspeed", "faiss", "redis", "sentence_transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True)
    [built] = out.glob("longbow-*.whl")
    return built


def test_wheel_installs_only_the_longbow_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"longbow"}
    for module in ("longbow/services/engine/engine.py", "longbow/rag/retrieve.py", "longbow/ringattn/tokenring.py",
                   "longbow/langchain.py", "longbow/v1/generation_pb2.py", "longbow/v1/generation.proto"):
        assert module in names, module
    assert not [n for n in names if "/tests/" in n or n.startswith("protos/") or "__pycache__" in n]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "longbow = longbow.services.cli:main" in entry_points


# Runs in a fresh interpreter without site (so neither the editable install nor the repository is on the
# path): the wheel's tree first, then the venv's site-packages for grpcio / protobuf / langchain-core.
# A prelude for fresh interpreters that must not import server-side packages (argv[1]: their names).
REFUSE_IMPORTS = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"refused import of {name}: a server-only package")

sys.meta_path.insert(0, Refuse())
"""
CLIENT_ONLY = REFUSE_IMPORTS + """
import longbow
from longbow import AsyncLongbowClient, Edit, LongbowClient, LongbowError
from longbow.langchain import LongbowChatModel, LongbowLLM, LongbowRetriever
assert longbow.__file__.startswith(sys.argv[2]), longbow.__file__
LongbowClient("127.0.0.1:1").close()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("services", "rag", "ringattn", "protos")))
"""


def test_client_imports_from_the_wheel_without_torch(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    paths = f"{site}:{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}"
    result = subprocess.run([sys.executable, "-S", "-c", CLIENT_ONLY, ",".join(SERVER_ONLY), str(site)],
                            cwd=tmp_path, env={"PYTHONPATH": paths}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # no stray top-level packages were imported


def test_a_users_own_services_package_does_not_collide(tmp_path):
    # The collision the namespace exists to avoid: an application with its own `services` and `rag`.
    for name in ("services", "rag"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'app-{name}'\n")
    script = ("import services, rag, longbow.services.config, longbow.rag.types;"
              "print(services.OWNER, rag.OWNER, longbow.services.config.__name__)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["app-services", "app-rag", "longbow.services.config"]
