"""Copy cluster/serve.yaml into the RayService's serveConfigV2, so the two never differ.

    python cluster/kuberay/sync_serve_config.py          # rewrite rayservice.yaml's serveConfigV2
    python cluster/kuberay/sync_serve_config.py --check  # exit 1 if it is out of date

The block scalar after `serveConfigV2: |` is replaced by the Serve config's text, comments
included; nothing else in rayservice.yaml changes.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVE_CONFIG = HERE.parent / "serve.yaml"
RAYSERVICE = HERE / "base" / "rayservice.yaml"
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
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if "--check" in argv:
        if current != wanted:
            print(f"{RAYSERVICE} is out of date: run python {__file__}")
            return 1
        return 0
    if current != wanted:
        RAYSERVICE.write_text(wanted)
        print(f"updated {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
