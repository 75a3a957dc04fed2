"""torchrun / DistributedDataParallel training on CPU (gloo): sharded samplers, and real 2-process runs of
`braintumor train` that must agree across ranks, write once, resume exactly and load in single-process code."""

import csv
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from braintumor.train.datasets import BalancedSampler, ShardedSampler, ShuffleSampler
from braintumor.train.distributed import DistContext, distributed, env_context
from braintumor.train.trainer.checkpoint import load_checkpoint, load_model

# Runs on every rank: the real CLI, with AlternatingTrainer.fit wrapped to (a) stop after BT_STOP_AFTER epochs as
# an interruption right after a checkpoint would, and (b) record the rank's final state and one extra
# classification step's gradients (not applied) in BT_REPORT/rank<r>.json.
WORKER = r'''
import hashlib, json, os, sys
import torch
from braintumor.serving.cli import main
from braintumor.train.trainer.engine import AlternatingTrainer

def digest(tensors):
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode()); h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

fit = AlternatingTrainer.fit

def recording_fit(self, start_epoch, epochs):
    fit(self, start_epoch, min(epochs, int(os.environ.get("BT_STOP_AFTER", epochs))))
    report = {"rank": self.dist.rank, "world": self.dist.world_size, "callbacks": len(self.callbacks),
              "validates": self.validate is not None, "ddp": type(self.net).__name__,
              "state": digest(sorted(self.model.state_dict().items()))}
    step = self.steps["cls"]
    loss, _ = step.loss(self.net, self._to_device(step.next_batch()))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    report["unused_grads_none"] = all(p.grad is None for m in (self.model.decoder, self.model.segmentation_head)
                                      for p in m.parameters())
    report["grads"] = digest([(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None])
    with open(os.path.join(os.environ["BT_REPORT"], f"rank{self.dist.rank}.json"), "w") as fh:
        json.dump(report, fh)

AlternatingTrainer.fit = recording_fit
sys.exit(main(sys.argv[1:]))
'''


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _torchrun(tmp, data, out, *extra, epochs=1, stop_after=None, nproc=2):
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    report = tmp / f"report-{out.name}-{stop_after}"
    report.mkdir()
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun_vars}
    env.update(BT_REPORT=str(report), OMP_NUM_THREADS="1")
    if stop_after:
        env["BT_STOP_AFTER"] = str(stop_after)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(worker),
           "train", "--data", str(data), "--out", str(out), "--encoder", "test_resnet", "--image-size", "32",
           "--batch-size", "4", "--epochs", str(epochs), "--device", "cpu", "--no-progress",
           "--cache-dir", str(tmp / "cache"), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(nproc)]
    return proc, ranks


@pytest.fixture
def synthetic_root(tmp_path):
    from braintumor.train.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "data", n_per_class=8, size=(40, 36))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_rebuild_the_single_process_batches(world):
    targets = np.array([0] * 30 + [1] * 7 + [2] * 5 + [3] * 8)
    for inner in (BalancedSampler(targets, np.arange(50), 50, seed=3), ShuffleSampler(np.arange(4, 41), seed=3)):
        inner.set_epoch(5)
        full = list(inner)
        shards = [ShardedSampler(inner, r, world) for r in range(world)]
        for s in shards:
            s.set_epoch(5)
        drawn = [list(s) for s in shards]
        assert len({len(d) for d in drawn}) == 1 and len(drawn[0]) == len(full) // world == len(shards[0])
        positions = [list(range(r, len(drawn[0]) * world, world)) for r in range(world)]
        assert [[full[i] for i in pos] for pos in positions] == drawn  # disjoint positions of one global draw
        bs = 4  # the k-th batches of all ranks together are the k-th global batch of world * bs
        for k in range(len(drawn[0]) // bs):
            together = sorted(x for d in drawn for x in d[k * bs:(k + 1) * bs])
            assert together == sorted(full[k * bs * world:(k + 1) * bs * world])


def test_outside_torchrun_nothing_is_initialised(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_context() == DistContext()
    with distributed("auto") as (ctx, device):
        assert not ctx.enabled and ctx.is_main and device is None
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_context() == DistContext(3, 4, 1) and not env_context().is_main


def test_two_ranks_agree_and_rank0_writes_one_loadable_run(synthetic_root, tmp_path):
    run = tmp_path / "run"
    proc, ranks = _torchrun(tmp_path, synthetic_root, run)
    assert proc.stdout.count("done:") == 1
    assert {p.name for p in run.iterdir()} == {"last.pt", "best.pt", "config.yaml", "history.csv", "val_split.csv"}
    with open(run / "history.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1"]

    assert [r["world"] for r in ranks] == [2, 2] and {r["ddp"] for r in ranks} == {"DistributedDataParallel"}
    assert [(r["callbacks"] > 0, r["validates"]) for r in ranks] == [(True, True), (False, False)]
    # Weights and buffers identical on both ranks, equal to rank 0's checkpoint.
    state = load_checkpoint(run / "last.pt")
    assert ranks[0]["state"] == ranks[1]["state"] == _digest(state["model"])
    # A classification step: all-reduced gradients identical, the segmentation side untouched (None, as in one process).
    assert ranks[0]["grads"] == ranks[1]["grads"]
    assert all(r["unused_grads_none"] for r in ranks)

    model, _ = load_model(run / "best.pt")  # plain single-process code, no "module." prefixes
    logits, masks = model(torch.zeros(2, 1, 32, 32))
    assert logits.shape == (2, 4) and masks.shape == (2, 1, 32, 32)


@pytest.mark.slow
def test_resume_under_torchrun_is_bit_for_bit(synthetic_root, tmp_path):
    tmp, data = tmp_path, synthetic_root
    _torchrun(tmp, data, tmp / "straight", epochs=2)
    _torchrun(tmp, data, tmp / "resumed", epochs=2, stop_after=1)
    assert load_checkpoint(tmp / "resumed" / "last.pt")["epoch"] == 1
    _, resumed = _torchrun(tmp, data, tmp / "resumed", "--resume", epochs=2)
    a, b = (load_checkpoint(tmp / name / "last.pt") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    assert _digest(a["model"]) == _digest(b["model"]) == resumed[0]["state"] == resumed[1]["state"]

    def rows(name):
        with open(tmp / name / "history.csv") as fh:
            return [(r["epoch"], r["train_cls_loss"], r["train_seg_loss"], r["val_score"]) for r in csv.DictReader(fh)]

    assert rows("straight") == rows("resumed")
