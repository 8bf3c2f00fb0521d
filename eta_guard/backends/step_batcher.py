"""Step-level batching of decode jobs over one local model: every live row, one forward per step.

A *job* is one or more *rows* decoded from a :class:`Context` (a prompt's KV cache and the ids it
encoded). Each :meth:`StepBatcher.step` runs ONE batched forward over every live row of every job
(per group, see below), picks each row's next token, streams it to the row's callback and drops
rows that finished (EOS, the token budget, or the job's stopping criterion). Jobs join at step
boundaries; rows finish independently; rows past the row budget wait for a later step.

Rows of different lengths share one KV cache: each is left-padded to the longest, the attention
mask holds zeros at the padding and ``position_ids`` are each row's own token count, so a row sees
exactly what it would see alone. A joining row's cache is left-padded and concatenated along the
batch; a finished row is removed with an index select; columns that are padding for every row are
trimmed. The only model call is HF's ``model(input_ids, attention_mask, position_ids,
past_key_values, use_cache=True)`` (plus the prompt's own processor inputs at prefill).

API (driven from one thread, normally the model thread, :mod:`eta_guard.model_thread`)::

    batcher = StepBatcher(model, eos_token_ids=[2], max_rows=8)
    ctx = batcher.prefill(prepared.model_inputs)          # one forward: the prompt (with pixels)
    ctx = batcher.extend(ctx, prefix_ids)                 # forced tokens ("As an AI assistant")
    greedy = batcher.submit(ctx, max_new_tokens=64)        # one greedy row
    cands = batcher.submit(ctx, n=5, temperature=1.0, top_k=50, seed=7,
                           max_new_tokens=32, stop=sentence_end, keep_kv=True)
    batcher.run([greedy, cands])                          # or call step() yourself
    ctx = cands.commit(best)                              # row ``best``'s KV: the next step's context

- Sampling, as transformers' ``_sample`` does for a batch of the job's ``n`` rows: the logits
  divided by the temperature, then exactly the ``top_k`` largest kept (``torch.topk``: ties at
  the k-th place are not all kept, unlike ``TopKLogitsWarper``), a softmax, and ONE
  ``torch.multinomial(probs[n, V], 1)`` per step with the job's generator (rows that already
  finished still take their draw, as in ``_sample``). So a job's samples never depend on other
  jobs, and a seeded job draws what ``generate`` draws for the same seed wherever the logits are
  equal. ``generator=`` passes a caller's generator (a search's RNG stream, carried from step to
  step); ``seed=`` seeds a private one. A job's rows join together (a job that alone exceeds the
  budget is split, and then draws per admitted part).
- ``logits_processor``: an optional transformers ``LogitsProcessor``-style callable
  ``(ids[1, T], scores[1, V]) -> scores`` applied per row before choosing (e.g. a JSON grammar).
- ``stop``: a transformers ``StoppingCriteria``-style callable ``(ids[R, T], scores) -> bool[R]``
  over the job's live rows (all of one length), e.g. ``SentenceEndCriteria``.
- ``on_token(row, token_id)``: each row's stream (called on the driving thread).
- ``keep_kv=True``: a finished row keeps its KV so :meth:`Job.commit` can return it as a
  :class:`Context` whose last token is pending (fed by the next job's first step, no extra pass).
- :attr:`StepBatcher.forwards`: model forwards run so far (a batched forward counts once), the
  "sequential forwards on the critical path" of a benchmark.
- Memory: at most ``max_rows`` rows, and at most ``memory_budget_bytes`` of KV
  (``rows x padded length x`` :func:`eta_guard.memory.kv_bytes_per_token`); rows over either
  bound wait in the queue (a batch past the budget is split across steps, never refused).

Families with multimodal RoPE (Qwen2-VL-style: 3-D positions at prefill, ``rope_deltas`` kept on
the model) share the padded batch too: after the prompt every new token is text, whose three
position components are equal, so a row's position is its token index plus the prompt's
``rope_deltas`` (:attr:`Context.offset`), passed explicitly; the model's saved state is never read
(greedy rows equal ``generate`` on the Qwen2-VL replica, tests/test_step_batcher.py).
Sliding-window caches decode each job in its own group (left padding would shift their window):
its rows still share one forward, and a step runs one forward per such job.
"""

from __future__ import annotations

