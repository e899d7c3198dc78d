"""Data-parallel learners through ``torch.distributed``: one process per rank, started by ``torchrun``.

A run with ``world_size`` ranks keeps the meaning of every hyperparameter: ``env.num_envs`` is still the
whole batch's width (the papers' B or m); each rank steps ``env.num_envs / world_size`` of those envs
with its own seeds, computes its part of each loss, and the gradients are summed over ranks before
every optimiser step; rank 0 logs, evaluates and writes the checkpoints (see ``aclab.train``).

The contract, tested rank for rank against one process (``tests/test_distributed.py``): with the same
data, ``world_size`` ranks holding ``N / world_size`` envs each make the same update as one process with
``N`` envs, up to float rounding. What that takes:

* **Minibatches.** Every rank draws the same permutation of the *whole* batch (a generator shared by
  the ranks, :attr:`DataParallel.generator`), cuts it into the single process's minibatches, and keeps
  the part it holds. A minibatch mean is then ``sum_k (n_k / n) mean_k`` over ranks ``k`` holding
  ``n_k`` of its ``n`` items, so a rank scales its gradient by its share ``n_k / n`` (the minibatch's
  ``weight``) before the all-reduce sums them (:meth:`DataParallel.backward`). A rank may hold no item of
  a small minibatch: it still runs the minibatch's code (the statistics below are collectives), and its
  gradient is zero.
* **Statistics over a minibatch or the batch** that change the update are computed over all ranks:
  advantage normalisation (:meth:`normalize`), FixPO's max (or mean) KL and its fixup exit test
  (:meth:`max`, :meth:`mean`), PPO's target-KL early stop (:meth:`minibatch_mean`), DNA's warm-up
  length. Logged diagnostics (losses, clip fractions, value bias...) are rank 0's own.
* **Normalisers.** The env layer's observation and reward normalisers merge their batch moments over the
  ranks at every step (:meth:`merge_moments`), so every rank normalises with the statistics of all
  ``N`` envs.
* **Summed losses** (IMPALA, STAC) sum their gradients over ranks; a ``mean`` reduction weights each
  rank by its share of the valid steps. STAC's meta-gradient differentiates through the all-reduce of the
  inner gradient (:meth:`reduce_gradients` with ``differentiable=True``): ``theta'`` is the single
  learner's, and summing the ranks' outer-loss gradients gives the single learner's meta-gradient.

With one process (no ``torchrun``) every method is the plain single-process operation (the same calls in
the same order), so single-process runs are unchanged bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from aclab.core import losses
from aclab.data.rollout import shuffled_minibatches

RANK_SEED_STRIDE = 1_000_003  # rank r's envs and acting use seed + r * stride (rank 0: the run's seed)
SHUFFLE_SEED_OFFSET = 7_777_777  # the shared minibatch generator: seed + offset on every rank


class Minibatch(dict):
    """One minibatch as this rank holds it: ``name -> tensor [n_k, ...]`` plus ``weight = n_k / n``, this
    rank's share of the whole minibatch (1.0 in a single process)."""

    def __init__(self, data: dict, weight: float = 1.0):
        super().__init__(data)
        self.weight = weight


