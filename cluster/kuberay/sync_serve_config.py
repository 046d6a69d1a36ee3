"""Copy cluster/serve.yaml into the RayService's serveConfigV2 (and cluster/serve-tp2.yaml into the
tp2 overlay's patch of it), so the copies never differ.

    python cluster/kuberay/sync_serve_config.py          # rewrite each copy's serveConfigV2
    python cluster/kuberay/sync_serve_config.py --check  # exit 1 if it is out of date

The block scalar after `serveConfigV2: |` is replaced by the Serve config's text, comments
included; nothing else in the target file changes.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVE_CONFIG = HERE.parent / "serve.yaml"
RAYSERVICE = HERE / "base" / "rayservice.yaml"
COPIES = [(SERVE_CONFIG, RAYSERVICE), (HERE.parent / "serve-tp2.yaml", HERE / "tp2" / "rayservice-tp2.yaml")]
KEY = "serveConfigV2: |"


def render(rayservice: str, serve_config: str) -> str:
    lines = rayservice.splitlines(keepends=True)
    (start,) = [i for i, line in enumerate(lines) if line.strip() == KEY]
    key_indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_indent):
        end += 1
    pad = " " * (key_indent + 2)
    block = [pad + line if line.strip() else "\n" for line in serve_config.splitlines(keepends=True)]
    if block and not block[-1].endswith("\n"):
        block[-1] += "\n"
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str]) -> int:
    stale = 0
    for serve_config, target in COPIES:
        current = target.read_text()
        wanted = render(current, serve_config.read_text())
        if current == wanted:
            continue
        if "--check" in argv:
            print(f"{target} is out of date: run python {__file__}")
            stale = 1
        else:
            target.write_text(wanted)
            print(f"updated {target}")
    return stale


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
