"""Train the official BalPoE code (emasa/BalPoE-CalibratedLT: its ResNet32Model, BSExpertLoss,
Combiner mixup, SGD and CustomLR schedule) on the images of write_lists.py, and report the
balanced test metrics as balpoe_tf does (accuracy, ECE and MCE with 15 bins, per expert).

    python benchmarks/official/train_official.py --official=CHECKOUT --lists=LISTS --seed=1 \
        --epochs=15 --warmup=2 --step1=12 --step2=13 --output=RESULT.json

The paper's schedule (200 epochs, warm-up 5, steps at 160 and 180, with the official random
rotation) for runs longer than a session: --epochs=200 --warmup=5 --step1=160 --step2=180
--rotation=15 --checkpoint=STATE.pt; started again with the same command, it resumes after the
last finished epoch (model, optimizer, schedule and every random state). --keep_every=10 also
keeps the state of every 10th epoch as STATE.epNNN.pt; given as --checkpoint with --epochs=NNN,
such a state is evaluated without training (the curve along the schedule).

Runs with PyTorch (CPU), outside balpoe_tf's dependencies; needs numpy and Pillow too. Images
get the CIFAR transforms of torchvision done by hand: random crop 32 with 4 black pixels of
padding, horizontal flip, optionally RandomRotation (nearest neighbour, black fill, as Pillow's
rotate that torchvision calls), then normalisation with the CIFAR mean and std.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def read_list(path):
    paths, labels = [], []
    with open(path) as f:
        for line in f:
            p, y = line.rsplit(" ", 1)
            paths.append(p)
            labels.append(int(y))
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.uint8) for p in paths])
    return images, np.array(labels, np.int64)


def augment(images, rng, rotation=0.0):
    """RandomCrop(32, padding=4) on black padding, RandomHorizontalFlip and, if `rotation`,
    RandomRotation(rotation), in that order, as torchvision."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    out = np.empty_like(images)
    for k in range(n):
        i, j = rng.randint(0, 9, size=2)
        crop = padded[k, i:i + h, j:j + w]
        crop = crop[:, ::-1] if rng.rand() < 0.5 else crop
        if rotation:
            angle = rng.uniform(-rotation, rotation)
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).rotate(angle, Image.NEAREST, fillcolor=0))
        out[k] = crop
    return out


def to_tensor(images):
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def calibration(labels, logits, bins=15):
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    conf, pred = probs.max(1), probs.argmax(1)
    hits = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece, mce = 0.0, 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            gap = abs(hits[mask].mean() - conf[mask].mean())
            ece += mask.mean() * gap
            mce = max(mce, gap)
    return float(ece), float(mce)


def balanced_accuracy(labels, logits, num_classes):
    pred = logits.argmax(1)
    return float(np.mean([np.mean(pred[labels == c] == c) for c in range(num_classes)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of emasa/BalPoE-CalibratedLT")
    parser.add_argument("--lists", required=True, help="folder with train.txt and test.txt (write_lists.py)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--step1", type=int, default=12)
    parser.add_argument("--step2", type=int, default=13)
    parser.add_argument("--alpha", type=float, default=0.8, help="mixup alpha")
    parser.add_argument("--tau_list", default="0,1,2", help="tau = 1 - lambda per expert")
    parser.add_argument("--rotation", type=float, default=0.0, help="RandomRotation degrees (official: 15)")
    parser.add_argument("--checkpoint", default="", help="training state after every epoch; resumed from if present")
    parser.add_argument("--keep_every", type=int, default=0, help="keep the state of every Nth epoch too (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, help="result JSON")
    args = parser.parse_args()

    sys.path.insert(0, args.official)
    from model.loss import BSExpertLoss
    from model.model import ResNet32Model
    from utils.combiner import Combiner

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # the Combiner draws its mixup coefficient with np.random
    rng = np.random.RandomState(args.seed)
    x_train, y_train = read_list(os.path.join(args.lists, "train.txt"))
    x_test, y_test = read_list(os.path.join(args.lists, "test.txt"))
    num_classes = int(y_train.max()) + 1
    counts = np.bincount(y_train, minlength=num_classes)
    taus = [float(t) for t in args.tau_list.split(",")]

    model = ResNet32Model(num_classes=num_classes, reduce_dimension=False, use_norm=True, returns_feat=True,
                          num_experts=len(taus))
    criterion = BSExpertLoss(cls_num_list=counts.tolist(), tau_list=taus)
    config = {"trainer": {"epochs": args.epochs}, "add_extra_info": True, "loss": {},
              "arch": {"args": {"num_experts": len(taus)}},
              "combiner": {"mode": "mixup" if args.alpha > 0 else "default", "mixup": {"alpha": args.alpha}}}
    combiner = Combiner(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)

    def lr_lambda(epoch):  # the official CustomLR
        factor = 0.01 if epoch >= args.step2 else 0.1 if epoch >= args.step1 else 1.0
        return factor * (1 + epoch) / args.warmup if epoch < args.warmup else factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    first, seconds = 0, 0.0
    if args.checkpoint and os.path.isfile(args.checkpoint):
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.set_state(state["rng"])
        np.random.set_state(state["np_random"])
        torch.set_rng_state(state["torch_rng"])
        first, seconds = state["epoch"], state["seconds"]
        print(f"resuming after epoch {first} ({seconds:.0f} s trained)", flush=True)
    start = time.time() - seconds  # training time only: the time between runs is not counted
    for epoch in range(first, args.epochs):
        model.train()
        model._hook_before_iter()
        combiner.update(epoch)
        order = rng.permutation(len(y_train))
        losses = []
        for b in range(0, len(order), 128):  # the last, smaller batch is kept, as the official loader does
            idx = order[b:b + 128]
            images = to_tensor(augment(x_train[idx], rng, args.rotation))
            labels = torch.from_numpy(y_train[idx])
            _, loss_dict, _ = combiner.forward(model, criterion, images, labels)
            optimizer.zero_grad()
            loss_dict["loss"].backward()
            optimizer.step()
            losses.append(float(loss_dict["loss"].detach()))
        scheduler.step()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {np.mean(losses):.4f}  {time.time() - start:.0f} s", flush=True)
        if args.checkpoint:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng.get_state(), "np_random": np.random.get_state(),
                     "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "seconds": time.time() - start}
            torch.save(state, args.checkpoint + ".tmp")
            os.replace(args.checkpoint + ".tmp", args.checkpoint)  # a kill mid-write keeps the previous state
            if args.keep_every and (epoch + 1) % args.keep_every == 0:
                shutil.copyfile(args.checkpoint, f"{os.path.splitext(args.checkpoint)[0]}.ep{epoch + 1:03d}.pt")

    model.eval()
    ensemble, experts = [], []
    with torch.no_grad():
        for b in range(0, len(y_test), 500):
            out = model(to_tensor(x_test[b:b + 500]))
            ensemble.append(out["output"].numpy())
            experts.append(out["logits"].numpy())  # (B, M, C)
    ensemble, experts = np.concatenate(ensemble), np.concatenate(experts)
    ece, mce = calibration(y_test, ensemble)
    result = {"seed": args.seed, "epochs": args.epochs, "train_size": int(len(y_train)),
              "accuracy": balanced_accuracy(y_test, ensemble, num_classes), "ece": ece, "mce": mce,
              "expert_accuracy": [balanced_accuracy(y_test, experts[:, m], num_classes) for m in range(len(taus))],
              "wall_seconds": time.time() - start, "torch": torch.__version__}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
