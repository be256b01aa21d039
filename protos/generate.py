"""Regenerate the Python code for `protos/teacher.proto` (`make protos`).

protoc runs on a copy of the proto placed at `logitcast/protos/teacher.proto`,
so the generated modules know their real name (`logitcast.protos.teacher_pb2`):
message classes pickle by that name (Ray Serve's gRPC proxy pickles requests to
its replicas) and the gRPC module imports the package path.
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
    import shutil

    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src, gen = Path(tmp) / "src", Path(tmp) / "gen"
        (src / "logitcast" / "protos").mkdir(parents=True)
        gen.mkdir()
        shutil.copy(HERE / PROTO, src / "logitcast" / "protos" / PROTO)
        args = ["protoc", f"-I{src}", f"--python_out={gen}", f"--pyi_out={gen}",
                f"--grpc_python_out={gen}", f"logitcast/protos/{PROTO}"]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        for name in OUTPUTS:
            shutil.copy(gen / "logitcast" / "protos" / name, out_dir / name)


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
