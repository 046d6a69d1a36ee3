"""Every command the README shows runs as written on a fresh checkout, as a newcomer would type it.

The README's shell blocks are read, not copied: each command is typed into bash in an empty folder,
its `[optional]` placeholders dropped and small options appended (a tiny model, few tokens, few
steps), so a command that breaks or disappears from the README breaks this test. Commands that need
what this machine has not (Docker, Kubernetes, a remote cluster, a GPU) are listed with the reason
and the paths they name must exist.
"""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.net import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Run elsewhere (each is covered by its own tests or needs what this machine lacks).
ELSEWHERE = {
    "make run": "the same as `orthrus-serve up` with the built-in model (run below with a tiny one)",
    "make test": "this suite",
    "serve deploy": "a remote Ray cluster (tests/cluster deploys the same config locally)",
    "cluster/local/multinode.sh": "tests/cluster/test_multinode.py",
    "docker build": "Docker (tests/cluster/test_dockerfile.py lints the Dockerfile)",
    "kubectl apply -k cluster/kuberay": "Kubernetes (tests/cluster/test_kuberay_manifests.py renders and validates it)",
    "scripts/train_builtin_head_gpu.sh": "a CUDA GPU",
    "orthrus-serve up --ssl-certfile": "tests/serve/test_tls.py (Ray's HTTPS server with the options `up` passes)",
    "curl --cacert": "tests/serve/test_tls.py (HTTPS trusting a private CA)",
    "orthrus-serve generate \"Hello\" --address gateway": "tests/serve/test_tls.py (generate --ca-file over TLS)",
}


def readme_commands() -> list[str]:
    """The commands of the README's ```sh blocks: continuation lines joined, comments dropped."""
    commands, in_sh, buf = [], False, ""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_sh = line.strip() == "```sh"
            continue
        if not in_sh:
            continue
        line = re.sub(r"\s{2,}#.*$", "", line)  # a comment after the command
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        command = (buf + line).strip()
        buf = ""
        if command and not command.startswith("#"):
            commands.extend(c.strip() for c in command.split(" && "))
    return commands


def typed(command: str, extra: str) -> str:
    """The command without its `[optional]` placeholders, with `extra` options appended."""
    return re.sub(r"\s*\[--[^\]]*\]", "", command).replace(".venv/bin/", "") + " " + extra


