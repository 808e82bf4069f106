"""Regenerate the README's walk-through and pictures from the real service.

    .venv/bin/python scripts/readme_assets.py [--port 8000]

Starts `gradwatch serve` (API + 1 worker) on a new SQLite file, runs the walk-through's
commands exactly as printed (capturing their real output and exit codes), fetches the
gradient-flow PNGs of a vanishing and a healthy network from the API into docs/img/, and prints
the walk-through as Markdown for the README. Nothing here fakes output: if a command's output
changes, so does the walk-through.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"


def run(shell_line: str, env: dict[str, str]) -> tuple[str, int]:
    """Run a `gradwatch ...` line as the README shows it; output = stderr then stdout, as a
    terminal interleaves them for these commands (progress first, then the report)."""
    args = shell_line.split()
    assert args[0] == "gradwatch"
    done = subprocess.run([sys.executable, "-m", "service.cli", *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return done.stderr + done.stdout, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    tmp = Path(tempfile.mkdtemp(prefix="gradwatch-readme-"))
    env = {**os.environ, "GRADWATCH_DATABASE_URL": f"sqlite:///{tmp}/gradwatch.db", "COLUMNS": "100",
           "GRADWATCH_URL": url, "PYTHONPATH": str(ROOT)}
    env.pop("GRADWATCH_API_KEYS", None)
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(args.port)],
                              cwd=ROOT, env=env, stdout=open(tmp / "serve.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.3)

        blocks = []
        out, code = run("gradwatch submit examples/deep-sigmoid.json --wait", env)
        blocks.append(("gradwatch submit examples/deep-sigmoid.json --wait", out, code))
        job_id = httpx.get(f"{url}/v1/jobs", timeout=10).json()["items"][0]["id"]
        out, code = run("gradwatch submit examples/deep-sigmoid-fixed.json --wait", env)
        blocks.append(("gradwatch submit examples/deep-sigmoid-fixed.json --wait", out, code))
        out, code = run("gradwatch jobs", env)
        blocks.append(("gradwatch jobs", out, code))
        out, code = run(f"gradwatch report {job_id} --json", env)
        blocks.append((f"gradwatch report {job_id} --json | head -6", "\n".join(out.splitlines()[:6]) + "\n", code))

        # The pictures: the same two specs with early stop off, so every epoch shows.
        IMG.mkdir(parents=True, exist_ok=True)
        for name, out_name in (("deep-sigmoid", "gradient-flow-vanishing.png"), ("deep-sigmoid-fixed", "gradient-flow-healthy.png")):
            spec = copy.deepcopy(json.loads((ROOT / "examples" / f"{name}.json").read_text()))
            spec["analysis"]["early_stop"] = False
            job = httpx.post(f"{url}/v1/jobs", json=spec, timeout=30).json()
            while (current := httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json())["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
            assert current["status"] == "succeeded", current
            png = httpx.get(f"{url}/v1/jobs/{job['id']}/plots/gradient-flow.png", timeout=60)
            png.raise_for_status()
            (IMG / out_name).write_bytes(png.content)
            print(f"wrote docs/img/{out_name} (job {job['id']}, verdict {current['verdict']})", file=sys.stderr)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)

    print("```console")
    print("$ gradwatch serve &          # API + 1 worker on ./gradwatch.db, http://127.0.0.1:8000")
    for line, out, code in blocks:
        print(f"$ {line}")
        print(re.sub(r"[ \t]+\n", "\n", out).rstrip("\n"))
        if line.startswith("gradwatch submit"):
            print("$ echo $?")
            print(code)
    print("```")


if __name__ == "__main__":
    main()
