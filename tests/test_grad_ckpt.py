"""Gradient checkpointing: same loss and gradients bit for bit, same parameter names, right blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resilient_train.errors import UsageError
from resilient_train.grad_ckpt import blocks_to_checkpoint, enable_gradient_checkpointing


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.3), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(0.2)

    def forward(self, x, scale: float = 1.0):
        return x + scale * self.drop(self.ff(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.inp(x)
        for i, block in enumerate(self.blocks):
            h = block(h, scale=0.5 + i)
        return self.head(h).pow(2).mean()


class NamedBlocks(nn.Module):
    """No ModuleList: the blocks are plain attributes, found only by class name."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Block(16)
        self.second = Block(16)
        self.inp = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.second(self.first(self.inp(x)))).pow(2).mean()


def _loss_and_grads(model: nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(4, 8)
    model.train()
    loss = model(x)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same_loss_and_grads(plain: nn.Module, wrapped: nn.Module) -> None:
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(wrapped)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_checkpointed_model_gives_identical_loss_and_gradients_with_dropout():
    torch.manual_seed(1)
    plain = Stack()
    wrapped = copy.deepcopy(plain)
    enable_gradient_checkpointing(wrapped)
    _assert_same_loss_and_grads(plain, wrapped)


def test_checkpointing_actually_recomputes_the_blocks_in_backward():
    torch.manual_seed(1)
    model = Stack()
    enable_gradient_checkpointing(model)
    calls = []
    model.blocks[0].ff.register_forward_hook(lambda *_: calls.append(1))
    _loss_and_grads(model)
    assert len(calls) == 2  # once in forward, once recomputed in backward


def test_dropout_is_really_active_so_the_equality_is_meaningful():
    torch.manual_seed(1)
    model = Stack().train()
    x = torch.randn(4, 8)
    assert not torch.equal(model(x), model(x))


def test_wrapping_does_not_change_state_dict_keys_or_values():
    torch.manual_seed(1)
    plain = Stack()
    wrapped = copy.deepcopy(plain)
    enable_gradient_checkpointing(wrapped)
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, wrapped.state_dict()[key])
    # a checkpoint of one loads into the other
    wrapped.load_state_dict(plain.state_dict(), strict=True)


def test_enable_wraps_every_modulelist_child_and_describes_it():
    model = Stack(depth=4)
    description = enable_gradient_checkpointing(model)
    assert "4 block(s)" in description and "Block" in description
    assert all("forward" in vars(block) for block in model.blocks)
    assert "forward" not in vars(model.inp)


def test_enabling_twice_is_harmless():
    torch.manual_seed(1)
    plain = Stack()
    wrapped = copy.deepcopy(plain)
    enable_gradient_checkpointing(wrapped)
    enable_gradient_checkpointing(wrapped)
    _assert_same_loss_and_grads(plain, wrapped)


def test_blocks_named_by_class_are_wrapped_without_a_modulelist():
    torch.manual_seed(2)
    plain = NamedBlocks()
    wrapped = copy.deepcopy(plain)
    description = enable_gradient_checkpointing(wrapped, class_names=["Block"])
    assert "2 block(s)" in description
    assert {id(b) for b in blocks_to_checkpoint(wrapped, ["Block"])} == {id(wrapped.first), id(wrapped.second)}
    assert "forward" in vars(wrapped.first) and "forward" in vars(wrapped.second)
    _assert_same_loss_and_grads(plain, wrapped)


def test_only_the_outermost_matching_modules_are_wrapped():
    model = Stack()
    chosen = blocks_to_checkpoint(model, class_names=["Block", "Linear", "Sequential"])
    # Blocks come from the ModuleList; their inner Sequential/Linear are inside them and skipped;
    # the top-level Linear layers are outside any block and match by class name.
    assert {id(m) for m in chosen} == {id(b) for b in model.blocks} | {id(model.inp), id(model.head)}


def test_model_without_blocks_is_a_usage_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(UsageError, match="checkpoint_modules"):
        enable_gradient_checkpointing(model)


def test_class_names_that_match_nothing_are_a_usage_error():
    with pytest.raises(UsageError):
        enable_gradient_checkpointing(NamedBlocks(), class_names=["NoSuchBlock"])


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2)])
        self.calls = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(gradient_checkpointing_kwargs)


class OldHFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def gradient_checkpointing_enable(self):
        self.calls += 1


def test_models_own_gradient_checkpointing_enable_is_called_instead_of_wrapping():
    model = HFStyle()
    description = enable_gradient_checkpointing(model)
    assert model.calls == [{"use_reentrant": False}]
    assert "gradient_checkpointing_enable" in description
    assert "forward" not in vars(model.layers[0])


def test_models_own_enable_without_kwargs_is_called_plainly():
    model = OldHFStyle()
    enable_gradient_checkpointing(model)
    assert model.calls == 1


def test_wrapped_forward_works_under_no_grad_and_matches_the_plain_model():
    torch.manual_seed(3)
    plain = Stack()
    wrapped = copy.deepcopy(plain)
    enable_gradient_checkpointing(wrapped)
    plain.eval()
    wrapped.eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        out_plain = plain(x)
        out_wrapped = wrapped(x)
    assert not out_wrapped.requires_grad
    assert torch.equal(out_plain, out_wrapped)


def test_wrapped_forward_in_train_mode_under_no_grad_matches_with_the_same_seed():
    torch.manual_seed(3)
    plain = Stack()
    wrapped = copy.deepcopy(plain)
    enable_gradient_checkpointing(wrapped)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.manual_seed(9)
        out_plain = plain(x)
        torch.manual_seed(9)
        out_wrapped = wrapped(x)
    assert torch.equal(out_plain, out_wrapped)


def test_keyword_arguments_reach_the_wrapped_block():
    torch.manual_seed(4)
    block = Block(16)
    twin = copy.deepcopy(block)
    holder = nn.Module()
    holder.blocks = nn.ModuleList([twin])
    enable_gradient_checkpointing(holder)
    x = torch.randn(2, 16, requires_grad=True)
    block.eval()
    twin.eval()
    assert torch.equal(block(x, scale=3.0), twin(x, scale=3.0))
