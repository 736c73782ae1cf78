"""The compiled extension: what it was built with, its registrations, and loud failures."""

import subprocess
import sys

import torch

import ftcore


def test_extension_matches_the_running_torch():
    assert ftcore._C.torch_version == torch.__version__
    assert isinstance(ftcore.cuda_kernels_available(), bool)
    assert ftcore.cuda_kernels_available() == bool(ftcore._C.cuda_kernels)


def test_every_op_has_kernels():
    assert len(ftcore.check_registrations("CPU")) == 23  # sparse deltas 6, structured blocks 6, quantizers 10, losses 1
    if ftcore.cuda_kernels_available():
        ftcore.check_registrations("CUDA")


def _import_error(setup: str) -> str:
    code = f"{setup}\ntry:\n    import ftcore\nexcept ImportError as e:\n    print('IMPORT ERROR:', e)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout


def test_import_refuses_a_build_for_another_torch():
    out = _import_error("import torch; torch.__version__ = '0.0.1'")
    assert "IMPORT ERROR: ftcore._C was built against torch" in out and "0.0.1" in out


def test_import_explains_a_missing_extension():
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ftcore._C':\n"
        "            raise ImportError('no compiled extension here')\n"
        "sys.meta_path.insert(0, Block())"
    )
    out = _import_error(blocker)
    assert "IMPORT ERROR: ftcore's compiled extension (ftcore._C) could not be loaded" in out
    assert "--no-build-isolation" in out
