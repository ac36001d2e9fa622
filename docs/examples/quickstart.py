"""The quick start: three decoders on one encoder, trained with impartial.backward (run by docs/figures.py)."""

import torch

import impartial
from impartial import solvers

torch.manual_seed(0)
enc = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
decs = torch.nn.ModuleList(torch.nn.Linear(8, d) for d in (12, 5, 3))  # one per modality
opt = torch.optim.Adam([*enc.parameters(), *decs.parameters()], lr=1e-3)

for _ in range(20):
    x = [torch.randn(32, d) for d in (12, 5, 3)]
    z = enc(torch.cat(x, dim=1))
    names = ("image", "text", "label")
    losses = {n: (dec(z) - xi).pow(2).mean() for n, dec, xi in zip(names, decs, x)}
    kl = 1e-3 * z.pow(2).mean()  # not a task: added plainly
    opt.zero_grad()
    # instead of sum([*losses.values(), kl]).backward():
    report = impartial.backward(losses, enc, solver=solvers.IMTLG(), also=[kl])
    opt.step()

print(report)
impartial.graph.draw(losses, enc, "graph.png")  # needs the graph extra or graphviz
