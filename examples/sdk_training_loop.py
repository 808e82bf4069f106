"""A plain PyTorch training loop reporting to gradwatch with three added lines.

    python examples/sdk_training_loop.py --url http://127.0.0.1:8000 --kind vanishing
    python examples/sdk_training_loop.py --kind exploding
    python examples/sdk_training_loop.py --kind healthy

It needs only torch and the `gradwatch` SDK (which itself needs only torch and httpx).
`log_epoch` returns at once: if the server goes away mid-run, training goes on and the records
wait in memory until it is back (`complete()` waits for them). The training accuracy is logged
as a metric: with it the diagnosis can tell "learned nothing" from "learned a little".
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from gradwatch import Client, Probe


def make_model(kind: str, width: int = 64, depth: int = 12) -> nn.Sequential:
    """`vanishing`: deep sigmoid MLP with small N(0, 0.05) weights (Glorot & Bengio 2010).
    `exploding`: deep ReLU MLP with N(0, 1) weights (far above He's sqrt(2/fan_in)).
    `healthy`: the same depth with ReLU and He init."""
    layers: list[nn.Module] = []
    fan_in = 2
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        if kind == "vanishing":
            nn.init.normal_(linear.weight, std=0.05)
        elif kind == "exploding":
            nn.init.normal_(linear.weight, std=1.0)
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.Sigmoid() if kind == "vanishing" else nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 2))
    return nn.Sequential(*layers)


def spirals(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    t = torch.rand(n, generator=g) * 3 * torch.pi
    angle = t + y * torch.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * torch.pi)
    return x + 0.02 * torch.randn(x.shape, generator=g), y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("GRADWATCH_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("GRADWATCH_API_KEY"))
    parser.add_argument("--kind", choices=["vanishing", "exploding", "healthy"], default="vanishing")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--callback-url", default=None, help="POST the report here when the job ends.")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = spirals()
    model = make_model(args.kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    probe = Probe(model)                                                            # 1
    job = Client(args.url, api_key=args.api_key).start_external(                   # 2
        f"sdk-{args.kind}", probe, epochs=args.epochs, callback_url=args.callback_url)
    print(f"job {job.id} started", flush=True)
    for epoch in range(1, args.epochs + 1):
        for batch in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            probe.step(loss)
            opt.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        job.log_epoch(probe.end_epoch(epoch, metrics={"accuracy": accuracy}))       # 3
        print(f"epoch {epoch} logged (accuracy {accuracy:.3f}, {job.pending} waiting for the server)", flush=True)
    print("completing", flush=True)
    job.complete()
    report = job.report()
    print(f"delivered {job.delivered} epoch records, {job.retries} failed send(s) retried", flush=True)
    print(f"job {job.id}: {report['verdict']} — {report['summary']}", flush=True)


if __name__ == "__main__":
    main()
