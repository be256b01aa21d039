"""Regenerate the Python code for `protos/teacher.proto` (`make protos`).

protoc writes `import teacher_pb2` into the gRPC module; we rewrite it to the
package import so the generated code lives inside `logitcast.protos`.
`python protos/generate.py --check` fails when the checked-in files drift.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "teacher.proto"
OUTPUTS = ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(HERE / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    grpc_mod = out_dir / "teacher_pb2_grpc.py"
    text = grpc_mod.read_text()
    grpc_mod.write_text(text.replace("import teacher_pb2 as", "from logitcast.protos import teacher_pb2 as"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if checked-in code differs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drift = [n for n in OUTPUTS if (Path(tmp) / n).read_text() != _read(HERE / n)]
        if args.check:
            if drift:
                print(f"generated code is stale: {drift}; run `make protos`", file=sys.stderr)
                return 1
            return 0
        for name in OUTPUTS:
            (HERE / name).write_text((Path(tmp) / name).read_text())
    return 0


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
