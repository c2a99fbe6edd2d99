#!/usr/bin/env python3
"""Configure the Bazel build of tf_sparseconv for an installed TensorFlow.

Asks the Python interpreter given by --python (default: the one running this
script) for tf.sysconfig's include directory, compile flags and link flags,
and generates, under third_party/local_config/ (git-ignored):

  local_tensorflow/   the @local_tensorflow repository: symlinks to the
                      TensorFlow headers and to libtensorflow_framework.so.2,
                      and a BUILD file with :tf_header_lib and
                      :libtensorflow_framework.
  platforms           a symlink to the @platforms repository shipped by
                      Debian's bazel-platforms package (Bazel cannot download
                      it offline).
  tf_configure.bazelrc
                      build --copt/--cxxopt/--linkopt lines from tf.sysconfig,
                      imported by the checked-in .bazelrc.

Run it again whenever the Python environment or TensorFlow changes.
See tools/BAZEL.md.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(ROOT, "third_party", "local_config")

# Where Debian's bazel-platforms (and bazel-bootstrap) put @platforms.
PLATFORMS_CANDIDATES = (
    "/usr/share/bazel/tools/platforms",
    "/usr/share/bazel/platforms",
)

_QUERY = r"""
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
info = {
    "version": tf.__version__,
    "include": tf.sysconfig.get_include(),
    "lib": tf.sysconfig.get_lib(),
    "compile_flags": tf.sysconfig.get_compile_flags(),
    "link_flags": tf.sysconfig.get_link_flags(),
}
sys.stdout.write("@@TF_SYSCONFIG@@" + json.dumps(info) + "\n")
"""


def query_tensorflow(python):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(
            [python, "-c", _QUERY],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    except OSError as e:
        sys.exit(f"configure.py: cannot run {python}: {e}")
    for line in proc.stdout.splitlines():
        if line.startswith("@@TF_SYSCONFIG@@"):
            return json.loads(line[len("@@TF_SYSCONFIG@@") :])
    sys.exit(
        f"configure.py: could not import tensorflow with {python} "
        f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def split_compile_flags(flags):
    """Returns (include_dirs, copts, cxxopts) from tf.sysconfig compile flags.

    -I directories are not passed as copts: the headers come in through the
    @local_tensorflow//:tf_header_lib target, so that Bazel tracks them.
    """
    includes, copts, cxxopts = [], [], []
    it = iter(flags)
    for flag in it:
        if flag == "-I":
            includes.append(next(it))
        elif flag.startswith("-I"):
            includes.append(flag[2:])
        elif flag.startswith(("--std=", "-std=")):
            cxxopts.append("-std=" + flag.split("=", 1)[1])  # C++ only
        else:
            copts.append(flag)
    return includes, copts, cxxopts


def split_link_flags(flags):
    """Returns (lib_dirs, libs, other) from tf.sysconfig link flags."""
    lib_dirs, libs, other = [], [], []
    it = iter(flags)
    for flag in it:
        if flag == "-L":
            lib_dirs.append(next(it))
        elif flag.startswith("-L"):
            lib_dirs.append(flag[2:])
        elif flag.startswith("-l"):
            libs.append(flag[2:])
        else:
            other.append(flag)
    return lib_dirs, libs, other


def find_library(lib_dirs, lib):
    """Resolves a -l argument ("tensorflow_framework" or ":libfoo.so.2")."""
    if lib.startswith(":"):
        names = [lib[1:]]
    else:
        names = [f"lib{lib}.so", f"lib{lib}.a"]
    for d in lib_dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return name, path
    return None, None


def find_platforms(explicit):
    candidates = [explicit] if explicit else list(PLATFORMS_CANDIDATES)
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cpu", "BUILD")) and os.path.isfile(
            os.path.join(path, "os", "BUILD")
        ):
            return os.path.abspath(path)
    sys.exit(
        "configure.py: no Bazel @platforms repository found in {}; install "
        "Debian's bazel-platforms package or pass --platforms DIR.".format(", ".join(candidates))
    )


# Parts of TensorFlow's include dir left out of :tf_header_lib. Bazel hashes
# every declared header and links it into each action's sandbox, so trimming
# the ~18k files (430 MB) to what a CPU op can reach saves minutes on a cold
# build. With tf.sysconfig's single -I<include>, nothing includes
# "external/..." (the vendored sources of TF's dependencies, 2/3 of the
# files); third_party/gpus is CUDA, which the Bazel build does not compile.
# --all-headers keeps everything.
HEADER_EXCLUDES = [
    "include/external/**",
    "include/third_party/gpus/**",
    # Not headers: sources and binary descriptor sets shipped alongside.
    "include/**/*.c",
    "include/**/*.cc",
    "include/**/*.bin",
]


def bazelrc_quote(arg):
    # .bazelrc lines are split like a shell command line.
    return shlex.quote(arg)


def format_list(items, indent):
    if not items:
        return "[]"
    pad = " " * indent
    return "[\n" + "".join(f'{pad}    "{i}",\n' for i in items) + pad + "]"


def symlink(target, link):
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(target, link)


TF_BUILD = """\
# GENERATED by configure.py from tf.sysconfig of {python}
# (TensorFlow {version}); do not edit, re-run configure.py instead.
package(default_visibility = ["//visibility:public"])

