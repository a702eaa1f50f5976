"""Build modeld's C token loop; everything else lives in pyproject.toml.

The extension needs only a C compiler and the Python headers: it does not link against
llama.cpp, it resolves llama.cpp's functions at run time from the library that
llama-cpp-python has already loaded (see docs/c-extension.md). It is one translation
unit: ``_tokenloop.c`` (the Python side) includes the pure-C headers in ``csrc/``.

Environment switches:

* ``MODELD_C_DEBUG=1``: ``-O0 -g`` (and assertions on).
* ``MODELD_C_SANITIZE=address``: AddressSanitizer + UndefinedBehaviorSanitizer (implies debug);
  run the tests with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``.
* ``MODELD_NO_EXT=1``: build no extension (the pure-Python loop remains; asking for the C
  loop then raises ``TokenLoopUnavailable``). Also the default where there is no Linux.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup


ENGINE_DIR = Path("src/modeld/engine")
# The GIL-free C, included by _tokenloop.c: a change to one rebuilds the extension.
PURE_C_HEADERS = sorted(str(path) for path in (ENGINE_DIR / "csrc").glob("*.h"))


def _flag(name: str) -> str:
    return os.environ.get(name, "").strip()


def _extensions() -> list[Extension]:
    if _flag("MODELD_NO_EXT") not in ("", "0") or not sys.platform.startswith("linux"):
        # The ring relies on eventfd and futex: Linux only.
        return []
    sanitize = _flag("MODELD_C_SANITIZE")
    debug = _flag("MODELD_C_DEBUG") not in ("", "0") or bool(sanitize)
    compile_args = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
    link_args: list[str] = []
    undef_macros: list[str] = []
    if debug:
        compile_args += ["-O0", "-g3", "-fno-omit-frame-pointer"]
        undef_macros.append("NDEBUG")
    else:
        compile_args.append("-O2")
    if sanitize:
        if sanitize != "address":
            raise SystemExit(f"MODELD_C_SANITIZE={sanitize!r}: only 'address' is supported")
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        compile_args += sanitizers
        link_args += sanitizers
    return [
        Extension(
            "modeld.engine._tokenloop",
            sources=[str(ENGINE_DIR / "_tokenloop.c")],
            depends=PURE_C_HEADERS,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            undef_macros=undef_macros,
            libraries=["dl"],
        )
    ]


setup(ext_modules=_extensions())