class DataParallel:
    """This process's place in a data-parallel learner; with ``world_size = 1`` (the default) every
    method is the single-process operation.

    ``group``: the process group of the gradients (NCCL on GPUs, gloo on CPU); ``cpu_group``: a gloo
    group for the small host-side collectives (statistics, counters, objects). ``seed`` seeds
    :attr:`generator`, the minibatch permutations shared by every rank.
    """

    def __init__(self, world_size: int = 1, rank: int = 0, seed: int = 0, group=None, cpu_group=None,
                 device: torch.device | str = "cpu"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.world_size, self.rank = world_size, rank
        self.enabled = world_size > 1
        self.group, self.cpu_group = group, cpu_group
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed + SHUFFLE_SEED_OFFSET)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DataParallel(rank {self.rank} of {self.world_size})"

    # ------------------------------------------------------------------ layout
    def local_envs(self, num_envs: int) -> int:
        """This rank's number of envs (``num_envs`` must be a multiple of the world size)."""
        if num_envs % self.world_size:
            raise ValueError(f"env.num_envs={num_envs} is not a multiple of the world size {self.world_size}")
        return num_envs // self.world_size

    def rank_seed(self, seed: int) -> int:
        """The seed of this rank's envs and acting (rank 0 keeps the run's seed)."""
        return seed + RANK_SEED_STRIDE * self.rank

    # ------------------------------------------------------------------ collectives
    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        y = x.detach().clone()
        group = self.cpu_group if y.device.type == "cpu" else self.group
        dist.all_reduce(y, op=op, group=group)
        return y

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (``x`` itself with one process)."""
        if not self.enabled:
            return x
        return self._reduce(x, dist.ReduceOp.SUM)

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return self._reduce(x, dist.ReduceOp.MAX)

    def sum_int(self, value: int) -> int:
        """A host integer summed over ranks."""
        return int(self.all_sum(torch.tensor([value], dtype=torch.int64)).item()) if self.enabled else int(value)

    def max_int(self, value: int) -> int:
        return int(self.all_max(torch.tensor([value], dtype=torch.int64)).item()) if self.enabled else int(value)

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on some rank (decisions every rank must take together)."""
        return self.max_int(int(bool(flag))) > 0 if self.enabled else bool(flag)

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (a list in rank order), None on the other ranks."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def all_gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def scatter_objects(self, objs: list | None):
        """Rank 0's ``objs[k]`` on rank ``k`` (``objs`` is only read on rank 0)."""
        if not self.enabled:
            return objs[0]
        box = [None]
        dist.scatter_object_list(box, objs if self.is_main else None, src=0, group=self.cpu_group)
        return box[0]

    # ------------------------------------------------------------------ checkpoints and episodes
    def gather_checkpoint(self, state: dict) -> dict | None:
        """On rank 0: rank 0's ``state`` plus ``"ranks"``, the other ranks' states (their envs, acting RNGs,
        recurrent and normaliser states) in rank order; None on the other ranks. One process: ``state``."""
        if not self.enabled:
            return state
        states = self.gather_objects(state)
        return None if states is None else {**states[0], "ranks": states[1:], "world_size": self.world_size}

    def scatter_checkpoint(self, checkpoint: dict | None) -> dict | None:
        """This rank's part of a checkpoint written by :meth:`gather_checkpoint` (read on rank 0 only)."""
        if not self.enabled:
            return checkpoint
        parts = None
        if self.is_main:
            if checkpoint is None:
                parts = [None] * self.world_size
            else:
                saved = checkpoint.get("world_size", 1)
                if saved != self.world_size:
                    raise ValueError(f"the checkpoint was written by {saved} ranks, this run has {self.world_size}")
                own = {k: v for k, v in checkpoint.items() if k not in ("ranks", "world_size")}
                parts = [own] + [dict(part, step=checkpoint["step"]) for part in checkpoint["ranks"]]
        return self.scatter_objects(parts)

    def gather_episodes(self, returns, metrics: dict, rows: list[dict], env_offset: int):
        """Rank 0: the episodes every rank finished in this iteration: (returns, metrics with the
        episode statistics of all ranks, episodes.csv rows with global env indices). Others: (None, ...)."""
        if not self.enabled:
            return returns, metrics, rows
        part = ([float(r) for r in returns], metrics.get("episode_length"),
                [dict(row, env=row["env"] + env_offset if isinstance(row.get("env"), int) else row.get("env"))
                 for row in rows])
        parts = self.gather_objects(part)
        if parts is None:
            return None, metrics, []
        all_returns = [r for part in parts for r in part[0]]
        metrics = {k: v for k, v in metrics.items() if k not in ("episode_return", "episode_length", "episodes")}
        if all_returns:
            lengths = [(len(rets), length) for rets, length, _ in parts if rets and length is not None]
            metrics["episode_return"] = float(np.mean(all_returns))
            if lengths:
                metrics["episode_length"] = sum(n * m for n, m in lengths) / sum(n for n, _ in lengths)
            metrics["episodes"] = float(len(all_returns))
        return np.asarray(all_returns), metrics, [row for part in parts for row in part[2]]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.cpu_group)

    def check_replicas(self, algo) -> None:
        """Raise unless every rank's copy of the algorithm's networks (its ``nn.Module`` attributes) holds
        the same parameters: the learner is replicated, only the data differ."""
        if not self.enabled:
            return
        tensors = [t for value in vars(algo).values() if isinstance(value, torch.nn.Module)
                   for t in value.state_dict().values() if t.is_floating_point()]
        flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors]) if tensors else torch.zeros(1)
        position = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        fingerprint = (float(flat.sum()), float((flat * position).sum()), int(flat.numel()))
        prints = self.all_gather_objects(fingerprint)
        if any(p != prints[0] for p in prints):
            raise RuntimeError(f"the ranks built different networks ({prints}): a data-parallel learner needs "
                               "identical initial parameters on every rank")

    # ------------------------------------------------------------------ statistics over every rank
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the items of every rank (``x.mean()`` with one process)."""
        if not self.enabled:
            return x.mean()
        totals = self.all_sum(torch.stack([x.sum().double(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                            device=x.device)]))
        return (totals[0] / totals[1].clamp_min(1.0)).to(x.dtype)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Max over the items of every rank (``x.max()`` with one process); an empty part counts as -inf."""
        if not self.enabled:
            return x.max()
        local = x.max() if x.numel() else torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
        return self.all_max(local)

    def normalize(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """:func:`aclab.core.losses.normalize` with the mean and unbiased std of every rank's items."""
        if not self.enabled:
            return losses.normalize(x, eps)
        x64 = x.double()
        totals = self.all_sum(torch.stack([x64.sum(), x64.square().sum(),
                                           torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)]))
        n = totals[2]
        mean = totals[0] / n
        var = (totals[1] - n * mean * mean).clamp_min(0.0) / (n - 1.0)
        return ((x64 - mean) / (var.sqrt() + eps)).to(x.dtype)

    def minibatch_mean(self, values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """The mean over minibatches of a per-minibatch mean statistic (e.g. PPO's approx KL), each
        minibatch's statistic taken over all ranks (``sum_k weight_k value_k``)."""
        if not self.enabled:
            return torch.stack(list(values)).mean()
        shares = torch.stack([v * w if w else torch.zeros_like(v) for v, w in zip(values, weights)])
        return self.all_sum(shares).mean()

    def share(self, count: int | torch.Tensor) -> float:
        """``count / (sum of count over ranks)``: this rank's weight in a mean over every rank's items
        (1.0 with one process; 0.0 when no rank has any)."""
        if not self.enabled:
            return 1.0
        local = float(count)
        total = float(self.all_sum(torch.tensor([local], dtype=torch.float64)).item())
        return local / total if total > 0 else 0.0

    def merge_moments(self, mean: np.ndarray, var: np.ndarray, count: float) -> tuple[np.ndarray, np.ndarray, float]:
        """The moments (mean, population variance, count) of the union of every rank's batch, merged in rank
        order with Chan et al.'s pairwise formula (what a normaliser with all ``N`` envs would see)."""
        if not self.enabled:
            return mean, var, count
        parts = self.all_gather_objects((np.asarray(mean, np.float64), np.asarray(var, np.float64), float(count)))
        m, v, n = parts[0]
        for m2, v2, n2 in parts[1:]:
            if n2 == 0:
                continue
            if n == 0:
                m, v, n = m2, v2, n2
                continue
            total = n + n2
            w = n2 / total
            delta = m2 - m
            v = v * (1.0 - w) + v2 * w + delta * delta * (w * (1.0 - w))
            m = m + delta * w
            n = total
        return m, v, n

    # ------------------------------------------------------------------ minibatches of the whole batch
    def _global_layout(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """From this rank's valid mask ``[T, B_k]`` (time-major, like its flat batch): for every valid
        transition of the whole batch in the single process's order (``t * B + b``), its owner rank and its
        index in the owner's flat batch; and the number of valid transitions."""
        parts = self.all_gather_objects(valid.cpu().numpy())
        full = np.concatenate(parts, axis=1)  # [T, B]: rank k holds envs [k B_k, (k + 1) B_k)
        per_rank = parts[0].shape[1]
        positions = np.flatnonzero(full.reshape(-1))
        owner = (positions % full.shape[1]) // per_rank
        local = np.zeros_like(positions)
        for k in range(self.world_size):
            mine = owner == k
            local[mine] = np.arange(int(mine.sum()))
        return torch.from_numpy(owner), torch.from_numpy(local), int(positions.size)

    def _parts(self, batch: dict, owner: torch.Tensor, local: torch.Tensor,
               groups: Iterator[torch.Tensor]) -> Iterator[Minibatch]:
        device = next(iter(batch.values())).device
        for group in groups:
            mine = group[owner[group] == self.rank]
            idx = local[mine].to(device)
            yield Minibatch({k: v[idx] for k, v in batch.items()}, mine.numel() / max(group.numel(), 1))

    def minibatches(self, batch: dict, num_minibatches: int, generator: torch.Generator,
                    valid: torch.Tensor) -> Iterator[Minibatch]:
        """One epoch of :func:`aclab.data.rollout.shuffled_minibatches` over the whole batch, as this rank
        holds it. ``batch``: this rank's valid transitions (flat, time-major order of ``valid [T, B_k]``).
        One process: exactly ``shuffled_minibatches(batch, num_minibatches, generator)``; several:
        :attr:`generator` replaces ``generator`` (the same permutation on every rank)."""
        if not self.enabled:
            for mb in shuffled_minibatches(batch, num_minibatches, generator):
                yield Minibatch(mb)
            return
        owner, local, n = self._global_layout(valid)
        perm = torch.randperm(n, generator=self.generator)
        size = max(n // num_minibatches, 1)
        yield from self._parts(batch, owner, local,
                               (perm[i * size:(i + 1) * size] for i in range(min(num_minibatches, n))))

    def chunks(self, batch: dict, size: int, generator: torch.Generator, valid: torch.Tensor) -> Iterator[Minibatch]:
        """One shuffled pass over the whole batch in chunks of ``size`` items (the last one shorter), as this
        rank holds it (FixPO's fixup passes: ``torch.split(torch.randperm(n, generator), size)``)."""
        if not self.enabled:
            n = next(iter(batch.values())).shape[0]
            order = torch.randperm(n, generator=generator, device=generator.device)
            for chunk in torch.split(order, size):
                yield Minibatch({k: v[chunk] for k, v in batch.items()})
            return
        owner, local, n = self._global_layout(valid)
        yield from self._parts(batch, owner, local, iter(torch.split(torch.randperm(n, generator=self.generator),
                                                                     size)))

    def trajectory_minibatches(self, buffer, per_minibatch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """:meth:`aclab.algos.phasic.AuxBuffer.trajectory_minibatches` over every rank's trajectories: the
        ids ``k * B_k + b`` of this rank's part of each minibatch (possibly empty)."""
        if not self.enabled:
            yield from buffer.trajectory_minibatches(per_minibatch, generator)
            return
        local_envs = buffer.num_envs
        envs = local_envs * self.world_size
        total = buffer.size * envs
        perm = torch.randperm(total, generator=self.generator)
        per_minibatch = max(min(per_minibatch, total), 1)
        for start in range(0, total - per_minibatch + 1, per_minibatch):
            ids = perm[start:start + per_minibatch]
            k, b = ids // envs, ids % envs
            mine = (b // local_envs) == self.rank
            yield k[mine] * local_envs + (b[mine] - self.rank * local_envs)

    # ------------------------------------------------------------------ gradients
    def reduce_gradients(self, grads: list[torch.Tensor | None], like: Sequence[torch.Tensor], weight: float = 1.0,
                         differentiable: bool = False) -> list[torch.Tensor | None]:
        """``sum_k weight_k grads_k`` over ranks (one all-reduce of a flat vector). A gradient missing on
        some ranks counts as zeros there; one missing on every rank stays None (an optimiser skips such a
        parameter, as it would in one process). ``differentiable=True`` keeps the graph (STAC's inner
        step): the all-reduce's backward sums the incoming gradients over ranks. With one process:
        ``grads`` unchanged."""
        if not self.enabled:
            return list(grads)
        present = torch.tensor([g is not None for g in grads], dtype=like[0].dtype, device=like[0].device)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, like)])
        flat = torch.cat([flat * weight if weight != 1.0 else flat, present])
        if differentiable:
            flat = _AllReduceSum.apply(flat, self.group)
        else:
            flat = self._reduce(flat, dist.ReduceOp.SUM)
        out, offset = [], 0
        for p in like:
            out.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        anywhere = flat[offset:].detach() > 0
        return [g if bool(has) else None for g, has in zip(out, anywhere)]

    def backward(self, loss: torch.Tensor | None, params: list[torch.Tensor], weight: float = 1.0) -> None:
        """``loss.backward()``, then (several ranks) ``p.grad = sum_k weight_k grad_k`` over ranks for every
        parameter in ``params``: the hook before an optimiser step (clip and step as usual after it). A rank
        with ``weight == 0`` (none of this minibatch's items) or ``loss`` None contributes zeros."""
        if not self.enabled:
            loss.backward()
            return
        if loss is not None and weight > 0:
            loss.backward()
        reduced = self.reduce_gradients([p.grad for p in params], params, weight)
        for p, g in zip(params, reduced):
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


class _AllReduceSum(torch.autograd.Function):
    """``sum over ranks`` as a differentiable op: its backward sums the incoming gradients over ranks (the
    gradient of ``sum_j x_j`` with respect to this rank's ``x`` is the sum of every rank's upstream gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


SINGLE_PROCESS = DataParallel()
_current = SINGLE_PROCESS


def current() -> DataParallel:
    """The data-parallel context of this process (set by the training loop under ``torchrun``)."""
    return _current


def use(dp: DataParallel) -> DataParallel:
    """Make ``dp`` the context algorithms built from now on use; returns the previous one."""
    global _current
    previous, _current = _current, dp
    return previous


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when this process was not started by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_environment(seed: int, device_type: str = "cpu", timeout_s: float = 1800.0) -> DataParallel:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    NCCL when training on CUDA, else gloo, plus a gloo group for host-side collectives. Returns the
    single-process context when ``WORLD_SIZE`` is 1 or unset."""
    world_size = launched_world_size()
    if world_size <= 1:
        return SINGLE_PROCESS
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    device = torch.device("cuda", local_rank) if device_type == "cuda" else "cpu"
    return DataParallel(dist.get_world_size(), rank, seed, group=dist.group.WORLD, cpu_group=cpu_group, device=device)


def shutdown() -> None:
    """Leave the process group (every rank, at the end: a gloo process that exits without it may abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
