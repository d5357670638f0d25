"""Build hook: generate protobuf/gRPC modules before packaging, and map the repository's top-level
source directories into the one `longbow` namespace (metadata lives in pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
# Repository directory -> installed package. The layout stays as the design fixes it; the installed
# names never collide with a user's own `services` or `rag` package.
NAMESPACED = {"services": "longbow.services", "rag": "longbow.rag", "ringattn": "longbow.ringattn"}


def namespaced_packages() -> tuple[list[str], dict[str, str]]:
    packages = ["longbow", "longbow.v1"]
    package_dir = {"longbow": "longbow"}
    for directory, package in NAMESPACED.items():
        package_dir[package] = directory
        packages += [package] + [f"{package}.{sub}" for sub in find_packages(directory)]
    # Data-only directory (the TypeScript helper's sources), shipped as package data.
    packages.append("longbow.rag.codectx.ts")
    return packages, package_dir


def generate_protos() -> None:
    """longbow/v1 (protobuf and gRPC modules, .proto copies) from protos/: before setup(), because the
    package list names longbow.v1 and every build step (egg_info first) checks that it exists."""
    sys.path.insert(0, str(ROOT))
    from protos.codegen import generate

    generate()


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()  # again, in case the .proto files changed since this process started
        super().run()


generate_protos()
packages, package_dir = namespaced_packages()
setup(packages=packages, package_dir=package_dir, cmdclass={"build_py": BuildPyWithProtos})
