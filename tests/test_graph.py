"""``impartial.graph``: tracing, the block rule, drawing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from impartial.graph import Block, draw, find_blocks, trace
from impartial.graph._draw import to_dot
from models import DTYPE, MODELS, make, shared_params

EXPECTED = {  # model -> [(block name, tasks, blocks above)]
    "mlp": [("AddmmBackward0 [6, 6]", (0, 1, 2), ())],
    "conv": [("ViewBackward0 [5, 16]", (0, 1, 2), ())],
    "vae": [("AddBackward0 [6, 3]", (0, 1, 2), ())],
    "hivae": [("SigmoidBackward0 [6, 2]", (0, 1, 2), ()), ("TanhBackward0 [6, 3]", (0, 1, 2), ())],
    "lower": [("TanhBackward0 [6, 4]", (0, 1), ()), ("TanhBackward0 [6, 6]", (0, 1, 2), (0,))],
}


@pytest.mark.parametrize("infer", [False, True], ids=["given", "inferred"])
@pytest.mark.parametrize("name", MODELS)
def test_blocks_are_where_task_streams_first_meet(name: str, infer: bool) -> None:
    model, x = make(name)
    tasks, also, acts = model.losses(x)
    blocks = find_blocks(tasks, None if infer else shared_params(model), also=also)
    assert [(b.name, b.tasks, b.above) for b in blocks] == EXPECTED[name]
    assert all(isinstance(b, Block) and b.leaf is None for b in blocks)


@pytest.mark.parametrize("name", MODELS)
def test_block_edges_are_the_activations(name: str) -> None:
    model, x = make(name)
    tasks, also, acts = model.losses(x)
    edges = {(b.edge.node, b.edge.output_nr) for b in find_blocks(tasks, also=also)}
    want = {"hivae": ["z", "s"], "lower": ["z", "h"]}.get(name, ["z"])
    assert edges == {(acts[a].grad_fn, acts[a].output_nr) for a in want}


def test_also_terms_never_make_a_block() -> None:
    model, x = make("mlp")
    tasks, _, acts = model.losses(x)
    z = acts["z"]
    assert find_blocks(tasks[:1], also=[z.sum(), z.pow(2).sum()]) == []
    assert len(find_blocks(tasks, also=[z.sum()])) == 1


def test_inferred_shared_params_are_the_leaves_two_tasks_reach() -> None:
    model, x = make("lower")
    tasks, _, _ = model.losses(x)
    g = trace(tasks)
    assert {id(g.leaves[n]) for n in g.shared} == {id(p) for p in model.shared()}
    for i, head in enumerate(model.heads):  # a head's parameters: reached by its task only
        for p in head.parameters():
            assert g.tasks(next(n for n, t in g.leaves.items() if t is p)) == (i,)


def test_a_parameter_read_by_two_heads_is_a_leaf_block() -> None:
    w = nn.Parameter(torch.randn(3, dtype=DTYPE))
    x = torch.randn(4, 3, dtype=DTYPE)
    blocks = find_blocks([(x * w).sum(), (x * w).pow(2).sum()])
    assert len(blocks) == 1 and blocks[0].leaf is w and blocks[0].shape == (3,)


def test_blocks_are_only_found_above_shared_params() -> None:
    model, x = make("lower")
    tasks, _, _ = model.losses(x)
    # only ``mid`` is declared shared: no block at h, above the trunk alone
    blocks = find_blocks(tasks, model.mid.parameters())
    assert [(b.name, b.tasks, b.above) for b in blocks] == [("TanhBackward0 [6, 4]", (0, 1), ())]


def test_one_task_has_no_block_and_trace_is_topological() -> None:
    model, x = make("vae")
    tasks, also, _ = model.losses(x)
    g = trace(tasks, also=also)
    pos = {n: i for i, n in enumerate(g.nodes)}
    assert all(pos[consumer] < pos[producer] for consumer, producer, _ in g.edges)
    assert find_blocks(tasks[:1], also=also) == []


def test_deep_graphs_do_not_hit_the_recursion_limit() -> None:
    w = nn.Parameter(torch.ones(2, dtype=DTYPE))
    h = w
    for _ in range(sys.getrecursionlimit() + 100):
        h = h * 1.0
    assert len(find_blocks([h.sum(), h.pow(2).sum()])) == 1


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_draw_writes_the_vae_picture(tmp_path: Path, suffix: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    model, x = make("vae")
    tasks, also, _ = model.losses(x)
    path = draw(tasks, model.trunk.parameters(), tmp_path / f"vae{suffix}", also=also, engine="matplotlib")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(magic)


def test_dot_source_marks_blocks_shared_params_and_losses() -> None:
    model, x = make("hivae")
    tasks, also, _ = model.losses(x)
    src = to_dot(trace(tasks, model.shared(), also=also))
    assert src.startswith("digraph") and src.count('xlabel="block') == 2
    assert src.count("peripheries=2") == len(model.shared()) and 'label="also[0]"' in src


def test_graph_drawing_stays_out_of_the_import_path() -> None:
    import subprocess

    code = "import impartial, sys; assert 'matplotlib' not in sys.modules and 'graphviz' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _plain_values(x: object) -> bool:
    """Whether ``x`` is made of ints, types, None and tuples / lists of them (no node, no tensor)."""
    if isinstance(x, (tuple, list)):
        return all(_plain_values(v) for v in x)
    return x is None or isinstance(x, (int, type))


def test_blocks_found_before_are_reused_only_for_the_same_structure_and_shared_params() -> None:
    from impartial.graph import _blocks

    lin, w1, w2 = nn.Linear(3, 4), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    x = torch.randn(5, 3)

    def losses(wired: bool) -> list[torch.Tensor]:
        z = lin(x)
        y = z * w1
        return [y.sum(), (z * w2).sum()] if wired else [y.sum(), y.pow(2).sum()]

    def found(wired: bool, shared: list, fresh: bool) -> list:
        if fresh:
            _blocks._FOUND.clear()
        return [(b.name, b.tasks, b.above, b.edge.node.name()) for b in find_blocks(losses(wired), shared)]

    params = list(lin.parameters())
    want = {
        (wired, s): found(wired, shared, fresh=True)
        for wired in (True, False)
        for s, shared in (("lin", params), ("w1", [w1]))
    }
    assert want[(True, "lin")] and not want[(True, "w1")]  # the shared params decide: a block at z, or none
    assert want[(True, "lin")] != want[(False, "lin")]  # another graph: another block
    for _ in range(2):  # every order of the four, served from the cache: each its own blocks
        for (wired, s), blocks in want.items():
            assert found(wired, params if s == "lin" else [w1], fresh=False) == blocks
    assert len(_blocks._FOUND) >= 3 and all(_plain_values(k) and _plain_values(v) for k, v in _blocks._FOUND.items())


def test_blocks_found_before_are_not_reused_when_only_the_task_also_split_differs() -> None:
    """The same autograd structure, with a loss moved between ``losses`` and ``also``: the key (the number of
    tasks, the roots in order, their masks) tells the calls apart, so blocks found with three tasks never
    serve two tasks plus an ``also`` term."""
    from impartial.graph import _blocks

    lin, heads = nn.Linear(3, 4), [nn.Linear(4, 1) for _ in range(3)]
    x = torch.randn(5, 3)

    def found(split: int, fresh: bool) -> list:
        if fresh:
            _blocks._FOUND.clear()
        z = lin(x).tanh()
        outs = [h(z).pow(2).mean() for h in heads]
        blocks = find_blocks(outs[:split], lin.parameters(), also=outs[split:])
        return [(b.name, b.tasks, b.above, b.edge.node.name()) for b in blocks]

    want = {split: found(split, fresh=True) for split in (3, 2, 1)}
    assert want[3] and want[3] != want[2] and not want[1]  # three tasks, two (tasks differ), one: no block
    for _ in range(2):
        for split, blocks in want.items():
            assert found(split, fresh=False) == blocks


def test_draw_without_matplotlib_names_the_extra(monkeypatch, tmp_path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    x = torch.randn(4, 3)
    z = torch.nn.Linear(3, 2)(x)
    with pytest.raises(ModuleNotFoundError, match=r"impartial\[graph\]"):
        draw([z.sum(), z.pow(2).sum()], path=tmp_path / "g.png", engine="matplotlib")