# TensorFlow's C++ headers (include -> {include}).
cc_library(
    name = "tf_header_lib",
    hdrs = glob(
        ["include/**"],
        exclude = {excludes},
    ),
    includes = ["include"],
)

# The framework library the op library links against (the same
# -l:{lib_name} as tf.sysconfig.get_link_flags()).
cc_library(
    name = "libtensorflow_framework",
    srcs = ["lib/{lib_name}"],
)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python interpreter with TensorFlow installed (default: %(default)s)",
    )
    parser.add_argument(
        "--platforms",
        default=None,
        help="directory of the Bazel @platforms repository (default: the one from Debian's bazel-platforms)",
    )
    parser.add_argument(
        "--all-headers",
        action="store_true",
        help="declare TensorFlow's whole include dir, including the vendored "
        "external/ and CUDA headers (slower cold builds)",
    )
    args = parser.parse_args()

    python = args.python
    if os.sep in python:
        python = os.path.abspath(python)  # keep venv symlinks unresolved
    info = query_tensorflow(python)

    includes, copts, cxxopts = split_compile_flags(info["compile_flags"])
    lib_dirs, libs, other_link = split_link_flags(info["link_flags"])
    if not includes:
        includes = [info["include"]]
    include_dir = includes[0]
    if not os.path.isdir(include_dir):
        sys.exit(f"configure.py: TensorFlow include dir {include_dir} missing")
    framework = [lib for lib in libs if "tensorflow_framework" in lib]
    if not framework:
        sys.exit("configure.py: no libtensorflow_framework in link flags {}".format(info["link_flags"]))
    lib_name, lib_path = find_library(lib_dirs or [info["lib"]], framework[0])
    if lib_path is None:
        sys.exit(f"configure.py: cannot find {framework[0]} in {lib_dirs}")
    platforms = find_platforms(args.platforms)

    excludes = [] if args.all_headers else HEADER_EXCLUDES

    # Regenerate third_party/local_config/ from scratch.
    if os.path.isdir(CONFIG_DIR) and not os.path.islink(CONFIG_DIR):
        shutil.rmtree(CONFIG_DIR)
    tf_repo = os.path.join(CONFIG_DIR, "local_tensorflow")
    os.makedirs(os.path.join(tf_repo, "lib"))

    symlink(platforms, os.path.join(CONFIG_DIR, "platforms"))
    symlink(include_dir, os.path.join(tf_repo, "include"))
    symlink(lib_path, os.path.join(tf_repo, "lib", lib_name))
    with open(os.path.join(tf_repo, "WORKSPACE"), "w") as f:
        f.write('workspace(name = "local_tensorflow")\n')
    with open(os.path.join(tf_repo, "BUILD.bazel"), "w") as f:
        f.write(
            TF_BUILD.format(
                python=python,
                version=info["version"],
                include=include_dir,
                lib_name=lib_name,
                excludes=format_list(excludes, 8),
            )
        )

    lines = [
        f"# GENERATED by configure.py from tf.sysconfig of {python}",
        "# (TensorFlow {}); do not edit, re-run configure.py instead.".format(info["version"]),
        f"# Compile flags (-I{include_dir} comes from @local_tensorflow//:tf_header_lib).",
    ]
    lines += [f"build --copt={bazelrc_quote(o)}" for o in copts]
    lines += [f"build --cxxopt={bazelrc_quote(o)}" for o in cxxopts]
    lines.append("# Link flags.")
    link_flags = ["-L" + d for d in lib_dirs] + ["-l" + lib for lib in libs] + other_link
    lines += [f"build --linkopt={bazelrc_quote(o)}" for o in link_flags]
    rc_path = os.path.join(CONFIG_DIR, "tf_configure.bazelrc")
    with open(rc_path, "w") as f:
        f.write("\n".join(lines) + "\n")

    print("configure.py: TensorFlow {} from {}".format(info["version"], python))
    print(f"  headers:   {include_dir}")
    print(f"  library:   {lib_path}")
    print(f"  platforms: {platforms}")
    print(f"  wrote {os.path.relpath(rc_path, ROOT)}")
    for line in lines[3:]:
        print("    " + line)


if __name__ == "__main__":
    main()
