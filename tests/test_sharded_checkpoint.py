"""Sharded checkpoints (``distill.sharded_checkpoint``) in one process: a round trip of weights and optimizer
state, a tied embedding stored once, and a planted pickle, in the metadata or in an entry, refused in one line
without running it. The multi-process behaviour (FSDP shards, resume under another world size, export) is in
test_distributed.py."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from distill import sharded_checkpoint as sc
from distill.distributed import Dist
from refine.core.errors import InputError


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model, opt = _model_and_optimizer(0)
    step = tmp_path / "checkpoints" / "step_0000001"
    sc.save(Dist(), model, opt, step, lambda tmp: (tmp / "rest.txt").write_text("rank 0's files"))
    return step, model, opt


def test_round_trip(tmp_path):
    step, model, opt = _saved(tmp_path)
    assert sc.is_sharded(step) and (step / "rest.txt").is_file()
    assert [p.name for p in step.parent.iterdir()] == ["step_0000001"]            # no temporary left
    other, other_opt = _model_and_optimizer(1)
    sc.load(other, other_opt, step)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, s in sa["state"].items():
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in s.items())


class _Tied(torch.nn.Module):
    """An embedding and an LM head that share one weight, as tied HF models do."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.mid(self.embed(ids)))


def _tied(seed: int):
    torch.manual_seed(seed)
    model = _Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    return model, opt


def test_a_tied_weight_is_stored_once_and_loads_under_both_names(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _tied(0)
    sc.save(Dist(), model, opt, tmp_path / "new", lambda tmp: None)
    stored = sc.SafeReader(tmp_path / "new" / sc.DCP_DIR).read_metadata().state_dict_metadata
    assert "model.embed.weight" in stored and "model.head.weight" not in stored
    old = tmp_path / "old" / sc.DCP_DIR               # as written before: the shared tensor under both names
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt), strict=True)), checkpoint_id=old)
    assert "model.head.weight" in sc.SafeReader(old).read_metadata().state_dict_metadata
    for step in (tmp_path / "new", tmp_path / "old"):
        other, other_opt = _tied(1)
        sc.load(other, other_opt, step)
        assert other.head.weight is other.embed.weight
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
        head_only = _Tied()
        sc.load(head_only, None, step)
        assert torch.equal(head_only.head.weight, model.embed.weight)


class _Planted:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_planted_pickle_is_refused_unrun(tmp_path):
    step, model, opt = _saved(tmp_path)
    ran = tmp_path / "ran"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_Planted(ran)))
    with pytest.raises(InputError, match=r"refusing .*\.metadata: posix\.system is not part of a checkpoint"):
        sc.load(model, opt, step)
    assert not ran.exists()


def _dotted_global(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module``.``name``(arg): STACK_GLOBAL resolves a dotted ``name``."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


@pytest.mark.parametrize("module,name", [("torch.distributed.checkpoint.filesystem", "os.system"),
                                         ("torch.distributed.checkpoint.metadata", "torch.load"),
                                         ("torch", "os.system")])
def test_a_dotted_name_through_an_admitted_module_is_refused_unrun(tmp_path, module, name):
    """Before, whole DCP modules were admitted, and ``filesystem`` + ``os.system`` came back as os.system: a
    100-byte ``.metadata`` ran a shell command. Only exact (module, name) pairs pass now."""
    step, model, opt = _saved(tmp_path)
    ran = tmp_path / "ran"
    payload = _dotted_global(module, name, f"touch {ran}")
    (step / "dcp" / ".metadata").write_bytes(payload)
    with pytest.raises(InputError, match=rf"refusing .*\.metadata: {module}\.{name} is not part of a checkpoint"):
        sc.load(model, opt, step)
    assert not ran.exists()


def test_a_planted_entry_is_refused_unrun(tmp_path):
    """DCP stores non-tensor entries (here the optimizer's learning rate) as pickles and reads them with
    ``weights_only=False``; we do not."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _model_and_optimizer(0)
    ran = tmp_path / "ran"
    model_sd, optim_sd = get_state_dict(model, opt)
    optim_sd["param_groups"][0]["lr"] = _Planted(ran)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "step" / sc.DCP_DIR)
    with pytest.raises(InputError, match="refusing .*dcp: Weights only load failed"):
        sc.load(model, opt, tmp_path / "step")
    assert not ran.exists()
