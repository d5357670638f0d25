"""Generate the Python protobuf and gRPC modules from protos/longbow/v1/*.proto.

Output goes to longbow/v1/ (the `longbow` package of this distribution), with copies of the .proto files, so the generated imports
(`from longbow.v1 import generation_pb2`) resolve. Run by the build (setup.py) and by scripts/setup.sh;
the generated files are never committed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out_dir: Path = ROOT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted((PROTO_DIR / "longbow" / "v1").glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *map(str, sources)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(s.name for s in sources))
    package = out_dir / "longbow" / "v1"
    (package / "__init__.py").write_text('"""Generated from protos/longbow/v1 by protos/codegen.py."""\n')
    # The .proto sources ship beside the generated modules (package data), so an installed client can
    # hand them to other languages' code generators.
    for source in sources:
        shutil.copyfile(source, package / source.name)
    return sorted(package.glob("*_pb2*.py"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
