"""Build hook: generate protobuf/gRPC modules before packaging (metadata lives in pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self):
        sys.path.insert(0, str(Path(__file__).parent))
        from protos.codegen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