import copy as _copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from eta_guard.errors import InvalidInputError

StopFn = Callable[[torch.Tensor, Any], Any]


@dataclass
class Context:
    """A sequence whose KV the next job continues.

    Attributes:
        cache: a batch-1 ``DynamicCache`` over the first ``cached`` ids, unpadded.
        ids: every token id of the sequence.
        cached: how many of ``ids`` the cache holds (``len(ids)`` or ``len(ids) - 1``).
        next_logits: ``[V]`` logits for the token after ``ids`` (when ``cached == len(ids)``).
        offset: added to a token's index to get its position (Qwen2-VL-style multimodal RoPE:
            the prompt's ``rope_deltas``, since its image tokens span fewer positions than ids).
    """

    cache: Any
    ids: list[int]
    cached: int
    next_logits: torch.Tensor | None = None
    offset: int = 0


@dataclass
class Row:
    """One decoded sequence of a job."""

    job: Job
    index: int
    ids: list[int]
    new: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "stop", "length"
    kept: Any = None  # (cache, cached) of a finished row when the job keeps KV
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per token, if kept


class Job:
    """Rows decoded from one context with one decoding rule; see the module docstring."""

    def __init__(
        self,
        context: Context,
        *,
        n: int,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_k: int,
        seed: int | None,
        stop: StopFn | None,
        on_token: Callable[[int, int], Any] | None,
        keep_kv: bool,
        keep_logits: bool = False,
        generator: torch.Generator | None = None,
        logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.context = context
        self.logits_processor = logits_processor
        self.keep_logits = keep_logits
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.stop = stop
        self.on_token = on_token
        self.keep_kv = keep_kv
        self.rows = [Row(self, i, list(context.ids)) for i in range(n)]
        self.generator = generator
        if do_sample and generator is None:
            self.generator = torch.Generator(device=_logits_device(context))
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(seed))

    @property
    def done(self) -> bool:
        """Whether every row has finished."""
        return all(row.finish_reason is not None for row in self.rows)

    @property
    def tokens(self) -> list[list[int]]:
        """Each row's new token ids so far."""
        return [list(row.new) for row in self.rows]

    def commit(self, index: int) -> Context:
        """Row ``index``'s sequence as a new :class:`Context` (its last token pending).

        Raises:
            InvalidInputError: the job was not submitted with ``keep_kv=True`` or the row has not
                finished.
        """
        row = self.rows[index]
        if not self.keep_kv or row.kept is None:
            raise InvalidInputError(
                f"commit({index}): the row has not finished or the job was submitted without "
                "keep_kv=True"
            )
        cache, cached = row.kept
        return Context(cache=cache, ids=list(row.ids), cached=cached, offset=self.context.offset)


def _logits_device(context: Context) -> torch.device:
    if context.next_logits is not None:
        return context.next_logits.device
    layers = getattr(context.cache, "layers", None) or []
    keys = getattr(layers[0], "keys", None) if layers else None
    return keys.device if isinstance(keys, torch.Tensor) else torch.device("cpu")


