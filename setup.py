"""Build hook: compile protos/ into extproc/gen/ with grpcio-tools on every build.

pyproject.toml holds the metadata; this file only adds the protoc step so that
`pip install .` and `pip install -e .` both produce the generated modules.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def compile_protos() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject build-system.requires)

    out = ROOT / "extproc" / "gen"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    args = ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={out}", f"--pyi_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    for directory in {p.parent for p in out.rglob("*_pb2.py")}:
        d = directory
        while d != out:
            (d / "__init__.py").touch()
            d = d.parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
