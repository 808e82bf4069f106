"""Submit every example spec to a running gradwatch server and print the verdict each gets,
as the Markdown table of examples/README.md.

    gradwatch serve                                   # in another terminal
    python examples/verdicts.py [--url http://127.0.0.1:8000] [--api-key KEY]

Needs only the `gradwatch` SDK (httpx). Jobs run one after another through the server's
worker(s), exactly as `gradwatch submit SPEC --wait` runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gradwatch.client import Client, JobFailed

HERE = Path(__file__).resolve().parent

#: (spec file, what it shows, the verdict the literature expects)
EXAMPLES = [
    ("deep-sigmoid.json", "20 sigmoid layers, small normal init (Glorot & Bengio 2010)", "vanishing"),
    ("deep-sigmoid-fixed.json", "the same depth with ReLU and He init", "healthy"),
    ("tiny-init.json", "12 tanh layers, N(0, 0.01²) init", "vanishing"),
    ("tiny-init-fixed.json", "the same with Xavier init (gain 5/3 for tanh)", "healthy"),
    ("zero-init.json", "ReLU MLP, every weight and bias zero", "vanishing"),
    ("zero-init-fixed.json", "the same with He init", "healthy"),
    ("relu-normal-init.json", "10 ReLU layers, N(0, 1) init (He et al. 2015)", "exploding"),
    ("relu-normal-init-fixed.json", "the same with He init", "healthy"),
    ("huge-lr.json", "small ReLU MLP, SGD with lr 20", "exploding"),
    ("huge-lr-fixed.json", "the same with lr 0.05", "healthy"),
    ("rnn-long-adding.json", "vanilla tanh RNN, adding problem of length 60 (Pascanu et al. 2013)", "vanishing"),
    ("rnn-long-adding-fixed.json", "the same with orthogonal recurrent init, Adam, clipping", "healthy"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("GRADWATCH_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("GRADWATCH_API_KEY"))
    args = parser.parse_args()
    client = Client(args.url, args.api_key)
    print("| example | what it is | expected | verdict | confidence | epochs run | top recommendation |")
    print("|---|---|---|---|---|---|---|")
    for name, what, expected in EXAMPLES:
        spec = json.loads((HERE / name).read_text())
        started = time.monotonic()
        job = client.submit(spec)
        try:
            job = client.wait(job, poll=0.5)
        except JobFailed as exc:
            print(f"| [{name}]({name}) | {what} | {expected} | job failed: {exc} | | | |", flush=True)
            continue
        report = client.report(job)
        top = (report.get("recommendations") or [{}])[0].get("id", "–")
        mark = "" if report["verdict"] == expected else " ⚠"
        print(f"| [{name}]({name}) | {what} | {expected} | **{report['verdict']}**{mark} | "
              f"{report.get('confidence', 0):.2f} | {job['progress']['epoch']}/{job['progress']['epochs']} | "
              f"`{top}` |", flush=True)
        print(f"  {name}: job {job['id']}, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