class _Group:
    """Rows that share one padded KV cache and one forward per step."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [R, T] over the cache's columns
        self.positions: torch.Tensor | None = None  # [R] position of each row's next input
        self.feed: list[int] = []  # each row's next input token (chosen, not yet encoded)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])


class StepBatcher:
    """Decode many jobs over one model, one batched forward per step.

    Args:
        model: a transformers causal/image-text-to-text model (eval mode).
        eos_token_ids: ids that end a row.
        max_rows: the most rows decoded at once (a cap; ``None``: only the memory budget).
        memory_budget_bytes: the most KV bytes the live rows may hold (``None``: no bound).
        kv_bytes_per_token: KV bytes per token and row (default: from the model's config and
            dtype, :func:`eta_guard.memory.kv_bytes_per_token`).
        isolate_jobs: decode each job in its own group (``None``: detected, see module docstring).
    """

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int] = (),
        max_rows: int | None = 8,
        memory_budget_bytes: int | None = None,
        kv_bytes_per_token: int | None = None,
        isolate_jobs: bool | None = None,
    ) -> None:
        if max_rows is not None and max_rows < 1:
            raise InvalidInputError(f"max_rows={max_rows!r}: must be >= 1 (or None)")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise InvalidInputError(
                f"memory_budget_bytes={memory_budget_bytes!r}: must be >= 1 (or None)"
            )
        self.model = model
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.max_rows = max_rows
        self.memory_budget_bytes = memory_budget_bytes
        if kv_bytes_per_token is None:
            from eta_guard.memory import kv_bytes_per_token as estimate

            kv_bytes_per_token = estimate(model.config, model.dtype)
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.isolate_jobs = _needs_isolation(model) if isolate_jobs is None else isolate_jobs
        self.forwards = 0
        # transformers renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.max_live_rows = 0  # the most rows one forward carried (for tests and benchmarks)
        self._shared = _Group()
        self._groups: list[_Group] = []
        self._waiting: list[Row] = []

    # ------------------------------------------------------------------ contexts
    def new_cache(self) -> DynamicCache:
        """An empty cache for this model."""
        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    @torch.inference_mode()
    def prefill(self, model_inputs: dict[str, Any]) -> Context:
        """Encode a prompt (batch 1, with its pixel inputs) in one forward.

        Args:
            model_inputs: the processor's output (``input_ids`` ``[1, L]``, ``attention_mask``,
                ``pixel_values``, ...), on the model's device.
        """
        ids = model_inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise InvalidInputError(
                f"prefill takes one prompt ([1, L] ids); got {tuple(ids.shape)}"
            )
        cache = self.new_cache()
        for module in self.model.modules():  # a text-only prompt must not read the last image's
            if getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = None
        out = self.model(**model_inputs, **{self._cache_kw: cache}, use_cache=True)
        self.forwards += 1
        return Context(
            cache=cache,
            ids=ids[0].tolist(),
            cached=int(ids.shape[1]),
            next_logits=out.logits[0, -1].float(),
            offset=rope_offset(self.model),
        )

    @torch.inference_mode()
    def extend(self, context: Context, ids: Sequence[int]) -> Context:
        """``context`` followed by forced tokens, in one forward (``context`` is left as it was)."""
        feed = context.ids[context.cached :] + [int(i) for i in ids]
        if not feed:
            return context
        cache = _copy_cache(context.cache)
        start = context.cached
        input_ids = torch.tensor([feed], device=self.model.device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones(
                1, start + len(feed), dtype=torch.long, device=input_ids.device
            ),
            "position_ids": torch.arange(start, start + len(feed), device=input_ids.device)[None]
            + context.offset,
            self._cache_kw: cache,
            "use_cache": True,
        }
        out = self.model(**kwargs)
        self.forwards += 1
        return Context(
            cache=cache,
            ids=context.ids + [int(i) for i in ids],
            cached=start + len(feed),
            next_logits=out.logits[0, -1].float(),
            offset=context.offset,
        )

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        context: Context,
        *,
        max_new_tokens: int,
        n: int = 1,
        do_sample: bool | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: StopFn | None = None,
        on_token: Callable[[int, int], Any] | None = None,
        keep_kv: bool = False,
        keep_logits: bool = False,
        generator: torch.Generator | None = None,
        logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> Job:
        """Register ``n`` rows decoded from ``context``; they join at the next step.

        ``do_sample`` defaults to ``n > 1``; greedy rows take the argmax. ``top_k=0`` keeps the
        whole vocabulary. ``keep_logits``: each row keeps the ``[V]`` float32 logits each of its
        tokens was chosen from (``Row.logits``; for checks and scoring, costs memory).
        ``generator``: the sampling RNG (consumed, one draw per step; default: a private one from
        ``seed``).

        Raises:
            InvalidInputError: a bad count, budget, temperature or ``top_k``, or one row that
                alone needs more KV than ``memory_budget_bytes``.
        """
        if n < 1 or max_new_tokens < 1:
            raise InvalidInputError(
                f"submit(n={n!r}, max_new_tokens={max_new_tokens!r}): both must be >= 1"
            )
        do_sample = n > 1 if do_sample is None else do_sample
        if do_sample and not temperature > 0:
            raise InvalidInputError(f"temperature={temperature!r}: must be > 0 when sampling")
        if top_k < 0:
            raise InvalidInputError(f"top_k={top_k!r}: must be >= 0 (0 keeps every token)")
        if context.cached not in (len(context.ids), len(context.ids) - 1):
            raise InvalidInputError("the context has more than one pending token: extend() it")
        job = Job(
            context,
            n=n,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            stop=stop,
            on_token=on_token,
            keep_kv=keep_kv,
            keep_logits=keep_logits,
            generator=generator,
            logits_processor=logits_processor,
        )
        row_bytes = self._row_bytes(job.rows[0])
        if self.memory_budget_bytes is not None and row_bytes > self.memory_budget_bytes:
            raise InvalidInputError(
                f"one row of {len(context.ids)} + {max_new_tokens} tokens needs {row_bytes} "
                f"bytes of KV, over memory_budget_bytes={self.memory_budget_bytes}"
            )
        self._waiting.extend(job.rows)
        return job

    @property
    def live_rows(self) -> int:
        """Rows decoding now (not counting those waiting to join)."""
        return len(self._shared.rows) + sum(len(g.rows) for g in self._groups)

    @property
    def idle(self) -> bool:
        """Nothing decoding and nothing waiting."""
        return not self._waiting and self.live_rows == 0

    def run(self, jobs: Sequence[Job] = ()) -> None:
        """Step until ``jobs`` are done (all jobs when none are given)."""
        while not (all(job.done for job in jobs) if jobs else self.idle):
            self.step()

    def cancel(self, job: Job) -> None:
        """Drop a job's rows (waiting or live) and free what they hold."""
        self._waiting = [row for row in self._waiting if row.job is not job]
        for group in self._all_groups():
            keep = [i for i, row in enumerate(group.rows) if row.job is not job]
            if len(keep) != len(group.rows):
                self._select(group, keep)
        for row in job.rows:
            if row.finish_reason is None:
                row.finish_reason = "cancelled"
        self._groups = [g for g in self._groups if g.rows]

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting rows (within the budget), then one forward per group over its rows."""
        self._admit()
        for group in self._all_groups():
            if group.rows:
                self._forward(group)
        self._groups = [g for g in self._groups if g.rows]

    def _all_groups(self) -> list[_Group]:
        return [self._shared, *self._groups]

    def _admit(self) -> None:
        """Admit waiting jobs first come, first served, each job's rows together."""
        admitted: list[Row] = []
        jobs: dict[int, list[Row]] = {}
        for row in self._waiting:
            jobs.setdefault(id(row.job), []).append(row)
        for rows in jobs.values():
            if not self._fits(rows, admitted):
                if self.live_rows + len(admitted) > 0:
                    break  # later jobs wait behind this one
                # Alone over the bound (more rows than max_rows, or their KV): split the job.
                rows = rows[: max(1, self._rows_that_fit(rows))]
                if not self._fits(rows, admitted):
                    row = rows[0]
                    raise InvalidInputError(
                        f"one row of {len(row.ids)} + {row.job.max_new_tokens} tokens needs "
                        f"{self._row_bytes(row)} bytes of KV, over memory_budget_bytes="
                        f"{self.memory_budget_bytes}"
                    )
                admitted.extend(rows)
                break
            admitted.extend(rows)
        taken = {id(row) for row in admitted}
        self._waiting = [row for row in self._waiting if id(row) not in taken]
        by_job: dict[int, list[Row]] = {}
        for row in admitted:
            by_job.setdefault(id(row.job), []).append(row)
        for rows in by_job.values():
            self._join(rows)

    def _rows_that_fit(self, rows: list[Row]) -> int:
        count = 0
        while count < len(rows) and self._fits(rows[: count + 1], []):
            count += 1
        return count

    def _row_bytes(self, row: Row) -> int:
        return (len(row.ids) + row.job.max_new_tokens) * self.kv_bytes_per_token

    def _fits(self, joining: list[Row], admitted: list[Row]) -> bool:
        rows = [r for g in self._all_groups() for r in g.rows] + admitted + joining
        if self.max_rows is not None and len(rows) > self.max_rows:
            return False
        if self.memory_budget_bytes is None:
            return True
        # Padded to the longest final length (a bound on what the rows will ever hold).
        longest = max(len(r.ids) - len(r.new) + r.job.max_new_tokens for r in rows)
        return len(rows) * longest * self.kv_bytes_per_token <= self.memory_budget_bytes

    def _join(self, rows: list[Row]) -> None:
        """Pick first tokens from the context's logits; add the rows that go on to a group."""
        job = rows[0].job
        ctx = job.context
        going: list[Row] = []
        if ctx.next_logits is not None:  # the first token comes from the prefill's logits
            logits = ctx.next_logits[None].expand(len(rows), -1)
            tokens = self._choose(job, rows, logits)
            self._advance(job, rows, tokens, logits)
            going = [row for row in rows if row.finish_reason is None]
        else:  # the last id is pending: it is the first input of the next forward
            going = rows
        if not going:
            return
        if self.isolate_jobs:
            group = _Group()
            self._groups.append(group)
        else:
            group = self._shared
        cache = _copy_cache(ctx.cache)
        if len(going) > 1:
            cache.batch_repeat_interleave(len(going))
        device = _logits_device(ctx)
        mask = torch.ones(len(going), ctx.cached, dtype=torch.long, device=device)
        positions = torch.full(
            (len(going),), ctx.cached + ctx.offset, dtype=torch.long, device=device
        )
        _merge(group, cache, mask, positions)
        group.rows.extend(going)
        group.feed.extend(row.ids[-1] for row in going)

    def _forward(self, group: _Group) -> None:
        assert group.mask is not None and group.positions is not None
        rows = len(group.rows)
        device = group.mask.device
        input_ids = torch.tensor(group.feed, device=device)[:, None]
        mask = torch.cat(
            [group.mask, torch.ones(rows, 1, dtype=group.mask.dtype, device=device)], 1
        )
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": group.positions[:, None],
            self._cache_kw: group.cache,
            "use_cache": True,
        }
        out = self.model(**kwargs)
        self.forwards += 1
        self.max_live_rows = max(self.max_live_rows, rows)
        group.mask, group.positions = mask, group.positions + 1
        logits = out.logits[:, -1].float()
        by_job: dict[int, list[int]] = {}
        for i, row in enumerate(group.rows):  # one choice per job and step (one RNG draw)
            by_job.setdefault(id(row.job), []).append(i)
        for index in by_job.values():
            job_rows = [group.rows[i] for i in index]
            tokens = self._choose(job_rows[0].job, job_rows, logits[index])
            self._advance(job_rows[0].job, job_rows, tokens, logits[index], group=group, at=index)
        keep = [i for i, row in enumerate(group.rows) if row.finish_reason is None]
        if len(keep) != rows:
            self._select(group, keep)
        group.feed = [group.rows[i].ids[-1] for i in range(len(group.rows))]

    def _choose(self, job: Job, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """``logits`` ``[R, V]`` of some of ``job``'s rows -> one token per row.

        Greedy: the argmax. Sampling: transformers' ``_sample`` over the job's ``n`` rows (see the
        module docstring): one ``torch.multinomial`` over ``[n, V]`` with the job's generator;
        rows not in ``rows`` (finished, or waiting) take their draw from a uniform row.
        """
        if job.logits_processor is not None:
            logits = torch.cat(
                [
                    job.logits_processor(
                        torch.tensor([row.ids], device=logits.device), logits[k : k + 1].clone()
                    )
                    for k, row in enumerate(rows)
                ]
            )
        if not job.do_sample:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(top_k_scores(logits / job.temperature, job.top_k), -1)
        n = len(job.rows)
        index = [row.index for row in rows]
        if index != list(range(n)):
            full = probs.new_ones(n, probs.shape[-1])
            full[index] = probs
            probs = full
        drawn = torch.multinomial(probs, 1, generator=job.generator)[:, 0].tolist()
        return [int(drawn[i]) for i in index]

    def _advance(
        self,
        job: Job,
        rows: list[Row],
        tokens: list[int],
        logits: torch.Tensor,
        *,
        group: _Group | None = None,
        at: list[int] | None = None,
    ) -> None:
        """Append each row's token, stream it and decide which rows finish."""
        for k, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.ids.append(token)
            row.new.append(token)
            if job.keep_logits:
                row.logits.append(logits[k].clone())
            if job.on_token is not None:
                job.on_token(row.index, token)
        stops = [False] * len(rows)
        if job.stop is not None:
            ids = torch.tensor([row.ids for row in rows])
            stops = [bool(s) for s in job.stop(ids, None)]
        for k, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if token in self.eos_token_ids:
                row.finish_reason = "eos"
            elif stops[k]:
                row.finish_reason = "stop"
            elif len(row.new) >= job.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason is not None and job.keep_kv:
                row.kept = self._row_kv(group, at[k] if at else None, job)

    def _row_kv(self, group: _Group | None, index: int | None, job: Job) -> tuple[Any, int]:
        """A finished row's KV, unpadded, batch 1 (its last token is not in it)."""
        if group is None or index is None or group.mask is None:
            return _copy_cache(job.context.cache), job.context.cached
        real = int(group.mask[index].sum())
        cache = _copy_cache(group.cache)
        for layer in cache.layers:
            layer.keys = layer.keys[index : index + 1, :, -real:].clone()
            layer.values = layer.values[index : index + 1, :, -real:].clone()
        return cache, real

    def _select(self, group: _Group, keep: list[int]) -> None:
        """Keep only rows ``keep`` of a group; trim columns that are padding for all of them."""
        group.rows = [group.rows[i] for i in keep]
        group.feed = [group.feed[i] for i in keep]
        if not keep:
            group.cache, group.mask, group.positions = None, None, None
            return
        assert group.mask is not None and group.positions is not None
        index = torch.tensor(keep, device=group.mask.device)
        group.cache.batch_select_indices(index)
        group.mask = group.mask.index_select(0, index)
        group.positions = group.positions.index_select(0, index)
        used = int(group.mask.sum(1).max())
        if used < group.mask.shape[1]:
            _trim_left(group.cache, group.mask.shape[1] - used)
            group.mask = group.mask[:, -used:]


def top_k_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores`` ``[R, V]`` with all but each row's ``k`` largest set to ``-inf`` (``k=0``: all).

    Exactly ``k`` survive, the ones ``torch.topk`` picks (the reference's top-k), also when
    several scores tie at the k-th place; transformers' ``TopKLogitsWarper`` keeps every tie.
    """
    if not 0 < k < scores.shape[-1]:
        return scores
    values, index = torch.topk(scores, k, dim=-1)
    return torch.full_like(scores, float("-inf")).scatter(-1, index, values)


# ---------------------------------------------------------------------- cache surgery
def _copy_cache(cache: Any) -> Any:
    """A copy of a dynamic cache that later updates of either side never touch.

    Layers are copied shallowly: dynamic layers replace their tensors on update (concatenation),
    never write into them, so sharing the tensors is safe and costs nothing.
    """
    copy = _copy.copy(cache)
    copy.layers = [_copy.copy(layer) for layer in cache.layers]
    return copy


def _pad_left(cache: Any, columns: int) -> None:
    if columns <= 0:
        return
    for layer in cache.layers:
        pad = layer.keys.new_zeros(*layer.keys.shape[:2], columns, layer.keys.shape[3])
        layer.keys = torch.cat([pad, layer.keys], 2)
        pad = layer.values.new_zeros(*layer.values.shape[:2], columns, layer.values.shape[3])
        layer.values = torch.cat([pad, layer.values], 2)


def _trim_left(cache: Any, columns: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, columns:]
        layer.values = layer.values[:, :, columns:]


def _merge(group: _Group, cache: Any, mask: torch.Tensor, positions: torch.Tensor) -> None:
    """Add rows (their cache, mask and positions) to a group, left-padding the shorter side."""
    if group.cache is None or group.mask is None or group.positions is None:
        group.cache, group.mask, group.positions = cache, mask, positions
        return
    length = max(group.length, int(mask.shape[1]))
    _pad_left(group.cache, length - group.length)
    _pad_left(cache, length - int(mask.shape[1]))
    for mine, theirs in zip(group.cache.layers, cache.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], 0)
        mine.values = torch.cat([mine.values, theirs.values], 0)

    def padded(m: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(m, (length - int(m.shape[1]), 0))

    group.mask = torch.cat([padded(group.mask), padded(mask)], 0)
    group.positions = torch.cat([group.positions, positions], 0)


# ---------------------------------------------------------------------- model families
def _needs_isolation(model: Any) -> bool:
    """Sliding-window attention: left padding would shift the window, so no shared batch."""
    text = model.config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    return bool(window) and bool(getattr(text, "use_sliding_window", True))


def rope_offset(model: Any) -> int:
    """The prompt's ``rope_deltas`` (multimodal RoPE models keep it on a module), else 0."""
    for module in model.modules():
        deltas = getattr(module, "rope_deltas", None)
        if isinstance(deltas, torch.Tensor):
            return int(deltas.reshape(-1)[0])
    return 0
