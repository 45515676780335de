"""Throughput worker for the official BalPoE code (emasa/BalPoE-CalibratedLT), driven by
`tools/benchmark_throughput.py --reference=CHECKOUT`.

    TORCH_PYTHON benchmarks/official/throughput_official.py --official=CHECKOUT --experts=3

Builds the official `ResNet32Model` (cosine classifier, s = 30), `BSExpertLoss` and SGD with
Nesterov momentum, as its CIFAR configs do, on one random batch kept in memory. After a warm-up
it prints `ready`, then answers each line read from stdin: `train` runs `--steps` training steps
(the official Combiner's mixup forward, backward, update) and prints `train IMAGES_PER_S`;
`predict` runs `--steps` evaluation forwards and prints `predict IMAGES_PER_S`; `quit` ends.
Runs with PyTorch (CPU), outside balpoe_tf's dependencies; needs numpy.
"""

import argparse
import sys
import time

import numpy as np
import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of emasa/BalPoE-CalibratedLT")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="steps per request")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.4, help="mixup alpha")
    args = parser.parse_args()

    sys.path.insert(0, args.official)
    from model.loss import BSExpertLoss
    from model.model import ResNet32Model
    from utils.combiner import Combiner

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    taus = list(np.linspace(0, 2, args.experts)) if args.experts > 1 else [1.0]  # tau = 1 - lambda
    # For one expert the official code builds its plain ResNet-32, which returns the logits alone.
    model = ResNet32Model(num_classes=args.classes, reduce_dimension=False, use_norm=True, returns_feat=True,
                          num_experts=args.experts)
    criterion = BSExpertLoss(cls_num_list=list(range(args.classes, 0, -1)), tau_list=taus)
    combiner = Combiner({"trainer": {"epochs": 200}, "add_extra_info": True, "loss": {},
                         "arch": {"args": {"num_experts": args.experts}},
                         "combiner": {"mode": "mixup", "mixup": {"alpha": args.alpha}}})
    combiner.update(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    images = torch.rand(args.batch, 3, 32, 32)
    labels = torch.randint(0, args.classes, (args.batch,))

    def train():
        model.train()
        for _ in range(args.steps):
            _, loss_dict, _ = combiner.forward(model, criterion, images, labels)
            optimizer.zero_grad()
            loss_dict["loss"].backward()
            optimizer.step()
        loss_dict["loss"].item()

    def predict():
        model.eval()
        with torch.no_grad():
            for _ in range(args.steps):
                out = model(images)
                out = (out["output"] if isinstance(out, dict) else out).numpy()
        return out

    jobs = {"train": train, "predict": predict}
    for job in jobs.values():  # warm-up
        job()
    print(f"ready torch {torch.__version__}", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        start = time.perf_counter()
        jobs[name]()
        print(f"{name} {args.steps * args.batch / (time.perf_counter() - start)}", flush=True)


if __name__ == "__main__":
    main()
