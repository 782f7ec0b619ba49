"""Real transformers models from tiny configs (random init, no download): the activation
inside every MLP block is observed (library activation modules such as GPT-2's
``NewGELUActivation`` and Llama's ``SiLUActivation``), and a short healthy run has no
false alarm."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gradwatch.adapters.torch import every  # noqa: E402

import gradwatch  # noqa: E402

LAYERS = 2


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=32, n_head=2, vocab_size=64)
    return transformers.GPT2LMHeadModel(config)


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return transformers.LlamaForCausalLM(config)


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        num_hidden_layers=LAYERS,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=64,
    )
    return transformers.BertForMaskedLM(config)


# Where each model's MLP activation lives, per block, and its kind.
MODELS = {
    "gpt2": (_gpt2, "transformer.h.{}.mlp", "gelu"),
    "llama": (_llama, "model.layers.{}.mlp", "silu"),
    "bert": (_bert, "bert.encoder.layer.{}.intermediate", "gelu"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_mlp_block_has_an_observed_activation_and_no_false_alarm(name: str) -> None:
    build, block, kind = MODELS[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 12), generator=gen)
    gw = gradwatch.watch(
        model,
        opt,
        on_finding="ignore",
        show=False,
        strict=True,
        grad_schedule=every(1),
        activation_schedule=every(1),
    )
    seen: dict[str, str] = {}
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # a validation forward: never observed
    report = gw.report(show=False)
    seen = dict(gw._acts.observed)
    gw.close()
    for i in range(LAYERS):
        sites = [s for s, k in seen.items() if s.startswith(block.format(i) + ".") and k == kind]
        assert sites, (i, sorted(seen))
    cov = report.coverage
    assert cov is not None
    assert cov.activation_sites.get(kind, 0) >= LAYERS
    assert cov.activation_modules_not_observed == ()
    assert not any("No activation" in note for note in report.notes)
    assert report.problems == (), [f.message for f in report.problems]
    assert gradwatch.Report.from_json(report.to_json()) == report
