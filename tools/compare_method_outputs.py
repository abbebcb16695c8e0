#!/usr/bin/env python
"""Before/after check for a refactoring: every tuning method's outputs and gradients, bit for bit.

At the old commit, ``save`` builds every method on Swin-nano and ViT-nano (plus one non-default E3VA variant),
moves its trainable parameters off their initialisation, runs a training forward and backward on a fixed
input, and stores state dicts, outputs and gradients. At the new commit, ``check`` builds the same models,
loads those state dicts strictly by name (so parameter names must not have changed either) and compares
outputs and gradients with ``torch.equal``. Used for the restructure into e3va/methods (issue 14): 27 cases,
all equal.

    git checkout OLD && python tools/compare_method_outputs.py save /tmp/before.pt   # about 170 MB
    git checkout NEW && python tools/compare_method_outputs.py check /tmp/before.pt  # exit 1 on a mismatch
"""
import sys

import torch

from e3va import TUNING_METHODS, E3VASwin, E3VAViT

mode, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cases = []
for m in sorted(TUNING_METHODS):
    cases.append(("swin", m, dict(size="nano", tuning=m, drop_path_rate=0.0)))
    cases.append(("vit", m, dict(size="nano", tuning=m, img_size=64, window_size=2)))
cases.append(("swin", "e3va-direct-stacked-input", dict(size="nano", tuning="e3va", drop_path_rate=0.0,
              highway_downsample="direct", adapter_arrangement="stacked", adapter_input="sublayer_input")))
before = torch.load(path) if mode == "check" else {}
after = {}
bad = 0
for trunk, name, kw in cases:
    cls = E3VASwin if trunk == "swin" else E3VAViT
    torch.manual_seed(1)
    model = cls(**kw)
    key = f"{trunk}/{name}"
    if mode == "check":
        model.load_state_dict(before[key]["state"], strict=True)
    else:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    x = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(3))
    out = model(x)
    loss = sum((v * torch.randn(v.shape, generator=torch.Generator().manual_seed(4))).sum() for v in out.values())
    if loss.requires_grad:
        loss.backward()
    rec = {"state": {k: v.clone() for k, v in model.state_dict().items()},
           "out": {k: v.detach() for k, v in out.items()},
           "grad": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    after[key] = rec
    if mode == "check":
        b = before[key]
        ok = set(b["out"]) == set(rec["out"]) and all(torch.equal(b["out"][k], rec["out"][k]) for k in b["out"])
        okg = set(b["grad"]) == set(rec["grad"]) and all(torch.equal(b["grad"][k], rec["grad"][k]) for k in b["grad"])
        print(f"{key:40s} outputs {'equal' if ok else 'DIFFER'}  grads {'equal' if okg else 'DIFFER'} ({len(rec['grad'])} tensors)")
        bad += not (ok and okg)
if mode == "save":
    torch.save(after, path); print("saved", len(after))
else:
    print("mismatches:", bad); sys.exit(bad != 0)
