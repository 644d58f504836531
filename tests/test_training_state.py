"""A training state file is read as plain data: a planted pickle that would run code is refused in one
line before anything is loaded, and a real state (tensors, optimizer state, config) still resumes."""
import pickle

import pytest
import torch

import opd_dist
import opd_train_fsdp
from opd_data import OpdInputError


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_planted_state_file_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / opd_train_fsdp.STATE).write_bytes(pickle.dumps({"config": {}, "x": _RunsCode(marker)}))
    with pytest.raises(OpdInputError, match=r"state\.pt is not a plain tensor state .*--fresh") as err:
        opd_dist.check_resume(tmp_path, {"lr": 1e-4}, fresh=False)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_real_state_file_still_resumes(tmp_path):
    ident = {"lr": 1e-4, "loss": "kl", "targets": ["q_proj"]}
    state = {"model": {"w.A": torch.randn(4, 2)}, "config": ident, "step": 3, "losses": [1.0, 0.5],
             "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4, 2)}},
                       "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0], "foreach": None}]}}
    torch.save(state, tmp_path / opd_train_fsdp.STATE)
    back = opd_dist.check_resume(tmp_path, ident, fresh=False)
    assert back["optim"]["param_groups"][0]["betas"] == (0.9, 0.999) and torch.equal(back["model"]["w.A"], state["model"]["w.A"])
    with pytest.raises(OpdInputError, match="other settings"):
        opd_dist.check_resume(tmp_path, {**ident, "lr": 2e-4}, fresh=False)