def run(command: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"`{command}` failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def by_prefix(prefix: str) -> list[str]:
    return [c for c in readme_commands() if c.startswith(prefix)]


def test_every_readme_command_is_run_here_or_named_elsewhere():
    runs_here = ("orthrus gen-data", "orthrus train", "orthrus eval", ".venv/bin/orthrus-serve up",
                 ".venv/bin/orthrus-serve generate", "curl localhost:8000/v1/completions", "export ORTHRUS_API_KEY=")
    for command in readme_commands():
        here = command.startswith(runs_here)
        elsewhere = next((k for k in ELSEWHERE if command.startswith(k)), None)
        assert here or elsewhere, f"README command not under test: {command!r}"
        for path in re.findall(r"(?:cluster|scripts)/[\w./-]+", command):
            assert (REPO / path).exists(), path
    for prefix in runs_here:
        assert by_prefix(prefix), f"{prefix!r} left the README: update this test"
    for target in ("run", "test"):
        assert re.search(rf"^{target}:", (REPO / "Makefile").read_text(), re.M)


def test_the_command_line_flags_the_readme_names_exist():
    from orthrus_engines.cli import _parser

    text = (REPO / "README.md").read_text()
    line = re.search(r"Command line: `orthrus generate (.*?)`, or `(--prompt-file) FILE`", text, re.S)
    flags = set(re.findall(r"--[\w-]+", line.group(1))) | {line.group(2)}
    known = set(_parser()._subparsers._group_actions[0].choices["generate"]._option_string_actions)
    assert flags and flags <= known, flags - known


def test_the_offline_python_example_runs(tiny_model_dir):
    """The README's Python block, on the tiny model; `compile=True` only constructs its arguments
    (tests/engines/test_compile.py compiles)."""
    from orthrus_engines.config import EngineArgs

    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = []
    for line in block.splitlines():
        if "compile=True" in line:
            kwargs = dict(re.findall(r"(\w+)=(\w+)", line.split("#")[0]))
            assert set(kwargs) <= set(EngineArgs.__dataclass_fields__), kwargs
            continue
        lines.append(line.replace("LLM()", f"LLM({str(tiny_model_dir)!r})")
                     .replace("LLM(block_size", f"LLM({str(tiny_model_dir)!r}, block_size")
                     .replace("max_tokens=32", "max_tokens=4"))
    exec(compile("\n".join(lines), "README.md", "exec"), {})


@pytest.mark.slow
def test_training_a_head_in_three_commands(tiny_model_dir, tmp_path):
    """gen-data, train and eval as the README types them, in an empty folder (no data/ or runs/ yet)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nName a color\n")
    small = f"--model {tiny_model_dir}"  # an Orthrus checkpoint: its full-rank twins train with --rank 0
    (gen,), (train,), (ev,) = by_prefix("orthrus gen-data"), by_prefix("orthrus train"), by_prefix("orthrus eval")
    run(typed(gen, f"{small} --prompts {prompts} --max-tokens 8"), tmp_path)
    run(typed(train, f"{small} --block-size 4 --rank 0 --steps 2 --batch-size 1 --anchors 2 --seq-len 32 "
                     "--max-text-tokens 2000 --no-progress"), tmp_path)
    run(typed(ev, f"{small} --prompts {prompts} --max-tokens 8"), tmp_path)
    for name in re.findall(r"--out (\S+)", gen + train + ev) + re.findall(r"--plot (\S+)", ev):
        assert (tmp_path / name).exists(), name


def ctrl_c_enabled() -> None:
    """In the child: SIGINT as a terminal delivers it, even where this run inherited it ignored (a shell's
    background job), which would make `up` ignore Ctrl-C too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def serving(up: str, env: dict, cwd: Path, model: Path) -> Iterator[tuple[int, int]]:
    """`orthrus-serve up` as typed, on free ports; Ctrl-C stops it, and it must exit cleanly."""
    http, grpc = free_port(), free_port()
    server = subprocess.Popen(["bash", "-c", "exec " + typed(up, f"--model {model} --http-port {http} --grpc-port {grpc}")],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, preexec_fn=ctrl_c_enabled)
    try:
        seen, deadline = "", time.monotonic() + 240
        while "orthrus-serve is up" not in seen:
            line = server.stdout.readline()
            assert line or server.poll() is None, f"orthrus-serve up exited:\n{seen[-4000:]}"
            assert time.monotonic() < deadline, f"orthrus-serve up did not come up:\n{seen[-4000:]}"
            seen += line
        yield http, grpc
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    assert server.returncode == 0


@pytest.mark.slow
def test_serving_commands(tiny_model_dir, tmp_path):
    """The "Serving" and "Security" blocks on one server (starting one takes half a minute): a key made as typed,
    then `up` (the same command in both blocks), both blocks' gRPC clients (which send the key), and the curl
    call, refused without the key and answered with it. A server without a key: tests/serve/test_serving.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ORTHRUS_API_KEY")}
    env["PATH"] = f"{BIN}:{os.environ['PATH']}"
    ups, gens = by_prefix(".venv/bin/orthrus-serve up"), by_prefix(".venv/bin/orthrus-serve generate")
    assert len(ups) == len(gens) == 2, "the Serving and Security blocks each start a server and call it"
    assert ups[0] == ups[1], "one server serves both blocks' calls"
    (curl,) = by_prefix("curl localhost:8000")
    (export,) = by_prefix("export ORTHRUS_API_KEY=")
    env["ORTHRUS_API_KEY"] = key = run(f"{export} && echo $ORTHRUS_API_KEY", tmp_path).stdout.strip()
    assert len(key) >= 32
    with serving(ups[1], env, tmp_path, tiny_model_dir) as (http, grpc):
        for gen in gens:
            out = run(typed(gen, f"--address 127.0.0.1:{grpc} --max-tokens 4"), tmp_path, env=env)
            assert out.stdout.strip()
        call = typed(curl.replace("localhost:8000", f"127.0.0.1:{http}"), "-s -o /dev/stderr -w '%{http_code}'")
        assert run(call, tmp_path, env=env).stdout == "401"
        assert run(f"{call} -H 'Authorization: Bearer {key}'", tmp_path, env=env).stdout == "200"


def test_typed_drops_placeholders():
    assert typed("orthrus gen-data --out x [--model DIR]", "--a 1") == "orthrus gen-data --out x --a 1"
    assert shlex.split(typed(".venv/bin/orthrus-serve up", "")) == ["orthrus-serve", "up"]
