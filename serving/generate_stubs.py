"""Regenerate the committed gRPC stubs from proto/ (the source of truth): `make proto`.

protoc writes `metaprune/v1/pruning_pb2*.py` with absolute imports (`from metaprune.v1 import
...`); we place them flat inside this package and rewrite that import to a package-relative one,
so the stubs work wherever `metaprune.serving` is installed.
"""

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PROTO_FILE = "metaprune/v1/pruning.proto"
PACKAGE_DIR = Path(__file__).resolve().parent


def generate(target_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Write pruning_pb2.py and pruning_pb2_grpc.py into `target_dir`; returns their paths."""
    from grpc_tools import protoc  # build-time tool only
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    with tempfile.TemporaryDirectory() as out:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(PROTO_ROOT / PROTO_FILE),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        written = []
        for generated in sorted((Path(out) / "metaprune" / "v1").glob("*.py")):
            text = generated.read_text()
            text = re.sub(r"^from metaprune\.v1 import ", "from . import ", text, flags=re.M)
            target = Path(target_dir) / generated.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path.relative_to(PACKAGE_DIR.parent)}")
    sys.exit(0)
