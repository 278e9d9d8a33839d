"""Build hook: compile protos/ into extproc/gen/ with grpcio-tools before setuptools looks for
packages.

pyproject.toml holds the metadata. The protos are compiled when this file is loaded, before
`setup()` runs package discovery, so the generated `extproc.gen.tollgate...` packages are found
like any other (compiling later, in build_py, made setuptools warn about every generated package
it had not discovered). `pip install .` and `pip install -e .` both produce the modules.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

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


compile_protos()
setup()
