"""SGD training with momentum and a step LR schedule: seeded, deterministic on CPU, masks enforced."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from exporter.data import Dataset
from exporter.device import CPU, device_of, placed_on, resolve_device, to_device
from exporter.distributed import is_writer, parallel, same_on_every_rank, shard, world_size
from exporter.errors import ExportError
from exporter.progress import EpochProgress, line
from exporter.pruning.masks import Masks, apply_masks
from exporter.run_dir import RunDir

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("off", *AMP_DTYPES)


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run where the LR drops
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"   # where to train: auto, cpu, cuda, cuda:N or mps (exporter.device)
    amp: str = "off"       # mixed precision of the training forward: off, bf16 or fp16 (evaluation stays float32)

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self) -> dict:
        """What decides the trained weights, the key of a run directory's checkpoints: not where they were computed."""
        settings = {name: value for name, value in self.to_dict().items() if name != "device"}
        if self.amp == "off":
            del settings["amp"]  # so run directories written before --amp existed still match
        return settings

    def resolved(self) -> TrainConfig:
        """This config with its device resolved on this machine (what the manifest records); bad values refused."""
        if self.amp not in AMP_CHOICES:
            raise ExportError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        return replace(self, device=str(resolve_device(self.device)))


@dataclass
class TrainResult:
    accuracy: float
    iterations: int
    rewind_state: dict | None  # weights at the rewind iteration (on the CPU), when one was asked for


def train(model: nn.Module, data: Dataset, config: TrainConfig, masks: Masks | None = None,
          rewind_iteration: int | None = None, description: str = "train", progress: bool = True,
          resume: tuple[RunDir, str] | None = None) -> TrainResult:
    """Train `model` in place on config.device; it comes back on the CPU, where export and the structured
    step take it. With `masks`, pruned weights stay exactly zero throughout.

    With `resume` (a run directory and a checkpoint name), the state at each finished epoch is kept
    there, and a run that finds it continues after that epoch with the same result as an unbroken
    run; the caller discards it once the finished training is saved.
    """
    config = config.resolved()
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(data.train_y) // config.batch_size)
    total_steps = max(1, config.epochs * steps_per_epoch)
    milestones = sorted({int(f * total_steps) for f in config.milestones})
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")  # fp16 gradients underflow unscaled

    with placed_on(model, device):
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=config.gamma)
        device_masks = _masks_on(masks, device)
        if device_masks is not None:
            same_on_every_rank(device_masks.all())
            for name, mask in masks.all().items():  # the caller keeps (and saves) the masks trained with
                mask.copy_(device_masks.all()[name])
            apply_masks(model, device_masks)
        rewind_state = _cpu_copy(model.state_dict()) if rewind_iteration == 0 else None
        iteration, done = 0, 0
        saved = resume[0].load(resume[1]) if resume is not None else None
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            scaler.load_state_dict(saved["scaler"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["rng"])
            iteration, done, rewind_state = saved["iteration"], saved["epoch"], saved["rewind"]
            if progress and is_writer():
                line(f"{description}: resuming after epoch {done}/{config.epochs} from {resume[0].path}")
        network = parallel(model, device)  # the model itself, unless torchrun started several processes
        display = EpochProgress(description, config.epochs, steps_per_epoch, enabled=progress and is_writer())
        for epoch in range(done + 1, config.epochs + 1):
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            order = torch.randperm(len(data.train_y), generator=generator)
            for start in range(0, len(order), config.batch_size):
                if len(order) - start < world_size():
                    break  # a last batch too small to give every rank a sample
                batch = shard(order[start:start + config.batch_size])
                # contiguous: a channels-last batch meets a oneDNN bug on CPU (see exporter.data._normalized)
                x, y = to_device(data.train_x[batch].contiguous(), device), to_device(data.train_y[batch], device)
                with _autocast(config.amp, device):
                    logits = network(x)
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                if device_masks is not None:
                    apply_masks(model, device_masks)
                iteration += 1
                if iteration == rewind_iteration:
                    rewind_state = _cpu_copy(model.state_dict())
                loss_sum += loss.detach().float() * len(batch)  # summed on the device: no sync per step
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += len(batch)
                display.step(loss.detach())
            display.epoch(epoch, float(loss_sum) / max(1, seen), int(correct) / max(1, seen))
            if resume is not None and is_writer():
                resume[0].save(resume[1], {
                    "epoch": epoch, "iteration": iteration, "model": _cpu_copy(model.state_dict()),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(), "generator": generator.get_state(), "rng": torch.get_rng_state(),
                    "rewind": rewind_state})
        display.close()
        del network  # unhooks the gradient averaging before the next training wraps the model again
        same_on_every_rank(dict(model.named_buffers()))  # the last step's BN statistics, as rank 0 has them
        accuracy = evaluate(model, data.test_x, data.test_y)
    return TrainResult(accuracy=accuracy, iterations=iteration, rewind_state=rewind_state)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (float32, on the CPU) for the CPU inputs `x`, computed wherever `model` lives."""
    model.eval()
    device = device_of(model)
    return torch.cat([model(to_device(x[i:i + batch_size], device)).cpu() for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).argmax(dim=1) == y).float().mean().item()


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its initial weights fixed by `seed`."""
    torch.manual_seed(seed)
    return build()


def _autocast(amp: str, device: torch.device):
    """The training forward's mixed precision; float32 (no autocast at all) when off."""
    return contextlib.nullcontext() if amp == "off" else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _masks_on(masks: Masks | None, device: torch.device) -> Masks | None:
    if masks is None:
        return None
    return Masks(ranked={name: m.to(device) for name, m in masks.ranked.items()},
                 derived={name: m.to(device) for name, m in masks.derived.items()})


def _cpu_copy(state: dict) -> dict:
    return {name: tensor.detach().to(CPU, copy=True) for name, tensor in state.items()}
