"""Build hook: compiles the op library with tools/build_ops.py.

`pip install --no-build-isolation [-e] .` (TensorFlow must already be
installed: the library is compiled against it, with tf.sysconfig's flags).
"""

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import build_ops  # noqa: E402


class OpLibrary(Extension):
    """The TensorFlow op library; built by build_ops, not by distutils."""

    def __init__(self):
        super().__init__("tf_sparseconv._tf_sparseconv_ops", sources=[])


class BuildOps(build_ext):
    def get_ext_filename(self, fullname):
        # A plain name (no Python ABI tag): it is a TF op library, not a module.
        *package, name = fullname.split(".")
        if name == "_tf_sparseconv_ops":
            return str(Path(*package, build_ops.LIBRARY_NAME))
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if not isinstance(ext, OpLibrary):
            return super().build_extension(ext)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_ops.build(output)
        # Editable installs copy only the library into the source tree: put
        # its build info (TF version it was built for) there too.
        info = output.parent / build_ops.BUILD_INFO_NAME
        source_info = ROOT / "tf_sparseconv" / build_ops.BUILD_INFO_NAME
        if info.resolve() != source_info.resolve():
            source_info.write_text(info.read_text())


setup(ext_modules=[OpLibrary()], cmdclass={"build_ext": BuildOps})
