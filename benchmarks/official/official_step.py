"""The official code's side of check_equivalence.py: from a state of train_official.py
(--checkpoint / --keep_every), its weights, momentum buffers and balanced-test logits, and one
training step on a fixed batch of training images (no augmentation) with a fixed mixup
coefficient and permutation, all written to one .npz.

    TORCH_PYTHON benchmarks/official/official_step.py --official=CHECKOUT --lists=LISTS \
        --state=STATE.ep060.pt --output=STEP.npz

Runs with PyTorch, outside balpoe_tf's dependencies.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_official import read_list, to_tensor  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="checkout of emasa/BalPoE-CalibratedLT")
    parser.add_argument("--lists", required=True, help="folder with train.txt and test.txt (write_lists.py)")
    parser.add_argument("--state", required=True, help="a training state of train_official.py")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--xi", type=float, default=0.7, help="the step's mixup coefficient")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    sys.path.insert(0, args.official)
    from model.loss import BSExpertLoss
    from model.model import ResNet32Model
    from utils.combiner import Combiner

    torch.set_num_threads(2)
    state = torch.load(args.state, weights_only=False)
    x_train, y_train = read_list(os.path.join(args.lists, "train.txt"))
    x_test, y_test = read_list(os.path.join(args.lists, "test.txt"))
    counts = np.bincount(y_train)
    model = ResNet32Model(num_classes=len(counts), reduce_dimension=False, use_norm=True, returns_feat=True,
                          num_experts=3)
    model.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    optimizer.load_state_dict(state["optimizer"])  # its LR and momentum buffers at that epoch
    out = {"before/" + k: v.numpy().copy() for k, v in model.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    out.update({"buffer/" + n: optimizer.state[p]["momentum_buffer"].numpy().copy()
                for n, p in model.named_parameters()})

    model.eval()
    with torch.no_grad():
        out["test_logits"] = np.concatenate([model(to_tensor(x_test[b:b + 500]))["logits"].numpy()
                                             for b in range(0, len(y_test), 500)])  # (N, M, C)

    rng = np.random.RandomState(0)
    idx = rng.choice(len(y_train), args.batch, replace=False)
    perm = rng.permutation(args.batch)
    config = {"trainer": {"epochs": 1}, "add_extra_info": True, "loss": {}, "arch": {"args": {"num_experts": 3}},
              "combiner": {"mode": "mixup", "mixup": {"alpha": 1.0}}}
    combiner = Combiner(config)
    combiner.update(state["epoch"])
    criterion = BSExpertLoss(cls_num_list=counts.tolist(), tau_list=[0, 1, 2])
    model.train()
    images, labels, p = to_tensor(x_train[idx]), torch.from_numpy(y_train[idx]), torch.from_numpy(perm)
    result = model(args.xi * images + (1 - args.xi) * images[p])  # the Combiner's mixup, with a given xi and perm
    extra = combiner._get_extra_loss_params(result)
    loss = (args.xi * criterion(result["output"], labels, **extra)
            + (1 - args.xi) * criterion(result["output"], labels[p], **extra))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    loss = float(loss.detach())
    out.update({"after/" + k: v.numpy() for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")})
    np.savez(args.output, train_images=x_train[idx], train_labels=y_train[idx], perm=perm, xi=args.xi,
             loss=loss, lr=optimizer.param_groups[0]["lr"], counts=counts, test_labels=y_test, **out)
    print(f"wrote {args.output}: epoch {state['epoch']}, LR {optimizer.param_groups[0]['lr']}, loss {loss:.6f}")


if __name__ == "__main__":
    main()
