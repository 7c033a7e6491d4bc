"""The studies leave the process as they found it: allocator setting, torch's generator, threads."""

from __future__ import annotations

import torch

from nestopt import _malloc


def test_settled_restores_the_allocator_setting_before_it():
    before = _malloc.current()
    with _malloc.settled(measuring_memory=True):
        assert _malloc.current() is True
        with _malloc.settled(measuring_memory=False):
            assert _malloc.current() is False
        assert _malloc.current() is True
    assert _malloc.current() is before


def test_hpo_seeds_its_networks_without_touching_torchs_generator():
    from nestopt.studies import hpo

    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    net = hpo.mlp((4, 3, 2), seed=7)
    assert torch.equal(torch.rand(4), expected_next)  # the global generator did not move
    torch.manual_seed(7)  # the network is the one the seed alone gives
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def test_the_controller_study_sets_one_thread_for_a_block_only():
    from nestopt.studies.controller import one_thread, train_heads

    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    run = train_heads("adamw", 0, steps=2, eval_every=1)
    assert torch.get_num_threads() == before and len(run["trace"]["step"]) == 2
