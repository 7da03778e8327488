"""The causal-LM loss and every gradient pass built on it, against plain autograd and loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attrbench.causal_lm import IGNORE_INDEX, causal_lm_loss, trim_padding
from attrbench.tasks import Task, select

from lm_problems import tiny_gpt2_problem, tiny_llama_problem

PROBLEMS = {"gpt2": tiny_gpt2_problem, "llama": tiny_llama_problem}


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def problem(request):
    return PROBLEMS[request.param]()


def _alone(data, index: int) -> dict[str, torch.Tensor]:
    """Sample ``index`` without its padding, as a batch of one."""
    length = int(data["attention_mask"][index].sum())
    return {key: value[index : index + 1, :length] for key, value in data.items()}


def _module_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss of each sample, computed from the module's own forward pass."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return token_losses.sum(1) / (targets != IGNORE_INDEX).sum(1)


def test_loss_matches_transformers_loss(problem):
    task, train_data, _ = problem
    losses = task.per_sample_loss(task.initial_parameters(), train_data)
    for index in range(len(losses)):
        sample = _alone(train_data, index)
        expected = task.model(input_ids=sample["input_ids"], labels=sample["labels"]).loss
        # transformers computes its loss from float32 logits.
        assert torch.allclose(losses[index], expected.to(losses.dtype), rtol=1e-6), index


def test_padding_leaves_losses_unchanged(problem):
    task, _, test_data = problem
    theta = task.initial_parameters()
    padded = task.per_sample_loss(theta, test_data)
    for index in range(len(padded)):
        alone = task.per_sample_loss(theta, _alone(test_data, index))
        assert torch.allclose(padded[index], alone[0], rtol=1e-13), index


def test_trim_padding_cuts_only_shared_padding():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
        "labels": torch.tensor([[-100, 6, 7, -100, -100], [-100, 6, -100, -100, -100]]),
    }
    trimmed = trim_padding(batch)
    assert trimmed["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert trimmed["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert trimmed["labels"].shape == (2, 3)


def test_gradient_matches_module_autograd(problem):
    """functional_call re-ties the output layer to the embedding, as the module itself does."""
    task, train_data, _ = problem
    weights = torch.linspace(0.5, 1.5, len(train_data["input_ids"]), dtype=torch.float64)
    gradient, _ = task.batch_gradient(task.initial_parameters(), train_data, weights, 7.0)

    task.model.zero_grad()
    ((_module_loss(task.model, train_data) * weights).sum() / 7.0).backward()
    expected = torch.cat([p.grad.reshape(-1) for _, p in task.model.named_parameters()])
    task.model.zero_grad()
    assert torch.allclose(gradient, expected, rtol=1e-10, atol=1e-14)


def test_micro_batches_match_whole_batch(problem):
    task, train_data, _ = problem
    split = Task(task.model, causal_lm_loss, micro_batch_size=2)
    theta = task.initial_parameters()
    weights = torch.ones(len(train_data["input_ids"]), dtype=torch.float64)
    whole, whole_losses = task.batch_gradient(theta, train_data, weights, 9.0)
    pieces, piece_losses = split.batch_gradient(theta, train_data, weights, 9.0)
    assert torch.allclose(whole, pieces, rtol=1e-12, atol=1e-15)
    assert torch.allclose(whole_losses, piece_losses, rtol=1e-13)


def test_stacked_gradients_match_loop(problem):
    """Task.stacked_gradient (vmap for these models), as leave-one-out retraining runs it."""
    task, train_data, _ = problem
    generator = torch.Generator().manual_seed(1)
    base = task.initial_parameters()
    thetas = base + 0.05 * torch.randn(3, len(base), generator=generator, dtype=torch.float64)
    size = len(train_data["input_ids"])
    weights = torch.ones(3, size, dtype=torch.float64)
    weights[1, 2] = 0.0
    weights[2, 0] = 0.0
    denominators = torch.tensor([size, size, size - 1.0], dtype=torch.float64)

    assert not task.stacks_without_vmap
    gradients, stacked_losses = task.stacked_gradient(task.layout.unflatten_stack(thetas), train_data, weights,
                                                      denominators)
    stacked = task.layout.flatten_stack(gradients)
    for row in range(3):
        gradient, losses = task.batch_gradient(thetas[row], train_data, weights[row], denominators[row])
        assert torch.allclose(stacked[row], gradient, rtol=1e-10, atol=1e-14), row
        assert torch.allclose(stacked_losses[row], losses, rtol=1e-12), row


def test_hvp_and_dots_match_autograd(problem):
    task, train_data, _ = problem
    theta = task.initial_parameters()
    generator = torch.Generator().manual_seed(2)
    directions = torch.randn(3, len(theta), generator=generator, dtype=torch.float64)
    hvp, dots = task.hvp_and_sample_dots(theta, train_data, directions)

    point = theta.clone().requires_grad_(True)
    losses = task.per_sample_loss(point, train_data)
    (gradient,) = torch.autograd.grad(losses.mean(), point, create_graph=True)
    for row, direction in enumerate(directions):
        (expected_hvp,) = torch.autograd.grad(gradient @ direction, point, retain_graph=True)
        assert torch.allclose(hvp[row], expected_hvp, rtol=1e-9, atol=1e-12), row
    for index, loss in enumerate(losses):
        (sample_gradient,) = torch.autograd.grad(loss, point, retain_graph=True)
        assert torch.allclose(dots[:, index], directions @ sample_gradient, rtol=1e-10, atol=1e-12), index


def test_sample_gradients_match_loop(problem):
    """vmap over samples: each row is seen without the batch, so no padding can be cut."""
    task, _, test_data = problem
    theta = task.initial_parameters()
    gradients = task.sample_gradients(theta, test_data)
    for index in range(len(gradients)):
        point = theta.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(task.per_sample_loss(point, _alone(test_data, index))[0], point)
        assert torch.allclose(gradients[index], expected, rtol=1e-10, atol=1e-14), index


def test_sequence_longer_than_model_is_rejected():
    task, train_data, _ = tiny_gpt2_problem()
    long = {key: value.repeat(1, 3) for key, value in select(train_data, torch.arange(2)).items()}
    with pytest.raises(ValueError, match="exceed the model's 16 positions"):
        causal_lm_loss(task.model, dict(task.model.named_parameters()), long)
