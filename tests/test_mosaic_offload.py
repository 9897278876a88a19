"""Mosaic layer by layer: the model stays in CPU memory and one decoder layer at a time visits the device,
with the same pruning and perplexity as the whole model on the device."""
import copy

import pytest
import torch
import torch.nn as nn

from exporter.mosaic.evaluate import perplexity
from exporter.mosaic.load import decoder_layers
from exporter.mosaic.offload import layers_on
from exporter.mosaic.unstructured import UnstructuredConfig, prune_unstructured
from tests.test_mosaic_unstructured import tiny_llama, windows

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def record_visits(model: nn.Module, log: list) -> None:
    """Log every move of a decoder layer, by layer index and target device."""
    for index, layer in enumerate(decoder_layers(model)):
        def to(*args, _index=index, _original=layer.to, **kwargs):
            log.append((_index, str(args[0] if args else kwargs.get("device"))))
            return _original(*args, **kwargs)
        layer.to = to


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_layer_by_layer_prunes_exactly_like_the_whole_model_and_moves_one_layer_at_a_time(pruner):
    whole, offloaded = tiny_llama(), tiny_llama()
    config = UnstructuredConfig(sparsity=0.5, pruner=pruner, granularity="projection")
    prune_unstructured(whole.to(DEVICE), windows(), config)
    moves: list = []
    record_visits(offloaded, moves)

    with layers_on(DEVICE):
        prune_unstructured(offloaded, windows(), config)

    for (name, expected), actual in zip(whole.state_dict().items(), offloaded.state_dict().values()):
        assert actual.device.type == "cpu", name  # the model never left CPU memory
        assert torch.equal(expected.cpu() == 0, actual == 0), name  # the same weights pruned
        torch.testing.assert_close(actual, expected.cpu(), rtol=1e-4, atol=1e-5)
    # Pass 1 and pass 2 each take the layers in order: to the device, then home, before the next one goes.
    assert [index for index, _ in moves] == [0, 0, 1, 1, 2, 2] * 2
    assert [device for _, device in moves] == [str(DEVICE), "cpu"] * 6


def test_layer_by_layer_perplexity_is_the_whole_models():
    model = tiny_llama()
    held_out = windows(count=3, seed=2)
    expected = perplexity(copy.deepcopy(model).to(DEVICE), held_out)

    with layers_on(DEVICE):
        actual = perplexity(model, held_out)

    assert actual == pytest.approx(expected, rel=1e-5)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
