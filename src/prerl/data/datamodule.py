"""LightningDataModule that turns problem sources into left-padded prompt batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .collate import collate_prompts
from .prompts import encode_chat, problem_messages, resolve_context_ids
from .sampler import ResumableSampler
from .sources import ReasoningGymSource, Source, to_plain
from .splits import make_split_with_stats

logger = logging.getLogger(__name__)

__all__ = ["PromptDataModule", "PromptDataset", "PromptTooLongError"]


class PromptTooLongError(ValueError):
    """A rendered prompt is longer than ``max_prompt_length`` or leaves its response no room in the
    model's context."""


class PromptDataset(Dataset):
    """In-memory list of ``{"prompt_ids": list[int], "problem": dict}`` items."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]


class PromptDataModule(L.LightningDataModule):
    """Prompts for RL: problems from ``train``/``val`` sources, chat-templated and tokenised.

    Args:
        train: source of training problems (``load() -> list[dict]``).
        val: separate validation source, or None (then ``val_size`` may carve val out of train).
        tokenizer: a HF tokenizer with a chat template; may be assigned later
            (``dm.tokenizer = tok``) but before ``setup()``.
        system_prompt: system message, or None for no system message.
        batch_size: prompts per optimizer step across ALL ranks (the paper's 128), split evenly
            over the ranks (an error if it does not divide).
        val_batch_size: validation problems per batch across all ranks (each rank takes
            ceil(val_batch_size / world size)).
        max_prompt_length: longest allowed prompt in tokens (None: no limit).
        on_long_prompt: "error" (raise naming the problem) or "drop" (drop, count, warn) for a
            prompt longer than ``max_prompt_length``, and, when set up by a trainer whose module
            has ``response_room()`` (PreRLModule), for a prompt that leaves less than its split's
            ``max_new_tokens`` positions of the model's context.
        marginal_context: question-free context for the marginal log-prob; None = the
            tokenizer's "<|im_start|>" token, else its BOS token. Exposed as ``context_ids``.
        chat_template_kwargs: extra kwargs for apply_chat_template (e.g. enable_thinking=False).
        val_size: carve this many validation problems out of ``train`` (only when val is None).
        seed: seeds the carve-out permutation and the training shuffle.
        num_workers: DataLoader workers (0 = main process; data is in memory anyway).
        question_template: optional user-message template with a ``{question}`` field, e.g.
            ``"{question}\nPut your final answer within \\boxed{}."``; None = the question as is.
            Problems with their own ``messages`` (verl-style files) are rendered as they are:
            neither ``system_prompt`` nor ``question_template`` applies to them.

    After ``setup()``: ``train_problems``, ``val_problems``, ``context_ids``, ``pad_token_id``
    and ``stats`` (counts per split) are available. Batches: see :func:`collate_prompts`.
    """

    def __init__(
        self,
        train: Source,
        val: Source | None = None,
        tokenizer: Any = None,
        system_prompt: str | None = None,
        batch_size: int = 8,
        val_batch_size: int = 8,
        max_prompt_length: int | None = 1024,
        on_long_prompt: Literal["error", "drop"] = "error",
        marginal_context: str | Sequence[int] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        val_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        question_template: str | None = None,
    ) -> None:
        super().__init__()
        if on_long_prompt not in ("error", "drop"):
            raise ValueError(f"on_long_prompt must be 'error' or 'drop', got {on_long_prompt!r}")
        if val is not None and val_size is not None:
            raise ValueError("give either a val source or val_size (carved out of train), not both")
        if int(batch_size) <= 0 or int(val_batch_size) <= 0:
            raise ValueError("batch_size and val_batch_size must be positive")
        self.train_source = train
        self.val_source = val
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.max_prompt_length = None if max_prompt_length is None else int(max_prompt_length)
        self.on_long_prompt = on_long_prompt
        self.marginal_context = to_plain(marginal_context)
        self.chat_template_kwargs = dict(to_plain(chat_template_kwargs) or {})
        self.val_size = None if val_size is None else int(val_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        if question_template is not None and "{question}" not in question_template:
            raise ValueError("question_template must contain the field '{question}'")
        self.question_template = question_template

        self.train_problems: list[dict] = []
        self.val_problems: list[dict] = []
        self.context_ids: list[int] = []
        self.pad_token_id: int | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self._train_items: list[dict] = []
        self._val_items: list[dict] = []
        self._is_setup = False
        self._resume_point: dict | None = None
        self.rank, self.world_size = 0, 1

    # ------------------------------------------------------------------ setup
    def _check_sources(self) -> None:
        t, v = self.train_source, self.val_source
        if isinstance(t, ReasoningGymSource) and isinstance(v, ReasoningGymSource):
            if t.task == v.task and t.seed == v.seed and t.config == v.config:
                raise ValueError(
                    f"train and val reasoning-gym sources for {t.task!r} use the same seed {t.seed} and "
                    "config: they would generate the same problems; give val a different seed"
                )

    def _resolve_pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            logger.warning("tokenizer has no pad token: left-padding prompts with the EOS id %d", tok.eos_token_id)
            return int(tok.eos_token_id)
        raise ValueError("tokenizer has neither a pad token nor an EOS token to pad prompts with")

    def _response_room(self) -> dict[str, tuple[int, str, int]]:
        """Per split: (the model's context, the key of its responses' length, that length), from the
        LightningModule of the trainer this runs under (``response_room()``); empty without one."""
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if not hasattr(module, "response_room"):
            return {}
        context, lengths = module.response_room()
        return {} if context is None else {split: (context, key, n) for split, (key, n) in lengths.items()}

    def _leave_room(self, items: list[dict], split: str, room: tuple[int, str, int]) -> tuple[list[dict], int]:
        """The prompts that leave ``room`` = (context, key, max_new_tokens) for their response, and how
        many did not: those raise PromptTooLongError naming the longest (on_long_prompt="drop": dropped)."""
        context, key, new_tokens = room
        fit = [it for it in items if len(it["prompt_ids"]) + new_tokens <= context]
        if len(fit) == len(items):
            return items, 0
        longest = max(items, key=lambda it: len(it["prompt_ids"]))
        n, pid, dropped = len(longest["prompt_ids"]), longest["problem"]["id"], len(items) - len(fit)
        if self.on_long_prompt == "error":
            lower = f"lower {key} to {context - n} or less, or " if n < context else ""
            raise PromptTooLongError(
                f"{split} prompt {pid} has {n} tokens: with {key}={new_tokens} it needs {n + new_tokens} positions, "
                f"more than the model's context of {context} (max_position_embeddings); {lower}set "
                f"data.on_long_prompt=drop to drop the {dropped} {split} prompt(s) that do not fit"
            )
        logger.warning(
            "%s: dropped %d prompt(s) that leave less than %s=%d positions of the model's context of %d "
            "(longest: %s, %d tokens)", split, dropped, key, new_tokens, context, pid, n,
        )
        return fit, dropped

    def _tokenise(self, problems: list[dict], split: str, room: tuple[int, str, int] | None) -> tuple[list[dict], int]:
        items, too_long = [], []
        own_chat = sum(bool(p.get("messages")) for p in problems)
        if own_chat:
            logger.info("%s: %d of %d problems bring their own chat (verl-style 'prompt'): rendered as they are, "
                        "without data.system_prompt / data.question_template", split, own_chat, len(problems))
        for p in problems:
            messages = problem_messages(p, self.system_prompt, self.question_template)
            ids = encode_chat(self.tokenizer, messages, self.chat_template_kwargs)
            if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
                too_long.append((p["id"], len(ids)))
                continue
            items.append({"prompt_ids": ids, "problem": p})
        if too_long and self.on_long_prompt == "error":
            shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in too_long[:5])
            raise PromptTooLongError(
                f"{len(too_long)} {split} prompt(s) exceed max_prompt_length={self.max_prompt_length}: "
                f"{shown}; raise max_prompt_length or set on_long_prompt='drop'"
            )
        if too_long:
            logger.warning(
                "%s: dropped %d prompt(s) longer than max_prompt_length=%d (longest %d tokens, e.g. %s)",
                split, len(too_long), self.max_prompt_length, max(n for _, n in too_long), too_long[0][0],
            )
        if room is None:
            return items, len(too_long)
        items, no_room = self._leave_room(items, split, room)
        return items, len(too_long) + no_room

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @property
    def per_rank_batch_size(self) -> int:
        """Training prompts each rank samples per optimizer step."""
        return self.batch_size // self.world_size

    @property
    def per_rank_val_batch_size(self) -> int:
        return -(-self.val_batch_size // self.world_size)

    def setup(self, stage: str | None = None) -> None:
        if self._is_setup:
            return
        self.rank, self.world_size = self._rank_world()
        if self.batch_size % self.world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the number of prompts per optimizer step across all "
                f"{self.world_size} ranks and must divide evenly over them; use a multiple of {self.world_size}"
            )
        if self.tokenizer is None:
            raise ValueError("PromptDataModule needs a tokenizer: pass tokenizer= or set dm.tokenizer before setup()")
        self._check_sources()
        train = self.train_source.load()
        val = self.val_source.load() if self.val_source is not None else None
        train, val, st = make_split_with_stats(train, val, val_size=self.val_size, seed=self.seed)
        self.context_ids = resolve_context_ids(self.tokenizer, self.marginal_context)
        self.pad_token_id = self._resolve_pad_id()
        room = self._response_room()
        self._train_items, train_long = self._tokenise(train, "train", room.get("train"))
        self._val_items, val_long = self._tokenise(val, "val", room.get("val"))
        if not self._train_items:
            raise ValueError(
                "no training prompts left after dropping long prompts (data.on_long_prompt=drop): raise "
                "data.max_prompt_length or lower module.rollout.max_new_tokens"
            )
        if len(self._train_items) < self.batch_size:
            raise ValueError(
                f"only {len(self._train_items)} training prompts for batch_size={self.batch_size} with "
                "drop_last=True: no full batch"
            )
        self.train_problems = [it["problem"] for it in self._train_items]
        self.val_problems = [it["problem"] for it in self._val_items]
        self.stats = {
            "train": {
                "loaded": st.train_loaded,
                "duplicates_dropped": st.train_duplicates,
                "overlap_with_val_dropped": st.train_overlap_dropped,
                "carved_to_val": st.carved,
                "too_long_dropped": train_long,
                "final": len(self._train_items),
            },
            "val": {
                "loaded": st.val_loaded,
                "duplicates_dropped": st.val_duplicates,
                "too_long_dropped": val_long,
                "final": len(self._val_items),
            },
        }
        for split, s in self.stats.items():
            logger.info("data %s: %s", split, ", ".join(f"{k}={v}" for k, v in s.items()))
        logger.info(
            "batch: %d prompts per optimizer step = %d rank(s) x %d; %d optimizer steps per epoch",
            self.batch_size, self.world_size, self.per_rank_batch_size, len(self._train_items) // self.batch_size,
        )
        lengths = [len(it["prompt_ids"]) for it in self._train_items]
        logger.info(
            "train prompt length: min %d, mean %.1f, max %d tokens; marginal context ids %s",
            min(lengths), sum(lengths) / len(lengths), max(lengths), self.context_ids,
        )
        self._is_setup = True

    # ------------------------------------------------------------------ loaders
    def _collate(self):
        return partial(collate_prompts, pad_token_id=self.pad_token_id, context_ids=tuple(self.context_ids))

    def _require_setup(self) -> None:
        if not self._is_setup:
            raise RuntimeError("call setup() before asking for dataloaders")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        sampler = ResumableSampler(
            len(self._train_items), self.per_rank_batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size
        )
        if self._resume_point is not None:
            sampler.skip_batches(**self._resume_point)
            self._resume_point = None
        return DataLoader(
            PromptDataset(self._train_items),
            batch_size=self.per_rank_batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """The data position, saved in checkpoints: the epoch and the batches already trained on.

        Lightning saves checkpoints after a batch's training step, so ``processed`` counts it.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_point = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        if not self._val_items:
            return []
        return DataLoader(
            PromptDataset(self._val_items),
            batch_size=self.per_rank_val_batch_size,
            sampler=ResumableSampler(
                len(self._val_items), self.per_rank_val_batch_size, shuffle=False, pad=True,
                rank=self.rank, world_size=self.world_size,
            ),
            drop_last=False,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )
