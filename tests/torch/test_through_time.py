"""The gradient through time of nn.RNN / nn.LSTM / nn.GRU: measured on sampled training
steps like plain hooks measure it, a long plain RNN reported with ``gated_recurrence``
first, its gated and short twins quiet; the model computes exactly what it computed
unwatched, and no hook outlives its step, the watch or a copy of the model."""

from __future__ import annotations

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402
from torch_helpers import record_stats, watch_every_step  # noqa: E402

import gradwatch  # noqa: E402

FEATURES, HIDDEN, BATCH = 3, 16, 8


class Reader(nn.Module):
    """An embedding-like projection (so the recurrent input carries a gradient upstream
    when ``project``), a recurrent layer, and a head on its last output."""

    def __init__(
        self,
        cell: type[nn.RNNBase] = nn.RNN,
        *,
        batch_first: bool = True,
        bidirectional: bool = False,
        num_layers: int = 1,
        project: bool = False,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, FEATURES) if project else None
        self.rnn = cell(
            FEATURES,
            HIDDEN,
            num_layers=num_layers,
            batch_first=batch_first,
            bidirectional=bidirectional,
        )
        self.batch_first = batch_first
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x)
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


def _batches(length: int, batch_first: bool = True, seed: int = 0, n: int = 40) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, length, FEATURES, generator=gen)
        y = (x[:, -5:, 0].sum(dim=1) > 0).long()
        out.append((x if batch_first else x.transpose(0, 1).contiguous(), y))
    return out


def _train(model: nn.Module, data: list, gw: object = None) -> list[torch.Tensor]:
    """Adam steps over ``data``; returns each step's logits."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if gw == "watch":
        gw = watch_every_step(model, opt, strict=True)
    outputs = []
    for x, y in data:
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
        outputs.append(logits.detach())
    return outputs


def _plain_ratio_records(model: Reader, data: list) -> list[tuple[float, float]]:
    """(RMS dL/dx_1, RMS dL/dx_T) of the recurrent layer's input per step, by a plain
    forward pre-hook (no gradwatch): ``retain_grad`` on an input that carries a graph,
    a leaf copy of one that does not."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    axis = 1 if model.batch_first else 0
    seen: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple) -> tuple:
        x = args[0] if args[0].requires_grad else args[0].detach().requires_grad_()
        x.retain_grad()
        seen.append(x)
        return (x, *args[1:])

    handle = model.rnn.register_forward_pre_hook(keep)
    records = []
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()
        g = seen.pop().grad.double()
        first, last = g.select(axis, 0), g.select(axis, -1)
        records.append((float(first.pow(2).mean().sqrt()), float(last.pow(2).mean().sqrt())))
        opt.step()
        opt.zero_grad()
    handle.remove()
    return records


def test_a_long_plain_rnn_is_reported_with_gated_recurrence_first() -> None:
    torch.manual_seed(0)
    model = Reader(nn.RNN)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opened: list[gradwatch.Finding] = []
    gw = gradwatch.watch(model, opt, on_finding=opened.append, show=False, strict=True)
    for x, y in _batches(200):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    gw.close()
    found = {f.rule: f for f in opened}  # as the user gets them: torch spellings
    finding = found["vanishing_gradient"]
    assert finding.layers == ("rnn",)
    assert finding.fixes[0].id == "gated_recurrence"
    assert "nn.LSTM" in finding.fixes[0].text and "keras" not in finding.fixes[0].text
    assert finding.evidence["time_steps"] == 200
    assert finding.evidence["through_time_ratio"] < 1e-5
    assert "the first of 200 time steps of rnn" in finding.message


@pytest.mark.parametrize(("cell", "length"), [(nn.LSTM, 200), (nn.GRU, 200), (nn.RNN, 10)])
def test_gated_layers_and_a_short_rnn_stay_quiet(cell: type[nn.RNNBase], length: int) -> None:
    torch.manual_seed(0)
    model = Reader(cell)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gw = gradwatch.watch(model, opt, on_finding="ignore", show=False, strict=True)
    for x, y in _batches(length):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    findings = gw.findings
    measured = gw.analyzer.stats.time.view()
    gw.close()
    assert measured.columns == ("rnn",)  # measured, and judged quiet
    assert measured["length"][-1, 0] == length
    assert "vanishing_gradient" not in {f.rule for f in findings}


@pytest.mark.parametrize(
    "config",
    [
        {"batch_first": True},
        {"batch_first": False},
        {"batch_first": True, "bidirectional": True},
        {"batch_first": False, "num_layers": 2},
        {"batch_first": True, "project": True},
    ],
    ids=["batch_first", "time_first", "bidirectional", "two_layers", "input_with_grad"],
)
def test_the_measurement_is_the_plain_input_gradient(config: dict) -> None:
    data = _batches(30, batch_first=config["batch_first"], n=6)
    torch.manual_seed(1)
    plain = _plain_ratio_records(Reader(nn.GRU, **config), data)
    torch.manual_seed(1)
    model = Reader(nn.GRU, **config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gw = watch_every_step(model, opt, strict=True)
    seen = record_stats(gw)
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    gw.close()
    got = [(s.time_grad_first[0], s.time_grad_last[0]) for s in seen if s.time_layers]
    assert [s.time_layers for s in seen if s.time_layers] == [("rnn",)] * len(data)
    assert {s.time_length for s in seen if s.time_layers} == {(30,)}
    assert [v for pair in got for v in pair] == pytest.approx(
        [v for pair in plain for v in pair], rel=1e-5
    )


@pytest.mark.parametrize("project", [False, True])
def test_outputs_and_every_gradient_are_bit_identical_to_an_unwatched_run(project: bool) -> None:
    data = _batches(50, n=5)

    def run(watched: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(3)
        model = Reader(nn.LSTM, bidirectional=True, project=project)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gw = watch_every_step(model, opt, strict=True) if watched else None
        outputs, grads = [], []
        for x, y in data:
            leaf = x.clone().requires_grad_()  # the gradient reaching the data, too
            logits = model(leaf)
            nn.functional.cross_entropy(logits, y).backward()
            outputs.append(logits.detach().clone())
            grads += [p.grad.clone() for p in model.parameters()] + [leaf.grad.clone()]
            opt.step()
            opt.zero_grad()
        if gw is not None:
            gw.flush()
            assert gw.analyzer.stats.time.view().n_steps == len(data)  # it did measure
            gw.close()
        return outputs, grads

    (out_a, grad_a), (out_b, grad_b) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grad_a, grad_b, strict=True))


def _pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_live_only_on_sampled_steps_and_are_gone_after_close() -> None:
    torch.manual_seed(0)
    model = Reader(nn.RNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    baseline = _pre_hooks(model.rnn)
    gw = gradwatch.watch(
        model, opt, grad_schedule=gradwatch.every(2, dense_until=0), on_finding="ignore", show=False
    )
    counts = []
    for x, y in _batches(20, n=4):
        counts.append(_pre_hooks(model.rnn) - baseline)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    gw.close()
    assert counts == [1, 0, 1, 0]
    assert _pre_hooks(model.rnn) == baseline


def test_validation_forwards_and_packed_sequences_are_not_measured() -> None:
    torch.manual_seed(0)
    model = Reader(nn.GRU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = watch_every_step(model, opt, strict=True)
    seen = record_stats(gw)
    (x, y), (xv, _) = _batches(20, n=2)
    model.eval()
    model(xv).sum().backward()  # an eval-mode forward (and backward) on a sampled step
    model.train()
    with torch.no_grad():
        model(xv)
    opt.zero_grad()
    packed = pack_padded_sequence(x, torch.full((BATCH,), 20), batch_first=True)
    out, _ = model.rnn(packed)
    out.data.sum().backward()
    opt.step()  # step 0: eval, no_grad and packed forwards only
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # step 1: a training forward
    report = gw.report(show=False)
    gw.close()
    assert [s.step for s in seen if s.time_layers] == [1]
    assert any("PackedSequence" in note for note in report.notes)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_mid_run_carry_no_hook_and_never_feed_the_watch(how: str) -> None:
    torch.manual_seed(0)
    model = Reader(nn.RNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    baseline = _pre_hooks(model)
    gw = watch_every_step(model, opt, strict=True)
    data = _batches(20, n=3)
    for x, y in data[:2]:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert _pre_hooks(model) > baseline  # a sampled step: the tap's hook is attached
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert _pre_hooks(copied) == baseline
    gw.flush()
    before = gw.analyzer.stats.time.view().n_steps
    x, y = data[2]
    nn.functional.cross_entropy(copied(x), y).backward()
    assert torch.equal(copied(x), model(x))
    gw.flush()
    assert gw.analyzer.stats.time.view().n_steps == before
    gw.close()
