"""Recovery after composite pruning: a masked fine-tune on calibration text that keeps every pruned zero."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exporter.mosaic.recovery import RecoveryConfig, mean_loss, recover


def pruned_tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer LLaMA, trained nowhere, with half of every projection's weights zeroed."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=32, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                linear.weight[torch.rand_like(linear.weight) < 0.5] = 0.0
    return model


def calibration_text() -> torch.Tensor:
    """Token windows with structure to learn: a repeating pattern with a little noise."""
    generator = torch.Generator().manual_seed(1)
    pattern = torch.arange(3, 19).repeat(4)[:48]
    windows = pattern.repeat(8, 1)
    noise = torch.rand(windows.shape, generator=generator) < 0.05
    return torch.where(noise, torch.randint(0, 32, windows.shape, generator=generator), windows)


def test_recovery_lowers_the_loss_on_its_calibration_text_and_keeps_every_pruned_weight_zero():
    model, calib = pruned_tiny_llama(), calibration_text()
    zeros = {name: p == 0 for name, p in model.named_parameters() if p.dim() == 2 and "layers" in name}
    untouched = {name: p.clone() for name, p in model.named_parameters() if "layers" not in name or p.dim() == 1}

    report = recover(model, calib, RecoveryConfig(steps=60, lr=3e-3, batch_windows=2))

    assert report.loss_after < 0.8 * report.loss_before
    assert report.loss_after == pytest.approx(mean_loss(model, calib))
    for name, p in model.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), f"{name} lost a pruned zero"
        if name in untouched:
            assert torch.equal(p, untouched[name]), f"{name} was trained"
    assert all(p.requires_grad for p in model.parameters())  # left as found


def test_recovery_is_deterministic_and_zero_steps_change_nothing():
    calib = calibration_text()
    first, second, idle = pruned_tiny_llama(), pruned_tiny_llama(), pruned_tiny_llama()
    before = copy.deepcopy(idle.state_dict())
    recover(first, calib, RecoveryConfig(steps=5, lr=1e-3))
    recover(second, calib, RecoveryConfig(steps=5, lr=1e-3))
    report = recover(idle, calib, RecoveryConfig(steps=0))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert all(torch.equal(before[k], v) for k, v in idle.state_dict().items())
    assert report.loss_before == report.loss_after


@pytest.mark.parametrize("config, problem", [(RecoveryConfig(steps=-1), "steps must be >= 0"),
                                             (RecoveryConfig(lr=0.0), "learning rate must be > 0"),
                                             (RecoveryConfig(batch_windows=0), "at least one window")])
def test_bad_recovery_settings_are_refused(config, problem):
    with pytest.raises(ValueError, match=problem):
        recover(pruned_tiny_llama(), calibration_text(), config)
