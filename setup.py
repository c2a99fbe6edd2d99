"""Build hook: compiles the op library with tools/build_ops.py.

`pip install --no-build-isolation [-e] .` (TensorFlow must already be
installed: the library is compiled against it, with tf.sysconfig's flags).

Wheels (`pip wheel --no-build-isolation --no-deps -w dist .`, or
`python -m build --wheel --no-isolation`; tools/build_wheel.sh) are
platform-tagged and hold the op library and its `_build_info.json`. Their
library is compiled for the portable x86-64-v2 baseline unless
TF_SPARSECONV_NATIVE is set, and their metadata requires the TensorFlow minor
release it was compiled against (`tensorflow>=X.Y,<X.Y+1`, from the installed
TensorFlow; pyproject.toml's range is what the sources support).
"""

import importlib.metadata
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

from packaging.requirements import Requirement  # importable once setuptools is (vendored there)
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import build_ops  # noqa: E402


def tensorflow_requirement() -> Requirement | None:
    """`tensorflow>=X.Y,<X.Y+1` for the installed TensorFlow X.Y.z (None when none is installed)."""
    try:
        version = Version(importlib.metadata.version("tensorflow"))
    except importlib.metadata.PackageNotFoundError:
        return None
    major, minor = (*version.release, 0)[:2]
    lower = str(version) if version.is_prerelease else f"{major}.{minor}"
    return Requirement(f"tensorflow>={lower},<{major}.{minor + 1}")


def pin_tensorflow(metadata: Path) -> None:
    """Rewrites the TensorFlow `Requires-Dist` of `metadata` to the installed TensorFlow's minor release."""
    pin = tensorflow_requirement()
    if pin is None:  # metadata prepared without TensorFlow (nothing is compiled then): keep the range
        return
    installed = Version(importlib.metadata.version("tensorflow"))
    lines = metadata.read_text(encoding="utf-8").split("\n")
    header = lines.index("") if "" in lines else len(lines)  # the description follows the header
    found = False
    for i, line in enumerate(lines[:header]):
        match = re.fullmatch(r"Requires-Dist: (.*)", line)
        if not match:
            continue
        requirement = Requirement(match.group(1))
        if requirement.name != "tensorflow" or requirement.marker is not None:
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            warnings.warn(
                f"tf_sparseconv: TensorFlow {installed} is outside pyproject.toml's range "
                f"({requirement}); the build requires {pin}",
                stacklevel=1,
            )
        lines[i] = f"Requires-Dist: {pin}"
        found = True
    if not found:
        raise RuntimeError(f"no TensorFlow requirement in {metadata}")
    metadata.write_text("\n".join(lines), encoding="utf-8")


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
        info = output.parent / build_ops.BUILD_INFO_NAME
        if getattr(self.distribution, "tf_sparseconv_wheel", False):
            # A wheel runs on other machines: the portable CPU baseline unless
            # TF_SPARSECONV_NATIVE says otherwise. Nothing is written to the source tree.
            build_ops.build(output, native=build_ops.native_wanted(default=False))
            built_for = Version(json.loads(info.read_text())["tf_version"])
            pin = tensorflow_requirement()
            if pin is None or not pin.specifier.contains(built_for, prereleases=True):
                raise RuntimeError(f"library built for TensorFlow {built_for}; the wheel requires {pin}")
            return None
        build_ops.build(output)
        # Editable installs copy only the library into the source tree: put
        # its build info (TF version it was built for) there too.
        source_info = ROOT / "tf_sparseconv" / build_ops.BUILD_INFO_NAME
        if info.resolve() != source_info.resolve():
            source_info.write_text(info.read_text())
        return None


class BdistWheel(bdist_wheel):
    """A wheel: portable library (see BuildOps), TensorFlow pinned to the minor release built for."""

    def run(self):
        self.distribution.tf_sparseconv_wheel = True
        if not self.skip_build:
            # build/lib.* outlives a build: files of an earlier one must not ship in this wheel.
            shutil.rmtree(self.get_finalized_command("build").build_lib, ignore_errors=True)
        super().run()

    def egg2dist(self, egginfo_path, distinfo_path):
        # Every METADATA goes through here (also `dist_info`, the metadata pip prepares).
        super().egg2dist(egginfo_path, distinfo_path)
        pin_tensorflow(Path(distinfo_path) / "METADATA")


setup(ext_modules=[OpLibrary()], cmdclass={"build_ext": BuildOps, "bdist_wheel": BdistWheel})
